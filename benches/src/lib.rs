//! espada's measurements: the harness behind `espada bench` ([`harness`]), the per-core
//! reports of `espada demo`/`run` ([`report`]), and the shared fixtures of the criterion
//! micro-benchmarks in `benches/benches/` (run with `cargo bench -p espada-benches`,
//! summarise with `scripts/bench-ratios`).
#![forbid(unsafe_code)]

pub mod ab;
pub mod harness;
pub mod report;
pub mod table;

use espada_crypto::{Algorithm, Backend, Cipher, KeyMaterial};
use espada_sadb::{InboundSa, OutboundSa, TunnelEndpoints};
use espada_wire::{ipv4, udp};

/// The sizes every benchmark runs at (inner IP packet bytes).
pub const SIZES: [usize; 4] = [64, 512, 1400, 9000];

/// A fixed AES-128-GCM key for `backend`.
pub fn cipher(backend: Backend) -> Cipher {
    let km = KeyMaterial::new(Algorithm::AesGcm128, &[0x42; 20]).unwrap();
    Cipher::new(backend, &km).unwrap()
}

/// An outbound/inbound SA pair over IPv4 with ESN on.
pub fn sa_pair(backend: Backend) -> (OutboundSa, InboundSa) {
    let t = TunnelEndpoints::new(
        "192.168.100.1".parse().unwrap(),
        "192.168.100.2".parse().unwrap(),
    );
    (
        OutboundSa::new(0x1000, cipher(backend), true, t),
        InboundSa::new(0x1000, cipher(backend), true, 4096),
    )
}

/// An IPv4/UDP packet of `size` bytes (at least 28).
pub fn inner_packet(size: usize) -> Vec<u8> {
    let ip = ipv4::Repr {
        src: "10.1.0.10".parse().unwrap(),
        dst: "10.2.0.10".parse().unwrap(),
        protocol: 17,
        payload_len: 0,
        ttl: 64,
        tos: 0,
        ident: 1,
        dont_frag: true,
    };
    udp::build_packet(
        udp::IpHeader::V4(ip),
        40000,
        5201,
        &vec![0u8; size.max(28) - 28],
    )
}

/// The ESP payload length (what AES-GCM processes) for an inner packet of `size` bytes.
pub fn esp_text_len(size: usize) -> usize {
    size + espada_wire::esp::pad_len(size) + 2
}
