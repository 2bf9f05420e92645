//! Linux AF_PACKET port: a TPACKET_V2 receive ring and a mapped TPACKET_V3 transmit ring per
//! worker queue, the queues of one interface joined in a `PACKET_FANOUT` group (queue-mapped
//! when the NIC has a receive queue per worker, so its ntuple rules pick the worker; hashed
//! otherwise), `PACKET_QDISC_BYPASS` on transmit and
//! `PACKET_IGNORE_OUTGOING` so a queue never reads back what it sent.
//!
//! Receive is in place: the receive ring has fixed slots sized from the device MTU, with
//! [`RX_RESERVE`] bytes of headroom in front of each frame (`PACKET_RESERVE`) and tailroom
//! behind it, so ESP is added or removed in the slot itself. A slot the pipeline holds is
//! marked lent (neither the kernel's nor new), and goes back to the kernel when its buffer is
//! dropped, wherever that happens. The kernel fills its slots in order and stops at one still
//! lent, so the pipeline never keeps a slot beyond the poll that received it: a handoff to
//! another core and the control path copy the packet out first. Transmit copies into a TX
//! ring slot (the kernel's TX ring is not the RX ring) and kicks the kernel once per burst with
//! one `sendto`. Nothing else makes a syscall on the packet path.
//!
//! Transmit has its own socket (bound to protocol 0, so it receives nothing) so that it can be
//! rebuilt on its own. The kernel walks the TX ring from its own head and stops at the first
//! slot that is not `SEND_REQUEST`; a frame the device refuses (carrier down, peer dropping)
//! stays `SEND_REQUEST` at that head and is retried at every kick, so the ring can wedge behind
//! it. The queue therefore (1) kicks whenever the oldest queued slot is still waiting, not only
//! when it queued something new; (2) sets `PACKET_LOSS` so a malformed frame is skipped rather
//! than parked as `WRONG_FORMAT`; (3) refuses frames above the device MTU before queueing them
//! (`tx_oversize`); and (4) when the oldest slot has not moved for [`TX_STALL`], counts every
//! queued frame as `tx_lost` and rebuilds the TX socket and ring (`tx_resets`). A link flap
//! costs the frames queued while it was down, counted, and nothing more.
//!
//! All `unsafe` of the dataplane crate lives here; each block says why it is sound.
#![allow(unsafe_code)]

use super::{PortQueue, PortStats};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use espada_wire::ethernet::MacAddr;
use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Frames per `sendmmsg` call in linear transmit.
const LINEAR_BATCH: usize = 32;

/// How long the oldest queued TX frame may wait for the kernel before the ring is rebuilt.
pub const TX_STALL: Duration = Duration::from_millis(100);

const SOL_PACKET: libc::c_int = 263;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_FANOUT: libc::c_int = 18;
const PACKET_LOSS: libc::c_int = 14;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_RESERVE: libc::c_int = 12;
const TPACKET_V2: libc::c_int = 1;
const TPACKET_V3: libc::c_int = 2;
const PACKET_FANOUT_HASH: u32 = 0;
const PACKET_FANOUT_QM: u32 = 5;
const PACKET_FANOUT_FLAG_DEFRAG: u32 = 0x8000;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_SENDING: u32 = 2;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
/// The frame's TCP/UDP checksum is partial: its sender (on this host, a virtual link with
/// checksum offload) left it for the device to finish, and the kernel hands it over as is.
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
/// A receive slot lent to the pipeline: not `TP_STATUS_KERNEL` (the kernel does not fill it)
/// and without `TP_STATUS_USER` (the receive loop does not take it again). The kernel's own
/// status bits stop at bit 8 (flags) and start again at bit 29 (timestamps).
const TP_STATUS_LENT: u32 = 1 << 27;

/// `struct tpacket2_hdr` field offsets, and `sll_pkttype` of the `sockaddr_ll` after it.
mod tp2 {
    pub const LEN: usize = 4;
    pub const SNAPLEN: usize = 8;
    pub const MAC: usize = 12;
    pub const PKTTYPE: usize = 32 + 10;
    /// `TPACKET2_HDRLEN`: the header (32, aligned) and the `sockaddr_ll` (20).
    pub const HDRLEN: usize = 52;
}

/// Headroom the kernel leaves in front of each received frame (`PACKET_RESERVE`): room for the
/// outer Ethernet, IPv6, UDP, ESP header and IV that encapsulation puts in front.
pub const RX_RESERVE: usize = 128;
/// Where a receive slot's buffer starts: after the kernel's header and `sockaddr_ll`, on a
/// cache line. The bytes before it are never handed out.
const SLOT_DATA: usize = 64;
/// Tailroom a receive slot keeps behind the largest frame the device takes: ESP padding,
/// trailer and ICV.
const RX_TAILROOM: usize = 64;

/// The receive slot size for a device MTU: a power of two (so slots never straddle a block)
/// that holds the kernel's header, [`RX_RESERVE`], the largest frame and [`RX_TAILROOM`].
pub fn rx_frame_size(mtu: usize) -> usize {
    // The kernel's `netoff`: TPACKET_ALIGN(hdrlen + 16) + reserve; the frame starts 14 before.
    let mac = (tp2::HDRLEN + 16).next_multiple_of(16) + RX_RESERVE - 14;
    (mac + mtu + 14 + RX_TAILROOM).next_power_of_two().max(2048)
}

/// How a lent receive slot goes back: its `tp_status` word (the buffer's context) set to
/// `TP_STATUS_KERNEL`.
static RING_SLOT: crate::pktbuf::LentOps = crate::pktbuf::LentOps {
    kind: crate::pktbuf::LentKind::RingSlot,
    give_back: give_back_slot,
};

/// Hands a lent receive slot back to the kernel.
///
/// # Safety
/// `status` is the `tp_status` word of a slot lent by a receive ring that is still mapped, and
/// the caller is the slot's only holder and does not touch the slot afterwards.
#[inline]
unsafe fn give_back_slot(status: std::ptr::NonNull<()>, _base: std::ptr::NonNull<u8>) {
    // SAFETY (caller): mapped and ours; Release orders our writes to the slot before the
    // kernel's next fill.
    unsafe { status.cast::<AtomicU32>().as_ref() }.store(TP_STATUS_KERNEL, Ordering::Release);
}

/// `struct tpacket3_hdr` is 48 bytes; TX data starts right after it (TPACKET3_HDRLEN minus
/// `sizeof(struct sockaddr_ll)`).
const TP3_HDR_LEN: usize = 48;

#[repr(C)]
struct TpacketReq3 {
    tp_block_size: u32,
    tp_block_nr: u32,
    tp_frame_size: u32,
    tp_frame_nr: u32,
    tp_retire_blk_tov: u32,
    tp_sizeof_priv: u32,
    tp_feature_req_word: u32,
}

#[repr(C)]
struct TpacketReq {
    tp_block_size: u32,
    tp_block_nr: u32,
    tp_frame_size: u32,
    tp_frame_nr: u32,
}

#[repr(C)]
#[derive(Default)]
struct TpacketStatsV3 {
    tp_packets: u32,
    tp_drops: u32,
    tp_freeze_q_cnt: u32,
}

/// Ring geometry.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// RX block size (a multiple of the page size; the slots are sized from the device MTU,
    /// see [`rx_frame_size`]).
    pub rx_block_size: u32,
    /// RX blocks.
    pub rx_blocks: u32,
    /// TX frame size (holds the largest frame + 48 bytes).
    pub tx_frame_size: u32,
    /// TX frames.
    pub tx_frames: u32,
    /// How frames are handed to the kernel.
    pub tx_mode: TxMode,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            rx_block_size: 1 << 18,
            rx_blocks: 16,
            tx_frame_size: 1 << 14,
            tx_frames: 512,
            tx_mode: TxMode::Auto,
        }
    }
}

/// How an AF_PACKET queue transmits.
///
/// - `Ring`: copy into a mapped TPACKET_V3 ring, one `sendto` kick per burst. The kernel
///   builds each skb with the ring's pages as fragments (no copy of its own), which a NIC
///   driver with scatter-gather sends as they are; but a virtual device that forwards into
///   another namespace (veth) must copy such fragments (`skb_copy_ubufs`, page zeroing with
///   `init_on_alloc`): about a quarter of a worker's core at 64-byte frames here.
/// - `Linear`: one `sendmmsg` per burst straight from the packet buffers; the kernel copies
///   each frame once into a linear skb, which veth hands over as it is.
/// - `Auto` (default): `Linear` on virtual devices (`/sys/devices/virtual`: veth, bridges,
///   taps), `Ring` on hardware. `ESPADA_AF_PACKET_TX=ring|linear|auto` overrides it for a run
///   (docs/dataplane.md has the measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMode {
    /// By device kind (see above).
    Auto,
    /// Mapped TX ring.
    Ring,
    /// `sendmmsg` of linear frames.
    Linear,
}

impl TxMode {
    /// Parses `ring`, `linear` or `auto`.
    pub fn from_name(s: &str) -> Option<TxMode> {
        match s {
            "auto" => Some(TxMode::Auto),
            "ring" => Some(TxMode::Ring),
            "linear" => Some(TxMode::Linear),
            _ => None,
        }
    }

    /// The mode for `iface`: `self`, or for `Auto` the environment's override, else by kind.
    pub fn resolve(self, iface: &str) -> io::Result<TxMode> {
        let m = match self {
            TxMode::Auto => match std::env::var("ESPADA_AF_PACKET_TX") {
                Ok(v) => TxMode::from_name(v.trim()).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("ESPADA_AF_PACKET_TX must be ring, linear or auto, not `{v}`"),
                    )
                })?,
                Err(_) => TxMode::Auto,
            },
            m => m,
        };
        Ok(match m {
            TxMode::Auto if is_virtual(iface) => TxMode::Linear,
            TxMode::Auto => TxMode::Ring,
            m => m,
        })
    }
}

/// Whether `iface` is a virtual device (its sysfs node is under `/sys/devices/virtual`).
pub fn is_virtual(iface: &str) -> bool {
    std::fs::canonicalize(format!("/sys/class/net/{iface}"))
        .map(|p| p.starts_with("/sys/devices/virtual"))
        .unwrap_or(false)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points to a live, initialised `T` and we pass its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// The MAC address of an interface, from sysfs.
pub fn interface_mac(iface: &str) -> io::Result<MacAddr> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))?;
    MacAddr::parse(s.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad MAC for {iface}: {s}"),
        )
    })
}

fn ifindex(iface: &str) -> io::Result<libc::c_uint> {
    let c = CString::new(iface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name contains NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {iface}"),
        ))
    } else {
        Ok(i)
    }
}

/// A mapped TPACKET_V3 transmit ring on its own socket, or in linear mode ([`TxMode::Linear`])
/// the socket alone (no ring: `sendmsg` on a socket with a TX ring always takes the ring).
struct TxRing {
    fd: libc::c_int,
    /// `sendmmsg` from the buffers instead of the ring (`map` is null, `frames` 0).
    linear: bool,
    map: *mut u8,
    map_len: usize,
    frame_size: usize,
    frames: usize,
    /// Next slot to fill.
    next: usize,
    /// Oldest slot queued and not yet seen back (`AVAILABLE`).
    tail: usize,
    /// Slots between `tail` and `next`.
    pending: usize,
    /// When the oldest slot was first seen still waiting after a kick.
    stuck_since: Option<Instant>,
    /// Largest frame the device takes (MTU + Ethernet header).
    max_frame: usize,
}

impl TxRing {
    fn open(idx: libc::c_uint, iface: &str, rc: &RingConfig) -> io::Result<TxRing> {
        // Protocol 0: this socket only sends; it is never handed received frames.
        // SAFETY: plain socket(2) call.
        let fd =
            cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
        let close_on_err = |e: io::Error| {
            // SAFETY: fd was returned by socket(2) above and is closed once.
            unsafe { libc::close(fd) };
            e
        };
        setsockopt(fd, SOL_PACKET, PACKET_VERSION, &TPACKET_V3).map_err(close_on_err)?;
        let one: libc::c_int = 1;
        setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one).map_err(close_on_err)?;
        // Malformed frames are skipped by the kernel instead of stopping the ring.
        setsockopt(fd, SOL_PACKET, PACKET_LOSS, &one).map_err(close_on_err)?;
        let max_frame = device_mtu(iface).map_or(usize::MAX, |m| m + 14);
        let ring = if rc.tx_mode.resolve(iface).map_err(close_on_err)? == TxMode::Linear {
            TxRing {
                fd,
                linear: true,
                map: std::ptr::null_mut(),
                map_len: 0,
                frame_size: rc.tx_frame_size as usize,
                frames: 0,
                next: 0,
                tail: 0,
                pending: 0,
                stuck_since: None,
                max_frame,
            }
        } else {
            let tx_block = rc.tx_frame_size.max(4096);
            let tx = TpacketReq3 {
                tp_block_size: tx_block,
                tp_block_nr: rc.tx_frames,
                tp_frame_size: rc.tx_frame_size,
                tp_frame_nr: rc.tx_frames * (tx_block / rc.tx_frame_size),
                tp_retire_blk_tov: 0,
                tp_sizeof_priv: 0,
                tp_feature_req_word: 0,
            };
            setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &tx).map_err(close_on_err)?;
            let len = tx_block as usize * rc.tx_frames as usize;
            let map = map_ring(fd, len).map_err(close_on_err)?;
            TxRing {
                fd,
                linear: false,
                map,
                map_len: len,
                frame_size: rc.tx_frame_size as usize,
                frames: len / rc.tx_frame_size as usize,
                next: 0,
                tail: 0,
                pending: 0,
                stuck_since: None,
                max_frame,
            }
        };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value we then fill in.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0;
        sll.sll_ifindex = idx as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and we pass its size.
        cvt(unsafe {
            libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?; // ring's Drop closes and unmaps on error
        Ok(ring)
    }

    #[inline]
    fn status(&self, slot: usize) -> &AtomicU32 {
        let off = slot * self.frame_size + 20;
        debug_assert!(off + 4 <= self.map_len);
        // SAFETY: `slot < frames`, so the tp_status word of the slot's tpacket3_hdr is inside
        // the mapping and 4-byte aligned (frame sizes are multiples of 16). The kernel writes
        // it concurrently, hence an atomic view.
        unsafe { &*(self.map.add(off) as *const AtomicU32) }
    }

    /// Takes back the slots the kernel has finished with, oldest first.
    #[inline]
    fn reclaim(&mut self) {
        while self.pending > 0 {
            let st = self.status(self.tail).load(Ordering::Acquire);
            if st != TP_STATUS_AVAILABLE {
                break;
            }
            self.tail = (self.tail + 1) % self.frames;
            self.pending -= 1;
            self.stuck_since = None;
        }
    }

    /// Whether the oldest queued slot is still waiting for the kernel to take it.
    #[inline]
    fn head_waiting(&self) -> bool {
        self.pending > 0 && {
            let st = self.status(self.tail).load(Ordering::Acquire);
            st == TP_STATUS_SEND_REQUEST || st & TP_STATUS_WRONG_FORMAT != 0
        }
    }

    fn kick(&self) {
        // EAGAIN/ENOBUFS/ENETDOWN leave the frames queued for the next kick.
        kick_tx_ring(self.fd);
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        // SAFETY: the mapping (if any) and fd are owned by self and released exactly once.
        unsafe {
            if self.map_len > 0 {
                libc::munmap(self.map as *mut libc::c_void, self.map_len);
            }
            libc::close(self.fd);
        }
    }
}

fn map_ring(fd: libc::c_int, len: usize) -> io::Result<*mut u8> {
    for flags in [libc::MAP_SHARED | libc::MAP_LOCKED, libc::MAP_SHARED] {
        // SAFETY: mapping the socket's rings as the packet(7) API documents. MAP_LOCKED needs
        // RLIMIT_MEMLOCK, hence the retry without it.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if m != libc::MAP_FAILED {
            return Ok(m as *mut u8);
        }
    }
    Err(io::Error::last_os_error())
}

/// Receive queues of an interface (sysfs `queues/rx-*`), 1 when unknown.
pub fn rx_queues(iface: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

fn device_mtu(iface: &str) -> Option<usize> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One worker's queue of an interface: an AF_PACKET socket with its RX ring, and a TX ring on a
/// socket of its own.
pub struct AfPacketQueue {
    fd: libc::c_int,
    map: *mut u8,
    map_len: usize,
    /// Receive slot size and count (slot `i` starts at `i * frame_size`).
    frame_size: usize,
    frames: usize,
    /// The next receive slot to look at.
    next: usize,
    tx: TxRing,
    ifindex: libc::c_uint,
    iface: String,
    rc: RingConfig,
    mac: MacAddr,
    name: String,
    stats: PortStats,
    fanout: &'static str,
}

// SAFETY: the mappings and the sockets are owned by this value only; moving it to another
// thread moves that ownership (no aliasing pointers are kept elsewhere).
unsafe impl Send for AfPacketQueue {}

impl AfPacketQueue {
    /// Opens queue `queue` of `iface`, joined to fanout group `fanout_id` when `queues > 1`.
    pub fn open(
        iface: &str,
        queue: usize,
        queues: usize,
        fanout_id: u16,
        rc: RingConfig,
    ) -> io::Result<AfPacketQueue> {
        let idx = ifindex(iface)?;
        let mac = interface_mac(iface)?;
        let tx = TxRing::open(idx, iface, &rc)?;
        let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
        // SAFETY: plain socket(2) call.
        let fd = cvt(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto)
        })?;
        let close_on_err = |e: io::Error| {
            // SAFETY: fd was returned by socket(2) above and is closed once.
            unsafe { libc::close(fd) };
            e
        };
        setsockopt(fd, SOL_PACKET, PACKET_VERSION, &TPACKET_V2).map_err(close_on_err)?;
        let reserve = RX_RESERVE as libc::c_uint;
        setsockopt(fd, SOL_PACKET, PACKET_RESERVE, &reserve).map_err(close_on_err)?;
        let one: libc::c_int = 1;
        // Best effort (kernel >= 4.20); the RX path also skips outgoing frames by itself.
        let _ = setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one);
        let frame_size = rx_frame_size(device_mtu(iface).unwrap_or(1500));
        let block = (rc.rx_block_size as usize).max(frame_size);
        let blocks = (rc.rx_blocks as usize).max(1);
        let rx = TpacketReq {
            tp_block_size: block as u32,
            tp_block_nr: blocks as u32,
            tp_frame_size: frame_size as u32,
            tp_frame_nr: (block / frame_size * blocks) as u32,
        };
        setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &rx).map_err(close_on_err)?;
        let rx_len = block * blocks;
        let map = map_ring(fd, rx_len).map_err(close_on_err)?;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value we then fill in.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = idx as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and we pass its size.
        let r = unsafe {
            libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        let q = AfPacketQueue {
            fd,
            map,
            map_len: rx_len,
            frame_size,
            frames: rx_len / frame_size,
            next: 0,
            tx,
            ifindex: idx,
            iface: iface.to_string(),
            rc,
            mac,
            name: format!("af_packet:{iface}/q{queue}"),
            stats: PortStats::default(),
            fanout: "none",
        };
        cvt(r)?; // q's Drop closes the sockets and unmaps on error
        let mut q = q;
        if queues > 1 {
            // Queue-mapped fanout when the NIC has a receive queue per worker: the packet goes
            // to the socket of the queue the NIC put it on (socket i joined i-th), so the
            // ntuple rule `espada pin` installs for a per-CPU SA (UDP source port -> queue i)
            // also picks the worker, and no handoff is needed. Otherwise the kernel hashes.
            let mode = if rx_queues(iface) >= queues {
                q.fanout = "queue-mapped";
                PACKET_FANOUT_QM
            } else {
                q.fanout = "hash";
                PACKET_FANOUT_HASH
            };
            let arg: u32 = fanout_id as u32 | ((mode | PACKET_FANOUT_FLAG_DEFRAG) << 16);
            setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg)?;
        }
        Ok(q)
    }

    /// How the kernel spreads received frames over the queues of this interface: `none` (one
    /// queue), `queue-mapped` (the NIC's receive queue picks the socket) or `hash`.
    pub fn fanout_mode(&self) -> &'static str {
        self.fanout
    }

    /// Linear transmit ([`TxMode::Linear`]): the burst's frames in `sendmmsg` calls of up to
    /// [`LINEAR_BATCH`], straight from the buffers. A frame the kernel refuses (device down,
    /// out of buffers) is counted in `tx_dropped`; nothing waits for a later kick.
    fn tx_linear(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let mut sent = 0usize;
        let mut start = 0usize;
        while start < pkts.len() {
            let end = (start + LINEAR_BATCH).min(pkts.len());
            // SAFETY: iovec and mmsghdr are plain data; all-zero is a valid value.
            let mut iov: [libc::iovec; LINEAR_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut msgs: [libc::mmsghdr; LINEAR_BATCH] = unsafe { std::mem::zeroed() };
            let mut k = 0usize;
            let mut bytes = [0u32; LINEAR_BATCH];
            for b in &pkts[start..end] {
                let len = b.len();
                if len > self.tx.max_frame {
                    self.stats.tx_oversize += 1;
                    self.stats.tx_dropped += 1;
                    continue;
                }
                iov[k] = libc::iovec {
                    iov_base: b.data().as_ptr() as *mut libc::c_void,
                    iov_len: len,
                };
                bytes[k] = len as u32;
                k += 1;
            }
            for (m, v) in msgs.iter_mut().zip(iov.iter_mut()).take(k) {
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
            }
            let mut done = 0usize;
            while done < k {
                // SAFETY: msgs[done..k] point at iovecs over live buffers of `pkts` (not
                // touched until the call returns); the socket is bound to the interface, so no
                // address is needed.
                let r = unsafe {
                    libc::sendmmsg(
                        self.tx.fd,
                        msgs.as_mut_ptr().add(done),
                        (k - done) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    let e = io::Error::last_os_error().raw_os_error();
                    if matches!(
                        e,
                        Some(libc::EAGAIN | libc::ENOBUFS | libc::ENETDOWN | libc::ENXIO)
                    ) {
                        // Socket buffer full or the device down: the rest of the batch too.
                        self.stats.tx_dropped += (k - done) as u64;
                        break;
                    }
                    // This one frame was refused: count it and go on with the rest.
                    self.stats.tx_dropped += 1;
                    done += 1;
                    continue;
                }
                let r = r as usize;
                self.stats.tx_bytes += bytes[done..done + r].iter().map(|&b| b as u64).sum::<u64>();
                sent += r;
                done += r;
            }
            start = end;
        }
        for b in pkts.drain(..) {
            pool.put(b);
        }
        self.stats.tx_packets += sent as u64;
        sent
    }

    /// Whether this queue transmits linear frames with `sendmmsg` ([`TxMode::Linear`]).
    pub fn tx_is_linear(&self) -> bool {
        self.tx.linear
    }

    /// Counts every queued frame as lost and rebuilds the TX socket and ring (fault path only:
    /// the kernel's ring head is parked on a frame the device will not take).
    #[cold]
    fn reset_tx(&mut self) {
        match TxRing::open(self.ifindex, &self.iface, &self.rc) {
            Ok(fresh) => {
                self.stats.tx_lost += self.tx.pending as u64;
                self.stats.tx_resets += 1;
                self.tx = fresh;
            }
            // Could not rebuild now (out of memory, interface gone): try again after the next
            // stall period; frames keep being refused and counted meanwhile.
            Err(_) => self.tx.stuck_since = Some(Instant::now()),
        }
    }

    /// The `tp_status` word of receive slot `i`.
    #[inline]
    fn status(&self, i: usize) -> &AtomicU32 {
        debug_assert!(i < self.frames);
        // SAFETY: slot `i` is inside the mapping and starts on a 16-byte boundary (the slot
        // size is a power of two >= 2048); tp_status is its first word. The kernel writes the
        // same word concurrently, hence an atomic view.
        unsafe { &*(self.map.add(i * self.frame_size) as *const AtomicU32) }
    }

    /// Slots lent to the pipeline right now (a scan: shutdown and tests only).
    pub fn lent_slots(&self) -> usize {
        (0..self.frames)
            .filter(|&i| self.status(i).load(Ordering::Acquire) == TP_STATUS_LENT)
            .count()
    }

    #[inline]
    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: inside the mapping (offsets come from the kernel's block layout, bounded by
        // the block size checks below); read_unaligned tolerates any alignment.
        unsafe { std::ptr::read_unaligned(self.map.add(off) as *const u32) }
    }

    #[inline]
    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: as `read_u32`.
        unsafe { std::ptr::read_unaligned(self.map.add(off) as *const u16) }
    }

    /// Kernel-side counters (packets seen / dropped since the last call).
    fn kernel_stats(&self) -> (u64, u64) {
        let mut st = TpacketStatsV3::default();
        let mut len = std::mem::size_of::<TpacketStatsV3>() as libc::socklen_t;
        // SAFETY: `st` is a valid buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                self.fd,
                SOL_PACKET,
                PACKET_STATISTICS,
                &mut st as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            (0, 0)
        } else {
            (st.tp_packets as u64, st.tp_drops as u64)
        }
    }

    /// Kernel drops since the last call (for periodic stats; a syscall, never per packet).
    pub fn poll_kernel_drops(&mut self) -> u64 {
        let (_, d) = self.kernel_stats();
        self.stats.rx_dropped += d;
        d
    }
}

impl Drop for AfPacketQueue {
    fn drop(&mut self) {
        if self.lent_slots() > 0 {
            // Buffers of this ring are still out (a stopping gateway's queues): keep the
            // mapping for them rather than unmapping it under their feet. The mapping keeps
            // the socket alive, so first unbind it (protocol 0 receives nothing, and leaves
            // the fanout group): it must not take a share of the interface's traffic.
            // SAFETY: sockaddr_ll is plain data; all-zero (protocol 0) is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = self.ifindex as i32;
            // SAFETY: `sll` is a valid sockaddr_ll and we pass its size; fd is ours and closed
            // once.
            unsafe {
                libc::bind(
                    self.fd,
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                );
                libc::close(self.fd);
            }
            return;
        }
        // SAFETY: the RX mapping and fd are owned by self and released exactly once (the TX
        // ring releases its own); no slot is lent, so nothing points into the mapping.
        unsafe {
            libc::munmap(self.map as *mut libc::c_void, self.map_len);
            libc::close(self.fd);
        }
    }
}

impl PortQueue for AfPacketQueue {
    fn rx_burst(&mut self, _pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let i = self.next;
            let st = self.status(i).load(Ordering::Acquire);
            // The kernel's (nothing new), or still lent to the pipeline: the kernel stops at
            // that slot too, so nothing behind it is filled yet.
            if st & TP_STATUS_USER == 0 {
                break;
            }
            self.next = if i + 1 == self.frames { 0 } else { i + 1 };
            let f = i * self.frame_size;
            let len = self.read_u32(f + tp2::LEN) as usize;
            let snaplen = self.read_u32(f + tp2::SNAPLEN) as usize;
            let mac = self.read_u16(f + tp2::MAC) as usize;
            // SAFETY: inside slot `i` (the sockaddr_ll follows the header).
            let pkttype = unsafe { *self.map.add(f + tp2::PKTTYPE) };
            let give_back = |q: &Self| q.status(i).store(TP_STATUS_KERNEL, Ordering::Release);
            if pkttype == libc::PACKET_OUTGOING {
                give_back(self);
                continue;
            }
            // The kernel strips a VLAN tag into the header (tp_status VLAN_VALID, tp_vlan_tci):
            // such a frame would look untagged. espada runs on no VLAN: refuse it, counted.
            if st & TP_STATUS_VLAN_VALID != 0 {
                self.stats.rx_filtered += 1;
                give_back(self);
                continue;
            }
            // Cut short by the slot (a frame above the MTU the slots were sized for), or a
            // layout that is not the one asked for: lost, counted.
            if snaplen < len || mac < SLOT_DATA || mac + snaplen > self.frame_size {
                self.stats.rx_dropped += 1;
                give_back(self);
                continue;
            }
            let status = self.status(i);
            status.store(TP_STATUS_LENT, Ordering::Relaxed);
            // SAFETY: the kernel handed slot `i` over (TP_STATUS_USER) and it is now marked
            // lent, so it is this buffer's alone until dropped; the mapping outlives every lent
            // slot (see Drop); `mac - SLOT_DATA + snaplen <= frame_size - SLOT_DATA` was
            // checked above.
            let b = unsafe {
                PktBuf::lend(
                    &RING_SLOT,
                    std::ptr::NonNull::from(status).cast(),
                    std::ptr::NonNull::new_unchecked(self.map.add(f + SLOT_DATA)),
                    self.frame_size - SLOT_DATA,
                    mac - SLOT_DATA,
                    snaplen,
                    0,
                )
            };
            // A partial checksum goes out of espada finished (a veth peer with offload on):
            // forwarded as it came, the far end would drop it as corrupt.
            let mut b = b;
            if st & TP_STATUS_CSUMNOTREADY != 0
                && espada_wire::checksum::complete_partial(b.data_mut())
            {
                self.stats.rx_csum_completed += 1;
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += snaplen as u64;
            out.push(b);
            n += 1;
        }
        n
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        if self.tx.linear {
            return self.tx_linear(pool, pkts);
        }
        self.tx.reclaim();
        let mut queued = 0;
        for b in pkts.drain(..) {
            let len = b.len();
            let t = &mut self.tx;
            if len + TP3_HDR_LEN > t.frame_size || len > t.max_frame {
                self.stats.tx_oversize += 1;
                self.stats.tx_dropped += 1;
                pool.put(b);
                continue;
            }
            if t.pending == t.frames {
                self.stats.tx_dropped += 1;
                pool.put(b);
                continue;
            }
            let slot = t.next * t.frame_size;
            debug_assert_eq!(
                t.status(t.next).load(Ordering::Relaxed),
                TP_STATUS_AVAILABLE
            );
            // SAFETY: the slot is between the kernel's reach (`pending < frames`: it is not
            // queued, so the kernel is done with it), inside the TX ring, and
            // `len + 48 <= frame size` was checked.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    b.data().as_ptr(),
                    t.map.add(slot + TP3_HDR_LEN),
                    len,
                );
                std::ptr::write_unaligned(t.map.add(slot) as *mut u32, 0); // tp_next_offset
                std::ptr::write_unaligned(t.map.add(slot + 12) as *mut u32, len as u32); // snaplen
                std::ptr::write_unaligned(t.map.add(slot + 16) as *mut u32, len as u32);
                // len
            }
            t.status(t.next)
                .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
            t.next = (t.next + 1) % t.frames;
            t.pending += 1;
            self.stats.tx_bytes += len as u64;
            queued += 1;
            pool.put(b);
        }
        // Kick when something new is queued, and also when the oldest frame is still waiting:
        // a frame refused while the link was down goes out as soon as it is back.
        let full = |t: &TxRing| t.pending == t.frames;
        if queued > 0 || self.tx.head_waiting() || full(&self.tx) {
            self.tx.kick();
            self.tx.reclaim();
            if self.tx.head_waiting() || full(&self.tx) {
                let now = Instant::now();
                match self.tx.stuck_since {
                    None => self.tx.stuck_since = Some(now),
                    Some(t0) if now.duration_since(t0) >= TX_STALL => self.reset_tx(),
                    Some(_) => {}
                }
            }
        }
        self.stats.tx_packets += queued as u64;
        let _ = TP_STATUS_SENDING;
        queued
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

/// Asks the kernel to process a socket's mapped TX ring (AF_PACKET, AF_XDP): a zero-length,
/// non-blocking `sendto`. EAGAIN/ENOBUFS/ENETDOWN leave the frames queued for the next kick.
pub(crate) fn kick_tx_ring(fd: i32) {
    // SAFETY: sendto with a null buffer and no address is the documented TX-ring kick.
    unsafe {
        libc::sendto(
            fd,
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
}
