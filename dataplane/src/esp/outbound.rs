//! Outbound: inner IP packet → outer IP + UDP + ESP (RFC 4303 §3.3, RFC 3948 §2.1).

use crate::drop::DropReason;
use crate::pktbuf::PacketBuf;
use espada_crypto::EspAead;
use espada_sadb::{DfMode, OutboundSa};
use espada_wire::{esp, ip_proto, ipv4, ipv6, udp};
use std::net::IpAddr;

/// Result of encapsulating one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Encap {
    /// The buffer now holds the outer IP packet.
    Done,
    /// The packet must be dropped and counted.
    Drop(DropReason),
}

/// The IV espada uses: the 64-bit sequence number, big-endian. It is unique per packet for a
/// key because the counter never cycles (RFC 4106 §3.1 names a counter as the usual choice).
#[inline(always)]
pub fn iv_from_seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// What the inner header tells the outer one (the classify stage fills it from its one parse
/// of the header and hands it to [`encapsulate_parsed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerInfo {
    /// Inner IP packet length (the buffer may hold link-layer padding after it).
    pub len: usize,
    /// DSCP + ECN byte.
    pub tos: u8,
    /// IPv4 DF.
    pub dont_frag: bool,
    /// 4 (IPv4) or 41 (IPv6).
    pub next_header: u8,
}

#[inline(always)]
fn inspect_inner(data: &[u8]) -> Result<InnerInfo, DropReason> {
    match data.first().map(|b| b >> 4) {
        Some(4) => {
            let p = ipv4::Packet::new_checked(data).map_err(|_| DropReason::InnerMalformed)?;
            Ok(InnerInfo {
                len: p.total_len() as usize,
                tos: p.tos(),
                dont_frag: p.dont_frag(),
                next_header: ip_proto::IPV4,
            })
        }
        Some(6) => {
            let p = ipv6::Packet::new_checked(data).map_err(|_| DropReason::InnerMalformed)?;
            Ok(InnerInfo {
                len: p.total_len(),
                tos: p.traffic_class(),
                dont_frag: false,
                next_header: ip_proto::IPV6,
            })
        }
        _ => Err(DropReason::InnerMalformed),
    }
}

/// Encapsulates the inner IP packet in `pkt` with sequence number `seq` (already reserved with
/// [`OutboundSa::reserve`]) and explicit IV `iv` (normally [`iv_from_seq`]`(seq)`).
///
/// Outer header: addresses, ports and TTL from the SA's template; DSCP copied from the inner
/// header (RFC 4301 §5.1.2.1); ECN copied, RFC 6040 normal mode; DF per the SA's [`DfMode`]
/// (RFC 4301 §8.1); UDP checksum zero over IPv4 (RFC 3948 §2.1), computed over IPv6
/// (RFC 8200 §8.1). Padding 1, 2, 3, … to a 4-byte boundary (RFC 4303 §2.4), no TFC padding.
#[inline]
pub fn encapsulate<P: PacketBuf>(
    sa: &mut OutboundSa,
    seq: u64,
    iv: &[u8; 8],
    pkt: &mut P,
) -> Encap {
    match encap_inner(sa, seq, iv, pkt) {
        Ok(()) => Encap::Done,
        Err(r) => Encap::Drop(r),
    }
}

/// [`encapsulate`] for a packet whose inner header the caller has already parsed and checked
/// (`info` must describe the IP packet at the start of `pkt`).
#[inline]
pub fn encapsulate_parsed<P: PacketBuf>(
    sa: &mut OutboundSa,
    seq: u64,
    iv: &[u8; 8],
    pkt: &mut P,
    info: InnerInfo,
) -> Encap {
    match encap_info(sa, seq, iv, pkt, info) {
        Ok(()) => Encap::Done,
        Err(r) => Encap::Drop(r),
    }
}

#[inline(always)]
fn encap_inner<P: PacketBuf>(
    sa: &mut OutboundSa,
    seq: u64,
    iv: &[u8; 8],
    pkt: &mut P,
) -> Result<(), DropReason> {
    let info = inspect_inner(pkt.data())?;
    encap_info(sa, seq, iv, pkt, info)
}

#[inline(always)]
fn encap_info<P: PacketBuf>(
    sa: &mut OutboundSa,
    seq: u64,
    iv: &[u8; 8],
    pkt: &mut P,
    info: InnerInfo,
) -> Result<(), DropReason> {
    if info.len > pkt.len() {
        return Err(DropReason::InnerMalformed);
    }
    // Link-layer padding behind the IP packet is not part of it.
    let extra = pkt.len() - info.len;
    if extra > 0 {
        pkt.trim(extra);
    }
    let pad = esp::pad_len(info.len);
    let esp_len = esp::HEADER_LEN + esp::IV_LEN + info.len + pad + esp::TRAILER_LEN + esp::ICV_LEN;
    let outer_len = sa.tunnel.outer_len();
    let total = outer_len + esp_len;
    if total > u16::MAX as usize {
        return Err(DropReason::TooBig);
    }
    if pkt.headroom() < outer_len + esp::HEADER_LEN + esp::IV_LEN {
        return Err(DropReason::NoHeadroom);
    }
    // Trailer: padding, pad length, next header; then room for the ICV.
    let Some(tail) = pkt.append(pad + esp::TRAILER_LEN + esp::ICV_LEN) else {
        return Err(DropReason::NoTailroom);
    };
    esp::emit_trailer(&mut tail[..pad + esp::TRAILER_LEN], info.next_header);

    // ESP header and IV.
    let hdr = pkt
        .prepend(esp::HEADER_LEN + esp::IV_LEN)
        .ok_or(DropReason::NoHeadroom)?;
    esp::Repr {
        spi: sa.spi,
        seq: seq as u32,
        iv: *iv,
    }
    .emit(hdr);

    // Seal payload ‖ padding ‖ trailer in place; the ICV lands in the appended room.
    let (aad, aad_len) = super::aad(sa.spi, seq, sa.esn);
    let body = &mut pkt.data_mut()[esp::HEADER_LEN + esp::IV_LEN..];
    if sa.cipher.seal_in_place(iv, &aad[..aad_len], body).is_err() {
        // Only possible with a buffer shorter than a tag, which the append above rules out.
        return Err(DropReason::NoTailroom);
    }

    // Outer IP + UDP from the template.
    let ip_id = sa.next_ip_id();
    let df = match sa.tunnel.df {
        DfMode::Copy => info.dont_frag,
        DfMode::Set => true,
        DfMode::Clear => false,
    };
    let tunnel = sa.tunnel;
    let outer = pkt.prepend(outer_len).ok_or(DropReason::NoHeadroom)?;
    outer.copy_from_slice(sa.outer_template());
    // DSCP and ECN both copied: RFC 4301 §5.1.2.1 (DSCP) and RFC 6040 §4.1 normal mode (ECN).
    let tos = info.tos;
    match tunnel.local {
        IpAddr::V4(_) => {
            let mut ip = ipv4::Packet::new_unchecked(&mut outer[..ipv4::HEADER_LEN]);
            ip.set_tos(tos);
            ip.set_total_len(total as u16);
            ip.set_ident(ip_id);
            ip.set_unfragmented(df);
            ip.set_checksum(sa.outer_v4_checksum(tos, total as u16, ip_id, df));
            let mut u = udp::Packet::new_unchecked(&mut outer[ipv4::HEADER_LEN..]);
            u.set_len((udp::HEADER_LEN + esp_len) as u16);
        }
        IpAddr::V6(_) => {
            {
                let mut ip = ipv6::Packet::new_unchecked(&mut outer[..ipv6::HEADER_LEN]);
                ip.set_version_tc_flow(tos, 0);
                ip.set_payload_len((udp::HEADER_LEN + esp_len) as u16);
            }
            let data = pkt.data_mut();
            let mut u = udp::Packet::new_unchecked(&mut data[ipv6::HEADER_LEN..]);
            u.set_len((udp::HEADER_LEN + esp_len) as u16);
            u.fill_checksum(tunnel.local, tunnel.remote);
        }
    }
    sa.counters.packets += 1;
    sa.counters.bytes += info.len as u64;
    Ok(())
}

/// Encapsulates a burst with one SA: reserves the burst's sequence numbers at once (DPDK
/// `esn_outb_update_sqn` style) and writes one verdict per packet into `verdicts`. Packets for
/// which no number is left get `Drop(SeqCycled)`.
#[inline]
pub fn encapsulate_burst<P: PacketBuf>(
    sa: &mut OutboundSa,
    pkts: &mut [P],
    verdicts: &mut [Encap],
) {
    let n = pkts.len().min(verdicts.len());
    let r = sa.reserve(n as u32);
    for (i, (p, v)) in pkts[..n]
        .iter_mut()
        .zip(verdicts[..n].iter_mut())
        .enumerate()
    {
        *v = if (i as u32) < r.count {
            let seq = r.first + i as u64;
            encapsulate(sa, seq, &iv_from_seq(seq), p)
        } else {
            Encap::Drop(DropReason::SeqCycled)
        };
    }
}
