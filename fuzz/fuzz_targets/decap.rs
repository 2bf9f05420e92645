//! Inbound ESP processing over arbitrary UDP/4500 payloads. The first input byte picks the SA
//! flavour (ESN, key size, window position) so the fuzzer reaches every branch; the rest is
//! the payload. Packets whose SPI matches get as far as the AEAD; to reach the code after it,
//! inputs starting with 0xE5 are first encrypted as a genuine inner packet and then mutated.
#![no_main]

use espada_crypto::{Algorithm, Backend, Cipher, KeyMaterial};
use espada_dataplane::esp::{decapsulate, encapsulate, iv_from_seq, Decap};
use espada_dataplane::{PacketBuf, PktBuf};
use espada_sadb::{InboundSa, OutboundSa, ReplayWindow, TunnelEndpoints};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let esn = flags & 1 != 0;
    let alg = if flags & 2 != 0 {
        Algorithm::AesGcm256
    } else {
        Algorithm::AesGcm128
    };
    let km = KeyMaterial::new(alg, &vec![0x11; alg.key_material_len()]).unwrap();
    let mk = || Cipher::new(Backend::Ring, &km).unwrap();
    let top = if flags & 4 != 0 { (1u64 << 32) - 8 } else { 0 };
    let mut sa = InboundSa::new(0x1000, mk(), esn, 64);
    sa.window = ReplayWindow::starting_at(64, esn, top).into();

    let mut pkt = PktBuf::new(rest.len() + 512);
    if flags == 0xE5 && !rest.is_empty() {
        // Encrypt `rest` as if it were an inner packet (it may be invalid: then it is dropped
        // at encapsulation), then flip one byte chosen by the input.
        let t = TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut o = OutboundSa::new(0x1000, mk(), esn, t).with_last_seq(top);
        pkt.load(&rest[1..]);
        let r = o.reserve(1);
        if encapsulate(&mut o, r.first, &iv_from_seq(r.first), &mut pkt)
            != espada_dataplane::esp::Encap::Done
        {
            return;
        }
        pkt.adj(t.outer_len());
        let i = rest[0] as usize % pkt.len();
        pkt.data_mut()[i] ^= rest[0] | 1;
    } else {
        pkt.load(rest);
    }
    match decapsulate(&mut sa, &mut pkt) {
        Decap::Inner { next_header, .. } => assert!(next_header == 4 || next_header == 41),
        Decap::Control | Decap::Drop(_) => {}
    }
});
