//! `espada run -c FILE`: a gateway on real interfaces (AF_PACKET), one pinned worker per core,
//! a live per-core table once a second, JSON lines on request, totals on exit (SIGINT/SIGTERM).

use crate::cli::demo::sides;
use crate::config;
use anyhow::{bail, Context, Result};
use clap::Args;
use crossbeam_queue::ArrayQueue;
use espada_benches::report::{core_report, CoreReport};
use espada_dataplane::gateway::{DpdkPorts, PortKind, PortsSpec};
use espada_dataplane::neighbor::NeighborTable;
use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::worker::{GatewayShared, StatsCell, Worker, WorkerStats};
use espada_sadb::db::{EventQueue, SaDbHandle};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RunArgs {
    /// Gateway configuration.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Worker count (default: from the configuration, else every online core).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds between live table updates (0 = no live table).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Append one JSON line of per-core counters per interval to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Record the black side's frames (both directions, all queues) to FILE-q<N>.pcap.
    #[arg(long)]
    pcap_black: Option<PathBuf>,
    /// How to reach the NICs: `af-packet` (kernel driver stays in charge), `af-xdp` (XSK
    /// sockets, one per queue; needs `--features af-xdp`) or `dpdk` (poll-mode driver; ports and
    /// EAL arguments from the `[dpdk]` section; needs `--features dpdk`).
    #[arg(long, default_value = "af-packet", value_parser = ["af-packet", "af-xdp", "dpdk"])]
    port: String,
    /// When a worker finds nothing for 256 polls in a row, sleep this many microseconds (0: pure
    /// busy polling, for cores dedicated to espada; a few tens of µs keeps a shared host's
    /// kernel, e.g. a veth lab on a 2-core VM, from starving).
    #[arg(long, default_value_t = 0)]
    idle_sleep_us: u32,
    /// Hand IKE to a daemon (strongSwan's charon) through TUN interface NAME, created in
    /// espada's network namespace with the black addresses: the daemon binds UDP 500/4500
    /// there as on a real interface. IKE arriving on black (UDP 500; UDP 4500 with the non-ESP
    /// marker; NAT-T keepalives) is written into it, and the daemon's IKE packets leave on
    /// black. Without it IKE is counted and dropped. Needs CAP_NET_ADMIN and `ip`.
    #[arg(long, value_name = "NAME")]
    ike_tun: Option<String>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// Start even when an interface's queue interrupt or RPS mask sends the kernel's receive
    /// work (softirq) to a worker's core. By default that is refused: under overload the
    /// softirq starves the worker (a receive livelock). `espada pin apply` moves them off.
    #[arg(long)]
    allow_softirq_on_workers: bool,
    /// State directory: durable sequence-number reservations per outbound key
    /// (`espada.seq`, keys named by an HMAC fingerprint), so that a restart with the same
    /// static keys never repeats an AES-GCM nonce, and the lock that keeps a second gateway off
    /// it. The gateway refuses to start when it cannot write here, when the file is damaged,
    /// and, with static keys, when the directory holds no state (see --new-keys). Keep it on
    /// storage that outlives the gateway (the Dockerfile's /var/lib/espada volume).
    #[arg(long, default_value = "/var/lib/espada", value_name = "DIR")]
    state_dir: PathBuf,
    /// The outbound keys of the configuration have never sent a packet: start with an empty
    /// state directory. Without it a gateway with static keys (key files, hex keys,
    /// lab_secret) refuses an empty state directory, because it cannot know which sequence
    /// numbers, hence AES-GCM nonces, its keys already used (a lost volume, a new
    /// --state-dir, a second copy of the gateway). Give it on the very first start only, or
    /// after every outbound key has been replaced.
    #[arg(long)]
    new_keys: bool,
    /// More detail in the log (-v debug, -vv trace); RUST_LOG, when set, decides instead.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors in the log.
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
    /// Log as JSON lines (one object per event, with a timestamp and a level).
    #[arg(long)]
    log_json: bool,
    /// Serve Prometheus metrics over HTTP at ADDR (`GET /metrics`), e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Control socket for `espada show` (default: `[gateway] control_socket`, else
    /// /run/espada/NAME.sock); `none` serves none.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Sequence numbers reserved per SA per state-file write; a restart skips at most this many.
    #[arg(long, default_value_t = espada_dataplane::state::seqstore::DEFAULT_BLOCK, value_name = "N")]
    seq_block: u64,
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    crate::init_logs(a.verbose, a.quiet, a.log_json);
    let c = match config::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let gw = sides(&c)?;
    let n = a.workers.unwrap_or_else(|| c.resolved_workers()).max(1);
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    // Every CPU this process may use, read before DPDK binds the main thread to its lcore.
    let online: Vec<usize> = ids.iter().map(|c| c.id).collect();
    // Worker cores come from the same plan `espada pin` prints (isolated cores first, the NIC's
    // NUMA node, no SMT siblings); if the host cannot be read, cores 0..n.
    let cores: Vec<usize> = match &c.cores {
        Some(v) => v.clone(),
        None => {
            let mut c2 = c.clone();
            c2.workers = n;
            match crate::cli::pin::make_plan(&c2, std::path::Path::new("/"), true) {
                Ok((_, p)) => p.worker_cores,
                Err(e) => {
                    tracing::info!("no pinning plan ({e:#}); workers on cores 0..{}", n - 1);
                    (0..n).map(|i| i % ids.len().max(1)).collect()
                }
            }
        }
    };
    let red_if = c
        .red
        .as_ref()
        .map(|p| p.interface.clone())
        .context("[red] is needed")?;
    let black_if = c
        .black
        .as_ref()
        .map(|p| p.interface.clone())
        .context("[black] is needed")?;
    let neigh: Vec<_> = c
        .neighbors
        .iter()
        .filter_map(|(ip, m)| {
            if let IpAddr::V4(v) = ip {
                Some((*v, *m))
            } else {
                None
            }
        })
        .collect();
    let neigh6: Vec<_> = c
        .neighbors
        .iter()
        .filter_map(|(ip, m)| match ip {
            IpAddr::V6(v) => Some((*v, *m)),
            IpAddr::V4(_) => None,
        })
        .collect();
    for t in &c.tunnels {
        if let Some(w) = &t.key_warning {
            tracing::warn!("{w}");
        }
    }
    if let Some(code) = softirq_placement(&a, &red_if, &black_if, &cores[..n.min(cores.len())]) {
        return Ok(code);
    }
    // Two gateways on one interface would both answer ARP and both forward, and count under
    // the same keys: the lock is the network namespace's (an abstract socket), not a file in
    // a directory a second instance could be pointed elsewhere.
    let mut _iface_locks = Vec::new();
    for i in [&red_if, &black_if] {
        match espada_dataplane::state::seqstore::lock_interface(i) {
            Ok(l) => _iface_locks.push(l),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    // Durable sequence reservations: resume above whatever the previous run could have sent.
    let now0 = config::unix_now();
    let mut db = c.sadb_at(n, Some(now0))?;
    for t in 0..c.tunnels.len() {
        if let Some(g) = c.generation(t, now0) {
            tracing::info!(
                "tunnel \"{}\" rekeys every {} s without IKE (lab_rekey): generation {g} now",
                c.tunnels[t].name,
                c.tunnels[t].lab_rekey.as_ref().map_or(0, |r| r.seconds)
            );
        }
    }
    let mut seq_store =
        match espada_dataplane::state::seqstore::SeqStore::open(&a.state_dir, &c.name, a.seq_block)
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e} (--state-dir)");
                return Ok(ExitCode::from(1));
            }
        };
    if seq_store.is_fresh() && !a.new_keys {
        let static_keys: Vec<&str> = c
            .tunnels
            .iter()
            .filter(|t| !t.ike)
            .map(|t| t.name.as_str())
            .collect();
        if !static_keys.is_empty() {
            eprintln!(
                "error: {} holds no sequence state, and {} {} send with static keys: if these keys ever sent a packet (an earlier run, a lost or new --state-dir, another copy of this gateway), starting at sequence number 1 would repeat AES-GCM nonces. Restore the state directory, or start with --new-keys if every outbound key is new",
                a.state_dir.display(),
                if static_keys.len() == 1 { "tunnel" } else { "tunnels" },
                static_keys.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
            );
            return Ok(ExitCode::from(1));
        }
    }
    seq_store.attach(&mut db);
    if let Err(e) = seq_store.advance() {
        eprintln!("error: cannot reserve sequence numbers durably: {e}; refusing to send with keys whose nonces could repeat after a restart");
        return Ok(ExitCode::from(1));
    }
    let resumed: Vec<String> = db
        .outbound_specs()
        .filter(|s| seq_store.resumes_after(s) > 0)
        .map(|s| format!("{:#010x} after {}", s.spi, seq_store.resumes_after(s)))
        .collect();
    if !resumed.is_empty() {
        tracing::info!(
            "outbound sequence numbers resume above the previous run's reservations ({}): {}",
            seq_store.path().display(),
            resumed.join(", ")
        );
    }
    // The control socket and the metrics listener are bound before any port opens: a second
    // instance meant for the same socket or address stops here, before it touches a NIC.
    let control_path = a
        .control
        .clone()
        .or_else(|| c.control_socket.clone())
        .unwrap_or_else(|| espada_control::default_socket(&c.name));
    let control_bound = if control_path.as_os_str() == "none" {
        None
    } else {
        match espada_control::server::ControlServer::bind(&control_path) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("error: control socket: {e} (--control PATH, or --control none)");
                return Ok(ExitCode::from(1));
            }
        }
    };
    let metrics_bound = match &a.metrics {
        None => None,
        Some(addr) => match espada_control::metrics::MetricsServer::bind(addr) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    // SIGHUP (or `espada reload`) re-reads the configuration; see the run loop.
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .context("installing signal handlers")?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let shared = GatewayShared {
        red: gw.red,
        black: gw.black,
        sadb: SaDbHandle::new(db),
        neighbors: NeighborTable::new(&neigh),
        neighbors6: NeighborTable::new(&neigh6),
        handoff: Arc::new((0..n).map(|_| ArrayQueue::new(4096)).collect()),
        control: Arc::new(ArrayQueue::new(256)),
        punt: a.ike_tun.is_some(),
        from_daemon: Arc::new(ArrayQueue::new(256)),
        events: Arc::new(EventQueue::new(1024)),
        acquires: Arc::new(espada_sadb::db::AcquireQueue::new(256)),
        stop: stop.clone(),
        icmp_rate: 100,
        idle_sleep_us: a.idle_sleep_us,
        clear: Default::default(),
    };
    let mtu = gw.red.mtu.max(gw.black.mtu) as usize;
    let pool = Pool::new(n * 8192, mtu + 14 + 256);
    // IKE to the daemon: the TUN is up before any worker punts to it.
    let punt_counters = Arc::new(espada_dataplane::punt::PuntCounters::default());
    let punt_thread = match &a.ike_tun {
        None => None,
        Some(name) => {
            let tun = espada_dataplane::punt::IkeTun::open(name)
                .with_context(|| format!("--ike-tun {name}: creating the TUN interface"))?;
            // The kernel sees black's frames only on AF_PACKET (AF_XDP and DPDK take them).
            let kernel_sees = (a.port == "af-packet").then_some(black_if.as_str());
            tun.configure(&shared.black, kernel_sees)
                .map_err(|e| anyhow::anyhow!("--ike-tun {name}: {e}"))?;
            tracing::info!(
                "IKE goes to the daemon through TUN {name} (it carries {}; the daemon binds UDP 500/4500 there)",
                shared.black.ip
            );
            let (sh, pl, st, pc) = (
                shared.clone(),
                pool.clone(),
                stop.clone(),
                punt_counters.clone(),
            );
            Some(
                std::thread::Builder::new()
                    .name("espada-punt".into())
                    .spawn(move || espada_dataplane::punt::run(&tun, &sh, &pl, &st, &pc))
                    .context("starting the IKE punt thread")?,
            )
        }
    };
    let kind = match a.port.as_str() {
        "af-packet" => PortKind::AfPacket,
        "af-xdp" => PortKind::AfXdp,
        "dpdk" => PortKind::Dpdk,
        p => bail!("--port must be af-packet, af-xdp or dpdk, got {p}"),
    };
    let dpdk = c.dpdk.as_ref().map(|d| {
        // One rte_flow rule per per-CPU SA of the peer: its UDP source port -> the owning queue.
        let t = &c.tunnels[0];
        DpdkPorts {
            red_port: d.red_port.clone(),
            black_port: d.black_port.clone(),
            eal: d.eal.clone(),
            steer: (0..t.peer_pcpu)
                .map(|i| (t.in_port_of(Some(i)), (i % n) as u16))
                .collect(),
        }
    });
    if kind == PortKind::Dpdk && dpdk.is_none() {
        bail!(
            "{}: --port dpdk needs a [dpdk] section (red_port, black_port, eal)",
            c.file.display()
        );
    }
    let ports = espada_dataplane::gateway::open(&PortsSpec {
        kind,
        red: &red_if,
        black: &black_if,
        workers: n,
        cores: &cores,
        online: &online,
        pcap_black: a.pcap_black.as_deref(),
        dpdk: dpdk.as_ref(),
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    for note in &ports.notes {
        tracing::info!("{note}");
    }
    let espada_dataplane::gateway::Ports {
        red: red_qs,
        black: black_qs,
        #[cfg(feature = "dpdk")]
            dpdk: keep_ports,
        ..
    } = ports;
    // Each worker is built on its own thread, once that thread is placed on its core: its SA
    // state, lists and counters are first touched by the core that uses them.
    let mut handles = Vec::with_capacity(n);
    for (i, (red, black)) in red_qs.into_iter().zip(black_qs).enumerate() {
        let pin = if a.no_pin {
            None
        } else {
            ids.iter()
                .find(|id| id.id == cores[i % cores.len()])
                .copied()
        };
        let online = online.clone();
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
    let cells: Vec<Arc<StatsCell>> = handles.iter().map(|t| t.cell.clone()).collect();
    tracing::info!(
        "gateway \"{}\" red {} ({}) black {} ({}), {} on cores {}, sa_mode {}, crypto {}",
        c.name,
        red_if,
        gw.red.ip,
        black_if,
        gw.black.ip,
        espada_control::supervisor::count(n, "worker", "workers"),
        espada_pinning::format_cpu_list(&cores[..n.min(cores.len())]),
        c.sa_mode.name(),
        c.backend_report()
    );

    let start = Instant::now();
    // Everything that changes the running gateway's SAs goes through the supervisor, owned by
    // this thread: lab_rekey generations, reloads, and the control socket's `sa` commands.
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<espada_control::supervisor::Command>();
    let mut sup = espada_control::supervisor::Supervisor::new(
        c.clone(),
        a.config.clone(),
        n,
        shared.clone(),
        seq_store,
        now0,
    );
    let monitor = Arc::new(espada_control::monitor::Monitor::default());
    let gw = Arc::new(espada_control::server::Gateway {
        monitor: monitor.clone(),
        name: c.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: start,
        cores: (0..n)
            .map(|i| (!a.no_pin).then(|| cores[i % cores.len()]))
            .collect(),
        cells: cells.clone(),
        shared: shared.clone(),
        reload: reload.clone(),
        commands: Some(cmd_tx),
    });
    let _metrics = match metrics_bound.map(|m| m.serve(gw.clone())).transpose() {
        Ok(m) => m,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                let _ = h.join();
            }
            eprintln!("error: metrics: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(m) = &_metrics {
        tracing::info!("metrics on http://{}/metrics", m.addr());
    }
    let _control = match control_bound.map(|c| c.serve(gw.clone())).transpose() {
        Ok(c) => c,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            for h in handles {
                let _ = h.join();
            }
            eprintln!("error: control socket: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(s) = &_control {
        tracing::info!(
            "control socket {} (espada show sa --socket {})",
            s.path().display(),
            s.path().display()
        );
    }
    let mut json = match &a.stats_json {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))?,
        ),
        None => None,
    };
    let mut prev: Vec<WorkerStats> = vec![WorkerStats::default(); n];
    let interval = Duration::from_secs_f64(if a.interval > 0.0 { a.interval } else { 1.0 });
    let mut last = Instant::now();
    let mut ike = 0u64;
    let mut neighbor_watch = espada_control::monitor::NeighborWatch::default();
    let mut softirq_watch = SoftirqWatch::new(cores[..n.min(cores.len())].to_vec());
    let mut trim_at: Option<Instant> = None;
    // systemd (Type=notify): ready once the workers, the control socket and the metrics are
    // up; with WatchdogSec=, fed while every worker keeps polling (a stalled worker starves it
    // and the service manager restarts the gateway).
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!(
                "forwarding: {}, {}",
                espada_control::supervisor::count(n, "worker", "workers"),
                espada_control::supervisor::count(c.tunnels.len(), "tunnel", "tunnels")
            )),
        ],
    );
    let mut watchdog = watchdog_interval().map(|every| Watchdog {
        every,
        last: Instant::now(),
        beats: cells.iter().map(|c| c.heartbeat()).collect(),
        starved: false,
    });
    while !stop.load(Ordering::Relaxed) {
        // Wakes at once for a command (an IKE daemon installing an SA waits on the answer),
        // else every 50 ms for the housekeeping below.
        let first = cmd_rx.recv_timeout(Duration::from_millis(50)).ok();
        if a.duration
            .is_some_and(|d| start.elapsed().as_secs_f64() >= d)
        {
            stop.store(true, Ordering::Relaxed);
        }
        // Without a daemon, IKE is counted and dropped here; with one, the punt thread
        // takes it.
        if !shared.punt {
            while let Some(b) = shared.control.pop() {
                ike += 1;
                drop(b); // the buffer goes back to its pool
            }
        }
        shared.neighbors.expire(Instant::now());
        shared.neighbors6.expire(Instant::now());
        let now_unix = config::unix_now();
        let mut big_change = false;
        // Every event goes to the log and to `espada monitor`'s watchers.
        let say = |kind: &str, loud: bool, text: &str| {
            if loud {
                tracing::warn!("{text}");
            } else {
                tracing::info!("{text}");
            }
            monitor.publish(kind, text);
        };
        // Neighbor entries learned, changed or gone: to the log (debug) and `espada monitor`.
        for line in neighbor_watch.changes(
            (
                shared.neighbors.generation(),
                shared.neighbors6.generation(),
            ),
            || {
                shared
                    .neighbors
                    .entries()
                    .into_iter()
                    .map(|(ip, mac, _)| (ip.to_string(), mac.to_string()))
                    .chain(
                        shared
                            .neighbors6
                            .entries()
                            .into_iter()
                            .map(|(ip, mac, _)| (ip.to_string(), mac.to_string())),
                    )
            },
        ) {
            tracing::debug!("{line}");
            monitor.publish("neighbor", &line);
        }
        if reload.swap(false, Ordering::Relaxed) {
            big_change = true;
            match sup.reload(now_unix) {
                Ok(m) => say("reload", false, &m),
                Err(e) => say(
                    "reload-refused",
                    true,
                    &format!("reload refused, still running the previous configuration: {e}"),
                ),
            }
        }
        for cmd in first
            .into_iter()
            .chain(std::iter::from_fn(|| cmd_rx.try_recv().ok()))
        {
            let what = format!("{} {}", cmd.req.cmd, cmd.req.what);
            let r = sup.execute(&cmd.req, now_unix);
            big_change |=
                matches!(cmd.req.what.as_str(), "batch" | "rekey") || cmd.req.cmd == "reload";
            match (cmd.req.cmd.as_str(), r.ok, &r.error) {
                ("reload", true, _) => say(
                    "reload",
                    false,
                    &format!(
                        "{} (asked on the control socket)",
                        r.data["reload"].as_str().unwrap_or("reloaded")
                    ),
                ),
                ("reload", false, Some(e)) => say(
                    "reload-refused",
                    true,
                    &format!("reload refused, still running the previous configuration: {e}"),
                ),
                // The IKE daemon's plugin polls `sa acquires` a few times a second: logged
                // only at debug level (each acquire is logged when a worker raises it).
                _ if cmd.req.what == "acquires" && r.ok => {
                    tracing::debug!("control: {}: {}", what.trim(), r.data)
                }
                // One line for a batch, however many changes it holds.
                ("sa", true, _) if cmd.req.what == "batch" => say(
                    "sa",
                    false,
                    &format!(
                        "control: sa batch: {} published as snapshot {}",
                        espada_control::supervisor::count(
                            r.data["applied"].as_u64().unwrap_or(0) as usize,
                            "change",
                            "changes"
                        ),
                        r.data["snapshot"]
                    ),
                ),
                ("sa", true, _) if cmd.req.what == "rekey" => say(
                    "sa",
                    false,
                    &format!(
                        "control: sa rekey: {} rekeyed in snapshot {}{}",
                        espada_control::supervisor::count(
                            r.data["rekeyed"].as_array().map_or(0, Vec::len),
                            "tunnel",
                            "tunnels"
                        ),
                        sup.sadb().generation(),
                        match r.data["pending"].as_u64() {
                            Some(p) if p > 0 => format!(
                                " ({p} of them in {}, one per tick)",
                                espada_control::supervisor::count(
                                    r.data["slices_to_follow"].as_u64().unwrap_or(0) as usize,
                                    "more snapshot",
                                    "more snapshots"
                                )
                            ),
                            _ => String::new(),
                        }
                    ),
                ),
                (_, true, _) => say(
                    "sa",
                    false,
                    &format!("control: {}: {}", what.trim(), r.data),
                ),
                (_, false, Some(e)) => say(
                    "sa-refused",
                    true,
                    &format!("control: {} refused: {e}", what.trim()),
                ),
                _ => {}
            }
            let _ = cmd.reply.send(r);
        }
        // lab_rekey: at a generation boundary, send on the new generation (the peer already
        // accepts it) and keep accepting the one before.
        for line in sup.tick(now_unix) {
            big_change = true; // a generation installed (or refused)
            say("rekey", false, &line);
        }
        // After a reload, a batch or a rekey, the memory the old snapshots and the parsed file
        // held goes back to the kernel (RSS returns to its level instead of ratcheting up).
        // (A little later: the workers let go of the old snapshot at their next poll.)
        if big_change {
            trim_at = Some(Instant::now() + Duration::from_millis(300));
        }
        if trim_at.is_some_and(|t| Instant::now() >= t) {
            trim_at = None;
            espada_dataplane::heap::give_back();
        }
        while let Some(a) = shared.acquires.pop() {
            if let Some(line) = sup.note_acquire(a) {
                say("acquire", false, &line);
            }
        }
        while let Some(e) = shared.events.pop() {
            sup.note_expire(&e);
            let (loud, text) = sup.describe_event(&e);
            say("lifetime", loud, &text);
        }
        if let Some(w) = &mut watchdog {
            w.tick(&cells);
        }
        if last.elapsed() < interval {
            continue;
        }
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        if !a.no_pin {
            softirq_watch.tick(dt, &monitor);
        }
        let now: Vec<WorkerStats> = cells.iter().map(|c| c.read()).collect();
        let mut line = format!("{:>7.1}s", start.elapsed().as_secs_f64());
        let mut js = Vec::new();
        let ports: Vec<[espada_dataplane::port::PortStats; 2]> = cells
            .iter()
            .map(|c| c.ports.lock().map(|p| *p).unwrap_or_default())
            .collect();
        for (i, (s, p)) in now.iter().zip(prev.iter()).enumerate() {
            let bp = ports[i][1];
            // (`espada clear` may have zeroed the counters since: no negative rates.)
            let enc = s.encap_packets.saturating_sub(p.encap_packets) as f64 / dt;
            let dec = s.decap_packets.saturating_sub(p.decap_packets) as f64 / dt;
            let gb = (s.encap_bytes.saturating_sub(p.encap_bytes)
                + s.decap_bytes.saturating_sub(p.decap_bytes)) as f64
                * 8.0
                / dt
                / 1e9;
            let dr = s.drops.total().saturating_sub(p.drops.total());
            line.push_str(&format!(
                " | core {i}: enc {:.3} dec {:.3} Mpps {:.2} Gbit/s drop {dr}",
                enc / 1e6,
                dec / 1e6,
                gb
            ));
            let by_reason: std::collections::BTreeMap<&str, u64> =
                s.drops.nonzero().map(|(r, n)| (r.label(), n)).collect();
            // Counters are cumulative since start (rates are over the last interval).
            js.push(serde_json::json!({"core": i, "encap_pps": enc, "decap_pps": dec, "gbps_inner": gb,
                "handoff_out": s.handoff_out, "handoff_in": s.handoff_in, "red_rx": s.red_rx, "black_rx": s.black_rx,
                "encap_packets": s.encap_packets, "decap_packets": s.decap_packets, "encap_bytes": s.encap_bytes, "decap_bytes": s.decap_bytes,
                "to_control": s.to_control, "order_waits": s.order_waits, "black_tx_lost": bp.tx_lost, "black_tx_resets": bp.tx_resets, "black_tx_oversize": bp.tx_oversize,
                "drops_total": s.drops.total(), "drops_by_reason": by_reason}));
        }
        if a.interval > 0.0 {
            eprintln!("{line}");
        }
        if let Some(f) = &mut json {
            let _ = writeln!(
                f,
                "{}",
                serde_json::json!({"t": start.elapsed().as_secs_f64(), "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()), "interval_s": dt, "gateway": c.name, "cores": js})
            );
        }
        prev = now;
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let elapsed = start.elapsed();
    let mut done = Vec::new();
    for h in handles {
        done.push(h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?);
    }
    let secs = elapsed.as_secs_f64();
    let enc: Vec<CoreReport> = done
        .iter()
        .zip(cells.iter())
        .map(|(w, c)| core_report(w.core(), w.stats(), c, secs, true))
        .collect();
    let dec: Vec<CoreReport> = done
        .iter()
        .zip(cells.iter())
        .map(|(w, c)| core_report(w.core(), w.stats(), c, secs, false))
        .collect();
    let s = espada_benches::report::core_table(
        "dir",
        "SA:port",
        &[
            espada_benches::report::Part {
                who: "out",
                what: "encapsulated",
                cores: &enc,
                drops: false,
            },
            espada_benches::report::Part {
                who: "in",
                what: "decapsulated",
                cores: &dec,
                drops: true,
            },
        ],
    );
    println!(
        "espada run: gateway \"{}\" stopped after {secs:.1} s; totals:",
        c.name
    );
    print!("{s}");
    for w in &done {
        print_worker_totals(w);
    }
    #[cfg(feature = "dpdk")]
    {
        for p in &keep_ports {
            let s = p.pmd_stats();
            println!(
                "dpdk port {}: PMD rx {} tx {} rx-bytes {} tx-bytes {} missed {} tx-errors {}",
                p.id, s[0], s[1], s[2], s[3], s[4], s[5]
            );
        }
    }
    // The ports (and their flow rules) go away only now, after the workers stopped.
    #[cfg(feature = "dpdk")]
    drop(keep_ports);
    {
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (family, n) in [
            ("ARP", &shared.neighbors.counters),
            ("IPv6 ND", &shared.neighbors6.counters),
        ] {
            if family == "IPv6 ND" && l(&n.learned) + l(&n.unsolicited) == 0 {
                continue;
            }
            println!(
                "neighbors ({family}): {} learned, {} expired, {} refreshed; {} provisional from requests ({} rate-limited, {} pushed out); refused: {} unsolicited, {} for configured entries, {} too soon after a change, {} table full",
                l(&n.learned), l(&n.expired), l(&n.refreshed), l(&n.provisional), l(&n.limited), l(&n.evicted), l(&n.unsolicited), l(&n.static_kept), l(&n.too_soon), l(&n.full)
            );
        }
    }
    if pool.reclaimed() > 0 {
        println!(
            "{} came back to the pool by being dropped (control path)",
            espada_control::supervisor::count(pool.reclaimed() as usize, "buffer", "buffers")
        );
    }
    if ike > 0 {
        println!(
            "{} reached the control path (no IKE daemon is attached: dropped there)",
            espada_control::supervisor::count(ike as usize, "IKE message", "IKE messages")
        );
    }
    if let Some(t) = punt_thread {
        let _ = t.join();
        let l = |x: &std::sync::atomic::AtomicU64| x.load(Ordering::Relaxed);
        let c = &punt_counters;
        println!(
            "IKE daemon (--ike-tun): packets {} to it, {} from it; dropped: {} not IKE from our black address, {} queue full, {} write errors",
            l(&c.to_daemon), l(&c.from_daemon), l(&c.not_ike), l(&c.queue_full), l(&c.write_errors)
        );
    }
    if let Some(p) = &a.stats_json {
        let mut f = std::fs::OpenOptions::new().append(true).open(p)?;
        let _ = writeln!(
            f,
            "{}",
            serde_json::json!({"final": true, "seconds": secs, "encap": enc, "decap": dec})
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One worker's totals at the end: frames per side, handoffs, ARP, ICMP, port drops and
/// losses, burst latency, and its SAs (those that carried traffic, with thousands).
fn print_worker_totals(w: &espada_dataplane::worker::Worker) {
    let st = w.stats();
    let (r, b) = w.ports();
    println!(
        "core {}: red rx {} tx {} | black rx {} tx {} | handoff out {} in {} | arp replies {} requests {} | icmp {} | port drops red {} black {}",
        w.core(), st.red_rx, st.red_tx, st.black_rx, st.black_tx, st.handoff_out, st.handoff_in, st.arp_replies, st.arp_requests, st.icmp_sent,
        r.stats().tx_dropped + r.stats().rx_dropped, b.stats().tx_dropped + b.stats().rx_dropped
    );
    for (side, ps) in [("red", r.stats()), ("black", b.stats())] {
        if ps.tx_lost + ps.tx_oversize + ps.tx_resets > 0 {
            println!(
                "  {side} port: {} lost in {} (link not taking frames), {} over the device MTU",
                espada_control::supervisor::count(ps.tx_lost as usize, "frame", "frames"),
                espada_control::supervisor::count(
                    ps.tx_resets as usize,
                    "transmit ring reset",
                    "transmit ring resets"
                ),
                ps.tx_oversize
            );
        }
    }
    if let Some(l) = w.burst_latency_us() {
        println!("  burst latency (rx to tx, sampled): p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs", l[0], l[1], l[2], l[3]);
    }
    // Every SA up to a few dozen; with thousands of tunnels, those that carried traffic.
    let many = w.sas().outbound_sas().count() + w.sas().inbound_sas().count() > 64;
    let mut quiet = (0, 0);
    for sa in w.sas().outbound_sas() {
        if many && sa.counters.packets == 0 {
            quiet.0 += 1;
            continue;
        }
        println!(
            "  out SA {:#010x} port {}: {} packets, {} bytes",
            sa.spi, sa.tunnel.src_port, sa.counters.packets, sa.counters.bytes
        );
    }
    for sa in w.sas().inbound_sas() {
        if many && sa.counters.packets == 0 {
            quiet.1 += 1;
            continue;
        }
        println!(
            "  in  SA {:#010x}: {} packets, {} bytes",
            sa.spi, sa.counters.packets, sa.counters.bytes
        );
    }
    if quiet != (0, 0) {
        println!(
            "  and {} outbound, {} inbound {} that carried nothing",
            quiet.0,
            quiet.1,
            if quiet.1 == 1 { "SA" } else { "SAs" }
        );
    }
}

/// Issue 28: refuses to start (an exit code) when the kernel's receive work for the gateway's
/// interfaces would run on a worker's core: with kernel ports (AF_PACKET, AF_XDP) a frame is
/// first received in the softirq of the CPU its queue's interrupt or RPS mask names, and on a
/// worker's core that softirq takes the core from the poll loop under load (a receive
/// livelock). `--allow-softirq-on-workers` starts anyway, with a warning per finding.
fn softirq_placement(
    a: &RunArgs,
    red_if: &str,
    black_if: &str,
    workers: &[usize],
) -> Option<ExitCode> {
    if a.port == "dpdk" || a.no_pin {
        return None;
    }
    let on = espada_pinning::softirq::on_workers(
        std::path::Path::new("/"),
        &[red_if, black_if],
        workers,
    );
    if !on.is_empty() && !a.allow_softirq_on_workers {
        eprintln!(
            "error: the kernel's receive work for this gateway's interfaces would run on its worker cores ({}): {}. Under overload that softirq starves the workers (a receive livelock). Move the interrupts and RPS masks to other cores (`espada pin apply -c FILE` does), give the workers other cores (`[gateway] cores`), or start with --allow-softirq-on-workers",
            espada_pinning::format_cpu_list(workers),
            on.join("; ")
        );
        return Some(ExitCode::from(1));
    }
    for line in &on {
        tracing::warn!("{line} (--allow-softirq-on-workers)");
    }
    None
}

/// Issue 28, at run time: a worker core that spends its time in the kernel's softirq
/// (interrupts or RPS moved onto it after start, another device's traffic) is said once,
/// loudly, in the log and to `espada monitor`; again only after it cooled down.
struct SoftirqWatch {
    meter: espada_pinning::softirq::SoftirqMeter,
    warned: std::collections::BTreeSet<usize>,
    cpus: Vec<usize>,
}

impl SoftirqWatch {
    fn new(cpus: Vec<usize>) -> SoftirqWatch {
        SoftirqWatch {
            meter: Default::default(),
            warned: Default::default(),
            cpus,
        }
    }

    fn tick(&mut self, dt: f64, monitor: &espada_control::monitor::Monitor) {
        for (cpu, share) in self.meter.read(std::path::Path::new("/"), &self.cpus) {
            let hot = share.is_some_and(|x| x > SOFTIRQ_WARN);
            if hot && self.warned.insert(cpu) {
                let text = format!(
                    "worker core {cpu} spent {:.0} % of the last {dt:.1} s in the kernel's softirq: interrupts or RPS bring receive work onto it, which starves the worker under load (a receive livelock); move them off (espada pin check)",
                    share.unwrap_or(0.0) * 100.0
                );
                tracing::warn!("{text}");
                monitor.publish("softirq", &text);
            } else if !hot {
                self.warned.remove(&cpu);
            }
        }
    }
}

/// The share of a worker core's time in softirq above which `espada run` warns.
const SOFTIRQ_WARN: f64 = 0.10;

/// Half the service manager's watchdog period (`WATCHDOG_USEC`, for this process when
/// `WATCHDOG_PID` says so), if it set one.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Feeds systemd's watchdog while every worker polls.
struct Watchdog {
    every: Duration,
    last: Instant,
    beats: Vec<u64>,
    starved: bool,
}

impl Watchdog {
    fn tick(&mut self, cells: &[Arc<StatsCell>]) {
        if self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        let now: Vec<u64> = cells.iter().map(|c| c.heartbeat()).collect();
        let stalled: Vec<usize> = now
            .iter()
            .zip(&self.beats)
            .enumerate()
            .filter(|(_, (a, b))| a == b)
            .map(|(i, _)| i)
            .collect();
        self.beats = now;
        if stalled.is_empty() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            if self.starved {
                tracing::info!("every worker polls again: the watchdog is fed");
            }
            self.starved = false;
        } else if !self.starved {
            self.starved = true;
            tracing::warn!(
                "{} {stalled:?} did not poll for {:.1} s: the watchdog is not fed (the service manager restarts the gateway if this lasts)",
                if stalled.len() == 1 { "worker" } else { "workers" },
                self.every.as_secs_f64()
            );
        }
    }
}
