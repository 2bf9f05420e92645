//! A whole worker (west of the lab: red and black, over memory ports) fed arbitrary frames.
//! The input is a list of frames: `[side] [len] [bytes...]`, side bit 0 = black, bit 1 = write
//! our MAC as the destination (so frames pass layer-2 admission and reach the parsers), bit 2 =
//! write the IPv4 EtherType, bit 3 = fill in a valid IPv4 header checksum (so the fuzzer gets
//! past the checks into SPD, encapsulation, decapsulation and ARP), bit 4 = write the IPv6
//! EtherType instead (both sides have IPv6 too: neighbor discovery, IPv6 forwarding, packet too
//! big). The worker polls after every frame. It must never panic, every pool buffer must
//! come home at the end, and no (SPI, sequence number) pair may leave on black twice (issue 24:
//! one AES-GCM nonce per key).
#![no_main]

use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::port::memory::{MemoryLink, Steering};
use espada_dataplane::port::PortQueue;
use espada_dataplane::worker::Side6;
use espada_dataplane::{PacketBuf, PktBuf};
use espada_harness::pair::{lab, lab_worker, mac, LabGateway};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use libfuzzer_sys::fuzz_target;

/// (SPI, sequence number) of an ESP-in-UDP frame (port 4500, not the non-ESP marker).
fn esp_seq(f: &[u8]) -> Option<(u32, u32)> {
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let udp = match et {
        0x0800 if *f.get(23)? == 17 => 14 + ((*f.get(14)? & 15) as usize) * 4,
        0x86dd if *f.get(20)? == 17 => 54,
        _ => return None,
    };
    let h = f.get(udp..udp + 16)?;
    if u16::from_be_bytes([h[2], h[3]]) != 4500 {
        return None;
    }
    let spi = u32::from_be_bytes(h[8..12].try_into().ok()?);
    let seq = u32::from_be_bytes(h[12..16].try_into().ok()?);
    (spi != 0).then_some((spi, seq))
}

fuzz_target!(|data: &[u8]| {
    let mut sent = std::collections::HashSet::new();
    let (wdb, _) = lab::dbs(1, 1, SaMode::PerCpu, Lifetimes::default());
    let pool = Pool::new(256, 2048);
    let red = MemoryLink::new(1, 64);
    let black = MemoryLink::new(1, 64);
    let (mut sides, _) = lab::sides();
    sides.red.v6 = Some(Side6 {
        ip: "fd00:1::1".parse().unwrap(),
        prefix: "fd00:1::/64".parse().unwrap(),
        gateway: None,
    });
    sides.black.v6 = Some(Side6 {
        ip: "fd00:100::1".parse().unwrap(),
        prefix: "fd00:100::/64".parse().unwrap(),
        gateway: Some("fd00:100::2".parse().unwrap()),
    });
    let mut w = lab_worker(
        LabGateway::West,
        wdb,
        (sides, lab::sides().1),
        &red,
        &black,
        &pool,
    )
    .unwrap();
    let mut pc = PoolCache::new(pool.clone());
    let mut into_red = red.end_a(0, mac::SUNSET, Steering::Rss);
    let mut into_black = black.end_b(0, mac::EAST_BLACK, Steering::Rss);
    let mut out = Vec::new();
    let mut rest = data;
    while let [side, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        let Some(mut b) = pc.get() else { break };
        let Some(d) = b.append(frame.len()) else {
            pc.put(b);
            continue;
        };
        d.copy_from_slice(frame);
        let to_black = side & 1 != 0;
        if side & 2 != 0 && d.len() >= 6 {
            let m = if to_black {
                mac::WEST_BLACK
            } else {
                mac::WEST_RED
            };
            d[..6].copy_from_slice(&m.0);
        }
        if side & 4 != 0 && d.len() >= 14 {
            d[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        if side & 16 != 0 && d.len() >= 14 {
            d[12..14].copy_from_slice(&[0x86, 0xdd]);
        }
        if side & 8 != 0 && d.len() >= 34 && d[14] >> 4 == 4 {
            let hl = ((d[14] & 15) as usize * 4).max(20);
            if d.len() >= 14 + hl {
                espada_wire::ipv4::Packet::new_unchecked(&mut d[14..14 + hl]).fill_checksum();
            }
        }
        let mut v: Vec<PktBuf> = vec![b];
        if to_black {
            into_black.tx_burst(&mut pc, &mut v);
        } else {
            into_red.tx_burst(&mut pc, &mut v);
        }
        w.poll();
        // Whatever the worker sent goes back to the pool.
        into_red.rx_burst(&mut pc, &mut out, 64);
        let from_red = out.len();
        into_black.rx_burst(&mut pc, &mut out, 64);
        for (i, b) in out.drain(..).enumerate() {
            if i >= from_red {
                if let Some(k) = esp_seq(b.data()) {
                    assert!(
                        sent.insert(k),
                        "SPI {:#x} sequence {} sent twice on black",
                        k.0,
                        k.1
                    );
                }
            }
            pc.put(b);
        }
    }
    for _ in 0..4 {
        w.poll();
    }
    w.finish();
    into_red.rx_burst(&mut pc, &mut out, 64);
    into_black.rx_burst(&mut pc, &mut out, 64);
    for b in out.drain(..) {
        pc.put(b);
    }
    drop(w);
    drop(pc);
    drop((into_red, into_black, red, black));
    assert_eq!(pool.available(), pool.total(), "a buffer leaked");
});
