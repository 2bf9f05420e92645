//! `espada pin plan|apply|check -c FILE [--root DIR]`: worker cores, queue IRQs, flow rules per
//! per-CPU SA and RSS, from the same configuration as the dataplane.

use crate::config::{self, Config};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use espada_pinning::apply::{apply, check, SystemRunner};
use espada_pinning::plan::{plan, render_script, Needs, Plan};
use espada_pinning::topology::{discover, Topology};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum PinCmd {
    /// Print the plan as a commented shell script (or JSON) to review.
    Plan(PinArgs),
    /// Apply the plan: IRQ affinity, RSS and flow rules (idempotent; refuses clearly).
    Apply(PinArgs),
    /// Compare the host with the plan: irqbalance, isolation, IRQs, pause frames, drops.
    Check(PinArgs),
}

#[derive(Args)]
pub struct PinArgs {
    /// Gateway configuration.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// sysfs/procfs root to read (and, for apply, write): `/` on a real host.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// JSON instead of a script (plan only).
    #[arg(long)]
    json: bool,
    /// Allow workers on SMT siblings of one physical core.
    #[arg(long)]
    allow_smt: bool,
    /// Check only: warnings fail too (exit 1), for scripts that gate on a clean host.
    #[arg(long)]
    strict: bool,
}

/// What the pinning planner needs from a configuration.
pub fn needs(c: &Config, allow_smt: bool) -> Result<Needs> {
    let t = c.tunnels.first().context("no tunnel")?;
    Ok(Needs {
        gateway: c.name.clone(),
        workers: c.workers,
        cores: c.cores.clone(),
        red: c
            .red
            .as_ref()
            .map(|p| p.interface.clone())
            .context("[red] is needed")?,
        black: c
            .black
            .as_ref()
            .map(|p| p.interface.clone())
            .context("[black] is needed")?,
        peer_pcpu: t.peer_pcpu,
        peer_base_port: t.peer_base_port,
        in_spi_base: t.in_spi_of(Some(0)),
        pcpu: t.pcpu,
        base_port: t.base_port,
        out_spi_base: t.out_spi_of(Some(0)),
        allow_smt,
    })
}

/// Discovers the host and plans (also used by `espada run` to choose worker cores).
pub fn make_plan(c: &Config, root: &std::path::Path, allow_smt: bool) -> Result<(Topology, Plan)> {
    let n = needs(c, allow_smt)?;
    let topo = discover(root, &[&n.red, &n.black])
        .with_context(|| format!("reading the host under {}", root.display()))?;
    let p =
        plan(&topo, &n).map_err(|e| anyhow::anyhow!("no plan for gateway \"{}\": {e}", c.name))?;
    Ok((topo, p))
}

pub fn run(cmd: PinCmd) -> Result<ExitCode> {
    let (a, what) = match cmd {
        PinCmd::Plan(a) => (a, "plan"),
        PinCmd::Apply(a) => (a, "apply"),
        PinCmd::Check(a) => (a, "check"),
    };
    let c = match config::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let (topo, p) = match make_plan(&c, &a.root, a.allow_smt) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    match what {
        "plan" => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", render_script(&p));
            }
        }
        "apply" => {
            let r = apply(&p, &a.root, &mut SystemRunner);
            for d in &r.done {
                println!("done:      {d}");
            }
            for d in &r.unchanged {
                println!("unchanged: {d}");
            }
            for d in &r.refused {
                println!("refused:   {d}");
            }
            if !r.refused.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        _ => {
            let f = check(&p, &topo, &a.root, &mut SystemRunner);
            for x in &f {
                println!("{:<4} {}", x.level, x.what);
            }
            for n in &p.notes {
                println!("note {n}");
            }
            if f.iter()
                .any(|x| x.level == "bad" || (a.strict && x.level == "warn"))
            {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
