//! `espada top`: a running gateway's live view, as `top` is for processes and VPP's `show
//! runtime` for its graph: per worker the packet and bit rates, drops, busy share and the cost
//! per packet of each stage; per SA the busiest, with their rates and drops. Two readings of the
//! control socket an interval apart make each rate. A terminal UI (ratatui) refreshes it;
//! `--once` prints one reading as plain tables and exits (scripts and tests read that).

use super::show::socket_of;
use super::table;
use anyhow::{Context, Result};
use clap::Args;
use espada_control::{client, Request};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct TopArgs {
    /// The gateway's control socket (default: from the configuration's gateway name).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The gateway's configuration (to find its control socket).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Seconds between readings (each rate is over one interval).
    #[arg(long, default_value_t = 1.0, value_parser = interval)]
    interval: f64,
    /// Print one reading (two samples an interval apart) as plain tables and exit.
    #[arg(long)]
    once: bool,
    /// How many SAs to list (the busiest by packets per second).
    #[arg(long, default_value_t = 10)]
    sas: usize,
}

fn interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s}"))?;
    if (0.1..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err("the interval must be between 0.1 and 60 seconds".into())
    }
}

/// One reading of the gateway.
struct Sample {
    at: Instant,
    gateway: String,
    workers: Vec<Value>,
    cpus: Vec<Value>,
    sas: Vec<Value>,
}

fn ask(socket: &Path, what: &str) -> Result<Value> {
    let r = client::request(socket, &Request::new("show", what)).map_err(anyhow::Error::msg)?;
    if !r.ok {
        anyhow::bail!("{}", r.error.unwrap_or_default());
    }
    Ok(r.data)
}

fn sample(socket: &Path) -> Result<Sample> {
    let stats = ask(socket, "stats")?;
    let workers = ask(socket, "workers")?;
    let sas = ask(socket, "sa")?;
    Ok(Sample {
        at: Instant::now(),
        gateway: stats["gateway"].as_str().unwrap_or("?").to_string(),
        workers: stats["workers"].as_array().cloned().unwrap_or_default(),
        cpus: workers["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| w["cpu"].clone())
            .collect(),
        sas: sas["sas"].as_array().cloned().unwrap_or_default(),
    })
}

/// The view: rows of strings for the worker and SA tables, and a summary line.
struct View {
    title: String,
    worker_head: Vec<&'static str>,
    workers: Vec<Vec<String>>,
    sa_head: Vec<&'static str>,
    sas: Vec<Vec<String>>,
}

const WORKER_HEAD: [&str; 10] = [
    "worker",
    "cpu",
    "red rx/s",
    "black rx/s",
    "encap/s",
    "decap/s",
    "Mbit/s",
    "drops/s",
    "busy",
    "ns/pkt enc|dec",
];
const SA_HEAD: [&str; 8] = [
    "tunnel",
    "dir",
    "spi",
    "cpu",
    "packets/s",
    "Mbit/s",
    "drops/s",
    "total packets",
];

fn rate(v: f64) -> String {
    match v {
        v if v >= 10e6 => format!("{:.1}M", v / 1e6),
        v if v >= 10e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn view(a: &Sample, b: &Sample, max_sas: usize) -> View {
    let dt = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0) as f64;
    let d = |x: &Value, y: &Value, k: &str| (n(y, k) - n(x, k)).max(0.0);
    let mut workers = Vec::new();
    let mut tot = [0f64; 6];
    for (i, w) in b.workers.iter().enumerate() {
        let Some(p) = a.workers.get(i) else { continue };
        let (rr, br) = (d(p, w, "red_rx"), d(p, w, "black_rx"));
        let (en, de) = (d(p, w, "encap_packets"), d(p, w, "decap_packets"));
        let bits = (d(p, w, "encap_bytes") + d(p, w, "decap_bytes")) * 8.0;
        let drops = d(p, w, "drops");
        for (t, v) in tot.iter_mut().zip([rr, br, en, de, bits, drops]) {
            *t += v;
        }
        let busy = d(p, w, "busy_ns") / (dt * 1e9);
        let per = |ns: &str, pk: f64| {
            if pk > 0.0 {
                format!("{:.0}", d(p, w, ns) / pk)
            } else {
                "-".into()
            }
        };
        workers.push(vec![
            i.to_string(),
            b.cpus
                .get(i)
                .and_then(Value::as_u64)
                .map_or("-".into(), |c| c.to_string()),
            rate(rr / dt),
            rate(br / dt),
            rate(en / dt),
            rate(de / dt),
            format!("{:.1}", bits / dt / 1e6),
            rate(drops / dt),
            format!("{:.0}%", busy * 100.0),
            format!("{}|{}", per("red_ns", rr), per("black_ns", br)),
        ]);
    }
    workers.push(vec![
        "all".into(),
        "".into(),
        rate(tot[0] / dt),
        rate(tot[1] / dt),
        rate(tot[2] / dt),
        rate(tot[3] / dt),
        format!("{:.1}", tot[4] / dt / 1e6),
        rate(tot[5] / dt),
        "".into(),
        "".into(),
    ]);
    let key = |r: &Value| (r["dir"].to_string(), r["spi"].to_string());
    let before: HashMap<(String, String), &Value> = a.sas.iter().map(|r| (key(r), r)).collect();
    let mut sas: Vec<(f64, Vec<String>)> = b
        .sas
        .iter()
        .map(|r| {
            let p = before.get(&key(r)).copied().unwrap_or(r);
            let pk = d(p, r, "packets");
            let drops =
                d(p, r, "replay_drops") + d(p, r, "integrity_drops") + d(p, r, "other_drops");
            let s = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                v => v.to_string(),
            };
            (
                pk,
                vec![
                    s(&r["tunnel"]),
                    s(&r["dir"]),
                    s(&r["spi"]),
                    s(&r["cpu"]),
                    rate(pk / dt),
                    format!("{:.1}", d(p, r, "bytes") * 8.0 / dt / 1e6),
                    rate(drops / dt),
                    s(&r["packets"]),
                ],
            )
        })
        .collect();
    sas.sort_by(|x, y| y.0.total_cmp(&x.0));
    let total_sas = sas.len();
    sas.truncate(max_sas);
    View {
        title: format!(
            "espada top — gateway {}: {} worker{}, {} SA{} ({} shown, busiest first), over {:.1} s",
            b.gateway,
            b.workers.len(),
            if b.workers.len() == 1 { "" } else { "s" },
            total_sas,
            if total_sas == 1 { "" } else { "s" },
            sas.len(),
            dt
        ),
        worker_head: WORKER_HEAD.to_vec(),
        workers,
        sa_head: SA_HEAD.to_vec(),
        sas: sas.into_iter().map(|(_, r)| r).collect(),
    }
}

fn print_view(v: &View) {
    println!("{}", v.title);
    let mut t = table::new(&v.worker_head, &v.worker_head[1..]);
    for r in &v.workers {
        t.add_row(r.clone());
    }
    print!("{}", table::render(&t));
    println!();
    let mut t = table::new(&v.sa_head, &v.sa_head[3..]);
    for r in &v.sas {
        t.add_row(r.clone());
    }
    print!("{}", table::render(&t));
    println!(
        "ns/pkt enc|dec: time in the red stage (receive, classify, seal) per red frame | in the black stage (receive, open, checks) per black frame; busy: share of the interval in bursts that carried packets"
    );
}

pub fn run(a: TopArgs) -> Result<ExitCode> {
    let socket = match socket_of(&a.socket, &a.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let every = Duration::from_secs_f64(a.interval);
    let first = match sample(&socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    if a.once {
        std::thread::sleep(every);
        let second = sample(&socket)?;
        print_view(&view(&first, &second, a.sas));
        return Ok(ExitCode::SUCCESS);
    }
    live(&socket, first, every, a.sas)
}

/// The live view until `q`, Esc or Ctrl-C.
fn live(socket: &Path, mut prev: Sample, every: Duration, max_sas: usize) -> Result<ExitCode> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
    let mut term = ratatui::try_init().context("the terminal (use --once without one)")?;
    let widths = |n: usize| vec![Constraint::Min(6); n];
    let mut shown: Option<View> = None;
    let mut status = String::from("waiting for the first interval...");
    let result = (|| -> Result<()> {
        let mut next = Instant::now() + every;
        loop {
            term.draw(|f| {
                let [head, w_area, s_area, foot] = Layout::vertical([
                    Constraint::Length(1),
                    Constraint::Length(shown.as_ref().map_or(3, |v| v.workers.len() as u16 + 3)),
                    Constraint::Min(3),
                    Constraint::Length(1),
                ])
                .areas(f.area());
                let bold = Style::default().add_modifier(Modifier::BOLD);
                if let Some(v) = &shown {
                    f.render_widget(Paragraph::new(v.title.clone()).style(bold), head);
                    let t = Table::new(
                        v.workers.iter().map(|r| Row::new(r.clone())),
                        widths(v.worker_head.len()),
                    )
                    .header(Row::new(v.worker_head.clone()).style(bold))
                    .block(Block::default().borders(Borders::TOP).title(" workers "));
                    f.render_widget(t, w_area);
                    let t = Table::new(
                        v.sas.iter().map(|r| Row::new(r.clone())),
                        widths(v.sa_head.len()),
                    )
                    .header(Row::new(v.sa_head.clone()).style(bold))
                    .block(
                        Block::default()
                            .borders(Borders::TOP)
                            .title(" busiest SAs "),
                    );
                    f.render_widget(t, s_area);
                }
                f.render_widget(Paragraph::new(format!("{status}   q: quit")), foot);
            })?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
                continue;
            }
            next += every;
            match sample(socket) {
                Ok(s) => {
                    shown = Some(view(&prev, &s, max_sas));
                    status = format!("every {:.1} s", every.as_secs_f64());
                    prev = s;
                }
                Err(e) => status = format!("cannot read the gateway: {e:#}"),
            }
        }
    })();
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}
