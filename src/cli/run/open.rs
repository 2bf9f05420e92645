//! Before any NIC is touched: the configuration, the worker cores, the interface locks, the
//! state directory's sequence reservations, and the control socket and metrics listener bound
//! (a second instance meant for the same interfaces, state or sockets stops here).

use super::{refuse, RunArgs};
use crate::cli::demo::sides;
use crate::config;
use anyhow::{Context, Result};
use espada_control::metrics::BoundMetrics;
use espada_control::server::BoundControl;
use espada_dataplane::state::seqstore::{self, InterfaceLock, SeqStore};
use espada_harness::pair::GatewaySides;
use espada_sadb::db::{SaDb, SaDbHandle};
use std::sync::Arc;

/// What `espada run` holds once it has decided to run, before the ports open.
pub(super) struct Opened {
    pub c: config::Config,
    pub sides: GatewaySides,
    /// Worker count.
    pub n: usize,
    /// The CPUs this process may use (read before DPDK binds the main thread).
    pub ids: Vec<core_affinity::CoreId>,
    pub online: Vec<usize>,
    /// The workers' cores, from the pinning plan (or `[gateway] cores`).
    pub cores: Vec<usize>,
    pub red_if: String,
    pub black_if: String,
    /// One gateway per interface: held until the gateway stops.
    pub locks: Vec<InterfaceLock>,
    /// The SAs to start with, sequence numbers resumed above the last run's reservations.
    pub sadb: Arc<SaDbHandle>,
    pub seq_store: SeqStore,
    /// UNIX time of the start (lab_rekey generations count from it).
    pub now0: u64,
    pub control: Option<BoundControl>,
    pub metrics: Option<BoundMetrics>,
}

impl Opened {
    pub fn open(a: &RunArgs) -> Result<Opened> {
        let c = config::load(&a.config).map_err(|e| refuse(e.to_string()))?;
        let sides = sides(&c)?;
        let n = a.workers.unwrap_or_else(|| c.resolved_workers()).max(1);
        let ids = core_affinity::get_core_ids().unwrap_or_default();
        let online: Vec<usize> = ids.iter().map(|c| c.id).collect();
        let cores = worker_cores(&c, n, ids.len());
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
        for t in &c.tunnels {
            if let Some(w) = &t.key_warning {
                tracing::warn!("{w}");
            }
        }
        super::watch::softirq_placement(a, &red_if, &black_if, &cores[..n.min(cores.len())])?;
        // Two gateways on one interface would both answer ARP and both forward, and count
        // under the same keys: the lock is the network namespace's (an abstract socket), not
        // a file in a directory a second instance could be pointed elsewhere.
        let locks = [&red_if, &black_if]
            .into_iter()
            .map(|i| seqstore::lock_interface(i).map_err(|e| refuse(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let now0 = config::unix_now();
        let (db, seq_store) = resume_sequences(a, &c, n, now0)?;
        let (control, metrics) = bind_servers(a, &c)?;
        Ok(Opened {
            c,
            sides,
            n,
            ids,
            online,
            cores,
            red_if,
            black_if,
            locks,
            sadb: SaDbHandle::new(db),
            seq_store,
            now0,
            control,
            metrics,
        })
    }
}

/// Worker cores come from the same plan `espada pin` prints (isolated cores first, the NIC's
/// NUMA node, no SMT siblings); if the host cannot be read, cores 0..n.
fn worker_cores(c: &config::Config, n: usize, cpus: usize) -> Vec<usize> {
    if let Some(v) = &c.cores {
        return v.clone();
    }
    let mut c2 = c.clone();
    c2.workers = n;
    match crate::cli::pin::make_plan(&c2, std::path::Path::new("/"), true) {
        Ok((_, p)) => p.worker_cores,
        Err(e) => {
            tracing::info!("no pinning plan ({e:#}); workers on cores 0..{}", n - 1);
            (0..n).map(|i| i % cpus.max(1)).collect()
        }
    }
}

/// The SA database at `now0`, its outbound sequence numbers resumed above whatever the
/// previous run could have sent (durable reservations in the state directory), and the store
/// that keeps reserving. Refuses an empty state directory for static keys without
/// `--new-keys`, and a store it cannot write.
fn resume_sequences(
    a: &RunArgs,
    c: &config::Config,
    n: usize,
    now0: u64,
) -> Result<(SaDb, SeqStore)> {
    let mut db = c.sadb_at(n, Some(now0))?;
    for (t, tunnel) in c.tunnels.iter().enumerate() {
        if let Some(g) = c.generation(t, now0) {
            tracing::info!(
                "tunnel \"{}\" rekeys every {} s without IKE (lab_rekey): generation {g} now",
                tunnel.name,
                tunnel.lab_rekey.as_ref().map_or(0, |r| r.seconds)
            );
        }
    }
    let mut seq_store = SeqStore::open(&a.state_dir, &c.name, a.seq_block)
        .map_err(|e| refuse(format!("{e} (--state-dir)")))?;
    if seq_store.is_fresh() && !a.new_keys {
        let static_keys: Vec<String> = c
            .tunnels
            .iter()
            .filter(|t| !t.ike)
            .map(|t| format!("\"{}\"", t.name))
            .collect();
        if !static_keys.is_empty() {
            return Err(refuse(format!(
                "{} holds no sequence state, and {} {} send with static keys: if these keys ever sent a packet (an earlier run, a lost or new --state-dir, another copy of this gateway), starting at sequence number 1 would repeat AES-GCM nonces. Restore the state directory, or start with --new-keys if every outbound key is new",
                a.state_dir.display(),
                if static_keys.len() == 1 { "tunnel" } else { "tunnels" },
                static_keys.join(", ")
            )));
        }
    }
    seq_store.attach(&mut db);
    seq_store.advance().map_err(|e| {
        refuse(format!("cannot reserve sequence numbers durably: {e}; refusing to send with keys whose nonces could repeat after a restart"))
    })?;
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
    Ok((db, seq_store))
}

/// The control socket and the metrics listener, bound before any port opens: a second
/// instance meant for the same socket or address stops here, before it touches a NIC.
fn bind_servers(
    a: &RunArgs,
    c: &config::Config,
) -> Result<(Option<BoundControl>, Option<BoundMetrics>)> {
    let control_path = a
        .control
        .clone()
        .or_else(|| c.control_socket.clone())
        .unwrap_or_else(|| espada_control::default_socket(&c.name));
    let control = if control_path.as_os_str() == "none" {
        None
    } else {
        Some(
            espada_control::server::ControlServer::bind(&control_path).map_err(|e| {
                refuse(format!(
                    "control socket: {e} (--control PATH, or --control none)"
                ))
            })?,
        )
    };
    let metrics = a
        .metrics
        .as_deref()
        .map(espada_control::metrics::MetricsServer::bind)
        .transpose()
        .map_err(|e| refuse(e.to_string()))?;
    Ok((control, metrics))
}
