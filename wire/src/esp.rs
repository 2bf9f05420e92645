//! ESP headers and trailers (RFC 4303) as carried in UDP (RFC 3948), with the AES-GCM layout
//! of RFC 4106: an 8-byte explicit IV after the header and a 16-byte ICV at the end.
//!
//! ```text
//!  0                   1                   2                   3
//! +---------------------------------------------------------------+
//! |               Security Parameters Index (SPI)                 |
//! |                      Sequence Number (low 32)                 |
//! |                  IV (8 bytes, RFC 4106 §3.1)                  |
//! ~                   Payload (the inner IP packet)               ~
//! |     Padding 1,2,3…    |  Pad Length   |  Next Header          |
//! |                 ICV (16 bytes, RFC 4106 §6)                   |
//! +---------------------------------------------------------------+
//! ```

use crate::{be32, put32, Error, Result};

/// SPI + sequence number.
pub const HEADER_LEN: usize = 8;
/// AES-GCM explicit IV (RFC 4106 §3.1).
pub const IV_LEN: usize = 8;
/// Pad length + next header.
pub const TRAILER_LEN: usize = 2;
/// ICV length espada uses (RFC 4106 §6 allows 8, 12, 16).
pub const ICV_LEN: usize = 16;
/// The smallest ESP packet that can hold anything: header, IV, trailer, ICV.
pub const MIN_LEN: usize = HEADER_LEN + IV_LEN + TRAILER_LEN + ICV_LEN;
/// Ciphertext alignment required by RFC 4303 §2.4 (GCM is a stream mode: 4 bytes).
pub const ALIGN: usize = 4;
/// The well-known port for ESP-in-UDP and IKE with NAT traversal (RFC 3948 §2.1).
pub const UDP_ENCAP_PORT: u16 = 4500;

mod field {
    use core::ops::Range;
    pub const SPI: usize = 0;
    pub const SEQ: usize = 4;
    pub const IV: Range<usize> = 8..16;
    pub const PAYLOAD: usize = 16;
}

/// A view of an ESP packet with an 8-byte IV and a 16-byte ICV.
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
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// Ensures no accessor panics: header, IV and ICV are present. (An ESP packet too short to
    /// hold even the ICV is malformed; one whose ICV is merely wrong fails authentication later.)
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN + IV_LEN + ICV_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    /// Unwraps the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }
    /// SPI.
    #[inline]
    pub fn spi(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SPI)
    }
    /// Low 32 bits of the sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SEQ)
    }
    /// Explicit IV.
    #[inline]
    pub fn iv(&self) -> [u8; IV_LEN] {
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&self.buffer.as_ref()[field::IV]);
        iv
    }
    /// Ciphertext followed by the ICV.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
    /// Ciphertext length (payload without the ICV).
    #[inline]
    pub fn ciphertext_len(&self) -> usize {
        self.buffer.as_ref().len() - field::PAYLOAD - ICV_LEN
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the SPI.
    #[inline]
    pub fn set_spi(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::SPI, v)
    }
    /// Sets the low 32 bits of the sequence number.
    #[inline]
    pub fn set_seq(&mut self, v: u32) {
        put32(self.buffer.as_mut(), field::SEQ, v)
    }
    /// Sets the IV.
    #[inline]
    pub fn set_iv(&mut self, iv: &[u8; IV_LEN]) {
        self.buffer.as_mut()[field::IV].copy_from_slice(iv)
    }
    /// Ciphertext and ICV, mutable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// The ESP header fields (what `emit` writes before the ciphertext).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    /// SPI.
    pub spi: u32,
    /// Low 32 bits of the sequence number.
    pub seq: u32,
    /// Explicit IV.
    pub iv: [u8; IV_LEN],
}

impl Repr {
    /// Reads the header fields of a checked packet.
    #[inline]
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<Repr> {
        p.check_len()?;
        Ok(Repr {
            spi: p.spi(),
            seq: p.seq(),
            iv: p.iv(),
        })
    }
    /// Bytes `emit` writes: header and IV.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + IV_LEN
    }
    /// Writes SPI, sequence number and IV into the first 16 bytes of `buf`.
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) {
        put32(buf, field::SPI, self.spi);
        put32(buf, field::SEQ, self.seq);
        buf[field::IV].copy_from_slice(&self.iv);
    }
}

/// Padding needed after `payload_len` bytes so that payload + padding + trailer ends on a
/// 4-byte boundary (RFC 4303 §2.4). Always 0..=3.
#[inline(always)]
pub const fn pad_len(payload_len: usize) -> usize {
    (ALIGN - (payload_len + TRAILER_LEN) % ALIGN) % ALIGN
}

/// Bytes a tunnel-mode ESP packet adds to an inner packet of `inner_len` bytes, outer headers
/// of `outer_len` bytes included: ESP header, IV, padding, trailer and ICV.
#[inline(always)]
pub const fn overhead(outer_len: usize, inner_len: usize) -> usize {
    outer_len + HEADER_LEN + IV_LEN + pad_len(inner_len) + TRAILER_LEN + ICV_LEN
}

/// Writes the default padding 1, 2, 3, … then pad length and next header into `buf`, which
/// must be exactly `pad_len + 2` bytes long.
#[inline(always)]
pub fn emit_trailer(buf: &mut [u8], next_header: u8) {
    let pad = buf.len() - TRAILER_LEN;
    for (i, b) in buf[..pad].iter_mut().enumerate() {
        *b = (i + 1) as u8;
    }
    buf[pad] = pad as u8;
    buf[pad + 1] = next_header;
}

/// A decrypted trailer: where the payload ends and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Payload length (plaintext without padding and trailer).
    pub payload_len: usize,
    /// Pad length field.
    pub pad_len: u8,
    /// Next header field.
    pub next_header: u8,
}

/// Why a decrypted trailer is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailerError {
    /// Shorter than the trailer, or the pad length runs past the start.
    Malformed,
    /// Padding bytes are not 1, 2, 3, … (RFC 4303 §2.4: the receiver should check them).
    Padding,
}

/// Parses the trailer at the end of a decrypted ESP payload (`plaintext` = payload ‖ padding ‖
/// pad length ‖ next header) and checks the default padding contents.
#[inline(always)]
pub fn parse_trailer(plaintext: &[u8]) -> core::result::Result<Trailer, TrailerError> {
    let Some((body, &[pad_len, next_header])) = plaintext.split_last_chunk::<TRAILER_LEN>() else {
        return Err(TrailerError::Malformed);
    };
    let Some(payload_len) = body.len().checked_sub(pad_len as usize) else {
        return Err(TrailerError::Malformed);
    };
    // RFC 4303 §2.4: the default padding is 1, 2, 3, ...
    let pad = &body[payload_len..];
    if !pad.iter().zip(1..=255u8).all(|(&b, i)| b == i) {
        return Err(TrailerError::Padding);
    }
    Ok(Trailer {
        payload_len,
        pad_len,
        next_header,
    })
}

/// What a UDP/4500 payload is (RFC 3948 §2.2, §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpEncap {
    /// An ESP packet (the first four bytes are a non-zero SPI).
    Esp,
    /// Starts with the four-byte zero non-ESP marker: an IKE message for the control plane.
    Ike,
    /// The single byte 0xFF: a NAT-keepalive, to be dropped silently.
    Keepalive,
    /// Too short to be any of the above.
    Malformed,
}

/// Classifies a UDP-encapsulated payload without decrypting anything.
#[inline]
pub fn classify_udp_payload(payload: &[u8]) -> UdpEncap {
    match payload {
        [0xff] => UdpEncap::Keepalive,
        [0, 0, 0, 0, ..] => UdpEncap::Ike,
        p if p.len() >= HEADER_LEN => UdpEncap::Esp,
        _ => UdpEncap::Malformed,
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn overhead_counts_every_added_byte() {
        // IPv4 + UDP outside (28), 64 B inside: 8 ESP header, 8 IV, 2 padding, 2 trailer, 16 ICV.
        assert_eq!(overhead(28, 64), 28 + 8 + 8 + 2 + 2 + 16);
        for inner in 20..100 {
            let o = overhead(28, inner);
            // What follows the outer headers and the ESP header/IV ends 4-byte aligned.
            assert_eq!((inner + o - 28 - 8 - 8 - 16) % 4, 0, "{inner}");
        }
    }

    // From ../shared/vectors (negative/dummy-next-header-59): header, IV, ciphertext, ICV.
    static PACKET: [u8; 44] = [
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x0c, // SPI 0x1000, seq 12
        0x64, 0x24, 0x33, 0x08, 0x66, 0x6a, 0x1e, 0xa8, // IV
        0xc5, 0x9f, 0x5b, 0x51, 0x05, 0x88, 0x6c, 0xbc, 0xba, 0xdc, 0xfa,
        0xcd, // 12 B ciphertext
        0x0b, 0x9f, 0x21, 0x78, 0xa1, 0x25, 0x9c, 0xb4, 0xd3, 0xd7, 0x43, 0x4f, 0xd0, 0x14, 0x44,
        0x83, // ICV
    ];

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&PACKET[..]).unwrap();
        assert_eq!(p.spi(), 0x1000);
        assert_eq!(p.seq(), 12);
        assert_eq!(p.iv(), [0x64, 0x24, 0x33, 0x08, 0x66, 0x6a, 0x1e, 0xa8]);
        assert_eq!(p.ciphertext_len(), 12);
        assert_eq!(p.payload().len(), 28);
    }

    #[test]
    fn construct_emit_buffer_len() {
        let r = Repr::parse(&Packet::new_unchecked(&PACKET[..])).unwrap();
        assert_eq!(r.buffer_len(), 16);
        let mut b = PACKET;
        b[..16].fill(0);
        r.emit(&mut b);
        assert_eq!(b, PACKET);
        let mut b2 = PACKET;
        let mut p = Packet::new_unchecked(&mut b2[..]);
        p.set_spi(7);
        p.set_seq(9);
        p.set_iv(&[1; 8]);
        assert_eq!((p.spi(), p.seq(), p.iv()), (7, 9, [1; 8]));
    }

    #[test]
    fn check_len() {
        for n in 0..32 {
            assert_eq!(
                Packet::new_checked(&PACKET[..n]).unwrap_err(),
                Error::Truncated
            );
        }
        assert!(Packet::new_checked(&PACKET[..32]).is_ok());
    }

    #[test]
    fn padding_rule() {
        // payload + pad + 2 is a multiple of 4 and pad < 4 (RFC 4303 §2.4)
        for n in 0..64 {
            let p = pad_len(n);
            assert!(p < 4);
            assert_eq!((n + p + 2) % 4, 0);
        }
        assert_eq!(pad_len(69), 1); // the 69-byte vectors carry one pad byte
    }

    #[test]
    fn trailer_round_trip() {
        for n in 0..20usize {
            let p = pad_len(n);
            let mut b = vec![0xaa; n + p + 2];
            emit_trailer(&mut b[n..], 4);
            let t = parse_trailer(&b).unwrap();
            assert_eq!(t.payload_len, n);
            assert_eq!(t.pad_len as usize, p);
            assert_eq!(t.next_header, 4);
        }
    }

    #[test]
    fn trailer_errors() {
        assert_eq!(parse_trailer(&[4]), Err(TrailerError::Malformed));
        assert_eq!(parse_trailer(&[1, 2, 5, 4]), Err(TrailerError::Malformed));
        assert_eq!(parse_trailer(&[9, 1, 3, 2, 4]), Err(TrailerError::Padding));
        assert_eq!(parse_trailer(&[9, 1, 2, 2, 4]).unwrap().payload_len, 1);
        // The longest padding there is (255 bytes), right and with its last byte wrong.
        let mut b: Vec<u8> = (1..=255u8).collect();
        b.extend([255, 4]);
        assert_eq!(parse_trailer(&b).unwrap().payload_len, 0);
        b[254] = 0;
        assert_eq!(parse_trailer(&b), Err(TrailerError::Padding));
        b.insert(0, 7);
        b[255] = 255;
        assert_eq!(parse_trailer(&b).unwrap().payload_len, 1);
    }

    #[test]
    fn classify() {
        assert_eq!(classify_udp_payload(&[0xff]), UdpEncap::Keepalive);
        assert_eq!(classify_udp_payload(&[0, 0, 0, 0, 1]), UdpEncap::Ike);
        assert_eq!(classify_udp_payload(&PACKET), UdpEncap::Esp);
        assert_eq!(classify_udp_payload(&[]), UdpEncap::Malformed);
        assert_eq!(classify_udp_payload(&[0, 0, 1]), UdpEncap::Malformed);
        assert_eq!(classify_udp_payload(&[0xfe]), UdpEncap::Malformed);
    }
}
