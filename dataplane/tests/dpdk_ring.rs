//! West and east over DPDK: the black link is a pair of ring-backed ethdevs (net_ring PMD,
//! `--no-huge`), one queue per worker, so the real EAL, mempools, rx/tx bursts and the PMD's
//! counters carry the ESP traffic. Built with `--features dpdk`.
#![cfg(feature = "dpdk")]

use espada_dataplane::port::dpdk::{eal_init, DpdkPort, MbufPool, NO_HUGE_ARGS};
use espada_dataplane::port::PortQueue;
use espada_harness::pair::{lab, Pair, PairSpec};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::sync::Arc;

/// EAL without hugepages on lcore 0 (once per process; both tests share it).
fn eal() {
    let args: Vec<String> = NO_HUGE_ARGS
        .iter()
        .map(|s| s.to_string())
        .chain(["-l".to_string(), "0".to_string()])
        .collect();
    eal_init(&args).expect("EAL");
}

#[test]
fn west_east_over_dpdk_ring_ports() {
    eal();
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
    let sent = p.sent.packets();
    let got = p.received.packets();
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
    // In place end to end: nothing was copied into an mbuf at transmit on either side.
    for wk in p.west.workers.iter().chain(p.east.workers.iter()) {
        let (r, b) = wk.ports();
        assert_eq!(r.stats().tx_copied + b.stats().tx_copied, 0);
    }
}

/// Zero copy through a whole worker: a frame received on red (a ring port) is encrypted in
/// place and leaves on black in the very same mbuf: the buffer east-of-black receives is the
/// one sunset's frame arrived in. Nothing is copied at transmit either (`tx_copied` = 0).
#[test]
fn the_buffer_sent_is_the_buffer_received() {
    use espada_dataplane::pool::{Pool, PoolCache};
    use espada_dataplane::worker::Worker;
    use espada_dataplane::PacketBuf;
    use espada_harness::pair::{mac, shared};
    use espada_harness::traffic::{Generator, TrafficCounters, TrafficSpec};
    eal();
    let mp = Arc::new(MbufPool::new("zc_pool", 4095, 2048 + 128, 0).expect("mbuf pool"));
    let (red_gw, red_host) = DpdkPort::ring_pair("zcr", 1, mp.clone()).expect("ring pair");
    let (blk_gw, blk_peer) = DpdkPort::ring_pair("zcb", 1, mp.clone()).expect("ring pair");
    let (wdb, _) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let (mut host_q, mut peer_q) = (red_host.queue(0), blk_peer.queue(0));
    let gw_red = red_gw.queue(0);
    let red_mac = gw_red.mac();
    let sh = shared(
        ws,
        wdb,
        1,
        &[
            ("10.1.0.10".parse().unwrap(), mac::SUNSET),
            (es.black.ip, peer_q.mac()),
        ],
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let heap = Pool::new(64, 2048);
    let mut w = Worker::new(
        0,
        sh,
        Box::new(gw_red),
        Box::new(blk_gw.queue(0)),
        PoolCache::new(heap.clone()),
    )
    .unwrap();
    w.thread_start();
    // Sunset's frames, made in mbufs of the same mempool.
    let mut host_pool = PoolCache::new(heap.clone());
    host_pool.use_mbufs(mp.clone());
    let spec = TrafficSpec {
        src: "10.1.0.10".parse().unwrap(),
        dst: "10.2.0.10".parse().unwrap(),
        src_mac: mac::SUNSET,
        size: 300,
        flows: 4,
        limit: Some(16),
        rate: None,
        imix: false,
        tunnels: 0,
        tunnel_last: false,
    };
    let mut g = Generator::new(spec, red_mac, 0, Arc::new(TrafficCounters::default()));
    let mut frames = Vec::new();
    g.rx_burst(&mut host_pool, &mut frames, 16);
    assert_eq!(frames.len(), 16);
    assert!(frames.iter().all(|f| f.is_mbuf()));
    let sent: Vec<usize> = frames.iter().map(|f| f.storage_addr()).collect();
    host_q.tx_burst(&mut host_pool, &mut frames);
    for _ in 0..8 {
        w.poll();
    }
    let mut got = Vec::new();
    peer_q.rx_burst(&mut host_pool, &mut got, 64);
    assert_eq!(got.len(), 16, "every frame was encrypted and sent");
    let received: Vec<usize> = got.iter().map(|f| f.storage_addr()).collect();
    assert_eq!(received, sent, "black carries the very mbufs red received");
    // And they are ESP-in-UDP now: UDP to port 4500.
    assert!(got.iter().all(|f| f.data().len() > 42
        && f.data()[14 + 9] == 17
        && f.data()[36..38] == [0x11, 0x94]));
    let (r, b) = w.ports();
    assert_eq!((r.stats().tx_copied, b.stats().tx_copied), (0, 0));
    assert_eq!(w.stats().encap_packets, 16);
    for f in got {
        host_pool.put(f);
    }
}
