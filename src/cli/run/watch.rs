//! Run-time checks beside the control loop: the kernel's receive work (softirq) kept off
//! the worker cores, and systemd's watchdog fed while every worker polls.

use super::{refuse, RunArgs};
use anyhow::Result;
use espada_dataplane::worker::StatsCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Issue 28: refuses to start (an exit code) when the kernel's receive work for the gateway's
/// interfaces would run on a worker's core: with kernel ports (AF_PACKET, AF_XDP) a frame is
/// first received in the softirq of the CPU its queue's interrupt or RPS mask names, and on a
/// worker's core that softirq takes the core from the poll loop under load (a receive
/// livelock). `--allow-softirq-on-workers` starts anyway, with a warning per finding.
pub(super) fn softirq_placement(
    a: &RunArgs,
    red_if: &str,
    black_if: &str,
    workers: &[usize],
) -> Result<()> {
    if a.port == "dpdk" || a.no_pin {
        return Ok(());
    }
    let on = espada_pinning::softirq::on_workers(
        std::path::Path::new("/"),
        &[red_if, black_if],
        workers,
    );
    if !on.is_empty() && !a.allow_softirq_on_workers {
        return Err(refuse(format!(
            "the kernel's receive work for this gateway's interfaces would run on its worker cores ({}): {}. Under overload that softirq starves the workers (a receive livelock). Move the interrupts and RPS masks to other cores (`espada pin apply -c FILE` does), give the workers other cores (`[gateway] cores`), or start with --allow-softirq-on-workers",
            espada_pinning::format_cpu_list(workers),
            on.join("; ")
        )));
    }
    for line in &on {
        tracing::warn!("{line} (--allow-softirq-on-workers)");
    }
    Ok(())
}

/// Issue 28, at run time: a worker core that spends its time in the kernel's softirq
/// (interrupts or RPS moved onto it after start, another device's traffic) is said once,
/// loudly, in the log and to `espada monitor`; again only after it cooled down.
pub(super) struct SoftirqWatch {
    meter: espada_pinning::softirq::SoftirqMeter,
    warned: std::collections::BTreeSet<usize>,
    cpus: Vec<usize>,
}

impl SoftirqWatch {
    pub fn new(cpus: Vec<usize>) -> SoftirqWatch {
        SoftirqWatch {
            meter: Default::default(),
            warned: Default::default(),
            cpus,
        }
    }

    pub fn tick(&mut self, dt: f64, monitor: &espada_control::monitor::Monitor) {
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
pub(super) fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Feeds systemd's watchdog while every worker polls.
pub(super) struct Watchdog {
    pub every: Duration,
    pub last: Instant,
    pub beats: Vec<u64>,
    pub starved: bool,
}

impl Watchdog {
    pub fn tick(&mut self, cells: &[Arc<StatsCell>]) {
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
