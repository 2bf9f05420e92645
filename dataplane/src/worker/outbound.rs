//! Red → black in stages: classify each frame of the burst in place (one parse of the inner
//! header: flow key, TTL, length, TOS, DF; the SPD, the core's SA for the tunnel, its next hop
//! and the MTU), then over the protect list reserve the burst's sequence numbers per tunnel,
//! seal in place and prepend the Ethernet header. Frames the classify stage cannot ready take
//! the full path (`red_one`).

use super::l2::push_eth;
use super::*;
use crate::pktbuf::HW_IP_CSUM_GOOD;

/// What the classify stage found for one red frame: ready for ESP on tunnel `t` (its headers
/// read once, Ethernet header and padding off, TTL down, the next hop's MAC known), or
/// untouched for the full path ([`Worker::red_one`]: ARP, IPv6, bypass, drops, ICMP errors,
/// fragmentation).
type Ready = Option<(usize, InnerInfo, MacAddr)>;

impl Worker {
    /// Red → black over a whole burst, in stages: classify every frame in place, sort (ready
    /// packets join the protect list, the rest take the full path), then encapsulate and
    /// transmit the protect list ([`Self::encap_burst`]). A packet's buffer is written in
    /// place and moved only between stages, never right after a write.
    pub(super) fn red_stage(&mut self, burst: &mut Vec<PktBuf>) {
        let mut ready: [Ready; BURST] = [None; BURST];
        let mut all = burst.len() <= BURST;
        for (b, r) in burst.iter_mut().zip(ready.iter_mut()) {
            *r = self.classify_red(b);
            all &= r.is_some();
        }
        if all && self.protect.is_empty() {
            // Every frame is ready (the usual case): the burst becomes the protect list as a
            // whole, no buffer moves.
            std::mem::swap(&mut self.protect, burst);
            self.protect_meta
                .extend(ready.iter().take(self.protect.len()).flatten());
        } else {
            // A port that returns more than BURST frames: the rest take the full path.
            for (i, b) in burst.drain(..).enumerate() {
                match ready.get(i).copied().flatten() {
                    Some(m) => {
                        self.protect.push(b);
                        self.protect_meta.push(m);
                    }
                    None => self.red_one(b),
                }
            }
        }
        self.encap_burst();
    }

    /// The classify stage for one red frame: an IPv4 packet to our MAC whose header checks out,
    /// whose SPD entry protects it with a tunnel that has an SA, a known next hop and room for
    /// it under the black MTU is made ready in place; anything else is left as it came.
    #[inline(always)]
    fn classify_red(&mut self, b: &mut PktBuf) -> Ready {
        let hw_ip_ok = b.hw_csum & HW_IP_CSUM_GOOD != 0;
        let d = b.data();
        if d.len() < ethernet::HEADER_LEN
            || d[..6] != self.macs[0].0
            || d[12..14] != ethernet::ethertype::IPV4.to_be_bytes()
        {
            return None;
        }
        let ip = ipv4::Packet::new_checked(&d[ethernet::HEADER_LEN..]).ok()?;
        // The header checksum: the NIC's word where it gave it, else checked here.
        if ip.version() != 4 || ip.ttl() <= 1 || !(hw_ip_ok || ip.verify_checksum()) {
            return None;
        }
        let (hl, tl) = (ip.header_len() as usize, ip.total_len() as usize);
        let proto = ip.protocol();
        let l4 = &d[ethernet::HEADER_LEN + hl..ethernet::HEADER_LEN + tl];
        let (sport, dport) = match proto {
            6 | 17 | 132 if l4.len() >= 4 && ip.frag_offset() == 0 => (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            ),
            _ => (0, 0),
        };
        if ip.dst_addr() == self.shared.red.ip {
            return None;
        }
        let info = InnerInfo {
            len: tl,
            tos: ip.tos(),
            dont_frag: ip.dont_frag(),
            next_header: espada_wire::ip_proto::IPV4,
        };
        let (src, dst) = (u32::from(ip.src_addr()), u32::from(ip.dst_addr()));
        let Some(Some(Action::Protect(t))) =
            self.sas.db().spd_v4.lookup(src, dst, proto, sport, dport)
        else {
            return None;
        };
        let sa = self.sas.outbound(t)?;
        let (outer_len, remote) = (sa.tunnel.outer_len(), sa.tunnel.remote);
        let overhead = outer_len
            + esp::HEADER_LEN
            + esp::IV_LEN
            + esp::pad_len(tl)
            + esp::TRAILER_LEN
            + esp::ICV_LEN;
        if tl + overhead > self.shared.black.mtu as usize {
            return None;
        }
        let mac = self.black_next_hop_mac(remote).ok()?;
        // Ready: from here on the buffer changes.
        b.hw_csum = 0;
        self.sas.note_use(t);
        b.adj(ethernet::HEADER_LEN);
        let extra = b.len() - tl;
        b.trim(extra);
        ipv4::Packet::new_unchecked(b.data_mut()).decrement_ttl();
        Some((t, info, mac))
    }

    /// The full red path for one frame the classify stage left alone.
    #[inline(never)]
    fn red_one(&mut self, b: PktBuf) {
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
            Err(r) => return self.drop_pkt(b, r),
        };
        let overhead = outer_len
            + esp::HEADER_LEN
            + esp::IV_LEN
            + esp::pad_len(len)
            + esp::TRAILER_LEN
            + esp::ICV_LEN;
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

    /// Second half: sequence numbers reserved once per tunnel per burst (DPDK's
    /// `esn_outb_update_sqn` style), then one AEAD call per packet in arrival order, then the
    /// Ethernet header.
    pub(super) fn encap_burst(&mut self) {
        const MAX_T: usize = 8;
        // (tunnel, packets, next sequence number, numbers granted, refused for want of a
        // durable reservation)
        let mut res = [(usize::MAX, 0u32, 0u64, 0u32, false); MAX_T];
        let mut list = std::mem::take(&mut self.protect);
        let meta = std::mem::take(&mut self.protect_meta);
        for (t, _, _) in meta.iter() {
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
        // Seal every packet in place first; move the buffers out only afterwards, so no buffer
        // is copied right after its header fields were written (a store-forwarding stall
        // per packet, measured).
        let mut verdicts = std::mem::take(&mut self.verdicts);
        verdicts.clear();
        let src_mac = self.macs[1];
        for (b, (t, info, mac)) in list.iter_mut().zip(meta.iter()) {
            // More than MAX_T tunnels in one burst: the rest reserve one number at a time.
            let mut unreserved = false;
            let seq = match res.iter_mut().find(|e| e.0 == *t) {
                Some(e) if e.3 > 0 => {
                    e.3 -= 1;
                    e.2 += 1;
                    Some(e.2 - 1)
                }
                Some(e) => {
                    unreserved = e.4;
                    None
                }
                None => self.sas.outbound(*t).map(|sa| sa.reserve(1)).and_then(|r| {
                    unreserved = r.unreserved;
                    (r.count == 1).then_some(r.first)
                }),
            };
            let v = match (self.sas.outbound(*t), seq) {
                (None, _) => Err(DropReason::NoOutboundSa),
                (Some(_), None) if unreserved => Err(DropReason::SeqUnreserved),
                (Some(_), None) => Err(DropReason::SeqCycled),
                (Some(sa), Some(seq)) => {
                    match encapsulate_parsed(sa, seq, &iv_from_seq(seq), b, *info) {
                        Encap::Done => push_eth(b, src_mac, *mac),
                        Encap::Drop(r) => Err(r),
                    }
                }
            };
            verdicts.push(v);
        }
        if self.black_tx.is_empty() && verdicts.iter().all(Result::is_ok) {
            // Every packet sealed (the usual case): the protect list becomes the transmit
            // list as a whole, no buffer moves.
            self.stats.encap_packets += list.len() as u64;
            self.stats.encap_bytes += meta.iter().map(|m| m.1.len as u64).sum::<u64>();
            std::mem::swap(&mut self.black_tx, &mut list);
        } else {
            for ((b, (_, info, _)), v) in list.drain(..).zip(meta.iter()).zip(verdicts.iter()) {
                match v {
                    Ok(()) => {
                        self.black_tx.push(b);
                        self.stats.encap_packets += 1;
                        self.stats.encap_bytes += info.len as u64;
                    }
                    Err(r) => self.drop_pkt(b, *r),
                }
            }
        }
        verdicts.clear();
        self.verdicts = verdicts;
        let mut meta = meta;
        meta.clear();
        self.protect_meta = meta;
        self.protect = list;
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
