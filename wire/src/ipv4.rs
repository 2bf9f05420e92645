//! IPv4 headers (RFC 791). Options are skipped by the header length, never interpreted.

use crate::{be16, checksum, put16, Error, Result};
use std::net::Ipv4Addr;

mod field {
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: core::ops::Range<usize> = 12..16;
    pub const DST: core::ops::Range<usize> = 16..20;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;

/// A view of an IPv4 packet.
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

    /// Ensures no accessor panics: the buffer holds the fixed header, the header length is at
    /// least 20 and fits, and the total length covers the header and fits in the buffer.
    /// A buffer longer than the total length (Ethernet padding) is allowed.
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let hl = self.header_len() as usize;
        if hl < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len < hl {
            return Err(Error::Truncated);
        }
        let tl = self.total_len() as usize;
        if tl < hl {
            return Err(Error::Malformed);
        }
        if len < tl {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Unwraps the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version field.
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }
    /// Header length in bytes (IHL × 4).
    #[inline]
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }
    /// DSCP (upper six bits of the former TOS byte).
    #[inline]
    pub fn dscp(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] >> 2
    }
    /// ECN (lower two bits).
    #[inline]
    pub fn ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] & 3
    }
    /// The whole TOS / traffic-class byte.
    #[inline]
    pub fn tos(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }
    /// Total length.
    #[inline]
    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }
    /// Identification.
    #[inline]
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }
    /// Don't-fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }
    /// More-fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }
    /// Fragment offset in bytes.
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), field::FLG_OFF) & 0x1fff) << 3
    }
    /// Whether this is a fragment (offset non-zero or more fragments follow).
    #[inline]
    pub fn is_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & (FLAG_MF | 0x1fff) != 0
    }
    /// Time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }
    /// Protocol.
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }
    /// Header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// Source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    /// Destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }
    /// Whether the header checksum verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        let b = self.buffer.as_ref();
        let hl = self.header_len() as usize;
        // The usual header, without options: five words, no loop.
        if hl == HEADER_LEN {
            if let Some(h) = b.first_chunk::<HEADER_LEN>() {
                return checksum::verify_header20(h);
            }
        }
        verify_checksum_slow(&b[..hl])
    }
    /// The payload (after options, up to the total length).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let hl = self.header_len() as usize;
        let tl = self.total_len() as usize;
        &self.buffer.as_ref()[hl..tl]
    }
}

/// A header with options: the checksum over all of it (out of line: rare).
#[inline(never)]
fn verify_checksum_slow(header: &[u8]) -> bool {
    checksum::checksum(header) == 0
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 4 and the header length in bytes (a multiple of 4, 20..=60).
    #[inline]
    pub fn set_version_and_header_len(&mut self, header_len: u8) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | (header_len / 4);
    }
    /// Sets the whole TOS byte (DSCP and ECN).
    #[inline]
    pub fn set_tos(&mut self, tos: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = tos;
    }
    /// Sets the ECN bits, keeping DSCP.
    #[inline]
    pub fn set_ecn(&mut self, ecn: u8) {
        let b = &mut self.buffer.as_mut()[field::DSCP_ECN];
        *b = (*b & !3) | (ecn & 3);
    }
    /// Sets the fragment offset (bytes, a multiple of 8) and the MF flag, clearing DF.
    #[inline]
    pub fn set_fragment(&mut self, offset: usize, more: bool) {
        let v = ((offset / 8) as u16 & 0x1fff) | if more { FLAG_MF } else { 0 };
        put16(self.buffer.as_mut(), field::FLG_OFF, v)
    }
    /// Sets the total length.
    #[inline]
    pub fn set_total_len(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, v)
    }
    /// Sets the identification.
    #[inline]
    pub fn set_ident(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::IDENT, v)
    }
    /// Sets flags and fragment offset to "not a fragment", with DF as given.
    #[inline]
    pub fn set_unfragmented(&mut self, dont_frag: bool) {
        put16(
            self.buffer.as_mut(),
            field::FLG_OFF,
            if dont_frag { FLAG_DF } else { 0 },
        )
    }
    /// Sets the TTL.
    #[inline]
    pub fn set_ttl(&mut self, v: u8) {
        self.buffer.as_mut()[field::TTL] = v
    }
    /// Sets the protocol.
    #[inline]
    pub fn set_protocol(&mut self, v: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = v
    }
    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, v: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, v)
    }
    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets())
    }
    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets())
    }
    /// Recomputes the header checksum.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len() as usize;
        let c = checksum::checksum(&self.buffer.as_ref()[..hl]);
        self.set_checksum(c);
    }
    /// Sets the ECN field (the two low bits of the TOS byte) and patches the checksum
    /// incrementally (RFC 1624).
    #[inline]
    pub fn update_ecn(&mut self, ecn: u8) {
        let b = self.buffer.as_mut();
        let old = be16(b, 0);
        b[1] = (b[1] & !3) | (ecn & 3);
        let new = be16(b, 0);
        let hc = be16(b, field::CHECKSUM);
        let sum = (!hc as u32) + (!old as u32) + new as u32;
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = (sum & 0xffff) + (sum >> 16);
        put16(b, field::CHECKSUM, !(sum as u16));
    }
    /// Decrements the TTL and patches the checksum incrementally (RFC 1624).
    /// The caller checks `ttl() > 1` first.
    #[inline(always)]
    pub fn decrement_ttl(&mut self) {
        let b = self.buffer.as_mut();
        let old = be16(b, field::TTL);
        b[field::TTL] = b[field::TTL].wrapping_sub(1);
        let new = be16(b, field::TTL);
        // HC' = ~(~HC + ~m + m')
        let hc = be16(b, field::CHECKSUM);
        let sum = (!hc as u32) + (!old as u32) + new as u32;
        let c = checksum::finish(checksum::combine(sum, 0));
        put16(b, field::CHECKSUM, c);
    }
    /// The payload, mutable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len() as usize;
        let tl = self.total_len() as usize;
        &mut self.buffer.as_mut()[hl..tl]
    }
}

/// A validated IPv4 header (options dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// Source.
    pub src: Ipv4Addr,
    /// Destination.
    pub dst: Ipv4Addr,
    /// Protocol of the payload.
    pub protocol: u8,
    /// Payload length in bytes.
    pub payload_len: usize,
    /// TTL.
    pub ttl: u8,
    /// TOS byte (DSCP << 2 | ECN).
    pub tos: u8,
    /// Identification.
    pub ident: u16,
    /// Don't fragment.
    pub dont_frag: bool,
}

impl Repr {
    /// Parses: version 4, lengths consistent, checksum valid, not a fragment.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        p.check_len()?;
        if p.version() != 4 {
            return Err(Error::Malformed);
        }
        if !p.verify_checksum() {
            return Err(Error::Checksum);
        }
        if p.is_fragment() {
            return Err(Error::Unsupported);
        }
        Ok(Repr {
            src: p.src_addr(),
            dst: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: p.total_len() as usize - p.header_len() as usize,
            ttl: p.ttl(),
            tos: p.tos(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
        })
    }

    /// Bytes `emit` writes (header only, no options).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes a 20-byte header with a valid checksum.
    #[inline]
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) {
        p.set_version_and_header_len(HEADER_LEN as u8);
        p.set_tos(self.tos);
        p.set_total_len((HEADER_LEN + self.payload_len) as u16);
        p.set_ident(self.ident);
        p.set_unfragmented(self.dont_frag);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src);
        p.set_dst_addr(self.dst);
        p.fill_checksum();
    }
}

#[cfg(test)]
mod test {
    use super::*;

    // 192.168.0.1 → 192.168.0.199, UDP, 0x73 bytes total; a real capture's header.
    static HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn packet() -> Vec<u8> {
        let mut v = HEADER.to_vec();
        v.resize(0x73, 0xab);
        v
    }

    fn repr() -> Repr {
        Repr {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: 17,
            payload_len: 0x73 - 20,
            ttl: 64,
            tos: 0,
            ident: 0,
            dont_frag: true,
        }
    }

    #[test]
    fn deconstruct() {
        let b = packet();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 0x73);
        assert!(p.dont_frag());
        assert!(!p.is_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.checksum(), 0xb861);
        assert!(p.verify_checksum());
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 0, 199));
        assert_eq!(p.payload().len(), 0x73 - 20);
    }

    #[test]
    fn construct() {
        let mut b = [0u8; 0x73];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_version_and_header_len(20);
        p.set_tos(0);
        p.set_total_len(0x73);
        p.set_ident(0);
        p.set_unfragmented(true);
        p.set_ttl(64);
        p.set_protocol(17);
        p.set_src_addr(Ipv4Addr::new(192, 168, 0, 1));
        p.set_dst_addr(Ipv4Addr::new(192, 168, 0, 199));
        p.fill_checksum();
        assert_eq!(&b[..20], &HEADER[..]);
    }

    #[test]
    fn check_len() {
        let b = packet();
        for n in 0..20 {
            assert_eq!(Packet::new_checked(&b[..n]).unwrap_err(), Error::Truncated);
        }
        // total length beyond the buffer
        assert_eq!(
            Packet::new_checked(&b[..0x72]).unwrap_err(),
            Error::Truncated
        );
        // IHL below 5
        let mut bad = packet();
        bad[0] = 0x44;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        // total length below header length
        let mut bad = packet();
        bad[3] = 10;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        // IHL larger than the buffer
        let mut bad = HEADER.to_vec();
        bad[0] = 0x4f;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn options_are_skipped() {
        // IHL 6: four option bytes (NOPs) before the payload.
        let mut b = vec![
            0x46, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 1, 1, 1, 1, 0xde,
            0xad, 0xbe, 0xef,
        ];
        Packet::new_unchecked(&mut b[..]).fill_checksum();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.payload(), &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(Repr::parse(&p).unwrap().payload_len, 4);
    }

    #[test]
    fn parse() {
        let b = packet();
        assert_eq!(Repr::parse(&Packet::new_unchecked(&b[..])).unwrap(), repr());
        let mut bad = packet();
        bad[11] ^= 1;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&bad[..])),
            Err(Error::Checksum)
        );
        let mut v6 = packet();
        v6[0] = 0x65;
        assert_eq!(
            Repr::parse(&Packet::new_unchecked(&v6[..])),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn emit_and_buffer_len() {
        let r = repr();
        assert_eq!(r.buffer_len(), 20);
        let mut b = [0u8; 0x73];
        r.emit(&mut Packet::new_unchecked(&mut b[..]));
        assert_eq!(&b[..20], &HEADER[..]);
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut b = packet();
        for _ in 0..63 {
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.decrement_ttl();
            assert!(p.verify_checksum());
        }
        assert_eq!(Packet::new_unchecked(&b[..]).ttl(), 1);
    }

    #[test]
    fn ecn_update_keeps_checksum_valid() {
        let mut b = packet();
        for ecn in [3, 1, 2, 0, 3] {
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.update_ecn(ecn);
            assert_eq!(p.tos() & 3, ecn);
            assert!(p.verify_checksum());
        }
    }

    proptest::proptest! {
        #[test]
        fn no_panic_after_check_len(data in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.tos(), p.frag_offset(), p.payload().len(), p.verify_checksum());
                let _ = Repr::parse(&p);
            }
        }
    }
}
