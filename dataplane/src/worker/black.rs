//! Black, stage 1: classify, SA lookup and decrypt, over the whole burst. Each frame that is
//! ESP-in-UDP over IPv4 to our MAC and address, its headers sound, for an SA this core owns
//! (one lookup in the flat SPI table; the tunnel comes with the SA), is stripped to ESP,
//! opened in place and handed to the delivery stage ([`Worker::deliver_ready`], in
//! `deliver.rs`). Anything else is left as it came for the full path (`black_full.rs`).

use super::*;
use crate::pktbuf::{HW_IP_CSUM_GOOD, HW_L4_CSUM_GOOD};

/// What the classify stage did with one black frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Black {
    /// Untouched: for the full path ([`Worker::black_one`]: ARP, IKE, handoffs, bypass, IPv6
    /// outer headers, anything malformed).
    Full,
    /// Decrypted, checked and given its Ethernet header: ready for red (inner bytes).
    Ready(u32),
    /// Decrypted, and its inner packet is IPv6 (its own path, [`Worker::deliver_ipv6`]).
    V6,
    /// Dropped for this reason after the buffer was changed.
    Drop(DropReason),
    /// Decrypted and checked; its red next hop is being resolved: held until it is.
    Hold(Ipv4Addr),
}

impl Worker {
    /// Black → red over a whole burst, in stages: classify and decrypt every frame in place,
    /// then sort (ready packets go to red's transmit list, the rest take the full path or are
    /// counted). When every frame of the burst is ready (the usual case) the burst becomes the
    /// transmit list as a whole: no buffer is moved.
    pub(super) fn black_stage(&mut self, burst: &mut Vec<PktBuf>) {
        let mut out = [Black::Full; BURST];
        let mut all = burst.len() <= BURST;
        if self.sas.prefetch_pays() {
            self.prefetch_black(burst);
        }
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

    /// The prefetch steps of [`Self::black_stage`] (only with many SAs: `prefetch_pays`).
    #[inline(never)]
    fn prefetch_black(&self, burst: &[PktBuf]) {
        // Every frame's SPI slot, then its SA and key schedule, asked for burst-wide before
        // the first is opened (issue 26: with thousands of SAs each is a cache miss; asked
        // together they overlap). Read without checks: a wrong guess is a wasted prefetch.
        let mut spis = [None; BURST];
        for (b, s) in burst.iter().zip(spis.iter_mut()) {
            *s = quick_spi(b.data());
            if let Some((spi, _)) = *s {
                self.sas.prefetch_inbound_slot(spi);
            }
        }
        for (spi, _) in spis.iter().flatten() {
            self.sas.prefetch_inbound(*spi);
        }
        for (spi, seq) in spis.iter().flatten() {
            self.sas.prefetch_inbound_key(*spi, *seq);
        }
    }

    /// A decrypted packet's way out: to red's transmit list, the IPv6 path, or a counted drop.
    #[inline(always)]
    pub(super) fn land(&mut self, b: PktBuf, v: Black) {
        match v {
            Black::Ready(len) => {
                self.red_tx.push(b);
                self.stats.decap_packets += 1;
                self.stats.decap_bytes += len as u64;
            }
            Black::V6 => self.deliver_ipv6(b),
            Black::Drop(r) => self.drop_pkt(b, r),
            Black::Hold(nh) => {
                // Decapsulated: counted as such; held for its next hop (a timeout is counted
                // as no-neighbor).
                let len = b.len() as u64;
                if self.hold(b, hold::Held::Ip4 { nh, red: true }) {
                    self.stats.decap_packets += 1;
                    self.stats.decap_bytes += len;
                }
            }
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
                // RFC 3948 §2.1: a zero checksum over IPv4 is not checked (and is what a
                // peer sends): no call for it.
                || u.checksum() == 0
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
}

/// The SPI and sequence number (its low 32 bits) of an ESP-in-UDP-over-IPv4 frame, read
/// without checks beyond the bounds (the prefetch step's guess; the classify stage decides).
#[inline(always)]
fn quick_spi(d: &[u8]) -> Option<(u32, u32)> {
    let h = d.get(ethernet::HEADER_LEN..)?.first_chunk::<20>()?;
    if h[9] != espada_wire::ip_proto::UDP {
        return None;
    }
    let at = ethernet::HEADER_LEN + ((h[0] & 0x0f) as usize) * 4 + udp::HEADER_LEN;
    let s = d.get(at..)?.first_chunk::<8>()?;
    Some((
        u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_be_bytes([s[4], s[5], s[6], s[7]]),
    ))
}
