//! `espada bench`: the lab's TRex setup in one process. Sunset generates, west encrypts, east
//! decrypts, sunrise checks; per core and in total: Mpps, Gbit/s (inner IP bytes), drops by
//! reason, ns and cycles per packet, one-way latency percentiles; and, in the same run, the raw
//! AES-GCM seal/open speed of the backend on one core at the same size (the ceiling).
//! Sweeps over cores or flows for per-CPU, shared-SA and plain-forwarding modes write a
//! Markdown table, CSV, JSON and a plot (SVG and PNG).

use anyhow::{bail, Context, Result};
use clap::Args;
use espada_crypto::{Algorithm, Backend, Cipher, EspAead, KeyMaterial};
use espada_dataplane::pair::{lab, Layout, Pair, PairSpec};
use espada_dataplane::port::memory::Steering;
use espada_dataplane::solo;
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    /// Sweep `cores` (1..=--max-cores) or `flows` (1, 2, 4, 16, 64, 256) for pcpu, shared and
    /// loop modes, writing table, CSV, JSON and plots to --out.
    #[arg(long, value_parser = ["cores", "flows"])]
    sweep: Option<String>,
    /// Largest core count of a cores sweep (default: every online core, shared layout).
    #[arg(long)]
    max_cores: Option<usize>,
    /// Output directory of a sweep.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct DirFigures {
    pub mpps: f64,
    pub gbps_inner: f64,
    pub ns_per_packet: f64,
    pub cycles_per_packet: f64,
    pub per_core_mpps: Vec<f64>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Ceiling {
    pub backend: String,
    pub seal_ns: f64,
    pub open_ns: f64,
    pub seal_gbps: f64,
    pub open_gbps: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct BenchResult {
    pub mode: String,
    pub sa_mode: String,
    pub layout: String,
    pub cores: usize,
    pub flows: u16,
    pub size: String,
    pub backend: String,
    pub cipher: String,
    pub seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub encap: DirFigures,
    pub decap: DirFigures,
    pub drops: std::collections::BTreeMap<String, u64>,
    pub latency_us_p50_p90_p99_p999_max: Option<[f64; 5]>,
    pub ceiling: Option<Ceiling>,
    pub encap_fraction_of_seal: Option<f64>,
    pub decap_fraction_of_open: Option<f64>,
    /// Shared layout (one core does both encap and decap of a packet): the share of a core's
    /// time per packet that the raw seal + open would take, i.e. delivered rate per core ÷
    /// 1/(seal + open). 100% = nothing but crypto.
    pub core_fraction_of_seal_plus_open: Option<f64>,
    pub handoffs: u64,
}

fn cpu_mhz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Raw AES-GCM in place on one core at the ESP payload size of `size`: ns per seal and open.
pub fn ceiling(backend: Backend, alg: Algorithm, size: usize) -> Result<Ceiling> {
    let km = KeyMaterial::new(alg, &vec![0x42u8; alg.key_material_len()])?;
    let c = Cipher::new(backend, &km)?;
    let text = size + espada_wire::esp::pad_len(size) + 2;
    let mut buf = vec![0x5au8; text + 16];
    let aad = [0u8; 12];
    let time = |f: &mut dyn FnMut(u64)| {
        for i in 0..2000 {
            f(i);
        }
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            for _ in 0..256 {
                f(n);
                n += 1;
            }
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let seal_ns = time(&mut |i| {
        let _ = c.seal_in_place(&i.to_be_bytes(), &aad, std::hint::black_box(&mut buf));
    });
    // Open a fresh copy of a sealed buffer each time (the copy is timed too, as decap pays it
    // nowhere else: subtract nothing, report honestly).
    let mut sealed = vec![0x5au8; text + 16];
    c.seal_in_place(&[1; 8], &aad, &mut sealed)?;
    let mut work = sealed.clone();
    let open_ns = time(&mut |_| {
        work.copy_from_slice(&sealed);
        let _ = c.open_in_place(&[1; 8], &aad, std::hint::black_box(&mut work));
    });
    Ok(Ceiling {
        backend: backend.name().into(),
        seal_ns,
        open_ns,
        seal_gbps: size as f64 * 8.0 / seal_ns,
        open_gbps: size as f64 * 8.0 / open_ns,
    })
}

fn figures(p: &Pair, secs: f64, encap: bool, mhz: f64) -> DirFigures {
    let h = if encap { &p.west } else { &p.east };
    let mut per_core = Vec::new();
    let (mut pk, mut by, mut busy, mut handled) = (0u64, 0u64, 0u64, 0u64);
    for w in &h.workers {
        let s = w.stats();
        let (a, b) = if encap {
            (s.encap_packets + s.bypass_packets, s.encap_bytes)
        } else {
            (s.decap_packets + s.bypass_packets, s.decap_bytes)
        };
        per_core.push(a as f64 / secs / 1e6);
        pk += a;
        by += b;
        busy += s.busy_ns;
        handled += s.red_rx + s.black_rx + s.handoff_in;
    }
    let ns = if handled > 0 {
        busy as f64 / handled as f64
    } else {
        0.0
    };
    let gbps = if by > 0 {
        by as f64 * 8.0 / secs / 1e9
    } else {
        p.received.bytes.load(Ordering::Relaxed) as f64 * 8.0 / secs / 1e9
    };
    DirFigures {
        mpps: pk as f64 / secs / 1e6,
        gbps_inner: gbps,
        ns_per_packet: ns,
        cycles_per_packet: ns * mhz / 1000.0,
        per_core_mpps: per_core,
    }
}

struct Run {
    mode: String,
    sa_mode: SaMode,
    cores: usize,
    flows: u16,
    layout: Layout,
}

fn one(
    a: &BenchArgs,
    r: &Run,
    backend: Backend,
    alg: Algorithm,
    ceil: Option<&Ceiling>,
) -> Result<BenchResult> {
    let bypass = r.mode == "loop";
    let pcpu = if r.sa_mode == SaMode::PerCpu {
        r.cores
    } else {
        0
    };
    let (w, e) = lab::dbs_opts(
        r.cores,
        pcpu,
        r.sa_mode,
        Lifetimes::default(),
        lab::LabOpts {
            backend,
            alg,
            bypass,
            ..Default::default()
        },
    );
    let (ws, es) = lab::sides();
    let steering = if r.sa_mode == SaMode::PerCpu {
        Steering::UdpSrcPort { base: 4501 }
    } else {
        Steering::Rss
    };
    let spec = PairSpec {
        workers: r.cores,
        size: a.size,
        flows: r.flows,
        limit: None,
        steering,
        ring_depth: 8192,
        rate: (a.rate > 0.0).then_some(a.rate),
        imix: a.imix,
    };
    let mut pair = Pair::new(w, e, ws, es, spec)?;
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    let pins: Vec<_> = (0..r.cores * 2)
        .map(|i| ids.get(i % ids.len().max(1)).copied())
        .collect();
    let total = Duration::from_secs_f64(a.duration);
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total.as_millis() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>28} [{bar:30}] {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        b.set_prefix(format!(
            "{} {} {}c {}f",
            r.mode,
            if bypass { "-" } else { r.sa_mode.name() },
            r.cores,
            r.flows
        ));
        b
    };
    let recv = pair.received.clone();
    let mut last = (0u64, Instant::now());
    let elapsed = pair.run_with(total, &pins, r.layout, |t| {
        let n = recv.packets.load(Ordering::Relaxed);
        let rate = (n - last.0) as f64 / last.1.elapsed().as_secs_f64() / 1e6;
        last = (n, Instant::now());
        bar.set_position(t.as_millis() as u64);
        bar.set_message(format!("{rate:.2} Mpps delivered"));
    });
    bar.finish_and_clear();
    pair.drain();
    let secs = elapsed.as_secs_f64();
    let mhz = cpu_mhz();
    let encap = figures(&pair, secs, true, mhz);
    let decap = figures(&pair, secs, false, mhz);
    let mut drops = espada_dataplane::DropCounters::default();
    let mut handoffs = 0;
    for w in pair.west.workers.iter().chain(pair.east.workers.iter()) {
        drops.merge(&w.stats().drops);
        handoffs += w.stats().handoff_out;
    }
    let per_core_ceiling = |f: &DirFigures, ns: f64| {
        if f.per_core_mpps.is_empty() || ns == 0.0 {
            None
        } else {
            Some(f.per_core_mpps.iter().sum::<f64>() / f.per_core_mpps.len() as f64 / (1e3 / ns))
        }
    };
    Ok(BenchResult {
        mode: r.mode.clone(),
        sa_mode: if bypass {
            "-".into()
        } else {
            r.sa_mode.name().into()
        },
        layout: format!("{:?}", r.layout).to_lowercase(),
        cores: r.cores,
        flows: r.flows,
        size: if a.imix {
            "imix".into()
        } else {
            a.size.to_string()
        },
        backend: backend.name().into(),
        cipher: alg.name().into(),
        seconds: secs,
        sent: pair.sent.packets.load(Ordering::Relaxed),
        received: pair.received.packets.load(Ordering::Relaxed),
        core_fraction_of_seal_plus_open: ceil
            .filter(|_| !bypass && r.layout == Layout::Shared)
            .map(|c| decap.mpps / r.cores as f64 * (c.seal_ns + c.open_ns) / 1e3),
        encap_fraction_of_seal: ceil
            .filter(|_| !bypass)
            .and_then(|c| per_core_ceiling(&encap, c.seal_ns)),
        decap_fraction_of_open: ceil
            .filter(|_| !bypass)
            .and_then(|c| per_core_ceiling(&decap, c.open_ns)),
        encap,
        decap,
        drops: drops
            .nonzero()
            .map(|(r, n)| (r.label().to_string(), n))
            .collect(),
        latency_us_p50_p90_p99_p999_max: pair.received.latency_us(),
        ceiling: ceil.cloned(),
        handoffs,
    })
}

fn table(rs: &[BenchResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| backend | mode | SA | layout | cores | flows | size | encap Mpps | encap Gbit/s | decap Mpps | decap Gbit/s | encap/seal | decap/open | (seal+open)/pkt | ns/pkt (enc/dec) | latency p50/p99 µs | drops |");
    let _ = writeln!(
        s,
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rs {
        let lat = r
            .latency_us_p50_p90_p99_p999_max
            .map(|l| format!("{:.0}/{:.0}", l[0], l[2]))
            .unwrap_or_else(|| "-".into());
        let frac = |f: Option<f64>| {
            f.map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.2} | {:.3} | {:.2} | {} | {} | {} | {:.0}/{:.0} | {} | {} |",
            r.backend,
            r.mode, r.sa_mode, r.layout, r.cores, r.flows, r.size, r.encap.mpps, r.encap.gbps_inner, r.decap.mpps, r.decap.gbps_inner,
            frac(r.encap_fraction_of_seal), frac(r.decap_fraction_of_open), frac(r.core_fraction_of_seal_plus_open), r.encap.ns_per_packet, r.decap.ns_per_packet, lat, r.drops.values().sum::<u64>()
        );
    }
    s
}

fn csv(rs: &[BenchResult]) -> String {
    let mut s = String::from("mode,sa_mode,layout,cores,flows,size,encap_mpps,encap_gbps,decap_mpps,decap_gbps,encap_fraction_of_seal,decap_fraction_of_open,lat_p50_us,lat_p99_us,drops\n");
    for r in rs {
        let l = r.latency_us_p50_p90_p99_p999_max.unwrap_or([0.0; 5]);
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.4},{:.3},{:.4},{:.3},{},{},{:.1},{:.1},{}",
            r.mode,
            r.sa_mode,
            r.layout,
            r.cores,
            r.flows,
            r.size,
            r.encap.mpps,
            r.encap.gbps_inner,
            r.decap.mpps,
            r.decap.gbps_inner,
            r.encap_fraction_of_seal
                .map(|x| format!("{x:.3}"))
                .unwrap_or_default(),
            r.decap_fraction_of_open
                .map(|x| format!("{x:.3}"))
                .unwrap_or_default(),
            l[0],
            l[2],
            r.drops.values().sum::<u64>()
        );
    }
    s
}

/// Throughput (delivered, inner Gbit/s) against the swept variable, one line per mode.
fn plot(
    rs: &[BenchResult],
    x_of: fn(&BenchResult) -> f64,
    x_label: &str,
    title: &str,
    path: &Path,
) -> Result<()> {
    use plotters::prelude::*;
    let series: Vec<(String, Vec<(f64, f64)>)> = ["pcpu", "shared", "loop"]
        .iter()
        .map(|m| {
            let pts: Vec<(f64, f64)> = rs
                .iter()
                .filter(|r| {
                    if *m == "loop" {
                        r.mode == "loop"
                    } else {
                        r.mode == "ipsec" && r.sa_mode == *m
                    }
                })
                .map(|r| (x_of(r), r.decap.gbps_inner))
                .collect();
            let name = match *m {
                "pcpu" => "espada, per-CPU SAs",
                "shared" => "espada, one shared SA",
                _ => "plain forwarding (no IPsec)",
            };
            (name.to_string(), pts)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let xmax = rs.iter().map(x_of).fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0, f64::max)
        * 1.15;
    let svg = path.with_extension("svg");
    let png = path.with_extension("png");
    draw_chart(
        SVGBackend::new(&svg, (900, 560)).into_drawing_area(),
        &series,
        xmax,
        ymax,
        title,
        x_label,
    )?;
    draw_chart(
        BitMapBackend::new(&png, (900, 560)).into_drawing_area(),
        &series,
        xmax,
        ymax,
        title,
        x_label,
    )?;
    Ok(())
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

fn draw_chart<DB: plotters::prelude::DrawingBackend>(
    root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    series: &Series,
    xmax: f64,
    ymax: f64,
    title: &str,
    x_label: &str,
) -> Result<()> {
    use plotters::prelude::*;
    let e = |x: &dyn std::fmt::Debug| anyhow::anyhow!("plot: {x:?}");
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut ch = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax * 1.05 + 0.5, 0f64..ymax)
        .map_err(|x| e(&x))?;
    ch.configure_mesh()
        .x_desc(x_label)
        .y_desc("delivered Gbit/s (inner IP bytes)")
        .draw()
        .map_err(|x| e(&x))?;
    let colors = [RED, BLUE, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % 3];
        ch.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        ch.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
            .map_err(|x| e(&x))?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<ExitCode> {
    if !a.imix && !(64..=9000).contains(&a.size) {
        bail!("--size must be between 64 and 9000 bytes, got {}", a.size);
    }
    let alg = Algorithm::from_name(&a.cipher)
        .with_context(|| format!("unknown cipher `{}` (aes-gcm-128 or aes-gcm-256)", a.cipher))?;
    let compare_all = a.backend == "all";
    let backend = if compare_all {
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
    };
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
    let layout_for = |cores: usize| match a.layout.as_str() {
        "split" => Ok(Layout::Split),
        "shared" => Ok(Layout::Shared),
        "auto" => Ok(if cores * 2 <= online {
            Layout::Split
        } else {
            Layout::Shared
        }),
        s => bail!("--layout must be auto, split, shared or one-core, got {s}"),
    };
    let dirs: Vec<solo::Direction> = match a.direction.as_str() {
        "encrypt" => vec![solo::Direction::Encrypt],
        "decrypt" => vec![solo::Direction::Decrypt],
        "both" => vec![solo::Direction::Encrypt, solo::Direction::Decrypt],
        d => bail!("--direction must be encrypt, decrypt or both, got {d}"),
    };
    if a.layout == "one-core" && (a.sweep.is_some() || a.mode != "ipsec" || compare_all) {
        bail!("--layout one-core measures one ipsec run: no --sweep, --mode loop or --backend all");
    }
    // Where the results go must be writable before anything is measured.
    if let Some(j) = &a.json {
        crate::cli::report::check_writable(j)?;
    }
    if a.sweep.is_some() {
        crate::cli::report::check_dir_writable(&a.out)?;
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
        return one_core(&a, &dirs, backend, alg, &ceil);
    }
    let mut results = Vec::new();
    match a.sweep.as_deref() {
        None => {
            let r = Run {
                mode: a.mode.clone(),
                sa_mode,
                cores: a.cores.max(1),
                flows: a.flows,
                layout: layout_for(a.cores.max(1))?,
            };
            if compare_all {
                // Every backend in one invocation, each with its own ceiling.
                for b in Backend::available() {
                    let c = ceiling(*b, alg, size_for_ceiling)?;
                    eprintln!("  {b}: seal {:.0} ns, open {:.0} ns", c.seal_ns, c.open_ns);
                    results.push(one(&a, &r, *b, alg, Some(&c))?);
                }
            } else {
                results.push(one(&a, &r, backend, alg, Some(&ceil))?);
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
                    };
                    results.push(one(&a, &r, backend, alg, Some(&ceil))?);
                }
            }
        }
        Some(s) => bail!("--sweep must be cores or flows, got {s}"),
    }
    let t = table(&results);
    print!("{t}");
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
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("cannot create {}", a.out.display()))?;
        let base = a.out.join(format!("sweep-{kind}"));
        std::fs::write(base.with_extension("md"), &t)?;
        std::fs::write(base.with_extension("csv"), csv(&results))?;
        std::fs::write(
            base.with_extension("json"),
            serde_json::to_string_pretty(&results)? + "\n",
        )?;
        let (xf, xl): (fn(&BenchResult) -> f64, &str) = if kind == "cores" {
            (|r| r.cores as f64, "worker cores per gateway")
        } else {
            (|r| r.flows as f64, "flows per core")
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
        plot(&results, xf, xl, &title, &base)?;
        println!("wrote {}.{{md,csv,json,svg,png}}", base.display());
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

/// One direction per run on one pinned core (`--layout one-core`).
#[derive(Serialize, Clone, Debug)]
pub struct OneCoreResult {
    pub direction: String,
    pub size: usize,
    pub backend: String,
    pub cipher: String,
    pub seconds: f64,
    pub packets: u64,
    pub mpps: f64,
    pub gbps_inner: f64,
    pub ns_per_packet: f64,
    /// Raw seal (encrypt) or open (decrypt) time ÷ time per packet: 100% = nothing but crypto.
    pub fraction_of_crypto: f64,
    pub drops: std::collections::BTreeMap<String, u64>,
}

fn one_core(
    a: &BenchArgs,
    dirs: &[solo::Direction],
    backend: Backend,
    alg: Algorithm,
    ceil: &Ceiling,
) -> Result<ExitCode> {
    if a.imix || a.rate > 0.0 {
        bail!("--layout one-core runs one size as fast as possible (no --imix, no --rate)");
    }
    let core = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .next();
    let mut out = Vec::new();
    for &d in dirs {
        let (w, e) = lab::dbs_opts(
            1,
            1,
            SaMode::PerCpu,
            Lifetimes::default(),
            lab::LabOpts {
                backend,
                alg,
                bypass: false,
                replay_window: if d == solo::Direction::Decrypt {
                    0
                } else {
                    4096
                },
            },
        );
        let (ws, es) = lab::sides();
        let spec = PairSpec {
            workers: 1,
            size: a.size,
            flows: a.flows,
            ..Default::default()
        };
        let r = solo::run(
            w,
            e,
            ws,
            es,
            solo::SoloSpec {
                pair: spec,
                dir: d,
                warmup: Duration::from_millis(300),
                duration: Duration::from_secs_f64(a.duration),
                core,
                check: false,
            },
        )?;
        let ns = if r.packets > 0 {
            r.seconds * 1e9 / r.packets as f64
        } else {
            0.0
        };
        let crypto_ns = if d == solo::Direction::Encrypt {
            ceil.seal_ns
        } else {
            ceil.open_ns
        };
        if r.bad > 0 {
            bail!("one-core decrypt: the sink found {} damaged packets", r.bad);
        }
        out.push(OneCoreResult {
            direction: if d == solo::Direction::Encrypt {
                "encrypt"
            } else {
                "decrypt"
            }
            .into(),
            size: a.size,
            backend: backend.name().into(),
            cipher: alg.name().into(),
            seconds: r.seconds,
            packets: r.packets,
            mpps: r.packets as f64 / r.seconds / 1e6,
            gbps_inner: r.bytes as f64 * 8.0 / r.seconds / 1e9,
            ns_per_packet: ns,
            fraction_of_crypto: if ns > 0.0 { crypto_ns / ns } else { 0.0 },
            drops: r
                .stats
                .drops
                .nonzero()
                .map(|(r, n)| (r.label().to_string(), n))
                .collect(),
        });
    }
    println!("| direction | size | backend | cipher | Mpps | Gbit/s (inner) | ns/pkt | crypto share | drops |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &out {
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.2} | {:.1} | {:.0}% | {} |",
            r.direction,
            r.size,
            r.backend,
            r.cipher,
            r.mpps,
            r.gbps_inner,
            r.ns_per_packet,
            r.fraction_of_crypto * 100.0,
            r.drops.values().sum::<u64>()
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
