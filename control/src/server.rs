//! The gateway side: a thread serving the control socket, reading what the workers publish.

use crate::conn::{self, ConnLimits, Slots};
use crate::{Request, Response, SHOW};
use espada_dataplane::worker::{GatewayShared, StatsCell, WorkerStats};
use espada_dataplane::DropReason;
use espada_sadb::db::SaSpec;
use espada_sadb::selector::Action;
use serde_json::{json, Value};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the control plane can see of a running gateway.
pub struct Gateway {
    /// The gateway's name (`[gateway] name`).
    pub name: String,
    /// `espada version` text.
    pub version: String,
    /// When it started.
    pub started: Instant,
    /// The CPU each worker is pinned to (index = worker), when pinned.
    pub cores: Vec<Option<usize>>,
    /// Each worker's published counters.
    pub cells: Vec<Arc<StatsCell>>,
    /// The gateway's shared state (SA database, neighbors).
    pub shared: GatewayShared,
    /// Set to ask the gateway to reload its configuration (as SIGHUP does).
    pub reload: Arc<AtomicBool>,
    /// Where commands that change the gateway (`reload`, `sa ...`) go: the gateway's
    /// [`Supervisor`](crate::supervisor::Supervisor), which answers each. `None`: this gateway
    /// takes none (a reload is then only requested, as SIGHUP does).
    pub commands: Option<std::sync::mpsc::Sender<crate::supervisor::Command>>,
    /// The event feed `espada monitor` watches.
    pub monitor: Arc<crate::monitor::Monitor>,
}

/// A served control socket; dropping it stops the thread and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    slots: Arc<Slots>,
}

/// A control socket bound (so no second gateway can take it) and not served yet: the gateway
/// binds it before it opens any port, and serves it once its workers run.
pub struct BoundControl {
    l: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path` (mode 0600). A live gateway already on `path` is an error; a stale socket
    /// file is replaced.
    pub fn bind(path: &Path) -> io::Result<BoundControl> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another gateway serves this control socket",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(BoundControl {
            l,
            path: path.to_path_buf(),
        })
    }

    /// Binds `path` and serves `gw` ([`ControlServer::bind`] then [`BoundControl::serve`]).
    pub fn start(path: &Path, gw: Arc<Gateway>) -> io::Result<ControlServer> {
        Self::bind(path)?.serve(gw)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections refused because [`ConnLimits::CONTROL`] clients were being served.
    pub fn refused(&self) -> usize {
        self.slots.refused()
    }
}

impl BoundControl {
    /// Serves `gw`: one thread accepts (blocking, no polling), each client is served on a
    /// thread of its own, at most [`ConnLimits::CONTROL`]`.max_clients` at once, each within
    /// one deadline, with bounded requests.
    pub fn serve(self, gw: Arc<Gateway>) -> io::Result<ControlServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Slots::default());
        let l = self.l;
        let thread = conn::accept_loop(
            "espada-control",
            std::iter::repeat_with(move || l.accept().map(|(s, _)| s)),
            stop.clone(),
            slots.clone(),
            ConnLimits::CONTROL,
            b"{\"ok\":false,\"error\":\"too many control clients at once; try again\",\"data\":null}\n",
            move |s, lim| {
                let _ = serve_one(s, &gw, lim);
            },
        )?;
        Ok(ControlServer {
            path: self.path,
            stop,
            thread: Some(thread),
            slots,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(s: UnixStream, gw: &Gateway, lim: ConnLimits) -> io::Result<()> {
    let deadline = Instant::now() + lim.deadline;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = Vec::new();
    // A few requests per connection at most: the client sends one and reads one.
    for _ in 0..64 {
        let resp = match conn::read_line(&mut r, &s, &mut line, lim.max_request, deadline) {
            Ok(0) => break,
            Ok(_) => {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                match serde_json::from_slice::<Request>(&line) {
                    // The connection becomes a stream of events until the client leaves.
                    Ok(req) if req.cmd == "monitor" => return watch(&s, &mut w, gw),
                    Ok(req) => answer(gw, &req),
                    Err(e) => err(format!(
                        "not a request ({e}); send e.g. {{\"cmd\":\"show\",\"what\":\"sa\"}}"
                    )),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => err(format!(
                "{e}: one JSON request per line, at most {} bytes",
                lim.max_request
            )),
            Err(e) => return Err(e),
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        out.push('\n');
        conn::arm(&s, deadline)?;
        w.write_all(out.as_bytes())?;
        if !resp.ok && resp.error.as_deref().is_some_and(|e| e.contains("at most")) {
            break; // the rest of an oversized line is not read
        }
        if out.len() >= BIG_ANSWER {
            // `show sa` of 80 000 SAs builds ~170 MB of small JSON values in this thread's
            // heap arena; freed, the C allocator kept them and the gateway's RSS stayed that
            // much higher until the next reload. Handed back to the kernel now (milliseconds,
            // on this connection's thread).
            drop((out, resp));
            espada_dataplane::heap::give_back();
        }
    }
    Ok(())
}

/// An answer this long (bytes) had the heap give its free pages back after it was sent.
const BIG_ANSWER: usize = 1 << 20;

/// `monitor`: one answer, then the gateway's events as they come, one JSON object per line,
/// until the client goes away or the gateway stops.
fn watch(s: &UnixStream, w: &mut UnixStream, gw: &Gateway) -> io::Result<()> {
    let Some(rx) = gw.monitor.watch() else {
        let r = err(format!(
            "{} watchers already: try again later",
            crate::monitor::MAX_WATCHERS
        ));
        w.write_all((serde_json::to_string(&r).unwrap_or_default() + "\n").as_bytes())?;
        return Ok(());
    };
    // No deadline for a watcher; a write that cannot go within 5 s ends it.
    s.set_read_timeout(None)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let hello =
        ok(json!({ "monitor": "events follow, one JSON object per line: unix_time, kind, text" }));
    w.write_all((serde_json::to_string(&hello).unwrap_or_default() + "\n").as_bytes())?;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")?;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if gw.shared.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

fn err(msg: String) -> Response {
    Response {
        ok: false,
        error: Some(msg),
        data: Value::Null,
    }
}

fn ok(data: Value) -> Response {
    Response {
        ok: true,
        error: None,
        data,
    }
}

/// Answers one request (the socket thread calls it; tests call it directly).
pub fn answer(gw: &Gateway, req: &Request) -> Response {
    match (req.cmd.as_str(), req.what.as_str()) {
        ("version", _) => ok(json!({ "version": gw.version })),
        ("clear", _) => {
            gw.shared
                .clear
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ok(
                json!({ "cleared": "worker counters and drops zeroed (each worker within a few hundred polls); SA packet and byte counters stay, the lifetimes count on them" }),
            )
        }
        ("reload", _) | ("sa", _) if gw.commands.is_some() => {
            let (tx, rx) = std::sync::mpsc::channel();
            let sent = gw.commands.as_ref().is_some_and(|c| {
                c.send(crate::supervisor::Command {
                    req: req.clone(),
                    reply: tx,
                })
                .is_ok()
            });
            if !sent {
                return err("the gateway is stopping".into());
            }
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| err("the gateway did not answer within 10 s".into()))
        }
        ("reload", _) => {
            gw.reload.store(true, Ordering::Relaxed);
            ok(json!({ "reload": "requested: the gateway logs the outcome" }))
        }
        ("sa", _) => err("this gateway takes no SA commands".into()),
        ("show", "sa") => ok(show_sa(
            gw,
            req.args.get("spi").and_then(Value::as_u64),
            req.args.get("tunnel").and_then(Value::as_str),
        )),
        ("show", "stats") => ok(show_stats(gw)),
        ("show", "errors") => ok(show_errors(gw)),
        ("show", "workers") => ok(show_workers(gw)),
        ("show", "neighbors") => ok(show_neighbors(gw)),
        ("show", "policy") => ok(show_policy(gw)),
        ("show", w) => err(format!("cannot show \"{w}\"; one of: {}", SHOW.join(", "))),
        (c, _) => err(format!(
            "unknown command \"{c}\"; commands: show, sa, reload, clear, version"
        )),
    }
}

fn limits(s: &SaSpec) -> Value {
    let l = &s.lifetimes;
    json!({
        "soft_seconds": l.soft.seconds, "hard_seconds": l.hard.seconds,
        "soft_bytes": l.soft.bytes, "hard_bytes": l.hard.bytes,
        "soft_packets": l.soft.packets, "hard_packets": l.hard.packets,
    })
}

/// Every SA, or only those with SPI `only` (an IKE daemon's `query_sa`).
/// Every SA, or those of one SPI and/or one tunnel (10 000 tunnels are ~80 000 rows).
fn show_sa(gw: &Gateway, only: Option<u64>, tunnel: Option<&str>) -> Value {
    let db = gw.shared.sadb.load();
    // What each worker published about each SA it holds.
    // By (SPI, outbound): 10 000 tunnels have ~80 000 SAs, so no scan per SA.
    let mut rt: std::collections::HashMap<
        (u32, bool),
        Vec<(usize, espada_dataplane::worker::SaStat)>,
    > = std::collections::HashMap::new();
    for (core, c) in gw.cells.iter().enumerate() {
        if let Ok(v) = c.sas.lock() {
            for s in v.iter() {
                rt.entry((s.spi, s.outbound)).or_default().push((core, *s));
            }
        }
    }
    let none = Vec::new();
    let mut rows = Vec::new();
    for t in db
        .tunnels
        .iter()
        .filter(|t| tunnel.is_none_or(|n| t.name == n))
    {
        for (dir, group) in [("out", &t.outbound), ("in", &t.inbound)] {
            for s in group
                .all()
                .chain(if dir == "in" {
                    t.draining.iter()
                } else {
                    [].iter()
                })
                .filter(|s| only.is_none_or(|o| o == s.spi as u64))
            {
                let held: Vec<&(usize, espada_dataplane::worker::SaStat)> = rt
                    .get(&(s.spi, dir == "out"))
                    .unwrap_or(&none)
                    .iter()
                    .collect();
                // Outbound: what workers that moved on sent stays counted, and the last use is
                // the newest on any core (an IKE daemon's dead peer detection asks for it).
                let (ret_use, out_seq) = if dir == "out" {
                    let st = s.out_state();
                    (st.last_use(), st.last_seq())
                } else {
                    (0, 0)
                };
                let live: Vec<&(usize, espada_dataplane::worker::SaStat)> =
                    held.iter().copied().filter(|(_, r)| !r.retired).collect();
                let now_unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let first = |f: &dyn Fn(&espada_dataplane::worker::SaStat) -> u64| {
                    live.iter()
                        .map(|(_, r)| f(r))
                        .filter(|&t| t > 0)
                        .min()
                        .map(|t| t.saturating_sub(now_unix))
                };
                // Every core's rows: those using the SA and those that moved on (`retired`).
                let packets: u64 = held.iter().map(|(_, r)| r.packets).sum();
                let bytes: u64 = held.iter().map(|(_, r)| r.bytes).sum();
                let seq = held
                    .iter()
                    .map(|(_, r)| r.seq)
                    .max()
                    .unwrap_or(0)
                    .max(out_seq);
                let last_use = held
                    .iter()
                    .map(|(_, r)| r.last_use)
                    .max()
                    .unwrap_or(0)
                    .max(ret_use);
                rows.push(json!({
                    "tunnel": t.name,
                    "dir": dir,
                    "spi": format!("{:#010x}", s.spi),
                    "cpu": s.cpu,
                    "udp_src_port": s.endpoints.src_port,
                    "local": s.endpoints.local.to_string(),
                    "remote": s.endpoints.remote.to_string(),
                    "esn": s.esn,
                    "replay_window": if dir == "in" { Some(s.replay_window) } else { None },
                    "owner_cores": held
                        .iter()
                        .filter(|(_, r)| !r.retired)
                        .map(|(c, _)| *c)
                        .collect::<Vec<_>>(),
                    "packets": packets,
                    "bytes": bytes,
                    "last_use": last_use,
                    if dir == "out" { "seq" } else { "replay_top" }: seq,
                    // Replaced and going away; or (lab_rekey) the next generation, accepted early.
                    "draining": dir == "in" && !s.next_generation && t.draining.iter().any(|d| d.spi == s.spi),
                    "next_generation": s.next_generation,
                    "lifetime": limits(s),
                    "cipher": s.key.algorithm().name(),
                    // Inbound drops on this SA, every core's together.
                    "replay_drops": live.iter().map(|(_, r)| r.replay_drops).sum::<u64>(),
                    "integrity_drops": live.iter().map(|(_, r)| r.integrity_drops).sum::<u64>(),
                    "other_drops": live.iter().map(|(_, r)| r.other_drops).sum::<u64>(),
                    // The earliest core's clock: when it was installed, when its soft and
                    // hard time limits fall (seconds from now; null: no time limit or no core
                    // holds it).
                    "added_unix": live.iter().map(|(_, r)| r.added).filter(|&a| a > 0).min(),
                    "soft_expires_in": first(&|r| r.soft_at),
                    // lab_rekey: the next generation switch, when these SAs are replaced.
                    "generation_switch_in": t.rekey_every.filter(|&p| p > 0).map(|p| p - now_unix % p),
                    "hard_expires_in": first(&|r| r.hard_at),
                }));
            }
        }
    }
    json!({ "gateway": gw.name, "mode": db.mode.name(), "workers": db.workers, "sas": rows })
}

fn stats_json(s: &WorkerStats) -> Value {
    let drops: serde_json::Map<String, Value> = s
        .drops
        .nonzero()
        .map(|(r, n)| (r.label().to_string(), json!(n)))
        .collect();
    json!({
        "red_rx": s.red_rx, "black_rx": s.black_rx, "red_tx": s.red_tx, "black_tx": s.black_tx,
        "encap_packets": s.encap_packets, "encap_bytes": s.encap_bytes,
        "decap_packets": s.decap_packets, "decap_bytes": s.decap_bytes,
        "bypass_packets": s.bypass_packets, "handoff_out": s.handoff_out, "handoff_in": s.handoff_in,
        "to_control": s.to_control, "arp_replies": s.arp_replies, "arp_requests": s.arp_requests,
        "nd_adverts": s.nd_adverts, "nd_solicits": s.nd_solicits, "order_waits": s.order_waits,
        "icmp_sent": s.icmp_sent, "bursts": s.bursts, "busy_ns": s.busy_ns,
        "red_ns": s.red_ns, "black_ns": s.black_ns,
        "drops": s.drops.total(), "drops_by_reason": drops,
    })
}

fn sum(gw: &Gateway) -> (Vec<WorkerStats>, WorkerStats) {
    let per: Vec<WorkerStats> = gw.cells.iter().map(|c| c.read()).collect();
    let mut t = WorkerStats::default();
    for s in &per {
        t.red_rx += s.red_rx;
        t.black_rx += s.black_rx;
        t.red_tx += s.red_tx;
        t.black_tx += s.black_tx;
        t.encap_packets += s.encap_packets;
        t.encap_bytes += s.encap_bytes;
        t.decap_packets += s.decap_packets;
        t.decap_bytes += s.decap_bytes;
        t.bypass_packets += s.bypass_packets;
        t.handoff_out += s.handoff_out;
        t.handoff_in += s.handoff_in;
        t.to_control += s.to_control;
        t.arp_replies += s.arp_replies;
        t.arp_requests += s.arp_requests;
        t.nd_adverts += s.nd_adverts;
        t.nd_solicits += s.nd_solicits;
        t.order_waits += s.order_waits;
        t.icmp_sent += s.icmp_sent;
        t.bursts += s.bursts;
        t.busy_ns += s.busy_ns;
        t.drops.merge(&s.drops);
    }
    (per, t)
}

fn show_stats(gw: &Gateway) -> Value {
    let (per, total) = sum(gw);
    json!({
        "gateway": gw.name,
        "uptime_seconds": gw.started.elapsed().as_secs_f64(),
        "workers": per.iter().enumerate().map(|(i, s)| { let mut v = stats_json(s); v["worker"] = json!(i); v }).collect::<Vec<_>>(),
        "total": stats_json(&total),
    })
}

fn show_errors(gw: &Gateway) -> Value {
    let (per, total) = sum(gw);
    let rows: Vec<Value> = DropReason::ALL
        .iter()
        .filter(|r| total.drops.get(**r) > 0)
        .map(|r| {
            json!({
                "reason": r.label(),
                "total": total.drops.get(*r),
                "per_worker": per.iter().map(|s| s.drops.get(*r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "gateway": gw.name, "errors": rows })
}

fn show_workers(gw: &Gateway) -> Value {
    let rows: Vec<Value> = gw
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let s = c.read();
            let ports = c.ports.lock().map(|p| *p).unwrap_or_default();
            let port = |p: &espada_dataplane::port::PortStats| {
                json!({ "rx_packets": p.rx_packets, "tx_packets": p.tx_packets, "rx_dropped": p.rx_dropped,
                        "tx_dropped": p.tx_dropped, "tx_lost": p.tx_lost, "tx_resets": p.tx_resets,
                        "tx_oversize": p.tx_oversize, "rx_filtered": p.rx_filtered, "tx_copied": p.tx_copied, "rx_csum_completed": p.rx_csum_completed })
            };
            json!({
                "worker": i,
                "cpu": gw.cores.get(i).copied().flatten(),
                "bursts": s.bursts,
                "busy_ns": s.busy_ns,
                "ns_per_packet": if s.red_rx + s.black_rx + s.handoff_in > 0 { s.busy_ns as f64 / (s.red_rx + s.black_rx + s.handoff_in) as f64 } else { 0.0 },
                // Per stage: red (receive, classify, seal) per red frame; black (receive,
                // open, checks) per black frame. Transmit and handoffs are in neither.
                "encap_stage_ns_per_packet": if s.red_rx > 0 { s.red_ns as f64 / s.red_rx as f64 } else { 0.0 },
                "decap_stage_ns_per_packet": if s.black_rx > 0 { s.black_ns as f64 / s.black_rx as f64 } else { 0.0 },
                "handoff_out": s.handoff_out, "handoff_in": s.handoff_in,
                "red": port(&ports[0]), "black": port(&ports[1]),
            })
        })
        .collect();
    json!({ "gateway": gw.name, "workers": rows })
}

fn show_neighbors(gw: &Gateway) -> Value {
    // IPv4 (ARP) and IPv6 (neighbor discovery) entries in one list; counters of both.
    let (n, n6) = (&gw.shared.neighbors, &gw.shared.neighbors6);
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let c =
        |f: fn(&espada_dataplane::neighbor::NeighborCounters) -> &std::sync::atomic::AtomicU64| {
            l(f(&n.counters)) + l(f(&n6.counters))
        };
    let mut entries: Vec<Value> = n
        .entries()
        .iter()
        .map(
            |(ip, mac, st)| json!({"ip": ip.to_string(), "mac": mac.to_string(), "configured": st}),
        )
        .collect();
    entries.extend(n6.entries().iter().map(
        |(ip, mac, st)| json!({"ip": ip.to_string(), "mac": mac.to_string(), "configured": st}),
    ));
    json!({
        "gateway": gw.name,
        "entries": entries,
        "learned": c(|x| &x.learned), "expired": c(|x| &x.expired),
        "refused_unsolicited": c(|x| &x.unsolicited), "refused_configured": c(|x| &x.static_kept),
        "refused_too_soon": c(|x| &x.too_soon), "refused_full": c(|x| &x.full), "provisional": c(|x| &x.provisional), "provisional_limited": c(|x| &x.limited), "provisional_evicted": c(|x| &x.evicted), "refreshed": c(|x| &x.refreshed),
    })
}

fn show_policy(gw: &Gateway) -> Value {
    let db = gw.shared.sadb.load();
    let rows: Vec<Value> = db
        .spd
        .policies
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "selector": p.selector.to_string(),
                "action": match p.action {
                    Action::Protect(t) => format!("protect via tunnel {}", db.tunnels.get(t).map_or("?", |t| t.name.as_str())),
                    Action::Bypass => "bypass".into(),
                    Action::Discard => "discard".into(),
                },
            })
        })
        .collect();
    json!({ "gateway": gw.name, "policies": rows })
}
