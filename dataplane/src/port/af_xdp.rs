//! AF_XDP port (feature `af-xdp`), zero copy: one XSK socket per worker queue, bound to one
//! NIC queue, straight on libxdp (`libxdp-sys`; libxdp loads its redirect program, and picks
//! the driver's zero-copy mode where it has one, copy mode otherwise).
//!
//! A worker's red and black sockets share **one UMEM** ([`XdpUmem`], `XDP_SHARED_UMEM`), each
//! with its own fill and completion rings. A frame received on one side is wrapped as a
//! [`PktBuf`] in place ([`PktBuf::lend`]: the kernel leaves `XDP_PACKET_HEADROOM` = 256
//! bytes in front of the packet, room for the outer headers) and, after encapsulation or
//! decapsulation, transmitted from the same frame on the other side: the TX descriptor points
//! at the packet's new start inside the frame. Completions return frames to the socket's free
//! list, which refills the fill ring; a socket with more free frames than it needs passes them
//! to its partner through the UMEM's shared return ring, in bulk. No packet byte is copied on
//! the forwarding path. Packets the worker makes itself (ARP, ICMP) and packets of another
//! worker's UMEM (handoffs) are copied into a frame and counted in `tx_copied`.
//!
//! Steering per per-CPU SA uses the same ethtool ntuple rules `espada pin` plans (UDP source
//! port → queue), as the kernel path does.
#![allow(unsafe_code)]

use super::{PortQueue, PortStats};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use crossbeam_queue::ArrayQueue;
use espada_wire::ethernet::MacAddr;
use libxdp_sys as x;
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Frame size (aligned mode: frames are chunks of this size).
pub const FRAME_SIZE: usize = 4096;
/// Where the kernel puts a received packet in its frame.
const RX_OFFSET: usize = x::XDP_PACKET_HEADROOM as usize;
/// Ring sizes (fill, completion, RX, TX).
const RING: u32 = 2048;
/// Frames moved between a socket's free list and the shared return ring at a time.
const BULK: usize = 64;
/// Free frames a socket keeps off its fill ring for the packets it must copy to send.
const TX_RESERVE: usize = 32;

/// A producer or consumer ring as libxdp lays it out (`struct xsk_ring_prod/cons`); the
/// operations below are libxdp's inline ones (`xsk.h`), in Rust.
#[repr(C)]
struct Ring(x::xsk_ring_prod);

impl Ring {
    fn zeroed() -> Box<Ring> {
        // SAFETY: the struct is plain integers and pointers; libxdp fills it in.
        Box::new(Ring(unsafe { std::mem::zeroed() }))
    }
    #[inline(always)]
    fn producer(&self) -> &AtomicU32 {
        // SAFETY: `producer` points into the ring's mapping, alive while the socket is.
        unsafe { AtomicU32::from_ptr(self.0.producer) }
    }
    #[inline(always)]
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as `producer`.
        unsafe { AtomicU32::from_ptr(self.0.consumer) }
    }
    /// Producer: reserves up to `nb` slots; returns (first index, how many).
    #[inline(always)]
    fn reserve(&mut self, nb: u32) -> (u32, u32) {
        let mut free = self.0.cached_cons.wrapping_sub(self.0.cached_prod);
        if free < nb {
            self.0.cached_cons = self
                .consumer()
                .load(Ordering::Acquire)
                .wrapping_add(self.0.size);
            free = self.0.cached_cons.wrapping_sub(self.0.cached_prod);
        }
        let n = free.min(nb);
        let idx = self.0.cached_prod;
        self.0.cached_prod = self.0.cached_prod.wrapping_add(n);
        (idx, n)
    }
    /// Producer: publishes `nb` reserved slots.
    #[inline(always)]
    fn submit(&mut self, nb: u32) {
        let p = self.producer();
        p.store(
            p.load(Ordering::Relaxed).wrapping_add(nb),
            Ordering::Release,
        );
    }
    /// Consumer: up to `nb` filled slots; returns (first index, how many).
    #[inline(always)]
    fn peek(&mut self, nb: u32) -> (u32, u32) {
        let mut avail = self.0.cached_prod.wrapping_sub(self.0.cached_cons);
        if avail == 0 {
            self.0.cached_prod = self.producer().load(Ordering::Acquire);
            avail = self.0.cached_prod.wrapping_sub(self.0.cached_cons);
        }
        let n = avail.min(nb);
        let idx = self.0.cached_cons;
        self.0.cached_cons = self.0.cached_cons.wrapping_add(n);
        (idx, n)
    }
    /// Consumer: hands `nb` consumed slots back.
    #[inline(always)]
    fn release(&mut self, nb: u32) {
        let c = self.consumer();
        c.store(
            c.load(Ordering::Relaxed).wrapping_add(nb),
            Ordering::Release,
        );
    }
    #[inline(always)]
    fn needs_wakeup(&self) -> bool {
        // SAFETY: `flags` points into the ring's mapping.
        unsafe { std::ptr::read_volatile(self.0.flags) & x::XDP_RING_NEED_WAKEUP != 0 }
    }
    /// Slot `idx` of an address ring (fill, completion).
    #[inline(always)]
    fn addr(&mut self, idx: u32) -> &mut u64 {
        // SAFETY: the ring holds `mask + 1` u64 slots; the index is masked.
        unsafe { &mut *(self.0.ring as *mut u64).add((idx & self.0.mask) as usize) }
    }
    /// Slot `idx` of a descriptor ring (RX, TX).
    #[inline(always)]
    fn desc(&mut self, idx: u32) -> &mut x::xdp_desc {
        // SAFETY: as `addr`, with descriptors.
        unsafe { &mut *(self.0.ring as *mut x::xdp_desc).add((idx & self.0.mask) as usize) }
    }
    fn as_prod(&mut self) -> *mut x::xsk_ring_prod {
        &mut self.0
    }
    fn as_cons(&mut self) -> *mut x::xsk_ring_cons {
        (&mut self.0 as *mut x::xsk_ring_prod).cast()
    }
}

/// One UMEM: `frames` frames of [`FRAME_SIZE`] bytes, shared by the sockets of one worker.
///
/// Lifetime: a [`PktBuf`] holding a frame points at its UMEM without a reference count (no
/// atomic operation per packet). Every such buffer is counted in `outstanding` (by the queues,
/// in bulk; by [`XdpUmem::give_back`] when one is dropped elsewhere). When the last socket
/// goes and buffers are still out (in a handoff queue of a stopping gateway), the UMEM is
/// leaked rather than unmapped, so no buffer can point at freed memory.
pub struct XdpUmem {
    area: NonNull<u8>,
    size: usize,
    umem: *mut x::xsk_umem,
    /// The fill and completion rings made with the UMEM, for its first socket.
    first: Mutex<Option<(Box<Ring>, Box<Ring>)>>,
    /// Frames given back by buffers dropped anywhere, and surplus frames of one socket for
    /// the other (frame offsets).
    returns: ArrayQueue<u64>,
    /// Frames out as buffers, as far as flushed counts say.
    outstanding: AtomicI64,
    /// Sockets open on this UMEM.
    sockets: AtomicUsize,
    /// Frames never handed to a socket yet (offsets), taken by sockets as they open.
    spare: Mutex<Vec<u64>>,
}

// SAFETY: the area and the libxdp handle are only touched through the rings' protocol (one
// owner per frame at a time) and under the mutexes above; the return ring is lock-free.
unsafe impl Send for XdpUmem {}
unsafe impl Sync for XdpUmem {}

impl XdpUmem {
    /// A UMEM of `frames` frames (at least 2 × [`RING`] for two sockets).
    pub fn new(frames: u32) -> Result<Arc<XdpUmem>, String> {
        let frames = (frames as usize).max(2 * RING as usize);
        let size = frames * FRAME_SIZE;
        // SAFETY: an anonymous private mapping; checked below.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if area == libc::MAP_FAILED {
            return Err(format!(
                "UMEM of {size} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let (mut fill, mut comp) = (Ring::zeroed(), Ring::zeroed());
        let cfg = x::xsk_umem_config {
            fill_size: RING,
            comp_size: RING,
            frame_size: FRAME_SIZE as u32,
            frame_headroom: 0,
            flags: 0,
        };
        let mut umem = std::ptr::null_mut();
        // SAFETY: area is a fresh mapping of `size` bytes; the rings are boxed (stable).
        let r = unsafe {
            x::xsk_umem__create(
                &mut umem,
                area,
                size as u64,
                fill.as_prod(),
                comp.as_cons(),
                &cfg,
            )
        };
        if r != 0 {
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(area, size) };
            return Err(format!(
                "UMEM: {} (AF_XDP needs root or CAP_NET_RAW + CAP_BPF, and memlock)",
                std::io::Error::from_raw_os_error(-r)
            ));
        }
        Ok(Arc::new(XdpUmem {
            area: NonNull::new(area as *mut u8).expect("mmap succeeded"),
            size,
            umem,
            first: Mutex::new(Some((fill, comp))),
            returns: ArrayQueue::new(frames),
            outstanding: AtomicI64::new(0),
            sockets: AtomicUsize::new(0),
            spare: Mutex::new((0..frames as u64).map(|i| i * FRAME_SIZE as u64).collect()),
        }))
    }

    #[inline(always)]
    fn frame_ptr(&self, off: u64) -> NonNull<u8> {
        // SAFETY: `off` is a frame offset inside the area (masked by the callers).
        unsafe { NonNull::new_unchecked(self.area.as_ptr().add(off as usize)) }
    }

    /// Gives a frame back (a buffer of it was dropped outside the ports).
    ///
    /// # Safety
    /// `umem` is alive (see the type's lifetime rule) and `frame` is the first byte of one of
    /// its frames, owned by the caller.
    unsafe fn give_back(umem: NonNull<XdpUmem>, frame: *mut u8) {
        // SAFETY (caller): alive.
        let u = unsafe { umem.as_ref() };
        let off = frame as u64 - u.area.as_ptr() as u64;
        // The ring holds every frame of the UMEM, so it is never full here.
        let _ = u.returns.push(off);
        u.outstanding.fetch_sub(1, Ordering::Release);
    }
}

/// How a lent UMEM frame goes back: to its UMEM's returned frames (the buffer's context is the
/// `XdpUmem`).
static UMEM_FRAME: crate::pktbuf::LentOps = crate::pktbuf::LentOps {
    kind: crate::pktbuf::LentKind::UmemFrame,
    give_back: give_back_frame,
};

/// # Safety
/// As [`XdpUmem::give_back`]: `umem` alive, `frame` one of its frames lent once.
unsafe fn give_back_frame(umem: NonNull<()>, frame: NonNull<u8>) {
    // SAFETY (caller).
    unsafe { XdpUmem::give_back(umem.cast(), frame.as_ptr()) }
}

impl Drop for XdpUmem {
    fn drop(&mut self) {
        // SAFETY: every socket on the UMEM is gone (they hold an Arc); the mapping is ours.
        unsafe {
            x::xsk_umem__delete(self.umem);
            libc::munmap(self.area.as_ptr().cast(), self.size);
        }
    }
}

/// One XSK socket on a UMEM: one worker's queue of an interface.
pub struct AfXdpQueue {
    umem: Arc<XdpUmem>,
    home: NonNull<XdpUmem>,
    xsk: *mut x::xsk_socket,
    fd: i32,
    rx: Box<Ring>,
    tx: Box<Ring>,
    fill: Box<Ring>,
    comp: Box<Ring>,
    /// Free frames (offsets) of this socket.
    free: Vec<u64>,
    /// Buffers made from received frames minus frames of ours sent or taken back (flushed
    /// into the UMEM's `outstanding` when the socket closes).
    lent: i64,
    /// Frames the kernel holds for transmission (sent, not yet completed).
    in_flight: u32,
    mac: MacAddr,
    name: String,
    stats: PortStats,
}

// SAFETY: the socket and its rings are used by the one worker that owns this value.
unsafe impl Send for AfXdpQueue {}

impl AfXdpQueue {
    /// Opens queue `queue` of `iface` on a UMEM of its own with `frames` frames.
    pub fn open(iface: &str, queue: u32, frames: u32) -> Result<AfXdpQueue, String> {
        AfXdpQueue::open_on(&XdpUmem::new(frames)?, iface, queue)
    }

    /// A worker's red and black queues on one shared UMEM: frames received on one side are
    /// sent from the other in place.
    pub fn open_pair(
        red: &str,
        black: &str,
        queue: u32,
        frames: u32,
    ) -> Result<(AfXdpQueue, AfXdpQueue), String> {
        let umem = XdpUmem::new(frames)?;
        let r = AfXdpQueue::open_on(&umem, red, queue)?;
        let b = AfXdpQueue::open_on(&umem, black, queue)?;
        Ok((r, b))
    }

    /// Opens queue `queue` of `iface` on `umem` (shared with the sockets already on it).
    pub fn open_on(umem: &Arc<XdpUmem>, iface: &str, queue: u32) -> Result<AfXdpQueue, String> {
        let mac = super::af_packet::interface_mac(iface).map_err(|e| format!("{iface}: {e}"))?;
        let cname = CString::new(iface).map_err(|_| format!("bad interface name {iface}"))?;
        let (mut fill, mut comp) = umem
            .first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| (Ring::zeroed(), Ring::zeroed()));
        let (mut rx, mut tx) = (Ring::zeroed(), Ring::zeroed());
        let cfg = x::xsk_socket_config {
            rx_size: RING,
            tx_size: RING,
            __bindgen_anon_1: x::xsk_socket_config__bindgen_ty_1 { libxdp_flags: 0 },
            xdp_flags: 0,
            bind_flags: x::XDP_USE_NEED_WAKEUP as u16,
        };
        let mut xsk = std::ptr::null_mut();
        let mut last = 0;
        // A socket of a previous run may still be going away (EBUSY): retry briefly.
        for _ in 0..20 {
            // SAFETY: the rings are boxed and live as long as the socket (fields of the queue,
            // dropped after the socket is deleted); the UMEM outlives it (Arc).
            last = unsafe {
                x::xsk_socket__create_shared(
                    &mut xsk,
                    cname.as_ptr(),
                    queue,
                    umem.umem,
                    rx.as_cons(),
                    tx.as_prod(),
                    fill.as_prod(),
                    comp.as_cons(),
                    &cfg,
                )
            };
            if last == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if last != 0 {
            return Err(format!(
                "{iface} queue {queue}: cannot create an AF_XDP socket: {}",
                std::io::Error::from_raw_os_error(-last)
            ));
        }
        umem.sockets.fetch_add(1, Ordering::AcqRel);
        // SAFETY: xsk was just created.
        let fd = unsafe { x::xsk_socket__fd(xsk) };
        // Half the ring's worth of frames for receive, as many kept for transmit.
        let free: Vec<u64> = {
            let mut spare = umem.spare.lock().unwrap_or_else(|e| e.into_inner());
            let take = (RING as usize).min(spare.len());
            let at = spare.len() - take;
            spare.split_off(at)
        };
        let mut q = AfXdpQueue {
            home: NonNull::from(&**umem),
            umem: umem.clone(),
            xsk,
            fd,
            rx,
            tx,
            fill,
            comp,
            free,
            lent: 0,
            in_flight: 0,
            mac,
            name: format!("af_xdp:{iface}/q{queue}"),
            stats: PortStats::default(),
        };
        q.free.reserve(4 * RING as usize);
        q.refill(RING / 2);
        Ok(q)
    }

    /// Puts up to `want` free frames on the fill ring, keeping [`TX_RESERVE`] frames for the
    /// copies transmit needs; returns how many.
    #[inline]
    fn refill(&mut self, want: u32) -> u32 {
        if self.free.len() < want as usize + TX_RESERVE {
            for _ in 0..BULK + want as usize {
                match self.umem.returns.pop() {
                    Some(f) => self.free.push(f),
                    None => break,
                }
            }
        }
        let avail = self.free.len().saturating_sub(TX_RESERVE) as u32;
        let (idx, n) = self.fill.reserve(want.min(avail));
        for i in 0..n {
            let f = self.free.pop().expect("counted above");
            *self.fill.addr(idx.wrapping_add(i)) = f;
        }
        if n > 0 {
            self.fill.submit(n);
        }
        n
    }

    /// Takes completed transmissions back as free frames; passes a surplus to the partner.
    #[inline]
    fn complete(&mut self) {
        let (idx, n) = self.comp.peek(RING);
        for i in 0..n {
            let a = *self.comp.addr(idx.wrapping_add(i));
            self.free.push(a & !(FRAME_SIZE as u64 - 1));
        }
        if n > 0 {
            self.comp.release(n);
            self.in_flight = self.in_flight.saturating_sub(n);
        }
        // Frames this socket does not need (its fill ring is stocked from `free` on receive)
        // go to the partner socket, whose receive side is where they came from.
        if self.free.len() > 4 * BULK {
            while self.free.len() > 2 * BULK {
                let Some(f) = self.free.pop() else { break };
                let _ = self.umem.returns.push(f);
            }
        }
    }

    /// A free frame for a copy; `None` when there is none.
    #[inline]
    fn take_frame(&mut self) -> Option<u64> {
        if self.free.is_empty() {
            self.complete();
            if self.free.is_empty() {
                for _ in 0..BULK {
                    match self.umem.returns.pop() {
                        Some(f) => self.free.push(f),
                        None => break,
                    }
                }
            }
        }
        self.free.pop()
    }

    fn kick(&mut self) {
        super::af_packet::kick_tx_ring(self.fd);
    }
}

impl Drop for AfXdpQueue {
    fn drop(&mut self) {
        // SAFETY: the socket is ours; its rings are unmapped by libxdp here, before the boxes
        // holding their descriptions go.
        unsafe { x::xsk_socket__delete(self.xsk) };
        self.umem.outstanding.fetch_add(self.lent, Ordering::AcqRel);
        if self.umem.sockets.fetch_sub(1, Ordering::AcqRel) == 1
            && self.umem.outstanding.load(Ordering::Acquire) > 0
        {
            // Buffers of this UMEM are still out (a stopping gateway's queues): keep the memory
            // for them rather than unmapping it under their feet.
            std::mem::forget(self.umem.clone());
        }
    }
}

impl PortQueue for AfXdpQueue {
    fn rx_burst(&mut self, _pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let (idx, n) = self.rx.peek(max as u32);
        for i in 0..n {
            let d = *self.rx.desc(idx.wrapping_add(i));
            let frame = d.addr & !(FRAME_SIZE as u64 - 1);
            let off = (d.addr - frame) as usize;
            // SAFETY: the kernel handed this frame of our UMEM over with the RX descriptor.
            let b = unsafe {
                PktBuf::lend(
                    &UMEM_FRAME,
                    self.home.cast(),
                    self.umem.frame_ptr(frame),
                    FRAME_SIZE,
                    off.min(FRAME_SIZE),
                    (d.len as usize).min(FRAME_SIZE - off.min(FRAME_SIZE)),
                    0,
                )
            };
            self.stats.rx_bytes += d.len as u64;
            out.push(b);
        }
        if n > 0 {
            self.rx.release(n);
            self.lent += n as i64;
            self.stats.rx_packets += n as u64;
        }
        // Keep the fill ring stocked (what was consumed, and what earlier refills missed).
        let refilled = self.refill(n.max(BULK as u32));
        if (n > 0 || refilled > 0) && self.fill.needs_wakeup() {
            let mut p = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: a zero-timeout poll on our own socket wakes the driver's RX processing.
            unsafe { libc::poll(&mut p, 1, 0) };
        }
        n as usize
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        self.complete();
        if pkts.is_empty() {
            if self.in_flight > 0 && self.tx.needs_wakeup() {
                self.kick();
            }
            return 0;
        }
        let (idx, room) = self.tx.reserve(pkts.len() as u32);
        let mut used = 0u32;
        for b in pkts.drain(..) {
            if used == room {
                self.stats.tx_dropped += 1;
                pool.put(b);
                continue;
            }
            let (addr, len) = match b.take_lent(&UMEM_FRAME, self.home.cast()) {
                Ok((frame, head, len)) => {
                    self.lent -= 1;
                    let off = frame.as_ptr() as u64 - self.umem.area.as_ptr() as u64;
                    (off + head as u64, len)
                }
                Err(b) => {
                    // Our own packets and other workers' frames: one copy into a frame.
                    let len = b.len();
                    let Some(f) = self.take_frame().filter(|_| RX_OFFSET + len <= FRAME_SIZE)
                    else {
                        self.stats.tx_dropped += 1;
                        pool.put(b);
                        continue;
                    };
                    // SAFETY: f is a free frame of our UMEM that nobody else touches.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.umem.frame_ptr(f).as_ptr().add(RX_OFFSET),
                            len,
                        )
                    };
                    dst.copy_from_slice(b.data());
                    self.stats.tx_copied += 1;
                    pool.put(b);
                    (f + RX_OFFSET as u64, len)
                }
            };
            let d = self.tx.desc(idx.wrapping_add(used));
            d.addr = addr;
            d.len = len as u32;
            d.options = 0;
            self.stats.tx_bytes += len as u64;
            used += 1;
        }
        if used < room {
            // Slots reserved but not filled: give them back (nothing was published yet).
            self.tx.0.cached_prod = self.tx.0.cached_prod.wrapping_sub(room - used);
        }
        if used > 0 {
            self.tx.submit(used);
            self.in_flight += used;
            self.stats.tx_packets += used as u64;
            if self.tx.needs_wakeup() {
                self.kick();
            }
        }
        used as usize
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn stats(&self) -> PortStats {
        self.stats
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
