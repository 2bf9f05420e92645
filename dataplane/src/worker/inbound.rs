//! Black → red: outer IPv4/UDP 4500 to us, one SPI lookup (the tunnel comes with the SA) or a
//! handoff to the owning core, open in place, the inner packet against the SPD entry, ECN,
//! TTL and the red MTU, then out on red. The classify stage does all of it in place for SAs
//! this core owns; the full path (`black_one`) takes everything else.

use super::l2::push_eth;
use super::*;
use crate::pktbuf::{HW_IP_CSUM_GOOD, HW_L4_CSUM_GOOD};

/// What the classify stage did with one black frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Black {
    /// Untouched: for the full path ([`Worker::black_one`]: ARP, IKE, handoffs, bypass, IPv6
    /// outer headers, anything malformed).
    Full,
    /// Decrypted, checked and given its Ethernet header: ready for red (inner bytes).
    Ready(u32),
    /// Decrypted, and its inner packet is IPv6 (its own path, [`Worker::deliver_ipv6`]).
    V6,
    /// Dropped for this reason after the buffer was changed.
    Drop(DropReason),
}

impl Worker {
    /// Black → red over a whole burst, in stages: classify and decrypt every frame in place,
    /// then sort (ready packets go to red's transmit list, the rest take the full path or are
    /// counted). When every frame of the burst is ready (the usual case) the burst becomes the
    /// transmit list as a whole: no buffer is moved.
    pub(super) fn black_stage(&mut self, burst: &mut Vec<PktBuf>) {
        let mut out = [Black::Full; BURST];
        let mut all = burst.len() <= BURST;
        for (b, o) in burst.iter_mut().zip(out.iter_mut()) {
            *o = self.classify_black(b);
            all &= matches!(o, Black::Ready(_));
        }
        if all && self.red_tx.is_empty() {
            let n = burst.len();
            self.stats.decap_packets += n as u64;
            for o in &out[..n] {
                if let Black::Ready(len) = o {
                    self.stats.decap_bytes += *len as u64;
                }
            }
            std::mem::swap(&mut self.red_tx, burst);
            return;
        }
        // A port that returns more than BURST frames: the rest take the full path.
        for (i, b) in burst.drain(..).enumerate() {
            match out.get(i).copied().unwrap_or(Black::Full) {
                Black::Full => self.black_one(b),
                v => self.land(b, v),
            }
        }
    }

    /// A decrypted packet's way out: to red's transmit list, the IPv6 path, or a counted drop.
    #[inline(always)]
    fn land(&mut self, b: PktBuf, v: Black) {
        match v {
            Black::Ready(len) => {
                self.red_tx.push(b);
                self.stats.decap_packets += 1;
                self.stats.decap_bytes += len as u64;
            }
            Black::V6 => self.deliver_ipv6(b),
            Black::Drop(r) => self.drop_pkt(b, r),
            // Never for a decrypted packet (the classify stage sends untouched ones to the
            // full path itself): counted, never run through the full path twice.
            Black::Full => self.drop_pkt(b, DropReason::Malformed),
        }
    }

    /// The classify stage for one black frame: ESP-in-UDP over IPv4 to our MAC and address,
    /// its headers sound, for an SA this core owns, is stripped to ESP, decrypted and made
    /// ready for red in place; anything else is left as it came.
    #[inline(always)]
    fn classify_black(&mut self, b: &mut PktBuf) -> Black {
        // Checksums the NIC verified are not computed again (DPDK ports with the offload).
        let (hw_ip_ok, hw_l4_ok) = (
            b.hw_csum & HW_IP_CSUM_GOOD != 0,
            b.hw_csum & HW_L4_CSUM_GOOD != 0,
        );
        let d = b.data();
        if d.len() < ethernet::HEADER_LEN
            || d[..6] != self.macs[1].0
            || d[12..14] != ethernet::ethertype::IPV4.to_be_bytes()
        {
            return Black::Full;
        }
        let Ok(ip) = ipv4::Packet::new_checked(&d[ethernet::HEADER_LEN..]) else {
            return Black::Full;
        };
        if ip.version() != 4
            || ip.dst_addr() != self.shared.black.ip
            || ip.protocol() != espada_wire::ip_proto::UDP
            || ip.is_fragment()
            || !(hw_ip_ok || ip.verify_checksum())
        {
            return Black::Full;
        }
        let (hl, outer_tos) = (ip.header_len() as usize, ip.tos());
        let Ok(u) = udp::Packet::new_checked(ip.payload()) else {
            return Black::Full;
        };
        if u.dst_port() != esp::UDP_ENCAP_PORT
            || esp::classify_udp_payload(u.payload()) != esp::UdpEncap::Esp
            || !(hw_l4_ok
                || u.verify_checksum(IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr())))
        {
            return Black::Full;
        }
        let Some(spi) = u.payload().get(..4) else {
            return Black::Full;
        };
        let spi = u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]);
        let end = ethernet::HEADER_LEN + hl + u.len() as usize;
        let tail = d.len() - end;
        let Some((sa, t)) = self.sas.inbound_local(spi) else {
            return Black::Full;
        };
        // An SA of ours: from here on the buffer changes (and the NIC's flags, about the outer
        // headers, say nothing about what is left).
        b.outer_tos = outer_tos;
        b.hw_csum = 0;
        b.trim(tail);
        b.adj(ethernet::HEADER_LEN + hl + udp::HEADER_LEN);
        match crate::esp::decapsulate_esp(sa, b) {
            Decap::Inner { .. } => self.deliver_ready(b, t),
            Decap::Drop(r) => Black::Drop(r),
            // Only the full classification answers Control; counted if it ever did here.
            Decap::Control => Black::Drop(DropReason::Malformed),
        }
    }

    /// The full black path for one frame the classify stage left alone.
    #[inline(never)]
    fn black_one(&mut self, b: PktBuf) {
        let black_ip = self.shared.black.ip;
        let black_mac = self.macs[1];
        let Some(b) = self.ip_frame(b, black_ip, black_mac, false) else {
            return;
        };
        if b.data()
            .get(ethernet::HEADER_LEN)
            .is_some_and(|v| v >> 4 == 6)
        {
            self.black_ipv6(b);
            return;
        }
        // Outer IPv4 + UDP/4500 to us, or nothing.
        let strip = {
            let Ok(ip) = ipv4::Packet::new_checked(&b.data()[ethernet::HEADER_LEN..]) else {
                self.drop_pkt(b, DropReason::Malformed);
                return;
            };
            if ip.version() != 4 || !ip.verify_checksum() {
                self.drop_pkt(b, DropReason::Malformed);
                return;
            }
            if ip.dst_addr() == black_ip
                && ip.protocol() == espada_wire::ip_proto::UDP
                && ip.is_fragment()
            {
                self.drop_pkt(b, DropReason::Fragment);
                return;
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
                return;
            }
            let hl = ip.header_len() as usize;
            let outer_tos = ip.tos();
            let Ok(u) = udp::Packet::new_checked(ip.payload()) else {
                self.drop_pkt(b, DropReason::Malformed);
                return;
            };
            if self.shared.punt && is_ike(u.dst_port(), u.payload()) {
                if !u.verify_checksum(IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr())) {
                    self.drop_pkt(b, DropReason::Malformed);
                    return;
                }
                let l = ip.total_len() as usize;
                self.punt_ike(b, l);
                return;
            }
            if u.dst_port() != esp::UDP_ENCAP_PORT {
                self.drop_pkt(b, DropReason::NotForUs);
                return;
            }
            // RFC 3948 §2.1: a non-zero checksum is verified; zero is accepted.
            if !u.verify_checksum(IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr())) {
                self.drop_pkt(b, DropReason::Malformed);
                return;
            }
            let udp_len = u.len() as usize;
            (
                ethernet::HEADER_LEN + hl + udp::HEADER_LEN,
                ethernet::HEADER_LEN + hl + udp_len,
                outer_tos,
            )
        };
        let (hdr, end, outer_tos) = strip;
        self.strip_to_esp(b, hdr, end, outer_tos);
    }

    /// An IPv6 frame on black: ESP-in-UDP to our IPv6 address (RFC 3948 over IPv6, as Linux
    /// sends it: UDP checksum computed), or a packet a bypass policy lets through.
    #[inline(never)]
    fn black_ipv6(&mut self, b: PktBuf) {
        let Some(v6) = self.shared.black.v6 else {
            return self.drop_pkt(b, DropReason::NotForUs);
        };
        let strip = {
            let Ok(ip) = ipv6::Packet::new_checked(&b.data()[ethernet::HEADER_LEN..]) else {
                return self.drop_pkt(b, DropReason::Malformed);
            };
            if ip.version() != 6 {
                return self.drop_pkt(b, DropReason::Malformed);
            }
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            if dst != v6.ip {
                let Some(f) = FlowKey::from_packet(&b.data()[ethernet::HEADER_LEN..]) else {
                    return self.drop_pkt(b, DropReason::Malformed);
                };
                return match self.sas.db().spd.lookup(&f.reversed()).map(|p| p.action) {
                    Some(Action::Bypass) => self.forward_clear_to_red6(b),
                    _ => self.drop_pkt(b, DropReason::NotForUs),
                };
            }
            match ip.next_header() {
                espada_wire::ip_proto::UDP => {}
                // The fragment header: ESP-in-UDP is never reassembled here.
                44 => return self.drop_pkt(b, DropReason::Fragment),
                _ => return self.drop_pkt(b, DropReason::NotForUs),
            }
            let outer_tos = ip.traffic_class();
            let Ok(u) = udp::Packet::new_checked(ip.payload()) else {
                return self.drop_pkt(b, DropReason::Malformed);
            };
            if self.shared.punt && is_ike(u.dst_port(), u.payload()) {
                if !u.verify_checksum(IpAddr::V6(src), IpAddr::V6(dst)) {
                    return self.drop_pkt(b, DropReason::Malformed);
                }
                let l = ip.total_len();
                return self.punt_ike(b, l);
            }
            if u.dst_port() != esp::UDP_ENCAP_PORT {
                return self.drop_pkt(b, DropReason::NotForUs);
            }
            if !u.verify_checksum(IpAddr::V6(src), IpAddr::V6(dst)) {
                return self.drop_pkt(b, DropReason::Malformed);
            }
            let udp_len = u.len() as usize;
            (
                ethernet::HEADER_LEN + ipv6::HEADER_LEN + udp::HEADER_LEN,
                ethernet::HEADER_LEN + ipv6::HEADER_LEN + udp_len,
                outer_tos,
            )
        };
        let (hdr, end, outer_tos) = strip;
        self.strip_to_esp(b, hdr, end, outer_tos);
    }

    /// Cuts a frame down to its UDP/4500 payload (`hdr`..`end`), notes the outer TOS byte for
    /// the ECN step after decryption, and hands it to the ESP path.
    #[inline(always)]
    fn strip_to_esp(&mut self, mut b: PktBuf, hdr: usize, end: usize, outer_tos: u8) {
        b.outer_tos = outer_tos;
        let tail = b.len() - end;
        b.trim(tail);
        b.adj(hdr);
        self.inbound_esp(b);
    }

    /// A bypassed IPv6 packet from the black side: hop limit, then out of the red port.
    fn forward_clear_to_red6(&mut self, mut b: PktBuf) {
        b.adj(ethernet::HEADER_LEN);
        let Ok(mut ip) = ipv6::Packet::new_checked(b.data_mut()) else {
            return self.drop_pkt(b, DropReason::Malformed);
        };
        let hop = ip.hop_limit();
        if hop <= 1 {
            return self.drop_pkt(b, DropReason::TtlExpired);
        }
        ip.set_hop_limit(hop - 1);
        let (dst, len) = (ip.dst_addr(), ip.total_len());
        let extra = b.len() - len;
        b.trim(extra);
        let nh = self.shared.red.next_hop6(dst);
        if self.send_ip6(b, nh, true) {
            self.stats.bypass_packets += 1;
        }
    }

    /// An IKE message (or NAT-T keepalive) for the daemon: the whole IP packet goes to the
    /// control queue (see `punt`), bounded and counted.
    #[inline(never)]
    fn punt_ike(&mut self, mut b: PktBuf, ip_len: usize) {
        b.adj(ethernet::HEADER_LEN);
        let extra = b.len().saturating_sub(ip_len);
        b.trim(extra);
        match self.shared.control.push(b) {
            Ok(()) => self.stats.to_control += 1,
            Err(b) => self.drop_pkt(b, DropReason::ControlFull),
        }
    }

    /// An IP packet the IKE daemon sent (from the punt thread): out on black to its next hop.
    pub(super) fn send_from_daemon(&mut self, b: PktBuf) {
        let dst = match b.data().first().map(|v| v >> 4) {
            Some(4) => ipv4::Packet::new_checked(b.data())
                .ok()
                .map(|p| IpAddr::V4(p.dst_addr())),
            Some(6) => ipv6::Packet::new_checked(b.data())
                .ok()
                .map(|p| IpAddr::V6(p.dst_addr())),
            _ => None,
        };
        match dst {
            Some(IpAddr::V4(d)) => {
                let nh = self.shared.black.next_hop(d);
                self.send_ip(b, nh, false);
            }
            Some(IpAddr::V6(d)) => {
                let nh = self.shared.black.next_hop6(d);
                self.send_ip6(b, nh, false);
            }
            None => self.drop_pkt(b, DropReason::Malformed),
        }
    }

    /// A bypassed packet from the black side: TTL, then out of the red port.
    pub(super) fn forward_clear_to_red(&mut self, mut b: PktBuf, f: FlowKey) {
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
    pub(super) fn inbound_esp(&mut self, mut b: PktBuf) {
        if let esp::UdpEncap::Esp = esp::classify_udp_payload(b.data()) {
            let d = b.data();
            if d.len() >= esp::HEADER_LEN {
                let spi = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                // The fast path: an SA this core owns (the tunnel comes with it).
                if let Some((sa, t)) = self.sas.inbound_local(spi) {
                    let r = crate::esp::decapsulate_esp(sa, &mut b);
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
    pub(super) fn deliver(&mut self, mut b: PktBuf, r: Decap, t: usize) {
        match r {
            Decap::Inner { .. } => {
                let v = self.deliver_ready(&mut b, t);
                self.land(b, v);
            }
            Decap::Control => match self.shared.control.push(b) {
                Ok(()) => self.stats.to_control += 1,
                Err(b) => self.drop_pkt(b, DropReason::ControlFull),
            },
            Decap::Drop(r) => self.drop_pkt(b, r),
        }
    }

    /// What follows decryption for an inner packet of tunnel `t`: the policy check, then, for
    /// IPv4, ECN, TTL, the red MTU and the next hop, and the Ethernet header, in place.
    #[inline(always)]
    fn deliver_ready(&mut self, b: &mut PktBuf, t: usize) -> Black {
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
            return Black::Drop(DropReason::NoNeighbor);
        };
        match push_eth(b, self.macs[0], mac) {
            Ok(()) => Black::Ready(len as u32),
            Err(r) => Black::Drop(r),
        }
    }

    /// An authentic inner IPv6 packet that matched its tunnel's policy: ECN (RFC 6040), hop
    /// limit and the red MTU, then out on red through neighbor discovery.
    #[inline(never)]
    fn deliver_ipv6(&mut self, mut b: PktBuf) {
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

/// IKE for the daemon: UDP 500, or UDP 4500 carrying the non-ESP marker or a NAT-T keepalive
/// (RFC 3948 §2.2).
#[inline]
fn is_ike(dst_port: u16, payload: &[u8]) -> bool {
    dst_port == crate::punt::IKE_PORT
        || (dst_port == esp::UDP_ENCAP_PORT
            && matches!(
                esp::classify_udp_payload(payload),
                esp::UdpEncap::Ike | esp::UdpEncap::Keepalive
            ))
}
