//! Runtime SAs: what one worker core owns for one direction of one SA.

use crate::replay::{ReplayError, ReplayWindow};
use crate::seqguard::SeqGuard;
use espada_crypto::{Cipher, EspAead};
use espada_wire::{esp, ip_proto, ipv4, ipv6, udp};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The wire order of an SA several cores send on (the fallback SA, `sa_mode = "shared"`).
///
/// Cores reserve a burst's sequence numbers at once and encrypt in parallel; without more, the
/// bursts of two cores can reach the wire in another order than their numbers, by more than a
/// receiver's replay window: the Linux kernel under strongSwan keeps 32 (charon's
/// `replay_window` default) and drops what falls behind it. A core that holds this lock from
/// reserving its numbers until its burst is handed to the port puts the SA's packets on the
/// wire in sequence order, as the kernel does for one SA used from every CPU (its `x->lock`).
/// Per-CPU SAs never take it: one core sends on each.
#[derive(Debug, Default)]
pub struct SendOrder(AtomicBool);

impl SendOrder {
    /// Takes the lock, spinning (and yielding to the scheduler after a while: the holder may
    /// have been preempted; this machine's cores are shared). Returns whether it had to wait.
    #[inline]
    pub fn lock(&self) -> bool {
        if self.try_lock() {
            return false;
        }
        let mut spins = 0u32;
        loop {
            while self.0.load(Ordering::Relaxed) {
                spins += 1;
                if spins.is_multiple_of(256) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            if self.try_lock() {
                return true;
            }
        }
    }

    /// Takes the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> bool {
        self.0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Lets go.
    #[inline]
    pub fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the encapsulator does with the outer DF bit (RFC 4301 §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DfMode {
    /// Copy DF from the inner IPv4 header (IPv6 inner: clear).
    Copy,
    /// Always set DF on the outer header (the default).
    #[default]
    Set,
    /// Never set DF (the outer packet may be fragmented on the way).
    Clear,
}

impl DfMode {
    /// Parses `copy` / `set` / `clear`.
    pub fn from_name(s: &str) -> Option<DfMode> {
        match s {
            "copy" => Some(DfMode::Copy),
            "set" => Some(DfMode::Set),
            "clear" => Some(DfMode::Clear),
            _ => None,
        }
    }
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            DfMode::Copy => "copy",
            DfMode::Set => "set",
            DfMode::Clear => "clear",
        }
    }
}

/// The outer header of a tunnel: addresses, UDP ports (RFC 3948), TTL and DF policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEndpoints {
    /// This gateway's black-side address (outer source).
    pub local: IpAddr,
    /// The peer gateway's black-side address (outer destination).
    pub remote: IpAddr,
    /// UDP source port (per-CPU SAs use base + core index so the peer can steer them).
    pub src_port: u16,
    /// UDP destination port (4500).
    pub dst_port: u16,
    /// Outer TTL / hop limit (RFC 4301 §5.1.2.1: set by the encapsulator; default 64).
    pub ttl: u8,
    /// DF policy for an IPv4 outer header.
    pub df: DfMode,
}

impl TunnelEndpoints {
    /// Endpoints with the defaults: ports 4500/4500, TTL 64, DF set.
    pub fn new(local: IpAddr, remote: IpAddr) -> Self {
        TunnelEndpoints {
            local,
            remote,
            src_port: esp::UDP_ENCAP_PORT,
            dst_port: esp::UDP_ENCAP_PORT,
            ttl: 64,
            df: DfMode::Set,
        }
    }

    /// Outer IP + UDP header length.
    pub fn outer_len(&self) -> usize {
        match self.local {
            IpAddr::V4(_) => ipv4::HEADER_LEN + udp::HEADER_LEN,
            IpAddr::V6(_) => ipv6::HEADER_LEN + udp::HEADER_LEN,
        }
    }
}

/// Per-SA traffic counters (owned by one worker: plain integers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaCounters {
    /// Packets processed successfully.
    pub packets: u64,
    /// Inner bytes of those packets.
    pub bytes: u64,
    /// Inbound: packets refused by the replay window (duplicates, too old).
    pub replay_drops: u64,
    /// Inbound: packets that failed authentication (forged, corrupted, wrong key).
    pub integrity_drops: u64,
    /// Inbound: authentic packets dropped for what they held (padding, next header, inner
    /// header; TFC dummy packets are not counted: they are meant to be discarded).
    pub other_drops: u64,
}

/// Sequence numbers reserved for one burst: `first`, `first + 1`, …, `first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqReservation {
    /// First number.
    pub first: u64,
    /// How many were granted (fewer than asked when the space is exhausted).
    pub count: u32,
    /// Fewer were granted because the durable reservation ran out (the persister is behind or
    /// cannot write), not because the sequence space is exhausted.
    pub unreserved: bool,
}

/// A sequence counter owned by one worker, or shared by several (fallback / shared mode).
#[derive(Debug)]
enum SeqCell {
    Owned(u64),
    Shared(Arc<AtomicU64>),
}

/// A replay window owned by one worker (per-CPU SAs: no lock), or shared behind a mutex
/// (fallback SA and `sa_mode = "shared"`: deliberately like a single kernel SA).
#[derive(Debug, Clone)]
pub enum WindowCell {
    /// Owned by this worker.
    Owned(ReplayWindow),
    /// Shared by every worker that uses the SA.
    Shared(Arc<Mutex<ReplayWindow>>),
}

impl From<ReplayWindow> for WindowCell {
    fn from(w: ReplayWindow) -> Self {
        WindowCell::Owned(w)
    }
}

fn lock(m: &Mutex<ReplayWindow>) -> std::sync::MutexGuard<'_, ReplayWindow> {
    // A poisoned window (a panic elsewhere while holding it) is still a valid window.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cold]
#[inline(never)]
fn shared_infer(m: &Mutex<ReplayWindow>, seq_lo: u32) -> Option<u64> {
    lock(m).infer(seq_lo)
}

#[cold]
#[inline(never)]
fn shared_check(m: &Mutex<ReplayWindow>, seq: u64) -> Result<(), ReplayError> {
    lock(m).check(seq)
}

#[cold]
#[inline(never)]
fn shared_esn(m: &Mutex<ReplayWindow>) -> bool {
    lock(m).esn()
}

#[cold]
#[inline(never)]
fn shared_commit(m: &Mutex<ReplayWindow>, seq: u64) -> Result<(), ReplayError> {
    lock(m).commit(seq)
}

impl WindowCell {
    // The owned window is the fast path (per-CPU SAs): inlined into the worker's decrypt
    // stage. The shared one takes a lock anyway; it stays out of line so the lock code does
    // not keep the owned path from being inlined.

    /// See [`ReplayWindow::infer`].
    #[inline(always)]
    pub fn infer(&self, seq_lo: u32) -> Option<u64> {
        match self {
            WindowCell::Owned(w) => w.infer(seq_lo),
            WindowCell::Shared(m) => shared_infer(m, seq_lo),
        }
    }
    /// See [`ReplayWindow::check`].
    #[inline(always)]
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        match self {
            WindowCell::Owned(w) => w.check(seq),
            WindowCell::Shared(m) => shared_check(m, seq),
        }
    }
    /// See [`ReplayWindow::commit`].
    #[inline(always)]
    pub fn commit(&mut self, seq: u64) -> Result<(), ReplayError> {
        match self {
            WindowCell::Owned(w) => w.commit(seq),
            WindowCell::Shared(m) => shared_commit(m, seq),
        }
    }
    /// Highest authenticated number.
    pub fn top(&self) -> u64 {
        match self {
            WindowCell::Owned(w) => w.top(),
            WindowCell::Shared(m) => lock(m).top(),
        }
    }
    /// Whether ESN is on.
    #[inline(always)]
    pub fn esn(&self) -> bool {
        match self {
            WindowCell::Owned(w) => w.esn(),
            WindowCell::Shared(m) => shared_esn(m),
        }
    }
    /// Window size.
    pub fn size(&self) -> u32 {
        match self {
            WindowCell::Owned(w) => w.size(),
            WindowCell::Shared(m) => lock(m).size(),
        }
    }
}

/// The sending half of an SA.
///
/// `repr(C)` with what a packet reads first and the key schedule last: with thousands of SAs
/// a burst prefetches every packet's SA, and [`OutboundSa::PREFETCH_BYTES`] from its start are
/// exactly the fields sealing reads (the `Cipher` enum is as large as its largest backend's
/// inline state, 560 bytes; intel-ipsec-mb's part of it is a pointer at its start).
#[repr(C)]
pub struct OutboundSa {
    /// Last sequence number used (0: none yet; RFC 4303 §3.3.3 starts the counter at 0).
    seq: SeqCell,
    /// Durable reservation (static keys): never send past its limit.
    guard: Option<Arc<SeqGuard>>,
    /// Shared and kept in wire order: held from reserving a burst's numbers until the burst
    /// is handed to the port ([`SendOrder`]).
    order: Option<Arc<SendOrder>>,
    /// Counters.
    pub counters: SaCounters,
    /// Outer header parameters.
    pub tunnel: TunnelEndpoints,
    /// Outer IP + UDP header with addresses, ports, TTL, protocol filled in.
    template: [u8; 48],
    /// One's-complement sum of the IPv4 template with TOS, length, ident, flags and checksum
    /// zeroed: the outer checksum is this plus four words (no pass over the header per packet).
    outer_sum: u32,
    /// SPI the peer chose.
    pub spi: u32,
    ip_id: u16,
    template_len: u8,
    /// Extended sequence numbers (RFC 4304).
    pub esn: bool,
    /// Other cores send on this SA too.
    shared: bool,
    /// Key schedule.
    pub cipher: Cipher,
}

impl OutboundSa {
    /// The bytes from the start of an `OutboundSa` a packet reads: every field but the key
    /// schedule, and the first line of that (what a burst's prefetch step asks for).
    pub const PREFETCH_BYTES: usize = std::mem::offset_of!(OutboundSa, cipher) + 64;
}

impl core::fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OutboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("cipher", &self.cipher)
            .field("esn", &self.esn)
            .field("tunnel", &self.tunnel)
            .field("last_seq", &self.last_seq())
            .finish()
    }
}

impl OutboundSa {
    /// A new SA whose first packet will carry sequence number 1.
    pub fn new(spi: u32, cipher: Cipher, esn: bool, tunnel: TunnelEndpoints) -> Self {
        let mut template = [0u8; 48];
        let len = tunnel.outer_len();
        match (tunnel.local, tunnel.remote) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let r = ipv4::Repr {
                    src: s,
                    dst: d,
                    protocol: ip_proto::UDP,
                    payload_len: 0,
                    ttl: tunnel.ttl,
                    tos: 0,
                    ident: 0,
                    dont_frag: false,
                };
                r.emit(&mut ipv4::Packet::new_unchecked(&mut template[..]));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let r = ipv6::Repr {
                    src: s,
                    dst: d,
                    next_header: ip_proto::UDP,
                    payload_len: 0,
                    hop_limit: tunnel.ttl,
                    traffic_class: 0,
                    flow_label: 0,
                };
                r.emit(&mut ipv6::Packet::new_unchecked(&mut template[..]));
            }
            // Configuration validation refuses mixed families; keep the template empty-safe.
            _ => {}
        }
        let ip_len = len - udp::HEADER_LEN;
        let mut u = udp::Packet::new_unchecked(&mut template[ip_len..len]);
        u.set_src_port(tunnel.src_port);
        u.set_dst_port(tunnel.dst_port);
        u.set_len(udp::HEADER_LEN as u16);
        u.set_checksum(0);
        let outer_sum = {
            let mut h = [0u8; 20];
            h.copy_from_slice(&template[..20]);
            for i in [1, 2, 3, 4, 5, 6, 7, 10, 11] {
                h[i] = 0;
            }
            espada_wire::checksum::sum(&h)
        };
        OutboundSa {
            spi,
            cipher,
            esn,
            tunnel,
            counters: SaCounters::default(),
            seq: SeqCell::Owned(0),
            template,
            template_len: len as u8,
            outer_sum,
            ip_id: (spi as u16) ^ 0x5a5a,
            guard: None,
            shared: false,
            order: None,
        }
    }

    /// Binds the SA to a durable reservation: it resumes after the last number any sender of
    /// this SA used (or the previous run's durable limit) and never goes past the limit.
    pub fn with_seq_guard(self, guard: Arc<SeqGuard>) -> Self {
        let resume = guard.used().max(self.last_seq());
        let mut s = self.with_last_seq(resume);
        s.guard = Some(guard);
        s
    }

    /// Resumes at a given counter (the next packet carries `last_used + 1`): tests, and
    /// restoring state.
    pub fn with_last_seq(mut self, last_used: u64) -> Self {
        self.seq = match self.seq {
            SeqCell::Owned(_) => SeqCell::Owned(last_used),
            SeqCell::Shared(a) => {
                a.fetch_max(last_used, Ordering::Relaxed);
                SeqCell::Shared(a)
            }
        };
        self
    }

    /// Makes this SA share its sequence counter with every other `OutboundSa` holding the same
    /// counter (the fallback SA, and `sa_mode = "shared"`): one atomic per burst, like a single
    /// kernel SA used from every CPU.
    pub fn with_shared_seq(mut self, counter: Arc<AtomicU64>) -> Self {
        self.seq = SeqCell::Shared(counter);
        self.shared = true;
        self
    }

    /// Says whether other cores send on this SA too. An SA built from the SA database always
    /// counts on its key's one counter (an atomic, [`crate::db::OutState`]); for a per-CPU SA
    /// only its own core touches it.
    pub fn shared_by_cores(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Whether other cores send on this SA too (the fallback SA, `sa_mode = "shared"`).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Keeps this shared SA's packets in sequence order on the wire: every core sending on it
    /// holds `order` from reserving a burst's numbers until the burst is transmitted.
    pub fn with_send_order(mut self, order: Option<Arc<SendOrder>>) -> Self {
        self.order = order;
        self
    }

    /// The lock a core holds while it reserves, seals and transmits a burst on this SA, when
    /// the SA is shared and kept in wire order.
    #[inline]
    pub fn send_order(&self) -> Option<&Arc<SendOrder>> {
        self.order.as_ref()
    }

    /// The highest sequence number this SA may ever send: 2^32−1, or 2^64−1 with ESN
    /// (RFC 4303 §3.3.3: the counter must never cycle).
    pub fn max_seq(&self) -> u64 {
        if self.esn {
            u64::MAX
        } else {
            u32::MAX as u64
        }
    }

    /// Last number used.
    pub fn last_seq(&self) -> u64 {
        match &self.seq {
            SeqCell::Owned(v) => *v,
            SeqCell::Shared(a) => a.load(Ordering::Relaxed),
        }
    }

    /// Reserves up to `n` consecutive sequence numbers for one burst. Grants fewer (possibly
    /// zero) when the space is exhausted: the caller drops the rest as `SeqCycled`, because a
    /// repeated number would repeat a GCM nonce under the same key.
    #[inline]
    pub fn reserve(&mut self, n: u32) -> SeqReservation {
        let space = self.max_seq();
        let (max, limited) = match &self.guard {
            Some(g) => {
                let l = g.limit();
                (l.min(space), l < space)
            }
            None => (space, false),
        };
        let r = match &mut self.seq {
            SeqCell::Owned(last) => {
                let count = (n as u64).min(max.saturating_sub(*last)) as u32;
                let first = last.wrapping_add(1);
                *last += count as u64;
                SeqReservation {
                    first,
                    count,
                    unreserved: false,
                }
            }
            SeqCell::Shared(a) => {
                let mut cur = a.load(Ordering::Relaxed);
                loop {
                    let count = (n as u64).min(max.saturating_sub(cur)) as u32;
                    if count == 0 {
                        break SeqReservation {
                            first: cur.wrapping_add(1),
                            count,
                            unreserved: false,
                        };
                    }
                    match a.compare_exchange_weak(
                        cur,
                        cur + count as u64,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => {
                            break SeqReservation {
                                first: cur + 1,
                                count,
                                unreserved: false,
                            }
                        }
                        Err(now) => cur = now,
                    }
                }
            }
        };
        match &self.guard {
            Some(g) => {
                if r.count > 0 {
                    g.note_used(r.first + r.count as u64 - 1);
                }
                SeqReservation {
                    unreserved: limited && r.count < n,
                    ..r
                }
            }
            None => r,
        }
    }

    /// Asks the CPU for the state a reservation reads besides the SA itself: the key's one
    /// sequence counter and the durable reservation, each an allocation of its own (a burst's
    /// prefetch step, with thousands of SAs).
    #[inline(always)]
    pub fn prefetch_seq(&self) {
        if let SeqCell::Shared(a) = &self.seq {
            crate::prefetch::read(Arc::as_ptr(a));
        }
        if let Some(g) = &self.guard {
            crate::prefetch::read(Arc::as_ptr(g));
        }
    }

    /// The prebuilt outer IP + UDP header.
    #[inline]
    pub fn outer_template(&self) -> &[u8] {
        &self.template[..self.template_len as usize]
    }

    /// The outer IPv4 header checksum for the template with these four fields filled in
    /// (RFC 1071 sums are order-free, so the fixed part is summed once, in [`OutboundSa::new`]).
    #[inline]
    pub fn outer_v4_checksum(&self, tos: u8, total_len: u16, ident: u16, dont_frag: bool) -> u16 {
        let s = self.outer_sum
            + tos as u32
            + total_len as u32
            + ident as u32
            + if dont_frag { 0x4000 } else { 0 };
        espada_wire::checksum::finish(s)
    }

    /// Next IPv4 identification value for the outer header.
    #[inline]
    pub fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Whether the key is AES-256.
    pub fn algorithm(&self) -> espada_crypto::Algorithm {
        self.cipher.algorithm()
    }
}

/// The receiving half of an SA.
#[repr(C)]
pub struct InboundSa {
    /// Anti-replay window (its `esn()` says whether ESN is on).
    pub window: WindowCell,
    /// Counters.
    pub counters: SaCounters,
    /// Our SPI.
    pub spi: u32,
    /// Key schedule (last, as in [`OutboundSa`]).
    pub cipher: Cipher,
}

impl InboundSa {
    /// The bytes from the start of an `InboundSa` a packet reads (as
    /// [`OutboundSa::PREFETCH_BYTES`]).
    pub const PREFETCH_BYTES: usize = std::mem::offset_of!(InboundSa, cipher) + 64;
}

impl core::fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("cipher", &self.cipher)
            .field("window", &self.window)
            .finish()
    }
}

impl InboundSa {
    /// Asks the CPU for the replay-window block that `seq_lo`'s bit lives in (a burst's
    /// prefetch step; an owned window only: a shared one is behind its lock).
    #[inline(always)]
    pub fn prefetch_window(&self, seq_lo: u32) {
        if let WindowCell::Owned(w) = &self.window {
            w.prefetch(seq_lo);
        }
    }

    /// A new inbound SA with an empty window of `window` packets.
    pub fn new(spi: u32, cipher: Cipher, esn: bool, window: u32) -> Self {
        InboundSa {
            spi,
            cipher,
            window: ReplayWindow::new(window, esn).into(),
            counters: SaCounters::default(),
        }
    }

    /// Whether ESN is on.
    pub fn esn(&self) -> bool {
        self.window.esn()
    }

    /// Shares the window with every other `InboundSa` holding the same one.
    pub fn with_shared_window(mut self, w: Arc<Mutex<ReplayWindow>>) -> Self {
        self.window = WindowCell::Shared(w);
        self
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use espada_crypto::{Algorithm, Backend, KeyMaterial};

    fn cipher() -> Cipher {
        Cipher::new(
            Backend::Ring,
            &KeyMaterial::new(Algorithm::AesGcm128, &[1; 20]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn sequence_starts_at_one_and_never_cycles() {
        let t = TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut sa = OutboundSa::new(1, cipher(), false, t);
        assert_eq!(
            sa.reserve(4),
            SeqReservation {
                first: 1,
                count: 4,
                unreserved: false
            }
        );
        assert_eq!(
            sa.reserve(2),
            SeqReservation {
                first: 5,
                count: 2,
                unreserved: false
            }
        );
        let mut sa = OutboundSa::new(1, cipher(), false, t).with_last_seq(u32::MAX as u64 - 3);
        assert_eq!(sa.reserve(32).count, 3);
        assert_eq!(sa.reserve(32).count, 0);
        assert_eq!(sa.last_seq(), u32::MAX as u64);
        // ESN goes past 2^32 and stops at 2^64-1.
        let mut sa = OutboundSa::new(1, cipher(), true, t).with_last_seq(u32::MAX as u64 - 1);
        assert_eq!(
            sa.reserve(4),
            SeqReservation {
                first: u32::MAX as u64,
                count: 4,
                unreserved: false,
            }
        );
        let mut sa = OutboundSa::new(1, cipher(), true, t).with_last_seq(u64::MAX - 1);
        assert_eq!(sa.reserve(4).count, 1);
        assert_eq!(sa.reserve(4).count, 0);
    }

    #[test]
    fn shared_counter_hands_out_each_number_once() {
        let t = TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let c = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut sa = OutboundSa::new(1, cipher(), false, t).with_shared_seq(c);
                    let mut got = Vec::new();
                    for _ in 0..1000 {
                        let r = sa.reserve(7);
                        got.extend(r.first..r.first + r.count as u64);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=28_000).collect::<Vec<_>>());
        // exhaustion is respected across sharers
        let c = Arc::new(AtomicU64::new(u32::MAX as u64 - 2));
        let mut a = OutboundSa::new(1, cipher(), false, t).with_shared_seq(c.clone());
        let mut b = OutboundSa::new(1, cipher(), false, t).with_shared_seq(c);
        assert_eq!(a.reserve(2).count, 2);
        assert_eq!(b.reserve(2).count, 0);
    }

    #[test]
    fn shared_window_is_one_window() {
        let w = Arc::new(Mutex::new(ReplayWindow::new(64, false)));
        let mut a = InboundSa::new(1, cipher(), false, 64).with_shared_window(w.clone());
        let b = InboundSa::new(1, cipher(), false, 64).with_shared_window(w);
        a.window.commit(5).unwrap();
        assert_eq!(b.window.check(5), Err(ReplayError::Duplicate));
        assert_eq!(b.window.top(), 5);
    }

    #[test]
    fn templates() {
        let t = TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let sa = OutboundSa::new(1, cipher(), false, t);
        let tpl = sa.outer_template();
        assert_eq!(tpl.len(), 28);
        let ip = ipv4::Packet::new_unchecked(tpl);
        assert_eq!(ip.protocol(), 17);
        assert_eq!(ip.ttl(), 64);
        let u = udp::Packet::new_unchecked(&tpl[20..]);
        assert_eq!((u.src_port(), u.dst_port()), (4500, 4500));
        let t6 = TunnelEndpoints::new(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        );
        let sa6 = OutboundSa::new(1, cipher(), false, t6);
        assert_eq!(sa6.outer_template().len(), 48);
        assert_eq!(
            ipv6::Packet::new_unchecked(sa6.outer_template()).next_header(),
            17
        );
        assert!(!format!("{sa6:?}").contains("0101"));
    }
}
