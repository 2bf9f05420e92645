//! Shared by the port tests that need real interfaces: a throw-away network namespace with
//! veth pairs, in which the calling test binary runs one of its own tests again as the child.

#![allow(dead_code)] // each test binary uses its own part

use std::process::Command;

/// A network namespace, deleted when dropped (also when the test fails).
pub struct Ns(pub String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(c: &str) {
    assert!(
        Command::new("sh")
            .arg("-c")
            .arg(c)
            .status()
            .unwrap()
            .success(),
        "{c}"
    )
}

/// Runs this test binary's test `name` again inside a fresh network namespace holding the veth
/// pairs `links` (up, IPv6 off; with `offloads_off`, checksum and segmentation offloads off,
/// best effort), with the environment variable `child_var` set to 1; asserts that the child
/// passed and returns what it printed. `None` when ESPADA_SKIP_NETNS=1 (said on stderr).
pub fn in_netns(
    tag: &str,
    name: &str,
    links: &[(&str, &str)],
    child_var: &str,
    offloads_off: bool,
) -> Option<String> {
    if std::env::var("ESPADA_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("ESPADA_SKIP_NETNS=1: {name} was NOT run");
        return None;
    }
    let ns = Ns(format!("{tag}{}", std::process::id() % 100_000));
    sh(&format!("ip netns add {}", ns.0));
    for (a, b) in links {
        sh(&format!(
            "ip -n {} link add {a} type veth peer name {b}",
            ns.0
        ));
        for d in [a, b] {
            sh(&format!(
                "ip netns exec {} sysctl -qw net.ipv6.conf.{d}.disable_ipv6=1",
                ns.0
            ));
            if offloads_off {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "ip netns exec {} ethtool -K {d} tx off rx off tso off gso off gro off >/dev/null 2>&1",
                        ns.0
                    ))
                    .status();
            }
            sh(&format!("ip -n {} link set {d} up", ns.0));
        }
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(child_var, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "child failed:\n{text}");
    Some(text)
}
