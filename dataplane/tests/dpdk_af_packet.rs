//! West and east over DPDK's `net_af_packet` PMD on a veth pair inside a network namespace the
//! test creates (needs root). The test re-runs itself inside the namespace, where the EAL
//! attaches to the two veth ends. Built with `--features dpdk`.
#![cfg(feature = "dpdk")]

use espada_dataplane::port::dpdk::{eal_init, DpdkPort, MbufPool, NO_HUGE_ARGS};
use espada_dataplane::port::PortQueue;
use espada_harness::pair::{lab, Pair, PairSpec};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::sync::Arc;

mod common;

fn child(pmd: &str) {
    let mut args: Vec<String> = NO_HUGE_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend([
        "-l".to_string(),
        "0".to_string(),
        format!("--vdev={pmd}0,iface=dpa"),
        format!("--vdev={pmd}1,iface=dpb"),
    ]);
    eal_init(&args).expect("EAL with two vdevs on the veth pair");
    let pool = Arc::new(MbufPool::new("afp_pool", 8191, 2048 + 128, 0).unwrap());
    let a = DpdkPort::open(&format!("{pmd}0"), 1, pool.clone()).unwrap();
    let b = DpdkPort::open(&format!("{pmd}1"), 1, pool).unwrap();
    let (w, e) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let wq: Vec<Box<dyn PortQueue>> = vec![Box::new(a.queue(0))];
    let eq: Vec<Box<dyn PortQueue>> = vec![Box::new(b.queue(0))];
    // A rate veth carries without loss.
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
    println!("dpdk {pmd}: sent 3000, received {got}");
    assert_eq!(p.sent.packets(), 3000);
    assert_eq!(got, 3000, "every packet crossed the veth pair through DPDK");
}

#[test]
fn west_east_over_dpdk_af_packet_on_veth() {
    over_veth("net_af_packet", "west_east_over_dpdk_af_packet_on_veth");
}

/// The same over DPDK's `net_af_xdp` PMD (AF_XDP sockets on the veth ends, copy mode).
#[test]
fn west_east_over_dpdk_af_xdp_on_veth() {
    over_veth("net_af_xdp", "west_east_over_dpdk_af_xdp_on_veth");
}

fn over_veth(pmd: &str, test: &str) {
    if std::env::var("ESPADA_DPDK_CHILD").is_ok() {
        return child(pmd);
    }
    let tag = format!("dp{}", &pmd[7..9]);
    let Some(text) = common::in_netns(&tag, test, &[("dpa", "dpb")], "ESPADA_DPDK_CHILD", true)
    else {
        return;
    };
    assert!(
        text.contains(&format!("dpdk {pmd}: sent 3000, received 3000")),
        "{text}"
    );
}
