//! The gateway comes up: signals, the shared state, the IKE punt thread, the ports, one worker
//! per queue pair (built on its own pinned thread), the supervisor, and the control socket and
//! metrics served.

use super::open::Opened;
use super::{refuse, RunArgs};
use anyhow::{bail, Context, Result};
use crossbeam_queue::ArrayQueue;
use espada_control::monitor::Monitor;
use espada_control::server::{ControlServer, Gateway};
use espada_control::supervisor::{count, Command, Supervisor};
use espada_dataplane::gateway::{DpdkPorts, PortKind, Ports, PortsSpec};
use espada_dataplane::launch::WorkerThread;
use espada_dataplane::neighbor::NeighborTable;
use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::punt::PuntCounters;
use espada_dataplane::state::seqstore::InterfaceLock;
use espada_dataplane::worker::{GatewayShared, StatsCell, Worker};
use espada_sadb::db::EventQueue;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// A running gateway: what the control loop works with and what the totals read at the end.
pub(super) struct Running {
    pub c: crate::config::Config,
    pub n: usize,
    pub cores: Vec<usize>,
    pub shared: GatewayShared,
    pub pool: Arc<Pool>,
    pub workers: Vec<WorkerThread>,
    pub cells: Vec<Arc<StatsCell>>,
    /// The IKE punt thread (`--ike-tun`) and its counters.
    pub punt: Option<(JoinHandle<()>, Arc<PuntCounters>)>,
    /// DPDK ports (and their flow rules): they go away only after the workers stopped.
    #[cfg(feature = "dpdk")]
    pub dpdk: Vec<espada_dataplane::port::dpdk::DpdkPort>,
    pub stop: Arc<AtomicBool>,
    pub reload: Arc<AtomicBool>,
    /// Everything that changes the running gateway's SAs (lab_rekey generations, reloads,
    /// the control socket's `sa` commands) goes through it, owned by the control loop.
    pub sup: Supervisor,
    pub commands: Receiver<Command>,
    pub monitor: Arc<Monitor>,
    pub started: Instant,
    /// IKE messages counted and dropped (no daemon attached).
    pub ike_dropped: u64,
    _servers: (
        Option<espada_control::metrics::MetricsServer>,
        Option<ControlServer>,
    ),
    _locks: Vec<InterfaceLock>,
}

impl Running {
    pub fn start(a: &RunArgs, o: Opened) -> Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        // SIGHUP (or `espada reload`) re-reads the configuration; see the control loop.
        let reload = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
            .context("installing signal handlers")?;
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
        }
        let shared = shared_state(a, &o, stop.clone());
        let mtu = o.sides.red.mtu.max(o.sides.black.mtu) as usize;
        let pool = Pool::new(o.n * 8192, mtu + 14 + 256);
        let punt = start_punt(a, &o.black_if, &shared, &pool, &stop)?;
        let ports = open_ports(a, &o)?;
        for note in &ports.notes {
            tracing::info!("{note}");
        }
        let (workers, ports) = spawn_workers(a, &o, ports, &shared, &pool, &stop)?;
        let cells: Vec<Arc<StatsCell>> = workers.iter().map(|t| t.cell.clone()).collect();
        // Building the workers' SA state (on their threads) went through transient maps of
        // every SA: that memory goes back to the kernel now, not at the first reload.
        espada_dataplane::heap::give_back();
        let worker_cores = &o.cores[..o.n.min(o.cores.len())];
        tracing::info!(
            "gateway \"{}\" red {} ({}) black {} ({}), {} on cores {}, sa_mode {}, crypto {}",
            o.c.name,
            o.red_if,
            o.sides.red.ip,
            o.black_if,
            o.sides.black.ip,
            count(o.n, "worker", "workers"),
            espada_pinning::format_cpu_list(worker_cores),
            o.c.sa_mode.name(),
            o.c.backend_report()
        );
        let (cmd_tx, commands) = std::sync::mpsc::channel::<Command>();
        let sup = Supervisor::new(
            o.c.clone(),
            a.config.clone(),
            o.n,
            shared.clone(),
            o.seq_store,
            o.now0,
        );
        let monitor = Arc::new(Monitor::default());
        let started = Instant::now();
        let gw = Arc::new(Gateway {
            monitor: monitor.clone(),
            name: o.c.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started,
            cores: (0..o.n)
                .map(|i| (!a.no_pin).then(|| o.cores[i % o.cores.len()]))
                .collect(),
            cells: cells.clone(),
            shared: shared.clone(),
            reload: reload.clone(),
            commands: Some(cmd_tx),
        });
        let mut running = Running {
            c: o.c,
            n: o.n,
            cores: o.cores,
            shared,
            pool,
            workers,
            cells,
            punt,
            #[cfg(feature = "dpdk")]
            dpdk: ports.dpdk,
            stop,
            reload,
            sup,
            commands,
            monitor,
            started,
            ike_dropped: 0,
            _servers: (None, None),
            _locks: o.locks,
        };
        #[cfg(not(feature = "dpdk"))]
        let _ = ports;
        match serve(o.control, o.metrics, &gw) {
            Ok(s) => running._servers = s,
            Err(e) => {
                running.halt();
                return Err(e);
            }
        }
        Ok(running)
    }

    /// Stops the workers (and the punt thread) and waits for them: a start that fails after
    /// they run.
    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        if let Some((t, _)) = self.punt.take() {
            let _ = t.join();
        }
    }
}

/// What every worker, the punt thread and the control loop share.
fn shared_state(a: &RunArgs, o: &Opened, stop: Arc<AtomicBool>) -> GatewayShared {
    let neigh: Vec<_> =
        o.c.neighbors
            .iter()
            .filter_map(|(ip, m)| match ip {
                IpAddr::V4(v) => Some((*v, *m)),
                IpAddr::V6(_) => None,
            })
            .collect();
    let neigh6: Vec<_> =
        o.c.neighbors
            .iter()
            .filter_map(|(ip, m)| match ip {
                IpAddr::V6(v) => Some((*v, *m)),
                IpAddr::V4(_) => None,
            })
            .collect();
    GatewayShared {
        red: o.sides.red,
        black: o.sides.black,
        sadb: o.sadb.clone(),
        neighbors: NeighborTable::new(&neigh),
        neighbors6: NeighborTable::new(&neigh6),
        handoff: Arc::new((0..o.n).map(|_| ArrayQueue::new(4096)).collect()),
        control: Arc::new(ArrayQueue::new(256)),
        punt: a.ike_tun.is_some(),
        from_daemon: Arc::new(ArrayQueue::new(256)),
        events: Arc::new(EventQueue::new(1024)),
        acquires: Arc::new(espada_sadb::db::AcquireQueue::new(256)),
        stop,
        icmp_rate: 100,
        idle_sleep_us: a.idle_sleep_us,
        clear: Default::default(),
    }
}

/// IKE to the daemon (`--ike-tun`): the TUN is up before any worker punts to it.
fn start_punt(
    a: &RunArgs,
    black_if: &str,
    shared: &GatewayShared,
    pool: &Arc<Pool>,
    stop: &Arc<AtomicBool>,
) -> Result<Option<(JoinHandle<()>, Arc<PuntCounters>)>> {
    let Some(name) = &a.ike_tun else {
        return Ok(None);
    };
    let tun = espada_dataplane::punt::IkeTun::open(name)
        .with_context(|| format!("--ike-tun {name}: creating the TUN interface"))?;
    // The kernel sees black's frames only on AF_PACKET (AF_XDP and DPDK take them).
    let kernel_sees = (a.port == "af-packet").then_some(black_if);
    tun.configure(&shared.black, kernel_sees)
        .map_err(|e| anyhow::anyhow!("--ike-tun {name}: {e}"))?;
    tracing::info!(
        "IKE goes to the daemon through TUN {name} (it carries {}; the daemon binds UDP 500/4500 there)",
        shared.black.ip
    );
    let counters = Arc::new(PuntCounters::default());
    let (sh, pl, st, pc) = (shared.clone(), pool.clone(), stop.clone(), counters.clone());
    let t = std::thread::Builder::new()
        .name("espada-punt".into())
        .spawn(move || espada_dataplane::punt::run(&tun, &sh, &pl, &st, &pc))
        .context("starting the IKE punt thread")?;
    Ok(Some((t, counters)))
}

/// The ports of `--port`, one queue per worker and side.
fn open_ports(a: &RunArgs, o: &Opened) -> Result<Ports> {
    let kind = match a.port.as_str() {
        "af-packet" => PortKind::AfPacket,
        "af-xdp" => PortKind::AfXdp,
        "dpdk" => PortKind::Dpdk,
        p => bail!("--port must be af-packet, af-xdp or dpdk, got {p}"),
    };
    let dpdk = o.c.dpdk.as_ref().map(|d| {
        // One rte_flow rule per per-CPU SA of the peer: its UDP source port -> the owning queue.
        let t = &o.c.tunnels[0];
        DpdkPorts {
            red_port: d.red_port.clone(),
            black_port: d.black_port.clone(),
            eal: d.eal.clone(),
            steer: (0..t.peer_pcpu)
                .map(|i| (t.in_port_of(Some(i)), (i % o.n) as u16))
                .collect(),
        }
    });
    if kind == PortKind::Dpdk && dpdk.is_none() {
        bail!(
            "{}: --port dpdk needs a [dpdk] section (red_port, black_port, eal)",
            o.c.file.display()
        );
    }
    espada_dataplane::gateway::open(&PortsSpec {
        kind,
        red: &o.red_if,
        black: &o.black_if,
        workers: o.n,
        cores: &o.cores,
        online: &o.online,
        pcap_black: a.pcap_black.as_deref(),
        dpdk: dpdk.as_ref(),
    })
    .map_err(|e| anyhow::anyhow!(e))
}

/// One worker per queue pair, each built on its own thread once that thread is placed on its
/// core: its SA state, lists and counters are first touched by the core that uses them. The
/// ports' queues move into the workers; what is left of `ports` (DPDK's) comes back.
fn spawn_workers(
    a: &RunArgs,
    o: &Opened,
    mut ports: Ports,
    shared: &GatewayShared,
    pool: &Arc<Pool>,
    stop: &Arc<AtomicBool>,
) -> Result<(Vec<WorkerThread>, Ports)> {
    let queues: Vec<_> = std::mem::take(&mut ports.red)
        .into_iter()
        .zip(std::mem::take(&mut ports.black))
        .collect();
    let mut handles = Vec::with_capacity(o.n);
    for (i, (red, black)) in queues.into_iter().enumerate() {
        let pin = if a.no_pin {
            None
        } else {
            let core = o.cores[i % o.cores.len()];
            o.ids.iter().find(|id| id.id == core).copied()
        };
        let online = o.online.clone();
        let (sh, pl) = (shared.clone(), pool.clone());
        let started = espada_dataplane::launch::spawn_worker(
            format!("espada-w{i}"),
            move || match pin {
                Some(id) => {
                    core_affinity::set_for_current(id);
                }
                // Unpinned: free to run on every CPU, not on the one the main thread was
                // bound to (EAL binds it to its main lcore).
                None => {
                    let _ = espada_dataplane::affinity::run_on_any(&online);
                }
            },
            move || Worker::new(i, sh, red, black, PoolCache::new(pl)),
            |w| w.run(),
        );
        match started {
            Ok(t) => handles.push(t),
            Err(e) => {
                // The workers already running stop before the error is reported.
                stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = h.join();
                }
                return Err(anyhow::anyhow!("worker {i}: {e}"));
            }
        }
    }
    Ok((handles, ports))
}

/// The metrics listener and the control socket, serving the running gateway.
fn serve(
    control: Option<espada_control::server::BoundControl>,
    metrics: Option<espada_control::metrics::BoundMetrics>,
    gw: &Arc<Gateway>,
) -> Result<(
    Option<espada_control::metrics::MetricsServer>,
    Option<ControlServer>,
)> {
    let metrics = metrics
        .map(|m| m.serve(gw.clone()))
        .transpose()
        .map_err(|e| refuse(format!("metrics: {e}")))?;
    if let Some(m) = &metrics {
        tracing::info!("metrics on http://{}/metrics", m.addr());
    }
    let control = control
        .map(|c| c.serve(gw.clone()))
        .transpose()
        .map_err(|e| refuse(format!("control socket: {e}")))?;
    if let Some(s) = &control {
        tracing::info!(
            "control socket {} (espada show sa --socket {})",
            s.path().display(),
            s.path().display()
        );
    }
    Ok((metrics, control))
}
