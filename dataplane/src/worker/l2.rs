//! Layer 2 on both sides: what is admitted (our MAC, ARP to us or broadcast), ARP answered and
//! learned from (see `neighbor`), ARP requests for next hops, and the Ethernet header a packet
//! leaves with.

use super::*;

impl Worker {
    /// Answers ARP requests for `ip` and learns senders. Returns the reply frame, if any.
    pub(super) fn arp(&mut self, b: PktBuf, our_ip: Ipv4Addr, our_mac: MacAddr, red: bool) {
        let parsed = ethernet::Frame::new_checked(b.data()).ok().and_then(|f| {
            arp::Packet::new_checked(f.payload())
                .ok()
                .and_then(|p| arp::Repr::parse(&p).ok())
        });
        let Some(r) = parsed else {
            return self.drop_pkt(b, DropReason::NotForUs);
        };
        let side = if red {
            self.shared.red
        } else {
            self.shared.black
        };
        // Only replies to our own requests teach anything (see `neighbor`): a request, or a
        // gratuitous or unsolicited reply, never moves the tunnel or the cleartext side.
        if r.operation == arp::Operation::Request
            && r.target_ip == our_ip
            && side.prefix.contains(IpAddr::V4(r.sender_ip))
        {
            let _ = self
                .shared
                .neighbors
                .learn_request(r.sender_ip, r.sender_hw, Instant::now());
        }
        if r.operation == arp::Operation::Reply {
            if r.target_ip == our_ip && side.prefix.contains(IpAddr::V4(r.sender_ip)) {
                let _ = self
                    .shared
                    .neighbors
                    .learn_reply(r.sender_ip, r.sender_hw, Instant::now());
            } else {
                // Gratuitous, or meant for someone else: counted, nothing learned.
                self.shared
                    .neighbors
                    .counters
                    .unsolicited
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if r.operation == arp::Operation::Request && r.target_ip == our_ip {
            let mut out = b;
            out.reset();
            let Some(d) = out.append(ethernet::HEADER_LEN + arp::PACKET_LEN) else {
                return self.drop_pkt(out, DropReason::NoBuffer);
            };
            let reply = arp::Repr {
                operation: arp::Operation::Reply,
                sender_hw: our_mac,
                sender_ip: our_ip,
                target_hw: r.sender_hw,
                target_ip: r.sender_ip,
            };
            emit_arp(d, our_mac, r.sender_hw, &reply);
            self.stats.arp_replies += 1;
            if red {
                self.red_tx.push(out)
            } else {
                self.black_tx.push(out)
            }
        } else {
            // Replies and requests for others: learned from, then consumed (not a drop).
            self.pool.put(b);
        }
    }

    /// Sends an ARP request for `ip` on one side, at most every 100 ms per address.
    pub(super) fn arp_request(&mut self, ip: Ipv4Addr, red: bool) {
        let now = self.now_ns();
        let slot = (u32::from(ip) as usize) % self.arp_last.len();
        let (last_ip, last_t) = self.arp_last[slot];
        if last_ip == ip && now.saturating_sub(last_t) < 100_000_000 {
            return;
        }
        self.arp_last[slot] = (ip, now);
        self.shared.neighbors.asked(ip, Instant::now());
        let Some(mut b) = self.pool.get() else { return };
        let (side, mac) = if red {
            (self.shared.red, self.red.mac())
        } else {
            (self.shared.black, self.black.mac())
        };
        let Some(d) = b.append(ethernet::HEADER_LEN + arp::PACKET_LEN) else {
            return self.pool.put(b);
        };
        let req = arp::Repr {
            operation: arp::Operation::Request,
            sender_hw: mac,
            sender_ip: side.ip,
            target_hw: MacAddr::ZERO,
            target_ip: ip,
        };
        emit_arp(d, mac, MacAddr::BROADCAST, &req);
        self.stats.arp_requests += 1;
        if red {
            self.red_tx.push(b)
        } else {
            self.black_tx.push(b)
        }
    }

    /// Prepends an Ethernet header towards `next_hop` on one side and queues the frame; `false`
    /// when it was dropped (and counted) instead, so callers count only what really leaves.
    #[inline]
    pub(super) fn send_ip(&mut self, b: PktBuf, next_hop: Option<Ipv4Addr>, red: bool) -> bool {
        let Some(nh) = next_hop else {
            self.drop_pkt(b, DropReason::NotForUs);
            return false;
        };
        let Some(dst) = self.neigh.get(&self.shared.neighbors, nh) else {
            self.arp_request(nh, red);
            self.drop_pkt(b, DropReason::NoNeighbor);
            return false;
        };
        self.send_to_mac(b, dst, red)
    }

    /// The next hop's MAC for a packet to `remote` on black, or why there is none (an ARP
    /// request goes out when the neighbor is unknown).
    #[inline]
    pub(super) fn black_next_hop_mac(&mut self, remote: IpAddr) -> Result<MacAddr, DropReason> {
        let IpAddr::V4(a) = remote else {
            return Err(DropReason::NotForUs);
        };
        let Some(nh) = self.shared.black.next_hop(a) else {
            return Err(DropReason::NotForUs);
        };
        match self.neigh.get(&self.shared.neighbors, nh) {
            Some(m) => Ok(m),
            None => {
                self.arp_request(nh, false);
                Err(DropReason::NoNeighbor)
            }
        }
    }

    /// Adds the Ethernet header towards `dst` and queues the frame on red or black.
    #[inline]
    pub(super) fn send_to_mac(&mut self, mut b: PktBuf, dst: MacAddr, red: bool) -> bool {
        let src = if red { self.macs[0] } else { self.macs[1] };
        let Some(h) = b.prepend(ethernet::HEADER_LEN) else {
            self.drop_pkt(b, DropReason::NoHeadroom);
            return false;
        };
        let mut eth = ethernet::Frame::new_unchecked(h);
        eth.set_dst_addr(dst);
        eth.set_src_addr(src);
        eth.set_ethertype(ethernet::ethertype::IPV4);
        if red {
            self.red_tx.push(b)
        } else {
            self.black_tx.push(b)
        }
        true
    }

    /// Layer 2 of either side: IPv4 frames are returned; ARP is answered or learned from;
    /// anything else is dropped and counted.
    #[inline]
    pub(super) fn ipv4_frame(
        &mut self,
        b: PktBuf,
        our_ip: Ipv4Addr,
        our_mac: MacAddr,
        red: bool,
    ) -> Option<PktBuf> {
        let (ethertype, dst) = match ethernet::Frame::new_checked(b.data()) {
            Ok(f) => (f.ethertype(), f.dst_addr()),
            Err(_) => {
                self.drop_pkt(b, DropReason::Malformed);
                return None;
            }
        };
        // Layer-2 admission: IP only in frames to our MAC (not another host's, not broadcast
        // or multicast); ARP to us or broadcast. VLAN-tagged frames have an EtherType of their
        // own and fall to the last arm: espada runs on no VLAN.
        match ethertype {
            ethernet::ethertype::IPV4 if dst == our_mac => Some(b),
            ethernet::ethertype::ARP if dst == our_mac || dst == MacAddr::BROADCAST => {
                self.arp(b, our_ip, our_mac, red);
                None
            }
            _ => {
                self.drop_pkt(b, DropReason::NotForUs);
                None
            }
        }
    }
}
