//! Micro-benchmarks, one group per size so that raw crypto and ESP processing are measured in
//! the same run: `seal/<backend>` and `open/<backend>` are the AEAD alone on an ESP-sized
//! payload; `encap` and `decap` are the whole ESP path (headers, padding, AAD, AEAD, outer
//! header) with the same backend. `scripts/bench-ratios` prints encap/seal and decap/open.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use espada_benches::*;
use espada_crypto::{Backend, EspAead};
use espada_dataplane::esp::{decapsulate, encapsulate, iv_from_seq, Decap, Encap};
use espada_dataplane::{PacketBuf, PktBuf};
use espada_sadb::ReplayWindow;
use std::hint::black_box;

fn crypto_and_esp(c: &mut Criterion) {
    for size in SIZES {
        let mut g = c.benchmark_group(format!("esp/{size}"));
        g.throughput(Throughput::Bytes(size as u64));
        let text = esp_text_len(size);
        for backend in Backend::available() {
            let ci = cipher(*backend);
            let mut buf = vec![0x5au8; text + 16];
            g.bench_function(format!("seal/{backend}"), |b| {
                let mut seq = 0u64;
                b.iter(|| {
                    seq += 1;
                    ci.seal_in_place(&iv_from_seq(seq), &[0u8; 12], black_box(&mut buf))
                        .unwrap();
                })
            });
            let mut sealed = vec![0x5au8; text + 16];
            ci.seal_in_place(&[1; 8], &[0u8; 12], &mut sealed).unwrap();
            g.bench_function(format!("open/{backend}"), |b| {
                b.iter_batched_ref(
                    || sealed.clone(),
                    |ct| {
                        ci.open_in_place(&[1; 8], &[0u8; 12], black_box(ct))
                            .unwrap()
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        // The whole ESP path with the default backend.
        let inner = inner_packet(size);
        let (mut out, mut inb) = sa_pair(Backend::Ring);
        let mut pkt = PktBuf::new(size + 512);
        g.bench_function("encap/ring", |b| {
            b.iter(|| {
                // Stand-in for RX: the buffer gets a fresh inner header (payload bytes stay).
                pkt.reset();
                let d = pkt.append(inner.len()).unwrap();
                d[..28].copy_from_slice(&inner[..28]);
                let r = out.reserve(1);
                let v = encapsulate(
                    &mut out,
                    r.first,
                    &iv_from_seq(r.first),
                    black_box(&mut pkt),
                );
                debug_assert_eq!(v, Encap::Done);
                v
            })
        });
        let (mut out2, _) = sa_pair(Backend::Ring);
        let outer = out2.tunnel.outer_len();
        inb.window = ReplayWindow::new(4096, true).into();
        g.bench_function("decap/ring", |b| {
            b.iter_batched_ref(
                || {
                    let mut p = PktBuf::new(size + 512);
                    p.load(&inner);
                    let r = out2.reserve(1);
                    let _ = encapsulate(&mut out2, r.first, &iv_from_seq(r.first), &mut p);
                    p.adj(outer);
                    p
                },
                |p| {
                    let v = decapsulate(&mut inb, black_box(p));
                    debug_assert!(matches!(v, Decap::Inner { .. }));
                    v
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn replay_and_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    for size in [64u32, 4096, 65536] {
        let mut w = ReplayWindow::new(size, true);
        let mut seq = 0u64;
        g.bench_function(format!("in-order/{size}"), |b| {
            b.iter(|| {
                seq += 1;
                let s = w.infer(seq as u32).unwrap();
                w.check(s).unwrap();
                w.commit(black_box(s)).unwrap();
            })
        });
    }
    g.finish();
    let pkt = inner_packet(1400);
    c.bench_function("parse/ipv4+udp", |b| {
        b.iter(|| {
            let ip = espada_wire::ipv4::Packet::new_checked(black_box(&pkt[..])).unwrap();
            let r = espada_wire::ipv4::Repr::parse(&ip).unwrap();
            let u = espada_wire::udp::Packet::new_checked(ip.payload()).unwrap();
            (r.payload_len, u.dst_port())
        })
    });
}

criterion_group!(benches, crypto_and_esp, replay_and_parse);
criterion_main!(benches);
