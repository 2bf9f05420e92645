//! `espada check -c FILE [-c PEER]`: validate and print the SA table per core (keys redacted).

use crate::config::{self, Config};
use anyhow::Result;
use clap::Args;
use espada_sadb::db::{Owner, SaDb, SaMode};
use espada_sadb::selector::Action;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct CheckArgs {
    /// Configuration file; give it twice (`-c west.toml -c east.toml`) to also check that the
    /// two gateways mirror each other.
    #[arg(short = 'c', long = "config", required = true, num_args = 1)]
    configs: Vec<PathBuf>,
    /// Only validate; print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
    /// Print the gateway's name and its red and black ports as shell assignments
    /// (`red_interface='west-red'`, `red_address='10.1.0.1/24'`, `red_mtu='1500'`,
    /// `red_address6=''`, the same for black), for scripts (`eval "$(espada check -c F
    /// --shell)"`): the file read by espada's own parser, not by awk.
    #[arg(long, conflicts_with = "quiet")]
    shell: bool,
}

/// `c`'s ports as shell assignments (values single-quoted).
fn shell_vars(c: &Config) -> String {
    let q = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
    let mut out = format!("gateway_name={}\n", q(&c.name));
    for (side, p) in [("red", &c.red), ("black", &c.black)] {
        let (iface, addr, mtu, addr6) = match p {
            Some(p) => (
                p.interface.clone(),
                format!("{}/{}", p.address, p.prefix.len()),
                p.mtu.to_string(),
                p.address6
                    .map(|(a, pf)| format!("{a}/{}", pf.len()))
                    .unwrap_or_default(),
            ),
            None => Default::default(),
        };
        for (k, v) in [
            ("interface", iface),
            ("address", addr),
            ("mtu", mtu),
            ("address6", addr6),
        ] {
            out.push_str(&format!("{side}_{k}={}\n", q(&v)));
        }
    }
    out
}

pub fn run(a: CheckArgs) -> Result<ExitCode> {
    if a.configs.len() > 2 {
        anyhow::bail!(
            "give one configuration, or two that mirror each other (-c west.toml -c east.toml)"
        );
    }
    let mut loaded = Vec::new();
    let mut failed = false;
    for p in &a.configs {
        match config::load(p) {
            Ok(c) => loaded.push(c),
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        return Ok(ExitCode::from(1));
    }
    if let [w, e] = &loaded[..] {
        let mut m = w.mirror_mismatches(e);
        m.extend(
            e.mirror_mismatches(w)
                .into_iter()
                .filter(|x| x.contains("missing")),
        );
        if !m.is_empty() {
            for x in &m {
                eprintln!("error: {} vs {}: {x}", w.file.display(), e.file.display());
            }
            return Ok(ExitCode::from(1));
        }
    }
    if a.shell {
        for c in &loaded {
            print!("{}", shell_vars(c));
        }
        return Ok(ExitCode::SUCCESS);
    }
    for c in &loaded {
        let db = c.sadb(c.resolved_workers())?;
        if !a.quiet {
            print!("{}", render(c, &db));
        }
    }
    if !a.quiet {
        println!(
            "{} OK{}",
            a.configs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
            if loaded.len() == 2 {
                " (mirror images of each other)"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The SA table of a configuration, per core. Keys are never printed.
pub fn render(c: &Config, db: &SaDb) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "gateway {}: {}{}, sa_mode {}, crypto {}",
        c.name,
        espada_control::supervisor::count(db.workers, "worker", "workers"),
        c.cores
            .as_ref()
            .map(|v| format!(" on cores {}", espada_pinning::format_cpu_list(v)))
            .unwrap_or_default(),
        db.mode.name(),
        c.crypto
            .map(|b| b.to_string())
            .unwrap_or_else(|| "auto".into())
    );
    for (side, p) in [("red", &c.red), ("black", &c.black)] {
        if let Some(p) = p {
            let _ = writeln!(
                s,
                "  {side:<5} {} {}/{}{} mtu {}{}{}",
                p.interface,
                p.address,
                p.prefix.len(),
                p.address6
                    .map(|(a, pf)| format!(" {a}/{}", pf.len()))
                    .unwrap_or_default(),
                p.mtu,
                p.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
                p.gateway6.map(|g| format!(" via {g}")).unwrap_or_default()
            );
        }
    }
    if let Some(d) = &c.dpdk {
        let _ = writeln!(
            s,
            "  dpdk  red {} black {} eal [{}]",
            d.red_port,
            d.black_port,
            d.eal.join(" ")
        );
    }
    for (ip, mac) in &c.neighbors {
        let _ = writeln!(s, "  neighbor {ip} is-at {mac}");
    }
    for (ti, t) in c.tunnels.iter().enumerate() {
        let tun = &db.tunnels[ti];
        let _ = writeln!(
            s,
            "tunnel \"{}\": {} -> {}, {}, esn {}, replay window {}, {}",
            t.name,
            t.local,
            t.remote,
            t.cipher,
            if t.esn { "on" } else { "off" },
            t.replay_window,
            if t.ike {
                "SAs from the IKE daemon (ike = true: the SAs below are placeholders until it installs them)".to_string()
            } else {
                format!("keys from {} (redacted)", t.key_source)
            }
        );
        let subnets = |v: &[espada_sadb::selector::Prefix]| {
            v.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            s,
            "  selectors: {} <-> {}",
            subnets(&t.local_subnets),
            subnets(&t.remote_subnets)
        );
        let _ = writeln!(
            s,
            "  {:>4}  {:<3}  {:<10}  {:<11}  sa",
            "core", "dir", "spi", "udp"
        );
        for core in 0..db.workers {
            let o = db.outbound_for(ti, core);
            let what = match (db.mode, o.cpu) {
                (SaMode::Shared, _) => "the shared SA (all cores)".to_string(),
                (_, Some(i)) => format!("per-CPU SA {i}"),
                (_, None) => "fallback SA (no SA of its own)".to_string(),
            };
            let _ = writeln!(
                s,
                "  {core:>4}  out  {:#010x}  {:>5}->{:<4}  {what}",
                o.spi, o.endpoints.src_port, o.endpoints.dst_port
            );
            for i in tun
                .inbound
                .per_cpu
                .iter()
                .filter(|i| db.inbound_owner(i.spi).map(|x| x.1) == Some(Owner::Core(core)))
            {
                let _ = writeln!(
                    s,
                    "  {core:>4}  in   {:#010x}  {:>5}->{:<4}  peer's per-CPU SA {}",
                    i.spi,
                    i.endpoints.src_port,
                    i.endpoints.dst_port,
                    i.cpu.unwrap_or(0)
                );
            }
        }
        let f = &tun.outbound.fallback;
        if db.mode == SaMode::PerCpu {
            let _ = writeln!(
                s,
                "  {:>4}  out  {:#010x}  {:>5}->{:<4}  fallback SA (cores without their own)",
                "any", f.spi, f.endpoints.src_port, f.endpoints.dst_port
            );
        }
        let f = &tun.inbound.fallback;
        let _ = writeln!(
            s,
            "  {:>4}  in   {:#010x}  {:>5}->{:<4}  {}",
            "any",
            f.spi,
            f.endpoints.src_port,
            f.endpoints.dst_port,
            if db.mode == SaMode::Shared {
                "the shared SA"
            } else {
                "peer's fallback SA"
            }
        );
    }
    let _ = writeln!(s, "policies (first match wins; no match = drop):");
    for (i, p) in db.spd.policies.iter().enumerate() {
        let action = match p.action {
            Action::Protect(t) => format!("protect via \"{}\"", db.tunnels[t].name),
            Action::Bypass => "bypass".into(),
            Action::Discard => "discard".into(),
        };
        let _ = writeln!(
            s,
            "  {:>2}. {:<40} {} {}",
            i + 1,
            p.name,
            p.selector,
            action
        );
    }
    s
}
