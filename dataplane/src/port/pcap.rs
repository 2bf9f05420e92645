//! pcap files (the classic libpcap format, LINKTYPE_ETHERNET, microsecond timestamps):
//! [`PcapPort`] replays a capture as its receive side and writes what it transmits to another
//! capture; [`Tap`] wraps any port queue and records both directions for Wireshark.
//!
//! Recording costs a buffered file write per frame (a syscall every 64 KiB): a debugging aid,
//! not something to leave on in a benchmark.

use super::{PortQueue, PortStats};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use espada_wire::ethernet::MacAddr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC_US: u32 = 0xa1b2_c3d4;
const MAGIC_NS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;

/// Writes frames to a pcap file.
pub struct PcapWriter {
    w: BufWriter<File>,
}

impl PcapWriter {
    /// Creates (truncates) `path` and writes the file header.
    pub fn create(path: &Path) -> io::Result<PcapWriter> {
        let mut w = BufWriter::with_capacity(1 << 16, File::create(path)?);
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC_US.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&65535u32.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        w.write_all(&h)?;
        Ok(PcapWriter { w })
    }

    /// Appends one frame with the current time.
    pub fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut rec = [0u8; 16];
        rec[0..4].copy_from_slice(&(t.as_secs() as u32).to_le_bytes());
        rec[4..8].copy_from_slice(&t.subsec_micros().to_le_bytes());
        rec[8..12].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        rec[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.w.write_all(&rec)?;
        self.w.write_all(frame)
    }

    /// Flushes buffered frames to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        let _ = self.w.flush();
    }
}

/// Reads every frame of a pcap file (either byte order, µs or ns timestamps).
pub fn read_pcap(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let bad = |m: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {m}", path.display()),
        )
    };
    if data.len() < 24 {
        return Err(bad("too short for a pcap header"));
    }
    let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let le = match magic {
        MAGIC_US | MAGIC_NS => true,
        m if m.swap_bytes() == MAGIC_US || m.swap_bytes() == MAGIC_NS => false,
        _ => {
            return Err(bad(
                "not a pcap file (pcapng is not supported: convert with editcap -F pcap)",
            ))
        }
    };
    let rd = |b: &[u8]| {
        if le {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]])
        }
    };
    if rd(&data[20..24]) != LINKTYPE_ETHERNET {
        return Err(bad("only Ethernet captures (linktype 1) are supported"));
    }
    let mut off = 24;
    let mut frames = Vec::new();
    while off + 16 <= data.len() {
        let incl = rd(&data[off + 8..off + 12]) as usize;
        off += 16;
        if off + incl > data.len() {
            return Err(bad("truncated record"));
        }
        frames.push(data[off..off + incl].to_vec());
        off += incl;
    }
    Ok(frames)
}

/// A port whose receive side replays a capture and whose transmit side writes one.
pub struct PcapPort {
    frames: Vec<Vec<u8>>,
    next: usize,
    out: Option<PcapWriter>,
    mac: MacAddr,
    name: String,
    stats: PortStats,
}

impl PcapPort {
    /// Replays `input` (if given) and records transmitted frames to `output` (if given).
    pub fn open(input: Option<&Path>, output: Option<&Path>, mac: MacAddr) -> io::Result<PcapPort> {
        let frames = match input {
            Some(p) => read_pcap(p)?,
            None => Vec::new(),
        };
        let out = output.map(PcapWriter::create).transpose()?;
        Ok(PcapPort {
            frames,
            next: 0,
            out,
            mac,
            name: format!(
                "pcap:{}",
                input.map(|p| p.display().to_string()).unwrap_or_default()
            ),
            stats: PortStats::default(),
        })
    }

    /// Frames left to replay.
    pub fn remaining(&self) -> usize {
        self.frames.len() - self.next
    }
}

impl PortQueue for PcapPort {
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let mut n = 0;
        while n < max && self.next < self.frames.len() {
            let Some(mut b) = pool.get() else { break };
            if b.load(&self.frames[self.next]) {
                self.stats.rx_packets += 1;
                self.stats.rx_bytes += b.len() as u64;
                out.push(b);
                n += 1;
            } else {
                self.stats.rx_dropped += 1;
                pool.put(b);
            }
            self.next += 1;
        }
        n
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let n = pkts.len();
        for b in pkts.drain(..) {
            if let Some(w) = &mut self.out {
                let _ = w.write(b.data());
            }
            self.stats.tx_packets += 1;
            self.stats.tx_bytes += b.len() as u64;
            pool.put(b);
        }
        n
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

/// Records every frame a queue receives and transmits.
pub struct Tap<Q: PortQueue> {
    inner: Q,
    w: PcapWriter,
}

impl<Q: PortQueue> Tap<Q> {
    /// Wraps `inner`, writing to `path`.
    pub fn new(inner: Q, path: &Path) -> io::Result<Tap<Q>> {
        Ok(Tap {
            inner,
            w: PcapWriter::create(path)?,
        })
    }
}

impl<Q: PortQueue> PortQueue for Tap<Q> {
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let start = out.len();
        let n = self.inner.rx_burst(pool, out, max);
        for b in &out[start..] {
            let _ = self.w.write(b.data());
        }
        n
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        for b in pkts.iter() {
            let _ = self.w.write(b.data());
        }
        self.inner.tx_burst(pool, pkts)
    }

    fn mac(&self) -> MacAddr {
        self.inner.mac()
    }

    fn stats(&self) -> PortStats {
        self.inner.stats()
    }

    fn describe(&self) -> String {
        format!("tap({})", self.inner.describe())
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::pool::Pool;

    #[test]
    fn write_then_replay() {
        let dir = std::env::temp_dir().join(format!("espada-pcap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.pcap");
        let pool = Pool::new(16, 2048);
        let mut pc = PoolCache::new(pool);
        let mut w = PcapPort::open(None, Some(&f), MacAddr::ZERO).unwrap();
        let mut v = vec![
            PktBuf::from_slice(&[1u8; 60]),
            PktBuf::from_slice(&[2u8; 100]),
        ];
        assert_eq!(w.tx_burst(&mut pc, &mut v), 2);
        drop(w);
        let mut r = PcapPort::open(Some(&f), None, MacAddr::ZERO).unwrap();
        let mut got = Vec::new();
        assert_eq!(r.rx_burst(&mut pc, &mut got, 32), 2);
        assert_eq!(got[1].data(), &[2u8; 100][..]);
        assert_eq!(r.remaining(), 0);
        std::fs::write(&f, b"garbage").unwrap();
        assert!(read_pcap(&f).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
