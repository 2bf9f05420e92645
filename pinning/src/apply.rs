//! Applying a plan, and checking a host against it. File writes go under the root (a fake tree
//! in tests); commands go through [`Runner`] so tests record them instead of running ethtool.

use crate::plan::Plan;
use crate::{format_cpu_list, parse_cpu_list};
use std::path::Path;

/// Runs external commands (ethtool, systemctl).
pub trait Runner {
    /// Runs `argv`; returns stdout, or an error message.
    fn run(&mut self, argv: &[String]) -> Result<String, String>;
}

/// Runs commands for real.
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&mut self, argv: &[String]) -> Result<String, String> {
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| format!("{}: {e}", argv[0]))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

/// What applying did, step by step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Steps done.
    pub done: Vec<String>,
    /// Steps already in place (idempotence).
    pub unchanged: Vec<String>,
    /// Steps refused, with the reason.
    pub refused: Vec<String>,
}

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Applies the plan: IRQ affinities (skipped when already set), RSS hash fields, ntuple and flow
/// rules (existing identical rules are left alone), irqbalance stopped.
pub fn apply(p: &Plan, root: &Path, run: &mut dyn Runner) -> ApplyReport {
    let mut r = ApplyReport::default();
    if p.stop_irqbalance {
        match run.run(&argv("systemctl stop irqbalance")) {
            Ok(_) => r.done.push("stopped irqbalance".into()),
            Err(e) => r.refused.push(format!("could not stop irqbalance: {e}")),
        }
    }
    for i in &p.irqs {
        let f = root.join(format!("proc/irq/{}/smp_affinity_list", i.irq));
        let want = i.core.to_string();
        let cur = std::fs::read_to_string(&f)
            .ok()
            .and_then(|s| parse_cpu_list(s.trim()).ok());
        if cur.as_deref() == Some(&[i.core][..]) {
            r.unchanged
                .push(format!("irq {} already on core {}", i.irq, i.core));
            continue;
        }
        match std::fs::write(&f, &want) {
            Ok(()) => r.done.push(format!(
                "irq {} ({} queue {}) -> core {} (was {})",
                i.irq,
                i.nic,
                i.queue,
                i.core,
                cur.map(|c| format_cpu_list(&c))
                    .unwrap_or_else(|| "?".into())
            )),
            Err(e) => r
                .refused
                .push(format!("irq {}: cannot write {}: {e}", i.irq, f.display())),
        }
    }
    for nic in &p.rss {
        let cmd = format!("ethtool -N {nic} rx-flow-hash udp4 sdfn");
        match run.run(&argv(&cmd)) {
            Ok(_) => r.done.push(cmd),
            Err(e) => r.refused.push(format!("{cmd}: {e}")),
        }
    }
    for (nic, w) in &p.rss_equal {
        let cmd = format!("ethtool -X {nic} equal {w}");
        match run.run(&argv(&cmd)) {
            Ok(_) => r.done.push(cmd),
            Err(e) => r.refused.push(format!("{cmd}: {e}")),
        }
    }
    if !p.flow_rules.is_empty() {
        let black = &p.needs.black;
        let features = run
            .run(&argv(&format!("ethtool -k {black}")))
            .unwrap_or_default();
        if features.contains("ntuple-filters: off [fixed]") {
            r.refused.push(format!("{black} has no ntuple filter support: flow rules impossible; espada hands packets to the owning core in software"));
            return r;
        }
        if let Err(e) = run.run(&argv(&format!("ethtool -K {black} ntuple on"))) {
            r.refused.push(format!("ethtool -K {black} ntuple on: {e}"));
            return r;
        }
        let existing = run
            .run(&argv(&format!("ethtool -n {black}")))
            .unwrap_or_default();
        for fr in &p.flow_rules {
            if has_rule(&existing, fr.src_port, fr.dst_port, fr.queue) {
                r.unchanged.push(format!(
                    "flow rule src-port {} -> queue {} already present",
                    fr.src_port, fr.queue
                ));
                continue;
            }
            let cmd = format!(
                "ethtool -N {} flow-type udp4 src-port {} dst-port {} action {}",
                fr.nic, fr.src_port, fr.dst_port, fr.queue
            );
            match run.run(&argv(&cmd)) {
                Ok(_) => r.done.push(cmd),
                Err(e) => r.refused.push(format!("{cmd}: {e}")),
            }
        }
    }
    r
}

/// Whether `ethtool -n` output already has a UDP4 rule for these ports and queue.
fn has_rule(ethtool_n: &str, sport: u16, dport: u16, queue: usize) -> bool {
    ethtool_n.split("Filter:").skip(1).any(|f| {
        f.contains("UDP over IPv4")
            && f.contains(&format!("Src port: {sport} "))
            && f.contains(&format!("Dest port: {dport} "))
            && f.contains(&format!("Action: Direct to queue {queue}"))
    })
}

/// One finding of `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `ok`, `warn` or `bad`.
    pub level: &'static str,
    /// What.
    pub what: String,
}

/// Compares the host with the plan and reports the lab's checks: irqbalance stopped, workers
/// isolated, IRQ affinities, pause frames, NIC drops and misses, softnet drops.
pub fn check(
    p: &Plan,
    t: &crate::topology::Topology,
    root: &Path,
    run: &mut dyn Runner,
) -> Vec<Finding> {
    let mut f = Vec::new();
    let mut add = |level, what: String| f.push(Finding { level, what });
    if t.irqbalance_running {
        add(
            "bad",
            "irqbalance is running: it will move the queue IRQs".into(),
        );
    } else {
        add("ok", "irqbalance is not running".into());
    }
    let not_iso: Vec<usize> = p
        .worker_cores
        .iter()
        .copied()
        .filter(|c| !t.isolated.contains(c))
        .collect();
    if not_iso.is_empty() {
        add(
            "ok",
            format!(
                "worker cores {} are isolated",
                format_cpu_list(&p.worker_cores)
            ),
        );
    } else {
        add(
            "warn",
            format!(
                "worker cores {} are not in isolcpus: the scheduler may run other tasks there",
                format_cpu_list(&not_iso)
            ),
        );
    }
    for i in &p.irqs {
        let cur =
            std::fs::read_to_string(root.join(format!("proc/irq/{}/smp_affinity_list", i.irq)))
                .ok()
                .and_then(|s| parse_cpu_list(s.trim()).ok());
        match cur {
            Some(c) if c == [i.core] => add(
                "ok",
                format!("irq {} ({} q{}) on core {}", i.irq, i.nic, i.queue, i.core),
            ),
            Some(c) => add(
                "bad",
                format!(
                    "irq {} ({} q{}) on cores {}, plan says {}",
                    i.irq,
                    i.nic,
                    i.queue,
                    format_cpu_list(&c),
                    i.core
                ),
            ),
            None => add("warn", format!("irq {}: affinity unreadable", i.irq)),
        }
    }
    for (level, what) in softirq_findings(p, t, root) {
        add(level, what);
    }
    for nic in [&p.needs.red, &p.needs.black] {
        if !t.nics.contains_key(nic) {
            add("warn", format!("{nic}: not present on this host"));
            continue;
        }
        match run.run(&argv(&format!("ethtool -a {nic}"))) {
            Ok(o) => {
                let on = o
                    .lines()
                    .any(|l| (l.starts_with("RX:") || l.starts_with("TX:")) && l.contains("on"));
                add(
                    if on { "warn" } else { "ok" },
                    format!(
                        "{nic}: pause frames {}",
                        if on {
                            "enabled (a slow peer can stall the NIC)"
                        } else {
                            "off"
                        }
                    ),
                );
            }
            Err(e) => add("warn", format!("{nic}: pause settings unknown ({e})")),
        }
        if let Ok(o) = run.run(&argv(&format!("ethtool -S {nic}"))) {
            let bad: Vec<String> = o
                .lines()
                .filter_map(|l| l.trim().split_once(':'))
                .filter(|(k, v)| {
                    (k.contains("drop")
                        || k.contains("miss")
                        || k.contains("discard")
                        || k.contains("out_of_buffer")
                        || k.contains("no_buf"))
                        && v.trim().parse::<u64>().is_ok_and(|n| n > 0)
                })
                .map(|(k, v)| format!("{}={}", k.trim(), v.trim()))
                .collect();
            if bad.is_empty() {
                add("ok", format!("{nic}: no drops or misses in ethtool -S"));
            } else {
                add("bad", format!("{nic}: {}", bad.join(", ")));
            }
        }
    }
    if let Ok(s) = std::fs::read_to_string(root.join("proc/net/softnet_stat")) {
        let drops: Vec<(usize, u64)> = s
            .lines()
            .enumerate()
            .filter_map(|(cpu, l)| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|d| u64::from_str_radix(d, 16).ok())
                    .filter(|d| *d > 0)
                    .map(|d| (cpu, d))
            })
            .collect();
        if drops.is_empty() {
            add("ok", "softnet: no drops".into());
        } else {
            add(
                "bad",
                format!(
                    "softnet drops: {}",
                    drops
                        .iter()
                        .map(|(c, d)| format!("cpu{c}={d}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    f
}

/// Issue 28: no queue interrupt or RPS mask may bring the kernel's receive work onto a worker's
/// core (a receive livelock under overload).
fn softirq_findings(
    p: &Plan,
    t: &crate::topology::Topology,
    root: &Path,
) -> Vec<(&'static str, String)> {
    let nics: Vec<&str> = [&p.needs.red, &p.needs.black]
        .into_iter()
        .filter(|n| t.nics.contains_key(*n))
        .map(String::as_str)
        .collect();
    let on = crate::softirq::on_workers(root, &nics, &p.worker_cores);
    if on.is_empty() {
        return vec![(
            "ok",
            format!(
                "no interrupt or RPS mask of {} reaches a worker core",
                nics.join(", ")
            ),
        )];
    }
    on.into_iter().map(|l| ("bad", l)).collect()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn ethtool_rule_matching() {
        let out = "4 RX rings available\nTotal 1 rules\n\nFilter: 1023\n\tRule Type: UDP over IPv4\n\tSrc IP addr: 0.0.0.0 mask: 255.255.255.255\n\tDest IP addr: 0.0.0.0 mask: 255.255.255.255\n\tTOS: 0x0 mask: 0xff\n\tSrc port: 4501 mask: 0x0\n\tDest port: 4500 mask: 0x0\n\tAction: Direct to queue 1\n";
        assert!(has_rule(out, 4501, 4500, 1));
        assert!(!has_rule(out, 4501, 4500, 2));
        assert!(!has_rule(out, 4502, 4500, 1));
    }
}
