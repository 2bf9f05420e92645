//! `espada ab`: the A/B against kernel XFRM. Builds the namespace lab once per half — plain
//! kernel routing (`loop`: the ceiling of the lab and its generator), kernel XFRM with per-CPU
//! SAs (`pcpu-num`, when the kernel has them) and with one SA (`--no-pcpu`), and espada — checks
//! that each forwards (a ping), sends the same UDP load through each, optionally searches each
//! half's no-drop rate per frame size, and writes one report (table, JSON) with them side by
//! side: what was sent, refused by the sender's own kernel, put on west's black link and
//! received at sunrise, and per-CPU user/system/softirq time next to every figure.
//!
//! On a kernel without ESP (CONFIG_INET_ESP off, like the CI machines) the kernel halves say
//! why in their row and the others are still measured; `--print-setup loop|kernel|espada`
//! shows the exact commands a half runs.

use crate::config::{self, Config};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use espada_benches::ab::{
    self, measure, probe_kernel_esp, setup, AbLoad, Half, Layout, Search, Variant,
};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const WEST: &str = include_str!("../../configs/west.toml");
const EAST: &str = include_str!("../../configs/east.toml");

#[derive(Args)]
pub struct AbArgs {
    /// West configuration (default: built-in configs/west.toml).
    #[arg(long)]
    west: Option<PathBuf>,
    /// East configuration (default: built-in configs/east.toml).
    #[arg(long)]
    east: Option<PathBuf>,
    /// Seconds of traffic per trial.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// UDP payload bytes per datagram of the fixed load.
    #[arg(long, default_value_t = 1300)]
    size: usize,
    /// Parallel UDP flows (distinct source ports).
    #[arg(long, default_value_t = 4)]
    flows: usize,
    /// Offered rate of the fixed load in packets per second over all flows (default: as fast
    /// as the generator goes; what it could not send is counted).
    #[arg(long, value_name = "PPS")]
    rate: Option<u64>,
    /// Also search each half's no-drop rate for these frame sizes (comma-separated: bytes or
    /// `imix`), e.g. `--ndr 64,1400,imix`: a binary search on the offered rate.
    #[arg(long, value_name = "SIZES", value_delimiter = ',')]
    ndr: Vec<String>,
    /// Loss accepted at the no-drop rate, as a fraction (0.001 = 0.1 %).
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    ndr_loss: f64,
    /// Trials per no-drop-rate search (after one at full speed).
    #[arg(long, default_value_t = 6)]
    ndr_steps: u32,
    /// The load generator in sunset: `auto` (pktgen where the kernel has it, else
    /// af-packet), `pktgen` (the kernel's packet generator: kernel threads, no system call per
    /// packet), `af-packet` (prebuilt Ethernet frames through espada's AF_PACKET transmit ring:
    /// no UDP socket, no qdisc, one syscall per 32 frames), `af-xdp` (the same through an
    /// AF_XDP socket; builds with the af-xdp feature) or `udp` (UDP sockets, one syscall per
    /// datagram: the limit at small frames).
    #[arg(long, default_value = "auto", value_parser = ["auto", "pktgen", "af-packet", "af-xdp", "udp"])]
    generator: String,
    /// Where things run: `split` (west, the gateway under test, alone on the first half of the
    /// CPUs; the generator, the sink and east on the others: processes with taskset, the
    /// kernel gateways' receive work with RPS) or `shared` (anywhere, as the scheduler likes).
    #[arg(long, default_value = "split", value_parser = ["split", "shared"])]
    layout: String,
    /// With `--layout split`: how many CPUs west gets (the first N online ones; the rest run
    /// the generator, the sink and east; default: half). The N-CPU variant: `--west-cpus N
    /// --flows N` spreads N flows over N west CPUs, one per-CPU SA each, where the kernel's
    /// xfrm_state_find and SA locks contend (compare with `--no-pcpu`'s one SA).
    #[arg(long, value_name = "N")]
    west_cpus: Option<usize>,
    /// Namespace name prefix.
    #[arg(long, default_value = "ab-")]
    prefix: String,
    /// Report directory (default: a new directory per run,
    /// `~/.local/state/espada/ab-DATE-TIME`, or under $XDG_STATE_HOME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure only espada and the loop (no kernel probe, no kernel halves).
    #[arg(long)]
    espada_only: bool,
    /// Print the commands that set up one half (`loop`, `kernel`, `kernel-one-sa` or
    /// `espada`) and exit.
    #[arg(long)]
    print_setup: Option<String>,
}

/// Hidden helper run inside the namespaces: a UDP load generator and counter.
#[derive(Subcommand)]
pub enum TrafficCmd {
    /// Send UDP datagrams for a while; prints a JSON line with what was sent.
    Send {
        #[arg(long)]
        dst: IpAddr,
        #[arg(long)]
        port: u16,
        /// Payload sizes, cycled per datagram.
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        #[arg(long)]
        flows: usize,
        #[arg(long)]
        duration: f64,
        /// Packets per second over all flows.
        #[arg(long)]
        rate: Option<u64>,
        /// Send Ethernet frames through an AF_PACKET transmit ring on this interface instead
        /// of UDP sockets (needs --src and --gateway).
        #[arg(long, value_name = "IFACE", requires_all = ["src", "gateway"], conflicts_with_all = ["af_xdp", "pktgen"])]
        af_packet: Option<String>,
        /// The same frames through an AF_XDP socket on this interface.
        #[arg(long, value_name = "IFACE", requires_all = ["src", "gateway"], conflicts_with = "pktgen")]
        af_xdp: Option<String>,
        /// The kernel's pktgen on this interface (the module is loaded if needed).
        #[arg(long, value_name = "IFACE", requires_all = ["src", "gateway"])]
        pktgen: Option<String>,
        /// Source address of the AF_PACKET frames.
        #[arg(long)]
        src: Option<std::net::Ipv4Addr>,
        /// The gateway the AF_PACKET frames go to (its MAC from the ARP table).
        #[arg(long)]
        gateway: Option<std::net::Ipv4Addr>,
    },
    /// Count UDP datagrams until idle for a second; prints a JSON line.
    Recv {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        max_seconds: f64,
    },
}

pub fn traffic(cmd: TrafficCmd) -> Result<ExitCode> {
    match cmd {
        TrafficCmd::Send {
            dst,
            port,
            sizes,
            flows,
            duration,
            rate,
            af_packet,
            af_xdp,
            pktgen,
            src,
            gateway,
        } => {
            if sizes.is_empty() {
                bail!("--sizes needs at least one size");
            }
            let raw = af_packet
                .map(|i| (i, ab::RawKind::AfPacket))
                .or(af_xdp.map(|i| (i, ab::RawKind::AfXdp)))
                .or(pktgen.map(|i| (i, ab::RawKind::Pktgen)));
            match (raw, src, gateway, dst) {
                (Some((iface, kind)), Some(src), Some(gateway), IpAddr::V4(dst)) => {
                    let r = ab::RawLoad {
                        iface,
                        src,
                        dst,
                        gateway,
                        port,
                    };
                    println!("{}", ab::send_raw(&r, kind, &sizes, flows, duration, rate)?)
                }
                (Some((_, kind)), ..) => {
                    bail!("--{} sends IPv4: give an IPv4 --dst", kind.name())
                }
                _ => println!("{}", ab::send(dst, port, &sizes, flows, duration, rate)),
            }
        }
        TrafficCmd::Recv { port, max_seconds } => println!("{}", ab::recv(port, max_seconds)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn load(p: &Option<PathBuf>, builtin: &str, name: &str) -> Result<Config> {
    match p {
        Some(p) => config::load(p),
        None => config::parse(
            Path::new(&format!("(built-in) configs/{name}.toml")),
            builtin,
        ),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn run(mut a: AbArgs) -> Result<ExitCode> {
    let out = a.out.take().unwrap_or_else(|| super::results_dir("ab"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    // `espada run` inside the namespaces needs files: write the built-in configs out.
    let materialise = |p: &Option<PathBuf>, text: &str, name: &str| -> Result<Option<PathBuf>> {
        Ok(match p {
            Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?),
            None => {
                let f = std::fs::canonicalize(&out)?.join(format!("{name}.toml"));
                std::fs::write(&f, text)?;
                Some(f)
            }
        })
    };
    let wp = materialise(&a.west, WEST, "west")?;
    let ep = materialise(&a.east, EAST, "east")?;
    let w = load(&wp, WEST, "west")?;
    let e = load(&ep, EAST, "east")?;
    let me = std::env::current_exe()?.display().to_string();
    for s in &a.ndr {
        ab::payloads(s)?;
    }
    let online: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .iter()
        .map(|c| c.id)
        .collect();
    let layout = match a.layout.as_str() {
        "split" if a.west_cpus.is_some() => {
            let n = a.west_cpus.unwrap_or(1);
            if n == 0 || n >= online.len() {
                bail!(
                    "--west-cpus {n}: west needs at least one CPU and the generator, sink and east \
                     at least one other; this host has {} online",
                    online.len()
                );
            }
            Layout::split_at(&online, n)
        }
        "shared" if a.west_cpus.is_some() => bail!("--west-cpus needs --layout split"),
        "split" => Layout::split(&online),
        _ => Layout::default(),
    };
    let generator_note = resolve_generator(&mut a.generator)?;
    let load = AbLoad {
        prefix: a.prefix.clone(),
        duration: a.duration,
        size: a.size,
        flows: a.flows,
        rate: a.rate,
        layout: layout.clone(),
        west_black: w
            .black
            .as_ref()
            .map(|b| b.interface.clone())
            .unwrap_or_default(),
        generator: a.generator.clone(),
        sunset: sunset_address(&w)?,
        gateway: match w.red.as_ref().map(|r| r.address) {
            Some(IpAddr::V4(g)) => g,
            _ => bail!("{}: [red] needs an IPv4 address", w.file.display()),
        },
    };
    if let Some(which) = &a.print_setup {
        let half = match which.as_str() {
            "loop" => Half::Loop,
            "kernel" => Half::Kernel { pcpu: true },
            "kernel-one-sa" => Half::Kernel { pcpu: false },
            "espada" => Half::Espada,
            s => bail!("--print-setup must be loop, kernel, kernel-one-sa or espada, got {s}"),
        };
        for c in setup(&a.prefix, &w, &e, half, &me, &layout)? {
            println!("{c}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let search = Search {
        sizes: a.ndr.clone(),
        threshold: a.ndr_loss,
        steps: a.ndr_steps,
    };
    let mut variants = Vec::new();
    let run_half = |half: Half| -> Result<Variant> {
        eprintln!("espada ab: {} ...", half.name());
        Ok(measure(
            &load,
            &me,
            half,
            &setup(&a.prefix, &w, &e, half, &me, &layout)?,
            &search,
        ))
    };
    variants.push(run_half(Half::Loop)?);
    let probe = if a.espada_only {
        Err("--espada-only".to_string())
    } else {
        probe_kernel_esp(&a.prefix).map_err(|m| format!("this kernel cannot do ESP (ip xfrm state add: {m}); run espada ab on a host or VM whose kernel has CONFIG_INET_ESP (docs/ab.md)"))
    };
    match &probe {
        Ok(pcpu) => {
            if *pcpu {
                variants.push(run_half(Half::Kernel { pcpu: true })?);
            } else {
                variants.push(Variant::not_run(
                    Half::Kernel { pcpu: true }.name(),
                    "this kernel takes no per-CPU SAs (pcpu-num needs Linux >= 6.13 and iproute2 >= 7.0)",
                ));
            }
            variants.push(run_half(Half::Kernel { pcpu: false })?);
        }
        Err(why) => {
            for pcpu in [true, false] {
                variants.push(Variant::not_run(Half::Kernel { pcpu }.name(), why.clone()));
            }
        }
    }
    variants.push(run_half(Half::Espada)?);
    let md = report(&variants, &layout, &generator_note);
    print!("{md}");
    std::fs::write(out.join("ab.md"), &md)?;
    std::fs::write(
        out.join("ab.json"),
        serde_json::to_string_pretty(&variants)? + "\n",
    )?;
    println!("wrote {}/ab.{{md,json}}", out.display());
    let broken: Vec<&str> = variants
        .iter()
        .filter(|v| v.ran && !v.forwarded)
        .map(|v| v.name.as_str())
        .collect();
    if !broken.is_empty() {
        eprintln!(
            "espada ab: nothing reached sunrise through {}: see the notes above and `espada ab --print-setup`",
            broken.join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Sunset's address: the tenth host of west's red subnet (as the lab setup gives it).
fn sunset_address(w: &Config) -> Result<std::net::Ipv4Addr> {
    match w.red.as_ref().map(|r| r.prefix.addr()) {
        Some(IpAddr::V4(a)) => Ok(std::net::Ipv4Addr::from(u32::from(a) + 10)),
        _ => bail!("{}: [red] needs an IPv4 prefix", w.file.display()),
    }
}

/// Per-CPU user/system/softirq time in one cell: `cpu0 5/40/30 cpu1 ...` (percent).
fn cpu_cell(cpu: &[ab::CpuUse]) -> String {
    cpu.iter()
        .map(|c| {
            format!(
                "cpu{} {:.0}/{:.0}/{:.0}",
                c.cpu,
                c.user * 100.0,
                c.system * 100.0,
                c.softirq * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The report: the fixed load per half, the no-drop rates, which limit the loop shows, the
/// kernel's per-SA counters, and why a half did not run.
/// `--generator auto`: the kernel's pktgen where it has one, else espada's AF_PACKET
/// generator; `generator` becomes the one that runs and the note (the report's `generator:`
/// line) says which and why.
fn resolve_generator(generator: &mut String) -> Result<String> {
    Ok(match generator.as_str() {
        "auto" => match ab::pktgen::available() {
            Ok(()) => {
                *generator = "pktgen".into();
                "pktgen (auto: this kernel has it)".to_string()
            }
            Err(why) => {
                *generator = "af-packet".into();
                format!("af-packet (auto: no pktgen: {why})")
            }
        },
        "pktgen" => {
            ab::pktgen::available().map_err(|e| anyhow::anyhow!("--generator pktgen: {e}"))?;
            "pktgen".to_string()
        }
        g => g.to_string(),
    })
}

fn report(variants: &[Variant], layout: &Layout, generator: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "generator: {generator}");
    let _ = writeln!(
        md,
        "layout: {}",
        if !layout.is_split() {
            "shared (load and gateways anywhere)".to_string()
        } else {
            format!(
                "split: west (under test) on CPU {}; generator, sink and east on CPU {}",
                espada_pinning::format_cpu_list(&layout.west),
                espada_pinning::format_cpu_list(&layout.others)
            )
        }
    );
    md.push_str("\n| variant | ran | sent | not sent (sunset's socket or ring full) | west black tx | received | loss | Gbit/s received (UDP payload) | CPU usr/sys/softirq % |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for v in variants {
        md.push_str(&ab_row(v));
    }
    if variants.iter().any(|v| !v.ndr.is_empty()) {
        md.push_str("\n| variant | frame size | no-drop rate (kpps) | Gbit/s | loss | trials | CPU usr/sys/softirq % at that rate |\n|---|---|---:|---:|---:|---:|---|\n");
        for v in variants {
            for n in &v.ndr {
                let at = n
                    .trials
                    .iter()
                    .filter(|t| t.loss <= n.loss + 1e-12)
                    .max_by(|a, b| a.pps_received.total_cmp(&b.pps_received))
                    .map(|t| cpu_cell(&t.cpu))
                    .unwrap_or_default();
                if n.pps == 0.0 {
                    // No trial met the threshold: there is no rate to give.
                    let _ = writeln!(
                        md,
                        "| {} | {} | none found | - | - | {} | - |",
                        v.name,
                        n.size,
                        n.trials.len()
                    );
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {:.3} | {:.3}% | {} | {at} |",
                    v.name,
                    n.size,
                    n.pps / 1e3,
                    n.gbps,
                    n.loss * 100.0,
                    n.trials.len()
                );
            }
        }
    }
    md.push('\n');
    if let Some(l) = variants
        .iter()
        .find(|v| v.ran && v.forwarded && v.name.starts_with("loop"))
    {
        let _ = writeln!(md, "ceiling: plain routing (loop) received {:.3} Gbit/s; a half near it was limited by the generator or the lab, not by its gateway", l.gbps_received);
        for v in variants
            .iter()
            .filter(|v| v.ran && v.forwarded && !v.name.starts_with("loop"))
        {
            if l.gbps_received > 0.0 {
                let r = v.gbps_received / l.gbps_received;
                let _ = writeln!(
                    md,
                    "  {}: {r:.2}x of the loop{}",
                    v.name,
                    if r >= 0.9 { " (generator-limited)" } else { "" }
                );
            }
        }
    }
    for v in variants.iter().filter(|v| !v.sa_packets.is_empty()) {
        let _ = writeln!(
            md,
            "{}: west's SAs (ip -s xfrm state): {}",
            v.name,
            v.sa_packets
                .iter()
                .map(|(sa, n)| format!("{sa}: {n} packets"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    for v in variants.iter().filter(|v| !v.note.is_empty()) {
        let what = if v.ran { "note" } else { "not run" };
        let _ = writeln!(md, "{}: {what}: {}", v.name, v.note);
    }
    md
}

/// One row of the A/B table: a variant that did not run shows `-`, not zeros that read as
/// measurements (issue 27).
fn ab_row(v: &Variant) -> String {
    if !v.ran {
        return format!("| {} | no | - | - | - | - | - | - | - |\n", v.name);
    }
    if !v.forwarded {
        return format!(
            "| {} | did not forward | - | - | - | - | - | - | - |\n",
            v.name
        );
    }
    format!(
        "| {} | yes | {} | {} | {} | {} | {:.2}% | {:.3} | {} |\n",
        v.name,
        v.sent,
        v.send_errors,
        v.west_black_tx,
        v.received,
        v.loss * 100.0,
        v.gbps_received,
        cpu_cell(&v.cpu)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_that_did_not_run_shows_dashes() {
        let mut v = Variant::not_run("kernel XFRM", "--espada-only");
        assert_eq!(
            ab_row(&v),
            "| kernel XFRM | no | - | - | - | - | - | - | - |\n"
        );
        v.ran = true;
        assert!(ab_row(&v).contains("did not forward"));
        v.forwarded = true;
        v.sent = 100;
        v.west_black_tx = 100;
        v.received = 99;
        v.loss = 0.01;
        v.gbps_received = 1.5;
        v.cpu = vec![ab::CpuUse {
            cpu: 0,
            user: 0.1,
            system: 0.2,
            softirq: 0.3,
            idle: 0.4,
        }];
        assert_eq!(
            ab_row(&v),
            "| kernel XFRM | yes | 100 | 0 | 100 | 99 | 1.00% | 1.500 | cpu0 10/20/30 |\n"
        );
    }
}
