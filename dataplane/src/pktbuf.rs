//! Packet buffers with headroom and tailroom, so that encapsulation happens in place.
//!
//! [`PacketBuf`] is the small set of operations DPDK's mbuf offers (`rte_pktmbuf_prepend`,
//! `append`, `adj`, `trim`); the ESP code is written against it so that heap buffers, ring
//! slots and mbufs all go through the same functions.

#![allow(unsafe_code)]

use crate::pool::Pool;
use std::ptr::NonNull;
use std::sync::{Arc, Weak};

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
    #[inline(always)]
    fn len(&self) -> usize {
        self.data().len()
    }
    /// Whether the packet is empty.
    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// [`PktBuf::hw_csum`]: the NIC found the outer IPv4 header checksum good.
pub const HW_IP_CSUM_GOOD: u8 = 1;
/// [`PktBuf::hw_csum`]: the NIC found the UDP/TCP checksum good.
pub const HW_L4_CSUM_GOOD: u8 = 2;

/// Default headroom: Ethernet + IPv6 + UDP + ESP + IV = 14 + 40 + 8 + 8 + 8 = 78, rounded up.
pub const DEFAULT_HEADROOM: usize = 128;
/// Default buffer size: a 9000-byte jumbo frame plus headroom and ESP tailroom.
pub const DEFAULT_BUF_SIZE: usize = 9216 + DEFAULT_HEADROOM + 64;

/// A packet buffer: a heap buffer from a [`Pool`], or (feature `dpdk`) a DPDK mbuf processed
/// in place where the port put it. Either way the pipeline sees the same view (storage,
/// headroom, length): for an mbuf, `buf_addr`, `buf_len`, `data_off` and `data_len` are read
/// from its first cache line once at receive and written back once at transmit (the offsets
/// are checked against DPDK's headers when `dpdk-sys` builds), so `data`, `prepend` and
/// `append` are plain Rust, with no call into DPDK per access.
///
/// Ownership is the type: a buffer goes back where it came from when it is dropped, whatever
/// path dropped it (a full queue, the control path, shutdown): a pool buffer to its pool (the
/// normal paths return them explicitly through the worker's [`crate::pool::PoolCache`], with
/// no atomic operation; the drop path is the safety net, counted in [`Pool::reclaimed`]), an
/// mbuf to its mempool.
pub struct PktBuf {
    base: NonNull<u8>,
    cap: usize,
    head: usize,
    len: usize,
    /// Per-packet metadata the pipeline carries with the buffer: the outer header's TOS byte
    /// on the inbound path (its ECN field is combined with the inner one after decryption,
    /// also on a core the packet was handed to).
    pub outer_tos: u8,
    /// Checksums the NIC verified when the frame arrived ([`HW_IP_CSUM_GOOD`],
    /// [`HW_L4_CSUM_GOOD`], from a DPDK mbuf's `ol_flags`): the fast path skips those software
    /// checks. Zero (the default, and always on other ports) means every check runs.
    pub hw_csum: u8,
    /// Set when a cache hands a buffer of another pool back to its own (not a leak).
    going_home: bool,
    owner: Owner,
}

enum Owner {
    /// `base`/`cap` are a `Box<[u8]>` owned by this value; it returns to the pool, if any.
    Heap(Weak<Pool>),
    /// Memory a port lent (a DPDK mbuf, an AF_XDP UMEM frame, an AF_PACKET receive-ring
    /// slot): it goes back through the port's [`LentOps`] with the context it was lent with.
    Lent {
        ops: &'static LentOps,
        ctx: NonNull<()>,
    },
}

/// What kind of memory a port lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LentKind {
    /// A DPDK mbuf (one segment).
    Mbuf,
    /// A frame of an AF_XDP UMEM.
    UmemFrame,
    /// A slot of an AF_PACKET TPACKET_V2 receive ring, lent in place (must not be held across
    /// polls: see [`PktBuf::is_ring_slot`]).
    RingSlot,
}

/// How a buffer a port lent goes back to it: a table of the port's functions, as DPDK's
/// mempool ops are. This module knows no port: a port that lends its own memory wraps it with
/// [`PktBuf::lend`] and its `LentOps` (one `static` per port kind), takes it back in place
/// with [`PktBuf::take_lent`], and whatever path drops the buffer calls `give_back`.
pub struct LentOps {
    /// The memory's kind.
    pub kind: LentKind,
    /// Gives the memory back to the port; called once, when the buffer is dropped.
    ///
    /// # Safety
    /// `ctx` and `base` are what the buffer was lent with, and the buffer is gone.
    pub give_back: unsafe fn(ctx: NonNull<()>, base: NonNull<u8>),
}

// SAFETY: the storage (a boxed slice, or an mbuf taken off a queue) is owned by this value
// alone; moving the value moves the ownership. DPDK mbufs may be freed from any thread.
unsafe impl Send for PktBuf {}

impl Clone for PktBuf {
    /// A copy on the heap that belongs to no pool (tests and tools).
    fn clone(&self) -> Self {
        let mut c = PktBuf::new(self.cap);
        c.storage_mut().copy_from_slice(self.storage());
        c.head = self.head;
        c.len = self.len;
        c.outer_tos = self.outer_tos;
        c
    }
}

impl Drop for PktBuf {
    fn drop(&mut self) {
        match &mut self.owner {
            Owner::Heap(home) => {
                if self.cap == 0 {
                    return;
                }
                if let Some(pool) = home.upgrade() {
                    let back = PktBuf {
                        base: self.base,
                        cap: self.cap,
                        head: 0,
                        len: 0,
                        outer_tos: 0,
                        hw_csum: 0,
                        going_home: false,
                        owner: Owner::Heap(std::mem::take(home)),
                    };
                    self.cap = 0;
                    pool.reclaim(back, !self.going_home);
                } else {
                    // SAFETY: base/cap came from Box::into_raw of a boxed slice of this length
                    // (see `new`) and are released exactly once (cap is zeroed when moved on).
                    drop(unsafe {
                        Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                            self.base.as_ptr(),
                            self.cap,
                        ))
                    });
                }
            }
            Owner::Lent { ops, ctx } => {
                // SAFETY: the port lent this memory with `ctx` and keeps it valid while the
                // buffer lives (an mbuf is owned; a UMEM or a ring mapping outlives its lent
                // frames and slots); this is its one give-back: the buffer is going away.
                unsafe { (ops.give_back)(*ctx, self.base) }
            }
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
        let b: Box<[u8]> = vec![0u8; capacity].into_boxed_slice();
        let cap = b.len();
        // SAFETY: Box::into_raw never returns null.
        let base = unsafe { NonNull::new_unchecked(Box::into_raw(b) as *mut u8) };
        PktBuf {
            base,
            cap,
            head: DEFAULT_HEADROOM.min(capacity),
            len: 0,
            outer_tos: 0,
            hw_csum: 0,
            going_home: false,
            owner: Owner::Heap(Weak::new()),
        }
    }

    /// Whether this buffer belongs to `pool` (a pointer comparison, no atomic operation).
    #[inline]
    pub(crate) fn belongs_to(&self, pool: &Arc<Pool>) -> bool {
        match &self.owner {
            Owner::Heap(home) => std::ptr::eq(home.as_ptr(), Arc::as_ptr(pool)),
            Owner::Lent { .. } => false,
        }
    }

    /// Forgets the pool this buffer belongs to: dropping it then frees its memory.
    pub(crate) fn orphan(mut self) {
        if let Owner::Heap(home) = &mut self.owner {
            *home = Weak::new();
        }
    }

    /// Sends a buffer of another pool back to its own (handoffs and steering move buffers
    /// between workers whose caches sit on different pools).
    pub(crate) fn go_home(mut self) {
        self.going_home = true;
        drop(self);
    }

    /// A buffer of `capacity` bytes that returns to `home` when dropped.
    pub(crate) fn new_in(capacity: usize, home: Weak<Pool>) -> PktBuf {
        let mut b = PktBuf::new(capacity);
        b.owner = Owner::Heap(home);
        b
    }

    #[inline(always)]
    fn storage(&self) -> &[u8] {
        // SAFETY: base points to cap initialised bytes owned by this value (a boxed slice or
        // the data room of an mbuf, both zero- or DPDK-initialised memory).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.cap) }
    }

    #[inline(always)]
    fn storage_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `storage`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.cap) }
    }

    /// Wraps memory a port lends (no copy): `base..base + cap` the bytes the packet may use
    /// (headroom, packet, tailroom), the packet `len` bytes at `head`; dropping the buffer
    /// gives the memory back through `ops` with `ctx`.
    ///
    /// # Safety
    /// The memory is the caller's to lend (nobody else uses it until it comes back), `cap`
    /// bytes from `base` stay valid until `ops.give_back` runs, and `head + len <= cap`.
    #[inline]
    pub unsafe fn lend(
        ops: &'static LentOps,
        ctx: NonNull<()>,
        base: NonNull<u8>,
        cap: usize,
        head: usize,
        len: usize,
        hw_csum: u8,
    ) -> PktBuf {
        debug_assert!(head + len <= cap);
        PktBuf {
            base,
            cap,
            head,
            len,
            outer_tos: 0,
            hw_csum,
            going_home: false,
            owner: Owner::Lent { ops, ctx },
        }
    }

    /// Takes back memory lent with `ops` and `ctx` (a port sending its own frame in place):
    /// its first byte, the packet's offset and length; the memory is the caller's again and
    /// is not given back. `Err(self)` for any other buffer.
    #[inline]
    pub fn take_lent(
        self,
        ops: &'static LentOps,
        ctx: NonNull<()>,
    ) -> Result<(NonNull<u8>, usize, usize), PktBuf> {
        match self.owner {
            Owner::Lent { ops: o, ctx: c } if std::ptr::eq(o, ops) && c == ctx => {
                let r = (self.base, self.head, self.len);
                std::mem::forget(self);
                Ok(r)
            }
            _ => Err(self),
        }
    }

    /// The context of memory lent with `ops` (which mbuf, which UMEM), if this buffer is.
    #[inline]
    pub fn lent_ctx(&self, ops: &'static LentOps) -> Option<NonNull<()>> {
        match self.owner {
            Owner::Lent { ops: o, ctx } if std::ptr::eq(o, ops) => Some(ctx),
            _ => None,
        }
    }

    /// What kind of memory a port lent this buffer from (`None`: a heap buffer).
    #[inline]
    pub fn lent_kind(&self) -> Option<LentKind> {
        match self.owner {
            Owner::Lent { ops, .. } => Some(ops.kind),
            Owner::Heap(_) => None,
        }
    }

    /// A buffer holding a copy of `data` after the default headroom (tests and tools).
    pub fn from_slice(data: &[u8]) -> PktBuf {
        let mut b = PktBuf::new(DEFAULT_HEADROOM + data.len() + 256);
        b.load(data);
        b
    }

    /// Whether the bytes live in a DPDK mbuf.
    pub fn is_mbuf(&self) -> bool {
        self.lent_kind() == Some(LentKind::Mbuf)
    }

    /// Whether this buffer is a slot of a kernel receive ring (AF_PACKET) lent in place.
    /// Such a slot must not be held across polls: the kernel fills its ring in order and
    /// stops at a slot still lent, so a path that keeps a buffer (a handoff to another core,
    /// the control path) copies it out first ([`PktBuf::copy_out`]).
    #[inline]
    pub fn is_ring_slot(&self) -> bool {
        self.lent_kind() == Some(LentKind::RingSlot)
    }

    /// A copy of this packet in a buffer of `pool` (with that buffer's headroom; `outer_tos`
    /// and the checksum flags kept), the original handed back; `Err(self)` when the pool has
    /// no buffer or its buffers are too small.
    pub fn copy_out(self, pool: &mut crate::pool::PoolCache) -> Result<PktBuf, PktBuf> {
        let Some(mut c) = pool.get() else {
            return Err(self);
        };
        let head = c.head.min(c.cap.saturating_sub(self.len));
        if head + self.len > c.cap {
            pool.put(c);
            return Err(self);
        }
        c.head = head;
        c.len = self.len;
        c.data_mut().copy_from_slice(self.data());
        c.outer_tos = self.outer_tos;
        c.hw_csum = self.hw_csum;
        drop(self);
        Ok(c)
    }

    /// Where the storage starts (tests use it to show a buffer was not copied).
    pub fn storage_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    /// Empties the buffer and restores the headroom.
    #[inline]
    pub fn reset(&mut self) {
        self.reset_with_headroom(DEFAULT_HEADROOM);
    }

    /// Empties the buffer with a given headroom.
    #[inline]
    pub fn reset_with_headroom(&mut self, headroom: usize) {
        self.head = headroom.min(self.cap);
        self.len = 0;
        self.outer_tos = 0;
        self.hw_csum = 0;
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
        self.cap
    }
}

impl PacketBuf for PktBuf {
    #[inline(always)]
    fn data(&self) -> &[u8] {
        let (h, l) = (self.head, self.len);
        &self.storage()[h..h + l]
    }
    #[inline(always)]
    fn data_mut(&mut self) -> &mut [u8] {
        let (h, l) = (self.head, self.len);
        &mut self.storage_mut()[h..h + l]
    }
    #[inline(always)]
    fn headroom(&self) -> usize {
        self.head
    }
    #[inline(always)]
    fn tailroom(&self) -> usize {
        self.cap - self.head - self.len
    }
    #[inline(always)]
    fn prepend(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.head {
            return None;
        }
        self.head -= n;
        self.len += n;
        let h = self.head;
        Some(&mut self.storage_mut()[h..h + n])
    }
    #[inline(always)]
    fn append(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.tailroom() {
            return None;
        }
        let at = self.head + self.len;
        self.len += n;
        Some(&mut self.storage_mut()[at..at + n])
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
