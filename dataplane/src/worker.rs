//! The worker: one per core, pinned, polling its red and black queues and its handoff queue,
//! run to completion in bursts. Data flows one way on each side:
//!
//! ```text
//! red   rx_burst → Ethernet/ARP → SPD → per-CPU SA → ESP encap → Ethernet → black tx_burst
//! black rx_burst → Ethernet/ARP → IPv4/UDP 4500 → SPI route ─┬→ ESP decap → policy check → red tx_burst
//!                                                          └→ handoff to the owning core
//! ```
//!
//! Nothing here allocates, locks or makes a syscall per packet: buffers come from the pool,
//! the burst vectors are allocated once, the SA snapshot is checked once per burst.

use crate::drop::{DropCounters, DropReason};
use crate::esp::{
    decapsulate, encapsulate_parsed, iv_from_seq, Decap, Encap, InboundLookup, InnerInfo,
};
use crate::neighbor::{emit_arp, NeighborCache, NeighborTable};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use crate::port::PortQueue;
use crossbeam_queue::ArrayQueue;
use espada_sadb::db::{CoreSas, EventQueue, Route, SaDbHandle};
use espada_sadb::selector::{Action, FlowKey, Prefix};
use espada_sadb::InboundSa;
use espada_wire::ethernet::{self, MacAddr};
use espada_wire::{arp, esp, icmpv4, ipv4, udp};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
}

impl Side {
    /// The next hop for `dst`: itself if on-link, else the configured gateway.
    #[inline]
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if self.prefix.contains(IpAddr::V4(dst)) {
            Some(dst)
        } else {
            self.gateway
        }
    }
}

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
    /// One handoff queue per worker (index = worker).
    pub handoff: Arc<Vec<ArrayQueue<PktBuf>>>,
    /// IKE messages for the control plane (never decrypted here).
    pub control: Arc<ArrayQueue<PktBuf>>,
    /// Lifetime events.
    pub events: Arc<EventQueue>,
    /// Set to stop the workers.
    pub stop: Arc<AtomicBool>,
    /// ICMP "fragmentation needed" messages per second per worker (0 = never send).
    pub icmp_rate: u32,
    /// After 256 empty polls in a row, sleep this many microseconds before polling again
    /// (0: pure busy polling, for dedicated cores). Lets a shared host's kernel breathe.
    pub idle_sleep_us: u32,
}

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
    /// ICMP errors sent.
    pub icmp_sent: u64,
    /// Bursts that carried at least one packet.
    pub bursts: u64,
    /// Nanoseconds spent in those bursts.
    pub busy_ns: u64,
    /// Drops by reason.
    pub drops: DropCounters,
}

const N_FIELDS: usize = 17;

/// Lock-free published copy of a worker's [`WorkerStats`] (written by its worker only).
#[derive(Debug)]
pub struct StatsCell {
    vals: [AtomicU64; N_FIELDS],
    drops: [AtomicU64; DropReason::COUNT],
    /// Per-SA counters, refreshed every few hundred bursts: (direction, SPI, packets, bytes).
    pub sas: Mutex<Vec<SaStat>>,
    /// The red and black port queues' counters, refreshed with the SA counters.
    pub ports: Mutex<[crate::port::PortStats; 2]>,
}

/// Counters of one SA as a worker saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Default for StatsCell {
    fn default() -> Self {
        StatsCell {
            vals: Default::default(),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            sas: Mutex::new(Vec::new()),
            ports: Mutex::new(Default::default()),
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
        ]
    }
}

impl StatsCell {
    #[inline]
    fn publish(&self, s: &WorkerStats) {
        for (a, v) in self.vals.iter().zip(s.fields()) {
            a.store(v, Ordering::Relaxed);
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            self.drops[i].store(s.drops.get(*r), Ordering::Relaxed);
        }
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
            drops: d,
        }
    }
}

/// Packets per burst (per queue).
pub const BURST: usize = 32;

/// A worker: one core's share of a gateway.
pub struct Worker {
    core: usize,
    shared: GatewayShared,
    sas: CoreSas,
    red: Box<dyn PortQueue>,
    black: Box<dyn PortQueue>,
    pool: PoolCache,
    rx: Vec<PktBuf>,
    protect: Vec<(PktBuf, usize, InnerInfo)>,
    red_tx: Vec<PktBuf>,
    black_tx: Vec<PktBuf>,
    stats: WorkerStats,
    cell: Arc<StatsCell>,
    epoch: Instant,
    polls: u64,
    icmp_tokens: u32,
    icmp_refill_s: u64,
    arp_last: [(Ipv4Addr, u64); 8],
    neigh: NeighborCache,
    /// The red and black ports' MACs (asked once, not through the port per packet).
    macs: [MacAddr; 2],
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
            rx: Vec::with_capacity(BURST),
            protect: Vec::with_capacity(BURST),
            red_tx: Vec::with_capacity(BURST * 3),
            black_tx: Vec::with_capacity(BURST * 3),
            stats: WorkerStats::default(),
            cell: Arc::new(StatsCell::default()),
            epoch: Instant::now(),
            polls: 0,
            icmp_refill_s: 0,
            arp_last: [(Ipv4Addr::UNSPECIFIED, 0); 8],
            neigh: NeighborCache::default(),
            macs,
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
        if self.polls % 64 == 1 {
            // A control-plane change (snapshot) is picked up here, between bursts.
            let _ = self.sas.sync(&self.shared.sadb, now_s);
        }
        self.neigh.sync(&self.shared.neighbors);
        let mut n = 0;

        // Red: cleartext in, ESP out.
        self.rx.clear();
        n += self.red.rx_burst(&mut self.pool, &mut self.rx, BURST);
        self.stats.red_rx += self.rx.len() as u64;
        let mut burst = std::mem::take(&mut self.rx);
        self.red_stage(&mut burst);
        self.rx = burst;

        // Black: ESP in, cleartext out.
        self.rx.clear();
        n += self.black.rx_burst(&mut self.pool, &mut self.rx, BURST);
        self.stats.black_rx += self.rx.len() as u64;
        let mut burst = std::mem::take(&mut self.rx);
        self.black_stage(&mut burst);
        self.rx = burst;

        // Packets other cores handed to the SAs this core owns.
        self.rx.clear();
        let q = &self.shared.handoff[self.core];
        while self.rx.len() < BURST {
            match q.pop() {
                Some(b) => self.rx.push(b),
                None => break,
            }
        }
        self.stats.handoff_in += self.rx.len() as u64;
        n += self.rx.len();
        let mut burst = std::mem::take(&mut self.rx);
        for b in burst.drain(..) {
            self.inbound_esp(b);
        }
        self.rx = burst;

        // Transmit.
        if !self.red_tx.is_empty() {
            let want = self.red_tx.len();
            let sent = self.red.tx_burst(&mut self.pool, &mut self.red_tx);
            self.stats.red_tx += sent as u64;
            for _ in sent..want {
                self.stats.drops.inc(DropReason::TxFull);
            }
        }
        if !self.black_tx.is_empty() {
            let want = self.black_tx.len();
            let sent = self.black.tx_burst(&mut self.pool, &mut self.black_tx);
            self.stats.black_tx += sent as u64;
            for _ in sent..want {
                self.stats.drops.inc(DropReason::TxFull);
            }
        }

        if n > 0 {
            self.stats.bursts += 1;
            let dt = t0.elapsed().as_nanos() as u64;
            self.stats.busy_ns += dt;
            if self.stats.bursts.is_multiple_of(16) {
                let _ = self.latency.record(dt.max(1));
            }
        }
        if self.polls.is_multiple_of(256) {
            self.sas.check_lifetimes(now_s, &self.shared.events);
            self.publish_sa_stats();
        }
        // Reporters read a few times a second: publishing every 16th poll keeps the stores
        // (and the cache line traffic to the reader) off most bursts.
        if self.polls.is_multiple_of(16) || n == 0 {
            self.cell.publish(&self.stats);
        }
        n
    }

    fn publish_sa_stats(&self) {
        if let Ok(mut p) = self.cell.ports.try_lock() {
            *p = [self.red.stats(), self.black.stats()];
        }
        if let Ok(mut v) = self.cell.sas.try_lock() {
            v.clear();
            for o in self.sas.outbound_sas() {
                v.push(SaStat {
                    outbound: true,
                    spi: o.spi,
                    port: o.tunnel.src_port,
                    packets: o.counters.packets,
                    bytes: o.counters.bytes,
                });
            }
            for i in self.sas.inbound_sas() {
                v.push(SaStat {
                    outbound: false,
                    spi: i.spi,
                    port: 0,
                    packets: i.counters.packets,
                    bytes: i.counters.bytes,
                });
            }
        }
    }

    #[inline]
    fn drop_pkt(&mut self, b: PktBuf, r: DropReason) {
        self.stats.drops.inc(r);
        self.pool.put(b);
    }

    /// Answers ARP requests for `ip` and learns senders. Returns the reply frame, if any.
    fn arp(&mut self, b: PktBuf, our_ip: Ipv4Addr, our_mac: MacAddr, red: bool) {
        let parsed = ethernet::Frame::new_checked(b.data()).ok().and_then(|f| {
            arp::Packet::new_checked(f.payload())
                .ok()
                .and_then(|p| arp::Repr::parse(&p).ok())
        });
        let Some(r) = parsed else {
            return self.drop_pkt(b, DropReason::NotForUs);
        };
        let side = if red {
            self.shared.red
        } else {
            self.shared.black
        };
        // Only replies to our own requests teach anything (see `neighbor`): a request, or a
        // gratuitous or unsolicited reply, never moves the tunnel or the cleartext side.
        if r.operation == arp::Operation::Request
            && r.target_ip == our_ip
            && side.prefix.contains(IpAddr::V4(r.sender_ip))
        {
            let _ = self
                .shared
                .neighbors
                .learn_request(r.sender_ip, r.sender_hw, Instant::now());
        }
        if r.operation == arp::Operation::Reply {
            if r.target_ip == our_ip && side.prefix.contains(IpAddr::V4(r.sender_ip)) {
                let _ = self
                    .shared
                    .neighbors
                    .learn_reply(r.sender_ip, r.sender_hw, Instant::now());
            } else {
                // Gratuitous, or meant for someone else: counted, nothing learned.
                self.shared
                    .neighbors
                    .counters
                    .unsolicited
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if r.operation == arp::Operation::Request && r.target_ip == our_ip {
            let mut out = b;
            out.reset();
            let Some(d) = out.append(ethernet::HEADER_LEN + arp::PACKET_LEN) else {
                return self.drop_pkt(out, DropReason::NoBuffer);
            };
            let reply = arp::Repr {
                operation: arp::Operation::Reply,
                sender_hw: our_mac,
                sender_ip: our_ip,
                target_hw: r.sender_hw,
                target_ip: r.sender_ip,
            };
            emit_arp(d, our_mac, r.sender_hw, &reply);
            self.stats.arp_replies += 1;
            if red {
                self.red_tx.push(out)
            } else {
                self.black_tx.push(out)
            }
        } else {
            // Replies and requests for others: learned from, then consumed (not a drop).
            self.pool.put(b);
        }
    }

    /// Sends an ARP request for `ip` on one side, at most every 100 ms per address.
    fn arp_request(&mut self, ip: Ipv4Addr, red: bool) {
        let now = self.now_ns();
        let slot = (u32::from(ip) as usize) % self.arp_last.len();
        let (last_ip, last_t) = self.arp_last[slot];
        if last_ip == ip && now.saturating_sub(last_t) < 100_000_000 {
            return;
        }
        self.arp_last[slot] = (ip, now);
        self.shared.neighbors.asked(ip, Instant::now());
        let Some(mut b) = self.pool.get() else { return };
        let (side, mac) = if red {
            (self.shared.red, self.red.mac())
        } else {
            (self.shared.black, self.black.mac())
        };
        let Some(d) = b.append(ethernet::HEADER_LEN + arp::PACKET_LEN) else {
            return self.pool.put(b);
        };
        let req = arp::Repr {
            operation: arp::Operation::Request,
            sender_hw: mac,
            sender_ip: side.ip,
            target_hw: MacAddr::ZERO,
            target_ip: ip,
        };
        emit_arp(d, mac, MacAddr::BROADCAST, &req);
        self.stats.arp_requests += 1;
        if red {
            self.red_tx.push(b)
        } else {
            self.black_tx.push(b)
        }
    }

    /// Prepends an Ethernet header towards `next_hop` on one side and queues the frame; `false`
    /// when it was dropped (and counted) instead, so callers count only what really leaves.
    #[inline]
    fn send_ip(&mut self, mut b: PktBuf, next_hop: Option<Ipv4Addr>, red: bool) -> bool {
        let Some(nh) = next_hop else {
            self.drop_pkt(b, DropReason::NotForUs);
            return false;
        };
        let Some(dst) = self.neigh.get(&self.shared.neighbors, nh) else {
            self.arp_request(nh, red);
            self.drop_pkt(b, DropReason::NoNeighbor);
            return false;
        };
        let src = if red { self.macs[0] } else { self.macs[1] };
        let Some(h) = b.prepend(ethernet::HEADER_LEN) else {
            self.drop_pkt(b, DropReason::NoHeadroom);
            return false;
        };
        let mut eth = ethernet::Frame::new_unchecked(h);
        eth.set_dst_addr(dst);
        eth.set_src_addr(src);
        eth.set_ethertype(ethernet::ethertype::IPV4);
        if red {
            self.red_tx.push(b)
        } else {
            self.black_tx.push(b)
        }
        true
    }

    /// Layer 2 of either side: IPv4 frames are returned; ARP is answered or learned from;
    /// anything else is dropped and counted.
    #[inline]
    fn ipv4_frame(
        &mut self,
        b: PktBuf,
        our_ip: Ipv4Addr,
        our_mac: MacAddr,
        red: bool,
    ) -> Option<PktBuf> {
        let (ethertype, dst) = match ethernet::Frame::new_checked(b.data()) {
            Ok(f) => (f.ethertype(), f.dst_addr()),
            Err(_) => {
                self.drop_pkt(b, DropReason::Malformed);
                return None;
            }
        };
        // Layer-2 admission: IP only in frames to our MAC (not another host's, not broadcast
        // or multicast); ARP to us or broadcast. VLAN-tagged frames have an EtherType of their
        // own and fall to the last arm: espada runs on no VLAN.
        match ethertype {
            ethernet::ethertype::IPV4 if dst == our_mac => Some(b),
            ethernet::ethertype::ARP if dst == our_mac || dst == MacAddr::BROADCAST => {
                self.arp(b, our_ip, our_mac, red);
                None
            }
            _ => {
                self.drop_pkt(b, DropReason::NotForUs);
                None
            }
        }
    }

    fn red_stage(&mut self, burst: &mut Vec<PktBuf>) {
        let red_ip = self.shared.red.ip;
        let red_mac = self.red.mac();
        for b in burst.drain(..) {
            let Some(mut b) = self.ipv4_frame(b, red_ip, red_mac, true) else {
                continue;
            };
            b.adj(ethernet::HEADER_LEN);
            // The one parse of the inner header: flow key, TTL and what the outer header copies.
            let (flow, ttl, dst, info) = match ipv4::Packet::new_checked(b.data()) {
                Ok(ip) if ip.version() == 4 && ip.verify_checksum() => {
                    let (hl, tl) = (ip.header_len() as usize, ip.total_len() as usize);
                    let proto = ip.protocol();
                    let l4 = &b.data()[hl..tl];
                    let (src_port, dst_port) = match proto {
                        6 | 17 | 132 if l4.len() >= 4 && ip.frag_offset() == 0 => (
                            u16::from_be_bytes([l4[0], l4[1]]),
                            u16::from_be_bytes([l4[2], l4[3]]),
                        ),
                        _ => (0, 0),
                    };
                    let flow = FlowKey {
                        src: IpAddr::V4(ip.src_addr()),
                        dst: IpAddr::V4(ip.dst_addr()),
                        proto,
                        src_port,
                        dst_port,
                    };
                    let info = InnerInfo {
                        len: tl,
                        tos: ip.tos(),
                        dont_frag: ip.dont_frag(),
                        next_header: espada_wire::ip_proto::IPV4,
                    };
                    (flow, ip.ttl(), ip.dst_addr(), info)
                }
                _ => {
                    self.drop_pkt(b, DropReason::InnerMalformed);
                    continue;
                }
            };
            let len = info.len;
            if dst == red_ip {
                self.drop_pkt(b, DropReason::NotForUs);
                continue;
            }
            // Ethernet padding of short frames is not part of the packet.
            let extra = b.len() - len;
            b.trim(extra);
            let db = self.sas.db();
            let action = db.spd.lookup(&flow).map(|p| p.action);
            match action {
                None => self.drop_pkt(b, DropReason::NoPolicy),
                Some(Action::Discard) => self.drop_pkt(b, DropReason::PolicyDiscard),
                Some(Action::Bypass) => {
                    if ttl <= 1 {
                        self.drop_pkt(b, DropReason::TtlExpired);
                        continue;
                    }
                    ipv4::Packet::new_unchecked(b.data_mut()).decrement_ttl();
                    let nh = self.shared.black.next_hop(dst);
                    if self.send_ip(b, nh, false) {
                        self.stats.bypass_packets += 1;
                    }
                }
                Some(Action::Protect(t)) => {
                    if ttl <= 1 {
                        self.drop_pkt(b, DropReason::TtlExpired);
                        continue;
                    }
                    self.prepare_protect(b, t, info);
                }
            }
        }
        self.encap_burst();
    }

    /// First half of the outbound path: SA present, MTU fits, TTL decremented. The packet
    /// joins the burst's protect list.
    #[inline]
    fn prepare_protect(&mut self, mut b: PktBuf, t: usize, info: InnerInfo) {
        let (len, df) = (info.len, info.dont_frag);
        let Some(sa) = self.sas.outbound(t) else {
            return self.drop_pkt(b, DropReason::NoOutboundSa);
        };
        let overhead = sa.tunnel.outer_len()
            + esp::HEADER_LEN
            + esp::IV_LEN
            + esp::pad_len(len)
            + esp::TRAILER_LEN
            + esp::ICV_LEN;
        if len + overhead > self.shared.black.mtu as usize {
            // RFC 4301 §8.2: tell the sender what fits.
            let fits = (self.shared.black.mtu as usize).saturating_sub(overhead + 3) & !3;
            if df {
                self.icmp_frag_needed(&b, fits as u16);
            }
            return self.drop_pkt(b, DropReason::MtuExceeded);
        }
        ipv4::Packet::new_unchecked(b.data_mut()).decrement_ttl();
        self.protect.push((b, t, info));
    }

    /// Second half: sequence numbers reserved once per tunnel per burst (DPDK's
    /// `esn_outb_update_sqn` style), then one AEAD call per packet in arrival order, then the
    /// Ethernet header.
    fn encap_burst(&mut self) {
        const MAX_T: usize = 8;
        // (tunnel, packets, next sequence number, numbers granted, refused for want of a
        // durable reservation)
        let mut res = [(usize::MAX, 0u32, 0u64, 0u32, false); MAX_T];
        let mut list = std::mem::take(&mut self.protect);
        for (_, t, _) in list.iter() {
            if let Some(e) = res.iter_mut().find(|e| e.0 == *t || e.0 == usize::MAX) {
                e.0 = *t;
                e.1 += 1;
            }
        }
        for e in res.iter_mut().filter(|e| e.0 != usize::MAX) {
            if let Some(sa) = self.sas.outbound(e.0) {
                let r = sa.reserve(e.1);
                e.2 = r.first;
                e.3 = r.count;
                e.4 = r.unreserved;
            }
        }
        for (mut b, t, info) in list.drain(..) {
            let len = info.len;
            // More than MAX_T tunnels in one burst: the rest reserve one number at a time.
            let mut unreserved = false;
            let seq = match res.iter_mut().find(|e| e.0 == t) {
                Some(e) if e.3 > 0 => {
                    e.3 -= 1;
                    e.2 += 1;
                    Some(e.2 - 1)
                }
                Some(e) => {
                    unreserved = e.4;
                    None
                }
                None => self.sas.outbound(t).map(|sa| sa.reserve(1)).and_then(|r| {
                    unreserved = r.unreserved;
                    (r.count == 1).then_some(r.first)
                }),
            };
            let Some(sa) = self.sas.outbound(t) else {
                self.drop_pkt(b, DropReason::NoOutboundSa);
                continue;
            };
            let Some(seq) = seq else {
                let r = if unreserved {
                    DropReason::SeqUnreserved
                } else {
                    DropReason::SeqCycled
                };
                self.drop_pkt(b, r);
                continue;
            };
            let nh = match sa.tunnel.remote {
                IpAddr::V4(a) => self.shared.black.next_hop(a),
                IpAddr::V6(_) => None,
            };
            match encapsulate_parsed(sa, seq, &iv_from_seq(seq), &mut b, info) {
                Encap::Done => {
                    if self.send_ip(b, nh, false) {
                        self.stats.encap_packets += 1;
                        self.stats.encap_bytes += len as u64;
                    }
                }
                Encap::Drop(r) => self.drop_pkt(b, r),
            }
        }
        self.protect = list;
    }

    /// ICMP type 3 code 4 back to the sender of `inner` (rate-limited).
    fn icmp_frag_needed(&mut self, inner: &PktBuf, mtu: u16) {
        let now_s = self.epoch.elapsed().as_secs();
        if now_s != self.icmp_refill_s {
            self.icmp_refill_s = now_s;
            self.icmp_tokens = self.shared.icmp_rate;
        }
        if self.icmp_tokens == 0 {
            return;
        }
        let Ok(ip) = ipv4::Packet::new_checked(inner.data()) else {
            return;
        };
        // RFC 1812 §4.3.2.7: no ICMP error about a non-first fragment or an ICMP error.
        if ip.frag_offset() != 0 {
            return;
        }
        if ip.protocol() == espada_wire::ip_proto::ICMP
            && matches!(ip.payload().first(), Some(3 | 4 | 5 | 11 | 12))
        {
            return;
        }
        let src = ip.src_addr();
        let quote = (ip.header_len() as usize + 8).min(inner.len());
        let Some(mut b) = self.pool.get() else { return };
        let Some(d) = b.append(icmpv4::frag_needed_len(quote)) else {
            return self.pool.put(b);
        };
        icmpv4::emit_frag_needed(d, self.shared.red.ip, src, mtu, &inner.data()[..quote]);
        self.icmp_tokens -= 1;
        let nh = self.shared.red.next_hop(src);
        if self.send_ip(b, nh, true) {
            self.stats.icmp_sent += 1;
        }
    }

    fn black_stage(&mut self, burst: &mut Vec<PktBuf>) {
        let black_ip = self.shared.black.ip;
        let black_mac = self.black.mac();
        for b in burst.drain(..) {
            let Some(mut b) = self.ipv4_frame(b, black_ip, black_mac, false) else {
                continue;
            };
            // Outer IPv4 + UDP/4500 to us, or nothing.
            let strip = {
                let Ok(ip) = ipv4::Packet::new_checked(&b.data()[ethernet::HEADER_LEN..]) else {
                    self.drop_pkt(b, DropReason::Malformed);
                    continue;
                };
                if ip.version() != 4 || !ip.verify_checksum() {
                    self.drop_pkt(b, DropReason::Malformed);
                    continue;
                }
                if ip.dst_addr() == black_ip
                    && ip.protocol() == espada_wire::ip_proto::UDP
                    && ip.is_fragment()
                {
                    self.drop_pkt(b, DropReason::Fragment);
                    continue;
                }
                if ip.dst_addr() != black_ip || ip.protocol() != espada_wire::ip_proto::UDP {
                    // Not ESP for us: forwarded in the clear only if a bypass policy covers it
                    // (checked with the flow reversed, as the SPD is written for our side).
                    let bypass =
                        FlowKey::from_packet(&b.data()[ethernet::HEADER_LEN..]).and_then(|f| {
                            self.sas
                                .db()
                                .spd
                                .lookup(&f.reversed())
                                .map(|p| (p.action, f))
                        });
                    match bypass {
                        Some((Action::Bypass, f)) => self.forward_clear_to_red(b, f),
                        _ => self.drop_pkt(b, DropReason::NotForUs),
                    }
                    continue;
                }
                let hl = ip.header_len() as usize;
                let outer_tos = ip.tos();
                let Ok(u) = udp::Packet::new_checked(ip.payload()) else {
                    self.drop_pkt(b, DropReason::Malformed);
                    continue;
                };
                if u.dst_port() != esp::UDP_ENCAP_PORT {
                    self.drop_pkt(b, DropReason::NotForUs);
                    continue;
                }
                // RFC 3948 §2.1: a non-zero checksum is verified; zero is accepted.
                if !u.verify_checksum(IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr())) {
                    self.drop_pkt(b, DropReason::Malformed);
                    continue;
                }
                let udp_len = u.len() as usize;
                (
                    ethernet::HEADER_LEN + hl + udp::HEADER_LEN,
                    ethernet::HEADER_LEN + hl + udp_len,
                    outer_tos,
                )
            };
            let (hdr, end, outer_tos) = strip;
            b.outer_tos = outer_tos;
            let tail = b.len() - end;
            b.trim(tail);
            b.adj(hdr);
            self.inbound_esp(b);
        }
    }

    /// A bypassed packet from the black side: TTL, then out of the red port.
    fn forward_clear_to_red(&mut self, mut b: PktBuf, f: FlowKey) {
        b.adj(ethernet::HEADER_LEN);
        let IpAddr::V4(dst) = f.dst else {
            return self.drop_pkt(b, DropReason::NotForUs);
        };
        let Ok(mut ip) = ipv4::Packet::new_checked(b.data_mut()) else {
            return self.drop_pkt(b, DropReason::Malformed);
        };
        if ip.ttl() <= 1 {
            return self.drop_pkt(b, DropReason::TtlExpired);
        }
        ip.decrement_ttl();
        let len = ip.total_len() as usize;
        let extra = b.len() - len;
        b.trim(extra);
        let nh = self.shared.red.next_hop(dst);
        if self.send_ip(b, nh, true) {
            self.stats.bypass_packets += 1;
        }
    }

    /// A UDP/4500 payload: classify, one SPI lookup, decapsulate here or hand off.
    #[inline]
    fn inbound_esp(&mut self, mut b: PktBuf) {
        if let esp::UdpEncap::Esp = esp::classify_udp_payload(b.data()) {
            let d = b.data();
            if d.len() >= esp::HEADER_LEN {
                let spi = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                // The fast path: an SA this core owns (the tunnel comes with it).
                if let Some((sa, t)) = self.sas.inbound_local(spi) {
                    let r = decapsulate(sa, &mut b);
                    return self.deliver(b, r, t);
                }
                match self.sas.route(spi) {
                    Route::Handoff(c) => {
                        match self.shared.handoff.get(c) {
                            Some(q) => match q.push(b) {
                                Ok(()) => self.stats.handoff_out += 1,
                                Err(b) => self.drop_pkt(b, DropReason::HandoffFull),
                            },
                            // The owner is a core this gateway does not run: no SA here can
                            // take the packet (counted, and the buffer goes back).
                            None => self.drop_pkt(b, DropReason::NoSa),
                        }
                        return;
                    }
                    Route::Expired => return self.drop_pkt(b, DropReason::SaExpired),
                    Route::Unknown | Route::Local => return self.drop_pkt(b, DropReason::NoSa),
                }
            }
        }
        // IKE, keepalives and runts: the ESP module classifies and counts them.
        let r = decapsulate(&mut self.sas, &mut b);
        self.deliver(b, r, usize::MAX)
    }

    /// What follows decapsulation: the inner packet against tunnel `t`'s selectors, TTL, and
    /// out on red; or the control path; or a counted drop.
    #[inline]
    fn deliver(&mut self, mut b: PktBuf, r: Decap, t: usize) {
        match r {
            Decap::Inner { .. } => {
                // RFC 4301 §5.2: the inner packet must match the SPD entry that protects this
                // tunnel (the SPD is written for our outbound side, hence the reversed flow):
                // addresses, protocol and ports, so a UDP-only policy lets no ICMP in.
                let Some(flow) = FlowKey::from_packet(b.data()) else {
                    return self.drop_pkt(b, DropReason::InnerMalformed);
                };
                let ok = matches!(
                    self.sas.db().spd.lookup(&flow.reversed()).map(|p| p.action),
                    Some(Action::Protect(pt)) if pt == t
                );
                if !ok {
                    return self.drop_pkt(b, DropReason::PolicyMismatch);
                }
                let IpAddr::V4(dst) = flow.dst else {
                    return self.drop_pkt(b, DropReason::NotForUs);
                };
                let outer_ecn = b.outer_tos & 3;
                let mut ip = ipv4::Packet::new_unchecked(b.data_mut());
                if ip.ttl() <= 1 {
                    return self.drop_pkt(b, DropReason::TtlExpired);
                }
                // RFC 6040 §4.2 (normal mode): CE outside marks the inner packet CE, or drops
                // it when it is not ECN-capable; ECT(1) outside upgrades an inner ECT(0).
                let inner_ecn = ip.tos() & 3;
                match (outer_ecn, inner_ecn) {
                    (3, 0) => return self.drop_pkt(b, DropReason::EcnNotEct),
                    (3, 1 | 2) => ip.update_ecn(3),
                    (1, 2) => ip.update_ecn(1),
                    _ => {}
                }
                ip.decrement_ttl();
                let len = b.len();
                // The red link's MTU (issue 12: decapsulated packets were sent unchecked).
                if len > self.shared.red.mtu as usize {
                    return self.drop_pkt(b, DropReason::MtuExceeded);
                }
                let nh = self.shared.red.next_hop(dst);
                if self.send_ip(b, nh, true) {
                    self.stats.decap_packets += 1;
                    self.stats.decap_bytes += len as u64;
                }
            }
            Decap::Control => match self.shared.control.push(b) {
                Ok(()) => self.stats.to_control += 1,
                Err(b) => self.drop_pkt(b, DropReason::ControlFull),
            },
            Decap::Drop(r) => self.drop_pkt(b, r),
        }
    }
}
