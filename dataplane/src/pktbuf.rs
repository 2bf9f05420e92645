//! Packet buffers with headroom and tailroom, so that encapsulation happens in place.
//!
//! [`PacketBuf`] is the small set of operations DPDK's mbuf offers (`rte_pktmbuf_prepend`,
//! `append`, `adj`, `trim`); the ESP code is written against it so that heap buffers, ring
//! slots and mbufs all go through the same functions.

use crate::pool::Pool;
use std::sync::Weak;

/// A packet in a buffer with room in front and behind.
pub trait PacketBuf {
    /// The packet bytes.
    fn data(&self) -> &[u8];
    /// The packet bytes, mutable.
    fn data_mut(&mut self) -> &mut [u8];
    /// Bytes free in front of the packet.
    fn headroom(&self) -> usize;
    /// Bytes free behind the packet.
    fn tailroom(&self) -> usize;
    /// Grows the packet by `n` bytes in front and returns them; `None` (and no change) when
    /// there is not enough headroom.
    fn prepend(&mut self, n: usize) -> Option<&mut [u8]>;
    /// Grows the packet by `n` bytes at the end and returns them; `None` (and no change) when
    /// there is not enough tailroom.
    fn append(&mut self, n: usize) -> Option<&mut [u8]>;
    /// Removes `n` bytes from the front; `false` (and no change) if the packet is shorter.
    fn adj(&mut self, n: usize) -> bool;
    /// Removes `n` bytes from the end; `false` (and no change) if the packet is shorter.
    fn trim(&mut self, n: usize) -> bool;
    /// Packet length.
    fn len(&self) -> usize {
        self.data().len()
    }
    /// Whether the packet is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Default headroom: Ethernet + IPv6 + UDP + ESP + IV = 14 + 40 + 8 + 8 + 8 = 78, rounded up.
pub const DEFAULT_HEADROOM: usize = 128;
/// Default buffer size: a 9000-byte jumbo frame plus headroom and ESP tailroom.
pub const DEFAULT_BUF_SIZE: usize = 9216 + DEFAULT_HEADROOM + 64;

/// A heap buffer allocated once and reused (pools hand these out; nothing allocates per packet).
///
/// Ownership is the type: a buffer that came from a [`Pool`] goes back to it when it is
/// dropped, whatever path dropped it (a full queue, the control path, shutdown), so no code
/// path can leak the pool dry. The normal paths still return buffers explicitly through the
/// worker's [`crate::pool::PoolCache`] (no atomic operation); the drop path is the safety net
/// and is counted ([`Pool::reclaimed`]).
pub struct PktBuf {
    storage: Box<[u8]>,
    head: usize,
    len: usize,
    home: Weak<Pool>,
    /// Per-packet metadata the pipeline carries with the buffer: the outer header's TOS byte
    /// on the inbound path (its ECN field is combined with the inner one after decryption,
    /// also on a core the packet was handed to).
    pub outer_tos: u8,
}

impl Clone for PktBuf {
    /// A copy that belongs to no pool (tests and tools).
    fn clone(&self) -> Self {
        PktBuf {
            storage: self.storage.clone(),
            head: self.head,
            len: self.len,
            home: Weak::new(),
            outer_tos: self.outer_tos,
        }
    }
}

impl Drop for PktBuf {
    fn drop(&mut self) {
        if self.storage.is_empty() {
            return;
        }
        if let Some(pool) = self.home.upgrade() {
            let storage = std::mem::take(&mut self.storage);
            pool.reclaim(PktBuf {
                storage,
                head: 0,
                len: 0,
                home: std::mem::take(&mut self.home),
                outer_tos: 0,
            });
        }
    }
}

impl core::fmt::Debug for PktBuf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PktBuf(head={}, len={})", self.head, self.len)
    }
}

impl Default for PktBuf {
    fn default() -> Self {
        PktBuf::new(DEFAULT_BUF_SIZE)
    }
}

impl PktBuf {
    /// An empty buffer of `capacity` bytes with the default headroom.
    pub fn new(capacity: usize) -> PktBuf {
        PktBuf {
            storage: vec![0u8; capacity].into_boxed_slice(),
            head: DEFAULT_HEADROOM.min(capacity),
            len: 0,
            home: Weak::new(),
            outer_tos: 0,
        }
    }

    /// A buffer of `capacity` bytes that returns to `home` when dropped.
    pub(crate) fn new_in(capacity: usize, home: Weak<Pool>) -> PktBuf {
        let mut b = PktBuf::new(capacity);
        b.home = home;
        b
    }

    /// A buffer holding a copy of `data` after the default headroom (tests and tools).
    pub fn from_slice(data: &[u8]) -> PktBuf {
        let mut b = PktBuf::new(DEFAULT_HEADROOM + data.len() + 256);
        b.load(data);
        b
    }

    /// Empties the buffer and restores the headroom.
    #[inline]
    pub fn reset(&mut self) {
        self.reset_with_headroom(DEFAULT_HEADROOM);
    }

    /// Empties the buffer with a given headroom.
    #[inline]
    pub fn reset_with_headroom(&mut self, headroom: usize) {
        self.head = headroom.min(self.storage.len());
        self.len = 0;
        self.outer_tos = 0;
    }

    /// Replaces the contents with `data` after the default headroom; returns `false` (and
    /// leaves the buffer empty) when it does not fit.
    #[inline]
    pub fn load(&mut self, data: &[u8]) -> bool {
        self.reset();
        match self.append(data.len()) {
            Some(d) => {
                d.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// Total capacity.
    pub fn capacity(&self) -> usize {
        self.storage.len()
    }
}

impl PacketBuf for PktBuf {
    #[inline(always)]
    fn data(&self) -> &[u8] {
        &self.storage[self.head..self.head + self.len]
    }
    #[inline(always)]
    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.head..self.head + self.len]
    }
    #[inline(always)]
    fn headroom(&self) -> usize {
        self.head
    }
    #[inline(always)]
    fn tailroom(&self) -> usize {
        self.storage.len() - self.head - self.len
    }
    #[inline(always)]
    fn prepend(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.head {
            return None;
        }
        self.head -= n;
        self.len += n;
        Some(&mut self.storage[self.head..self.head + n])
    }
    #[inline(always)]
    fn append(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.tailroom() {
            return None;
        }
        let at = self.head + self.len;
        self.len += n;
        Some(&mut self.storage[at..at + n])
    }
    #[inline(always)]
    fn adj(&mut self, n: usize) -> bool {
        if n > self.len {
            return false;
        }
        self.head += n;
        self.len -= n;
        true
    }
    #[inline(always)]
    fn trim(&mut self, n: usize) -> bool {
        if n > self.len {
            return false;
        }
        self.len -= n;
        true
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn room_operations() {
        let mut b = PktBuf::new(256);
        assert_eq!(b.headroom(), DEFAULT_HEADROOM);
        assert!(b.load(&[1, 2, 3]));
        assert_eq!(b.data(), &[1, 2, 3]);
        b.prepend(2).unwrap().copy_from_slice(&[9, 8]);
        assert_eq!(b.data(), &[9, 8, 1, 2, 3]);
        b.append(1).unwrap()[0] = 7;
        assert_eq!(b.data(), &[9, 8, 1, 2, 3, 7]);
        assert!(b.adj(2));
        assert!(b.trim(1));
        assert_eq!(b.data(), &[1, 2, 3]);
        assert!(b.prepend(DEFAULT_HEADROOM + 1).is_none());
        assert!(b.append(256).is_none());
        assert!(!b.adj(4) && !b.trim(4));
        assert_eq!(b.data(), &[1, 2, 3]);
        assert!(!b.load(&[0u8; 200]));
        assert!(b.is_empty());
    }
}
