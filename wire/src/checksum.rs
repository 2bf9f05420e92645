//! The Internet checksum (RFC 1071) and the UDP pseudo-headers (RFC 768, RFC 8200 §8.1).

use std::net::{Ipv4Addr, Ipv6Addr};

/// One's-complement sum of `data` as big-endian 16-bit words (odd length padded with zero),
/// not folded, not inverted. Add partial sums with `combine`.
#[inline]
pub fn sum(data: &[u8]) -> u32 {
    // Sum 32-bit words into a u64 accumulator: fewer carries, and the compiler vectorises it.
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u16::from_be_bytes([rest[i], rest[i + 1]]) as u64;
        i += 2;
    }
    if i < rest.len() {
        acc += (rest[i] as u64) << 8;
    }
    // Fold 64 → 32 bits keeping the one's-complement carries.
    let folded = (acc & 0xffff_ffff) + (acc >> 32);
    let folded = (folded & 0xffff_ffff) + (folded >> 32);
    fold_to_u16_sum(folded as u32)
}

/// Folds a 32-bit one's-complement sum to 16 bits. Two folds always suffice (the first leaves
/// at most 0x1fffe), so there is no loop and no branch.
#[inline(always)]
fn fold_to_u16_sum(s: u32) -> u32 {
    let s = (s & 0xffff) + (s >> 16);
    (s & 0xffff) + (s >> 16)
}

/// Adds two partial sums.
#[inline(always)]
pub fn combine(a: u32, b: u32) -> u32 {
    fold_to_u16_sum(a + b)
}

/// Folds and inverts a partial sum into the value that goes into a checksum field.
#[inline(always)]
pub fn finish(s: u32) -> u16 {
    !(fold_to_u16_sum(s) as u16)
}

/// The checksum of `data` (what an IPv4 header checksum field holds when computed over a header
/// whose checksum field is zero). Verifying: `checksum(header) == 0`.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data))
}

/// Whether a 20-byte IPv4 header (no options) carries a correct checksum: the header's
/// one's-complement sum is 0xffff. The sum does not depend on byte order (RFC 1071 §2(B)), so
/// the five 32-bit words are added as the CPU loads them, with no swapping and no loop.
#[inline(always)]
pub fn verify_header20(h: &[u8; 20]) -> bool {
    let w = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]) as u64;
    let acc = w(0) + w(4) + w(8) + w(12) + w(16);
    let folded = (acc & 0xffff_ffff) + (acc >> 32);
    let folded = (folded & 0xffff_ffff) + (folded >> 32);
    fold_to_u16_sum(folded as u32) == 0xffff
}

/// Partial sum of the IPv4 pseudo-header (RFC 768).
#[inline]
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: u16) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    let mut acc = u16::from_be_bytes([s[0], s[1]]) as u32
        + u16::from_be_bytes([s[2], s[3]]) as u32
        + u16::from_be_bytes([d[0], d[1]]) as u32
        + u16::from_be_bytes([d[2], d[3]]) as u32;
    acc += proto as u32 + len as u32;
    fold_to_u16_sum(acc)
}

/// Partial sum of the IPv6 pseudo-header (RFC 8200 §8.1).
#[inline]
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> u32 {
    let mut acc = sum(&src.octets()) + sum(&dst.octets());
    acc += (len >> 16) + (len & 0xffff) + next_header as u32;
    fold_to_u16_sum(acc)
}

/// Completes a TCP or UDP checksum the sender left partial in an Ethernet frame (IPv4, or
/// IPv6 without extension headers): with checksum offload on a virtual link the field holds only
/// the pseudo-header sum and the kernel hands the frame over as it is (AF_PACKET's
/// `TP_STATUS_CSUMNOTREADY`). The sum over the whole segment with that field in place,
/// inverted, is the checksum. Returns false (frame untouched) for anything else or a frame too
/// short for what its headers say.
pub fn complete_partial(frame: &mut [u8]) -> bool {
    let (l4, proto, len) = match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            let Some(&vihl) = frame.get(14) else {
                return false;
            };
            let ihl = ((vihl & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
            match (frame.get(23), total.checked_sub(ihl)) {
                (Some(&p), Some(len)) if ihl >= 20 => (14 + ihl, p, len),
                _ => return false,
            }
        }
        Some([0x86, 0xdd]) if frame.len() >= 54 => (
            54,
            frame[20],
            u16::from_be_bytes([frame[18], frame[19]]) as usize,
        ),
        _ => return false,
    };
    let field = match proto {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    let Some(seg) = frame.get_mut(l4..l4 + len) else {
        return false;
    };
    if seg.len() < field + 2 {
        return false;
    }
    let c = finish(sum(seg));
    // UDP: a computed 0 is sent as 0xffff (0 means "no checksum", RFC 768).
    let c = if proto == 17 && c == 0 { 0xffff } else { c };
    seg[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod test {
    use super::*;

    /// Straightforward RFC 1071 reference: 16-bit words, fold at the end.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            acc += w as u64;
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example bytes: 00 01 f2 03 f4 f5 f6 f7 → sum 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A real IPv4 header with a valid checksum verifies to zero.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0);
    }

    proptest::proptest! {
        /// Two folds give what folding until it fits gives, for every 32-bit sum.
        #[test]
        fn two_folds_are_enough(s in proptest::num::u32::ANY) {
            let mut r = s;
            while r > 0xffff {
                r = (r & 0xffff) + (r >> 16);
            }
            proptest::prop_assert_eq!(fold_to_u16_sum(s), r);
        }

        #[test]
        fn matches_reference(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
            proptest::prop_assert_eq!(checksum(&data), reference(&data));
        }

        /// The five-word check of a 20-byte header says what the RFC 1071 reference says,
        /// for random headers and for the same headers with their checksum filled in.
        #[test]
        fn header20_matches_reference(mut h in proptest::array::uniform20(proptest::num::u8::ANY)) {
            proptest::prop_assert_eq!(verify_header20(&h), reference(&h) == 0);
            h[10] = 0;
            h[11] = 0;
            let c = checksum(&h).to_be_bytes();
            h[10] = c[0];
            h[11] = c[1];
            proptest::prop_assert!(verify_header20(&h));
            h[3] ^= 1;
            proptest::prop_assert!(!verify_header20(&h));
        }

        #[test]
        fn split_sums_combine(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600), cut in 0usize..300) {
            let cut = (cut.min(data.len())) & !1; // combining needs an even split point
            let whole = checksum(&data);
            let parts = finish(combine(sum(&data[..cut]), sum(&data[cut..])));
            proptest::prop_assert_eq!(whole, parts);
        }
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        // IPv4/UDP as a sender with checksum offload leaves it: the field holds the
        // pseudo-header sum (not inverted); completing it gives the checksum computed whole.
        let src = Ipv4Addr::new(10, 1, 0, 10);
        let dst = Ipv4Addr::new(10, 2, 0, 10);
        let payload = b"hello, espada!!";
        let udp_len = 8 + payload.len();
        let mut f = vec![0u8; 14 + 20 + udp_len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        f[23] = 17;
        f[26..30].copy_from_slice(&src.octets());
        f[30..34].copy_from_slice(&dst.octets());
        f[34..36].copy_from_slice(&4000u16.to_be_bytes());
        f[36..38].copy_from_slice(&5400u16.to_be_bytes());
        f[38..40].copy_from_slice(&(udp_len as u16).to_be_bytes());
        f[42..].copy_from_slice(payload);
        let pseudo = pseudo_v4(src, dst, 17, udp_len as u16);
        let whole = finish(combine(pseudo, sum(&f[34..])));
        let partial = fold_to_u16_sum(pseudo) as u16;
        f[40..42].copy_from_slice(&partial.to_be_bytes());
        assert!(complete_partial(&mut f));
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), whole);
        // Verifies as a receiver would: pseudo-header + segment sums to 0xffff.
        assert_eq!(finish(combine(pseudo, sum(&f[34..]))), 0);
        // Not TCP/UDP, truncated, or not IP: untouched.
        let mut icmp = f.clone();
        icmp[23] = 1;
        assert!(!complete_partial(&mut icmp));
        assert!(!complete_partial(&mut f[..30]));
        let mut short = f.clone();
        short[16..18].copy_from_slice(&2000u16.to_be_bytes());
        assert!(!complete_partial(&mut short));
        assert!(!complete_partial(&mut [0u8; 10]));
    }
}
