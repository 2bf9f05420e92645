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
            let l = self
                .shared
                .neighbors
                .learn_request(r.sender_ip, r.sender_hw, Instant::now());
            if l == crate::neighbor::Learn::Provisional {
                // Anyone can send a request: ask the address ourselves; its solicited answer
                // replaces the provisional entry.
                self.arp_request(r.sender_ip, red);
            }
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

    /// Asks again for the learned neighbors that would soon age out (worker 0, off the fast
    /// path), on the side whose subnet holds them.
    pub(super) fn refresh_neighbors(&mut self) {
        for ip in self.shared.neighbors.take_refresh(16) {
            let red = self.shared.red.prefix.contains(IpAddr::V4(ip));
            self.arp_request(ip, red);
        }
        for ip in self.shared.neighbors6.take_refresh(16) {
            let red = self
                .shared
                .red
                .v6
                .is_some_and(|v| v.prefix.contains(IpAddr::V6(ip)));
            self.nd_request(ip, red);
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
    #[inline(always)]
    pub(super) fn send_ip(&mut self, b: PktBuf, next_hop: Option<Ipv4Addr>, red: bool) -> bool {
        let Some(nh) = next_hop else {
            self.drop_pkt(b, DropReason::NotForUs);
            return false;
        };
        let Some(dst) = self.neigh.get(&self.shared.neighbors, nh) else {
            // Held until the answer comes (`true`: it goes out then, or is counted dropped).
            self.arp_request(nh, red);
            return self.hold(b, hold::Held::Ip4 { nh, red });
        };
        self.send_to_mac(b, dst, red)
    }

    /// The next hop's MAC for a packet to `remote` on black, or why there is none (an ARP
    /// request or a neighbor solicitation goes out when the neighbor is unknown).
    #[inline(always)]
    pub(super) fn black_next_hop_mac(&mut self, remote: IpAddr) -> Result<MacAddr, DropReason> {
        if let Some((r, m)) = self.black_memo {
            if r == remote {
                return Ok(m);
            }
        }
        let m = self.resolve_black(remote)?;
        self.black_memo = Some((remote, m));
        Ok(m)
    }

    /// [`Self::black_next_hop_mac`] without the memo.
    #[inline(never)]
    fn resolve_black(&mut self, remote: IpAddr) -> Result<MacAddr, DropReason> {
        match remote {
            IpAddr::V4(a) => {
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
            IpAddr::V6(a) => {
                let Some(nh) = self.shared.black.next_hop6(a) else {
                    return Err(DropReason::NotForUs);
                };
                match self.neigh6.get(&self.shared.neighbors6, nh) {
                    Some(m) => Ok(m),
                    None => {
                        self.nd_request(nh, false);
                        Err(DropReason::NoNeighbor)
                    }
                }
            }
        }
    }

    /// [`Self::send_ip`] for IPv6: the next hop's MAC from neighbor discovery.
    #[inline]
    pub(super) fn send_ip6(&mut self, b: PktBuf, next_hop: Option<Ipv6Addr>, red: bool) -> bool {
        let Some(nh) = next_hop else {
            self.drop_pkt(b, DropReason::NotForUs);
            return false;
        };
        let Some(dst) = self.neigh6.get(&self.shared.neighbors6, nh) else {
            self.nd_request(nh, red);
            return self.hold(b, hold::Held::Ip6 { nh, red });
        };
        self.send_to_mac(b, dst, red)
    }

    /// Sends a neighbor solicitation for `ip` on one side, at most every 100 ms per address.
    pub(super) fn nd_request(&mut self, ip: Ipv6Addr, red: bool) {
        let now = self.now_ns();
        let k = u128::from(ip);
        let slot = ((k ^ (k >> 64)) as usize) % self.nd_last.len();
        let (last_ip, last_t) = self.nd_last[slot];
        if last_ip == ip && now.saturating_sub(last_t) < 100_000_000 {
            return;
        }
        let (side, mac) = if red {
            (self.shared.red, self.red.mac())
        } else {
            (self.shared.black, self.black.mac())
        };
        let Some(v6) = side.v6 else { return };
        self.nd_last[slot] = (ip, now);
        self.shared.neighbors6.asked(ip, Instant::now());
        let Some(mut b) = self.pool.get() else { return };
        let Some(d) = b.append(ethernet::HEADER_LEN + icmpv6::NDP_PACKET_LEN) else {
            return self.pool.put(b);
        };
        let dst_mac = icmpv6::multicast_mac(icmpv6::solicited_node(ip));
        emit_eth(d, mac, dst_mac, ethernet::ethertype::IPV6);
        icmpv6::emit_ns(&mut d[ethernet::HEADER_LEN..], v6.ip, ip, mac);
        self.stats.nd_solicits += 1;
        if red {
            self.red_tx.push(b)
        } else {
            self.black_tx.push(b)
        }
    }

    /// A neighbor solicitation or advertisement for one side: solicitations for our address
    /// are answered (and the asker learned, as an ARP request is); advertisements teach only
    /// when they answer our own solicitation (see `neighbor`). Invalid ones are counted.
    pub(super) fn nd(&mut self, b: PktBuf, red: bool) {
        let side = if red {
            self.shared.red
        } else {
            self.shared.black
        };
        let Some(v6) = side.v6 else {
            return self.drop_pkt(b, DropReason::NotForUs);
        };
        let (msg, src, eth_src) = {
            let d = b.data();
            let Some(m) = icmpv6::parse_ndp(&d[ethernet::HEADER_LEN..]) else {
                return self.drop_pkt(b, DropReason::Malformed);
            };
            let ip = ipv6::Packet::new_unchecked(&d[ethernet::HEADER_LEN..]);
            let eth = ethernet::Frame::new_unchecked(d);
            (m, ip.src_addr(), eth.src_addr())
        };
        let our_mac = if red { self.macs[0] } else { self.macs[1] };
        match msg {
            icmpv6::Ndp::Solicit { target, source_mac } if target == v6.ip => {
                if src.is_unspecified() {
                    // Duplicate address detection of our own address by another host: it
                    // will not take it once we answer nothing; nothing to learn.
                    self.shared
                        .neighbors6
                        .counters
                        .unsolicited
                        .fetch_add(1, Ordering::Relaxed);
                    return self.pool.put(b);
                }
                let reply_mac = source_mac.unwrap_or(eth_src);
                // Only an on-link source makes a (provisional) entry, and it is asked itself.
                let on_link = v6.prefix.contains(IpAddr::V6(src)) || src.is_unicast_link_local();
                if let (Some(m), true) = (source_mac, on_link) {
                    let l = self.shared.neighbors6.learn_request(src, m, Instant::now());
                    if l == crate::neighbor::Learn::Provisional {
                        self.nd_request(src, red);
                    }
                }
                let mut out = b;
                out.reset();
                let Some(d) = out.append(ethernet::HEADER_LEN + icmpv6::NDP_PACKET_LEN) else {
                    return self.drop_pkt(out, DropReason::NoBuffer);
                };
                emit_eth(d, our_mac, reply_mac, ethernet::ethertype::IPV6);
                icmpv6::emit_na(&mut d[ethernet::HEADER_LEN..], v6.ip, src, our_mac);
                self.stats.nd_adverts += 1;
                if red {
                    self.red_tx.push(out)
                } else {
                    self.black_tx.push(out)
                }
            }
            icmpv6::Ndp::Advert {
                target,
                target_mac,
                solicited,
                ..
            } => {
                let mac = target_mac.unwrap_or(eth_src);
                let on_link = v6.prefix.contains(IpAddr::V6(target))
                    || Some(target) == v6.gateway
                    || target.is_unicast_link_local();
                if solicited && on_link {
                    let _ = self
                        .shared
                        .neighbors6
                        .learn_reply(target, mac, Instant::now());
                } else {
                    self.shared
                        .neighbors6
                        .counters
                        .unsolicited
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.pool.put(b);
            }
            // Solicitations for other hosts' addresses: consumed (not a drop).
            icmpv6::Ndp::Solicit { .. } => self.pool.put(b),
        }
    }

    /// Adds the Ethernet header towards `dst` and queues the frame on red or black.
    #[inline(always)]
    pub(super) fn send_to_mac(&mut self, mut b: PktBuf, dst: MacAddr, red: bool) -> bool {
        let src = if red { self.macs[0] } else { self.macs[1] };
        if let Err(r) = push_eth(&mut b, src, dst) {
            self.drop_pkt(b, r);
            return false;
        }
        if red {
            self.red_tx.push(b)
        } else {
            self.black_tx.push(b)
        }
        true
    }

    /// Layer 2 of either side: IPv4 and IPv6 frames are returned; ARP and IPv6 neighbor
    /// discovery are answered or learned from; anything else is dropped and counted.
    #[inline(always)]
    pub(super) fn ip_frame(
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
        // or multicast); ARP to us or broadcast; IPv6 also to our solicited-node multicast
        // group (neighbor solicitations). VLAN-tagged frames have an EtherType of their own
        // and fall to the last arm: espada runs on no VLAN.
        match ethertype {
            ethernet::ethertype::IPV4 if dst == our_mac => Some(b),
            ethernet::ethertype::IPV6 => self.ipv6_frame(b, dst == our_mac, dst, red),
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

    /// An IPv6 frame: neighbor discovery goes to [`Self::nd`]; other packets are returned
    /// when sent to our MAC on a side with IPv6. Kept out of line: the IPv4 fast path stays
    /// small enough to inline.
    #[inline(never)]
    fn ipv6_frame(&mut self, b: PktBuf, to_us: bool, dst: MacAddr, red: bool) -> Option<PktBuf> {
        let side = if red {
            &self.shared.red
        } else {
            &self.shared.black
        };
        let Some(v6) = side.v6 else {
            self.drop_pkt(b, DropReason::NotForUs);
            return None;
        };
        let d = &b.data()[ethernet::HEADER_LEN..];
        // NS/NA: ICMPv6 right after the fixed header, type 135 or 136.
        let is_nd = d.len() > ipv6::HEADER_LEN
            && d[6] == espada_wire::ip_proto::ICMPV6
            && matches!(
                d[ipv6::HEADER_LEN],
                icmpv6::NEIGHBOR_SOLICIT | icmpv6::NEIGHBOR_ADVERT
            );
        let solicited_group = icmpv6::multicast_mac(icmpv6::solicited_node(v6.ip));
        if is_nd && (to_us || dst == solicited_group) {
            self.nd(b, red);
            return None;
        }
        if to_us {
            return Some(b);
        }
        self.drop_pkt(b, DropReason::NotForUs);
        None
    }
}

/// Puts an Ethernet header from `src` to `dst` in front of the IP packet in `b` (its
/// EtherType from the packet's first nibble), in place.
#[inline(always)]
pub(super) fn push_eth(b: &mut PktBuf, src: MacAddr, dst: MacAddr) -> Result<(), DropReason> {
    let ethertype = if b.data().first().is_some_and(|v| v >> 4 == 6) {
        ethernet::ethertype::IPV6
    } else {
        ethernet::ethertype::IPV4
    };
    let h = b
        .prepend(ethernet::HEADER_LEN)
        .ok_or(DropReason::NoHeadroom)?;
    emit_eth(h, src, dst, ethertype);
    Ok(())
}

/// Writes an Ethernet header into the first 14 bytes of `buf`.
#[inline]
fn emit_eth(buf: &mut [u8], src: MacAddr, dst: MacAddr, ethertype: u16) {
    let mut eth = ethernet::Frame::new_unchecked(buf);
    eth.set_dst_addr(dst);
    eth.set_src_addr(src);
    eth.set_ethertype(ethertype);
}
