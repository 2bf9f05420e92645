//! Red, stage 2: sequence numbers, seal and rewrite, over the protect list. The burst's
//! sequence numbers are reserved once per tunnel (durably, see `seqstore`), each packet is
//! sealed in place (ESP header, IV, trailer, ICV, outer IPv4/UDP from the SA's template) and
//! given its Ethernet header; the list then becomes black's transmit list.

use super::l2::push_eth;
use super::*;
use espada_sadb::sa::SendOrder;

impl Worker {
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
        // Shared SAs kept in wire order (`SendOrder`): their locks are taken before their
        // numbers are reserved, in address order (the same order on every core, whatever
        // snapshot each has), and let go once the burst is on the port.
        let mut held: [Option<Arc<SendOrder>>; MAX_T] = Default::default();
        let mut nheld = 0;
        for e in res.iter().filter(|e| e.0 != usize::MAX) {
            if let Some(o) = self.sas.outbound(e.0).and_then(|sa| sa.send_order()) {
                held[nheld] = Some(o.clone());
                nheld += 1;
            }
        }
        if nheld > 0 {
            held[..nheld].sort_unstable_by_key(|o| o.as_ref().map(|o| Arc::as_ptr(o) as usize));
            // One lock taken once, even if two tunnels ever named it (a spin lock taken twice
            // by one core would never come free).
            for i in 1..nheld {
                if held[i - 1]
                    .as_ref()
                    .zip(held[i].as_ref())
                    .is_some_and(|(a, b)| Arc::ptr_eq(a, b))
                {
                    held[i - 1] = None;
                }
            }
            for o in held[..nheld].iter().flatten() {
                if o.lock() {
                    self.stats.order_waits += 1;
                }
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
                // (A shared SA among those is not held in wire order: taking its lock out of
                // address order could deadlock with another core. Nine tunnels in one burst.)
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
        if nheld > 0 {
            // The burst leaves before another core may reserve on these SAs.
            self.transmit_black();
            for o in held[..nheld].iter().flatten() {
                o.unlock();
            }
        }
        verdicts.clear();
        self.verdicts = verdicts;
        let mut meta = meta;
        meta.clear();
        self.protect_meta = meta;
        self.protect = list;
    }
}
