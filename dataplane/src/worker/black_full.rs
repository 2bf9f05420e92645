//! Black, the full path: a frame the classify stage (`black.rs`) left untouched. ARP and
//! neighbor discovery, IKE to the control path, an SA another core owns (handoff to it),
//! expired and unknown SPIs, bypass in the clear, IPv6 outer headers, anything malformed;
//! every drop counted by reason. The handoff queue's packets are decrypted here too.

use super::*;

impl Worker {
    /// Packets other cores handed to the SAs this core owns: a burst from the handoff queue,
    /// each decrypted on the full path. Returns how many.
    #[inline]
    pub(super) fn handoff_stage(&mut self) -> usize {
        self.rx.clear();
        let q = &self.shared.handoff[self.core];
        while self.rx.len() < BURST {
            match q.pop() {
                Some(b) => self.rx.push(b),
                None => break,
            }
        }
        let n = self.rx.len();
        self.stats.handoff_in += n as u64;
        let mut burst = std::mem::take(&mut self.rx);
        for b in burst.drain(..) {
            self.inbound_esp(b);
        }
        self.rx = burst;
        n
    }

    /// The full black path for one frame the classify stage left alone.
    #[inline(never)]
    pub(super) fn black_one(&mut self, b: PktBuf) {
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
        let Some(b) = self.keepable(b) else { return };
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
                        // The owner is a core this gateway does not run: no SA here can
                        // take the packet (counted, and the buffer goes back).
                        if c >= self.shared.handoff.len() {
                            return self.drop_pkt(b, DropReason::NoSa);
                        }
                        let Some(b) = self.keepable(b) else { return };
                        match self.shared.handoff[c].push(b) {
                            Ok(()) => self.stats.handoff_out += 1,
                            Err(b) => self.drop_pkt(b, DropReason::HandoffFull),
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
            Decap::Control => {
                let Some(b) = self.keepable(b) else { return };
                match self.shared.control.push(b) {
                    Ok(()) => self.stats.to_control += 1,
                    Err(b) => self.drop_pkt(b, DropReason::ControlFull),
                }
            }
            Decap::Drop(r) => self.drop_pkt(b, r),
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
