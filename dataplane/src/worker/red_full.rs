//! Red, the full path: a frame the classify stage (`red.rs`) left untouched. ARP, IPv6
//! (dual stack), the SPD's bypass and discard, TTL expiry, the black MTU with ICMP "needs
//! fragmentation" / ICMPv6 "packet too big" and, DF clear, fragmentation before
//! encapsulation (RFC 4301 §8.1); every drop counted by reason. Packets it readies for ESP
//! join the protect list of the encapsulation stage (`encap.rs`).

use super::*;

impl Worker {
    /// The full red path for one frame the classify stage left alone.
    #[inline(never)]
    pub(super) fn red_one(&mut self, b: PktBuf) {
        let red_ip = self.shared.red.ip;
        let red_mac = self.macs[0];
        let Some(mut b) = self.ip_frame(b, red_ip, red_mac, true) else {
            return;
        };
        b.adj(ethernet::HEADER_LEN);
        if b.data().first().is_some_and(|v| v >> 4 == 6) {
            self.red_ipv6(b);
            return;
        }
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
                return;
            }
        };
        let len = info.len;
        if dst == red_ip {
            self.drop_pkt(b, DropReason::NotForUs);
            return;
        }
        // Ethernet padding of short frames is not part of the packet.
        let extra = b.len() - len;
        b.trim(extra);
        let db = self.sas.db();
        let action = match (flow.src, flow.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => db.spd_v4.lookup(
                u32::from(s),
                u32::from(d),
                flow.proto,
                flow.src_port,
                flow.dst_port,
            ),
            _ => None,
        }
        .unwrap_or_else(|| db.spd.lookup(&flow).map(|p| p.action));
        match action {
            None => self.drop_pkt(b, DropReason::NoPolicy),
            Some(Action::Discard) => self.drop_pkt(b, DropReason::PolicyDiscard),
            Some(Action::Bypass) => {
                if ttl <= 1 {
                    self.drop_pkt(b, DropReason::TtlExpired);
                    return;
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
                    return;
                }
                self.prepare_protect(b, t, info);
            }
        }
    }

    /// An IPv6 packet from red (dual stack): the SPD, then out through its tunnel (its outer
    /// header IPv4 or IPv6, as the tunnel's endpoints are) or in the clear by a bypass policy.
    /// The hop limit is decremented; a packet too big for the tunnel gets an ICMPv6 "packet
    /// too big" (IPv6 routers never fragment, RFC 8200 §5).
    #[inline(never)]
    fn red_ipv6(&mut self, mut b: PktBuf) {
        let Some(v6) = self.shared.red.v6 else {
            return self.drop_pkt(b, DropReason::NotForUs);
        };
        let (flow, hop, dst, info) = match ipv6::Packet::new_checked(b.data()) {
            Ok(ip) if ip.version() == 6 => {
                let Some(flow) = FlowKey::from_packet(b.data()) else {
                    return self.drop_pkt(b, DropReason::InnerMalformed);
                };
                let info = InnerInfo {
                    len: ip.total_len(),
                    tos: ip.traffic_class(),
                    dont_frag: true,
                    next_header: espada_wire::ip_proto::IPV6,
                };
                (flow, ip.hop_limit(), ip.dst_addr(), info)
            }
            _ => return self.drop_pkt(b, DropReason::InnerMalformed),
        };
        if dst == v6.ip || dst.is_multicast() {
            return self.drop_pkt(b, DropReason::NotForUs);
        }
        let extra = b.len() - info.len;
        b.trim(extra);
        let action = self.sas.db().spd.lookup(&flow).map(|p| p.action);
        match action {
            None => self.drop_pkt(b, DropReason::NoPolicy),
            Some(Action::Discard) => self.drop_pkt(b, DropReason::PolicyDiscard),
            Some(_) if hop <= 1 => self.drop_pkt(b, DropReason::TtlExpired),
            Some(Action::Bypass) => {
                ipv6::Packet::new_unchecked(b.data_mut()).set_hop_limit(hop - 1);
                let nh = self.shared.black.next_hop6(dst);
                if self.send_ip6(b, nh, false) {
                    self.stats.bypass_packets += 1;
                }
            }
            Some(Action::Protect(t)) => self.prepare_protect(b, t, info),
        }
    }

    /// First half of the outbound path: SA present, MTU fits, TTL decremented. The packet
    /// joins the burst's protect list.
    #[inline(always)]
    pub(super) fn prepare_protect(&mut self, mut b: PktBuf, t: usize, info: InnerInfo) {
        let (len, df) = (info.len, info.dont_frag);
        self.sas.note_use(t);
        let Some(sa) = self.sas.outbound(t) else {
            return self.drop_pkt(b, DropReason::NoOutboundSa);
        };
        let (outer_len, remote) = (sa.tunnel.outer_len(), sa.tunnel.remote);
        // The next hop is resolved before a sequence number is spent: a packet that cannot
        // leave never counts on the SA (the peer's counters stay equal to ours).
        let mac = match self.black_next_hop_mac(remote) {
            Ok(m) => m,
            // Nothing spent yet: held, and prepared again when the next hop is known.
            Err(DropReason::NoNeighbor) => {
                self.hold(b, hold::Held::Protect { t, info, remote });
                return;
            }
            Err(r) => return self.drop_pkt(b, r),
        };
        let overhead = esp::overhead(outer_len, len);
        let v6 = info.next_header == espada_wire::ip_proto::IPV6;
        if len + overhead > self.shared.black.mtu as usize {
            // RFC 4301 §8.2: tell the sender what fits.
            let fits = (self.shared.black.mtu as usize).saturating_sub(overhead + 3) & !3;
            if v6 {
                // Never below the IPv6 minimum MTU: the sender would ignore it (RFC 8201
                // §4); a tunnel that cannot carry 1280 bytes drops and counts.
                self.icmp6_too_big(&b, fits.max(icmpv6::MIN_MTU) as u32);
                return self.drop_pkt(b, DropReason::MtuExceeded);
            }
            if df {
                self.icmp_frag_needed(&b, fits as u16);
                return self.drop_pkt(b, DropReason::MtuExceeded);
            }
            // RFC 4301 §8.1: DF clear, so fragment before encapsulating; each fragment
            // travels in an ESP packet of its own and the receiving host reassembles.
            let fixed =
                outer_len + esp::HEADER_LEN + esp::IV_LEN + 3 + esp::TRAILER_LEN + esp::ICV_LEN;
            let max_inner = (self.shared.black.mtu as usize).saturating_sub(fixed);
            return self.fragment_and_protect(b, t, info, max_inner, mac);
        }
        if v6 {
            let mut ip = ipv6::Packet::new_unchecked(b.data_mut());
            let h = ip.hop_limit();
            ip.set_hop_limit(h - 1);
        } else {
            ipv4::Packet::new_unchecked(b.data_mut()).decrement_ttl();
        }
        self.protect.push(b);
        self.protect_meta.push((t, info, mac));
    }

    /// Splits an IPv4 packet (DF clear) into fragments of at most `max_len` bytes and queues
    /// each for encapsulation. The first fragment stays in the packet's buffer; the others are
    /// copied into pool buffers (a slow path: only packets that do not fit take it). The header
    /// is copied whole into every fragment (options included).
    fn fragment_and_protect(
        &mut self,
        mut b: PktBuf,
        t: usize,
        info: InnerInfo,
        max_len: usize,
        mac: MacAddr,
    ) {
        const MAX_FRAGMENTS: usize = 16;
        let (hl, tl, off0, mf0) = {
            let ip = ipv4::Packet::new_unchecked(b.data());
            (
                ip.header_len() as usize,
                info.len,
                ip.frag_offset() as usize,
                ip.more_frags(),
            )
        };
        let chunk = max_len.saturating_sub(hl) & !7;
        let n = if chunk == 0 {
            usize::MAX
        } else {
            (tl - hl).div_ceil(chunk)
        };
        if n > MAX_FRAGMENTS || self.protect.len() + n > self.protect.capacity() {
            return self.drop_pkt(b, DropReason::MtuExceeded);
        }
        // The tail fragments, copied out before the first is cut short.
        let mut tails: [Option<PktBuf>; MAX_FRAGMENTS] = Default::default();
        for (k, slot) in tails.iter_mut().enumerate().take(n).skip(1) {
            let (start, end) = (hl + k * chunk, (hl + (k + 1) * chunk).min(tl));
            let Some(mut f) = self.pool.get() else {
                for x in tails.iter_mut().filter_map(Option::take) {
                    self.pool.put(x);
                }
                return self.drop_pkt(b, DropReason::NoBuffer);
            };
            let Some(d) = f.append(hl + end - start) else {
                self.pool.put(f);
                for x in tails.iter_mut().filter_map(Option::take) {
                    self.pool.put(x);
                }
                return self.drop_pkt(b, DropReason::NoBuffer);
            };
            d[..hl].copy_from_slice(&b.data()[..hl]);
            d[hl..].copy_from_slice(&b.data()[start..end]);
            let mut ip = ipv4::Packet::new_unchecked(&mut d[..]);
            ip.set_total_len((hl + end - start) as u16);
            ip.set_fragment(off0 + k * chunk, end < tl || mf0);
            ip.fill_checksum();
            ip.decrement_ttl();
            *slot = Some(f);
        }
        b.trim(tl - (hl + chunk));
        {
            let mut ip = ipv4::Packet::new_unchecked(b.data_mut());
            ip.set_total_len((hl + chunk) as u16);
            ip.set_fragment(off0, true);
            ip.fill_checksum();
            ip.decrement_ttl();
        }
        let first = InnerInfo {
            len: hl + chunk,
            ..info
        };
        self.protect.push(b);
        self.protect_meta.push((t, first, mac));
        for f in tails.iter_mut().filter_map(Option::take) {
            let len = f.len();
            self.protect.push(f);
            self.protect_meta.push((t, InnerInfo { len, ..info }, mac));
        }
    }

    /// Whether an ICMP or ICMPv6 error may go now: `icmp_rate` per second per worker, shared by
    /// both families (the caller takes the token when it sends).
    fn icmp_token(&mut self) -> bool {
        let now_s = self.epoch.elapsed().as_secs();
        if now_s != self.icmp_refill_s {
            self.icmp_refill_s = now_s;
            self.icmp_tokens = self.shared.icmp_rate;
        }
        self.icmp_tokens > 0
    }

    /// ICMP type 3 code 4 back to the sender of `inner` (rate-limited).
    pub(super) fn icmp_frag_needed(&mut self, inner: &PktBuf, mtu: u16) {
        if !self.icmp_token() {
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

    /// ICMPv6 "packet too big" back to the sender of `inner` (rate-limited with the ICMP
    /// errors; never about an ICMPv6 error, RFC 4443 §2.4 (e)).
    pub(super) fn icmp6_too_big(&mut self, inner: &PktBuf, mtu: u32) {
        let Some(v6) = self.shared.red.v6 else { return };
        if !self.icmp_token() {
            return;
        }
        let Ok(ip) = ipv6::Packet::new_checked(inner.data()) else {
            return;
        };
        let src = ip.src_addr();
        if src.is_unspecified() || src.is_multicast() {
            return;
        }
        if ip.next_header() == espada_wire::ip_proto::ICMPV6
            && ip.payload().first().is_some_and(|t| icmpv6::is_error(*t))
        {
            return;
        }
        let quote = icmpv6::too_big_quote_len(inner.len());
        let Some(mut b) = self.pool.get() else { return };
        let Some(d) = b.append(icmpv6::too_big_len(quote)) else {
            return self.pool.put(b);
        };
        icmpv6::emit_packet_too_big(d, v6.ip, src, mtu, &inner.data()[..quote]);
        self.icmp_tokens -= 1;
        let nh = self.shared.red.next_hop6(src);
        if self.send_ip6(b, nh, true) {
            self.stats.icmp_sent += 1;
        }
    }
}
