//! The control loop, on the main thread until SIGINT/SIGTERM or `--duration`: reloads, the
//! control socket's commands, lab_rekey generations, acquires and lifetime events, neighbor
//! changes, heap trimming, the watchdog, and once per interval the live line and JSON record.

use super::start::Running;
use super::watch::{watchdog_interval, SoftirqWatch, Watchdog};
use super::RunArgs;
use anyhow::{Context, Result};
use espada_control::monitor::{Monitor, NeighborWatch};
use espada_control::supervisor::{count, Command};
use espada_control::Response;
use espada_dataplane::port::PortStats;
use espada_dataplane::worker::WorkerStats;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The loop's own state between wakes.
struct Loop {
    interval: Duration,
    last: Instant,
    prev: Vec<WorkerStats>,
    json: Option<std::fs::File>,
    neighbor_watch: NeighborWatch,
    softirq_watch: SoftirqWatch,
    watchdog: Option<Watchdog>,
    /// When the heap goes back to the kernel (a little after a big SA change).
    trim_at: Option<Instant>,
}

/// Every event goes to the log and to `espada monitor`'s watchers.
fn say(monitor: &Monitor, kind: &str, loud: bool, text: &str) {
    if loud {
        tracing::warn!("{text}");
    } else {
        tracing::info!("{text}");
    }
    monitor.publish(kind, text);
}

impl Running {
    pub fn supervise(&mut self, a: &RunArgs) -> Result<()> {
        let json = match &a.stats_json {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open {}", p.display()))?,
            ),
            None => None,
        };
        let mut l = Loop {
            interval: Duration::from_secs_f64(if a.interval > 0.0 { a.interval } else { 1.0 }),
            last: Instant::now(),
            prev: vec![WorkerStats::default(); self.n],
            json,
            neighbor_watch: NeighborWatch::default(),
            softirq_watch: SoftirqWatch::new(self.cores[..self.n.min(self.cores.len())].to_vec()),
            watchdog: watchdog_interval().map(|every| Watchdog {
                every,
                last: Instant::now(),
                beats: self.cells.iter().map(|c| c.heartbeat()).collect(),
                starved: false,
            }),
            trim_at: None,
        };
        // systemd (Type=notify): ready once the workers, the control socket and the metrics
        // are up; with WatchdogSec=, fed while every worker keeps polling (a stalled worker
        // starves it and the service manager restarts the gateway).
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!(
                    "forwarding: {}, {}",
                    count(self.n, "worker", "workers"),
                    count(self.c.tunnels.len(), "tunnel", "tunnels")
                )),
            ],
        );
        while !self.stop.load(Ordering::Relaxed) {
            // Wakes at once for a command (an IKE daemon installing an SA waits on the
            // answer), else every 50 ms for the housekeeping.
            let first = self.commands.recv_timeout(Duration::from_millis(50)).ok();
            if a.duration
                .is_some_and(|d| self.started.elapsed().as_secs_f64() >= d)
            {
                self.stop.store(true, Ordering::Relaxed);
            }
            let big_change = self.housekeeping(&mut l, first);
            // After a reload, a batch or a rekey, the memory the old snapshots and the parsed
            // file held goes back to the kernel (RSS returns to its level instead of
            // ratcheting up). A little later: the workers let go of the old snapshot at their
            // next poll.
            if big_change {
                l.trim_at = Some(Instant::now() + Duration::from_millis(300));
            }
            if l.trim_at.is_some_and(|t| Instant::now() >= t) {
                l.trim_at = None;
                espada_dataplane::heap::give_back();
            }
            if let Some(w) = &mut l.watchdog {
                w.tick(&self.cells);
            }
            if l.last.elapsed() >= l.interval {
                self.interval_report(a, &mut l);
            }
        }
        Ok(())
    }

    /// One wake's work: IKE without a daemon, neighbors, a reload, the commands, lab_rekey
    /// generations, acquires and lifetime events. True when the SAs changed in bulk.
    fn housekeeping(&mut self, l: &mut Loop, first: Option<Command>) -> bool {
        // Without a daemon, IKE is counted and dropped here; with one, the punt thread
        // takes it.
        if !self.shared.punt {
            while let Some(b) = self.shared.control.pop() {
                self.ike_dropped += 1;
                drop(b); // the buffer goes back to its pool
            }
        }
        self.shared.neighbors.expire(Instant::now());
        self.shared.neighbors6.expire(Instant::now());
        self.neighbor_changes(l);
        let now_unix = crate::config::unix_now();
        let mut big_change = false;
        if self.reload.swap(false, Ordering::Relaxed) {
            big_change = true;
            match self.sup.reload(now_unix) {
                Ok(m) => say(&self.monitor, "reload", false, &m),
                Err(e) => say(
                    &self.monitor,
                    "reload-refused",
                    true,
                    &format!("reload refused, still running the previous configuration: {e}"),
                ),
            }
        }
        let mut commands: Vec<Command> = first.into_iter().collect();
        commands.extend(std::iter::from_fn(|| self.commands.try_recv().ok()));
        for cmd in commands {
            let r = self.sup.execute(&cmd.req, now_unix);
            big_change |=
                matches!(cmd.req.what.as_str(), "batch" | "rekey") || cmd.req.cmd == "reload";
            self.tell_command(&cmd, &r);
            let _ = cmd.reply.send(r);
        }
        // lab_rekey: at a generation boundary, send on the new generation (the peer already
        // accepts it) and keep accepting the one before.
        for line in self.sup.tick(now_unix) {
            big_change = true; // a generation installed (or refused)
            say(&self.monitor, "rekey", false, &line);
        }
        while let Some(acq) = self.shared.acquires.pop() {
            if let Some(line) = self.sup.note_acquire(acq) {
                say(&self.monitor, "acquire", false, &line);
            }
        }
        while let Some(e) = self.shared.events.pop() {
            self.sup.note_expire(&e);
            let (loud, text) = self.sup.describe_event(&e);
            say(&self.monitor, "lifetime", loud, &text);
        }
        big_change
    }

    /// Neighbor entries learned, changed or gone: to the log (debug) and `espada monitor`.
    fn neighbor_changes(&self, l: &mut Loop) {
        let sh = &self.shared;
        let generations = (sh.neighbors.generation(), sh.neighbors6.generation());
        let entries = || {
            sh.neighbors
                .entries()
                .into_iter()
                .map(|(ip, mac, _)| (ip.to_string(), mac.to_string()))
                .chain(
                    sh.neighbors6
                        .entries()
                        .into_iter()
                        .map(|(ip, mac, _)| (ip.to_string(), mac.to_string())),
                )
        };
        for line in l.neighbor_watch.changes(generations, entries) {
            tracing::debug!("{line}");
            self.monitor.publish("neighbor", &line);
        }
    }

    /// A command's outcome, to the log and `espada monitor`: one line per command (one for a
    /// whole batch); the IKE daemon's frequent `sa acquires` polls only at debug level.
    fn tell_command(&self, cmd: &Command, r: &Response) {
        let what = format!("{} {}", cmd.req.cmd, cmd.req.what);
        let what = what.trim();
        let m = &self.monitor;
        let refused =
            |e: &str| format!("reload refused, still running the previous configuration: {e}");
        match (cmd.req.cmd.as_str(), r.ok, &r.error) {
            ("reload", true, _) => say(
                m,
                "reload",
                false,
                &format!(
                    "{} (asked on the control socket)",
                    r.data["reload"].as_str().unwrap_or("reloaded")
                ),
            ),
            ("reload", false, Some(e)) => say(m, "reload-refused", true, &refused(e)),
            _ if cmd.req.what == "acquires" && r.ok => {
                tracing::debug!("control: {what}: {}", r.data)
            }
            ("sa", true, _) if cmd.req.what == "batch" => say(
                m,
                "sa",
                false,
                &format!(
                    "control: sa batch: {} published as snapshot {}",
                    count(
                        r.data["applied"].as_u64().unwrap_or(0) as usize,
                        "change",
                        "changes"
                    ),
                    r.data["snapshot"]
                ),
            ),
            ("sa", true, _) if cmd.req.what == "rekey" => {
                let more = match r.data["pending"].as_u64() {
                    Some(p) if p > 0 => format!(
                        " ({p} of them in {}, one per tick)",
                        count(
                            r.data["slices_to_follow"].as_u64().unwrap_or(0) as usize,
                            "more snapshot",
                            "more snapshots"
                        )
                    ),
                    _ => String::new(),
                };
                say(
                    m,
                    "sa",
                    false,
                    &format!(
                        "control: sa rekey: {} rekeyed in snapshot {}{more}",
                        count(
                            r.data["rekeyed"].as_array().map_or(0, Vec::len),
                            "tunnel",
                            "tunnels"
                        ),
                        self.sup.sadb().generation(),
                    ),
                )
            }
            (_, true, _) => say(m, "sa", false, &format!("control: {what}: {}", r.data)),
            (_, false, Some(e)) => say(
                m,
                "sa-refused",
                true,
                &format!("control: {what} refused: {e}"),
            ),
            _ => {}
        }
    }

    /// Once per interval: the softirq check, the live line on stderr and the JSON record.
    fn interval_report(&self, a: &RunArgs, l: &mut Loop) {
        let dt = l.last.elapsed().as_secs_f64();
        l.last = Instant::now();
        if !a.no_pin {
            l.softirq_watch.tick(dt, &self.monitor);
        }
        let now: Vec<WorkerStats> = self.cells.iter().map(|c| c.read()).collect();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut line = format!("{elapsed:>7.1}s");
        let mut js = Vec::new();
        let ports: Vec<[PortStats; 2]> = self
            .cells
            .iter()
            .map(|c| c.ports.lock().map(|p| *p).unwrap_or_default())
            .collect();
        for (i, (s, p)) in now.iter().zip(l.prev.iter()).enumerate() {
            let (text, record) = core_interval(i, s, p, &ports[i][1], dt);
            line.push_str(&text);
            js.push(record);
        }
        if a.interval > 0.0 {
            eprintln!("{line}");
        }
        if let Some(f) = &mut l.json {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let _ = writeln!(
                f,
                "{}",
                serde_json::json!({"t": elapsed, "unix_time": unix, "interval_s": dt, "gateway": self.c.name, "cores": js})
            );
        }
        l.prev = now;
    }
}

/// One core's part of the live line and its JSON record: rates over the last interval
/// (`espada clear` may have zeroed the counters since: no negative rates), counters since
/// start.
fn core_interval(
    i: usize,
    s: &WorkerStats,
    p: &WorkerStats,
    bp: &PortStats,
    dt: f64,
) -> (String, serde_json::Value) {
    let enc = s.encap_packets.saturating_sub(p.encap_packets) as f64 / dt;
    let dec = s.decap_packets.saturating_sub(p.decap_packets) as f64 / dt;
    let gb = (s.encap_bytes.saturating_sub(p.encap_bytes)
        + s.decap_bytes.saturating_sub(p.decap_bytes)) as f64
        * 8.0
        / dt
        / 1e9;
    let dr = s.drops.total().saturating_sub(p.drops.total());
    let text = format!(
        " | core {i}: enc {:.3} dec {:.3} Mpps {gb:.2} Gbit/s drop {dr}",
        enc / 1e6,
        dec / 1e6,
    );
    let by_reason: std::collections::BTreeMap<&str, u64> =
        s.drops.nonzero().map(|(r, n)| (r.label(), n)).collect();
    let record = serde_json::json!({"core": i, "encap_pps": enc, "decap_pps": dec, "gbps_inner": gb,
        "handoff_out": s.handoff_out, "handoff_in": s.handoff_in, "red_rx": s.red_rx, "black_rx": s.black_rx,
        "encap_packets": s.encap_packets, "decap_packets": s.decap_packets, "encap_bytes": s.encap_bytes, "decap_bytes": s.decap_bytes,
        "to_control": s.to_control, "order_waits": s.order_waits, "black_tx_lost": bp.tx_lost, "black_tx_resets": bp.tx_resets, "black_tx_dropped": bp.tx_dropped, "black_tx_oversize": bp.tx_oversize,
        "drops_total": s.drops.total(), "drops_by_reason": by_reason});
    (text, record)
}
