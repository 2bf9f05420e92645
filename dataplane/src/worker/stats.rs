//! A worker's counters: plain integers while a burst runs ([`WorkerStats`]), published every
//! few polls into a cache-padded, lock-free cell ([`StatsCell`]) that reporters on other
//! threads read.

use crate::drop::{DropCounters, DropReason};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters of one worker. Plain integers while a burst runs; published to a [`StatsCell`] once
/// per burst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Frames received on red.
    pub red_rx: u64,
    /// Frames received on black.
    pub black_rx: u64,
    /// Frames sent on red.
    pub red_tx: u64,
    /// Frames sent on black.
    pub black_tx: u64,
    /// Packets encapsulated.
    pub encap_packets: u64,
    /// Inner bytes encapsulated.
    pub encap_bytes: u64,
    /// Packets decapsulated (authentic, delivered to red).
    pub decap_packets: u64,
    /// Inner bytes decapsulated.
    pub decap_bytes: u64,
    /// Packets forwarded in the clear by bypass policies.
    pub bypass_packets: u64,
    /// Packets handed to another core's SA.
    pub handoff_out: u64,
    /// Packets taken from the handoff queue.
    pub handoff_in: u64,
    /// IKE messages passed to the control plane.
    pub to_control: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// ARP requests sent.
    pub arp_requests: u64,
    /// ICMP and ICMPv6 errors sent.
    pub icmp_sent: u64,
    /// IPv6 neighbor advertisements sent (answers to solicitations for our addresses).
    pub nd_adverts: u64,
    /// IPv6 neighbor solicitations sent (address resolution of next hops).
    pub nd_solicits: u64,
    /// Bursts on a shared SA that waited for another core to put its own burst on the wire
    /// first (`SendOrder`, the tunnel's `shared_sa_order = "wire"`).
    pub order_waits: u64,
    /// Bursts that carried at least one packet.
    pub bursts: u64,
    /// Nanoseconds spent in those bursts.
    pub busy_ns: u64,
    /// Nanoseconds in the red stage (receive, classify, policy, seal) of bursts with red
    /// packets: ÷ `red_rx` is the encap path's cost per packet, transmit left out.
    pub red_ns: u64,
    /// Nanoseconds in the black stage (receive, SA lookup, open, checks) of bursts with black
    /// packets: ÷ `black_rx` is the decap path's cost per packet.
    pub black_ns: u64,
    /// Drops by reason.
    pub drops: DropCounters,
}

const N_FIELDS: usize = 22;

/// Lock-free published copy of a worker's [`WorkerStats`] (written by its worker only).
///
/// Cache-padded: each cell starts on its own 128-byte boundary (two lines, as the adjacent-line
/// prefetcher pairs them) and no other data shares its lines, so one worker's stores never
/// invalidate a line another worker or the reporter is using for something else.
#[derive(Debug)]
#[repr(align(128))]
pub struct StatsCell {
    vals: [AtomicU64; N_FIELDS],
    drops: [AtomicU64; DropReason::COUNT],
    /// Per-SA counters, refreshed every few hundred bursts: (direction, SPI, packets, bytes).
    pub sas: Mutex<Vec<SaStat>>,
    /// The red and black port queues' counters, refreshed with the SA counters.
    pub ports: Mutex<[crate::port::PortStats; 2]>,
    /// Counts the worker's publications (every 16 polls, and every idle poll): a worker that
    /// stops polling stops it, which the service manager's watchdog is told.
    heartbeat: AtomicU64,
}

/// Counters of one SA as a worker saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaStat {
    /// `true` for outbound.
    pub outbound: bool,
    /// SPI.
    pub spi: u32,
    /// UDP source port (outbound).
    pub port: u16,
    /// Packets.
    pub packets: u64,
    /// Inner bytes.
    pub bytes: u64,
    /// Outbound: last sequence number used; inbound: top of the replay window.
    pub seq: u64,
    /// Inbound: replay window size (0: anti-replay off); outbound: 0.
    pub window: u32,
    /// Extended sequence numbers.
    pub esn: bool,
    /// When this worker last saw the SA carry a packet (UNIX seconds; 0: not yet).
    pub last_use: u64,
    /// Inbound: drops on this SA (replay window, authentication, other).
    pub replay_drops: u64,
    /// See `replay_drops`.
    pub integrity_drops: u64,
    /// See `replay_drops`.
    pub other_drops: u64,
    /// When this worker installed the SA (UNIX seconds; its lifetimes count from here).
    pub added: u64,
    /// When this worker's soft and hard time limits fall (UNIX seconds; 0: no time limit).
    pub soft_at: u64,
    /// See `soft_at`.
    pub hard_at: u64,
    /// This worker no longer uses the SA (the fallback SA once the core has its own): the
    /// counters are what it sent before. Published in the same list as the live ones, so a
    /// reader never counts a packet twice or not at all.
    pub retired: bool,
}

impl Default for StatsCell {
    fn default() -> Self {
        StatsCell {
            vals: Default::default(),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            sas: Mutex::new(Vec::new()),
            ports: Mutex::new(Default::default()),
            heartbeat: AtomicU64::new(0),
        }
    }
}

impl WorkerStats {
    fn fields(&self) -> [u64; N_FIELDS] {
        [
            self.red_rx,
            self.black_rx,
            self.red_tx,
            self.black_tx,
            self.encap_packets,
            self.encap_bytes,
            self.decap_packets,
            self.decap_bytes,
            self.bypass_packets,
            self.handoff_out,
            self.handoff_in,
            self.to_control,
            self.arp_replies,
            self.arp_requests,
            self.icmp_sent,
            self.bursts,
            self.busy_ns,
            self.nd_adverts,
            self.nd_solicits,
            self.order_waits,
            self.red_ns,
            self.black_ns,
        ]
    }
}

impl StatsCell {
    #[inline]
    pub(super) fn publish(&self, s: &WorkerStats) {
        // One writer: a load and a store, no locked instruction.
        let b = self.heartbeat.load(Ordering::Relaxed);
        self.heartbeat.store(b.wrapping_add(1), Ordering::Relaxed);
        for (a, v) in self.vals.iter().zip(s.fields()) {
            a.store(v, Ordering::Relaxed);
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            self.drops[i].store(s.drops.get(*r), Ordering::Relaxed);
        }
    }

    /// The worker's publication count: moves while it polls.
    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Relaxed)
    }

    /// A consistent-enough copy for reports.
    pub fn read(&self) -> WorkerStats {
        let v: Vec<u64> = self
            .vals
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let mut d = DropCounters::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            d.add(*r, self.drops[i].load(Ordering::Relaxed));
        }
        WorkerStats {
            red_rx: v[0],
            black_rx: v[1],
            red_tx: v[2],
            black_tx: v[3],
            encap_packets: v[4],
            encap_bytes: v[5],
            decap_packets: v[6],
            decap_bytes: v[7],
            bypass_packets: v[8],
            handoff_out: v[9],
            handoff_in: v[10],
            to_control: v[11],
            arp_replies: v[12],
            arp_requests: v[13],
            icmp_sent: v[14],
            bursts: v[15],
            busy_ns: v[16],
            nd_adverts: v[17],
            nd_solicits: v[18],
            order_waits: v[19],
            red_ns: v[20],
            black_ns: v[21],
            drops: d,
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stats_cells_never_share_a_cache_line() {
        assert_eq!(std::mem::align_of::<StatsCell>(), 128);
        assert_eq!(std::mem::size_of::<StatsCell>() % 128, 0);
        let cells: Vec<Arc<StatsCell>> = (0..8).map(|_| Arc::new(StatsCell::default())).collect();
        for c in &cells {
            assert_eq!(Arc::as_ptr(c) as usize % 128, 0);
        }
    }
}
