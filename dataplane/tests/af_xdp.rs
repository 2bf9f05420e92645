//! West and east over espada's own AF_XDP port (xsk-rs / libxdp) on a veth pair inside a
//! network namespace the test creates (needs root). Built with `--features af-xdp`.
#![cfg(feature = "af-xdp")]

use espada_dataplane::pair::{lab, Pair, PairSpec};
use espada_dataplane::port::af_xdp::AfXdpQueue;
use espada_dataplane::port::PortQueue;
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::process::Command;
use std::sync::atomic::Ordering;

fn child() {
    let a = AfXdpQueue::open("xsa", 0, 4096).expect("AF_XDP socket on xsa");
    let b = AfXdpQueue::open("xsb", 0, 4096).expect("AF_XDP socket on xsb");
    let (w, e) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let wq: Vec<Box<dyn PortQueue>> = vec![Box::new(a)];
    let eq: Vec<Box<dyn PortQueue>> = vec![Box::new(b)];
    let spec = PairSpec {
        workers: 1,
        size: 600,
        limit: Some(3000),
        rate: Some(20_000.0),
        ..Default::default()
    };
    let mut p = Pair::with_black(w, e, ws, es, spec, Some((wq, eq))).unwrap();
    let t = std::time::Instant::now();
    while p.received.packets.load(Ordering::Relaxed) < 3000 && t.elapsed().as_secs() < 20 {
        p.step();
    }
    p.drain();
    let got = p.received.packets.load(Ordering::Relaxed);
    println!(
        "af_xdp: sent {}, received {got}",
        p.sent.packets.load(Ordering::Relaxed)
    );
    assert_eq!(
        got, 3000,
        "every packet crossed the veth pair through AF_XDP"
    );
}

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn west_east_over_af_xdp_on_veth() {
    if std::env::var("ESPADA_XDP_CHILD").is_ok() {
        return child();
    }
    if std::env::var("ESPADA_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("ESPADA_SKIP_NETNS=1: the AF_XDP port test was NOT run");
        return;
    }
    let ns = Ns(format!("xdp{}", std::process::id() % 100_000));
    let sh = |c: &str| {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(c)
                .status()
                .unwrap()
                .success(),
            "{c}"
        )
    };
    sh(&format!("ip netns add {}", ns.0));
    sh(&format!(
        "ip -n {} link add xsa type veth peer name xsb",
        ns.0
    ));
    for d in ["xsa", "xsb"] {
        sh(&format!(
            "ip netns exec {} sysctl -qw net.ipv6.conf.{d}.disable_ipv6=1",
            ns.0
        ));
        sh(&format!("ip -n {} link set {d} up", ns.0));
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "west_east_over_af_xdp_on_veth",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ESPADA_XDP_CHILD", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("af_xdp: sent 3000, received 3000"), "{text}");
}
