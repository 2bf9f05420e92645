//! AF_XDP port (feature `af-xdp`): one XSK socket per worker queue, bound to one NIC queue,
//! through `xsk-rs` (libxdp loads the redirect program; zero-copy where the driver supports
//! it, copy mode otherwise, as libxdp decides). Half of each UMEM's frames sit on the fill
//! ring for receive, half are kept for transmit; completions return them.
//!
//! Frames are copied between the UMEM and the worker's pool buffers (one copy each way).
//! Steering per per-CPU SA uses the same ethtool ntuple rules `espada pin` plans (UDP source
//! port → queue), as the kernel path does.
#![allow(unsafe_code)]

use super::{PortQueue, PortStats};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use espada_wire::ethernet::MacAddr;
use std::io::Write;
use std::num::NonZeroU32;
use xsk_rs::config::{SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// One XSK socket with its UMEM: one worker's queue of an interface.
pub struct AfXdpQueue {
    umem: Umem,
    tx_q: TxQueue,
    rx_q: RxQueue,
    fq: FillQueue,
    cq: CompQueue,
    free: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    batch: Vec<FrameDesc>,
    mac: MacAddr,
    name: String,
    stats: PortStats,
}

impl AfXdpQueue {
    /// Opens queue `queue` of `iface` with a UMEM of `frames` frames (a power of two >= 64).
    pub fn open(iface: &str, queue: u32, frames: u32) -> Result<AfXdpQueue, String> {
        let mac = super::af_packet::interface_mac(iface).map_err(|e| format!("{iface}: {e}"))?;
        let n = NonZeroU32::new(frames.max(64)).expect("non-zero");
        let (umem, descs) = Umem::new(UmemConfig::default(), n, false)
            .map_err(|e| format!("{iface}: UMEM: {e}"))?;
        let ifname = iface
            .parse()
            .map_err(|_| format!("bad interface name {iface}"))?;
        let mut last = String::new();
        // A socket of a previous run may still be going away (EBUSY): retry briefly.
        for _ in 0..20 {
            // SAFETY: this UMEM is not shared with another socket on the same (iface, queue).
            match unsafe { Socket::new(SocketConfig::default(), &umem, &ifname, queue) } {
                Ok((tx_q, rx_q, Some((mut fq, cq)))) => {
                    let half = descs.len() / 2;
                    // SAFETY: these frames belong to this UMEM and are not used elsewhere until
                    // they come back through the RX ring.
                    let put = unsafe { fq.produce(&descs[..half]) };
                    if put != half {
                        return Err(format!("{iface}: fill ring took {put} of {half} frames"));
                    }
                    return Ok(AfXdpQueue {
                        free: descs[half..].to_vec(),
                        scratch: descs[..64].to_vec(),
                        batch: Vec::with_capacity(256),
                        umem,
                        tx_q,
                        rx_q,
                        fq,
                        cq,
                        mac,
                        name: format!("af_xdp:{iface}/q{queue}"),
                        stats: PortStats::default(),
                    });
                }
                Ok(_) => return Err(format!("{iface}: no fill/completion queue")),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(format!(
            "{iface} queue {queue}: cannot create an AF_XDP socket: {last}"
        ))
    }

    fn reclaim(&mut self) {
        // SAFETY: completed frames belong to this UMEM and are ours again.
        let n = unsafe { self.cq.consume(&mut self.scratch[..]) };
        self.free.extend_from_slice(&self.scratch[..n]);
    }
}

impl PortQueue for AfXdpQueue {
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let max = max.min(self.scratch.len());
        // SAFETY: scratch descriptors are overwritten with frames of this UMEM.
        let n = unsafe { self.rx_q.consume(&mut self.scratch[..max]) };
        let mut got = 0;
        for d in &self.scratch[..n] {
            // SAFETY: d was just received into this UMEM; we only read it before refilling.
            let data = unsafe { self.umem.data(d) };
            let bytes = data.contents();
            match pool.get() {
                Some(mut b) => match b.append(bytes.len()) {
                    Some(dst) => {
                        dst.copy_from_slice(bytes);
                        self.stats.rx_packets += 1;
                        self.stats.rx_bytes += bytes.len() as u64;
                        out.push(b);
                        got += 1;
                    }
                    None => {
                        self.stats.rx_dropped += 1;
                        pool.put(b);
                    }
                },
                None => self.stats.rx_dropped += 1,
            }
        }
        if n > 0 {
            // SAFETY: the frames were consumed above and go back to the kernel for receive.
            let put = unsafe { self.fq.produce(&self.scratch[..n]) };
            if put != n {
                self.stats.rx_dropped += (n - put) as u64;
            }
            if self.fq.needs_wakeup() {
                let _ = self.fq.wakeup(self.rx_q.fd_mut(), 0);
            }
        }
        got
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        self.reclaim();
        self.batch.clear();
        for b in pkts.drain(..) {
            let Some(mut d) = self.free.pop() else {
                self.stats.tx_dropped += 1;
                pool.put(b);
                continue;
            };
            // SAFETY: d is a free frame of this UMEM, not in any ring.
            let mut data = unsafe { self.umem.data_mut(&mut d) };
            let mut c = data.cursor();
            c.set_pos(0);
            if c.write_all(b.data()).is_err() {
                self.free.push(d);
                self.stats.tx_dropped += 1;
            } else {
                self.stats.tx_bytes += b.len() as u64;
                self.batch.push(d);
            }
            pool.put(b);
        }
        if self.batch.is_empty() {
            return 0;
        }
        // SAFETY: the batch holds filled frames of this UMEM, handed to the kernel.
        let sent = unsafe { self.tx_q.produce_and_wakeup(&self.batch) }.unwrap_or(0);
        for d in &self.batch[sent..] {
            self.free.push(*d);
            self.stats.tx_dropped += 1;
        }
        self.stats.tx_packets += sent as u64;
        sent
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn stats(&self) -> PortStats {
        self.stats
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
