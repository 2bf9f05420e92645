//! `espada bench`: the lab's TRex setup in one process. Sunset generates, west encrypts, east
//! decrypts, sunrise checks; per core and in total: Mpps, Gbit/s (inner IP bytes), drops by
//! reason, ns and cycles per packet, one-way latency percentiles; and, in the same run, the raw
//! AES-GCM seal/open speed of the backend on one core at the same size (the ceiling).
//! Sweeps over cores or flows for per-CPU, shared-SA and plain-forwarding modes write a
//! Markdown table, CSV, JSON and a plot (SVG and PNG).

use anyhow::{bail, Context, Result};
use clap::Args;
use espada_benches::harness::{
    ceiling, csv, fold_rounds, one, one_core, one_core_table, plot, table, BenchResult, Ceiling,
    Load, Run,
};
use espada_crypto::{Algorithm, Backend};
use espada_harness::pair::Layout;
use espada_harness::solo;
use espada_sadb::db::SaMode;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Inner IP packet size in bytes (64..=9000).
    #[arg(long, default_value_t = 1400)]
    size: usize,
    /// IMIX instead of one size: 64, 594 and 1518 bytes at 7:4:1.
    #[arg(long)]
    imix: bool,
    /// UDP flows per generator queue.
    #[arg(long, default_value_t = 16)]
    flows: u16,
    /// Offered packets per second per core (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Worker cores per gateway.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Thread layout: `split` (west and east on different cores: per-direction figures),
    /// `shared` (west worker i and east worker i share core i), `auto` (split when there are
    /// enough cores), or `one-core`: one direction on one core with nothing crossing cores
    /// (stored frames replayed → encrypt → null port, or stored ESP frames replayed → decrypt), the
    /// shape DPDK ipsec-secgw's single lcore measures. Decrypted packets go to a null port that
    /// frees them, as ipsec-secgw's `net_null` does (the tests check them). Decrypt runs with anti-replay off, as
    /// ipsec-secgw does by default.
    #[arg(long, default_value = "auto", value_parser = ["auto", "split", "shared", "one-core"])]
    layout: String,
    /// With `--layout one-core`: `encrypt`, `decrypt` or `both`.
    #[arg(long, default_value = "both", value_parser = ["encrypt", "decrypt", "both"])]
    direction: String,
    /// `pcpu` (one SA per core, RFC 9611) or `shared` (one SA for all cores, like one kernel SA).
    #[arg(long, default_value = "pcpu", value_parser = ["pcpu", "shared"])]
    sa_mode: String,
    /// `ipsec`, or `loop` (plain forwarding through both gateways, no ESP: the baseline).
    #[arg(long, default_value = "ipsec", value_parser = ["ipsec", "loop"])]
    mode: String,
    /// Crypto backend: auto (the fastest, measured first), ring, aes-gcm, aws-lc, ipsec-mb (if
    /// built), or `all` (one run per backend, side by side).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Cipher: aes-gcm-128 or aes-gcm-256.
    #[arg(long, default_value = "aes-gcm-128", value_parser = ["aes-gcm-128", "aes-gcm-256"])]
    cipher: String,
    /// Tunnels in both gateways' SPDs (1..=16384; 0: the lab's one tunnel). Tunnel k joins
    /// 10.64.0.0/24 + k·256 and 10.128.0.0/24 + k·256 with its own SAs, its policy k-th in
    /// the SPD; packet i goes to tunnel i mod N (see --tunnel-last).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16384))]
    tunnels: u32,
    /// With --tunnels: every packet to the last tunnel, whose policy is the SPD's last.
    #[arg(long)]
    tunnel_last: bool,
    /// Sweep `cores` (1..=--max-cores) or `flows` (1, 2, 4, 16, 64, 256) for pcpu, shared and
    /// loop modes, or `tunnels` (1, 100, 1000, 10000 tunnels, --cores workers, traffic spread
    /// over every tunnel and all to the last policy, each point ÷ 1 tunnel), writing table,
    /// CSV, JSON and plots to --out.
    #[arg(long, value_parser = ["cores", "flows", "tunnels"])]
    sweep: Option<String>,
    /// Largest core count of a cores sweep (default: every online core, shared layout).
    #[arg(long)]
    max_cores: Option<usize>,
    /// Measure every point this many times, interleaved (1, 2, 1, 2, ... with the order
    /// reversed every other round so drift cancels), and report the median, the range and,
    /// in a sweep, each point ÷ the first point as a per-round ratio. On a shared or noisy
    /// machine use 5 or more.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Output directory of a sweep (default: a new directory per run,
    /// `~/.local/state/espada/bench-DATE-TIME`, or under $XDG_STATE_HOME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl BenchArgs {
    fn load(&self) -> Load {
        Load {
            size: self.size,
            imix: self.imix,
            flows: self.flows,
            rate: self.rate,
            duration: self.duration,
            quiet: self.quiet,
        }
    }
}

pub fn run(mut a: BenchArgs) -> Result<ExitCode> {
    let out = a.out.take().unwrap_or_else(|| super::results_dir("bench"));
    if !a.imix && !(64..=9000).contains(&a.size) {
        bail!("--size must be between 64 and 9000 bytes, got {}", a.size);
    }
    let alg = Algorithm::from_name(&a.cipher)
        .with_context(|| format!("unknown cipher `{}` (aes-gcm-128 or aes-gcm-256)", a.cipher))?;
    let compare_all = a.backend == "all";
    let backend = choose_backend(&a, alg)?;
    let online = core_affinity::get_core_ids()
        .map(|v| v.len())
        .unwrap_or(1)
        .max(1);
    let sa_mode = match a.sa_mode.as_str() {
        "pcpu" => SaMode::PerCpu,
        "shared" => SaMode::Shared,
        s => bail!("--sa-mode must be pcpu or shared, got {s}"),
    };
    if !["ipsec", "loop"].contains(&a.mode.as_str()) {
        bail!("--mode must be ipsec or loop, got {}", a.mode);
    }
    let dirs: Vec<solo::Direction> = match a.direction.as_str() {
        "encrypt" => vec![solo::Direction::Encrypt],
        "decrypt" => vec![solo::Direction::Decrypt],
        "both" => vec![solo::Direction::Encrypt, solo::Direction::Decrypt],
        d => bail!("--direction must be encrypt, decrypt or both, got {d}"),
    };
    if a.layout == "one-core"
        && (a.sweep.is_some() || a.mode != "ipsec" || compare_all || a.rounds > 1)
    {
        bail!("--layout one-core measures one ipsec run: no --sweep, --rounds, --mode loop or --backend all (benches/peers/secgw.sh interleaves runs of it)");
    }
    // Where the results go must be writable before anything is measured.
    if let Some(j) = &a.json {
        espada_benches::report::check_writable(j)?;
    }
    if a.sweep.is_some() {
        espada_benches::report::check_dir_writable(&out)?;
    }
    let size_for_ceiling = if a.imix { 594 } else { a.size };
    eprintln!(
        "espada bench: measuring the raw {} {} ceiling on one core at {} B...",
        backend, alg, size_for_ceiling
    );
    let ceil = ceiling(backend, alg, size_for_ceiling)?;
    eprintln!(
        "  seal {:.0} ns ({:.1} Gbit/s), open {:.0} ns ({:.1} Gbit/s)",
        ceil.seal_ns, ceil.seal_gbps, ceil.open_ns, ceil.open_gbps
    );
    if a.layout == "one-core" {
        let out = one_core(&a.load(), &dirs, backend, alg, &ceil)?;
        print!("{}", one_core_table(&out));
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&out)?)
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (plan, base) = points(&a, sa_mode, backend, alg, &ceil, online, compare_all)?;
    let rounds = a.rounds.max(1) as usize;
    let mut measured: Vec<Vec<BenchResult>> = Vec::with_capacity(rounds);
    super::catch_ctrl_c();
    let stopped = espada_harness::pair::interrupted;
    for round in 0..rounds {
        if stopped() {
            break;
        }
        if rounds > 1 {
            eprintln!("espada bench: round {}/{rounds}", round + 1);
        }
        let mut got: Vec<Option<BenchResult>> = vec![None; plan.len()];
        // Every other round runs the points backwards: a machine that speeds up or slows down
        // during the run favors no point.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..plan.len()).collect()
        } else {
            (0..plan.len()).rev().collect()
        };
        for i in order {
            if stopped() {
                break;
            }
            let (r, b, c) = &plan[i];
            got[i] = Some(one(&a.load(), r, *b, alg, Some(c))?);
        }
        // A round cut short by Ctrl-C is left out (its points would not compare), unless the
        // point that was running was the round's last (a single run: what it measured).
        if got.iter().all(Option::is_some) {
            measured.push(got.into_iter().flatten().collect());
        }
    }
    if stopped() {
        eprintln!(
            "espada bench: interrupted (Ctrl-C): {} of {rounds} measured",
            espada_control::supervisor::count(measured.len(), "whole round", "whole rounds")
        );
        if measured.is_empty() {
            eprintln!("nothing to report: no round was measured whole");
            return Ok(ExitCode::from(130));
        }
    }
    let results = fold_rounds(&measured, |i| base[i]);
    let t = table(&results);
    print!("{t}");
    print_ratios(a.sweep.as_deref(), &results);
    println!("Gbit/s count inner IP bytes; encap/seal and decap/open compare one core's ESP rate with the raw AEAD rate of the same backend measured in this run.");
    if let Some(r) = results.first() {
        if let Some(l) = r.latency_us_p50_p90_p99_p999_max {
            println!("one-way latency (sampled 1/64, generator to sink, first run): p50 {:.1} µs, p90 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1}", l[0], l[1], l[2], l[3], l[4]);
        }
        if !r.drops.is_empty() {
            println!("drops (first run): {:?}", r.drops);
        }
    }
    if let Some(kind) = a.sweep.as_deref() {
        write_sweep(&a, kind, &out, &t, &results, alg, backend, online)?;
    }
    if let Some(j) = &a.json {
        let v = if results.len() == 1 {
            serde_json::to_value(&results[0])?
        } else {
            serde_json::to_value(&results)?
        };
        std::fs::write(j, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("cannot write {}", j.display()))?;
        println!("wrote {}", j.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The backend `--backend` names (`auto`: the fastest measured now; `all`: ring first, each
/// then measured in turn).
fn choose_backend(a: &BenchArgs, alg: Algorithm) -> Result<Backend> {
    Ok(if a.backend == "all" {
        Backend::Ring
    } else if a.backend == "auto" {
        let (b, figs) = Backend::fastest(
            alg,
            if a.imix { 594 } else { a.size },
            Duration::from_millis(20),
        );
        eprintln!(
            "espada bench: crypto auto -> {b} ({})",
            figs.iter()
                .map(|(b, ns)| format!("{b} {ns:.0} ns/seal"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        b
    } else {
        Backend::from_name(&a.backend)
            .filter(|b| Backend::available().contains(b))
            .with_context(|| {
                format!(
                    "crypto backend `{}` is not available (built: {})",
                    a.backend,
                    Backend::available()
                        .iter()
                        .map(|b| b.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?
    })
}

/// A sweep's ratios to its first point, one line each.
fn print_ratios(sweep: Option<&str>, results: &[BenchResult]) {
    if sweep == Some("tunnels") {
        for r in results.iter().filter(|r| r.tunnels > 1) {
            if let Some(v) = r.vs_first {
                println!(
                    "{} tunnels, traffic {} ÷ 1 tunnel: {:.2}× (median of {} interleaved round{}; {:.2}–{:.2})",
                    r.tunnels,
                    if r.traffic == "last" { "all to the last policy" } else { "spread over every tunnel" },
                    v.median,
                    r.rounds_mpps.len(),
                    if r.rounds_mpps.len() == 1 { "" } else { "s" },
                    v.min,
                    v.max
                );
            }
        }
    }
    if sweep == Some("cores") {
        for r in results.iter().filter(|r| r.cores > 1) {
            if let Some(v) = r.vs_first {
                println!(
                    "{} {}, {} cores ÷ 1 core: {:.2}× (median of {} interleaved round{}; {:.2}–{:.2})",
                    r.mode,
                    r.sa_mode,
                    r.cores,
                    v.median,
                    r.rounds_mpps.len(),
                    if r.rounds_mpps.len() == 1 { "" } else { "s" },
                    v.min,
                    v.max
                );
            }
        }
    }
}

/// A sweep's files: the table (Markdown), CSV, JSON and the plot (SVG, PNG).
#[allow(clippy::too_many_arguments)]
fn write_sweep(
    a: &BenchArgs,
    kind: &str,
    out: &std::path::Path,
    t: &str,
    results: &[BenchResult],
    alg: Algorithm,
    backend: Backend,
    online: usize,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let base = out.join(format!("sweep-{kind}"));
    std::fs::write(base.with_extension("md"), t)?;
    std::fs::write(base.with_extension("csv"), csv(results))?;
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    let (xf, xl): (fn(&BenchResult) -> f64, &str) = match kind {
        "cores" => (|r| r.cores as f64, "worker cores per gateway"),
        "tunnels" => (|r| r.tunnels as f64, "tunnels (SPD policies)"),
        _ => (|r| r.flows as f64, "flows per core"),
    };
    let title = format!(
        "espada {} B, {} via {}: throughput vs {kind}",
        if a.imix {
            "IMIX".to_string()
        } else {
            a.size.to_string()
        },
        alg,
        backend
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let caption = format!(
        "espada bench --sweep {kind}: in-process west/east pair over memory ports, {} round{}, {} backend · host {host}, {online} CPUs · {} · espada {} (git {})",
        a.rounds,
        if a.rounds == 1 { "" } else { "s" },
        backend,
        chrono::Local::now().format("%Y-%m-%d %H:%M"),
        env!("CARGO_PKG_VERSION"),
        option_env!("ESPADA_GIT_HASH").unwrap_or("unknown"),
    );
    let spec = espada_benches::harness::PlotSpec {
        x_of: xf,
        x_label: xl,
        title: &title,
        caption: &caption,
        cores: kind == "cores",
        log_x: kind != "cores",
    };
    plot(results, &spec, &base)?;
    println!("wrote {}.{{md,csv,json,svg,png}}", base.display());
    Ok(())
}

/// How `--layout` places `cores` workers per gateway on `online` CPUs.
fn layout_for(layout: &str, cores: usize, online: usize) -> Result<Layout> {
    Ok(match layout {
        "split" => Layout::Split,
        "shared" => Layout::Shared,
        "auto" => {
            if cores * 2 <= online {
                Layout::Split
            } else {
                Layout::Shared
            }
        }
        s => bail!("--layout must be auto, split, shared or one-core, got {s}"),
    })
}

/// What a run measures: the points (each with its backend and that backend's ceiling) and, for
/// each, the point it is compared with (a sweep's first point of the same mode).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn points(
    a: &BenchArgs,
    sa_mode: SaMode,
    backend: Backend,
    alg: Algorithm,
    ceil: &Ceiling,
    online: usize,
    compare_all: bool,
) -> Result<(Vec<(Run, Backend, Ceiling)>, Vec<Option<usize>>)> {
    // The points to measure, each with its backend and that backend's ceiling, and the point
    // each is compared with (a sweep's first point of the same mode).
    let mut plan: Vec<(Run, Backend, Ceiling)> = Vec::new();
    let mut base: Vec<Option<usize>> = Vec::new();
    match a.sweep.as_deref() {
        None => {
            let r = Run {
                mode: a.mode.clone(),
                sa_mode,
                cores: a.cores.max(1),
                flows: a.flows,
                layout: layout_for(&a.layout, a.cores.max(1), online)?,
                tunnels: a.tunnels,
                tunnel_last: a.tunnel_last,
            };
            if compare_all {
                // Every backend in one invocation, each with its own ceiling.
                for b in Backend::available() {
                    let c = ceiling(*b, alg, if a.imix { 594 } else { a.size })?;
                    eprintln!("  {b}: seal {:.0} ns, open {:.0} ns", c.seal_ns, c.open_ns);
                    plan.push((r.clone(), *b, c));
                    base.push(None);
                }
            } else {
                plan.push((r, backend, ceil.clone()));
                base.push(None);
            }
        }
        Some(kind @ ("cores" | "flows")) => {
            let max = a.max_cores.unwrap_or(online).max(1);
            let xs: Vec<usize> = if kind == "cores" {
                (1..=max).collect()
            } else {
                vec![1, 2, 4, 16, 64, 256]
            };
            for (mode, sm) in [
                ("ipsec", SaMode::PerCpu),
                ("ipsec", SaMode::Shared),
                ("loop", SaMode::PerCpu),
            ] {
                let first = plan.len();
                for &x in &xs {
                    let (cores, flows) = if kind == "cores" {
                        (x, a.flows)
                    } else {
                        (a.cores.max(1), x as u16)
                    };
                    let r = Run {
                        mode: mode.into(),
                        sa_mode: sm,
                        cores,
                        flows,
                        layout: Layout::Shared,
                        tunnels: a.tunnels,
                        tunnel_last: a.tunnel_last,
                    };
                    plan.push((r, backend, ceil.clone()));
                    base.push(Some(first));
                }
            }
        }
        Some("tunnels") => {
            // Issue 26: the per-packet cost must not grow with the SPD. Both traffic shapes,
            // each point ÷ the same shape's 1-tunnel point of the same round.
            for last in [false, true] {
                let first = plan.len();
                for n in [1u32, 100, 1000, 10_000] {
                    let r = Run {
                        mode: "ipsec".into(),
                        sa_mode,
                        cores: a.cores.max(1),
                        flows: a.flows,
                        layout: layout_for(&a.layout, a.cores.max(1), online)?,
                        tunnels: n,
                        tunnel_last: last,
                    };
                    plan.push((r, backend, ceil.clone()));
                    base.push(Some(first));
                }
            }
        }
        Some(s) => bail!("--sweep must be cores, flows or tunnels, got {s}"),
    }
    Ok((plan, base))
}
