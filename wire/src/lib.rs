//! espada-wire: checked, zero-copy views over packet bytes.
//!
//! Every header follows the same contract (after smoltcp's `wire` module):
//!
//! * `Packet::new_unchecked(buffer)` wraps bytes without looking at them;
//! * `Packet::new_checked(buffer)` = `new_unchecked` + `check_len`;
//! * **after `check_len` has returned `Ok`, no accessor panics**, whatever the bytes are.
//!   Accessors of a packet that was not checked may panic on short buffers;
//! * a `Repr` is the validated, high-level form: `Repr::parse(&packet)` checks the semantics
//!   (version, lengths, checksums where the protocol has one), `repr.emit(&mut packet)` writes it,
//!   and `repr.buffer_len()` says how many bytes `emit` needs.
//!
//! Nothing here allocates, and nothing uses `unsafe`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod arp;
pub mod checksum;
pub mod esp;
pub mod ethernet;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod udp;

use core::fmt;

/// Why bytes could not be viewed or parsed as a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer is shorter than the header, or than a length field says.
    Truncated,
    /// A field holds a value the protocol does not allow (version, header length, ...).
    Malformed,
    /// A checksum does not verify.
    Checksum,
    /// A valid packet of a kind this code does not handle.
    Unsupported,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated packet",
            Error::Malformed => "malformed packet",
            Error::Checksum => "checksum mismatch",
            Error::Unsupported => "unsupported packet",
        })
    }
}

impl std::error::Error for Error {}

/// Result of the checked views.
pub type Result<T> = core::result::Result<T, Error>;

/// IP protocol / IPv6 next-header numbers espada cares about.
pub mod ip_proto {
    /// IPv4 encapsulated in IP / ESP next header for an IPv4 inner packet.
    pub const IPV4: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 encapsulated / ESP next header for an IPv6 inner packet.
    pub const IPV6: u8 = 41;
    /// ESP (not UDP-encapsulated).
    pub const ESP: u8 = 50;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// "No next header": an ESP dummy (TFC) packet, RFC 4303 §2.6.
    pub const NO_NEXT_HEADER: u8 = 59;
}

/// Reads a big-endian u16 at `at` (caller has checked the length).
#[inline(always)]
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a big-endian u32 at `at` (caller has checked the length).
#[inline(always)]
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline(always)]
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
