//! Every wire parser over arbitrary bytes: after `check_len` no accessor may panic.
#![no_main]

use espada_wire::*;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = ethernet::Frame::new_checked(data) {
        let _ = (ethernet::Repr::parse(&f), f.payload().len());
    }
    if let Ok(p) = arp::Packet::new_checked(data) {
        let _ = arp::Repr::parse(&p);
    }
    if let Ok(p) = ipv4::Packet::new_checked(data) {
        let _ = (
            ipv4::Repr::parse(&p),
            p.payload().len(),
            p.frag_offset(),
            p.verify_checksum(),
        );
        if let Ok(u) = udp::Packet::new_checked(p.payload()) {
            let _ = udp::Repr::parse(&u, IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()));
        }
    }
    if let Ok(p) = ipv6::Packet::new_checked(data) {
        let _ = (ipv6::Repr::parse(&p), p.payload().len());
    }
    if let Ok(u) = udp::Packet::new_checked(data) {
        let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let _ = (udp::Repr::parse(&u, a, a), u.payload().len());
    }
    if let Ok(p) = esp::Packet::new_checked(data) {
        let _ = (esp::Repr::parse(&p), p.ciphertext_len(), p.payload().len());
    }
    let _ = esp::parse_trailer(data);
    let _ = esp::classify_udp_payload(data);
});
