//! ICMPv6 (RFC 4443) and the part of Neighbor Discovery (RFC 4861) a gateway needs on a link:
//! neighbor solicitations and advertisements with link-layer address options, and the
//! "packet too big" error (RFC 4443 §3.2) that path MTU discovery depends on.
//!
//! Parsing validates what RFC 4861 §7.1 asks of a received NS/NA (hop limit 255, code 0,
//! checksum, length, option lengths, target not multicast); emitting writes a whole IPv6
//! packet (header included) with its checksum.

use crate::ethernet::MacAddr;
use crate::{checksum, ip_proto, ipv6};
use core::net::Ipv6Addr;

/// Destination unreachable.
pub const DEST_UNREACHABLE: u8 = 1;
/// Packet too big.
pub const PACKET_TOO_BIG: u8 = 2;
/// Time exceeded.
pub const TIME_EXCEEDED: u8 = 3;
/// Parameter problem.
pub const PARAM_PROBLEM: u8 = 4;
/// Echo request.
pub const ECHO_REQUEST: u8 = 128;
/// Neighbor solicitation.
pub const NEIGHBOR_SOLICIT: u8 = 135;
/// Neighbor advertisement.
pub const NEIGHBOR_ADVERT: u8 = 136;

/// Option: source link-layer address.
const OPT_SLLA: u8 = 1;
/// Option: target link-layer address.
const OPT_TLLA: u8 = 2;

/// Bytes of an NS or NA with one link-layer address option (ICMPv6 part).
pub const NDP_LEN: usize = 24 + 8;
/// Bytes of a whole IPv6 + NS/NA packet as [`emit_ns`] and [`emit_na`] write it.
pub const NDP_PACKET_LEN: usize = ipv6::HEADER_LEN + NDP_LEN;
/// The IPv6 minimum MTU (RFC 8200 §5): an ICMPv6 error never makes a packet larger.
pub const MIN_MTU: usize = 1280;

/// The ICMPv6 checksum of `msg` (the whole ICMPv6 message, its checksum field included as
/// it is) between `src` and `dst`: zero when a received message verifies.
pub fn checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let s = checksum::combine(
        checksum::pseudo_v6(src, dst, ip_proto::ICMPV6, msg.len() as u32),
        checksum::sum(msg),
    );
    checksum::finish(s)
}

/// The solicited-node multicast address of `a` (RFC 4291 §2.7.1): ff02::1:ffXX:XXXX.
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet address of an IPv6 multicast address (RFC 2464 §7): 33:33 + its last 32 bits.
pub fn multicast_mac(a: Ipv6Addr) -> MacAddr {
    let o = a.octets();
    MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// A received neighbor discovery message, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ndp {
    /// Neighbor solicitation: who has `target`? `source_mac` is the asker's link-layer
    /// address option (absent in duplicate address detection, from `::`).
    Solicit {
        /// The address asked for.
        target: Ipv6Addr,
        /// Source link-layer address option.
        source_mac: Option<MacAddr>,
    },
    /// Neighbor advertisement: `target` is at `target_mac`.
    Advert {
        /// The address advertised.
        target: Ipv6Addr,
        /// Target link-layer address option.
        target_mac: Option<MacAddr>,
        /// S flag: an answer to a solicitation.
        solicited: bool,
        /// O flag: replaces an existing entry.
        override_: bool,
    },
}

/// Parses an NS or NA in `pkt` (a whole IPv6 packet) as RFC 4861 §7.1 validates it. `None`
/// when it is not one, or not a valid one (the caller counts it).
pub fn parse_ndp(pkt: &[u8]) -> Option<Ndp> {
    let ip = ipv6::Packet::new_checked(pkt).ok()?;
    if ip.version() != 6 || ip.next_header() != ip_proto::ICMPV6 || ip.hop_limit() != 255 {
        return None;
    }
    let msg = &pkt[ipv6::HEADER_LEN..ip.total_len()];
    if msg.len() < 24 || msg[1] != 0 || checksum(ip.src_addr(), ip.dst_addr(), msg) != 0 {
        return None;
    }
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).ok()?);
    if target.is_multicast() {
        return None;
    }
    // Options: type, length in units of 8 bytes (never 0), value.
    let mut lla = None;
    let mut opts = &msg[24..];
    while !opts.is_empty() {
        if opts.len() < 2 {
            return None;
        }
        let len = opts[1] as usize * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        let want = if msg[0] == NEIGHBOR_SOLICIT {
            OPT_SLLA
        } else {
            OPT_TLLA
        };
        if opts[0] == want && len == 8 {
            lla = Some(MacAddr([
                opts[2], opts[3], opts[4], opts[5], opts[6], opts[7],
            ]));
        }
        opts = &opts[len..];
    }
    match msg[0] {
        NEIGHBOR_SOLICIT => {
            // From the unspecified address (DAD) there is no source link-layer option.
            if ip.src_addr().is_unspecified() && lla.is_some() {
                return None;
            }
            Some(Ndp::Solicit {
                target,
                source_mac: lla,
            })
        }
        NEIGHBOR_ADVERT => {
            let flags = msg[4];
            let solicited = flags & 0x40 != 0;
            // A solicited advertisement to a multicast destination is invalid.
            if solicited && ip.dst_addr().is_multicast() {
                return None;
            }
            Some(Ndp::Advert {
                target,
                target_mac: lla,
                solicited,
                override_: flags & 0x20 != 0,
            })
        }
        _ => None,
    }
}

fn emit_ipv6(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, payload_len: usize, hop_limit: u8) {
    let mut ip = ipv6::Packet::new_unchecked(&mut buf[..ipv6::HEADER_LEN]);
    ip.set_version_tc_flow(0, 0);
    ip.set_payload_len(payload_len as u16);
    ip.set_next_header(ip_proto::ICMPV6);
    ip.set_hop_limit(hop_limit);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
}

fn fill_checksum(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr) {
    let msg = &mut buf[ipv6::HEADER_LEN..];
    msg[2] = 0;
    msg[3] = 0;
    let c = checksum(src, dst, msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
}

fn emit_nd(
    buf: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    flags: u8,
    target: Ipv6Addr,
    mac: MacAddr,
) {
    // A solicitation carries the sender's address, an advertisement the target's.
    let opt = if kind == NEIGHBOR_SOLICIT {
        OPT_SLLA
    } else {
        OPT_TLLA
    };
    let buf = &mut buf[..NDP_PACKET_LEN];
    emit_ipv6(buf, src, dst, NDP_LEN, 255);
    let m = &mut buf[ipv6::HEADER_LEN..];
    m.fill(0);
    m[0] = kind;
    m[4] = flags;
    m[8..24].copy_from_slice(&target.octets());
    m[24] = opt;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac.0);
    fill_checksum(buf, src, dst);
}

/// Writes IPv6 + a neighbor solicitation for `target` from `src` (at `our_mac`) to the
/// target's solicited-node address. `buf` is at least [`NDP_PACKET_LEN`] long.
pub fn emit_ns(buf: &mut [u8], src: Ipv6Addr, target: Ipv6Addr, our_mac: MacAddr) {
    let dst = solicited_node(target);
    emit_nd(buf, src, dst, NEIGHBOR_SOLICIT, 0, target, our_mac);
}

/// Writes IPv6 + a solicited neighbor advertisement (S and O set) of `target` at `our_mac`,
/// from `target` to `dst`. `buf` is at least [`NDP_PACKET_LEN`] long.
pub fn emit_na(buf: &mut [u8], target: Ipv6Addr, dst: Ipv6Addr, our_mac: MacAddr) {
    emit_nd(buf, target, dst, NEIGHBOR_ADVERT, 0x60, target, our_mac);
}

/// How many bytes of the offending packet a "packet too big" quotes: as much as fits in the
/// IPv6 minimum MTU (RFC 4443 §2.4 (c)).
pub const fn too_big_quote_len(offending_len: usize) -> usize {
    let room = MIN_MTU - ipv6::HEADER_LEN - 8;
    if offending_len < room {
        offending_len
    } else {
        room
    }
}

/// Bytes of a whole IPv6 + "packet too big" quoting `quote_len` bytes.
pub const fn too_big_len(quote_len: usize) -> usize {
    ipv6::HEADER_LEN + 8 + quote_len
}

/// Writes IPv6 + ICMPv6 "packet too big" (type 2) from `src` to `dst` with `mtu`, quoting
/// `quote`. `buf` is [`too_big_len`]`(quote.len())` long.
pub fn emit_packet_too_big(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, mtu: u32, quote: &[u8]) {
    let n = 8 + quote.len();
    emit_ipv6(buf, src, dst, n, 64);
    let m = &mut buf[ipv6::HEADER_LEN..ipv6::HEADER_LEN + n];
    m[0] = PACKET_TOO_BIG;
    m[1] = 0;
    m[4..8].copy_from_slice(&mtu.to_be_bytes());
    m[8..].copy_from_slice(quote);
    fill_checksum(&mut buf[..ipv6::HEADER_LEN + n], src, dst);
}

/// Whether an ICMPv6 message type is an error (never answered with another error, RFC 4443
/// §2.4 (e)).
pub fn is_error(msg_type: u8) -> bool {
    msg_type < 128
}

#[cfg(test)]
mod test {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn solicited_node_and_its_mac() {
        let t = a("fd00:100::2");
        assert_eq!(solicited_node(t), a("ff02::1:ff00:2"));
        assert_eq!(
            multicast_mac(solicited_node(t)).0,
            [0x33, 0x33, 0xff, 0, 0, 2]
        );
    }

    #[test]
    fn ns_and_na_round_trip() {
        let mut b = [0u8; NDP_PACKET_LEN];
        emit_ns(&mut b, a("fd00:100::1"), a("fd00:100::2"), MAC);
        assert_eq!(
            parse_ndp(&b),
            Some(Ndp::Solicit {
                target: a("fd00:100::2"),
                source_mac: Some(MAC)
            })
        );
        emit_na(&mut b, a("fd00:100::2"), a("fd00:100::1"), MAC);
        assert_eq!(
            parse_ndp(&b),
            Some(Ndp::Advert {
                target: a("fd00:100::2"),
                target_mac: Some(MAC),
                solicited: true,
                override_: true
            })
        );
    }

    #[test]
    fn invalid_ndp_is_refused() {
        let mut b = [0u8; NDP_PACKET_LEN];
        emit_ns(&mut b, a("fd00:100::1"), a("fd00:100::2"), MAC);
        // Hop limit other than 255: may come from off-link.
        let mut c = b;
        c[7] = 64;
        assert_eq!(parse_ndp(&c), None);
        // A flipped bit: the checksum fails.
        let mut c = b;
        c[50] ^= 1;
        assert_eq!(parse_ndp(&c), None);
        // An option of length 0 would loop forever.
        let mut c = b;
        c[ipv6::HEADER_LEN + 25] = 0;
        fill_checksum(&mut c, a("fd00:100::1"), solicited_node(a("fd00:100::2")));
        assert_eq!(parse_ndp(&c), None);
        // Truncated.
        assert_eq!(parse_ndp(&b[..50]), None);
        // Every prefix of the packet: no panic.
        for n in 0..b.len() {
            let _ = parse_ndp(&b[..n]);
        }
    }

    #[test]
    fn packet_too_big_verifies() {
        let quote = [0x60u8; 100];
        let mut b = vec![0u8; too_big_len(quote.len())];
        emit_packet_too_big(&mut b, a("fd00:1::1"), a("fd00:1::10"), 1400, &quote);
        assert_eq!(checksum(a("fd00:1::1"), a("fd00:1::10"), &b[40..]), 0);
        assert_eq!(b[40], PACKET_TOO_BIG);
        assert_eq!(u32::from_be_bytes([b[44], b[45], b[46], b[47]]), 1400);
        assert_eq!(too_big_quote_len(5000), 1280 - 48);
    }
}
