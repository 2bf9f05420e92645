//! The measurement harness behind `espada bench`: the lab's TRex setup in one process
//! (sunset generates, west encrypts, east decrypts, sunrise checks), the raw AES-GCM ceiling of
//! a backend on one core, the one-core layout (what DPDK ipsec-secgw's single lcore measures),
//! and the table, CSV and plots of a sweep. The CLI parses arguments and prints; this measures.

use anyhow::{bail, Result};
use espada_crypto::{Algorithm, Backend, Cipher, EspAead, KeyMaterial};
use espada_dataplane::port::memory::Steering;
use espada_harness::pair::{lab, Layout, Pair, PairSpec};
use espada_harness::solo;
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// The offered load of a measurement.
#[derive(Debug, Clone)]
pub struct Load {
    /// Inner IP packet size in bytes.
    pub size: usize,
    /// IMIX instead of one size.
    pub imix: bool,
    /// UDP flows per generator queue.
    pub flows: u16,
    /// Packets per second per core (0: as fast as possible).
    pub rate: f64,
    /// Seconds per measurement.
    pub duration: f64,
    /// No progress bar.
    pub quiet: bool,
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
    /// Tunnels in each gateway's SPD (0: the lab's one).
    pub tunnels: u32,
    /// Where the traffic went: "one" (one tunnel), "spread" (packet i to tunnel i mod N) or
    /// "last" (every packet to the tunnel whose policy is the SPD's last).
    pub traffic: String,
    /// Delivered Mpps of every round, in the order measured (one entry for one round). The
    /// other figures are those of the median round.
    pub rounds_mpps: Vec<f64>,
    /// In a sweep: delivered rate ÷ the same mode's first point (1 core, or 1 flow), as the
    /// median and range of one ratio per round, each from two measurements of the same round.
    pub vs_first: Option<Spread>,
}

/// Median and range of a figure over rounds.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values; the median of an even count is the mean of the middle two.
    pub fn of(xs: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Folds interleaved rounds into one result per measured point. `rounds[r][i]` is point `i`
/// measured in round `r` (every round measures every point). Each point keeps the figures of
/// its median round (by delivered Mpps; the lower middle one for an even count), every round's
/// Mpps, and, where `base_of(i)` names the point it is compared with, the median and range of
/// the per-round ratio point ÷ base: a ratio is only ever taken between two measurements of
/// one round, so slow drift of a shared machine cancels out.
pub fn fold_rounds(
    rounds: &[Vec<BenchResult>],
    base_of: impl Fn(usize) -> Option<usize>,
) -> Vec<BenchResult> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let mpps: Vec<f64> = rounds.iter().map(|r| r[i].decap.mpps).collect();
            let mut order: Vec<usize> = (0..rounds.len()).collect();
            order.sort_by(|&a, &b| mpps[a].total_cmp(&mpps[b]));
            let mut out = rounds[order[(order.len() - 1) / 2]][i].clone();
            out.rounds_mpps = mpps;
            out.vs_first = base_of(i).and_then(|b| {
                let ratios: Vec<f64> = rounds
                    .iter()
                    .filter(|r| r[b].decap.mpps > 0.0)
                    .map(|r| r[i].decap.mpps / r[b].decap.mpps)
                    .collect();
                Spread::of(&ratios)
            });
            out
        })
        .collect()
}

pub fn cpu_mhz() -> f64 {
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

pub fn figures(p: &Pair, secs: f64, encap: bool, mhz: f64) -> DirFigures {
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
        p.received.bytes() as f64 * 8.0 / secs / 1e9
    };
    DirFigures {
        mpps: pk as f64 / secs / 1e6,
        gbps_inner: gbps,
        ns_per_packet: ns,
        cycles_per_packet: ns * mhz / 1000.0,
        per_core_mpps: per_core,
    }
}

/// One point of a measurement: what runs, on how many cores, in which layout.
#[derive(Debug, Clone)]
pub struct Run {
    pub mode: String,
    pub sa_mode: SaMode,
    pub cores: usize,
    pub flows: u16,
    pub layout: Layout,
    /// Tunnels in the SPDs (0: the lab's one; see `lab::LabOpts::tunnels`).
    pub tunnels: u32,
    /// All traffic to the last tunnel (else spread over all of them).
    pub tunnel_last: bool,
}

pub fn one(
    a: &Load,
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
            tunnels: r.tunnels,
            ..Default::default()
        },
    );
    let (ws, es) = lab::sides_for(r.tunnels);
    let steering = if bypass {
        // No ESP source port tells the cores apart: each generator's traffic stays on its
        // core, as the per-CPU SAs' does.
        Steering::SameQueue
    } else if r.sa_mode == SaMode::PerCpu {
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
        tunnels: r.tunnels,
        tunnel_last: r.tunnel_last,
    };
    let mut pair = Pair::new(w, e, ws, es, spec)?;
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    let pins: Vec<_> = (0..r.cores * 2)
        .map(|i| ids.get(i % ids.len().max(1)).copied())
        .collect();
    let total = Duration::from_secs_f64(a.duration);
    let bar = progress_bar(a, r, bypass, total);
    let recv = pair.received.clone();
    let mut last = (0u64, Instant::now());
    let elapsed = pair.run_with(total, &pins, r.layout, |t| {
        let n = recv.packets();
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
        sent: pair.sent.packets(),
        received: pair.received.packets(),
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
        rounds_mpps: vec![decap.mpps],
        decap,
        drops: drops
            .nonzero()
            .map(|(r, n)| (r.label().to_string(), n))
            .collect(),
        latency_us_p50_p90_p99_p999_max: pair.received.latency_us(),
        ceiling: ceil.cloned(),
        handoffs,
        tunnels: r.tunnels,
        traffic: if r.tunnels == 0 {
            "one"
        } else if r.tunnel_last {
            "last"
        } else {
            "spread"
        }
        .into(),
        vs_first: None,
    })
}

/// The progress bar of one point (hidden with `--quiet`).
fn progress_bar(a: &Load, r: &Run, bypass: bool, total: Duration) -> indicatif::ProgressBar {
    if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total.as_millis() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>28} [{bar:30}] {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        b.set_prefix(format!(
            "{} {} {}c {}f{}",
            r.mode,
            if bypass { "-" } else { r.sa_mode.name() },
            r.cores,
            r.flows,
            if r.tunnels > 0 {
                format!(
                    " {}t {}",
                    r.tunnels,
                    if r.tunnel_last { "last" } else { "spread" }
                )
            } else {
                String::new()
            }
        ));
        b
    }
}

pub fn table(rs: &[BenchResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| backend | mode | SA | layout | cores | flows | tunnels (traffic) | size | encap Mpps | encap Gbit/s | decap Mpps | decap Gbit/s | decap Mpps range (rounds) | ÷ first point (range) | encap/seal | decap/open | (seal+open)/pkt | ns/pkt (enc/dec) | latency p50/p99 µs | drops |");
    let _ = writeln!(
        s,
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
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
        let range = match Spread::of(&r.rounds_mpps) {
            Some(sp) if r.rounds_mpps.len() > 1 => {
                format!("{:.3}–{:.3} ({})", sp.min, sp.max, r.rounds_mpps.len())
            }
            _ => "-".into(),
        };
        let ratio = r
            .vs_first
            .map(|v| format!("{:.2}× ({:.2}–{:.2})", v.median, v.min, v.max))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {:.3} | {:.2} | {:.3} | {:.2} | {} | {} | {} | {} | {} | {:.0}/{:.0} | {} | {} |",
            r.backend,
            r.mode, r.sa_mode, r.layout, r.cores, r.flows, r.tunnels, r.traffic, r.size, r.encap.mpps, r.encap.gbps_inner, r.decap.mpps, r.decap.gbps_inner,
            range, ratio,
            frac(r.encap_fraction_of_seal), frac(r.decap_fraction_of_open), frac(r.core_fraction_of_seal_plus_open), r.encap.ns_per_packet, r.decap.ns_per_packet, lat, r.drops.values().sum::<u64>()
        );
    }
    s
}

pub fn csv(rs: &[BenchResult]) -> String {
    let mut s = String::from("mode,sa_mode,layout,cores,flows,size,encap_mpps,encap_gbps,decap_mpps,decap_gbps,encap_fraction_of_seal,decap_fraction_of_open,lat_p50_us,lat_p99_us,drops,rounds,decap_mpps_min,decap_mpps_max,vs_first_median,vs_first_min,vs_first_max\n");
    for r in rs {
        let l = r.latency_us_p50_p90_p99_p999_max.unwrap_or([0.0; 5]);
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.4},{:.3},{:.4},{:.3},{},{},{:.1},{:.1},{},{},{},{}",
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
            r.drops.values().sum::<u64>(),
            r.rounds_mpps.len(),
            Spread::of(&r.rounds_mpps)
                .map(|sp| format!("{:.4},{:.4}", sp.min, sp.max))
                .unwrap_or_else(|| ",".into()),
            r.vs_first
                .map(|v| format!("{:.3},{:.3},{:.3}", v.median, v.min, v.max))
                .unwrap_or_else(|| ",,".into()),
        );
    }
    s
}

/// How a sweep's plot reads its x axis and what it says under the chart.
pub struct PlotSpec<'a> {
    /// The swept variable of a result.
    pub x_of: fn(&BenchResult) -> f64,
    /// The x axis' name.
    pub x_label: &'a str,
    /// The chart's title.
    pub title: &'a str,
    /// One line under the chart: harness, host, date, commit.
    pub caption: &'a str,
    /// A core-count sweep: integer ticks and an ideal-scaling line for per-CPU SAs.
    pub cores: bool,
    /// A logarithmic x axis (flows, tunnels: 1 to 10 000).
    pub log_x: bool,
}

/// One line of a plot: its name, points (x, median Gbit/s, lowest, highest round), whether it
/// goes on the right axis (plain forwarding: an order of magnitude above IPsec, it would
/// squash the IPsec lines) and whether it is dashed (the ideal).
struct Line {
    name: String,
    pts: Vec<(f64, f64, f64, f64)>,
    right: bool,
    dashed: bool,
}

/// Throughput (delivered, inner Gbit/s) against the swept variable, one line per mode, with
/// the rounds' range as error bars, plain forwarding on its own axis and, for a core sweep,
/// the ideal linear scaling of the per-CPU line.
pub fn plot(rs: &[BenchResult], spec: &PlotSpec, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let x_of = spec.x_of;
    let mut lines: Vec<Line> = ["pcpu", "shared", "spread", "last", "loop"]
        .iter()
        .map(|m| {
            let pts: Vec<(f64, f64, f64, f64)> = rs
                .iter()
                .filter(|r| match *m {
                    "loop" => r.mode == "loop",
                    "spread" | "last" => r.mode == "ipsec" && r.traffic != "one" && r.traffic == *m,
                    _ => r.mode == "ipsec" && r.traffic == "one" && r.sa_mode == *m,
                })
                .map(|r| {
                    let g = r.decap.gbps_inner;
                    // Rounds are in Mpps: the same packets, so Gbit/s scales with them.
                    let per = if r.decap.mpps > 0.0 {
                        g / r.decap.mpps
                    } else {
                        0.0
                    };
                    let (lo, hi) = Spread::of(&r.rounds_mpps)
                        .map_or((g, g), |sp| (sp.min * per, sp.max * per));
                    (x_of(r), g, lo.min(g), hi.max(g))
                })
                .collect();
            let name = match *m {
                "pcpu" => "espada, per-CPU SAs",
                "shared" => "espada, one shared SA",
                "spread" => "traffic spread over every tunnel",
                "last" => "all traffic to the SPD's last policy",
                _ => "plain forwarding, no IPsec (right axis)",
            };
            Line {
                name: name.to_string(),
                pts,
                right: *m == "loop",
                dashed: false,
            }
        })
        .filter(|l| !l.pts.is_empty())
        .collect();
    if spec.cores {
        if let Some(first) = lines
            .iter()
            .find(|l| l.name.contains("per-CPU"))
            .and_then(|l| {
                l.pts
                    .iter()
                    .find(|p| p.0 == 1.0)
                    .map(|p| (p.1, l.pts.iter().map(|p| p.0).collect::<Vec<_>>()))
            })
        {
            let (one, xs) = first;
            lines.push(Line {
                name: "ideal: one core's per-CPU rate × cores".into(),
                pts: xs.iter().map(|&x| (x, one * x, one * x, one * x)).collect(),
                right: false,
                dashed: true,
            });
        }
    }
    let svg = path.with_extension("svg");
    let png = path.with_extension("png");
    draw_chart(
        SVGBackend::new(&svg, (960, 600)).into_drawing_area(),
        &lines,
        spec,
    )?;
    draw_chart(
        BitMapBackend::new(&png, (960, 600)).into_drawing_area(),
        &lines,
        spec,
    )?;
    Ok(())
}

fn draw_chart<DB: plotters::prelude::DrawingBackend>(
    root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    lines: &[Line],
    spec: &PlotSpec,
) -> Result<()> {
    use plotters::prelude::*;
    let e = |x: &dyn std::fmt::Debug| anyhow::anyhow!("plot: {x:?}");
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (chart_area, foot) = root.split_vertically(570);
    foot.draw_text(
        spec.caption,
        &("sans-serif", 13).into_font().color(&BLACK.mix(0.7)),
        (14, 8),
    )
    .map_err(|x| e(&x))?;
    let xs = lines.iter().flat_map(|l| l.pts.iter().map(|p| p.0));
    let xmax = xs.clone().fold(1.0, f64::max);
    let top = |right: bool| {
        lines
            .iter()
            .filter(|l| l.right == right)
            .flat_map(|l| l.pts.iter().map(|p| p.3))
            .fold(0.0, f64::max)
    };
    let (ymax, ymax_r) = ((top(false) * 1.15).max(0.1), (top(true) * 1.15).max(0.1));
    let has_right = lines.iter().any(|l| l.right);
    let mut b = ChartBuilder::on(&chart_area);
    b.caption(spec.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(if has_right { 60 } else { 0 });
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK, RGBColor(120, 120, 120)];
    // The x axis: integer cores, or a log scale from 1 for flows and tunnels.
    macro_rules! draw_all {
        ($ch:expr) => {{
            let ch = &mut $ch;
            if has_right {
                ch.configure_secondary_axes()
                    .y_desc("plain forwarding Gbit/s")
                    .draw()
                    .map_err(|x| e(&x))?;
            }
            for (i, l) in lines.iter().enumerate() {
                let c = colors[i % colors.len()];
                let style = c.stroke_width(2);
                let pts: Vec<(f64, f64)> = l.pts.iter().map(|p| (p.0, p.1)).collect();
                let legend =
                    move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 20, y)], style);
                if l.right {
                    ch.draw_secondary_series(LineSeries::new(pts.clone(), style))
                        .map_err(|x| e(&x))?
                        .label(l.name.clone())
                        .legend(legend);
                    ch.draw_secondary_series(
                        l.pts
                            .iter()
                            .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, c.filled(), 8)),
                    )
                    .map_err(|x| e(&x))?;
                } else if l.dashed {
                    ch.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))
                        .map_err(|x| e(&x))?
                        .label(l.name.clone())
                        .legend(legend);
                } else {
                    ch.draw_series(LineSeries::new(pts.clone(), style))
                        .map_err(|x| e(&x))?
                        .label(l.name.clone())
                        .legend(legend);
                    ch.draw_series(
                        l.pts
                            .iter()
                            .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, c.filled(), 8)),
                    )
                    .map_err(|x| e(&x))?;
                }
            }
            ch.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|x| e(&x))?;
        }};
    }
    if spec.log_x {
        let mut ch = b
            .build_cartesian_2d((1f64..xmax * 1.5).log_scale(), 0f64..ymax)
            .map_err(|x| e(&x))?
            .set_secondary_coord((1f64..xmax * 1.5).log_scale(), 0f64..ymax_r);
        ch.configure_mesh()
            .x_desc(spec.x_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("delivered Gbit/s (inner IP bytes; bars: lowest and highest round)")
            .draw()
            .map_err(|x| e(&x))?;
        draw_all!(ch);
    } else {
        let xr = 0.5f64..xmax + 0.5;
        let mut ch = b
            .build_cartesian_2d(xr.clone(), 0f64..ymax)
            .map_err(|x| e(&x))?
            .set_secondary_coord(xr, 0f64..ymax_r);
        let n = xmax.round() as usize;
        ch.configure_mesh()
            .x_desc(spec.x_label)
            .x_labels(if spec.cores { n.clamp(1, 32) } else { 10 })
            .x_label_formatter(&|x| {
                if spec.cores {
                    if (x - x.round()).abs() < 1e-6 {
                        format!("{x:.0}")
                    } else {
                        String::new()
                    }
                } else {
                    format!("{x}")
                }
            })
            .y_desc("delivered Gbit/s (inner IP bytes; bars: lowest and highest round)")
            .draw()
            .map_err(|x| e(&x))?;
        draw_all!(ch);
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
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

pub fn one_core(
    a: &Load,
    dirs: &[solo::Direction],
    backend: Backend,
    alg: Algorithm,
    ceil: &Ceiling,
) -> Result<Vec<OneCoreResult>> {
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
                tunnels: 0,
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
    Ok(out)
}

/// The one-core results as a Markdown table.
pub fn one_core_table(out: &[OneCoreResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| direction | size | backend | cipher | Mpps | Gbit/s (inner) | ns/pkt | crypto share | drops |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in out {
        let _ = writeln!(
            s,
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
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(cores: usize, mpps: f64, sent: u64) -> BenchResult {
        let f = DirFigures {
            mpps,
            gbps_inner: 0.0,
            ns_per_packet: 0.0,
            cycles_per_packet: 0.0,
            per_core_mpps: vec![mpps / cores as f64; cores],
        };
        BenchResult {
            mode: "ipsec".into(),
            sa_mode: "pcpu".into(),
            layout: "shared".into(),
            cores,
            flows: 16,
            size: "64".into(),
            backend: "ring".into(),
            cipher: "aes-gcm-128".into(),
            seconds: 1.0,
            sent,
            received: sent,
            encap: f.clone(),
            decap: f,
            drops: Default::default(),
            latency_us_p50_p90_p99_p999_max: None,
            ceiling: None,
            encap_fraction_of_seal: None,
            decap_fraction_of_open: None,
            core_fraction_of_seal_plus_open: None,
            handoffs: 0,
            tunnels: 0,
            traffic: "one".into(),
            rounds_mpps: vec![mpps],
            vs_first: None,
        }
    }

    #[test]
    fn spread_is_median_and_range() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(&[f64::NAN, 1.0]).unwrap().median, 1.0);
    }

    #[test]
    fn rounds_fold_into_the_median_round_and_per_round_ratios() {
        // Round 2 is a slow moment of the machine for both points: its ratio is still 2.
        let rounds = vec![
            vec![point(1, 2.0, 10), point(2, 3.8, 11)],
            vec![point(1, 1.0, 20), point(2, 2.0, 21)],
            vec![point(1, 2.2, 30), point(2, 3.6, 31)],
        ];
        let out = fold_rounds(&rounds, |_| Some(0));
        assert_eq!(out.len(), 2);
        // The figures of each point come from its own median round.
        assert_eq!(out[0].sent, 10);
        assert_eq!(out[0].rounds_mpps, vec![2.0, 1.0, 2.2]);
        assert_eq!(out[1].sent, 31);
        let v = out[1].vs_first.unwrap();
        assert!((v.median - 1.9).abs() < 1e-9, "{v:?}");
        assert!((v.min - 3.6 / 2.2).abs() < 1e-9 && (v.max - 2.0).abs() < 1e-9);
        assert_eq!(out[0].vs_first.unwrap().median, 1.0);
        // No base: no ratio; one round: its own figures.
        let one = fold_rounds(&rounds[..1], |_| None);
        assert_eq!(one[1].sent, 11);
        assert!(one[1].vs_first.is_none());
        assert!(fold_rounds(&[], |_| None).is_empty());
    }

    #[test]
    fn table_and_csv_show_the_rounds() {
        let rounds = vec![
            vec![point(1, 2.0, 10), point(2, 3.8, 11)],
            vec![point(1, 2.1, 20), point(2, 4.0, 21)],
        ];
        let out = fold_rounds(&rounds, |_| Some(0));
        let t = table(&out);
        assert!(t.contains("3.800–4.000 (2)"), "{t}");
        assert!(t.contains("1.90× (1.90–1.90)"), "{t}");
        let c = csv(&out);
        let header: Vec<&str> = c.lines().next().unwrap().split(',').collect();
        for l in c.lines().skip(1) {
            assert_eq!(l.split(',').count(), header.len(), "{c}");
        }
        assert!(
            c.lines()
                .nth(2)
                .unwrap()
                .ends_with(",2,3.8000,4.0000,1.902,1.900,1.905"),
            "{c}"
        );
    }
}
