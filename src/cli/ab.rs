//! `espada ab`: the A/B against kernel XFRM. Builds the namespace lab twice, once with the
//! kernel doing IPsec (configured from `espada xfrm`, per-CPU SAs with `pcpu-num` when the
//! kernel has them) and once with espada, sends the same UDP load through both, and writes one
//! report (table, JSON, plot) with both side by side.
//!
//! On a kernel without ESP (CONFIG_INET_ESP off, like the CI machines) it says so in one line
//! and exits 1; `--espada-only` still measures the espada half, and `--print-setup kernel|espada`
//! shows the exact commands either half runs.

use crate::config::{self, Config};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use espada_benches::ab::{self, measure, probe_kernel_esp, setup, AbLoad, Variant};
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
    /// Seconds of traffic per variant.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// UDP payload bytes per datagram.
    #[arg(long, default_value_t = 1300)]
    size: usize,
    /// Parallel UDP flows (distinct source ports).
    #[arg(long, default_value_t = 4)]
    flows: usize,
    /// Namespace name prefix.
    #[arg(long, default_value = "ab-")]
    prefix: String,
    /// Report directory (default: a new directory per run,
    /// `~/.local/state/espada/ab-DATE-TIME`, or under $XDG_STATE_HOME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure only the espada half (for kernels without ESP).
    #[arg(long)]
    espada_only: bool,
    /// Print the commands that set up one half (`kernel` or `espada`) and exit.
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
        #[arg(long)]
        size: usize,
        #[arg(long)]
        flows: usize,
        #[arg(long)]
        duration: f64,
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
            size,
            flows,
            duration,
        } => println!("{}", ab::send(dst, port, size, flows, duration)),
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
    let load = AbLoad {
        prefix: a.prefix.clone(),
        duration: a.duration,
        size: a.size,
        flows: a.flows,
    };
    if let Some(which) = &a.print_setup {
        let kernel = match which.as_str() {
            "kernel" => true,
            "espada" => false,
            s => bail!("--print-setup must be kernel or espada, got {s}"),
        };
        for c in setup(&a.prefix, &w, &e, kernel, true, &me)? {
            println!("{c}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let probe = probe_kernel_esp(&a.prefix);
    let kernel_ok = match &probe {
        Ok(_) => true,
        Err(msg) if !a.espada_only => {
            eprintln!("espada ab: this kernel cannot do ESP, so there is no kernel XFRM half to compare with (ip xfrm state add: {msg}); run it on a host or VM whose kernel has CONFIG_INET_ESP, or use --espada-only");
            return Ok(ExitCode::from(1));
        }
        Err(_) => false,
    };
    std::fs::create_dir_all(&out)?;
    let mut variants = Vec::new();
    if kernel_ok && !a.espada_only {
        let pcpu = probe.as_ref().map(|p| *p).unwrap_or(false);
        variants.push(measure(
            &load,
            &me,
            if pcpu {
                "kernel XFRM, per-CPU SAs"
            } else {
                "kernel XFRM, one SA"
            },
            &setup(&a.prefix, &w, &e, true, pcpu, &me)?,
        )?);
    } else {
        variants.push(Variant {
            name: "kernel XFRM".into(),
            ran: false,
            note: probe.err().unwrap_or_else(|| "--espada-only".into()),
            sent: 0,
            received: 0,
            gbps_received: 0.0,
            loss: 0.0,
        });
    }
    variants.push(measure(
        &load,
        &me,
        "espada, per-CPU SAs",
        &setup(&a.prefix, &w, &e, false, true, &me)?,
    )?);
    if let Some(v) = variants.iter().find(|v| v.ran && v.received == 0) {
        eprintln!("espada ab: nothing reached sunrise through \"{}\": the lab did not forward (see `--print-setup`)", v.name);
        return Ok(ExitCode::from(1));
    }
    let mut md = String::from("| variant | ran | sent | received | loss | Gbit/s received (UDP payload) |\n|---|---|---:|---:|---:|---:|\n");
    for v in &variants {
        md.push_str(&ab_row(v));
    }
    print!("{md}");
    for v in variants.iter().filter(|v| !v.ran) {
        println!("{}: not run ({})", v.name, v.note);
    }
    std::fs::write(out.join("ab.md"), &md)?;
    std::fs::write(
        out.join("ab.json"),
        serde_json::to_string_pretty(&variants)? + "\n",
    )?;
    println!("wrote {}/ab.{{md,json}}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// One row of the A/B table: a variant that did not run shows `-`, not zeros that read as
/// measurements (issue 27).
fn ab_row(v: &Variant) -> String {
    if !v.ran {
        return format!("| {} | no | - | - | - | - |\n", v.name);
    }
    format!(
        "| {} | yes | {} | {} | {:.2}% | {:.3} |\n",
        v.name,
        v.sent,
        v.received,
        v.loss * 100.0,
        v.gbps_received
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_that_did_not_run_shows_dashes() {
        let mut v = Variant {
            name: "kernel XFRM".into(),
            ran: false,
            note: "--espada-only".into(),
            sent: 0,
            received: 0,
            gbps_received: 0.0,
            loss: 0.0,
        };
        assert_eq!(ab_row(&v), "| kernel XFRM | no | - | - | - | - |\n");
        v.ran = true;
        v.sent = 100;
        v.received = 99;
        v.loss = 0.01;
        v.gbps_received = 1.5;
        assert_eq!(
            ab_row(&v),
            "| kernel XFRM | yes | 100 | 99 | 1.00% | 1.500 |\n"
        );
    }
}
