//! ESP-in-UDP tunnel mode (RFC 4303, RFC 3948) with AES-GCM (RFC 4106), as pure functions over
//! a [`PacketBuf`](crate::PacketBuf) and a runtime SA. No I/O, no allocation, no clock: every
//! port and every core runs the same code, and the tests run it on known-answer vectors.

pub mod inbound;
pub mod outbound;

pub use inbound::{decapsulate, decapsulate_esp, Decap, InboundLookup};
pub use outbound::{
    encapsulate, encapsulate_burst, encapsulate_parsed, iv_from_seq, Encap, InnerInfo,
};

/// Builds the AAD (RFC 4106 §5): SPI ‖ seq (8 bytes), or SPI ‖ seq-high ‖ seq-low (12 bytes)
/// with ESN. Returns the buffer and the length to use.
#[inline(always)]
pub(crate) fn aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        a[4..8].copy_from_slice(&((seq >> 32) as u32).to_be_bytes());
        a[8..12].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 12)
    } else {
        a[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        (a, 8)
    }
}

#[cfg(test)]
mod tests;
