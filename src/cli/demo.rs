//! `espada demo`: the lab `sunset — west == east — sunrise` in one process. West and east run
//! from `configs/west.toml` and `configs/east.toml` (built in, or given with -c/--peer) over
//! memory ports: one worker per core on each gateway, each with its own per-CPU SA and UDP
//! source port, the black "NIC" steering each SA to its core. Sunset generates traffic, sunrise
//! checks every packet; the table shows per-core throughput and every drop.

use crate::config;
use anyhow::{bail, Context, Result};
use clap::Args;
use espada_benches::report::{self, Report};
use espada_dataplane::port::memory::Steering;
use espada_dataplane::worker::{Side, Side6};
use espada_harness::pair::{GatewaySides, Pair, PairSpec};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const WEST: &str = include_str!("../../configs/west.toml");
const EAST: &str = include_str!("../../configs/east.toml");

#[derive(Args, Clone)]
pub struct DemoArgs {
    /// West configuration (default: configs/west.toml here, else the copy built in).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// East configuration (default: configs/east.toml here, else the copy built in).
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Worker cores per gateway (default: every online core). West worker i and east worker i
    /// share core i.
    #[arg(long)]
    cores: Option<usize>,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Rate windows the run is cut into: the rate at sunrise is reported as their median and
    /// range (a shared machine moves single figures by tens of percent).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    windows: u32,
    /// Inner IP packet size in bytes (64..=9000).
    #[arg(long, default_value_t = 1400)]
    size: usize,
    /// UDP flows per core (distinct source ports on the red side).
    #[arg(long, default_value_t = 16)]
    flows: u16,
    /// Steering on east's black side: `flow` (one rule per per-CPU SA source port, as
    /// `espada pin` installs) or `rss` (hash only: SAs landing on another core are handed off).
    #[arg(long, default_value = "flow", value_parser = ["flow", "rss"])]
    steering: String,
    /// Write the final report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Black link: `memory` (lock-free rings) or `dpdk` (two DPDK ethdevs joined by rte_rings,
    /// EAL without hugepages; needs a build with `--features dpdk`).
    #[arg(long, default_value = "memory", value_parser = ["memory", "dpdk"])]
    port: String,
    /// Extra EAL arguments for `--port dpdk` (default: no hugepages, no PCI).
    #[arg(long, allow_hyphen_values = true)]
    eal: Option<String>,
}

#[cfg(feature = "dpdk")]
fn dpdk_black(workers: usize, eal: &Option<String>) -> Result<espada_harness::pair::BlackQueues> {
    use espada_dataplane::port::dpdk::{
        eal_init, main_lcore_args, DpdkPort, MbufPool, NO_HUGE_ARGS,
    };
    use espada_dataplane::port::PortQueue;
    let mut args: Vec<String> = match eal {
        Some(e) => e.split_whitespace().map(str::to_string).collect(),
        None => NO_HUGE_ARGS.iter().map(|s| s.to_string()).collect(),
    };
    if !args.iter().any(|a| a == "-l" || a.starts_with("--lcores")) {
        // The main lcore floats over every CPU: the demo pins its own threads.
        let online: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .iter()
            .map(|c| c.id)
            .collect();
        args.extend(main_lcore_args(&online, &[]));
    }
    eal_init(&args).map_err(|e| anyhow::anyhow!(e))?;
    let pool = std::sync::Arc::new(
        MbufPool::new(
            "espada_demo",
            (workers as u32 * 8192).max(8191),
            2048 + 128,
            0,
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    );
    let (mut a, b) =
        DpdkPort::ring_pair("black", workers as u16, pool).map_err(|e| anyhow::anyhow!(e))?;
    if let Err(e) = a.steer_udp_source_port(4501, 4500, 0) {
        println!("dpdk: the ring PMD refuses rte_flow rules ({e}); each ring queue already carries one worker's SA");
    }
    let wq: Vec<Box<dyn PortQueue>> = (0..workers)
        .map(|q| Box::new(a.queue(q as u16)) as Box<dyn PortQueue>)
        .collect();
    let eq: Vec<Box<dyn PortQueue>> = (0..workers)
        .map(|q| Box::new(b.queue(q as u16)) as Box<dyn PortQueue>)
        .collect();
    // The ports must outlive the workers: they are stopped at process exit.
    std::mem::forget(a);
    std::mem::forget(b);
    Ok((wq, eq))
}

#[cfg(not(feature = "dpdk"))]
fn dpdk_black(_workers: usize, _eal: &Option<String>) -> Result<espada_harness::pair::BlackQueues> {
    bail!("this espada was built without DPDK: cargo build --release --features dpdk (needs libdpdk-dev)")
}

/// The given file; else `configs/NAME.toml` of the working directory when there is one (what a
/// user edits); else the copy built into the binary, and the demo says which it used.
fn load(path: &Option<PathBuf>, builtin: &str, name: &str) -> Result<config::Config> {
    let on_disk = PathBuf::from(format!("configs/{name}.toml"));
    let r = match path {
        Some(p) => config::load(p),
        None if on_disk.is_file() => {
            eprintln!("espada demo: {name} from {}", on_disk.display());
            config::load(&on_disk)
        }
        None => {
            eprintln!("espada demo: {name} from the configuration built into this binary (no configs/{name}.toml here)");
            config::parse(
                Path::new(&format!("(built-in) configs/{name}.toml")),
                builtin,
            )
        }
    };
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn sides(c: &config::Config) -> Result<GatewaySides> {
    let side = |p: &Option<config::PortConfig>, what: &str| -> Result<Side> {
        let p = p
            .as_ref()
            .with_context(|| format!("{}: the [{what}] section is needed", c.file.display()))?;
        let (IpAddr::V4(ip), gateway) = (p.address, p.gateway) else {
            bail!("{}: [{what}] address must be IPv4; give the side's IPv6 address as address6 (dual stack)", c.file.display())
        };
        let gateway = match gateway {
            Some(IpAddr::V4(g)) => Some(g),
            Some(IpAddr::V6(_)) => bail!("{}: [{what}] gateway must be IPv4", c.file.display()),
            None => None,
        };
        Ok(Side {
            ip,
            prefix: p.prefix,
            mtu: p.mtu,
            gateway,
            v6: p.address6.map(|(ip, prefix)| Side6 {
                ip,
                prefix,
                gateway: p.gateway6,
            }),
        })
    };
    Ok(GatewaySides {
        red: side(&c.red, "red")?,
        black: side(&c.black, "black")?,
    })
}

/// Sunrise's rate in `n` equal windows of the run, from (seconds, packets, bytes) samples: the
/// median and range in Mpps and inner Gbit/s.
fn window_rates(samples: &[(f64, u64, u64)], total: f64, n: u32) -> Option<String> {
    let w = total / n as f64;
    let at = |t: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
            .copied()
    };
    let mut mpps = Vec::new();
    let mut gbps = Vec::new();
    for k in 0..n {
        let (a, b) = (at(k as f64 * w)?, at((k + 1) as f64 * w)?);
        let dt = b.0 - a.0;
        if dt <= 0.0 {
            continue;
        }
        mpps.push((b.1 - a.1) as f64 / dt / 1e6);
        gbps.push((b.2 - a.2) as f64 * 8.0 / dt / 1e9);
    }
    if mpps.is_empty() {
        return None;
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (m, lo, hi) = stats(&mut mpps);
    let (g, glo, ghi) = stats(&mut gbps);
    Some(format!(
        "sunrise received {m:.3} Mpps, {g:.2} Gbit/s inner: median of {} of {w:.1} s (range {lo:.3}–{hi:.3} Mpps, {glo:.2}–{ghi:.2} Gbit/s)",
        espada_control::supervisor::count(mpps.len(), "window", "windows")
    ))
}

pub fn run(a: DemoArgs) -> Result<ExitCode> {
    if let Some(j) = &a.json {
        espada_benches::report::check_writable(j)?;
    }
    let west = load(&a.config, WEST, "west")?;
    let east = load(&a.peer, EAST, "east")?;
    let mm = west.mirror_mismatches(&east);
    if !mm.is_empty() {
        bail!(
            "the two configurations do not mirror each other:\n  {}",
            mm.join("\n  ")
        );
    }
    if !(64..=9000).contains(&a.size) {
        bail!("--size must be between 64 and 9000 bytes, got {}", a.size);
    }
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    let workers = a.cores.unwrap_or(ids.len().max(1));
    if workers == 0 || workers > 1024 {
        bail!("--cores must be between 1 and 1024");
    }
    let t = &west.tunnels[0];
    let steering = match a.steering.as_str() {
        "flow" => Steering::UdpSrcPort { base: t.base_port },
        "rss" => Steering::Rss,
        s => bail!("--steering must be flow or rss, got {s}"),
    };
    let spec = PairSpec {
        workers,
        size: a.size,
        flows: a.flows.max(1),
        limit: None,
        steering,
        ring_depth: 4096,
        ..Default::default()
    };
    let black = match a.port.as_str() {
        "memory" => None,
        "dpdk" => Some(dpdk_black(workers, &a.eal)?),
        p => bail!("--port must be memory or dpdk, got {p}"),
    };
    let mut pair = Pair::with_black(
        west.sadb(workers)?,
        east.sadb(workers)?,
        sides(&west)?,
        sides(&east)?,
        spec,
        black,
    )?;
    println!(
        "espada demo: sunset -> west == east -> sunrise in one process, over {} (no NIC, no kernel: what is measured is espada's per-packet work); {}, each running west worker i and east worker i; \
         sa_mode {}, {} + fallback, {} via {}, {} B inner packets, {:.1} s in {}",
        if a.port == "dpdk" { "DPDK ethdevs joined by rte_rings" } else { "in-memory rings between the gateways' ports" },
        espada_control::supervisor::count(workers, "core", "cores"),
        west.sa_mode.name(), espada_control::supervisor::count(t.pcpu, "per-CPU SA", "per-CPU SAs"), t.cipher, west.backend_report(), a.size, a.duration,
        espada_control::supervisor::count(a.windows as usize, "window", "windows")
    );
    let pins: Vec<_> = (0..workers).map(|i| ids.get(i).copied()).collect();
    super::catch_ctrl_c();
    // Sunrise's counters every 100 ms, for the rate per window.
    let rx = pair.received.clone();
    let mut samples: Vec<(f64, u64, u64)> = vec![(0.0, rx.packets(), rx.bytes())];
    let elapsed = pair.run_with(
        Duration::from_secs_f64(a.duration),
        &pins,
        espada_harness::pair::Layout::Shared,
        |t| samples.push((t.as_secs_f64(), rx.packets(), rx.bytes())),
    );
    samples.push((elapsed.as_secs_f64(), rx.packets(), rx.bytes()));
    if let Some(line) = window_rates(&samples, elapsed.as_secs_f64(), a.windows) {
        println!("{line}");
    }
    if espada_harness::pair::interrupted() {
        println!(
            "interrupted after {:.1} s (Ctrl-C): what was measured until then",
            elapsed.as_secs_f64()
        );
    }
    pair.drain();
    let rep = Report::from_pair(&pair, elapsed, a.size);
    print!("{}", report::table(&rep));
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&rep)? + "\n")
            .with_context(|| format!("cannot write {}", j.display()))?;
        println!("report written to {}", j.display());
    }
    let sent = pair.sent.packets();
    let got = pair.received.packets();
    let bad = pair.received.bad();
    let dropped = rep
        .west
        .iter()
        .chain(rep.east.iter())
        .map(|c| c.drops_total)
        .sum::<u64>();
    println!("sunset sent {sent}, sunrise received {got} intact ({bad} damaged), {dropped} dropped by the gateways, {} left in rings", pair.link.in_flight());
    if bad > 0 || got + dropped + pair.link.in_flight() as u64 != sent || got == 0 {
        println!("FAILED: packets are unaccounted for or damaged");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rates_report_the_median_and_range() {
        // 3 s at 1, 2 and 3 Mpps of 100-byte packets.
        let s = [
            (0.0, 0, 0),
            (1.0, 1_000_000, 100_000_000),
            (2.0, 3_000_000, 300_000_000),
            (3.0, 6_000_000, 600_000_000),
        ];
        let line = window_rates(&s, 3.0, 3).unwrap();
        assert!(
            line.starts_with("sunrise received 2.000 Mpps, 1.60 Gbit/s inner: median of 3 windows of 1.0 s (range 1.000–3.000 Mpps"),
            "{line}"
        );
    }
}
