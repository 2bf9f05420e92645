//! West and east over DPDK: the black link is a pair of ring-backed ethdevs (net_ring PMD,
//! `--no-huge`), one queue per worker, so the real EAL, mempools, rx/tx bursts and the PMD's
//! counters carry the ESP traffic. Built with `--features dpdk`.
#![cfg(feature = "dpdk")]

use espada_dataplane::pair::{lab, Pair, PairSpec};
use espada_dataplane::port::dpdk::{eal_init, DpdkPort, MbufPool, NO_HUGE_ARGS};
use espada_dataplane::port::PortQueue;
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[test]
fn west_east_over_dpdk_ring_ports() {
    let args: Vec<String> = NO_HUGE_ARGS
        .iter()
        .map(|s| s.to_string())
        .chain(["-l".to_string(), "0".to_string()])
        .collect();
    eal_init(&args).expect("EAL");
    let pool = Arc::new(MbufPool::new("test_pool", 8191, 2048 + 128, 0).expect("mbuf pool"));
    let (mut a, b) = DpdkPort::ring_pair("blk", 2, pool).expect("ring pair");
    // Virtual ports refuse flow rules: the refusal is a clear message, not a crash.
    let refused = a.steer_udp_source_port(4501, 4500, 0);
    eprintln!("rte_flow on a ring port: {refused:?}");
    let (w, e) = lab::dbs(2, 2, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let wq: Vec<Box<dyn PortQueue>> = (0..2)
        .map(|q| Box::new(a.queue(q)) as Box<dyn PortQueue>)
        .collect();
    let eq: Vec<Box<dyn PortQueue>> = (0..2)
        .map(|q| Box::new(b.queue(q)) as Box<dyn PortQueue>)
        .collect();
    let mut p = Pair::with_black(
        w,
        e,
        ws,
        es,
        PairSpec {
            workers: 2,
            size: 700,
            limit: Some(5000),
            ..Default::default()
        },
        Some((wq, eq)),
    )
    .unwrap();
    p.drain();
    let sent = p.sent.packets.load(Ordering::Relaxed);
    let got = p.received.packets.load(Ordering::Relaxed);
    assert_eq!(sent, 10_000);
    assert_eq!(got, sent, "every packet crossed the DPDK link");
    let pmd = a.pmd_stats();
    assert!(pmd[1] >= 10_000, "the PMD counted what west sent: {pmd:?}");
    assert_eq!(
        b.pmd_stats()[0],
        pmd[1],
        "east's PMD received what west's sent"
    );
    // Each east worker owned the SA its queue carried: no handoffs.
    for wk in &p.east.workers {
        assert_eq!(wk.stats().handoff_out, 0);
    }
    assert!(a.link().1, "ring ports report link up");
}
