//! ICMPv4 (RFC 792): the two errors a gateway sends, "fragmentation needed" (type 3 code 4,
//! with the next-hop MTU of RFC 1191) and "time exceeded" (type 11 code 0).

use crate::{be16, checksum, ipv4, put16, Error, Result};
use std::net::Ipv4Addr;

/// ICMP header length.
pub const HEADER_LEN: usize = 8;

/// A view of an ICMPv4 message.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps without checking.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }
    /// Wraps and checks the length.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// Ensures no accessor panics.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    /// Type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    /// Code.
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), 2)
    }
    /// Next-hop MTU of a "fragmentation needed" message (RFC 1191).
    pub fn next_hop_mtu(&self) -> u16 {
        be16(self.buffer.as_ref(), 6)
    }
    /// Whether the checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(self.buffer.as_ref()) == 0
    }
    /// The data after the header (the quoted packet for errors).
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

/// Bytes of a whole IPv4 + ICMP "fragmentation needed" packet quoting `quote_len` bytes.
pub const fn frag_needed_len(quote_len: usize) -> usize {
    ipv4::HEADER_LEN + HEADER_LEN + quote_len
}

/// Writes IPv4 + ICMP type 3 code 4 from `src` to `dst` with `mtu`, quoting `quote` (the
/// offending packet's IP header and first 8 payload bytes). `buf` is `frag_needed_len` long.
pub fn emit_frag_needed(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, mtu: u16, quote: &[u8]) {
    emit_error(buf, src, dst, 3, 4, mtu as u32, quote)
}

/// Writes IPv4 + ICMP time exceeded (type 11 code 0).
pub fn emit_time_exceeded(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, quote: &[u8]) {
    emit_error(buf, src, dst, 11, 0, 0, quote)
}

fn emit_error(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    t: u8,
    code: u8,
    rest: u32,
    quote: &[u8],
) {
    let icmp_len = HEADER_LEN + quote.len();
    let r = ipv4::Repr {
        src,
        dst,
        protocol: crate::ip_proto::ICMP,
        payload_len: icmp_len,
        ttl: 64,
        tos: 0xc0,
        ident: 0,
        dont_frag: false,
    };
    r.emit(&mut ipv4::Packet::new_unchecked(
        &mut buf[..ipv4::HEADER_LEN],
    ));
    let m = &mut buf[ipv4::HEADER_LEN..ipv4::HEADER_LEN + icmp_len];
    m[0] = t;
    m[1] = code;
    put16(m, 2, 0);
    m[4..8].copy_from_slice(&rest.to_be_bytes());
    m[HEADER_LEN..].copy_from_slice(quote);
    let c = checksum::checksum(m);
    put16(m, 2, c);
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn frag_needed_round_trip() {
        let quote = [
            0x45u8, 0, 5, 0xdc, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 10, 10, 2, 0, 10, 1, 2, 3,
            4, 5, 6, 7, 8,
        ];
        let mut b = vec![0u8; frag_needed_len(quote.len())];
        emit_frag_needed(
            &mut b,
            "10.1.0.1".parse().unwrap(),
            "10.1.0.10".parse().unwrap(),
            1418,
            &quote,
        );
        let ip = ipv4::Packet::new_checked(&b[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.protocol(), 1);
        let m = Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((m.msg_type(), m.code(), m.next_hop_mtu()), (3, 4, 1418));
        assert!(m.verify_checksum());
        assert_eq!(m.data(), &quote[..]);
        let mut t = vec![0u8; frag_needed_len(quote.len())];
        emit_time_exceeded(
            &mut t,
            "10.1.0.1".parse().unwrap(),
            "10.1.0.10".parse().unwrap(),
            &quote,
        );
        let m = ipv4::Packet::new_checked(&t[..]).unwrap();
        assert_eq!(Packet::new_checked(m.payload()).unwrap().msg_type(), 11);
    }

    #[test]
    fn check_len() {
        assert_eq!(
            Packet::new_checked(&[0u8; 7][..]).unwrap_err(),
            Error::Truncated
        );
    }
}
