//! One core, one direction: the shape DPDK ipsec-secgw's single lcore measures, so the two can
//! be compared like with like.
//!
//! * **encrypt**: sunset's frames (256, made once by the traffic generator) replayed on red,
//!   each copied into a fresh pool buffer → west's worker → a null port on black that frees
//!   what it is given (ipsec-secgw: `net_pcap,infinite_rx=1` → `net_null`);
//! * **decrypt**: a replay port on black that copies stored ESP frames into fresh pool buffers,
//!   burst after burst, forever (ipsec-secgw's `net_pcap,infinite_rx=1`) → east's worker → the
//!   checking sink (sunrise) on red. The frames are west's own, captured once before the
//!   measurement; replaying them needs the anti-replay service off on east's SAs
//!   (`LabOpts::replay_window = 0`), as it is by default in ipsec-secgw.
//!
//! Nothing crosses a core: one thread, pinned, polls one worker.

use crate::pair::{host, mac, shared, GatewaySides, PairSpec};
use crate::traffic::{Generator, Sink, TrafficCounters, TrafficSpec};
use espada_dataplane::pktbuf::{PacketBuf, PktBuf};
use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::port::{PortQueue, PortStats};
use espada_dataplane::worker::{Worker, WorkerStats};
use espada_sadb::db::{DbError, SaDb};
use espada_wire::ethernet::MacAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port that takes every frame and frees it, and never receives anything.
#[derive(Debug)]
pub struct NullPort {
    mac: MacAddr,
    stats: PortStats,
}

impl NullPort {
    /// A null port with address `mac`.
    pub fn new(mac: MacAddr) -> NullPort {
        NullPort {
            mac,
            stats: PortStats::default(),
        }
    }
}

impl PortQueue for NullPort {
    fn rx_burst(&mut self, _: &mut PoolCache, _: &mut Vec<PktBuf>, _: usize) -> usize {
        0
    }
    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let n = pkts.len();
        self.stats.tx_packets += n as u64;
        for b in pkts.iter() {
            self.stats.tx_bytes += b.len() as u64;
        }
        pool.put_burst(pkts);
        n
    }
    fn mac(&self) -> MacAddr {
        self.mac
    }
    fn stats(&self) -> PortStats {
        self.stats
    }
    fn describe(&self) -> String {
        "null".into()
    }
}

/// A port that keeps a copy of the first `max` frames it is given (set-up only: allocates).
#[derive(Debug)]
pub struct CapturePort {
    mac: MacAddr,
    max: usize,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl CapturePort {
    /// A capture port and the place its frames go.
    pub fn new(mac: MacAddr, max: usize) -> (CapturePort, Arc<Mutex<Vec<Vec<u8>>>>) {
        let frames = Arc::new(Mutex::new(Vec::new()));
        (
            CapturePort {
                mac,
                max,
                frames: frames.clone(),
            },
            frames,
        )
    }
}

impl PortQueue for CapturePort {
    fn rx_burst(&mut self, _: &mut PoolCache, _: &mut Vec<PktBuf>, _: usize) -> usize {
        0
    }
    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let n = pkts.len();
        let mut f = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        for b in pkts.drain(..) {
            if f.len() < self.max {
                f.push(b.data().to_vec());
            }
            pool.put(b);
        }
        n
    }
    fn mac(&self) -> MacAddr {
        self.mac
    }
    fn stats(&self) -> PortStats {
        PortStats::default()
    }
    fn describe(&self) -> String {
        "capture".into()
    }
}

/// A port that receives the same stored frames over and over, each copied into a fresh pool
/// buffer (DPDK's `net_pcap` with `infinite_rx=1` does the same copy per packet).
#[derive(Debug)]
pub struct ReplayPort {
    mac: MacAddr,
    frames: Vec<Vec<u8>>,
    next: usize,
    stats: PortStats,
}

impl ReplayPort {
    /// Replays `frames` (at least one) on a port with address `mac`.
    pub fn new(mac: MacAddr, frames: Vec<Vec<u8>>) -> ReplayPort {
        assert!(!frames.is_empty(), "nothing to replay");
        ReplayPort {
            mac,
            frames,
            next: 0,
            stats: PortStats::default(),
        }
    }
}

impl PortQueue for ReplayPort {
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        // Buffers in bulk, then one copy each (net_pcap: rte_pktmbuf_alloc_bulk, rte_memcpy).
        let start = out.len();
        let got = pool.get_burst(out, max);
        let mut n = 0;
        for b in &mut out[start..] {
            let f = &self.frames[self.next];
            match b.append(f.len()) {
                Some(d) => d.copy_from_slice(f),
                None => break,
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += f.len() as u64;
            // No division per packet: the replay wraps with a compare.
            self.next += 1;
            if self.next == self.frames.len() {
                self.next = 0;
            }
            n += 1;
        }
        if n < got {
            // A frame larger than the pool's buffers: the buffers not filled go back.
            for b in out.drain(start + n..) {
                pool.put(b);
            }
        }
        n
    }
    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        let n = pkts.len();
        pool.put_burst(pkts);
        n
    }
    fn mac(&self) -> MacAddr {
        self.mac
    }
    fn stats(&self) -> PortStats {
        self.stats
    }
    fn describe(&self) -> String {
        format!("replay({} frames)", self.frames.len())
    }
}

/// Which half of the tunnel one core runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// West: cleartext in, ESP out.
    Encrypt,
    /// East: ESP in, cleartext out.
    Decrypt,
}

/// The result of one measurement.
#[derive(Debug, Clone)]
pub struct SoloResult {
    /// Packets encapsulated (encrypt) or decapsulated and delivered (decrypt) in the window.
    pub packets: u64,
    /// Inner bytes of those packets.
    pub bytes: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// The worker's counters at the end (drops included).
    pub stats: WorkerStats,
    /// Packets the sink found damaged (decrypt).
    pub bad: u64,
}

/// Frames replayed in decrypt mode (ipsec-secgw's harness replays a 256-packet capture).
pub const REPLAY_FRAMES: usize = 256;

fn spin(w: &mut Worker, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            w.poll();
        }
    }
}

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct SoloSpec {
    /// Packet size, flows (workers and steering are ignored: one core).
    pub pair: PairSpec,
    /// Which half.
    pub dir: Direction,
    /// Run this long before counting.
    pub warmup: Duration,
    /// Count this long.
    pub duration: Duration,
    /// Pin the worker here.
    pub core: Option<core_affinity::CoreId>,
    /// Decrypt: deliver to the checking sink (every packet's headers and tag verified) rather
    /// than to a null port that only frees (what ipsec-secgw's `net_null` does).
    pub check: bool,
}

/// Runs one direction on one core for `warmup + duration`, counting only `duration`.
/// `west`/`east` databases as for [`crate::pair::Pair::new`] (east's with anti-replay off for
/// [`Direction::Decrypt`]).
pub fn run(
    west_db: SaDb,
    east_db: SaDb,
    west: GatewaySides,
    east: GatewaySides,
    solo: SoloSpec,
) -> Result<SoloResult, DbError> {
    let SoloSpec {
        pair: spec,
        dir,
        warmup,
        duration,
        core,
        check,
    } = solo;
    let pool = Pool::new(384 + 256, spec.size.max(1518) + 512);
    let stop = Arc::new(AtomicBool::new(false));
    let sunset = host(&west.red, 10);
    let sunrise = host(&east.red, 10);
    let tspec = TrafficSpec {
        src: sunset,
        dst: sunrise,
        src_mac: mac::SUNSET,
        size: spec.size,
        flows: spec.flows,
        limit: None,
        rate: None,
        imix: spec.imix,
        tunnels: 0,
        tunnel_last: false,
    };
    let sent = Arc::new(TrafficCounters::default());
    let received = Arc::new(TrafficCounters::default());
    let w_sh = shared(
        west,
        west_db,
        1,
        &[(sunset, mac::SUNSET), (east.black.ip, mac::EAST_BLACK)],
        stop.clone(),
    );
    // The measured worker's shared state and its two ports; the worker itself is built on its
    // own pinned thread (see `launch`).
    let (sh, red, black): (_, Box<dyn PortQueue>, Box<dyn PortQueue>) = match dir {
        Direction::Encrypt => {
            // Sunset's frames, made once and replayed (ipsec-secgw replays a capture the same
            // way): the measured loop pays one copy per packet, not the generator's work.
            let mut g = Generator::new(tspec, mac::WEST_RED, 0, sent.clone());
            let mut cache = PoolCache::new(pool.clone());
            let mut bufs = Vec::with_capacity(REPLAY_FRAMES);
            while bufs.len() < REPLAY_FRAMES {
                let want = REPLAY_FRAMES - bufs.len();
                if g.rx_burst(&mut cache, &mut bufs, want) == 0 {
                    break;
                }
            }
            let frames: Vec<Vec<u8>> = bufs.iter().map(|b| b.data().to_vec()).collect();
            for b in bufs {
                cache.put(b);
            }
            drop(cache);
            (
                w_sh,
                Box::new(ReplayPort::new(mac::WEST_RED, frames)),
                Box::new(NullPort::new(mac::WEST_BLACK)),
            )
        }
        Direction::Decrypt => {
            // West encrypts the frames east will replay.
            let mut t = tspec;
            t.limit = Some(REPLAY_FRAMES as u64);
            let (port, store) = CapturePort::new(mac::WEST_BLACK, REPLAY_FRAMES);
            let mut cap = Worker::new(
                0,
                w_sh,
                Box::new(Generator::new(t, mac::WEST_RED, 0, sent.clone())),
                Box::new(port),
                PoolCache::new(pool.clone()),
            )?;
            for _ in 0..(REPLAY_FRAMES * 4) {
                cap.poll();
            }
            cap.finish();
            drop(cap);
            let frames = std::mem::take(&mut *store.lock().unwrap_or_else(|e| e.into_inner()));
            assert_eq!(
                frames.len(),
                REPLAY_FRAMES,
                "west encrypted the frames to replay"
            );
            let e_sh = shared(
                east,
                east_db,
                1,
                &[(sunrise, mac::SUNRISE), (west.black.ip, mac::WEST_BLACK)],
                stop.clone(),
            );
            (
                e_sh,
                if check {
                    Box::new(Sink::new(mac::SUNRISE, sunrise, 0, received.clone()))
                } else {
                    Box::new(NullPort::new(mac::SUNRISE))
                },
                Box::new(ReplayPort::new(mac::EAST_BLACK, frames)),
            )
        }
    };
    let stop2 = stop.clone();
    let pool2 = pool.clone();
    let t = match espada_dataplane::launch::spawn_worker(
        "espada-solo".into(),
        move || {
            if let Some(id) = core {
                core_affinity::set_for_current(id);
            }
        },
        move || Worker::new(0, sh, red, black, PoolCache::new(pool2)),
        move |worker| {
            worker.thread_start();
            spin(worker, &stop2);
            worker.finish();
        },
    ) {
        Ok(t) => t,
        Err(espada_dataplane::launch::LaunchError::Build(e)) => return Err(e),
        Err(e) => panic!("{e}"),
    };
    let cell = t.cell.clone();
    let count = |s: &WorkerStats| match dir {
        Direction::Encrypt => (s.encap_packets, s.encap_bytes),
        Direction::Decrypt => (s.decap_packets, s.decap_bytes),
    };
    std::thread::sleep(warmup);
    let (p0, b0) = count(&cell.read());
    let t0 = Instant::now();
    while t0.elapsed() < duration && !crate::pair::interrupted() {
        std::thread::sleep(Duration::from_millis(5).min(duration));
    }
    let (p1, b1) = count(&cell.read());
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let worker = t.join().expect("the worker thread panicked");
    Ok(SoloResult {
        packets: p1 - p0,
        bytes: b1 - b0,
        seconds,
        stats: *worker.stats(),
        bad: received.bad(),
    })
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::pair::lab;
    use espada_dataplane::drop::DropReason;
    use espada_sadb::db::SaMode;
    use espada_sadb::lifetime::Lifetimes;

    fn solo(dir: Direction) -> SoloResult {
        let (w, e) = lab::dbs_opts(
            1,
            1,
            SaMode::PerCpu,
            Lifetimes::default(),
            lab::LabOpts {
                replay_window: 0,
                ..Default::default()
            },
        );
        let (ws, es) = lab::sides();
        let spec = PairSpec {
            size: 200,
            ..Default::default()
        };
        let solo = SoloSpec {
            pair: spec,
            dir,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(200),
            core: None,
            check: true,
        };
        run(w, e, ws, es, solo).unwrap()
    }

    #[test]
    fn encrypt_on_one_core_counts_what_it_sealed() {
        let r = solo(Direction::Encrypt);
        assert!(r.packets > 0 && r.seconds > 0.1);
        assert_eq!(r.bytes, r.packets * 200);
        assert_eq!(r.stats.drops.total(), 0, "{:?}", r.stats.drops);
        assert_eq!(r.stats.black_tx, r.stats.encap_packets);
    }

    #[test]
    fn decrypt_on_one_core_delivers_intact_packets() {
        let r = solo(Direction::Decrypt);
        assert!(r.packets > 0);
        assert_eq!(r.bad, 0);
        assert_eq!(r.stats.drops.get(DropReason::Integrity), 0);
        assert_eq!(r.stats.drops.total(), 0, "{:?}", r.stats.drops);
    }
}
