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

/// A west lab gateway (one worker) whose red and black queues are `red` and `black`, fed by
/// sunset: `n` frames with `size`-byte inner packets at 50 000 per second sent out of
/// `sunset` (the far end of red's wire), and watched from `east` (the far end of black's).
/// Returns the ESP-in-UDP frames east saw (longer than the inner packet) and the worker, for
/// its counters. Gives up after 20 s.
pub fn drive_west_gateway(
    red: Box<dyn espada_dataplane::port::PortQueue>,
    black: Box<dyn espada_dataplane::port::PortQueue>,
    sunset: &mut dyn espada_dataplane::port::PortQueue,
    east: &mut dyn espada_dataplane::port::PortQueue,
    size: usize,
    n: u64,
) -> (u64, espada_dataplane::worker::Worker) {
    use espada_dataplane::pktbuf::PacketBuf;
    use espada_dataplane::pool::{Pool, PoolCache};
    use espada_dataplane::port::PortQueue;
    use espada_harness::pair::{lab, lab_worker_on, mac, LabGateway};
    use espada_harness::traffic::{Generator, TrafficCounters, TrafficSpec};
    let red_mac = red.mac();
    let (w, _) = lab::dbs(
        1,
        1,
        espada_sadb::db::SaMode::PerCpu,
        espada_sadb::lifetime::Lifetimes::default(),
    );
    let pool = Pool::new(512, 4096);
    let mut gw = lab_worker_on(LabGateway::West, w, lab::sides(), red, black, &pool).unwrap();
    // sunset and sunrise: host 10 of each red subnet (10.1.0.0/24, 10.2.0.0/24).
    let spec = TrafficSpec {
        src: "10.1.0.10".parse().unwrap(),
        dst: "10.2.0.10".parse().unwrap(),
        src_mac: mac::SUNSET,
        size,
        flows: 4,
        limit: Some(n),
        rate: Some(50_000.0),
        imix: false,
        tunnels: 0,
        tunnel_last: false,
    };
    let mut generator = Generator::new(
        spec,
        red_mac,
        0,
        std::sync::Arc::new(TrafficCounters::default()),
    );
    let mut pc = PoolCache::new(pool.clone());
    let (mut v, mut got) = (Vec::new(), Vec::new());
    let mut esp = 0u64;
    let t = std::time::Instant::now();
    while esp < n && t.elapsed().as_secs() < 20 {
        generator.rx_burst(&mut pc, &mut v, 32);
        sunset.tx_burst(&mut pc, &mut v);
        gw.poll();
        east.rx_burst(&mut pc, &mut got, 64);
        for f in got.drain(..) {
            let d = f.data();
            // Ethernet / IPv4 / UDP to 4500, longer than the inner packet.
            if d.len() > size + 42
                && d[12..14] == [8, 0]
                && d[23] == 17
                && d[36..38] == [0x11, 0x94]
            {
                esp += 1;
            }
            pc.put(f);
        }
    }
    (esp, gw)
}
