//! UDP (RFC 768), with the IPv4 and IPv6 pseudo-header checksums.

use crate::{be16, checksum, put16, Error, Result};
use std::net::IpAddr;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;

/// A view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps without checking.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }
    /// Wraps and checks lengths.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// Ensures no accessor panics: header present, length field ≥ 8 and within the buffer.
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let l = self.len() as usize;
        if l < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if l > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }
    /// Unwraps the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }
    /// Source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }
    /// Destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }
    /// Length field (header + payload).
    #[inline]
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }
    /// Whether the length field says there is no payload.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() as usize == HEADER_LEN
    }
    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// Payload up to the length field.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.len() as usize]
    }
    /// Verifies the checksum against the pseudo-header. Over IPv4 a zero checksum means
    /// "not computed" and verifies (RFC 768; RFC 3948 §2.1 says receivers must not require it);
    /// over IPv6 zero is invalid (RFC 8200 §8.1).
    #[inline]
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        let c = self.checksum();
        let data = &self.buffer.as_ref()[..self.len() as usize];
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                c == 0
                    || checksum::finish(checksum::combine(
                        checksum::pseudo_v4(s, d, crate::ip_proto::UDP, data.len() as u16),
                        checksum::sum(data),
                    )) == 0
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                c != 0
                    && checksum::finish(checksum::combine(
                        checksum::pseudo_v6(s, d, crate::ip_proto::UDP, data.len() as u32),
                        checksum::sum(data),
                    )) == 0
            }
            _ => false,
        }
    }
}

/// The checksum of a whole UDP datagram (header with a zero checksum field + payload) for the
/// given addresses; zero results are sent as 0xffff (RFC 768).
#[inline]
pub fn compute_checksum(datagram: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            checksum::pseudo_v4(s, d, crate::ip_proto::UDP, datagram.len() as u16)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            checksum::pseudo_v6(s, d, crate::ip_proto::UDP, datagram.len() as u32)
        }
        _ => 0,
    };
    match checksum::finish(checksum::combine(pseudo, checksum::sum(datagram))) {
        0 => 0xffff,
        c => c,
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source port.
    #[inline]
    pub fn set_src_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, v)
    }
    /// Sets the destination port.
    #[inline]
    pub fn set_dst_port(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, v)
    }
    /// Sets the length field.
    #[inline]
    pub fn set_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, v)
    }
    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, v)
    }
    /// Computes and writes the checksum over header and payload (up to the length field).
    #[inline]
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        self.set_checksum(0);
        let l = self.len() as usize;
        let c = compute_checksum(&self.buffer.as_ref()[..l], src, dst);
        self.set_checksum(c);
    }
    /// Payload, mutable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let l = self.len() as usize;
        &mut self.buffer.as_mut()[HEADER_LEN..l]
    }
}

/// A validated UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload length.
    pub payload_len: usize,
}

impl Repr {
    /// Parses and verifies the checksum against the addresses.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>, src: IpAddr, dst: IpAddr) -> Result<Repr> {
        p.check_len()?;
        if !p.verify_checksum(src, dst) {
            return Err(Error::Checksum);
        }
        Ok(Repr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            payload_len: p.len() as usize - HEADER_LEN,
        })
    }
    /// Bytes `emit` writes (header only).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }
    /// Writes the header; the payload must already be in place when `checksum` is true.
    #[inline]
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        p: &mut Packet<T>,
        src: IpAddr,
        dst: IpAddr,
        checksum: bool,
    ) {
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len((HEADER_LEN + self.payload_len) as u16);
        if checksum {
            p.fill_checksum(src, dst);
        } else {
            p.set_checksum(0);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SRC4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1));
    const DST4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2));

    // 192.168.1.1:53 → 192.168.1.2:12345, payload "hi!!"; checksum computed independently
    // (python: sum of pseudo-header and datagram words, folded, inverted).
    static PACKET: [u8; 12] = [
        0x00, 0x35, 0x30, 0x39, 0x00, 0x0c, 0xc2, 0x89, b'h', b'i', b'!', b'!',
    ];

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&PACKET[..]).unwrap();
        assert_eq!(p.src_port(), 53);
        assert_eq!(p.dst_port(), 12345);
        assert_eq!(p.len(), 12);
        assert_eq!(p.payload(), b"hi!!");
        assert!(p.verify_checksum(SRC4, DST4));
    }

    #[test]
    fn construct_emit() {
        let mut b = [0u8; 12];
        b[8..].copy_from_slice(b"hi!!");
        let r = Repr {
            src_port: 53,
            dst_port: 12345,
            payload_len: 4,
        };
        assert_eq!(r.buffer_len(), 8);
        r.emit(&mut Packet::new_unchecked(&mut b[..]), SRC4, DST4, true);
        assert_eq!(b, PACKET);
    }

    #[test]
    fn parse() {
        let r = Repr::parse(&Packet::new_unchecked(&PACKET[..]), SRC4, DST4).unwrap();
        assert_eq!(
            r,
            Repr {
                src_port: 53,
                dst_port: 12345,
                payload_len: 4
            }
        );
        let mut bad = PACKET;
        bad[9] ^= 1;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&bad[..]), SRC4, DST4),
            Err(Error::Checksum)
        );
        // zero checksum over IPv4 is "not computed": accepted
        let mut zero = PACKET;
        zero[6] = 0;
        zero[7] = 0;
        assert!(Repr::parse(&Packet::new_unchecked(&zero[..]), SRC4, DST4).is_ok());
    }

    #[test]
    fn ipv6_checksum_required() {
        let s: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let d: IpAddr = IpAddr::V6("2001:db8::2".parse().unwrap());
        let mut b = [0u8; 12];
        b[8..].copy_from_slice(b"abcd");
        let r = Repr {
            src_port: 4500,
            dst_port: 4500,
            payload_len: 4,
        };
        r.emit(&mut Packet::new_unchecked(&mut b[..]), s, d, true);
        assert!(Packet::new_unchecked(&b[..]).verify_checksum(s, d));
        b[6] = 0;
        b[7] = 0;
        assert!(!Packet::new_unchecked(&b[..]).verify_checksum(s, d));
    }

    #[test]
    fn check_len() {
        for n in 0..12 {
            assert_eq!(
                Packet::new_checked(&PACKET[..n]).unwrap_err(),
                Error::Truncated
            );
        }
        let mut bad = PACKET;
        bad[5] = 7;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
    }
}

/// The IP header of a packet [`build_packet`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpHeader {
    /// IPv4 (protocol and payload length are filled in).
    V4(crate::ipv4::Repr),
    /// IPv6 (next header and payload length are filled in).
    V6(crate::ipv6::Repr),
}

/// Builds a whole IPv4/IPv6 + UDP packet with valid checksums around `payload`. For tools and
/// tests (it allocates): the packet path never builds packets this way.
pub fn build_packet(ip: IpHeader, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let ip_len = match ip {
        IpHeader::V4(_) => crate::ipv4::HEADER_LEN,
        IpHeader::V6(_) => crate::ipv6::HEADER_LEN,
    };
    let mut b = vec![0u8; ip_len + HEADER_LEN + payload.len()];
    let (src, dst) = match ip {
        IpHeader::V4(mut r) => {
            r.protocol = crate::ip_proto::UDP;
            r.payload_len = HEADER_LEN + payload.len();
            r.emit(&mut crate::ipv4::Packet::new_unchecked(&mut b[..]));
            (IpAddr::V4(r.src), IpAddr::V4(r.dst))
        }
        IpHeader::V6(mut r) => {
            r.next_header = crate::ip_proto::UDP;
            r.payload_len = HEADER_LEN + payload.len();
            r.emit(&mut crate::ipv6::Packet::new_unchecked(&mut b[..]));
            (IpAddr::V6(r.src), IpAddr::V6(r.dst))
        }
    };
    b[ip_len + HEADER_LEN..].copy_from_slice(payload);
    let u = Repr {
        src_port,
        dst_port,
        payload_len: payload.len(),
    };
    u.emit(&mut Packet::new_unchecked(&mut b[ip_len..]), src, dst, true);
    b
}

#[cfg(test)]
mod build_test {
    use super::*;

    #[test]
    fn built_packets_parse_and_verify() {
        let v4 = crate::ipv4::Repr {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            protocol: 0,
            payload_len: 0,
            ttl: 64,
            tos: 0xb8,
            ident: 1,
            dont_frag: true,
        };
        let b = build_packet(IpHeader::V4(v4), 1, 2, b"abc");
        let ip = crate::ipv4::Packet::new_checked(&b[..]).unwrap();
        let r = crate::ipv4::Repr::parse(&ip).unwrap();
        assert_eq!((r.protocol, r.payload_len, r.tos), (17, 11, 0xb8));
        let u = Packet::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(IpAddr::V4(r.src), IpAddr::V4(r.dst)));
        assert_eq!(u.payload(), b"abc");
        let v6 = crate::ipv6::Repr {
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            next_header: 0,
            payload_len: 0,
            hop_limit: 9,
            traffic_class: 0,
            flow_label: 5,
        };
        let b = build_packet(IpHeader::V6(v6), 3, 4, &[]);
        let ip = crate::ipv6::Packet::new_checked(&b[..]).unwrap();
        assert_eq!((ip.next_header(), ip.payload_len()), (17, 8));
        assert!(Packet::new_checked(ip.payload())
            .unwrap()
            .verify_checksum(IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr())));
    }
}
