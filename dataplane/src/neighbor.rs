//! Neighbor (ARP) table shared by the workers of one gateway: read lock-free on the fast path
//! (an `arc-swap` snapshot), written rarely (when an ARP packet teaches something new).

use arc_swap::ArcSwap;
use espada_wire::arp;
use espada_wire::ethernet::{self, MacAddr};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// IPv4 → MAC, shared by every worker of a gateway.
#[derive(Debug, Default)]
pub struct NeighborTable {
    map: ArcSwap<HashMap<Ipv4Addr, MacAddr>>,
    write: Mutex<()>,
    generation: AtomicU64,
}

impl NeighborTable {
    /// A table with static entries.
    pub fn new(static_entries: &[(Ipv4Addr, MacAddr)]) -> Arc<NeighborTable> {
        let t = NeighborTable::default();
        t.map
            .store(Arc::new(static_entries.iter().copied().collect()));
        Arc::new(t)
    }

    /// Looks up a MAC.
    #[inline]
    pub fn get(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.map.load().get(&ip).copied()
    }

    /// Learns or refreshes an entry (control path: copies the table only when it changes).
    pub fn learn(&self, ip: Ipv4Addr, mac: MacAddr) {
        if self.get(ip) == Some(mac) || mac.is_multicast() || mac == MacAddr::ZERO {
            return;
        }
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = (**self.map.load()).clone();
        m.insert(ip, mac);
        self.map.store(Arc::new(m));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Increases with every change: a worker's [`NeighborCache`] checks it once per burst.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A worker's private copy of the next hops it uses, so the fast path neither loads the shared
/// snapshot nor hashes per packet: a few direct-mapped slots, emptied whenever the shared
/// table's generation moves (checked once per burst).
#[derive(Debug)]
pub struct NeighborCache {
    slots: [(u32, MacAddr); Self::SLOTS],
    generation: u64,
}

impl Default for NeighborCache {
    fn default() -> Self {
        NeighborCache {
            slots: [(0, MacAddr::ZERO); Self::SLOTS],
            generation: u64::MAX,
        }
    }
}

impl NeighborCache {
    const SLOTS: usize = 16;

    /// Forgets everything if `table` changed since the last call.
    #[inline]
    pub fn sync(&mut self, table: &NeighborTable) {
        let g = table.generation();
        if g != self.generation {
            self.slots = [(0, MacAddr::ZERO); Self::SLOTS];
            self.generation = g;
        }
    }

    /// The MAC of `ip`, from the cache or else from `table` (then cached).
    #[inline]
    pub fn get(&mut self, table: &NeighborTable, ip: Ipv4Addr) -> Option<MacAddr> {
        let k = u32::from(ip);
        // 0.0.0.0 is never a next hop, so it marks an empty slot.
        let slot = (k ^ (k >> 8)) as usize % Self::SLOTS;
        let e = &mut self.slots[slot];
        if e.0 == k && k != 0 {
            return Some(e.1);
        }
        let mac = table.get(ip)?;
        *e = (k, mac);
        Some(mac)
    }
}

/// Writes an Ethernet + ARP frame into `buf` (42 bytes).
pub fn emit_arp(buf: &mut [u8], src_mac: MacAddr, dst_mac: MacAddr, r: &arp::Repr) {
    let mut eth = ethernet::Frame::new_unchecked(&mut buf[..]);
    eth.set_dst_addr(dst_mac);
    eth.set_src_addr(src_mac);
    eth.set_ethertype(ethernet::ethertype::ARP);
    r.emit(&mut arp::Packet::new_unchecked(
        &mut buf[ethernet::HEADER_LEN..],
    ));
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn learn_and_lookup() {
        let t = NeighborTable::new(&[("10.0.0.1".parse().unwrap(), MacAddr([2, 0, 0, 0, 0, 1]))]);
        assert_eq!(
            t.get("10.0.0.1".parse().unwrap()),
            Some(MacAddr([2, 0, 0, 0, 0, 1]))
        );
        assert_eq!(t.get("10.0.0.2".parse().unwrap()), None);
        t.learn("10.0.0.2".parse().unwrap(), MacAddr([2, 0, 0, 0, 0, 2]));
        t.learn("10.0.0.3".parse().unwrap(), MacAddr::BROADCAST);
        assert_eq!(t.len(), 2);
        // A worker's cache follows changes of the table.
        let mut c = NeighborCache::default();
        c.sync(&t);
        let ip = "10.0.0.2".parse().unwrap();
        assert_eq!(c.get(&t, ip), Some(MacAddr([2, 0, 0, 0, 0, 2])));
        t.learn(ip, MacAddr([2, 0, 0, 0, 0, 9]));
        assert_eq!(
            c.get(&t, ip),
            Some(MacAddr([2, 0, 0, 0, 0, 2])),
            "until the next sync"
        );
        c.sync(&t);
        assert_eq!(c.get(&t, ip), Some(MacAddr([2, 0, 0, 0, 0, 9])));
        assert_eq!(c.get(&t, "10.0.0.7".parse().unwrap()), None);
    }
}
