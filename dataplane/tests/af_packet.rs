//! espada's AF_PACKET port on veth pairs inside a network namespace the test creates (needs
//! root): frames are received in place, in slots of the kernel's TPACKET_V2 ring, with room to
//! add ESP in front and behind; a lent slot goes back to the kernel when its buffer is dropped;
//! a slot held too long costs counted kernel drops, not a stalled ring; a queue closed with
//! slots still out neither crashes nor keeps a share of the traffic; and a gateway on AF_PACKET
//! forwards every packet from the slot it arrived in, with either transmit mode (mapped ring or
//! linear sendmmsg); linear transmit counts what a down link refuses.

use espada_dataplane::pktbuf::{PacketBuf, PktBuf};
use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::port::af_packet::{AfPacketQueue, RingConfig, TxMode, RX_RESERVE};
use espada_dataplane::port::PortQueue;
use std::time::{Duration, Instant};

mod common;

/// `common::in_netns` with this file's child variable.
fn in_netns(tag: &str, name: &str, links: &[(&str, &str)]) -> Option<String> {
    common::in_netns(tag, name, links, "ESPADA_AFP_CHILD", false)
}

fn queue(iface: &str) -> AfPacketQueue {
    AfPacketQueue::open(iface, 0, 1, 7, RingConfig::default())
        .unwrap_or_else(|e| panic!("AF_PACKET queue on {iface}: {e}"))
}

fn queue_tx(iface: &str, tx_mode: TxMode) -> AfPacketQueue {
    let rc = RingConfig {
        tx_mode,
        ..RingConfig::default()
    };
    AfPacketQueue::open(iface, 0, 1, 7, rc)
        .unwrap_or_else(|e| panic!("AF_PACKET queue on {iface}: {e}"))
}

/// A frame to `dst` whose bytes after the Ethernet header count from `tag`.
fn frame(pc: &mut PoolCache, dst: [u8; 6], len: usize, tag: u8) -> PktBuf {
    let mut b = pc.get().expect("a pool buffer");
    let d = b.append(len).unwrap();
    d[..6].copy_from_slice(&dst);
    d[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
    d[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    for (i, x) in d[14..].iter_mut().enumerate() {
        *x = tag.wrapping_add(i as u8);
    }
    b
}

/// Sends `n` frames from `tx` and receives them on `rx` (bounded wait), keeping them.
fn send_and_take(
    tx: &mut AfPacketQueue,
    rx: &mut AfPacketQueue,
    pc: &mut PoolCache,
    n: usize,
    len: usize,
) -> Vec<PktBuf> {
    let dst = rx.mac().0;
    let mut got = Vec::new();
    let mut sent = 0;
    let t = Instant::now();
    while got.len() < n && t.elapsed() < Duration::from_secs(10) {
        if sent < n {
            let k = (n - sent).min(16);
            let mut v: Vec<PktBuf> = (0..k)
                .map(|i| frame(pc, dst, len, (sent + i) as u8))
                .collect();
            sent += tx.tx_burst(pc, &mut v);
        }
        rx.rx_burst(pc, &mut got, 64);
    }
    got
}

fn in_place_child() {
    let pool = Pool::new(512, 2048);
    let mut pc = PoolCache::new(pool);
    let mut tx = queue("pra");
    let mut rx = queue("prb");
    let got = send_and_take(&mut tx, &mut rx, &mut pc, 100, 600);
    assert_eq!(got.len(), 100, "every frame arrived");
    for (i, b) in got.iter().enumerate() {
        assert!(
            b.is_ring_slot(),
            "frame {i} is the ring's own slot, not a copy"
        );
        assert_eq!(b.len(), 600);
        assert_eq!(&b.data()[..6], &rx.mac().0);
        assert_eq!(b.data()[14], i as u8, "in order, bytes intact");
        assert_eq!(b.data()[599], (i as u8).wrapping_add((585 % 256) as u8));
        assert!(
            b.headroom() >= RX_RESERVE,
            "room for the outer headers: {}",
            b.headroom()
        );
        assert!(
            b.tailroom() >= 64,
            "room for the ESP trailer: {}",
            b.tailroom()
        );
    }
    assert_eq!(rx.lent_slots(), 100, "every held buffer is a lent slot");
    // Encapsulation in place: outer headers in front, trailer and ICV behind.
    let mut it = got.into_iter();
    let mut b = it.next().unwrap();
    assert!(b.prepend(78).is_some() && b.append(34).is_some());
    assert_eq!(b.len(), 600 + 78 + 34);
    drop(b);
    drop(it);
    // Every buffer dropped (above and the 99 with `got`): every slot is the kernel's again.
    assert_eq!(rx.lent_slots(), 0);
    // The ring goes on where it was: another 3000 frames (more than the ring's slots) pass.
    let mut total = 0;
    for _ in 0..30 {
        let v = send_and_take(&mut tx, &mut rx, &mut pc, 100, 600);
        total += v.len();
        drop(v);
    }
    assert_eq!(total, 3000);
    assert_eq!(rx.lent_slots(), 0);
    println!("af_packet in place: 3100 frames received in ring slots, every slot returned");
}

#[test]
fn af_packet_receives_in_place_and_gives_slots_back() {
    if std::env::var("ESPADA_AFP_CHILD").is_ok() {
        return in_place_child();
    }
    if let Some(text) = in_netns(
        "afp",
        "af_packet_receives_in_place_and_gives_slots_back",
        &[("pra", "prb")],
    ) {
        assert!(text.contains("every slot returned"), "{text}");
    }
}

fn held_slot_child() {
    let pool = Pool::new(512, 2048);
    let mut pc = PoolCache::new(pool);
    let mut tx = queue("pha");
    let mut rx = queue("phb");
    // Hold one slot, then offer far more frames than the ring has slots, without receiving.
    let held = send_and_take(&mut tx, &mut rx, &mut pc, 1, 200);
    assert_eq!(held.len(), 1);
    rx.poll_kernel_drops();
    let slots = 4 << 20 >> 11; // RingConfig::default(): 4 MiB of 2 KiB slots
    let dst = rx.mac().0;
    let mut offered = 0;
    while offered < slots + 500 {
        let mut v: Vec<PktBuf> = (0..16).map(|_| frame(&mut pc, dst, 200, 1)).collect();
        offered += tx.tx_burst(&mut pc, &mut v);
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut got = Vec::new();
    while rx.rx_burst(&mut pc, &mut got, 64) > 0 {
        got.clear();
    }
    let drops = rx.poll_kernel_drops();
    println!("held slot: offered {offered}, kernel drops {drops}");
    assert!(
        drops > 0,
        "the kernel stopped at the held slot and counted what it could not place"
    );
    // Released: the ring moves again.
    drop(held);
    let v = send_and_take(&mut tx, &mut rx, &mut pc, 50, 200);
    assert_eq!(
        v.len(),
        50,
        "receiving resumed once the slot was given back"
    );
    drop(v);
    // A queue closed with a slot still out: the buffer stays valid, and a new queue on the
    // interface gets all of the traffic (the old socket left the interface).
    let out = send_and_take(&mut tx, &mut rx, &mut pc, 1, 300);
    assert_eq!(out.len(), 1);
    drop(rx);
    assert_eq!(out[0].len(), 300);
    assert_eq!(out[0].data()[14], 0);
    let mut rx2 = queue("phb");
    let v = send_and_take(&mut tx, &mut rx2, &mut pc, 200, 300);
    assert_eq!(v.len(), 200, "the new queue got every frame");
    drop(out);
    println!("held slot: counted drops, resumed, closed with a slot out safely");
}

#[test]
fn a_held_slot_costs_counted_drops_and_the_ring_resumes() {
    if std::env::var("ESPADA_AFP_CHILD").is_ok() {
        return held_slot_child();
    }
    if let Some(text) = in_netns(
        "afh",
        "a_held_slot_costs_counted_drops_and_the_ring_resumes",
        &[("pha", "phb")],
    ) {
        assert!(text.contains("closed with a slot out safely"), "{text}");
    }
}

/// A west lab gateway whose red and black queues are AF_PACKET sockets: every packet sunset
/// sends is encapsulated in the slot red received it in and leaves on black as ESP.
fn gateway_child() {
    const N: u64 = 3000;
    // Both transmit modes: the mapped ring (hardware's default) and linear sendmmsg (virtual
    // devices' default, this veth's too).
    for mode in [TxMode::Ring, TxMode::Linear] {
        let (mut sunset, mut east) = (queue("grb"), queue("gbb"));
        let (red, black) = (queue_tx("gra", mode), queue_tx("gba", mode));
        assert_eq!(black.tx_is_linear(), mode == TxMode::Linear);
        let (esp, gw) = common::drive_west_gateway(
            Box::new(red),
            Box::new(black),
            &mut sunset,
            &mut east,
            1400,
            N,
        );
        let (r, b) = gw.ports();
        let (r, b) = (r.stats(), b.stats());
        println!(
            "gateway ({mode:?}): {esp} ESP frames on east's side; red {r:?}; black {b:?}; drops {:?}",
            gw.stats().drops
        );
        assert_eq!(esp, N, "every packet was encapsulated and sent");
        assert_eq!(r.rx_packets, N);
        assert_eq!(b.tx_packets, N);
        assert_eq!(gw.stats().drops.total(), 0);
    }
    assert!(
        queue("gba").tx_is_linear(),
        "auto: linear on a virtual device"
    );
    println!("af_packet gateway: {N} packets encapsulated in their receive slots");
}

/// Linear transmit while the link is down: the kernel refuses every frame and each one is
/// counted as dropped; once the link is back frames go out again.
fn link_down_child() {
    let mut a = queue_tx("lda", TxMode::Linear);
    let mut b = queue("ldb");
    let pool = Pool::new(256, 2048);
    let mut pc = PoolCache::new(pool);
    let ip = |state: &str| {
        let ok = std::process::Command::new("ip")
            .args(["link", "set", "ldb", state])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set ldb {state}");
    };
    ip("down");
    std::thread::sleep(Duration::from_millis(100));
    let dst = b.mac().0;
    let mut v: Vec<PktBuf> = (0..10).map(|i| frame(&mut pc, dst, 200, i)).collect();
    let sent = a.tx_burst(&mut pc, &mut v);
    let st = a.stats();
    assert_eq!(sent, 0, "nothing goes out on a link that is down");
    assert_eq!(st.tx_dropped, 10, "{st:?}");
    assert!(v.is_empty(), "the buffers went back to the pool");
    ip("up");
    std::thread::sleep(Duration::from_millis(200));
    let got = send_and_take(&mut a, &mut b, &mut pc, 20, 200);
    assert_eq!(got.len(), 20, "frames flow again once the link is up");
    println!("linear transmit: 10 refused frames counted while the link was down");
}

#[test]
fn linear_transmit_counts_what_a_down_link_refuses() {
    if std::env::var("ESPADA_AFP_CHILD").is_ok() {
        return link_down_child();
    }
    if let Some(text) = in_netns(
        "afl",
        "linear_transmit_counts_what_a_down_link_refuses",
        &[("lda", "ldb")],
    ) {
        assert!(text.contains("10 refused frames counted"), "{text}");
    }
}

#[test]
fn a_gateway_on_af_packet_encapsulates_in_the_receive_slot() {
    if std::env::var("ESPADA_AFP_CHILD").is_ok() {
        return gateway_child();
    }
    if let Some(text) = in_netns(
        "afg",
        "a_gateway_on_af_packet_encapsulates_in_the_receive_slot",
        &[("gra", "grb"), ("gba", "gbb")],
    ) {
        assert!(
            text.contains("encapsulated in their receive slots"),
            "{text}"
        );
    }
}
