//! West and east over espada's own AF_XDP port (xsk-rs / libxdp) on a veth pair inside a
//! network namespace the test creates (needs root). Built with `--features af-xdp`.
#![cfg(feature = "af-xdp")]

use espada_dataplane::port::af_xdp::AfXdpQueue;
use espada_dataplane::port::PortQueue;
use espada_harness::pair::{lab, Pair, PairSpec};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;

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
    while p.received.packets() < 3000 && t.elapsed().as_secs() < 20 {
        p.step();
    }
    p.drain();
    let got = p.received.packets();
    for (side, half) in [("west", &p.west), ("east", &p.east)] {
        for w in &half.workers {
            let (r, b) = w.ports();
            println!(
                "{side}: drops {:?}\n  black {:?}\n  red {:?}",
                w.stats().drops,
                b.stats(),
                r.stats()
            );
        }
    }
    println!("af_xdp: sent {}, received {got}", p.sent.packets());
    assert_eq!(
        got, 3000,
        "every packet crossed the veth pair through AF_XDP"
    );
}

mod common;

/// `common::in_netns` with this file's child variable.
fn in_netns(tag: &str, name: &str, links: &[(&str, &str)]) -> Option<String> {
    common::in_netns(tag, name, links, "ESPADA_XDP_CHILD", false)
}

#[test]
fn west_east_over_af_xdp_on_veth() {
    if std::env::var("ESPADA_XDP_CHILD").is_ok() {
        return child();
    }
    if let Some(text) = in_netns("xdp", "west_east_over_af_xdp_on_veth", &[("xsa", "xsb")]) {
        assert!(text.contains("af_xdp: sent 3000, received 3000"), "{text}");
    }
}

/// Issue 11: a lab gateway whose red and black queues are AF_XDP sockets on one UMEM forwards
/// every packet from the frame it arrived in: the black port copied nothing
/// (`tx_copied` = 0), and each transmitted ESP frame left from a frame the red side received.
fn zero_copy_child() {
    const N: u64 = 2000;
    let (red, black) = AfXdpQueue::open_pair("zra", "zba", 0, 4096).expect("AF_XDP pair");
    let mut sunset = AfXdpQueue::open("zrb", 0, 4096).expect("sunset's socket");
    let mut east = AfXdpQueue::open("zbb", 0, 4096).expect("east's socket");
    let (esp, gw) = common::drive_west_gateway(
        Box::new(red),
        Box::new(black),
        &mut sunset,
        &mut east,
        700,
        N,
    );
    let (r, b) = gw.ports();
    let (r, b) = (r.stats(), b.stats());
    println!(
        "zero copy: {esp} ESP frames on east's side; red {r:?}; black {b:?}; drops {:?}",
        gw.stats().drops
    );
    assert_eq!(esp, N, "every packet was encapsulated and sent");
    assert_eq!(r.rx_packets, N);
    assert_eq!(b.tx_packets, N);
    assert_eq!(
        b.tx_copied, 0,
        "the black socket sent every ESP frame from the UMEM frame red received it in"
    );
    println!("af_xdp zero copy: {N} packets forwarded in place, tx_copied 0");
}

#[test]
fn af_xdp_forwards_in_place() {
    if std::env::var("ESPADA_XDP_CHILD").is_ok() {
        return zero_copy_child();
    }
    if let Some(text) = in_netns(
        "xzc",
        "af_xdp_forwards_in_place",
        &[("zra", "zrb"), ("zba", "zbb")],
    ) {
        assert!(text.contains("forwarded in place, tx_copied 0"), "{text}");
    }
}
