//! Black, stage 2: a decrypted packet on its way to red: the inner packet against the SPD
//! entry that protects its tunnel (RFC 4301 §5.2), ECN (RFC 6040), TTL, the red MTU, the next
//! hop and the Ethernet header, in place.

use super::black::Black;
use super::l2::push_eth;
use super::*;

impl Worker {
    /// What follows decryption for an inner packet of tunnel `t`: the policy check, then, for
    /// IPv4, ECN, TTL, the red MTU and the next hop, and the Ethernet header, in place.
    #[inline(always)]
    pub(super) fn deliver_ready(&mut self, b: &mut PktBuf, t: usize) -> Black {
        // RFC 4301 §5.2: the inner packet must match the SPD entry that protects this
        // tunnel (the SPD is written for our outbound side, hence the reversed flow):
        // addresses, protocol and ports, so a UDP-only policy lets no ICMP in.
        // IPv4 against a compiled SPD: read from the bytes, no FlowKey built.
        let db = self.sas.db();
        let action = match db.spd_v4.lookup_reversed_ipv4(b.data()) {
            Some(a) => a,
            None => {
                let Some(flow) = FlowKey::from_packet(b.data()) else {
                    return Black::Drop(DropReason::InnerMalformed);
                };
                db.spd.lookup(&flow.reversed()).map(|p| p.action)
            }
        };
        if !matches!(action, Some(Action::Protect(pt)) if pt == t) {
            return Black::Drop(DropReason::PolicyMismatch);
        }
        let d = b.data();
        if d.first().is_some_and(|v| v >> 4 == 6) {
            return Black::V6;
        }
        if d.len() < ipv4::HEADER_LEN || d[0] >> 4 != 4 {
            return Black::Drop(DropReason::NotForUs);
        }
        let dst = Ipv4Addr::new(d[16], d[17], d[18], d[19]);
        let outer_ecn = b.outer_tos & 3;
        let len = b.len();
        let mut ip = ipv4::Packet::new_unchecked(b.data_mut());
        if ip.ttl() <= 1 {
            return Black::Drop(DropReason::TtlExpired);
        }
        // RFC 6040 §4.2 (normal mode): CE outside marks the inner packet CE, or drops it when
        // it is not ECN-capable; ECT(1) outside upgrades an inner ECT(0).
        let inner_ecn = ip.tos() & 3;
        match (outer_ecn, inner_ecn) {
            (3, 0) => return Black::Drop(DropReason::EcnNotEct),
            (3, 1 | 2) => ip.update_ecn(3),
            (1, 2) => ip.update_ecn(1),
            _ => {}
        }
        ip.decrement_ttl();
        // The red link's MTU (issue 12: decapsulated packets were sent unchecked).
        if len > self.shared.red.mtu as usize {
            return Black::Drop(DropReason::MtuExceeded);
        }
        let Some(nh) = self.shared.red.next_hop(dst) else {
            return Black::Drop(DropReason::NotForUs);
        };
        let Some(mac) = self.neigh.get(&self.shared.neighbors, nh) else {
            self.arp_request(nh, true);
            return Black::Hold(nh);
        };
        match push_eth(b, self.macs[0], mac) {
            Ok(()) => Black::Ready(len as u32),
            Err(r) => Black::Drop(r),
        }
    }

    /// An authentic inner IPv6 packet that matched its tunnel's policy: ECN (RFC 6040), hop
    /// limit and the red MTU, then out on red through neighbor discovery.
    #[inline(never)]
    pub(super) fn deliver_ipv6(&mut self, mut b: PktBuf) {
        if self.shared.red.v6.is_none() {
            return self.drop_pkt(b, DropReason::NotForUs);
        }
        let outer_ecn = b.outer_tos & 3;
        // The ESP module checked the IPv6 header's length against the payload.
        let mut ip = ipv6::Packet::new_unchecked(b.data_mut());
        let hop = ip.hop_limit();
        if hop <= 1 {
            return self.drop_pkt(b, DropReason::TtlExpired);
        }
        let inner_ecn = ip.traffic_class() & 3;
        match (outer_ecn, inner_ecn) {
            (3, 0) => return self.drop_pkt(b, DropReason::EcnNotEct),
            (3, 1 | 2) => ip.set_ecn(3),
            (1, 2) => ip.set_ecn(1),
            _ => {}
        }
        ip.set_hop_limit(hop - 1);
        let dst = ip.dst_addr();
        let len = b.len();
        if len > self.shared.red.mtu as usize {
            return self.drop_pkt(b, DropReason::MtuExceeded);
        }
        let nh = self.shared.red.next_hop6(dst);
        if self.send_ip6(b, nh, true) {
            self.stats.decap_packets += 1;
            self.stats.decap_bytes += len as u64;
        }
    }
}
