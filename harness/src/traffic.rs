//! Red-side traffic for in-process runs, like the TRex generator and sink of the lab:
//! [`Generator`] is sunset (it "receives" frames the gateway must protect) and [`Sink`] is
//! sunrise (it checks every frame the far gateway delivers).

use crossbeam_utils::CachePadded;
use espada_dataplane::pktbuf::{PacketBuf, PktBuf};
use espada_dataplane::pool::PoolCache;
use espada_dataplane::port::{PortQueue, PortStats};
use espada_wire::ethernet::{self, MacAddr};
use espada_wire::{ipv4, udp};
use hdrhistogram::Histogram;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const MAGIC: u32 = 0xe5ada001;

/// What the generator sends.
#[derive(Debug, Clone, Copy)]
pub struct TrafficSpec {
    /// Source host (sunset).
    pub src: Ipv4Addr,
    /// Destination host (sunrise).
    pub dst: Ipv4Addr,
    /// Source MAC (sunset's).
    pub src_mac: MacAddr,
    /// Inner IP packet size in bytes (at least 44: IPv4 + UDP + the 16-byte tag).
    pub size: usize,
    /// Number of flows (distinct UDP source ports).
    pub flows: u16,
    /// Stop after this many packets (`None`: unlimited).
    pub limit: Option<u64>,
    /// Packets per second per generator queue (`None`: as fast as the worker takes them).
    pub rate: Option<f64>,
    /// IMIX: inner sizes 64, 594 and 1518 bytes in the ratio 7:4:1 (overrides `size`).
    pub imix: bool,
    /// Tunnels the traffic goes to (0: `src` to `dst`). With N ≥ 1, packet i goes to
    /// tunnel k = i mod N (or N − 1 only, with `tunnel_last`): from [`tunnel_host`]`(SRC, k)`
    /// to [`tunnel_host`]`(DST, k)`, the subnets of `pair::lab`'s N tunnels.
    pub tunnels: u32,
    /// Every packet to the last of the `tunnels` (its policy is the SPD's last).
    pub tunnel_last: bool,
}

/// Host 10 of tunnel `k`'s /24 on side `base` ([`TUNNEL_SRC_BASE`] or [`TUNNEL_DST_BASE`]).
#[inline]
pub fn tunnel_host(base: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(base + (k << 8) + 10)
}

/// West's subnets of the N-tunnel lab: 10.64.0.0/24, 10.64.1.0/24, … (up to 16 384 tunnels).
pub const TUNNEL_SRC_BASE: u32 = 0x0a40_0000;
/// East's subnets of the N-tunnel lab: 10.128.0.0/24, 10.128.1.0/24, …
pub const TUNNEL_DST_BASE: u32 = 0x0a80_0000;
/// Most tunnels of the N-tunnel lab.
pub const MAX_TUNNELS: u32 = 16_384;

/// IMIX pattern (7 × 64, 4 × 594, 1 × 1518), interleaved.
const IMIX: [usize; 12] = [64, 594, 64, 64, 594, 64, 1518, 64, 594, 64, 594, 64];

/// Queues of one side with counters of their own (queue `q` counts into slot `q % SLOTS`).
const SLOTS: usize = 64;

/// One queue's counters (cache-padded where they are kept: generators, and sinks, on
/// different cores never write the same line, as a real traffic generator's ports would not).
#[derive(Debug, Default)]
struct Slot {
    packets: AtomicU64,
    bytes: AtomicU64,
    bad: AtomicU64,
}

/// Counters shared between the generators (or the sinks) of one side and whoever reports on
/// them: each queue adds to its own slot; readers sum.
#[derive(Debug)]
pub struct TrafficCounters {
    slots: Box<[CachePadded<Slot>; SLOTS]>,
    /// Read by every generator each burst: on a line nothing writes in between.
    stop: CachePadded<AtomicBool>,
    /// One-way latency of sampled packets (generator → sink), nanoseconds.
    pub latency: Mutex<Option<Histogram<u64>>>,
    /// Time base shared by generator timestamps and sink clocks.
    pub epoch: OnceInstant,
}

impl Default for TrafficCounters {
    fn default() -> Self {
        TrafficCounters {
            slots: Box::new(std::array::from_fn(|_| CachePadded::default())),
            stop: CachePadded::default(),
            latency: Mutex::new(None),
            epoch: OnceInstant::default(),
        }
    }
}

/// An `Instant` fixed at creation (for timestamps in packets).
#[derive(Debug)]
pub struct OnceInstant(pub Instant);

impl Default for OnceInstant {
    fn default() -> Self {
        OnceInstant(Instant::now())
    }
}

impl TrafficCounters {
    fn sum(&self, field: impl Fn(&Slot) -> &AtomicU64) -> u64 {
        self.slots
            .iter()
            .map(|c| field(c).load(Ordering::Relaxed))
            .sum()
    }

    /// Packets generated / received intact, all queues.
    pub fn packets(&self) -> u64 {
        self.sum(|c| &c.packets)
    }

    /// Inner IP bytes, all queues.
    pub fn bytes(&self) -> u64 {
        self.sum(|c| &c.bytes)
    }

    /// Frames received that were not what was sent (wrong headers or tag), all queues.
    pub fn bad(&self) -> u64 {
        self.sum(|c| &c.bad)
    }

    /// Adds one burst's counts to queue `queue`'s slot.
    #[inline]
    pub fn add(&self, queue: u16, packets: u64, bytes: u64, bad: u64) {
        let c = &self.slots[queue as usize % SLOTS];
        c.packets.fetch_add(packets, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        if bad > 0 {
            c.bad.fetch_add(bad, Ordering::Relaxed);
        }
    }

    /// Makes the generators stop producing (so the pipes can drain).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::stop`] was called.
    #[inline]
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Merged latency percentiles (p50, p90, p99, p99.9, max) in microseconds, if sampled.
    pub fn latency_us(&self) -> Option<[f64; 5]> {
        let g = self.latency.lock().ok()?;
        let h = g.as_ref()?;
        if h.is_empty() {
            return None;
        }
        Some(
            [
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
            ]
            .map(|v| v as f64 / 1000.0),
        )
    }
}

/// Generates UDP frames addressed to the gateway's red MAC.
pub struct Generator {
    spec: TrafficSpec,
    gw_mac: MacAddr,
    queue: u16,
    next_seq: u64,
    flow: u16,
    sent: u64,
    counters: Arc<TrafficCounters>,
    stats: PortStats,
    started: Option<Instant>,
}

impl Generator {
    /// Generator queue `queue` (its flows are distinct from other queues').
    pub fn new(
        spec: TrafficSpec,
        gw_mac: MacAddr,
        queue: u16,
        counters: Arc<TrafficCounters>,
    ) -> Generator {
        Generator {
            spec,
            gw_mac,
            queue,
            next_seq: 0,
            flow: 0,
            sent: 0,
            counters,
            stats: PortStats::default(),
            started: None,
        }
    }

    fn size_of(&self, seq: u64) -> usize {
        if self.spec.imix {
            IMIX[(seq % IMIX.len() as u64) as usize]
        } else {
            self.spec.size.max(52)
        }
    }

    fn build(&mut self, b: &mut PktBuf) -> usize {
        let size = self.size_of(self.next_seq);
        let Some(d) = b.append(ethernet::HEADER_LEN + size) else {
            return 0;
        };
        let mut eth = ethernet::Frame::new_unchecked(&mut d[..]);
        eth.set_dst_addr(self.gw_mac);
        eth.set_src_addr(self.spec.src_mac);
        eth.set_ethertype(ethernet::ethertype::IPV4);
        let ip = &mut d[ethernet::HEADER_LEN..];
        let (src, dst) = if self.spec.tunnels > 0 {
            let n = self.spec.tunnels.min(MAX_TUNNELS);
            let k = if self.spec.tunnel_last {
                n - 1
            } else {
                (self.next_seq % n as u64) as u32
            };
            (
                tunnel_host(TUNNEL_SRC_BASE, k),
                tunnel_host(TUNNEL_DST_BASE, k),
            )
        } else {
            (self.spec.src, self.spec.dst)
        };
        let r = ipv4::Repr {
            src,
            dst,
            protocol: 17,
            payload_len: size - 20,
            ttl: 64,
            tos: 0,
            ident: self.next_seq as u16,
            dont_frag: true,
        };
        r.emit(&mut ipv4::Packet::new_unchecked(&mut ip[..]));
        let flow = self.queue.wrapping_mul(1024).wrapping_add(self.flow);
        let mut u = udp::Packet::new_unchecked(&mut ip[20..]);
        u.set_src_port(10000u16.wrapping_add(flow));
        u.set_dst_port(5201);
        u.set_len((size - 20) as u16);
        u.set_checksum(0);
        let tag = &mut ip[28..44];
        tag[..4].copy_from_slice(&MAGIC.to_be_bytes());
        tag[4..8].copy_from_slice(&(flow as u32).to_be_bytes());
        tag[8..16].copy_from_slice(&self.next_seq.to_be_bytes());
        // Every 64th packet carries its send time for the sink's latency histogram.
        if self.next_seq.is_multiple_of(64) {
            let t = self.counters.epoch.0.elapsed().as_nanos() as u64;
            ip[44..52].copy_from_slice(&t.to_be_bytes());
        }
        self.next_seq += 1;
        self.flow = (self.flow + 1) % self.spec.flows.max(1);
        size
    }
}

impl PortQueue for Generator {
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let mut n = match self.spec.limit {
            _ if self.counters.stopped() => 0,
            Some(l) => (l - self.sent).min(max as u64) as usize,
            None => max,
        };
        if let Some(rate) = self.spec.rate {
            // Paced: only what the rate allows since the first burst (one clock read per burst).
            let t0 = *self.started.get_or_insert_with(Instant::now);
            let allowed = (t0.elapsed().as_secs_f64() * rate) as u64;
            n = n.min(allowed.saturating_sub(self.sent) as usize);
        }
        let mut made = 0;
        let mut bytes = 0;
        for _ in 0..n {
            let Some(mut b) = pool.get() else { break };
            let sz = self.build(&mut b);
            if sz > 0 {
                out.push(b);
                made += 1;
                bytes += sz;
            } else {
                pool.put(b);
                break;
            }
        }
        self.sent += made as u64;
        self.stats.rx_packets += made as u64;
        self.stats.rx_bytes += (bytes + made * 14) as u64;
        self.counters.add(self.queue, made as u64, bytes as u64, 0);
        made
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        // Whatever the gateway sends towards sunset (ICMP errors, ARP) is accepted and freed.
        let n = pkts.len();
        self.stats.tx_packets += n as u64;
        pool.put_burst(pkts);
        n
    }

    /// The gateway's address on this port (sunset sends to it).
    fn mac(&self) -> MacAddr {
        self.gw_mac
    }

    fn stats(&self) -> PortStats {
        self.stats
    }

    fn describe(&self) -> String {
        format!("generator/q{}", self.queue)
    }
}

/// Checks and counts what arrives at sunrise.
pub struct Sink {
    mac: MacAddr,
    dst: Ipv4Addr,
    queue: u16,
    counters: Arc<TrafficCounters>,
    stats: PortStats,
    hist: Histogram<u64>,
    /// Which bits of a packet's destination must equal `dst`'s.
    dst_mask: u32,
}

impl Sink {
    /// Sink queue `queue`, expecting frames for `mac` carrying packets to `dst`.
    pub fn new(mac: MacAddr, dst: Ipv4Addr, queue: u16, counters: Arc<TrafficCounters>) -> Sink {
        // 1 ns .. 10 s, 3 significant digits: allocated once here, never resized.
        let hist =
            Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid histogram bounds");
        Sink {
            mac,
            dst,
            queue,
            counters,
            stats: PortStats::default(),
            hist,
            dst_mask: u32::MAX,
        }
    }

    /// Also accepts packets to any address `dst` shares its first `len` bits with (the hosts
    /// of the N-tunnel lab's subnets).
    pub fn accepting_prefix(mut self, dst: Ipv4Addr, len: u8) -> Sink {
        self.dst = dst;
        self.dst_mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - len.min(32) as u32)
        };
        self
    }

    fn merge(&mut self) {
        if self.hist.is_empty() {
            return;
        }
        if let Ok(mut g) = self.counters.latency.lock() {
            match g.as_mut() {
                Some(h) => {
                    let _ = h.add(&self.hist);
                }
                None => *g = Some(self.hist.clone()),
            }
        }
        self.hist.reset();
    }

    fn intact(&mut self, f: &[u8]) -> Option<usize> {
        let eth = ethernet::Frame::new_checked(f).ok()?;
        if eth.dst_addr() != self.mac || eth.ethertype() != ethernet::ethertype::IPV4 {
            return None;
        }
        let ip = ipv4::Packet::new_checked(eth.payload()).ok()?;
        let to_us = (u32::from(ip.dst_addr()) ^ u32::from(self.dst)) & self.dst_mask == 0;
        if !ip.verify_checksum() || !to_us || ip.protocol() != 17 {
            return None;
        }
        let p = ip.payload();
        if p.len() < 24 || u32::from_be_bytes([p[8], p[9], p[10], p[11]]) != MAGIC {
            return None;
        }
        let seq = u64::from_be_bytes([p[16], p[17], p[18], p[19], p[20], p[21], p[22], p[23]]);
        if seq.is_multiple_of(64) && p.len() >= 32 {
            let sent = u64::from_be_bytes([p[24], p[25], p[26], p[27], p[28], p[29], p[30], p[31]]);
            let now = self.counters.epoch.0.elapsed().as_nanos() as u64;
            let _ = self.hist.record(now.saturating_sub(sent).max(1));
        }
        Some(ip.total_len() as usize)
    }
}

impl PortQueue for Sink {
    fn rx_burst(&mut self, _pool: &mut PoolCache, _out: &mut Vec<PktBuf>, _max: usize) -> usize {
        0
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let (mut ok, mut bytes, mut bad) = (0u64, 0u64, 0u64);
        let n = pkts.len();
        for b in pkts.iter() {
            match self.intact(b.data()) {
                Some(len) => {
                    ok += 1;
                    bytes += len as u64;
                }
                None => bad += 1,
            }
        }
        pool.put_burst(pkts);
        self.stats.tx_packets += n as u64;
        self.counters.add(self.queue, ok, bytes, bad);
        n
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn stats(&self) -> PortStats {
        self.stats
    }

    fn describe(&self) -> String {
        format!("sink/q{}", self.queue)
    }

    fn finish(&mut self) {
        self.merge();
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn queues_count_apart_and_readers_see_the_sum() {
        let c = TrafficCounters::default();
        c.add(0, 3, 300, 0);
        c.add(1, 2, 200, 1);
        c.add(65, 1, 100, 0); // beyond the slots: shares slot 1, still counted
        assert_eq!((c.packets(), c.bytes(), c.bad()), (6, 600, 1));
        let (a, b) = (&*c.slots[0] as *const Slot, &*c.slots[1] as *const Slot);
        assert!(
            (b as usize - a as usize) >= 128,
            "each slot on lines of its own"
        );
        assert!(!c.stopped());
        c.stop();
        assert!(c.stopped());
    }
}
