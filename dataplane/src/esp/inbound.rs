//! Inbound: UDP/4500 payload → inner IP packet (RFC 3948 §2.2/2.3, RFC 4303 §3.4).

use crate::drop::DropReason;
use crate::pktbuf::PacketBuf;
use espada_crypto::EspAead;
use espada_sadb::InboundSa;
use espada_wire::{esp, ip_proto, ipv4, ipv6};
use std::collections::HashMap;

/// Result of processing one UDP/4500 payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Decap {
    /// The buffer now holds the inner IP packet; `spi` names the SA that authenticated it.
    Inner {
        /// SA that authenticated the packet.
        spi: u32,
        /// 4 (IPv4) or 41 (IPv6).
        next_header: u8,
    },
    /// An IKE message (non-ESP marker, RFC 3948 §2.2): for the control path, never decrypted.
    /// The buffer is unchanged.
    Control,
    /// Drop and count.
    Drop(DropReason),
}

/// Finds the inbound SA for an SPI. Implemented by the SA tables of the worker.
pub trait InboundLookup {
    /// The SA for `spi`, if this table has it.
    fn lookup(&mut self, spi: u32) -> Option<&mut InboundSa>;
}

impl InboundLookup for InboundSa {
    #[inline(always)]
    fn lookup(&mut self, spi: u32) -> Option<&mut InboundSa> {
        (self.spi == spi).then_some(self)
    }
}

impl InboundLookup for HashMap<u32, InboundSa> {
    #[inline(always)]
    fn lookup(&mut self, spi: u32) -> Option<&mut InboundSa> {
        self.get_mut(&spi)
    }
}

impl InboundLookup for [InboundSa] {
    #[inline(always)]
    fn lookup(&mut self, spi: u32) -> Option<&mut InboundSa> {
        self.iter_mut().find(|s| s.spi == spi)
    }
}

/// Processes the UDP payload in `pkt` (everything after the UDP header of a datagram to port
/// 4500). On `Decap::Inner` the buffer holds exactly the inner IP packet.
///
/// Order, as RFC 4303 §3.4 wants it: classify (IKE / keepalive / ESP) → SA lookup by SPI →
/// replay pre-check with ESN reconstruction (Appendix A2) → AEAD open → replay commit (only
/// after authentication) → dummy check (next header 59) → padding check → next header → inner
/// header sanity. Every failure maps to exactly one [`DropReason`]; nothing here panics.
#[inline]
pub fn decapsulate<L: InboundLookup + ?Sized, P: PacketBuf>(sas: &mut L, pkt: &mut P) -> Decap {
    match decap_inner(sas, pkt) {
        Ok(d) => d,
        Err(r) => Decap::Drop(r),
    }
}

#[inline(always)]
fn decap_inner<L: InboundLookup + ?Sized, P: PacketBuf>(
    sas: &mut L,
    pkt: &mut P,
) -> Result<Decap, DropReason> {
    match esp::classify_udp_payload(pkt.data()) {
        esp::UdpEncap::Esp => {}
        esp::UdpEncap::Ike => return Ok(Decap::Control),
        esp::UdpEncap::Keepalive => return Err(DropReason::Keepalive),
        esp::UdpEncap::Malformed => return Err(DropReason::Malformed),
    }
    decap_esp(sas, pkt)
}

/// [`decapsulate`] for a payload the caller has already classified as ESP
/// ([`esp::classify_udp_payload`] said `Esp`): the worker's fast path, which classifies once to
/// find the SPI's owner.
#[inline]
pub fn decapsulate_esp<L: InboundLookup + ?Sized, P: PacketBuf>(sas: &mut L, pkt: &mut P) -> Decap {
    match decap_esp(sas, pkt) {
        Ok(d) => d,
        Err(r) => Decap::Drop(r),
    }
}

#[inline(always)]
fn decap_esp<L: InboundLookup + ?Sized, P: PacketBuf>(
    sas: &mut L,
    pkt: &mut P,
) -> Result<Decap, DropReason> {
    let (spi, seq_lo, iv) = {
        let p = esp::Packet::new_checked(pkt.data()).map_err(|_| DropReason::Malformed)?;
        (p.spi(), p.seq(), p.iv())
    };
    let sa = sas.lookup(spi).ok_or(DropReason::NoSa)?;
    let r = open_on(sa, spi, seq_lo, &iv, pkt);
    if let Err(e) = r {
        count_sa_drop(&mut sa.counters, e);
    }
    r
}

/// A drop on an SA, counted on it (`espada show sa`: replay, integrity, other). Off the
/// packet's way: only failures come here.
#[cold]
#[inline(never)]
fn count_sa_drop(c: &mut espada_sadb::SaCounters, r: DropReason) {
    match r {
        DropReason::Replay => c.replay_drops += 1,
        DropReason::Integrity => c.integrity_drops += 1,
        DropReason::Dummy => {}
        _ => c.other_drops += 1,
    }
}

/// [`decap_esp`] once the SA is known.
#[inline(always)]
fn open_on<P: PacketBuf>(
    sa: &mut InboundSa,
    spi: u32,
    seq_lo: u32,
    iv: &[u8; esp::IV_LEN],
    pkt: &mut P,
) -> Result<Decap, DropReason> {
    // RFC 4303 §3.4.3: duplicates and too-old numbers go before the (costly) integrity check.
    let seq = sa.window.infer(seq_lo).ok_or(DropReason::Replay)?;
    sa.window.check(seq).map_err(|_| DropReason::Replay)?;

    // A wrong ESN guess makes the AAD wrong and fails here, as RFC 4303 A2.2 intends.
    let (aad, aad_len) = super::aad(spi, seq, sa.window.esn());
    let body = &mut pkt.data_mut()[esp::HEADER_LEN + esp::IV_LEN..];
    let pt_len = sa
        .cipher
        .open_in_place(iv, &aad[..aad_len], body)
        .map_err(|_| DropReason::Integrity)?;

    // Authentic: now the window may move.
    sa.window.commit(seq).map_err(|_| DropReason::Replay)?;

    let plaintext = &pkt.data()[esp::HEADER_LEN + esp::IV_LEN..][..pt_len];
    // RFC 4303 §2.6: a dummy packet is discarded whatever its contents.
    if plaintext.last() == Some(&ip_proto::NO_NEXT_HEADER) {
        return Err(DropReason::Dummy);
    }
    let trailer = esp::parse_trailer(plaintext).map_err(|e| match e {
        esp::TrailerError::Malformed => DropReason::Malformed,
        esp::TrailerError::Padding => DropReason::Padding,
    })?;
    let inner = &plaintext[..trailer.payload_len];
    // Tunnel mode: the payload is an IP packet whose version matches the next header. TFC
    // padding may follow it inside the payload, so the inner length may be shorter.
    let inner_len = match trailer.next_header {
        ip_proto::IPV4 => {
            let p = ipv4::Packet::new_checked(inner).map_err(|_| DropReason::InnerMalformed)?;
            if p.version() != 4 {
                return Err(DropReason::InnerMalformed);
            }
            p.total_len() as usize
        }
        ip_proto::IPV6 => {
            let p = ipv6::Packet::new_checked(inner).map_err(|_| DropReason::InnerMalformed)?;
            if p.version() != 6 {
                return Err(DropReason::InnerMalformed);
            }
            p.total_len()
        }
        _ => return Err(DropReason::NextHeader),
    };
    let total = pkt.len();
    pkt.trim(total - (esp::HEADER_LEN + esp::IV_LEN + inner_len));
    pkt.adj(esp::HEADER_LEN + esp::IV_LEN);
    sa.counters.packets += 1;
    sa.counters.bytes += inner_len as u64;
    Ok(Decap::Inner {
        spi,
        next_header: trailer.next_header,
    })
}
