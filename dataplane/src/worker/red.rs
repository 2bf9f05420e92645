//! Red, stage 1: classify, policy, SA and next hop, over the whole burst. One parse of each
//! frame's inner header (flow key, TTL, length, TOS, DF) answers the SPD, the core's SA for
//! the tunnel, its next hop (memoized per peer) and the black MTU; a frame that passes is
//! readied in place (Ethernet header and padding off, TTL down) and the burst goes to the
//! encapsulation stage (`encap.rs`). Anything else is left as it came for the full path
//! (`outbound.rs`: ARP, IPv6, bypass, ICMP errors, fragmentation, drops).

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
        if self.sas.prefetch_pays() {
            // The prefetch step's SPD answers, by frame: the classify stage uses one when the
            // tuple it parsed is the one the answer is for (one lookup per packet, not two:
            // at 10 000 tunnels the SPD lookups per AES call fell from 0.93 to 0.52 under
            // perf, west's whole work per AES call by 13 %).
            let mut looked = [None; BURST];
            self.prefetch_red(burst, &mut looked);
            for ((b, r), l) in burst.iter_mut().zip(ready.iter_mut()).zip(looked.iter()) {
                *r = self.classify_red(b, *l);
                all &= r.is_some();
            }
        } else {
            for (b, r) in burst.iter_mut().zip(ready.iter_mut()) {
                *r = self.classify_red(b, None);
                all &= r.is_some();
            }
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

    /// The prefetch steps of [`Self::red_stage`] (only with many SAs: `prefetch_pays`).
    #[inline(never)]
    fn prefetch_red(&self, burst: &[PktBuf], looked: &mut [Option<Looked>; BURST]) {
        // With thousands of tunnels every frame's SPD slot, SA and key schedule is a cache
        // miss; asked for burst-wide, one step ahead of where they are read, the misses overlap
        // (issue 26). A frame these quick reads misjudge only costs a wasted prefetch: the
        // classify stage below parses and decides for itself.
        let spd = &self.sas.db().spd_v4;
        let mut tuples = [None; BURST];
        for (b, t) in burst.iter().zip(tuples.iter_mut()) {
            *t = quick_tuple(b.data());
            if let Some((src, dst, ..)) = *t {
                spd.prefetch(src, dst);
            }
        }
        let mut tun = [usize::MAX; BURST];
        for ((tuple, t), l) in tuples.iter().zip(tun.iter_mut()).zip(looked.iter_mut()) {
            if let Some(k @ (src, dst, proto, sport, dport)) = *tuple {
                let a = spd.lookup(src, dst, proto, sport, dport);
                *l = Some((k, a));
                if let Some(Some(Action::Protect(x))) = a {
                    *t = x;
                    self.sas.prefetch_outbound(x);
                }
            }
        }
        for &t in tun.iter().take(burst.len()).filter(|&&t| t != usize::MAX) {
            self.sas.prefetch_outbound_key(t);
        }
    }

    /// The classify stage for one red frame: an IPv4 packet to our MAC whose header checks out,
    /// whose SPD entry protects it with a tunnel that has an SA, a known next hop and room for
    /// it under the black MTU is made ready in place; anything else is left as it came.
    #[inline(always)]
    fn classify_red(&mut self, b: &mut PktBuf, looked: Option<Looked>) -> Ready {
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
        let tuple = (src, dst, proto, sport, dport);
        let action = match looked {
            Some((k, a)) if k == tuple => a,
            _ => self.sas.db().spd_v4.lookup(src, dst, proto, sport, dport),
        };
        let Some(Some(Action::Protect(t))) = action else {
            return None;
        };
        let sa = self.sas.outbound(t)?;
        let (outer_len, remote) = (sa.tunnel.outer_len(), sa.tunnel.remote);
        if tl + esp::overhead(outer_len, tl) > self.shared.black.mtu as usize {
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
}

/// A prefetch step's SPD answer for one frame: the (source, destination, protocol, ports) it
/// read without checks, and what the SPD said for them.
type Looked = ((u32, u32, u8, u16, u16), Option<Option<Action>>);

/// An IPv4 frame's (source, destination, protocol, ports), read without checks beyond the
/// bounds: what the prefetch step looks up ahead of the classify stage.
#[inline(always)]
fn quick_tuple(d: &[u8]) -> Option<(u32, u32, u8, u16, u16)> {
    let h = d.get(ethernet::HEADER_LEN..)?.first_chunk::<24>()?;
    let w = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let proto = h[9];
    let hl = ((h[0] & 0x0f) as usize) * 4;
    let (sport, dport) = match (proto, d.get(ethernet::HEADER_LEN + hl..)) {
        (6 | 17 | 132, Some(p))
            if p.len() >= 4 && u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 =>
        {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        }
        _ => (0, 0),
    };
    Some((w(12), w(16), proto, sport, dport))
}
