//! ESP core tests: the independent vectors, round trips over every combination, the RFC rules
//! one by one, and robustness against arbitrary bytes.

use super::*;
use crate::drop::DropReason;
use crate::pktbuf::{PacketBuf, PktBuf};
use espada_crypto::{Algorithm, Backend, Cipher, KeyMaterial};
use espada_sadb::{DfMode, InboundSa, OutboundSa, ReplayWindow, TunnelEndpoints};
use espada_wire::{ipv4, ipv6, udp};
use proptest::prelude::*;
use std::net::IpAddr;

fn cipher(alg: Algorithm, key: &[u8]) -> Cipher {
    Cipher::new(Backend::Ring, &KeyMaterial::new(alg, key).unwrap()).unwrap()
}

fn tunnel(v6: bool) -> TunnelEndpoints {
    if v6 {
        TunnelEndpoints::new(
            "2001:db8:1::1".parse().unwrap(),
            "2001:db8:1::2".parse().unwrap(),
        )
    } else {
        TunnelEndpoints::new(
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        )
    }
}

/// An inner IPv4/UDP packet with `payload` bytes, TOS and DF as given.
pub(crate) fn inner_v4(payload: usize, tos: u8, df: bool) -> Vec<u8> {
    let ip = ipv4::Repr {
        src: "192.0.2.10".parse().unwrap(),
        dst: "198.51.100.20".parse().unwrap(),
        protocol: 17,
        payload_len: 0,
        ttl: 63,
        tos,
        ident: 7,
        dont_frag: df,
    };
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    udp::build_packet(udp::IpHeader::V4(ip), 1000, 2000, &data)
}

pub(crate) fn inner_v6(payload: usize, tc: u8) -> Vec<u8> {
    let ip = ipv6::Repr {
        src: "2001:db8:a::10".parse().unwrap(),
        dst: "2001:db8:b::20".parse().unwrap(),
        next_header: 17,
        payload_len: 0,
        hop_limit: 63,
        traffic_class: tc,
        flow_label: 0,
    };
    let data: Vec<u8> = (0..payload).map(|i| (i * 7) as u8).collect();
    udp::build_packet(udp::IpHeader::V6(ip), 1000, 2000, &data)
}

/// Strips the outer IP + UDP header after checking it, leaving the UDP payload.
fn strip_outer(pkt: &mut PktBuf, v6: bool) {
    let (ip_len, udp_len) = if v6 {
        let p = ipv6::Packet::new_checked(pkt.data()).unwrap();
        assert_eq!(p.next_header(), 17);
        let u = udp::Packet::new_checked(p.payload()).unwrap();
        assert!(u.verify_checksum(IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr())));
        assert_ne!(
            u.checksum(),
            0,
            "RFC 8200: UDP over IPv6 carries a checksum"
        );
        (40, u.len() as usize)
    } else {
        let p = ipv4::Packet::new_checked(pkt.data()).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.total_len() as usize, pkt.len());
        let u = udp::Packet::new_checked(p.payload()).unwrap();
        assert_eq!(
            u.checksum(),
            0,
            "RFC 3948 §2.1: zero UDP checksum over IPv4"
        );
        (20, u.len() as usize)
    };
    assert_eq!(ip_len + udp_len, pkt.len());
    assert!(pkt.adj(ip_len + 8));
}

// ---------------------------------------------------------------- independent vectors

#[derive(Debug)]
struct Vector {
    name: String,
    alg: Algorithm,
    key: Vec<u8>,
    spi: u32,
    esn: bool,
    seq: u64,
    iv: [u8; 8],
    v6: bool,
    sport: u16,
    inner: Vec<u8>,
    esp: Vec<u8>,
    expect: String,
}

fn load_vectors() -> Vec<Vector> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/esp-in-udp-gcm.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut iv = [0u8; 8];
            iv.copy_from_slice(&hex::decode(e["iv"].as_str().unwrap()).unwrap());
            Vector {
                name: e["name"].as_str().unwrap().into(),
                alg: Algorithm::from_name(e["aead"].as_str().unwrap()).unwrap(),
                key: hex::decode(e["key_salt"].as_str().unwrap()).unwrap(),
                spi: e["spi"].as_u64().unwrap() as u32,
                esn: e["esn"].as_bool().unwrap(),
                seq: e["seq"].as_u64().unwrap(),
                iv,
                v6: e["outer"].as_str().unwrap() == "ipv6",
                sport: e["udp_sport"].as_u64().unwrap() as u16,
                inner: hex::decode(e["inner"].as_str().unwrap()).unwrap(),
                esp: hex::decode(e["esp"].as_str().unwrap()).unwrap(),
                expect: e["expect"].as_str().unwrap().into(),
            }
        })
        .collect()
}

fn verdict_label(d: Decap) -> String {
    match d {
        Decap::Inner { .. } => "accept".into(),
        Decap::Control => "pass:ike".into(),
        Decap::Drop(r) => format!("drop:{}", r.label()),
    }
}

#[test]
fn independent_vectors() {
    let vs = load_vectors();
    assert_eq!(vs.len(), 58);
    for v in &vs {
        for backend in Backend::available() {
            let km = KeyMaterial::new(v.alg, &v.key).unwrap();
            let mk = || Cipher::new(*backend, &km).unwrap();
            if v.expect == "accept" {
                let mut t = tunnel(v.v6);
                t.src_port = v.sport;
                let mut sa = OutboundSa::new(v.spi, mk(), v.esn, t).with_last_seq(v.seq - 1);
                let r = sa.reserve(1);
                assert_eq!(r.first, v.seq);
                let mut pkt = PktBuf::from_slice(&v.inner);
                assert_eq!(
                    encapsulate(&mut sa, v.seq, &v.iv, &mut pkt),
                    Encap::Done,
                    "{}",
                    v.name
                );
                strip_outer(&mut pkt, v.v6);
                assert_eq!(pkt.data(), &v.esp[..], "{} encap with {backend}", v.name);
            }
            let mut isa = InboundSa::new(v.spi, mk(), v.esn, 4096);
            isa.window = ReplayWindow::starting_at(4096, v.esn, v.seq - 1).into();
            let mut pkt = PktBuf::from_slice(&v.esp);
            let d = decapsulate(&mut isa, &mut pkt);
            assert_eq!(verdict_label(d), v.expect, "{} with {backend}", v.name);
            if v.expect == "accept" {
                assert_eq!(pkt.data(), &v.inner[..], "{} decap", v.name);
            }
            if v.expect == "pass:ike" {
                assert_eq!(pkt.data(), &v.esp[..], "IKE is handed on untouched");
            }
        }
    }
}

// ---------------------------------------------------------------- round trips and RFC rules

fn pair(alg: Algorithm, esn: bool, v6: bool) -> (OutboundSa, InboundSa) {
    let key: Vec<u8> = (0..alg.key_material_len() as u8).collect();
    (
        OutboundSa::new(0x1000, cipher(alg, &key), esn, tunnel(v6)),
        InboundSa::new(0x1000, cipher(alg, &key), esn, 4096),
    )
}

#[test]
fn round_trip_every_combination() {
    for alg in [Algorithm::AesGcm128, Algorithm::AesGcm256] {
        for esn in [false, true] {
            for v6_outer in [false, true] {
                let (mut o, mut i) = pair(alg, esn, v6_outer);
                for (n, size) in [0usize, 1, 2, 3, 4, 5, 63, 64, 511, 1400, 8900]
                    .iter()
                    .enumerate()
                {
                    let inner = if n % 2 == 0 {
                        inner_v4(*size, 0, false)
                    } else {
                        inner_v6(*size, 0)
                    };
                    let mut pkt = PktBuf::new(10_000);
                    assert!(pkt.load(&inner));
                    let r = o.reserve(1);
                    assert_eq!(
                        encapsulate(&mut o, r.first, &iv_from_seq(r.first), &mut pkt),
                        Encap::Done
                    );
                    // RFC 4303 §2.4: ciphertext ends on a 4-byte boundary.
                    let esp_len = pkt.len() - o.tunnel.outer_len();
                    assert_eq!((esp_len - 16 - 16) % 4, 0);
                    strip_outer(&mut pkt, v6_outer);
                    let d = decapsulate(&mut i, &mut pkt);
                    assert!(matches!(d, Decap::Inner { spi: 0x1000, .. }), "{d:?}");
                    assert_eq!(pkt.data(), &inner[..]);
                }
                assert_eq!(o.counters.packets, 11);
                assert_eq!(i.counters.packets, 11);
                assert_eq!(o.counters.bytes, i.counters.bytes);
            }
        }
    }
}

fn encap_one(o: &mut OutboundSa, inner: &[u8]) -> PktBuf {
    let mut pkt = PktBuf::from_slice(inner);
    let r = o.reserve(1);
    assert_eq!(
        encapsulate(o, r.first, &iv_from_seq(r.first), &mut pkt),
        Encap::Done
    );
    pkt
}

#[test]
fn outer_header_follows_inner_and_config() {
    let (mut o, _) = pair(Algorithm::AesGcm128, false, false);
    o.tunnel.ttl = 17;
    let mut o = OutboundSa::new(
        o.spi,
        cipher(Algorithm::AesGcm128, &[3; 20]),
        false,
        o.tunnel,
    );
    // DSCP EF (46) and ECT(0) inner → same TOS outer (DSCP copy, RFC 6040 normal-mode ECN copy).
    let pkt = encap_one(&mut o, &inner_v4(10, (46 << 2) | 2, true));
    let ip = ipv4::Packet::new_checked(pkt.data()).unwrap();
    assert_eq!(ip.dscp(), 46);
    assert_eq!(ip.ecn(), 2);
    assert_eq!(ip.ttl(), 17);
    assert!(
        ip.dont_frag(),
        "default DF policy sets (issue 12: never fragment ESP on the way)"
    );
    // DF copy / set
    for (mode, inner_df, expect) in [
        (DfMode::Copy, true, true),
        (DfMode::Copy, false, false),
        (DfMode::Set, false, true),
        (DfMode::Clear, true, false),
    ] {
        let mut t = o.tunnel;
        t.df = mode;
        let mut sa = OutboundSa::new(1, cipher(Algorithm::AesGcm128, &[3; 20]), false, t);
        let pkt = encap_one(&mut sa, &inner_v4(10, 0, inner_df));
        assert_eq!(
            ipv4::Packet::new_checked(pkt.data()).unwrap().dont_frag(),
            expect,
            "{mode:?}"
        );
    }
    // IPv6 outer: traffic class copied, hop limit from config.
    let mut t = tunnel(true);
    t.ttl = 9;
    let mut sa = OutboundSa::new(1, cipher(Algorithm::AesGcm128, &[3; 20]), false, t);
    let pkt = encap_one(&mut sa, &inner_v6(10, 0xb9));
    let ip = ipv6::Packet::new_checked(pkt.data()).unwrap();
    assert_eq!(ip.traffic_class(), 0xb9);
    assert_eq!(ip.hop_limit(), 9);
    // Ethernet padding behind a short inner packet is not encrypted.
    let mut padded = inner_v4(0, 0, false);
    let plain_len = padded.len();
    padded.extend_from_slice(&[0xee; 18]);
    let pkt = encap_one(&mut sa, &padded);
    assert_eq!(pkt.len(), 48 + 16 + plain_len + esp_pad(plain_len) + 2 + 16);
}

fn esp_pad(n: usize) -> usize {
    espada_wire::esp::pad_len(n)
}

#[test]
fn sequence_numbers_and_burst_reservation() {
    let (o, _) = pair(Algorithm::AesGcm128, false, false);
    let mut o = o.with_last_seq(u32::MAX as u64 - 2);
    let mut pkts: Vec<PktBuf> = (0..5)
        .map(|_| PktBuf::from_slice(&inner_v4(20, 0, false)))
        .collect();
    let mut verdicts = [Encap::Done; 5];
    encapsulate_burst(&mut o, &mut pkts, &mut verdicts);
    assert_eq!(
        verdicts,
        [
            Encap::Done,
            Encap::Done,
            Encap::Drop(DropReason::SeqCycled),
            Encap::Drop(DropReason::SeqCycled),
            Encap::Drop(DropReason::SeqCycled)
        ]
    );
    // The last packet that went out carries 2^32-1 and an IV of the same value.
    let mut last = pkts[1].clone();
    strip_outer(&mut last, false);
    let p = espada_wire::esp::Packet::new_checked(last.data()).unwrap();
    assert_eq!(p.seq(), u32::MAX);
    assert_eq!(p.iv(), iv_from_seq(u32::MAX as u64));
}

#[test]
fn replay_and_esn_rules() {
    let (mut o, mut i) = pair(Algorithm::AesGcm128, false, false);
    let inner = inner_v4(30, 0, false);
    let mut a = encap_one(&mut o, &inner);
    strip_outer(&mut a, false);
    let copy = a.clone();
    assert!(matches!(decapsulate(&mut i, &mut a), Decap::Inner { .. }));
    let mut again = copy.clone();
    assert_eq!(
        decapsulate(&mut i, &mut again),
        Decap::Drop(DropReason::Replay)
    );

    // ESN: the sender crosses 2^32; the receiver infers the high half and accepts.
    let (o, i) = pair(Algorithm::AesGcm256, true, true);
    let mut o = o.with_last_seq(u32::MAX as u64 - 1);
    let mut i = i;
    i.window = ReplayWindow::starting_at(4096, true, u32::MAX as u64 - 1).into();
    for _ in 0..3 {
        let mut p = encap_one(&mut o, &inner);
        strip_outer(&mut p, true);
        assert!(matches!(decapsulate(&mut i, &mut p), Decap::Inner { .. }));
    }
    assert_eq!(i.window.top(), (1u64 << 32) + 1);

    // A packet whose true high half is not the inferred one fails integrity, and the window
    // does not move (RFC 4303 A2.2).
    let (o, i) = pair(Algorithm::AesGcm128, true, false);
    let mut o = o.with_last_seq((3u64 << 32) + 99);
    let mut i = i;
    i.window = ReplayWindow::starting_at(4096, true, (1u64 << 32) + 50).into();
    let mut p = encap_one(&mut o, &inner); // seq (3<<32)+100: receiver infers (1<<32)+100
    strip_outer(&mut p, false);
    assert_eq!(
        decapsulate(&mut i, &mut p),
        Decap::Drop(DropReason::Integrity)
    );
    assert_eq!(i.window.top(), (1u64 << 32) + 50);
}

#[test]
fn classification_and_lookup() {
    let (mut o, i) = pair(Algorithm::AesGcm128, false, false);
    let mut table: std::collections::HashMap<u32, InboundSa> = [(i.spi, i)].into_iter().collect();
    let mut ike = PktBuf::from_slice(&[0, 0, 0, 0, 0x21, 0x20]);
    assert_eq!(decapsulate(&mut table, &mut ike), Decap::Control);
    let mut ka = PktBuf::from_slice(&[0xff]);
    assert_eq!(
        decapsulate(&mut table, &mut ka),
        Decap::Drop(DropReason::Keepalive)
    );
    let mut short = PktBuf::from_slice(&[1, 2, 3]);
    assert_eq!(
        decapsulate(&mut table, &mut short),
        Decap::Drop(DropReason::Malformed)
    );
    let mut p = encap_one(&mut o, &inner_v4(1, 0, false));
    strip_outer(&mut p, false);
    p.data_mut()[3] ^= 1; // another SPI
    assert_eq!(
        decapsulate(&mut table, &mut p),
        Decap::Drop(DropReason::NoSa)
    );
}

// ---------------------------------------------------------------- robustness

fn valid_esp(inner_len: usize) -> (InboundSa, Vec<u8>) {
    let (mut o, i) = pair(Algorithm::AesGcm128, false, false);
    let mut p = encap_one(&mut o, &inner_v4(inner_len, 0, false));
    strip_outer(&mut p, false);
    (i, p.data().to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes: never a panic, and the verdict is always accounted for.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), spi_hit in any::<bool>()) {
        let (_, i) = pair(Algorithm::AesGcm128, false, false);
        let mut i = i;
        let mut b = bytes.clone();
        if spi_hit && b.len() >= 4 { b[..4].copy_from_slice(&0x1000u32.to_be_bytes()); }
        let mut pkt = PktBuf::from_slice(&b);
        let d = decapsulate(&mut i, &mut pkt);
        let authenticated = matches!(d, Decap::Inner { .. });
        prop_assert!(!authenticated, "random bytes must not authenticate");
    }

    /// Mutated valid packets: any bit flip, truncation or extension is rejected with one reason
    /// and never panics; the untouched packet is accepted.
    #[test]
    fn mutated_packets_are_counted(len in 0usize..300, flip in any::<prop::sample::Index>(), bit in 0u8..8, cut in 0usize..64, mode in 0u8..3) {
        let (mut i, esp) = valid_esp(len);
        let mut b = esp.clone();
        match mode {
            0 => { let k = flip.index(b.len()); b[k] ^= 1 << bit; }
            1 => { let n = b.len().saturating_sub(cut.max(1)); b.truncate(n); }
            _ => b.extend(std::iter::repeat_n(0xab, cut.max(1))),
        }
        let mut pkt = PktBuf::from_slice(&b);
        let d = decapsulate(&mut i, &mut pkt);
        // A flip that zeroes the SPI turns the packet into an IKE message (RFC 3948 §2.2).
        let ok = matches!(d, Decap::Drop(_))
            || (d == Decap::Control && b.len() >= 4 && b[..4] == [0, 0, 0, 0]);
        prop_assert!(ok, "{:?}", d);
        // The window did not move for the rejected copy: the genuine packet still passes.
        let mut good = PktBuf::from_slice(&esp);
        let accepted = matches!(decapsulate(&mut i, &mut good), Decap::Inner { .. });
        prop_assert!(accepted);
    }

    /// Encapsulation of arbitrary bytes as an "inner packet" never panics either.
    #[test]
    fn encap_arbitrary_inner(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (mut o, _) = pair(Algorithm::AesGcm128, false, true);
        let mut pkt = PktBuf::from_slice(&bytes);
        let r = o.reserve(1);
        let _ = encapsulate(&mut o, r.first, &iv_from_seq(r.first), &mut pkt);
    }
}
