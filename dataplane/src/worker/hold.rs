//! Packets held while their next hop is resolved (as the kernel's `unres_qlen`): the first
//! packets towards a neighbor not known yet (an IKE_SA_INIT on a fresh start, the first packet
//! of a flow after an entry aged out) wait for the ARP or neighbor-discovery answer instead of
//! being dropped. At most [`HOLD_PER_NEIGHBOR`] per neighbor and [`HOLD_MAX`] per worker, each
//! for at most [`HOLD_NS`]: what overflows is dropped as `neighbor-hold-full`, what times out
//! as `no-neighbor`. The queue is a vector made at start-up (no allocation per packet); it is
//! only touched on the miss path and when the neighbor tables change.

use super::*;

/// Packets held per unresolved neighbor.
pub const HOLD_PER_NEIGHBOR: usize = 3;
/// Packets held per worker.
pub const HOLD_MAX: usize = 64;
/// How long a packet is held (ns).
pub const HOLD_NS: u64 = 3_000_000_000;

/// What a held packet still needs.
#[derive(Debug, Clone, Copy)]
pub(super) enum Held {
    /// An IP packet to send on one side towards an IPv4 next hop (Ethernet header to add).
    Ip4 { nh: Ipv4Addr, red: bool },
    /// The same towards an IPv6 next hop.
    Ip6 { nh: Ipv6Addr, red: bool },
    /// A cleartext packet to encapsulate on tunnel `t` (the black next hop of `remote`).
    Protect {
        t: usize,
        info: InnerInfo,
        remote: IpAddr,
    },
}

impl Held {
    fn key(&self) -> IpAddr {
        match *self {
            Held::Ip4 { nh, .. } => IpAddr::V4(nh),
            Held::Ip6 { nh, .. } => IpAddr::V6(nh),
            Held::Protect { remote, .. } => remote,
        }
    }
}

impl Worker {
    /// Holds `b` until its next hop is known; `false` when it was dropped (and counted).
    pub(super) fn hold(&mut self, b: PktBuf, what: Held) -> bool {
        let key = what.key();
        let same = self.held.iter().filter(|(_, w, _)| w.key() == key).count();
        if same >= HOLD_PER_NEIGHBOR || self.held.len() >= HOLD_MAX {
            self.drop_pkt(b, DropReason::NeighborHoldFull);
            return false;
        }
        let now = self.now_ns();
        self.held.push((b, what, now));
        true
    }

    /// Sends what was held for next hops now known (call when a neighbor table changed), and
    /// drops (`no-neighbor`) what waited longer than [`HOLD_NS`].
    pub(super) fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = self.now_ns();
        let mut protect = false;
        // In place and in order (no allocation; the packets of one flow keep their order).
        let mut i = 0;
        while i < self.held.len() {
            let (what, since) = (self.held[i].1, self.held[i].2);
            let expired = now.saturating_sub(since) > HOLD_NS;
            let known = !expired
                && match what {
                    Held::Ip4 { nh, .. } => self.neigh.get(&self.shared.neighbors, nh).is_some(),
                    Held::Ip6 { nh, .. } => self.neigh6.get(&self.shared.neighbors6, nh).is_some(),
                    Held::Protect { remote, .. } => self.black_next_hop_mac(remote).is_ok(),
                };
            if !expired && !known {
                i += 1;
                continue;
            }
            let (b, _, _) = self.held.remove(i);
            if expired {
                self.drop_pkt(b, DropReason::NoNeighbor);
                continue;
            }
            match what {
                Held::Ip4 { nh, red } => {
                    self.send_ip(b, Some(nh), red);
                }
                Held::Ip6 { nh, red } => {
                    self.send_ip6(b, Some(nh), red);
                }
                Held::Protect { t, info, .. } => {
                    protect = true;
                    self.prepare_protect(b, t, info);
                }
            }
        }
        if protect {
            self.encap_burst();
        }
    }
}
