//! `espada show sa|stats|errors|workers|neighbors|policy`: ask a running gateway over its
//! control socket and print the answer as a table, or as JSON with `--json`.

use super::table;
use crate::config;
use anyhow::Result;
use clap::{Args, ValueEnum};
use espada_control::{client, Request};
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
pub enum What {
    /// Every SA: direction, SPI, RFC 9611 CPU, UDP port, owner worker(s), packets, bytes,
    /// sequence number (out) or replay window top (in), lifetimes.
    Sa,
    /// Counters per worker and in total, drops by reason.
    Stats,
    /// Drops by reason, per worker.
    Errors,
    /// Per worker: CPU, bursts, ns per packet, handoffs, port counters.
    Workers,
    /// The ARP table and what ARP was refused.
    Neighbors,
    /// The security policy database in order.
    Policy,
}

#[derive(Args)]
pub struct ShowArgs {
    /// What to show.
    #[arg(value_enum)]
    what: What,
    /// The gateway's control socket (default: from the configuration's gateway name,
    /// /run/espada/NAME.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The gateway's configuration (to find its control socket).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Print the gateway's JSON answer as it is.
    #[arg(long)]
    json: bool,
    /// `show sa`: only this tunnel's SAs.
    #[arg(long)]
    tunnel: Option<String>,
    /// `show sa`: only the SA(s) with this SPI (decimal or 0x hex).
    #[arg(long, value_parser = crate::cli::sa::parse_u32)]
    spi: Option<u32>,
}

#[derive(Args)]
pub struct ReloadArgs {
    /// The gateway's control socket (default: from the configuration's gateway name).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The gateway's configuration (the file it re-reads; also finds its control socket).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
}

/// Asks a running gateway to re-read its configuration (as SIGHUP does).
pub fn reload(a: ReloadArgs) -> Result<ExitCode> {
    ask(&a, "reload", |d| {
        d.get("reload")
            .and_then(Value::as_str)
            .unwrap_or("reload requested; the gateway's log says what it did")
            .to_string()
    })
}

/// Sends `cmd` (no arguments) to the gateway and prints `text` of its answer.
fn ask(a: &ReloadArgs, cmd: &str, text: impl Fn(&Value) -> String) -> Result<ExitCode> {
    let r = socket_of(&a.socket, &a.config)
        .and_then(|socket| client::request(&socket, &Request::new(cmd, "")));
    match r {
        Ok(r) if r.ok => {
            println!("{}", text(&r.data));
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => {
            eprintln!("error: {}", r.error.unwrap_or_default());
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Args)]
pub struct MonitorArgs {
    /// The gateway's control socket (default: from the configuration's gateway name).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The gateway's configuration (to find its control socket).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// One JSON object per event (unix_time, kind, text), as the gateway sends them.
    #[arg(long)]
    json: bool,
}

/// Prints a running gateway's events until it stops or Ctrl-C.
pub fn monitor(a: MonitorArgs) -> Result<ExitCode> {
    use std::io::{BufRead, BufReader, Write};
    let socket = match socket_of(&a.socket, &a.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut s = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "error: cannot reach a gateway on {}: {e} (is `espada run` running, and is this its --control socket?)",
                socket.display()
            );
            return Ok(ExitCode::from(1));
        }
    };
    s.write_all(b"{\"cmd\":\"monitor\"}\n")?;
    let mut lines = BufReader::new(s).lines();
    match lines.next() {
        Some(Ok(first)) => {
            let r: espada_control::Response = serde_json::from_str(&first)?;
            if !r.ok {
                eprintln!("error: {}", r.error.unwrap_or_default());
                return Ok(ExitCode::from(1));
            }
        }
        _ => {
            eprintln!("error: {}: no answer", socket.display());
            return Ok(ExitCode::from(1));
        }
    }
    let out = std::io::stdout();
    for line in lines {
        let line = line?;
        let mut o = out.lock();
        if a.json {
            writeln!(o, "{line}")?;
        } else {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let t = v["unix_time"].as_f64().unwrap_or(0.0);
            let day = (t as u64) % 86_400;
            writeln!(
                o,
                "{:02}:{:02}:{:02} UTC  {:<14} {}",
                day / 3600,
                day / 60 % 60,
                day % 60,
                v["kind"].as_str().unwrap_or("?"),
                v["text"].as_str().unwrap_or("")
            )?;
        }
        o.flush()?;
    }
    eprintln!("the gateway closed the connection (stopped)");
    Ok(ExitCode::SUCCESS)
}

/// Asks a running gateway to zero its worker counters.
pub fn clear(a: ReloadArgs) -> Result<ExitCode> {
    ask(&a, "clear", |d| {
        d["cleared"].as_str().unwrap_or("cleared").to_string()
    })
}

pub(crate) fn socket_of(
    socket: &Option<PathBuf>,
    cfg: &Option<PathBuf>,
) -> Result<PathBuf, String> {
    match (socket, cfg) {
        (Some(s), _) => Ok(s.clone()),
        (None, Some(c)) => config::load(c)
            .map(|c| {
                c.control_socket
                    .clone()
                    .unwrap_or_else(|| espada_control::default_socket(&c.name))
            })
            .map_err(|e| e.to_string()),
        (None, None) => {
            Err("give the gateway's --socket PATH or its configuration with -c FILE".into())
        }
    }
}

pub fn run(a: ShowArgs) -> Result<ExitCode> {
    let socket = match socket_of(&a.socket, &a.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let what = match a.what {
        What::Sa => "sa",
        What::Stats => "stats",
        What::Errors => "errors",
        What::Workers => "workers",
        What::Neighbors => "neighbors",
        What::Policy => "policy",
    };
    if (a.tunnel.is_some() || a.spi.is_some()) && what != "sa" {
        eprintln!("error: --tunnel and --spi filter `show sa` only");
        return Ok(ExitCode::from(2));
    }
    let mut req = Request::new("show", what);
    if what == "sa" {
        let mut f = serde_json::Map::new();
        if let Some(t) = &a.tunnel {
            f.insert("tunnel".into(), Value::from(t.clone()));
        }
        if let Some(s) = a.spi {
            f.insert("spi".into(), Value::from(s));
        }
        if !f.is_empty() {
            req.args = Value::Object(f);
        }
    }
    let r = match client::request(&socket, &req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if !r.ok {
        eprintln!("error: {}", r.error.unwrap_or_default());
        return Ok(ExitCode::from(1));
    }
    let filtered = a.tunnel.is_some() || a.spi.is_some();
    if filtered && r.data["sas"].as_array().is_some_and(|v| v.is_empty()) {
        eprintln!(
            "error: no SA{}{} on this gateway",
            a.tunnel
                .as_ref()
                .map_or(String::new(), |t| format!(" of tunnel \"{t}\"")),
            a.spi
                .map_or(String::new(), |s| format!(" with SPI {s:#010x}"))
        );
        return Ok(ExitCode::from(1));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r.data)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &r.data;
    match a.what {
        What::Sa => print_sa(d),
        What::Stats => print_stats(d),
        What::Errors => print_errors(d),
        What::Workers => print_workers(d),
        What::Neighbors => print_neighbors(d),
        What::Policy => print_policy(d),
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON value as a table cell: strings bare, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// Seconds as a duration cell (`-`: none).
fn secs(v: &Value) -> String {
    v.as_u64().map_or("-".to_string(), table::duration)
}

/// `espada show sa` as text.
fn print_sa(d: &Value) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = text;
    println!(
        "gateway {}: {} mode, {} worker{}",
        s(&d["gateway"]),
        s(&d["mode"]),
        s(&d["workers"]),
        if d["workers"] == 1 { "" } else { "s" }
    );
    let mut t = table::new(
        &[
            "tunnel", "dir", "spi", "cipher", "cpu", "port", "owner", "packets", "bytes",
            "seq/top", "window", "esn", "replay", "auth", "other", "age", "soft in", "hard in",
            "state",
        ],
        &[
            "cpu", "port", "packets", "bytes", "seq/top", "window", "replay", "auth", "other",
            "age", "soft in", "hard in",
        ],
    );
    for r in d["sas"].as_array().into_iter().flatten() {
        let owner = r["owner_cores"]
            .as_array()
            .map(|v| v.iter().map(s).collect::<Vec<_>>().join(","))
            .filter(|x| !x.is_empty())
            .unwrap_or_else(|| "-".into());
        let out = r["dir"] == "out";
        let seq = if out { &r["seq"] } else { &r["replay_top"] };
        // Drops are counted on inbound SAs (the replay window and the ICV are theirs).
        let drop = |k: &str| if out { "-".to_string() } else { s(&r[k]) };
        t.add_row(vec![
            s(&r["tunnel"]),
            s(&r["dir"]),
            s(&r["spi"]),
            s(&r["cipher"]),
            s(&r["cpu"]),
            if out {
                s(&r["udp_src_port"])
            } else {
                "-".into()
            },
            owner,
            s(&r["packets"]),
            s(&r["bytes"]),
            s(seq),
            s(&r["replay_window"]),
            if r["esn"] == true { "yes" } else { "no" }.into(),
            drop("replay_drops"),
            drop("integrity_drops"),
            drop("other_drops"),
            r["added_unix"]
                .as_u64()
                .map_or("-".into(), |a| table::duration(now.saturating_sub(a))),
            match (
                r["soft_expires_in"].as_u64(),
                r["generation_switch_in"].as_u64(),
            ) {
                (Some(x), _) => table::duration(x),
                (None, Some(x)) => format!("{} (gen)", table::duration(x)),
                _ => "-".into(),
            },
            secs(&r["hard_expires_in"]),
            if r["draining"] == true {
                "draining"
            } else if r["next_generation"] == true {
                "next generation (accepted, not yet sent on)"
            } else {
                "live"
            }
            .into(),
        ]);
    }
    print!("{}", table::render(&t));
    println!(
        "replay/auth/other: inbound packets this SA dropped (replay window, failed ICV, bad contents); age: since the oldest core installed it; soft in/hard in: time to its time limits ((gen): lab_rekey replaces it at the next generation switch)"
    );
}

/// `espada show stats` as text.
fn print_stats(d: &Value) {
    let s = text;
    println!(
        "gateway {}: up {}",
        s(&d["gateway"]),
        table::duration(d["uptime_seconds"].as_f64().unwrap_or(0.0) as u64)
    );
    let mut t = table::new(
        &[
            "worker", "red rx", "black rx", "encap", "decap", "red tx", "black tx", "handoffs",
            "drops",
        ],
        &[
            "red rx", "black rx", "encap", "decap", "red tx", "black tx", "handoffs", "drops",
        ],
    );
    let row = |name: String, v: &Value| {
        vec![
            name,
            s(&v["red_rx"]),
            s(&v["black_rx"]),
            s(&v["encap_packets"]),
            s(&v["decap_packets"]),
            s(&v["red_tx"]),
            s(&v["black_tx"]),
            s(&v["handoff_out"]),
            s(&v["drops"]),
        ]
    };
    for w in d["workers"].as_array().into_iter().flatten() {
        t.add_row(row(s(&w["worker"]), w));
    }
    t.add_row(row("all".into(), &d["total"]));
    print!("{}", table::render(&t));
}

/// `espada show errors` as text.
fn print_errors(d: &Value) {
    let s = text;
    let rows = d["errors"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("gateway {}: no drops", s(&d["gateway"]));
    } else {
        let mut t = table::new(&["reason", "total", "per worker"], &["total"]);
        for r in rows {
            t.add_row(vec![s(&r["reason"]), s(&r["total"]), s(&r["per_worker"])]);
        }
        print!("{}", table::render(&t));
    }
}

/// `espada show workers` as text.
fn print_workers(d: &Value) {
    let s = text;
    let mut t = table::new(
        &[
            "worker",
            "cpu",
            "bursts",
            "ns/pkt",
            "handoff→",
            "handoff←",
            "red drop",
            "black drop",
        ],
        &[
            "cpu",
            "bursts",
            "ns/pkt",
            "handoff→",
            "handoff←",
            "red drop",
            "black drop",
        ],
    );
    for w in d["workers"].as_array().into_iter().flatten() {
        let pd = |p: &Value| {
            p["rx_dropped"].as_u64().unwrap_or(0)
                + p["tx_dropped"].as_u64().unwrap_or(0)
                + p["tx_lost"].as_u64().unwrap_or(0)
        };
        t.add_row(vec![
            s(&w["worker"]),
            s(&w["cpu"]),
            s(&w["bursts"]),
            format!("{:.0}", w["ns_per_packet"].as_f64().unwrap_or(0.0)),
            s(&w["handoff_out"]),
            s(&w["handoff_in"]),
            pd(&w["red"]).to_string(),
            pd(&w["black"]).to_string(),
        ]);
    }
    print!("{}", table::render(&t));
    println!(
        "ns/pkt: the worker's busy time (bursts that carried packets) per packet it handled, both directions together; idle polls are not counted"
    );
}

/// `espada show neighbors` as text.
fn print_neighbors(d: &Value) {
    let s = text;
    let mut t = table::new(&["address", "mac", "source"], &[]);
    for e in d["entries"].as_array().into_iter().flatten() {
        t.add_row(vec![
            s(&e["ip"]),
            s(&e["mac"]),
            if e["configured"] == true {
                "configured"
            } else {
                "learned"
            }
            .into(),
        ]);
    }
    print!("{}", table::render(&t));
    println!(
        "learned {}, expired {}, refreshed {}; provisional from requests {} ({} rate-limited, {} pushed out); refused: {} unsolicited, {} for configured entries, {} too soon, {} table full",
        s(&d["learned"]),
        s(&d["expired"]),
        s(&d["refreshed"]),
        s(&d["provisional"]),
        s(&d["provisional_limited"]),
        s(&d["provisional_evicted"]),
        s(&d["refused_unsolicited"]),
        s(&d["refused_configured"]),
        s(&d["refused_too_soon"]),
        s(&d["refused_full"])
    );
}

/// `espada show policy` as text.
fn print_policy(d: &Value) {
    let s = text;
    let mut t = table::new(&["#", "name", "selector", "action"], &["#"]);
    for (i, p) in d["policies"].as_array().into_iter().flatten().enumerate() {
        t.add_row(vec![
            (i + 1).to_string(),
            s(&p["name"]),
            s(&p["selector"]),
            s(&p["action"]),
        ]);
    }
    print!("{}", table::render(&t));
}
