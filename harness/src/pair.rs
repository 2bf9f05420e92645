//! A west↔east pair in one process over memory ports: the lab `sunset — west == east —
//! sunrise` without a network. West's red side is a traffic generator (sunset), east's red
//! side a checking sink (sunrise), and the black link is a multi-queue memory link whose
//! "NIC" steers each per-CPU SA's UDP source port to its core, as the lab's flow rules do.
//!
//! Used by `espada demo`, by benchmarks, and by tests (single-threaded `step`, or one thread
//! per core with `run`).

use crate::traffic::{Generator, Sink, TrafficCounters, TrafficSpec, TUNNEL_DST_BASE};
use crossbeam_queue::ArrayQueue;
use espada_dataplane::neighbor::NeighborTable;
use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::port::memory::{MemoryLink, Steering};
use espada_dataplane::port::PortQueue;
use espada_dataplane::worker::{GatewayShared, Side, StatsCell, Worker};
use espada_sadb::db::{EventQueue, SaDb, SaDbHandle};
use espada_wire::ethernet::MacAddr;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// MACs of the in-process lab.
pub mod mac {
    use super::MacAddr;
    /// sunset
    pub const SUNSET: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    /// sunrise
    pub const SUNRISE: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
    /// west red
    pub const WEST_RED: MacAddr = MacAddr([2, 0, 0, 0, 1, 1]);
    /// west black
    pub const WEST_BLACK: MacAddr = MacAddr([2, 0, 0, 0, 1, 2]);
    /// east red
    pub const EAST_RED: MacAddr = MacAddr([2, 0, 0, 0, 2, 1]);
    /// east black
    pub const EAST_BLACK: MacAddr = MacAddr([2, 0, 0, 0, 2, 2]);
}

/// Set by a Ctrl-C in `espada demo` / `bench` (see [`interrupt_flag`]): a run in progress ends
/// at once and reports what it measured.
static INTERRUPT: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// The flag a signal handler sets to end the runs of this process early.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    INTERRUPT
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// Whether the runs of this process were asked to end (Ctrl-C).
pub fn interrupted() -> bool {
    INTERRUPT.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Shape of the traffic and the link.
#[derive(Debug, Clone, Copy)]
pub struct PairSpec {
    /// Worker cores per gateway.
    pub workers: usize,
    /// Inner packet size.
    pub size: usize,
    /// Flows per generator queue.
    pub flows: u16,
    /// Packets per generator queue (`None`: unlimited).
    pub limit: Option<u64>,
    /// How east's black "NIC" picks a queue.
    pub steering: Steering,
    /// Ring depth of the memory link.
    pub ring_depth: usize,
    /// Packets per second per generator queue (`None`: as fast as possible).
    pub rate: Option<f64>,
    /// IMIX sizes instead of `size`.
    pub imix: bool,
    /// Tunnels the traffic is spread over ([`TrafficSpec::tunnels`]; the databases must have
    /// them: [`lab::LabOpts::tunnels`]).
    pub tunnels: u32,
    /// All traffic to the last tunnel.
    pub tunnel_last: bool,
}

impl Default for PairSpec {
    fn default() -> Self {
        PairSpec {
            workers: 1,
            size: 1400,
            flows: 16,
            limit: None,
            steering: Steering::UdpSrcPort { base: 4501 },
            ring_depth: 4096,
            rate: None,
            imix: false,
            tunnels: 0,
            tunnel_last: false,
        }
    }
}

/// Where the worker threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// West worker i and east worker i share core i (one thread per core).
    Shared,
    /// West worker i on core i, east worker i on core `workers + i` (two threads per pair).
    Split,
}

/// Addresses of one gateway.
#[derive(Debug, Clone, Copy)]
pub struct GatewaySides {
    /// Red side.
    pub red: Side,
    /// Black side.
    pub black: Side,
}

/// One gateway's shared parts.
pub struct GatewayHalf {
    /// Shared state (SA database handle, queues, stop flag).
    pub shared: GatewayShared,
    /// Its workers.
    pub workers: Vec<Worker>,
    /// Published counters, one per worker.
    pub cells: Vec<Arc<StatsCell>>,
}

/// Black-side queues for [`Pair::with_black`]: (west's, east's), one per worker.
pub type BlackQueues = (Vec<Box<dyn PortQueue>>, Vec<Box<dyn PortQueue>>);

/// The pair.
pub struct Pair {
    /// West (encrypts).
    pub west: GatewayHalf,
    /// East (decrypts).
    pub east: GatewayHalf,
    /// The black link.
    pub link: MemoryLink,
    /// What sunset sent.
    pub sent: Arc<TrafficCounters>,
    /// What sunrise received intact.
    pub received: Arc<TrafficCounters>,
    /// The buffer pool.
    pub pool: Arc<Pool>,
    limit: Option<u64>,
}

pub(crate) fn host(side: &Side, n: u32) -> Ipv4Addr {
    match side.prefix.addr() {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + n),
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

/// The shared part of one gateway of the in-process lab: its sides, its SA database, the
/// given neighbor entries, one handoff queue per worker (tests, benches and fuzzing).
pub fn shared(
    sides: GatewaySides,
    db: SaDb,
    workers: usize,
    neigh: &[(Ipv4Addr, MacAddr)],
    stop: Arc<AtomicBool>,
) -> GatewayShared {
    GatewayShared {
        red: sides.red,
        black: sides.black,
        sadb: SaDbHandle::new(db),
        neighbors: NeighborTable::new(neigh),
        neighbors6: NeighborTable::new(&[]),
        handoff: Arc::new((0..workers).map(|_| ArrayQueue::new(1024)).collect()),
        control: Arc::new(ArrayQueue::new(64)),
        punt: false,
        from_daemon: Arc::new(ArrayQueue::new(64)),
        events: Arc::new(EventQueue::new(1024)),
        acquires: Arc::new(espada_sadb::db::AcquireQueue::new(64)),
        stop,
        icmp_rate: 100,
        idle_sleep_us: 0,
        clear: Default::default(),
    }
}

impl Pair {
    /// Builds the pair. `west_db` and `east_db` must be mirror images (see `espada check`).
    pub fn new(
        west_db: SaDb,
        east_db: SaDb,
        west: GatewaySides,
        east: GatewaySides,
        spec: PairSpec,
    ) -> Result<Pair, espada_sadb::db::DbError> {
        Self::with_black(west_db, east_db, west, east, spec, None)
    }

    /// Like [`Pair::new`], with the black link given as one queue per worker on each side (a
    /// DPDK ring pair, say) instead of the built-in memory link.
    pub fn with_black(
        west_db: SaDb,
        east_db: SaDb,
        west: GatewaySides,
        east: GatewaySides,
        spec: PairSpec,
        black: Option<BlackQueues>,
    ) -> Result<Pair, espada_sadb::db::DbError> {
        let n = spec.workers.max(1);
        let (mut west_black, mut east_black) = match black {
            Some((w, e)) => (
                w.into_iter().map(Some).collect::<Vec<_>>(),
                e.into_iter().map(Some).collect::<Vec<_>>(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        // Small on purpose: buffers cycle through the shared ring FIFO, so a pool much larger
        // than the caches keeps every packet cold (measured: ~2x slower). A generator that finds
        // the pool empty just waits (back-pressure), it does not drop.
        let pool = Pool::new(n * 384 + 256, spec.size.max(1518) + 512);
        // One pool per queue pair (west worker i and east worker i): in the shared layout both
        // run on core i, so their buffers never leave that core's caches.
        let pools: Vec<Arc<Pool>> = if n > 1 {
            (0..n)
                .map(|_| Pool::new(384 + 256, spec.size.max(1518) + 512))
                .collect()
        } else {
            vec![pool.clone()]
        };
        let link = MemoryLink::new(n, spec.ring_depth);
        let stop = Arc::new(AtomicBool::new(false));
        let sunset = host(&west.red, 10);
        let sunrise = host(&east.red, 10);
        // Each gateway admits only frames to its own MAC: with given black queues (DPDK,
        // AF_XDP), the peers' neighbor entries are those queues' real addresses.
        let qmac = |v: &[Option<Box<dyn PortQueue>>], dflt| {
            v.first().and_then(|q| q.as_ref()).map_or(dflt, |q| q.mac())
        };
        let west_black_mac = qmac(&west_black, mac::WEST_BLACK);
        let east_black_mac = qmac(&east_black, mac::EAST_BLACK);
        let w_sh = shared(
            west,
            west_db,
            n,
            &[(sunset, mac::SUNSET), (east.black.ip, east_black_mac)],
            stop.clone(),
        );
        let e_sh = shared(
            east,
            east_db,
            n,
            &[(sunrise, mac::SUNRISE), (west.black.ip, west_black_mac)],
            stop,
        );
        let sent = Arc::new(TrafficCounters::default());
        let received = Arc::new(TrafficCounters::default());
        let tspec = TrafficSpec {
            src: sunset,
            dst: sunrise,
            src_mac: mac::SUNSET,
            size: spec.size,
            flows: spec.flows,
            limit: spec.limit,
            rate: spec.rate,
            imix: spec.imix,
            tunnels: spec.tunnels,
            tunnel_last: spec.tunnel_last,
        };
        let mut ww = Vec::new();
        let mut ew = Vec::new();
        for (q, qpool) in pools.iter().enumerate() {
            let gen: Box<dyn PortQueue> =
                Box::new(Generator::new(tspec, mac::WEST_RED, q as u16, sent.clone()));
            let wb: Box<dyn PortQueue> = match west_black.get_mut(q).and_then(Option::take) {
                Some(x) => x,
                None => Box::new(link.end_a(q, mac::WEST_BLACK, spec.steering)),
            };
            ww.push(Worker::new(
                q,
                w_sh.clone(),
                gen,
                wb,
                PoolCache::new(qpool.clone()),
            )?);
            let mut sink = Sink::new(mac::SUNRISE, sunrise, q as u16, received.clone());
            if spec.tunnels > 0 {
                sink = sink.accepting_prefix(TUNNEL_DST_BASE.into(), 9);
            }
            let sink: Box<dyn PortQueue> = Box::new(sink);
            let eb: Box<dyn PortQueue> = match east_black.get_mut(q).and_then(Option::take) {
                Some(x) => x,
                None => Box::new(link.end_b(q, mac::EAST_BLACK, Steering::Rss)),
            };
            ew.push(Worker::new(
                q,
                e_sh.clone(),
                sink,
                eb,
                PoolCache::new(qpool.clone()),
            )?);
        }
        let wc = ww.iter().map(|w| w.stats_cell()).collect();
        let ec = ew.iter().map(|w| w.stats_cell()).collect();
        Ok(Pair {
            west: GatewayHalf {
                shared: w_sh,
                workers: ww,
                cells: wc,
            },
            east: GatewayHalf {
                shared: e_sh,
                workers: ew,
                cells: ec,
            },
            link,
            sent,
            received,
            pool,
            limit: spec.limit.map(|l| l * n as u64),
        })
    }

    /// One poll of every worker, west first (deterministic, single thread).
    pub fn step(&mut self) -> usize {
        let mut n = 0;
        for w in self.west.workers.iter_mut() {
            n += w.poll();
        }
        for w in self.east.workers.iter_mut() {
            n += w.poll();
        }
        n
    }

    /// Polls until nothing moves any more (bounded). Unlimited generators are stopped first;
    /// limited ones run to their limit.
    pub fn drain(&mut self) {
        if self.limit.is_none() {
            self.sent.stop();
        }
        let mut idle = 0;
        for _ in 0..100_000 {
            if self.step() == 0 {
                idle += 1;
                if idle > 3 {
                    return;
                }
            } else {
                idle = 0;
            }
        }
    }

    /// Runs one thread per core (pinned to `cores[i]` when given), each polling west worker i
    /// and east worker i, until `duration` has passed or the generators are exhausted and the
    /// link is empty. Returns the elapsed time.
    pub fn run(&mut self, duration: Duration, cores: &[Option<core_affinity::CoreId>]) -> Duration {
        self.run_with(duration, cores, Layout::Shared, |_| {})
    }

    /// Like [`Pair::run`] with a thread layout, calling `tick(elapsed)` every 100 ms (progress).
    pub fn run_with(
        &mut self,
        duration: Duration,
        cores: &[Option<core_affinity::CoreId>],
        layout: Layout,
        mut tick: impl FnMut(Duration),
    ) -> Duration {
        if layout == Layout::Split {
            return self.run_split(duration, cores, tick);
        }
        let stop = self.west.shared.stop.clone();
        stop.store(false, Ordering::Relaxed);
        let start = Instant::now();
        let west = std::mem::take(&mut self.west.workers);
        let east = std::mem::take(&mut self.east.workers);
        let limit = self.limit_total();
        let sent = self.sent.clone();
        let received = self.received.clone();
        let handles: Vec<_> = west
            .into_iter()
            .zip(east)
            .enumerate()
            .map(|(i, (mut w, mut e))| {
                let stop = stop.clone();
                let pin = cores.get(i).copied().flatten();
                std::thread::Builder::new()
                    .name(format!("espada-w{i}"))
                    .spawn(move || {
                        if let Some(id) = pin {
                            core_affinity::set_for_current(id);
                        }
                        w.thread_start();
                        e.thread_start();
                        while !stop.load(Ordering::Relaxed) {
                            let n = w.poll() + e.poll();
                            if n == 0 {
                                std::hint::spin_loop();
                            }
                        }
                        for _ in 0..64 {
                            w.poll();
                            e.poll();
                        }
                        w.finish();
                        e.finish();
                        (w, e)
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        let mut last_tick = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let done = limit
                .is_some_and(|l| sent.packets() >= l && received.packets() + received.bad() >= l);
            if start.elapsed() >= duration || done || interrupted() {
                break;
            }
            if last_tick.elapsed() >= Duration::from_millis(100) {
                last_tick = Instant::now();
                tick(start.elapsed());
            }
        }
        let elapsed = start.elapsed();
        // Stop the sources first, let the pipes empty, then stop the workers.
        self.sent.stop();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            let (w, e) = h.join().expect("worker thread panicked");
            self.west.workers.push(w);
            self.east.workers.push(e);
        }
        elapsed
    }

    fn run_split(
        &mut self,
        duration: Duration,
        cores: &[Option<core_affinity::CoreId>],
        mut tick: impl FnMut(Duration),
    ) -> Duration {
        let stop = self.west.shared.stop.clone();
        stop.store(false, Ordering::Relaxed);
        let n = self.west.workers.len();
        let start = Instant::now();
        let spawn = |mut w: Worker,
                     pin: Option<core_affinity::CoreId>,
                     stop: Arc<AtomicBool>,
                     name: String| {
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    if let Some(id) = pin {
                        core_affinity::set_for_current(id);
                    }
                    w.thread_start();
                    while !stop.load(Ordering::Relaxed) {
                        if w.poll() == 0 {
                            std::hint::spin_loop();
                        }
                    }
                    for _ in 0..64 {
                        w.poll();
                    }
                    w.finish();
                    w
                })
                .expect("spawn worker thread")
        };
        let wh: Vec<_> = std::mem::take(&mut self.west.workers)
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                spawn(
                    w,
                    cores.get(i).copied().flatten(),
                    stop.clone(),
                    format!("west-w{i}"),
                )
            })
            .collect();
        let eh: Vec<_> = std::mem::take(&mut self.east.workers)
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                spawn(
                    w,
                    cores.get(n + i).copied().flatten(),
                    stop.clone(),
                    format!("east-w{i}"),
                )
            })
            .collect();
        let mut last_tick = Instant::now();
        while start.elapsed() < duration && !interrupted() {
            std::thread::sleep(Duration::from_millis(5));
            if last_tick.elapsed() >= Duration::from_millis(100) {
                last_tick = Instant::now();
                tick(start.elapsed());
            }
        }
        let elapsed = start.elapsed();
        self.sent.stop();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        self.west.workers = wh
            .into_iter()
            .map(|h| h.join().expect("west worker panicked"))
            .collect();
        self.east.workers = eh
            .into_iter()
            .map(|h| h.join().expect("east worker panicked"))
            .collect();
        elapsed
    }

    fn limit_total(&self) -> Option<u64> {
        self.limit
    }
}

/// Which gateway of the in-process lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabGateway {
    /// West (sunset behind its red side).
    West,
    /// East (sunrise behind its red side).
    East,
}

/// One lab gateway as a single worker whose red and black ports are the `b` ends of `red` and
/// the `a` (west) or `b` (east) end of `black`, so a test or a fuzz target can put frames on
/// either side by hand; `sides` as from [`lab::sides`] (a test may shrink an MTU).
pub fn lab_worker(
    gw: LabGateway,
    db: SaDb,
    (ws, es): (GatewaySides, GatewaySides),
    red: &MemoryLink,
    black: &MemoryLink,
    pool: &Arc<Pool>,
) -> Result<Worker, espada_sadb::db::DbError> {
    let (red_mac, black_mac) = match gw {
        LabGateway::West => (mac::WEST_RED, mac::WEST_BLACK),
        LabGateway::East => (mac::EAST_RED, mac::EAST_BLACK),
    };
    let black_q = match gw {
        LabGateway::West => black.end_a(0, black_mac, Steering::Rss),
        LabGateway::East => black.end_b(0, black_mac, Steering::Rss),
    };
    lab_worker_on(
        gw,
        db,
        (ws, es),
        Box::new(red.end_b(0, red_mac, Steering::Rss)),
        Box::new(black_q),
        pool,
    )
}

/// [`lab_worker`] on any two port queues (red, black): the AF_XDP and DPDK tests put a lab
/// gateway on real sockets this way. Neighbors: the host behind red and the other gateway,
/// at the lab MACs.
pub fn lab_worker_on(
    gw: LabGateway,
    db: SaDb,
    (ws, es): (GatewaySides, GatewaySides),
    red: Box<dyn PortQueue>,
    black: Box<dyn PortQueue>,
    pool: &Arc<Pool>,
) -> Result<Worker, espada_sadb::db::DbError> {
    let (me, peer, host_mac, peer_mac) = match gw {
        LabGateway::West => (ws, es, mac::SUNSET, mac::EAST_BLACK),
        LabGateway::East => (es, ws, mac::SUNRISE, mac::WEST_BLACK),
    };
    let host_ip = host(&me.red, 10);
    let sh = shared(
        me,
        db,
        1,
        &[(host_ip, host_mac), (peer.black.ip, peer_mac)],
        Arc::new(AtomicBool::new(false)),
    );
    Worker::new(0, sh, red, black, PoolCache::new(pool.clone()))
}

/// Mirrored SA databases and addresses for the in-process lab without a configuration file
/// (tests and benchmarks; `espada demo` builds them from `configs/west.toml` and `east.toml`).
pub mod lab {
    use super::*;
    use espada_crypto::{Algorithm, Backend, KeyMaterial};
    use espada_sadb::db::{PerCpuSaGroup, SaMode, SaSpec, TunnelSas};
    use espada_sadb::lifetime::Lifetimes;
    use espada_sadb::selector::{Action, Policy, PortRange, Prefix, Selector, Spd};
    use espada_sadb::TunnelEndpoints;

    /// Red 10.1.0.0/24 (west), 10.2.0.0/24 (east); black 192.168.100.0/24.
    pub fn sides() -> (GatewaySides, GatewaySides) {
        let side = |ip: &str, p: &str, gw: Option<&str>| Side {
            ip: ip.parse().unwrap(),
            prefix: p.parse().unwrap(),
            mtu: 9000,
            gateway: gw.map(|g| g.parse().unwrap()),
            v6: None,
        };
        (
            GatewaySides {
                red: side("10.1.0.1", "10.1.0.0/24", None),
                black: side("192.168.100.1", "192.168.100.0/24", Some("192.168.100.2")),
            },
            GatewaySides {
                red: side("10.2.0.1", "10.2.0.0/24", None),
                black: side("192.168.100.2", "192.168.100.0/24", Some("192.168.100.1")),
            },
        )
    }

    fn key(spi: u32, alg: Algorithm) -> KeyMaterial {
        let mut b: Vec<u8> = (0..alg.key_material_len() as u32)
            .map(|i| (spi.wrapping_mul(31).wrapping_add(i * 7)) as u8)
            .collect();
        if spi >= 0x10_0000 {
            // The N-tunnel lab's SPIs: the whole SPI in the key (the low byte alone would
            // repeat keys across tunnels). The lab's own SPIs keep their keys.
            b[..4].copy_from_slice(&spi.to_be_bytes());
        }
        KeyMaterial::new(alg, &b).unwrap()
    }

    /// SA `spi` from `src` to `dst`, bound to `cpu`, sent from UDP port `port`.
    pub fn spec(
        spi: u32,
        cpu: Option<usize>,
        src: &str,
        dst: &str,
        port: u16,
        life: Lifetimes,
    ) -> SaSpec {
        spec_alg(spi, cpu, src, dst, port, life, Algorithm::AesGcm128, 4096)
    }

    #[allow(clippy::too_many_arguments)]
    fn spec_alg(
        spi: u32,
        cpu: Option<usize>,
        src: &str,
        dst: &str,
        port: u16,
        life: Lifetimes,
        alg: Algorithm,
        window: u32,
    ) -> SaSpec {
        let mut ep = TunnelEndpoints::new(src.parse().unwrap(), dst.parse().unwrap());
        ep.src_port = port;
        SaSpec::new(spi, key(spi, alg), true, window, life, ep, cpu)
    }

    fn group(
        base: u32,
        pcpu: usize,
        src: &str,
        dst: &str,
        life: Lifetimes,
        alg: Algorithm,
        window: u32,
    ) -> PerCpuSaGroup {
        PerCpuSaGroup {
            fallback: spec_alg(base, None, src, dst, 4500, life, alg, window),
            per_cpu: (0..pcpu)
                .map(|i| {
                    spec_alg(
                        base + 1 + i as u32,
                        Some(i),
                        src,
                        dst,
                        4501 + i as u16,
                        life,
                        alg,
                        window,
                    )
                })
                .collect(),
        }
    }

    /// Variations for benchmarks.
    #[derive(Debug, Clone, Copy)]
    pub struct LabOpts {
        /// Crypto backend.
        pub backend: Backend,
        /// Cipher.
        pub alg: Algorithm,
        /// Plain forwarding: bypass policies both ways, no ESP (the "loopback" baseline).
        pub bypass: bool,
        /// Inbound replay window (0: anti-replay off, as DPDK ipsec-secgw's default).
        pub replay_window: u32,
        /// Tunnels (0: the lab's one, 10.1.0.0/24 ↔ 10.2.0.0/24). With N ≥ 1: tunnel k
        /// joins 10.64.k.0/24 (as 10.64.0.0 + k·256) and 10.128.k.0/24, its policy k-th in
        /// the SPD; east's red side routes them to sunrise ([`sides_for`]).
        pub tunnels: u32,
    }

    impl Default for LabOpts {
        fn default() -> Self {
            LabOpts {
                backend: Backend::Ring,
                alg: Algorithm::AesGcm128,
                bypass: false,
                replay_window: 4096,
                tunnels: 0,
            }
        }
    }

    /// (west, east) databases: `pcpu` per-CPU SAs each way (west out 0x1000.., east out 0x2000..).
    pub fn dbs(workers: usize, pcpu: usize, mode: SaMode, life: Lifetimes) -> (SaDb, SaDb) {
        dbs_opts(workers, pcpu, mode, life, LabOpts::default())
    }

    /// Like [`dbs`] with a backend, a cipher, or plain forwarding.
    pub fn dbs_opts(
        workers: usize,
        pcpu: usize,
        mode: SaMode,
        life: Lifetimes,
        o: LabOpts,
    ) -> (SaDb, SaDb) {
        // (west subnet, east subnet, west's outbound SPI base, east's) of each tunnel.
        let n = o.tunnels.min(crate::traffic::MAX_TUNNELS);
        let tunnels: Vec<(Prefix, Prefix, u32, u32)> = if n == 0 {
            vec![(
                "10.1.0.0/24".parse().unwrap(),
                "10.2.0.0/24".parse().unwrap(),
                0x1000,
                0x2000,
            )]
        } else {
            use crate::traffic::{TUNNEL_DST_BASE, TUNNEL_SRC_BASE};
            let net = |base: u32, k: u32| {
                Prefix::new(std::net::Ipv4Addr::from(base + (k << 8)).into(), 24).unwrap()
            };
            (0..n)
                .map(|k| {
                    (
                        net(TUNNEL_SRC_BASE, k),
                        net(TUNNEL_DST_BASE, k),
                        0x10_0000 + k * 64,
                        0x80_0000 + k * 64,
                    )
                })
                .collect()
        };
        let pc = if mode == SaMode::Shared { 0 } else { pcpu };
        let mk = |west: bool, me: &str, peer: &str| {
            let mut ts = Vec::with_capacity(tunnels.len());
            let mut spd = Spd::default();
            for (i, &(w, e, wspi, espi)) in tunnels.iter().enumerate() {
                let (l, r, out, inb) = if west {
                    (w, e, wspi, espi)
                } else {
                    (e, w, espi, wspi)
                };
                let name = if n == 0 {
                    "lab".to_string()
                } else {
                    format!("t{i}")
                };
                ts.push(TunnelSas {
                    name: name.clone(),
                    local_subnets: vec![l],
                    remote_subnets: vec![r],
                    outbound: group(out, pc, me, peer, life, o.alg, o.replay_window),
                    inbound: group(inb, pc, peer, me, life, o.alg, o.replay_window),
                    draining: vec![],
                    pcpu_acquires: true,
                    rekey_every: None,
                });
                spd.policies.push(Policy {
                    name,
                    selector: Selector {
                        src: l,
                        dst: r,
                        proto: None,
                        src_ports: PortRange::ANY,
                        dst_ports: PortRange::ANY,
                    },
                    action: if o.bypass {
                        Action::Bypass
                    } else {
                        Action::Protect(i)
                    },
                });
            }
            SaDb::new(mode, workers, o.backend, ts, spd).unwrap()
        };
        (
            mk(true, "192.168.100.1", "192.168.100.2"),
            mk(false, "192.168.100.2", "192.168.100.1"),
        )
    }

    /// [`sides`] for `tunnels` tunnels (0: the lab's one): otherwise east's red side routes the
    /// tunnels' subnets (10.128.0.0/9) through sunrise, which takes them all.
    pub fn sides_for(tunnels: u32) -> (GatewaySides, GatewaySides) {
        let (w, mut e) = sides();
        if tunnels > 0 {
            e.red.gateway = Some("10.2.0.10".parse().unwrap());
        }
        (w, e)
    }
}

#[cfg(test)]
mod tests;
