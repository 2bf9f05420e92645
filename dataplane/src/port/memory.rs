//! In-process links: lock-free multi-queue rings between two ports (no copies: buffers move).
//!
//! A link has two ends, `a` and `b`; each end has `queues` queues. What end `a` sends arrives at
//! end `b` on the queue the [`Steering`] picks, as a NIC's RSS or flow rules would pick it.

use super::{PortQueue, PortStats};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use crossbeam_queue::ArrayQueue;
use espada_wire::ethernet::{self, MacAddr};
use espada_wire::{ipv4, udp};
use std::sync::Arc;

/// How the receiving "NIC" picks a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// Hash of the IPv4 addresses and, for TCP/UDP, ports (like RSS on the 4-tuple).
    Rss,
    /// Flow rules for per-CPU SAs: UDP source port `base + i` → queue `i` (like
    /// `ethtool -N black flow-type udp4 src-port base+i action i`); everything else by RSS.
    UdpSrcPort {
        /// Source port of queue 0.
        base: u16,
    },
    /// Queue `i` of one end always lands on queue `i` of the other (one link per core, or a
    /// flow rule per sender): the plain-forwarding baseline of a per-core benchmark, where no
    /// ESP source port tells the cores apart.
    SameQueue,
}

/// A two-ended link.
pub struct MemoryLink {
    a_to_b: Arc<Vec<ArrayQueue<PktBuf>>>,
    b_to_a: Arc<Vec<ArrayQueue<PktBuf>>>,
}

impl MemoryLink {
    /// A link with `queues` queues per end, each ring `depth` frames deep.
    pub fn new(queues: usize, depth: usize) -> MemoryLink {
        let mk = || {
            Arc::new(
                (0..queues.max(1))
                    .map(|_| ArrayQueue::new(depth.max(1)))
                    .collect::<Vec<_>>(),
            )
        };
        MemoryLink {
            a_to_b: mk(),
            b_to_a: mk(),
        }
    }

    /// Queue `q` of end `a`, sending with steering `towards_b` (applied by the receiving end).
    pub fn end_a(&self, q: usize, mac: MacAddr, towards_b: Steering) -> MemoryQueue {
        MemoryQueue {
            name: format!("memory:a/q{q}"),
            rx: self.b_to_a.clone(),
            tx: self.a_to_b.clone(),
            q,
            mac,
            steer: towards_b,
            stats: PortStats::default(),
        }
    }

    /// Queue `q` of end `b`.
    pub fn end_b(&self, q: usize, mac: MacAddr, towards_a: Steering) -> MemoryQueue {
        MemoryQueue {
            name: format!("memory:b/q{q}"),
            rx: self.a_to_b.clone(),
            tx: self.b_to_a.clone(),
            q,
            mac,
            steer: towards_a,
            stats: PortStats::default(),
        }
    }

    /// Frames waiting on the link in either direction (after a run, to prove nothing is stuck).
    pub fn in_flight(&self) -> usize {
        self.a_to_b
            .iter()
            .chain(self.b_to_a.iter())
            .map(|q| q.len())
            .sum()
    }
}

/// The RSS-like hash of a frame: IPv4 addresses and TCP/UDP ports; queue 0 for anything else.
#[inline]
pub fn flow_hash(frame: &[u8]) -> u32 {
    let Ok(eth) = ethernet::Frame::new_checked(frame) else {
        return 0;
    };
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return 0;
    }
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return 0;
    };
    let mut h = u32::from(ip.src_addr()).wrapping_mul(0x9e37_79b1)
        ^ u32::from(ip.dst_addr()).wrapping_mul(0x85eb_ca6b);
    if matches!(ip.protocol(), 6 | 17) && !ip.is_fragment() {
        let l4 = ip.payload();
        if l4.len() >= 4 {
            h ^= (u32::from_be_bytes([l4[0], l4[1], l4[2], l4[3]])).wrapping_mul(0xc2b2_ae35);
        }
    }
    h ^ (h >> 16)
}

fn steer(s: Steering, frame: &[u8], from: usize, queues: usize) -> usize {
    if s == Steering::SameQueue {
        return from % queues;
    }
    if let Steering::UdpSrcPort { base } = s {
        if let Ok(eth) = ethernet::Frame::new_checked(frame) {
            if let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) {
                if ip.protocol() == 17 {
                    if let Ok(u) = udp::Packet::new_checked(ip.payload()) {
                        let p = u.src_port();
                        if p >= base && ((p - base) as usize) < queues {
                            return (p - base) as usize;
                        }
                    }
                }
            }
        }
    }
    flow_hash(frame) as usize % queues
}

/// One queue of one end of a [`MemoryLink`].
pub struct MemoryQueue {
    name: String,
    rx: Arc<Vec<ArrayQueue<PktBuf>>>,
    tx: Arc<Vec<ArrayQueue<PktBuf>>>,
    q: usize,
    mac: MacAddr,
    steer: Steering,
    stats: PortStats,
}

impl PortQueue for MemoryQueue {
    #[inline]
    fn rx_burst(&mut self, _pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let ring = &self.rx[self.q];
        let mut n = 0;
        while n < max {
            match ring.pop() {
                Some(b) => {
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += b.len() as u64;
                    out.push(b);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    #[inline]
    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let nq = self.tx.len();
        let mut sent = 0;
        for b in pkts.drain(..) {
            let q = steer(self.steer, b.data(), self.q, nq);
            let len = b.len() as u64;
            match self.tx[q].push(b) {
                Ok(()) => {
                    sent += 1;
                    self.stats.tx_packets += 1;
                    self.stats.tx_bytes += len;
                }
                Err(b) => {
                    self.stats.tx_dropped += 1;
                    pool.put(b);
                }
            }
        }
        sent
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

#[cfg(test)]
mod test {
    use super::*;
    use crate::pool::Pool;

    fn frame(sport: u16) -> PktBuf {
        let mut f = vec![0u8; 14 + 28];
        f[12] = 0x08;
        let ipr = ipv4::Repr {
            src: "192.168.100.1".parse().unwrap(),
            dst: "192.168.100.2".parse().unwrap(),
            protocol: 17,
            payload_len: 8,
            ttl: 64,
            tos: 0,
            ident: 0,
            dont_frag: false,
        };
        ipr.emit(&mut ipv4::Packet::new_unchecked(&mut f[14..]));
        let mut u = udp::Packet::new_unchecked(&mut f[34..]);
        u.set_src_port(sport);
        u.set_dst_port(4500);
        u.set_len(8);
        PktBuf::from_slice(&f)
    }

    #[test]
    fn steering_by_source_port_and_ring_full() {
        let pool = Pool::new(64, 256);
        let mut pc = PoolCache::new(pool.clone());
        let link = MemoryLink::new(2, 4);
        let mut a0 = link.end_a(
            0,
            MacAddr([2, 0, 0, 0, 0, 1]),
            Steering::UdpSrcPort { base: 4501 },
        );
        let mut b1 = link.end_b(1, MacAddr([2, 0, 0, 0, 0, 2]), Steering::Rss);
        let mut out = vec![frame(4502), frame(4502)];
        assert_eq!(a0.tx_burst(&mut pc, &mut out), 2);
        let mut got = Vec::new();
        assert_eq!(
            b1.rx_burst(&mut pc, &mut got, 32),
            2,
            "port 4502 lands on queue 1"
        );
        let mut out: Vec<PktBuf> = (0..6).map(|_| frame(4502)).collect();
        assert_eq!(a0.tx_burst(&mut pc, &mut out), 4);
        assert_eq!(a0.stats().tx_dropped, 2);
        assert_eq!(link.in_flight(), 4);
    }

    #[test]
    fn same_queue_steering_keeps_each_sender_on_its_queue() {
        let pool = Pool::new(64, 256);
        let mut pc = PoolCache::new(pool.clone());
        let link = MemoryLink::new(2, 8);
        let mut a1 = link.end_a(1, MacAddr([2, 0, 0, 0, 0, 1]), Steering::SameQueue);
        let mut b0 = link.end_b(0, MacAddr([2, 0, 0, 0, 0, 2]), Steering::Rss);
        let mut b1 = link.end_b(1, MacAddr([2, 0, 0, 0, 0, 2]), Steering::Rss);
        // Port 4501 would pick queue 0 under UdpSrcPort; SameQueue ignores the headers.
        let mut out = vec![frame(4501), frame(4502), frame(9)];
        assert_eq!(a1.tx_burst(&mut pc, &mut out), 3);
        let mut got = Vec::new();
        assert_eq!(b0.rx_burst(&mut pc, &mut got, 32), 0);
        assert_eq!(b1.rx_burst(&mut pc, &mut got, 32), 3);
    }
}
