//! The worker: one per core, pinned, polling its red and black queues and its handoff queue,
//! run to completion in bursts. Data flows one way on each side, a burst at a time, in stages:
//!
//! ```text
//! red   rx_burst → classify (L2, IPv4, SPD, SA, next hop, MTU) → encap (seqs, seal, Ethernet) → black tx_burst
//!                  └→ full path: ARP, IPv6, bypass, ICMP errors, fragmentation, drops
//! black rx_burst → classify (L2, IPv4/UDP 4500, local SPI) → decap → policy, TTL, Ethernet → red tx_burst
//!                  └→ full path: ARP/ND, IKE, handoff to the owning core, bypass, IPv6, drops
//! ```
//!
//! The classify stages change a buffer only once it is sure to take the fast path; anything
//! else reaches the full path as it arrived. A burst whose packets all take the fast path moves
//! from the receive list to the transmit list by swapping vectors: no buffer is moved one by
//! one.
//!
//! One file per stage: `red.rs` (classify, policy, SA, next hop) → `encap.rs` (sequence numbers,
//! seal, Ethernet) on the way out; `black.rs` (classify, SPI, decrypt) → `deliver.rs` (policy,
//! ECN, TTL, Ethernet) on the way in; `transmit.rs` for both. `red_full.rs` and `black_full.rs`
//! are the full paths, `l2.rs` ARP/ND and next hops. This file is the loop that calls them.
//!
//! Nothing here allocates, locks or makes a syscall per packet: buffers come from the pool,
//! the burst vectors are allocated once, the SA snapshot is checked once per burst.

use crate::drop::DropReason;
use crate::esp::{
    decapsulate, encapsulate_parsed, iv_from_seq, Decap, Encap, InboundLookup, InnerInfo,
};
use crate::neighbor::{emit_arp, NeighborCache, NeighborTable};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use crate::port::PortQueue;
use crossbeam_queue::ArrayQueue;
use espada_sadb::db::{AcquireQueue, CoreSas, EventQueue, Route, SaDbHandle};
use espada_sadb::selector::{Action, FlowKey, Prefix};
use espada_sadb::InboundSa;
use espada_wire::ethernet::{self, MacAddr};
use espada_wire::{arp, esp, icmpv4, icmpv6, ipv4, ipv6, udp};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

// One file per stage (see the module documentation for the order).
mod black;
mod black_full;
mod deliver;
mod encap;
mod hold;
mod l2;
mod red;
mod red_full;
mod stats;
mod transmit;

pub use stats::{SaStat, StatsCell, WorkerStats};

impl InboundLookup for CoreSas {
    #[inline(always)]
    fn lookup(&mut self, spi: u32) -> Option<&mut InboundSa> {
        self.inbound_mut(spi)
    }
}

/// One side (red or black) of a gateway.
#[derive(Debug, Clone, Copy)]
pub struct Side {
    /// The gateway's address on this side.
    pub ip: Ipv4Addr,
    /// The connected subnet.
    pub prefix: Prefix,
    /// MTU (IP bytes).
    pub mtu: u32,
    /// Next hop for destinations outside the subnet.
    pub gateway: Option<Ipv4Addr>,
    /// IPv6 on this side (dual stack), if configured.
    pub v6: Option<Side6>,
}

/// A side's IPv6 address, subnet and next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side6 {
    /// The gateway's address on this side.
    pub ip: Ipv6Addr,
    /// The connected subnet.
    pub prefix: Prefix,
    /// Next hop for destinations outside the subnet.
    pub gateway: Option<Ipv6Addr>,
}

impl Side {
    /// The IPv6 next hop for `dst`: itself if on-link, else the configured IPv6 gateway.
    /// `None` when this side has no IPv6.
    #[inline]
    pub fn next_hop6(&self, dst: Ipv6Addr) -> Option<Ipv6Addr> {
        let v6 = self.v6.as_ref()?;
        if v6.prefix.contains(IpAddr::V6(dst)) {
            Some(dst)
        } else {
            v6.gateway
        }
    }

    /// The next hop for `dst`: itself if on-link, else the configured gateway.
    #[inline]
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.prefix.contains_v4(dst) {
            Some(dst)
        } else {
            self.gateway
        }
    }
}

/// How often a worker publishes its SA counters at most (`show sa`, metrics, charon's
/// `query_sa`).
pub const SA_PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Everything a worker needs that is the same for all workers of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayShared {
    /// Cleartext side.
    pub red: Side,
    /// ESP side.
    pub black: Side,
    /// SA database.
    pub sadb: Arc<SaDbHandle>,
    /// ARP table.
    pub neighbors: Arc<NeighborTable>,
    /// IPv6 neighbor table (neighbor discovery).
    pub neighbors6: Arc<NeighborTable<Ipv6Addr>>,
    /// One handoff queue per worker (index = worker).
    pub handoff: Arc<Vec<ArrayQueue<PktBuf>>>,
    /// IKE messages for the control plane (never decrypted here).
    pub control: Arc<ArrayQueue<PktBuf>>,
    /// Whether IKE goes to a daemon (`espada run --ike-tun`): the control queue then carries
    /// whole IP packets (UDP 500 to us, UDP 4500 with the non-ESP marker, NAT-T keepalives),
    /// and `from_daemon` what the daemon sends (see `punt`).
    pub punt: bool,
    /// IP packets from the IKE daemon for black (worker 0 sends them).
    pub from_daemon: Arc<ArrayQueue<PktBuf>>,
    /// Lifetime events.
    pub events: Arc<EventQueue>,
    /// Acquires for SAs an IKE daemon has not negotiated yet (tunnels with `ike = true`).
    pub acquires: Arc<AcquireQueue>,
    /// Set to stop the workers.
    pub stop: Arc<AtomicBool>,
    /// ICMP "fragmentation needed" messages per second per worker (0 = never send).
    pub icmp_rate: u32,
    /// After 256 empty polls in a row, sleep this many microseconds before polling again
    /// (0: pure busy polling, for dedicated cores). Lets a shared host's kernel breathe.
    pub idle_sleep_us: u32,
    /// Raised by `espada clear`: each worker zeroes its counters (packets, drops, handoffs,
    /// bursts) when it sees a new value. SA packet and byte counters stay: lifetimes count on
    /// them.
    pub clear: Arc<std::sync::atomic::AtomicU64>,
}

/// Packets per burst (per queue).
pub const BURST: usize = 32;

/// Capacity of every packet list of a worker (receive, protect, transmit): room for a burst
/// whose packets are fragmented (DF clear, too big for black), and the same for all, so lists
/// can be swapped whole without ever growing.
const LIST_CAP: usize = BURST * 4;

/// A worker: one core's share of a gateway.
pub struct Worker {
    core: usize,
    shared: GatewayShared,
    sas: CoreSas,
    red: Box<dyn PortQueue>,
    black: Box<dyn PortQueue>,
    pool: PoolCache,
    rx: Vec<PktBuf>,
    /// Packets ready for ESP this burst, and beside each its tunnel, inner header facts and
    /// next hop's MAC. `rx`, `protect` and `black_tx` have one capacity, so a whole burst
    /// changes lists by a swap of vectors, never by moving buffers one by one.
    protect: Vec<PktBuf>,
    protect_meta: Vec<(usize, InnerInfo, MacAddr)>,
    /// The encapsulation stage's verdict per protect-list entry (allocated once).
    verdicts: Vec<Result<(), DropReason>>,
    red_tx: Vec<PktBuf>,
    black_tx: Vec<PktBuf>,
    stats: WorkerStats,
    cell: Arc<StatsCell>,
    epoch: Instant,
    polls: u64,
    icmp_tokens: u32,
    icmp_refill_s: u64,
    arp_last: [(Ipv4Addr, u64); 8],
    nd_last: [(Ipv6Addr, u64); 8],
    neigh: NeighborCache,
    neigh6: NeighborCache<Ipv6Addr>,
    /// The red and black ports' MACs (asked once, not through the port per packet).
    macs: [MacAddr; 2],
    /// The last tunnel endpoint resolved on black and its next hop's MAC: a burst to one peer
    /// resolves its next hop once, not per packet (cleared when a neighbor table changes).
    black_memo: Option<(IpAddr, MacAddr)>,
    /// The previous SA statistics while new ones are published (reused, never freed).
    sa_scratch: Vec<SaStat>,
    /// The last `espada clear` this worker applied.
    cleared: u64,
    /// When the SA counters were last published (every [`SA_PUBLISH_EVERY`] at most).
    sa_published: Option<Instant>,
    /// Packets waiting for their next hop ([`hold`]), made with room for [`hold::HOLD_MAX`].
    held: Vec<(PktBuf, hold::Held, u64)>,
    /// Burst latency (first receive to last transmit of a poll), sampled every 16th busy poll.
    latency: hdrhistogram::Histogram<u64>,
}

impl Worker {
    /// A worker for core index `core` with its two queues.
    pub fn new(
        core: usize,
        shared: GatewayShared,
        red: Box<dyn PortQueue>,
        black: Box<dyn PortQueue>,
        pool: PoolCache,
    ) -> Result<Worker, espada_sadb::db::DbError> {
        let sas = CoreSas::new(core, shared.sadb.load(), 0)?;
        let macs = [red.mac(), black.mac()];
        // DPDK ports: the worker's own packets come from the port's mempool too, so every
        // packet it sends leaves in place (no copy at transmit).
        #[cfg(feature = "dpdk")]
        let pool = {
            let mut pool = pool;
            if let Some(mp) = black.mbuf_pool().or_else(|| red.mbuf_pool()) {
                if !pool.uses_mbufs() {
                    pool.use_mbufs(mp);
                }
            }
            pool
        };
        Ok(Worker {
            core,
            icmp_tokens: shared.icmp_rate,
            shared,
            sas,
            red,
            black,
            pool,
            rx: Vec::with_capacity(LIST_CAP),
            protect: Vec::with_capacity(LIST_CAP),
            protect_meta: Vec::with_capacity(LIST_CAP),
            verdicts: Vec::with_capacity(LIST_CAP),
            red_tx: Vec::with_capacity(LIST_CAP),
            black_tx: Vec::with_capacity(LIST_CAP),
            stats: WorkerStats::default(),
            cell: Arc::new(StatsCell::default()),
            epoch: Instant::now(),
            polls: 0,
            icmp_refill_s: 0,
            arp_last: [(Ipv4Addr::UNSPECIFIED, 0); 8],
            nd_last: [(Ipv6Addr::UNSPECIFIED, 0); 8],
            neigh: NeighborCache::default(),
            neigh6: NeighborCache::default(),
            macs,
            black_memo: None,
            held: Vec::with_capacity(hold::HOLD_MAX),
            sa_scratch: Vec::new(),
            cleared: 0,
            sa_published: None,
            // 1 ns .. 1 s at 3 significant digits, allocated here once and never resized.
            latency: hdrhistogram::Histogram::new_with_bounds(1, 1_000_000_000, 3)
                .expect("valid bounds"),
        })
    }

    /// The published counters (for reporters on other threads).
    pub fn stats_cell(&self) -> Arc<StatsCell> {
        self.cell.clone()
    }

    /// Burst latency percentiles in microseconds (p50, p99, p99.9, max): time from the first
    /// receive to the last transmit of a poll, sampled every 16th busy poll.
    pub fn burst_latency_us(&self) -> Option<[f64; 4]> {
        let h = &self.latency;
        if h.is_empty() {
            return None;
        }
        Some(
            [
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
            ]
            .map(|v| v as f64 / 1000.0),
        )
    }

    /// This worker's core index.
    pub fn core(&self) -> usize {
        self.core
    }

    /// Counters so far.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// The worker's runtime SAs (reports, tests).
    pub fn sas(&self) -> &CoreSas {
        &self.sas
    }

    /// The two port queues (red, black), for their counters.
    pub fn ports(&self) -> (&dyn PortQueue, &dyn PortQueue) {
        (&*self.red, &*self.black)
    }

    /// Call first on the thread that will poll this worker: with DPDK buffers, the thread
    /// gets a DPDK lcore id (`rte_thread_register`) so the mempool's per-lcore cache serves it.
    pub fn thread_start(&mut self) {
        #[cfg(feature = "dpdk")]
        if self.pool.uses_mbufs() {
            crate::port::dpdk::register_thread();
        }
    }

    /// Runs until the stop flag is set, then finishes the burst in flight and returns.
    pub fn run(&mut self) {
        self.thread_start();
        let mut idle = 0u32;
        while !self.shared.stop.load(Ordering::Relaxed) {
            if self.poll() == 0 {
                idle += 1;
                if self.shared.idle_sleep_us > 0 && idle >= 256 {
                    // Only when nothing arrived for 256 polls: never between packets of a burst.
                    std::thread::sleep(std::time::Duration::from_micros(
                        self.shared.idle_sleep_us as u64,
                    ));
                } else {
                    std::hint::spin_loop();
                }
            } else {
                idle = 0;
            }
        }
        // Drain what is already queued for us, so nothing in flight is lost at shutdown.
        for _ in 0..4 {
            self.poll();
        }
        self.finish();
    }

    /// Publishes the final counters and lets the ports flush (call once, after the last poll).
    pub fn finish(&mut self) {
        self.cell.publish(&self.stats);
        self.publish_sa_stats();
        self.red.finish();
        self.black.finish();
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// One poll: at most one burst from red, one from black, one from the handoff queue.
    /// Returns the number of packets handled.
    pub fn poll(&mut self) -> usize {
        let t0 = Instant::now();
        let now_s = t0.duration_since(self.epoch).as_secs();
        self.polls += 1;
        // A control-plane change (snapshot) is picked up here, between bursts, at the next
        // poll: one relaxed load of the generation when nothing changed. (Every 64th poll
        // left an SA an IKE daemon had just installed unseen for milliseconds, long enough
        // for the peer to send on it after the exchange completed: a `no-sa` drop seen once
        // during lifetime rekeys in CI.)
        let _ = self.sas.sync(&self.shared.sadb, now_s);
        // A changed neighbor table (or SA set) also voids the tunnel next-hop memo.
        let changed =
            self.neigh.sync(&self.shared.neighbors) | self.neigh6.sync(&self.shared.neighbors6);
        if changed {
            self.black_memo = None;
            // Held packets whose next hop is known now go out with this poll.
            self.release_held();
        }
        let mut n = 0;

        // Red: cleartext in, ESP out.
        self.rx.clear();
        n += self.red.rx_burst(&mut self.pool, &mut self.rx, BURST);
        self.stats.red_rx += self.rx.len() as u64;
        let red_n = self.rx.len();
        let mut burst = std::mem::take(&mut self.rx);
        self.red_stage(&mut burst);
        self.rx = burst;
        // Per-stage time (`espada top`): one clock read per stage that carried packets.
        let mut t_stage = t0;
        if red_n > 0 {
            let t = Instant::now();
            self.stats.red_ns += t.duration_since(t_stage).as_nanos() as u64;
            t_stage = t;
        }

        // Black: ESP in, cleartext out.
        self.rx.clear();
        n += self.black.rx_burst(&mut self.pool, &mut self.rx, BURST);
        self.stats.black_rx += self.rx.len() as u64;
        let black_n = self.rx.len();
        let mut burst = std::mem::take(&mut self.rx);
        self.black_stage(&mut burst);
        self.rx = burst;
        if black_n > 0 {
            self.stats.black_ns += t_stage.elapsed().as_nanos() as u64;
        }

        // Packets other cores handed to the SAs this core owns.
        n += self.handoff_stage();

        // IKE the daemon sent (`espada run --ike-tun`): worker 0 sends it on black.
        if self.core == 0 && self.shared.punt {
            while self.black_tx.len() < BURST {
                let Some(b) = self.shared.from_daemon.pop() else {
                    break;
                };
                n += 1;
                self.send_from_daemon(b);
            }
        }

        self.transmit();

        if n > 0 {
            self.stats.bursts += 1;
            let dt = t0.elapsed().as_nanos() as u64;
            self.stats.busy_ns += dt;
            if self.stats.bursts.is_multiple_of(16) {
                let _ = self.latency.record(dt.max(1));
            }
        }
        if self.polls.is_multiple_of(256) {
            let clear = self.shared.clear.load(Ordering::Relaxed);
            if clear != self.cleared {
                self.cleared = clear;
                self.stats = WorkerStats::default();
                self.cell.publish(&self.stats);
            }
            self.sas.check_lifetimes(now_s, &self.shared.events);
            self.sas.raise_acquires(now_s, &self.shared.acquires);
            if self.core == 0 {
                self.refresh_neighbors();
            }
            // Held packets that waited too long are dropped (no-neighbor).
            self.release_held();
            // A few times a second is what readers need; with thousands of SAs a publication
            // costs a millisecond or two, so not every 256 polls. Past 8192 SAs it costs ~0.3 ms
            // per thousand (a cache miss or three per SA): the interval grows with the SAs, up to
            // a second, so publishing stays under ~3 % of the worker.
            let every = SA_PUBLISH_EVERY
                .saturating_mul((self.sa_scratch.len() / 8192).max(1) as u32)
                .min(std::time::Duration::from_secs(1));
            if self.sa_published.is_none_or(|t| t.elapsed() >= every) {
                self.sa_published = Some(Instant::now());
                self.publish_sa_stats();
            }
        }
        // Reporters read a few times a second: publishing every 16th poll keeps the stores
        // (and the cache line traffic to the reader) off most bursts.
        if self.polls.is_multiple_of(16) || n == 0 {
            self.cell.publish(&self.stats);
        }
        n
    }

    fn publish_sa_stats(&mut self) {
        if let Ok(mut p) = self.cell.ports.try_lock() {
            *p = [self.red.stats(), self.black.stats()];
        }
        if let Ok(mut v) = self.cell.sas.try_lock() {
            // Last use: now if the SA carried packets since the previous publication. The
            // previous list goes into the worker's scratch vector and the new one is built in
            // the published one: both keep their capacity (no allocation once warm). The SAs
            // come in the same order as last time unless the snapshot changed, so the previous
            // row of an SA is found at its own position; only after a change is an index built
            // (10 000 tunnels are ~80 000 rows: no sort, no search per row).
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let old = &mut self.sa_scratch;
            old.clear();
            old.extend(v.iter().copied());
            v.clear();
            let mut index: Option<HashMap<(bool, u32), usize>> = None;
            let mut last_use = |k: usize, outbound: bool, spi: u32, packets: u64| -> u64 {
                let same = |o: &SaStat| o.outbound == outbound && o.spi == spi && !o.retired;
                let at = match old.get(k) {
                    Some(o) if same(o) => Some(k),
                    _ => index
                        .get_or_insert_with(|| {
                            old.iter()
                                .enumerate()
                                .filter(|(_, o)| !o.retired)
                                .map(|(i, o)| ((o.outbound, o.spi), i))
                                .collect()
                        })
                        .get(&(outbound, spi))
                        .copied(),
                };
                match at {
                    Some(i) if old[i].packets == packets => old[i].last_use,
                    _ if packets == 0 => 0,
                    _ => unix,
                }
            };
            // Lifetime clocks run on the worker's own seconds; reports want UNIX time.
            let now_s = self.epoch.elapsed().as_secs();
            let times = |life: &espada_sadb::lifetime::LifetimeTracker| {
                let added = unix.saturating_sub(now_s.saturating_sub(life.installed_at()));
                let at = |l: Option<u64>| l.map_or(0, |s| added + s);
                (
                    added,
                    at(life.limits().soft.seconds),
                    at(life.limits().hard.seconds),
                )
            };
            for (o, st, life) in self.sas.outbound_states() {
                let last_use = last_use(v.len(), true, o.spi, o.counters.packets);
                if last_use != 0 {
                    st.note_use(last_use);
                }
                let (added, soft_at, hard_at) = times(life);
                v.push(SaStat {
                    outbound: true,
                    spi: o.spi,
                    port: o.tunnel.src_port,
                    packets: o.counters.packets,
                    bytes: o.counters.bytes,
                    seq: o.last_seq(),
                    esn: o.esn,
                    last_use,
                    added,
                    soft_at,
                    hard_at,
                    ..Default::default()
                });
            }
            for (spi, c) in self.sas.retired_outbound() {
                v.push(SaStat {
                    outbound: true,
                    spi,
                    packets: c.packets,
                    bytes: c.bytes,
                    retired: true,
                    ..Default::default()
                });
            }
            for (i, life) in self.sas.inbound_lives() {
                let last_use = last_use(v.len(), false, i.spi, i.counters.packets);
                let (added, soft_at, hard_at) = times(life);
                v.push(SaStat {
                    outbound: false,
                    spi: i.spi,
                    packets: i.counters.packets,
                    bytes: i.counters.bytes,
                    seq: i.window.top(),
                    window: i.window.size(),
                    esn: i.esn(),
                    last_use,
                    replay_drops: i.counters.replay_drops,
                    integrity_drops: i.counters.integrity_drops,
                    other_drops: i.counters.other_drops,
                    added,
                    soft_at,
                    hard_at,
                    retired: false,
                    ..Default::default()
                });
            }
        }
    }

    #[inline]
    fn drop_pkt(&mut self, b: PktBuf, r: DropReason) {
        self.stats.drops.inc(r);
        self.pool.put(b);
    }

    /// A buffer this worker is about to give away for longer than this poll (to another
    /// core's handoff queue, to the control path). A slot of a kernel receive ring must not be
    /// kept (the kernel stops at it), so its packet is copied into a pool buffer first; every
    /// other buffer goes as it is. `None`: no buffer for the copy (counted as `no-buffer`).
    #[inline]
    fn keepable(&mut self, b: PktBuf) -> Option<PktBuf> {
        if b.is_ring_slot() {
            self.copy_slot_out(b)
        } else {
            Some(b)
        }
    }

    #[cold]
    fn copy_slot_out(&mut self, b: PktBuf) -> Option<PktBuf> {
        match b.copy_out(&mut self.pool) {
            Ok(c) => Some(c),
            Err(b) => {
                self.drop_pkt(b, DropReason::NoBuffer);
                None
            }
        }
    }
}
