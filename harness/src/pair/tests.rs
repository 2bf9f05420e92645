//! The in-memory west↔east pair: end-to-end through both gateways, per-CPU steering, handoff,
//! shared mode, rekey under traffic with every packet counted, and garbage on the black link.

use super::lab;
use super::*;
use espada_dataplane::drop::DropReason;
use espada_dataplane::pktbuf::PacketBuf;
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::sync::atomic::Ordering;

fn pair(workers: usize, pcpu: usize, mode: SaMode, steering: Steering, limit: u64) -> Pair {
    let (wdb, edb) = lab::dbs(workers, pcpu, mode, Lifetimes::default());
    let (ws, es) = lab::sides();
    Pair::new(
        wdb,
        edb,
        ws,
        es,
        PairSpec {
            workers,
            size: 512,
            flows: 8,
            limit: Some(limit),
            steering,
            ring_depth: 4096,
            ..Default::default()
        },
    )
    .unwrap()
}

fn total(h: &GatewayHalf) -> espada_dataplane::worker::WorkerStats {
    let mut t = espada_dataplane::worker::WorkerStats::default();
    for w in &h.workers {
        let s = w.stats();
        t.encap_packets += s.encap_packets;
        t.decap_packets += s.decap_packets;
        t.handoff_out += s.handoff_out;
        t.handoff_in += s.handoff_in;
        t.drops.merge(&s.drops);
    }
    t
}

/// A UDP datagram from sunset (10.1.0.10:1234) to sunrise (10.2.0.10:5678) in an Ethernet
/// frame to west's red MAC, as sunset would send it.
fn sunset_frame(payload: &[u8], dont_frag: bool) -> Vec<u8> {
    let ip = espada_wire::udp::build_packet(
        espada_wire::udp::IpHeader::V4(espada_wire::ipv4::Repr {
            src: "10.1.0.10".parse().unwrap(),
            dst: "10.2.0.10".parse().unwrap(),
            protocol: 17,
            payload_len: 0,
            ttl: 64,
            tos: 0,
            ident: 7,
            dont_frag,
        }),
        1234,
        5678,
        payload,
    );
    let mut f = mac::WEST_RED.0.to_vec();
    f.extend_from_slice(&mac::SUNSET.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f
}

/// West and east as single hand-fed workers: sunset's link (west red), the black link and
/// sunrise's link (east red) as memory links, and a cache of their shared pool.
struct HandFed {
    red_w: espada_dataplane::port::memory::MemoryLink,
    black: espada_dataplane::port::memory::MemoryLink,
    red_e: espada_dataplane::port::memory::MemoryLink,
    west: espada_dataplane::worker::Worker,
    east: espada_dataplane::worker::Worker,
    pc: PoolCache,
}

fn hand_fed((ws, es): (GatewaySides, GatewaySides)) -> HandFed {
    use espada_dataplane::port::memory::MemoryLink;
    let (wdb, edb) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let pool = Pool::new(256, 2048);
    let (red_w, black, red_e) = (
        MemoryLink::new(1, 64),
        MemoryLink::new(1, 64),
        MemoryLink::new(1, 64),
    );
    let west = lab_worker(LabGateway::West, wdb, (ws, es), &red_w, &black, &pool).unwrap();
    let east = lab_worker(LabGateway::East, edb, (ws, es), &red_e, &black, &pool).unwrap();
    HandFed {
        red_w,
        black,
        red_e,
        west,
        east,
        pc: PoolCache::new(pool),
    }
}

/// Puts frame `f` (with the NIC checksum flags `hw`) on queue `q` and polls `w` twice.
fn feed(
    pc: &mut PoolCache,
    q: &mut dyn PortQueue,
    w: &mut espada_dataplane::worker::Worker,
    f: &[u8],
    hw: u8,
) {
    let mut b = pc.get().unwrap();
    b.append(f.len()).unwrap().copy_from_slice(f);
    b.hw_csum = hw;
    q.tx_burst(pc, &mut vec![b]);
    for _ in 0..2 {
        w.poll();
    }
}

#[test]
fn every_packet_arrives_with_per_cpu_steering() {
    let mut p = pair(
        2,
        2,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        1000,
    );
    p.drain();
    assert_eq!(p.sent.packets(), 2000);
    assert_eq!(p.received.packets(), 2000);
    assert_eq!(p.received.bad(), 0);
    let (w, e) = (total(&p.west), total(&p.east));
    assert_eq!(w.encap_packets, 2000);
    assert_eq!(e.decap_packets, 2000);
    assert_eq!(
        w.drops.total() + e.drops.total(),
        0,
        "{:?} {:?}",
        w.drops,
        e.drops
    );
    assert_eq!(
        e.handoff_out, 0,
        "flow rules put each per-CPU SA on its own core"
    );
    // Each west core used its own SA and its own UDP source port.
    for (i, wk) in p.west.workers.iter().enumerate() {
        let o: Vec<_> = wk.sas().outbound_sas().collect();
        assert_eq!(o[0].spi, 0x1001 + i as u32);
        assert_eq!(o[0].tunnel.src_port, 4501 + i as u16);
        assert_eq!(o[0].counters.packets, 1000);
    }
    assert_eq!(p.link.in_flight(), 0);
}

#[test]
fn rss_steering_hands_packets_to_the_owning_core() {
    let mut p = pair(2, 2, SaMode::PerCpu, Steering::Rss, 500);
    p.drain();
    let e = total(&p.east);
    assert_eq!(p.received.packets(), 1000);
    assert!(
        e.handoff_out > 0,
        "with plain RSS some SAs land on the other core"
    );
    assert_eq!(e.handoff_out, e.handoff_in);
    // Each inbound per-CPU SA was processed by exactly one core (single writer).
    for (i, wk) in p.east.workers.iter().enumerate() {
        for sa in wk.sas().inbound_sas().filter(|s| s.spi != 0x1000) {
            assert_eq!(sa.spi, 0x1001 + i as u32);
        }
    }
}

#[test]
fn more_cores_than_sas_use_the_fallback_sa() {
    let mut p = pair(
        3,
        2,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        300,
    );
    p.drain();
    assert_eq!(p.received.packets(), 900);
    let fb: Vec<_> = p.west.workers[2]
        .sas()
        .outbound_sas()
        .map(|s| s.spi)
        .collect();
    assert_eq!(fb, vec![0x1000]);
}

#[test]
fn shared_mode_one_sa_for_all_cores() {
    let mut p = pair(2, 0, SaMode::Shared, Steering::Rss, 400);
    p.drain();
    assert_eq!(p.received.packets(), 800);
    for wk in &p.west.workers {
        assert!(wk
            .sas()
            .outbound_sas()
            .all(|s| s.spi == 0x1000 && s.is_shared()));
    }
    assert_eq!(total(&p.east).drops.total(), 0);
}

#[test]
fn threads_pass_everything() {
    let mut p = pair(
        2,
        2,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        20_000,
    );
    p.run(Duration::from_secs(20), &[]);
    assert_eq!(p.sent.packets(), 40_000);
    assert_eq!(p.received.packets(), 40_000);
    assert_eq!(
        total(&p.west).drops.total() + total(&p.east).drops.total(),
        0
    );
}

/// Make-before-break rekey of every per-CPU SA while traffic flows, in the order RFC 4301 §4.4
/// implementations use: new inbound SA on the receiver first, then the sender switches, then
/// the old inbound SA goes once drained. Every packet sent arrives.
#[test]
fn rekey_under_traffic_loses_nothing() {
    let mut p = pair(
        2,
        2,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        6000,
    );
    for _ in 0..50 {
        p.step();
    }
    // 1. East installs the new inbound SAs (0x1101, 0x1102), keeping the old ones draining.
    p.east
        .shared
        .sadb
        .update(|db| {
            let t = db.tunnel_mut(0);
            for i in 0..2 {
                let old = t.inbound.per_cpu[i].clone();
                t.inbound.per_cpu[i] = lab::spec(
                    0x1101 + i as u32,
                    Some(i),
                    "192.168.100.1",
                    "192.168.100.2",
                    4501 + i as u16,
                    Lifetimes::default(),
                );
                t.draining.push(old);
            }
        })
        .unwrap();
    for _ in 0..50 {
        p.step();
    }
    // 2. West switches its outbound per-CPU SAs to the new ones.
    p.west
        .shared
        .sadb
        .update(|db| {
            for i in 0..2 {
                db.tunnel_mut(0).outbound.per_cpu[i] = lab::spec(
                    0x1101 + i as u32,
                    Some(i),
                    "192.168.100.1",
                    "192.168.100.2",
                    4501 + i as u16,
                    Lifetimes::default(),
                );
            }
        })
        .unwrap();
    for _ in 0..50 {
        p.step();
    }
    // 3. Once drained, east removes the old inbound SAs.
    p.east
        .shared
        .sadb
        .update(|db| db.tunnel_mut(0).draining.clear())
        .unwrap();
    p.drain();
    assert_eq!(p.sent.packets(), 12_000);
    assert_eq!(
        p.received.packets(),
        12_000,
        "west {:?} east {:?}",
        total(&p.west).drops,
        total(&p.east).drops
    );
    assert_eq!(total(&p.east).drops.total(), 0);
    // Both generations carried traffic.
    let spis: Vec<u32> = p
        .west
        .workers
        .iter()
        .flat_map(|w| w.sas().outbound_sas().map(|s| s.spi).collect::<Vec<_>>())
        .collect();
    assert_eq!(spis, vec![0x1101, 0x1102]);
    let new_in: u64 = p
        .east
        .workers
        .iter()
        .flat_map(|w| {
            w.sas()
                .inbound_sas()
                .filter(|s| s.spi >= 0x1101)
                .map(|s| s.counters.packets)
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(new_in > 0 && new_in < 12_000, "{new_in}");
}

#[test]
fn garbage_replays_and_forgeries_on_the_black_link_are_counted() {
    let mut p = pair(
        1,
        1,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        50,
    );
    // Capture what west sends on the black link by stepping west alone.
    for w in p.west.workers.iter_mut() {
        w.poll();
    }
    let mut pc = PoolCache::new(p.pool.clone());
    let mut q = p.link.end_b(0, mac::EAST_BLACK, Steering::Rss);
    let mut frames = Vec::new();
    q.rx_burst(&mut pc, &mut frames, 64);
    assert!(!frames.is_empty());
    let genuine: Vec<Vec<u8>> = frames.iter().map(|f| f.data().to_vec()).collect();
    let mut inject = |p: &mut Pair, bytes: &[u8]| {
        let mut a = p.link.end_a(0, mac::WEST_BLACK, Steering::Rss);
        let mut b = pc.get().unwrap();
        b.append(bytes.len()).unwrap().copy_from_slice(bytes);
        let mut v = vec![b];
        a.tx_burst(&mut pc, &mut v);
    };
    for g in &genuine {
        inject(&mut p, g);
    }
    p.drain();
    let delivered = p.received.packets();
    // Replays of everything.
    for g in &genuine {
        inject(&mut p, g);
    }
    // A forgery: genuine header, flipped ciphertext byte.
    let mut forged = genuine[0].clone();
    let n = forged.len();
    forged[n - 20] ^= 0x40;
    inject(&mut p, &forged);
    // Garbage: random bytes, a runt, a non-ESP UDP datagram.
    inject(&mut p, &[0xab; 60]);
    inject(&mut p, &[1, 2, 3]);
    let mut wrong_port = genuine[0].clone();
    wrong_port[14 + 22] = 0x12; // UDP destination port high byte
    inject(&mut p, &wrong_port);
    p.drain();
    let e = total(&p.east);
    assert_eq!(
        p.received.packets(),
        delivered,
        "nothing injected reaches sunrise"
    );
    // Every replay, and the forgery too: it reuses a number already seen, so it is refused
    // before decryption (RFC 4303 §3.4.3).
    assert_eq!(e.drops.get(DropReason::Replay), genuine.len() as u64 + 1);
    assert_eq!(e.drops.get(DropReason::Integrity), 0);
    assert_eq!(
        e.drops.get(DropReason::Malformed) + e.drops.get(DropReason::NotForUs),
        3
    );
    // A forgery with a fresh sequence number fails authentication.
    let mut fresh = genuine[0].clone();
    let seq_at = 14 + 20 + 8 + 4;
    fresh[seq_at..seq_at + 4].copy_from_slice(&100_000u32.to_be_bytes());
    inject(&mut p, &fresh);
    p.drain();
    assert_eq!(total(&p.east).drops.get(DropReason::Integrity), 1);
    // And the gateways keep forwarding.
    let before = p.received.packets();
    p.drain();
    assert!(p.received.packets() >= before);
}

#[test]
fn plain_forwarding_loop_mode() {
    let (w, e) = lab::dbs_opts(
        1,
        1,
        SaMode::PerCpu,
        Lifetimes::default(),
        lab::LabOpts {
            bypass: true,
            ..Default::default()
        },
    );
    let (ws, es) = lab::sides();
    let mut p = Pair::new(
        w,
        e,
        ws,
        es,
        PairSpec {
            workers: 1,
            size: 300,
            limit: Some(500),
            ..Default::default()
        },
    )
    .unwrap();
    p.drain();
    assert_eq!(p.received.packets(), 500);
    let (wt, et) = (total(&p.west), total(&p.east));
    assert_eq!(
        wt.encap_packets + et.decap_packets,
        0,
        "no ESP in loop mode"
    );
    assert_eq!(p.west.workers[0].stats().bypass_packets, 500);
    assert_eq!(p.east.workers[0].stats().bypass_packets, 500);
}

#[test]
fn too_big_with_df_gets_icmp_fragmentation_needed() {
    let (w, e) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (mut ws, es) = lab::sides();
    ws.black.mtu = 1000;
    let mut p = Pair::new(
        w,
        e,
        ws,
        es,
        PairSpec {
            workers: 1,
            size: 1200,
            limit: Some(300),
            ..Default::default()
        },
    )
    .unwrap();
    p.drain();
    let s = p.west.workers[0].stats();
    assert_eq!(s.drops.get(DropReason::MtuExceeded), 300);
    assert_eq!(p.received.packets(), 0, "nothing too big is sent");
    // Rate-limited to 100 per second: the generator (sunset) got ICMP errors back.
    assert!(s.icmp_sent > 0 && s.icmp_sent <= 100, "{}", s.icmp_sent);
    let (red, _) = p.west.workers[0].ports();
    assert_eq!(
        red.stats().tx_packets,
        s.icmp_sent,
        "the ICMP errors went out of the red port"
    );
}

#[test]
fn ike_marker_flood_does_not_drain_the_pool() {
    // Issue 12 item 2: UDP/4500 with the non-ESP marker goes to the control path; a control
    // path that drops its buffers (as `espada run` does with no IKE daemon attached) used to
    // leak one pool buffer per message, and the gateway stopped forwarding for good.
    let mut p = pair(
        1,
        1,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        200,
    );
    for w in p.west.workers.iter_mut() {
        w.poll();
    }
    let mut pc = PoolCache::new(p.pool.clone());
    let mut q = p.link.end_b(0, mac::EAST_BLACK, Steering::Rss);
    let mut frames = Vec::new();
    q.rx_burst(&mut pc, &mut frames, 1);
    let mut ike = frames[0].data().to_vec();
    frames.clear();
    // Non-ESP marker (RFC 3948 §2.2): four zero bytes where the SPI would be; UDP checksum 0.
    let udp_at = 14 + 20;
    ike[udp_at + 6..udp_at + 8].copy_from_slice(&[0, 0]);
    ike[udp_at + 8..udp_at + 12].copy_from_slice(&[0, 0, 0, 0]);
    let total_bufs = p.pool.total();
    let flood = 5 * total_bufs;
    for i in 0..flood {
        let mut a = p.link.end_a(0, mac::WEST_BLACK, Steering::Rss);
        let mut b = pc.get().expect("the pool must never run dry");
        b.append(ike.len()).unwrap().copy_from_slice(&ike);
        let mut v = vec![b];
        a.tx_burst(&mut pc, &mut v);
        if i % 16 == 0 {
            for w in p.east.workers.iter_mut() {
                w.poll();
            }
            // The control plane takes the messages and lets them go.
            while let Some(m) = p.east.shared.control.pop() {
                drop(m);
            }
        }
    }
    drop(pc);
    p.drain();
    while let Some(m) = p.east.shared.control.pop() {
        drop(m);
    }
    let e = total(&p.east);
    let to_control: u64 = p.east.workers.iter().map(|w| w.stats().to_control).sum();
    assert_eq!(
        to_control + e.drops.get(DropReason::ControlFull),
        flood as u64,
        "every IKE message is either passed on or counted"
    );
    // The gateway still forwards: every packet of the stream arrives (but the one taken off
    // the link above as the template).
    assert_eq!(p.received.packets(), 199);
    assert!(p.pool.reclaimed() > 0, "the dropped messages came home");
}

/// West's first ESP frames on the black link (west stepped alone), and a way to put frames
/// on the link towards east.
fn genuine_frames(p: &mut Pair, pc: &mut PoolCache) -> Vec<Vec<u8>> {
    for w in p.west.workers.iter_mut() {
        w.poll();
    }
    let mut q = p.link.end_b(0, mac::EAST_BLACK, Steering::Rss);
    let mut frames = Vec::new();
    q.rx_burst(pc, &mut frames, 64);
    let out = frames.iter().map(|f| f.data().to_vec()).collect();
    for f in frames {
        pc.put(f);
    }
    out
}

fn inject_to_east(p: &mut Pair, pc: &mut PoolCache, bytes: &[u8]) {
    let mut a = p.link.end_a(0, mac::WEST_BLACK, Steering::Rss);
    let mut b = pc.get().unwrap();
    b.append(bytes.len()).unwrap().copy_from_slice(bytes);
    let mut v = vec![b];
    a.tx_burst(pc, &mut v);
}

fn refill_outer_checksum(f: &mut [u8]) {
    espada_wire::ipv4::Packet::new_unchecked(&mut f[14..34]).fill_checksum();
}

#[test]
fn layer_2_admission_drops_frames_not_for_us() {
    // Issue 12 item 7: another host's MAC, and unicast IP in a broadcast frame.
    let mut p = pair(
        1,
        1,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        20,
    );
    let mut pc = PoolCache::new(p.pool.clone());
    let g = genuine_frames(&mut p, &mut pc);
    let mut other = g[0].clone();
    other[..6].copy_from_slice(&[2, 0, 0, 0, 9, 9]);
    let mut bcast = g[1].clone();
    bcast[..6].copy_from_slice(&[0xff; 6]);
    inject_to_east(&mut p, &mut pc, &other);
    inject_to_east(&mut p, &mut pc, &bcast);
    for f in &g[2..] {
        inject_to_east(&mut p, &mut pc, f);
    }
    drop(pc);
    p.drain();
    let e = total(&p.east);
    assert_eq!(e.drops.get(DropReason::NotForUs), 2, "{:?}", e.drops);
    assert_eq!(
        e.decap_packets,
        g.len() as u64 - 2,
        "the genuine frames, not the two others"
    );
}

#[test]
fn decap_checks_the_whole_policy_not_just_the_subnets() {
    // Issue 12 item 6 (RFC 4301 §5.2): east protects TCP only; UDP that arrives in the tunnel
    // matches the subnets but not the policy, and is not delivered.
    let (wdb, mut edb) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    edb.spd.policies[0].selector.proto = Some(6);
    let (ws, es) = lab::sides();
    let mut p = Pair::new(
        wdb,
        edb,
        ws,
        es,
        PairSpec {
            workers: 1,
            size: 200,
            limit: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    p.drain();
    let e = total(&p.east);
    assert_eq!(p.received.packets(), 0);
    assert_eq!(e.drops.get(DropReason::PolicyMismatch), 50, "{:?}", e.drops);
}

#[test]
fn outer_fragments_and_congestion_marks_on_decap() {
    // Issue 12 item 9: an outer fragment is counted as `fragment`; CE outside with a
    // not-ECN-capable packet inside is dropped (RFC 6040 §4.2).
    let mut p = pair(
        1,
        1,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        20,
    );
    let mut pc = PoolCache::new(p.pool.clone());
    let g = genuine_frames(&mut p, &mut pc);
    let mut frag = g[0].clone();
    frag[14 + 6] |= 0x20; // MF
    refill_outer_checksum(&mut frag);
    let mut ce = g[1].clone();
    ce[14 + 1] |= 3; // outer ECN = CE; the generator's packets are Not-ECT
    refill_outer_checksum(&mut ce);
    inject_to_east(&mut p, &mut pc, &frag);
    inject_to_east(&mut p, &mut pc, &ce);
    for f in &g[2..] {
        inject_to_east(&mut p, &mut pc, f);
    }
    drop(pc);
    p.drain();
    let e = total(&p.east);
    assert_eq!(e.drops.get(DropReason::Fragment), 1, "{:?}", e.drops);
    assert_eq!(e.drops.get(DropReason::EcnNotEct), 1, "{:?}", e.drops);
    assert_eq!(p.received.packets(), g.len() as u64 - 2);
}

#[test]
fn gratuitous_and_unsolicited_arp_move_nothing() {
    // Issue 12 item 8: a gratuitous ARP for the peer gateway's address, and an unsolicited
    // reply for a new address, arrive on west's black link. Neither changes west's table.
    use espada_wire::{arp, ethernet::MacAddr};
    let mut p = pair(
        1,
        1,
        SaMode::PerCpu,
        Steering::UdpSrcPort { base: 4501 },
        50,
    );
    let mut pc = PoolCache::new(p.pool.clone());
    let attacker = MacAddr([2, 0xba, 0xd0, 0, 0, 1]);
    let peer: std::net::Ipv4Addr = "192.168.100.2".parse().unwrap();
    let stranger: std::net::Ipv4Addr = "192.168.100.77".parse().unwrap();
    for (ip, target) in [(peer, peer), (stranger, "192.168.100.1".parse().unwrap())] {
        let mut f = vec![0u8; 42];
        espada_dataplane::neighbor::emit_arp(
            &mut f,
            attacker,
            MacAddr::BROADCAST,
            &arp::Repr {
                operation: arp::Operation::Reply,
                sender_hw: attacker,
                sender_ip: ip,
                target_hw: MacAddr::BROADCAST,
                target_ip: target,
            },
        );
        let mut q = p.link.end_b(0, mac::EAST_BLACK, Steering::Rss);
        let mut b = pc.get().unwrap();
        b.append(f.len()).unwrap().copy_from_slice(&f);
        let mut v = vec![b];
        q.tx_burst(&mut pc, &mut v);
    }
    drop(pc);
    p.drain();
    let n = &p.west.shared.neighbors;
    assert_eq!(
        n.get(peer),
        Some(mac::EAST_BLACK),
        "the configured peer stays"
    );
    assert_eq!(n.get(stranger), None, "nobody asked for it");
    assert_eq!(p.received.packets(), 50);
    assert_eq!(
        n.counters.unsolicited.load(Ordering::Relaxed),
        2,
        "both counted"
    );
}

#[test]
fn decapsulated_packets_respect_the_red_mtu() {
    // Issue 12 item 1: east's red link takes 300 bytes; the 512-byte packets are counted, not
    // sent over it, and not counted as delivered.
    let (wdb, edb) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (ws, mut es) = lab::sides();
    es.red.mtu = 300;
    let mut p = Pair::new(
        wdb,
        edb,
        ws,
        es,
        PairSpec {
            workers: 1,
            size: 512,
            limit: Some(30),
            ..Default::default()
        },
    )
    .unwrap();
    p.drain();
    let e = total(&p.east);
    assert_eq!(e.drops.get(DropReason::MtuExceeded), 30, "{:?}", e.drops);
    assert_eq!(e.decap_packets, 0);
    assert_eq!(p.received.packets(), 0);
}

#[test]
fn a_packet_with_df_clear_is_fragmented_before_encapsulation() {
    // Issue 12 item 9 (RFC 4301 §8.1): west's black MTU is 600; a 1000-byte inner packet with
    // DF clear leaves as two ESP packets that each fit, and east delivers two IPv4 fragments
    // that together are the original payload.
    let (mut ws, es) = lab::sides();
    ws.black.mtu = 600;
    let HandFed {
        red_w,
        black: _black,
        red_e,
        mut west,
        mut east,
        mut pc,
    } = hand_fed((ws, es));
    let payload: Vec<u8> = (0..972u32).map(|i| (i * 7) as u8).collect();
    let f = sunset_frame(&payload, false);
    let mut b = pc.get().unwrap();
    b.append(f.len()).unwrap().copy_from_slice(&f);
    let mut into = red_w.end_a(0, mac::SUNSET, Steering::Rss);
    into.tx_burst(&mut pc, &mut vec![b]);
    for _ in 0..4 {
        west.poll();
    }
    assert_eq!(west.stats().encap_packets, 2, "{:?}", west.stats().drops);
    for _ in 0..4 {
        east.poll();
    }
    let mut out = Vec::new();
    red_e
        .end_a(0, mac::SUNRISE, Steering::Rss)
        .rx_burst(&mut pc, &mut out, 8);
    assert_eq!(out.len(), 2, "{:?}", east.stats().drops);
    let mut got = vec![0u8; 8 + payload.len()];
    let mut mf = Vec::new();
    for o in &out {
        let ip = espada_wire::ipv4::Packet::new_checked(&o.data()[14..]).unwrap();
        assert!(ip.verify_checksum());
        let off = ip.frag_offset() as usize;
        let body = ip.payload();
        got[off..off + body.len()].copy_from_slice(body);
        mf.push((off, ip.more_frags()));
    }
    mf.sort();
    assert_eq!(mf[0], (0, true));
    assert!(!mf[1].1 && mf[1].0 > 0);
    assert_eq!(
        &got[8..],
        &payload[..],
        "the fragments carry the whole datagram"
    );
    for o in out {
        pc.put(o);
    }
}

#[test]
fn no_icmp_error_about_an_icmp_error() {
    // Issue 12 item 9 (RFC 1812 §4.3.2.7): a too-big packet with DF set earns sunset an ICMP
    // "fragmentation needed", unless it is itself an ICMP error.
    use espada_dataplane::port::memory::MemoryLink;
    let (wdb, _) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (mut ws, es) = lab::sides();
    ws.black.mtu = 600;
    let pool = Pool::new(128, 2048);
    let (red, black) = (MemoryLink::new(1, 64), MemoryLink::new(1, 64));
    let sunset: std::net::Ipv4Addr = "10.1.0.10".parse().unwrap();
    let sunrise: std::net::Ipv4Addr = "10.2.0.10".parse().unwrap();
    let mut west = lab_worker(LabGateway::West, wdb, (ws, es), &red, &black, &pool).unwrap();
    let mut pc = PoolCache::new(pool.clone());
    let mut sunset_q = red.end_a(0, mac::SUNSET, Steering::Rss);
    let mut send = |proto: u8, first: u8| {
        let mut ip = vec![0u8; 1000];
        espada_wire::ipv4::Repr {
            src: sunset,
            dst: sunrise,
            protocol: proto,
            payload_len: 980,
            ttl: 64,
            tos: 0,
            ident: 1,
            dont_frag: true,
        }
        .emit(&mut espada_wire::ipv4::Packet::new_unchecked(&mut ip[..]));
        ip[20] = first; // ICMP type, or the first byte of a UDP source port
        let mut f = mac::WEST_RED.0.to_vec();
        f.extend_from_slice(&mac::SUNSET.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ip);
        let mut b = pc.get().unwrap();
        b.append(f.len()).unwrap().copy_from_slice(&f);
        sunset_q.tx_burst(&mut pc, &mut vec![b]);
    };
    send(1, 3); // an ICMP destination-unreachable, too big, DF set
    for _ in 0..4 {
        west.poll();
    }
    assert_eq!(west.stats().drops.get(DropReason::MtuExceeded), 1);
    assert_eq!(
        west.stats().icmp_sent,
        0,
        "no ICMP error about an ICMP error"
    );
    send(17, 0x27); // a UDP datagram, too big, DF set
    for _ in 0..4 {
        west.poll();
    }
    assert_eq!(west.stats().drops.get(DropReason::MtuExceeded), 2);
    assert_eq!(west.stats().icmp_sent, 1, "but one about the UDP datagram");
}

#[test]
fn a_changed_neighbor_table_moves_the_tunnel_next_hop() {
    // The worker resolves the tunnel's next hop once per peer, not per packet (a memo). When
    // the neighbor table changes, the memo goes: a learned entry that expires makes the next
    // packet wait for ARP again (counted), and a re-learned MAC is the one ESP leaves for.
    use espada_dataplane::port::memory::MemoryLink;
    use espada_wire::ethernet::MacAddr;
    use std::time::{Duration, Instant};
    let (wdb, _) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let (ws, es) = lab::sides();
    let pool = Pool::new(128, 2048);
    let (red, black) = (MemoryLink::new(1, 64), MemoryLink::new(1, 64));
    let sunset: std::net::Ipv4Addr = "10.1.0.10".parse().unwrap();
    // Only sunset is configured: the peer gateway is learned.
    let sh = shared(
        ws,
        wdb,
        1,
        &[(sunset, mac::SUNSET)],
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let table = sh.neighbors.clone();
    let mut west = espada_dataplane::worker::Worker::new(
        0,
        sh,
        Box::new(red.end_b(0, mac::WEST_RED, Steering::Rss)),
        Box::new(black.end_a(0, mac::WEST_BLACK, Steering::Rss)),
        PoolCache::new(pool.clone()),
    )
    .unwrap();
    let mut pc = PoolCache::new(pool.clone());
    let mut sunset_q = red.end_a(0, mac::SUNSET, Steering::Rss);
    let mut peer_q = black.end_b(0, mac::EAST_BLACK, Steering::Rss);
    let frame = sunset_frame(&[7u8; 100], true);
    // Sends `n` packets from sunset, polls west, and returns the destination MACs of the ESP
    // frames on black (ARP requests left out) and west's NoNeighbor drops so far.
    let mut round = |n: usize| -> (Vec<MacAddr>, u64, u64) {
        for _ in 0..n {
            let mut b = pc.get().unwrap();
            b.append(frame.len()).unwrap().copy_from_slice(&frame);
            sunset_q.tx_burst(&mut pc, &mut vec![b]);
        }
        for _ in 0..4 {
            west.poll();
        }
        let mut out = Vec::new();
        peer_q.rx_burst(&mut pc, &mut out, 64);
        let macs = out
            .iter()
            .filter(|b| b.data()[12..14] == [0x08, 0x00])
            .map(|b| MacAddr(b.data()[..6].try_into().unwrap()))
            .collect();
        for b in out {
            pc.put(b);
        }
        let d = &west.stats().drops;
        (
            macs,
            d.get(DropReason::NoNeighbor),
            d.get(DropReason::NeighborHoldFull),
        )
    };
    let peer = es.black.ip;
    // No neighbor yet: nothing leaves, and nothing is lost either (issue 25 item 6: the
    // first packets wait for the answer, as with the kernel's unres_qlen).
    assert_eq!(round(3), (vec![], 0, 0), "held, not dropped");
    // The peer answers west's ARP request with `mac` (as the control path learns it).
    let learn = |mac: MacAddr| {
        let t = Instant::now();
        table.asked(peer, t);
        assert_eq!(
            table.learn_reply(peer, mac, t),
            espada_dataplane::neighbor::Learn::Learned
        );
        t
    };
    let first = MacAddr([2, 0, 0, 0, 0xee, 1]);
    let t0 = learn(first);
    assert_eq!(
        round(5),
        (vec![first; 8], 0, 0),
        "the 3 held, then 5, to the learned MAC"
    );
    // The entry ages out: the memo must not keep sending to it.
    assert_eq!(table.expire(t0 + Duration::from_secs(24 * 3600)), 1);
    assert_eq!(
        round(4),
        (vec![], 0, 1),
        "the next hop is unknown again: 3 held per neighbor, the 4th counted"
    );
    let second = MacAddr([2, 0, 0, 0, 0xee, 2]);
    learn(second);
    assert_eq!(
        round(5),
        (vec![second; 8], 0, 1),
        "to the MAC learned since"
    );
}

#[test]
fn checksums_the_nic_verified_are_not_computed_again() {
    // A DPDK port with checksum offload marks frames whose IPv4 (and UDP) checksums the NIC
    // found good; the fast path trusts those flags and skips its own checks. Shown with frames
    // whose checksum is wrong: without the flag they are dropped and counted as malformed, with
    // it they pass (a NIC would never mark them good; the point is that no check runs).
    use espada_dataplane::pktbuf::{HW_IP_CSUM_GOOD, HW_L4_CSUM_GOOD};
    let HandFed {
        red_w,
        black,
        mut west,
        mut east,
        mut pc,
        ..
    } = hand_fed(lab::sides());
    let frame = sunset_frame(&[9u8; 200], true);
    let bad_ip = {
        let mut f = frame.clone();
        f[14 + 10] ^= 0x5a; // the inner IPv4 header checksum
        f
    };
    let mut sunset = red_w.end_a(0, mac::SUNSET, Steering::Rss);
    let mut send = |pc: &mut PoolCache, f: &[u8], hw: u8| {
        feed(pc, &mut sunset, &mut west, f, hw);
        (
            west.stats().encap_packets,
            west.stats().drops.get(DropReason::InnerMalformed),
        )
    };
    assert_eq!(send(&mut pc, &bad_ip, 0), (0, 1), "checked in software");
    assert_eq!(
        send(&mut pc, &bad_ip, HW_IP_CSUM_GOOD),
        (1, 1),
        "the NIC's word"
    );
    assert_eq!(send(&mut pc, &frame, 0), (2, 1));
    // West's ESP frame (the good one), and copies with a wrong outer IPv4 header checksum and
    // a wrong (non-zero) UDP checksum, fed to east with and without the NIC's flags.
    let mut esp = Vec::new();
    black
        .end_b(0, mac::EAST_BLACK, Steering::Rss)
        .rx_burst(&mut pc, &mut esp, 8);
    assert_eq!(esp.len(), 2);
    let esp: Vec<Vec<u8>> = esp
        .into_iter()
        .map(|b| {
            let v = b.data().to_vec();
            pc.put(b);
            v
        })
        .collect();
    let outer_bad = {
        let mut f = esp[0].clone();
        f[14 + 10] ^= 0x5a;
        f
    };
    let udp_bad = {
        let mut f = esp[1].clone();
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0x12, 0x34]);
        f
    };
    let mut into_east = black.end_a(0, mac::WEST_BLACK, Steering::Rss);
    let mut to_east = |pc: &mut PoolCache, f: &[u8], hw: u8| {
        feed(pc, &mut into_east, &mut east, f, hw);
        (
            east.stats().decap_packets,
            east.stats().drops.get(DropReason::Malformed),
        )
    };
    assert_eq!(
        to_east(&mut pc, &outer_bad, 0),
        (0, 1),
        "outer IPv4 checked"
    );
    assert_eq!(
        to_east(&mut pc, &udp_bad, HW_IP_CSUM_GOOD),
        (0, 2),
        "UDP checked"
    );
    assert_eq!(to_east(&mut pc, &outer_bad, HW_IP_CSUM_GOOD), (1, 2));
    assert_eq!(
        to_east(&mut pc, &udp_bad, HW_IP_CSUM_GOOD | HW_L4_CSUM_GOOD),
        (2, 2)
    );
}

/// The ESP sequence numbers of what two west worker threads put on the black link, in the
/// order they reached it, for a shared SA with or without `SendOrder`.
fn shared_sa_wire_sequence(wire_order: bool, per_worker: u64) -> Vec<u32> {
    let (mut wdb, edb) = lab::dbs(2, 0, SaMode::Shared, Lifetimes::default());
    for t in wdb.tunnels.iter_mut() {
        std::sync::Arc::make_mut(t).outbound.fallback.wire_order = wire_order;
    }
    let (ws, es) = lab::sides();
    let mut p = Pair::new(
        wdb,
        edb,
        ws,
        es,
        PairSpec {
            workers: 2,
            size: 256,
            flows: 8,
            limit: Some(per_worker),
            steering: Steering::Rss,
            ring_depth: 8192,
            ..Default::default()
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = std::mem::take(&mut p.west.workers)
        .into_iter()
        .map(|mut w| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                w.thread_start();
                while !stop.load(Ordering::Relaxed) {
                    w.poll();
                }
                w
            })
        })
        .collect();
    // The east end of the link, read here: frames in the order they were put on it (one
    // queue: one SA, one outer flow).
    let mut ends: Vec<_> = (0..2)
        .map(|q| p.link.end_b(q, mac::EAST_BLACK, Steering::Rss))
        .collect();
    let mut pc = PoolCache::new(p.pool.clone());
    let mut seqs = Vec::new();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while (seqs.len() as u64) < 2 * per_worker && t0.elapsed() < Duration::from_secs(60) {
        for e in ends.iter_mut() {
            e.rx_burst(&mut pc, &mut got, 64);
            for b in got.drain(..) {
                let d = b.data();
                if d.len() > 50 && d[12..14] == [8, 0] && d[23] == 17 {
                    seqs.push(u32::from_be_bytes([d[46], d[47], d[48], d[49]]));
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        p.west.workers.push(t.join().unwrap());
    }
    seqs
}

/// How far behind the highest number seen so far the furthest packet arrived.
fn reorder_depth(seqs: &[u32]) -> u32 {
    let mut top = 0;
    let mut depth = 0;
    for &s in seqs {
        if s < top {
            depth = depth.max(top - s);
        }
        top = top.max(s);
    }
    depth
}

/// Issue 25: an SA two workers send on (the fallback SA until the per-CPU SAs exist, every SA
/// with `sa_mode = "shared"` or against a peer without RFC 9611) reaches the wire in sequence
/// order. Workers reserve a burst's numbers at once and encrypt in parallel; without the
/// `SendOrder` lock, one worker's burst could land after the other's later numbers, and the
/// Linux guest under strongSwan (replay window 32) dropped 20 such packets in the seed
/// scenario (scripts/ike_linux_peer.py). Held from reservation until the burst is on the port,
/// the numbers arrive strictly increasing. (`shared_sa_order = "parallel"` gives that up; its
/// reorder depth is printed, not asserted: it depends on scheduling.)
#[test]
fn a_shared_sa_reaches_the_wire_in_sequence_order() {
    let seqs = shared_sa_wire_sequence(true, 20_000);
    assert_eq!(seqs.len(), 40_000, "every packet reached the link");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "out of order on the wire: reorder depth {}",
        reorder_depth(&seqs)
    );
    let par = shared_sa_wire_sequence(false, 20_000);
    assert_eq!(par.len(), 40_000);
    println!(
        "reorder depth on the wire: wire order 0, parallel {}",
        reorder_depth(&par)
    );
}

/// Issue 26: the N-tunnel lab (every tunnel its own subnets, SAs and policy; the SPD compiled
/// to a tuple space) delivers every packet spread over 300 tunnels, each tunnel's SAs carrying
/// its share on both gateways, and all of it to the last policy.
#[test]
fn traffic_spread_over_many_tunnels_arrives_on_each_tunnel_s_sas() {
    for last in [false, true] {
        let (wdb, edb) = lab::dbs_opts(
            1,
            1,
            SaMode::PerCpu,
            Lifetimes::default(),
            lab::LabOpts {
                tunnels: 300,
                ..Default::default()
            },
        );
        assert_eq!(wdb.spd_v4.tuple_groups(), 1);
        let (ws, es) = lab::sides_for(300);
        let mut p = Pair::new(
            wdb,
            edb,
            ws,
            es,
            PairSpec {
                workers: 1,
                size: 128,
                flows: 4,
                limit: Some(3_000),
                ring_depth: 4096,
                tunnels: 300,
                tunnel_last: last,
                ..Default::default()
            },
        )
        .unwrap();
        p.drain();
        assert_eq!(p.received.packets(), 3_000, "last = {last}");
        assert_eq!(
            total(&p.west).drops.total() + total(&p.east).drops.total(),
            0
        );
        let per_sa: Vec<u64> = p.west.workers[0]
            .sas()
            .outbound_sas()
            .map(|s| s.counters.packets)
            .collect();
        let used = per_sa.iter().filter(|n| **n > 0).count();
        if last {
            assert_eq!(used, 1);
        } else {
            assert_eq!(used, 300, "{per_sa:?}");
            assert!(per_sa.iter().all(|n| *n == 10));
        }
    }
}
