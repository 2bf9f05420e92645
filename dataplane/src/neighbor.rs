//! Neighbor (ARP) table shared by the workers of one gateway: read lock-free on the fast path
//! (an `arc-swap` snapshot), written rarely (when an ARP packet teaches something new).

use arc_swap::ArcSwap;
use espada_wire::arp;
use espada_wire::ethernet::{self, MacAddr};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

/// IPv4 → MAC, shared by every worker of a gateway.
#[derive(Debug, Default)]
pub struct NeighborTable {
    map: ArcSwap<HashMap<Ipv4Addr, MacAddr>>,
    write: Mutex<()>,
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
    }
}
