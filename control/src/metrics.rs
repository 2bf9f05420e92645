//! `--metrics ADDR`: the Prometheus text exposition format (version 0.0.4) of a running
//! gateway over HTTP (`GET /metrics`), from what the workers publish. Counters are cumulative
//! since the gateway started; names and labels follow the Prometheus conventions (`espada_`
//! prefix, base units, `_total` counters, one label per dimension), and the test suite checks
//! the output with Prometheus' own `promtool check metrics`.
//!
//! The format is written here rather than with `prometheus-client`: that crate writes
//! OpenMetrics, whose counter families (`# TYPE x counter` over samples `x_total`) promtool's
//! text-format check reads as metrics without help or type.

use crate::conn::{self, ConnLimits, Slots};
use crate::server::Gateway;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One metric family: help, type, and its samples (label set → value).
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: BTreeMap<Vec<(&'static str, String)>, f64>,
}

#[derive(Default)]
struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        v: f64,
    ) {
        let f = self.families.entry(name).or_insert(Family {
            help,
            kind,
            samples: BTreeMap::new(),
        });
        *f.samples.entry(labels).or_insert(0.0) += v;
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (labels, v) in &f.samples {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, val)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let esc = val
                            .replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n");
                        let _ = write!(out, "{k}=\"{esc}\"");
                    }
                    out.push('}');
                }
                if v.fract() == 0.0 && v.abs() < 9.0e15 {
                    let _ = writeln!(out, " {}", *v as i64);
                } else {
                    let _ = writeln!(out, " {v}");
                }
            }
        }
        out
    }
}

/// The exposition text for `gw` now.
pub fn render(gw: &Gateway) -> String {
    let mut e = Exposition::default();
    const C: &str = "counter";
    const G: &str = "gauge";
    for (i, c) in gw.cells.iter().enumerate() {
        let w = || ("worker", i.to_string());
        let s = c.read();
        for (dir, p, b) in [
            ("encap", s.encap_packets, s.encap_bytes),
            ("decap", s.decap_packets, s.decap_bytes),
            ("bypass", s.bypass_packets, 0),
        ] {
            e.add(
                "espada_packets_total",
                C,
                "Packets processed, by worker and direction (encap, decap, bypass).",
                vec![w(), ("direction", dir.into())],
                p as f64,
            );
            if dir != "bypass" {
                e.add(
                    "espada_inner_bytes_total",
                    C,
                    "Inner IP bytes encapsulated or decapsulated.",
                    vec![w(), ("direction", dir.into())],
                    b as f64,
                );
            }
        }
        for (side, dir, n) in [
            ("red", "rx", s.red_rx),
            ("red", "tx", s.red_tx),
            ("black", "rx", s.black_rx),
            ("black", "tx", s.black_tx),
        ] {
            e.add(
                "espada_frames_total",
                C,
                "Frames received and sent, by worker, side and direction.",
                vec![w(), ("side", side.into()), ("dir", dir.into())],
                n as f64,
            );
        }
        for (r, n) in s.drops.nonzero() {
            e.add(
                "espada_drops_total",
                C,
                "Packets dropped, by worker and reason (espada's drop reasons).",
                vec![w(), ("reason", r.label().into())],
                n as f64,
            );
        }
        // Every reason present at 0 on every worker makes `rate()` work from the start.
        for r in espada_dataplane::DropReason::ALL {
            e.add(
                "espada_drops_total",
                C,
                "Packets dropped, by worker and reason (espada's drop reasons).",
                vec![w(), ("reason", r.label().into())],
                0.0,
            );
        }
        for (way, n) in [("out", s.handoff_out), ("in", s.handoff_in)] {
            e.add(
                "espada_handoffs_total",
                C,
                "Packets handed to (out) or taken from (in) another worker.",
                vec![w(), ("way", way.into())],
                n as f64,
            );
        }
        e.add(
            "espada_shared_sa_order_waits_total",
            C,
            "Bursts on a shared SA that waited for another worker's burst to reach the wire first (shared_sa_order = \"wire\").",
            vec![w()],
            s.order_waits as f64,
        );
        e.add(
            "espada_busy_seconds_total",
            C,
            "Time the worker spent in bursts that carried packets.",
            vec![w()],
            s.busy_ns as f64 / 1e9,
        );
        if let Ok(v) = c.sas.lock() {
            // One series per (SA, direction) and worker: what the worker sends on now plus
            // what it sent before it moved on (`retired` rows), so the counter only grows.
            let mut per: BTreeMap<(u32, bool), (u64, u64, u64)> = BTreeMap::new();
            for sa in v.iter() {
                let e = per.entry((sa.spi, sa.outbound)).or_default();
                e.0 += sa.packets;
                e.1 += sa.bytes;
                e.2 = e.2.max(sa.seq);
            }
            for ((spi, outbound), (packets, bytes, seq)) in per {
                let k = vec![
                    w(),
                    ("spi", format!("{spi:#010x}")),
                    ("direction", if outbound { "out" } else { "in" }.into()),
                ];
                e.add(
                    "espada_sa_packets_total",
                    C,
                    "Packets per SA and worker.",
                    k.clone(),
                    packets as f64,
                );
                e.add(
                    "espada_sa_inner_bytes_total",
                    C,
                    "Inner IP bytes per SA and worker.",
                    k.clone(),
                    bytes as f64,
                );
                e.add(
                    "espada_sa_sequence_number",
                    G,
                    "Outbound: last sequence number sent; inbound: top of the replay window.",
                    k,
                    seq as f64,
                );
            }
        }
        if let Ok(p) = c.ports.lock() {
            for (side, ps) in [("red", p[0]), ("black", p[1])] {
                for (what, n) in [
                    ("rx_dropped", ps.rx_dropped),
                    ("tx_dropped", ps.tx_dropped),
                    ("tx_lost", ps.tx_lost),
                    ("rx_filtered", ps.rx_filtered),
                ] {
                    e.add(
                        "espada_port_drops_total",
                        C,
                        "Frames the ports could not receive or send, by kind.",
                        vec![w(), ("side", side.into()), ("kind", what.into())],
                        n as f64,
                    );
                }
            }
        }
        if let Some(q) = gw.shared.handoff.get(i) {
            e.add(
                "espada_handoff_queue_depth",
                G,
                "Packets waiting in a worker's handoff queue.",
                vec![w()],
                q.len() as f64,
            );
        }
    }
    e.add(
        "espada_control_queue_depth",
        G,
        "IKE messages waiting for the control plane.",
        vec![],
        gw.shared.control.len() as f64,
    );
    e.add(
        "espada_uptime_seconds",
        G,
        "Seconds since the gateway started.",
        vec![],
        gw.started.elapsed().as_secs_f64(),
    );
    e.text()
}

/// A served metrics endpoint; dropping it stops the thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    slots: Arc<Slots>,
}

/// A metrics listener bound and not served yet (bound before the gateway opens its ports).
pub struct BoundMetrics {
    l: TcpListener,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` (e.g. `127.0.0.1:9100`, port 0 for any).
    pub fn bind(addr: &str) -> io::Result<BoundMetrics> {
        // `:9100`, as Prometheus exporters take it: every IPv4 address.
        let full;
        let addr = match addr.strip_prefix(':') {
            Some(port) => {
                full = format!("0.0.0.0:{port}");
                full.as_str()
            }
            None => addr,
        };
        let l = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("--metrics {addr}: {e}")))?;
        let addr = l.local_addr()?;
        Ok(BoundMetrics { l, addr })
    }

    /// Listens on `addr` and serves `GET /metrics`.
    pub fn start(addr: &str, gw: Arc<Gateway>) -> io::Result<MetricsServer> {
        Self::bind(addr)?.serve(gw)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections refused because [`ConnLimits::METRICS`] clients were being served.
    pub fn refused(&self) -> usize {
        self.slots.refused()
    }
}

impl BoundMetrics {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics`: a blocking accept, each client on a thread of its own, at most
    /// [`ConnLimits::METRICS`]`.max_clients` at once, one deadline per connection, a bounded
    /// request head.
    pub fn serve(self, gw: Arc<Gateway>) -> io::Result<MetricsServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Slots::default());
        let l = self.l;
        let thread = conn::accept_loop(
            "espada-metrics",
            std::iter::repeat_with(move || l.accept().map(|(s, _)| s)),
            stop.clone(),
            slots.clone(),
            ConnLimits::METRICS,
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            move |s, lim| {
                let _ = serve(s, &gw, lim);
            },
        )?;
        Ok(MetricsServer {
            addr: self.addr,
            stop,
            thread: Some(thread),
            slots,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread (an unspecified address is reached on loopback).
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(s: std::net::TcpStream, gw: &Gateway, lim: ConnLimits) -> io::Result<()> {
    let deadline = Instant::now() + lim.deadline;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut buf = Vec::new();
    let mut head = lim.max_request;
    conn::read_line(&mut r, &s, &mut buf, head, deadline)?;
    let first = String::from_utf8_lossy(&buf).into_owned();
    head = head.saturating_sub(buf.len());
    // Skip the headers (within the same bound and deadline).
    for _ in 0..100 {
        let n = conn::read_line(&mut r, &s, &mut buf, head, deadline)?;
        head = head.saturating_sub(n);
        if n == 0 || buf == b"\r\n" || buf == b"\n" {
            break;
        }
    }
    conn::arm(&s, deadline)?;
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let metrics = path == "/metrics" || path.starts_with("/metrics?");
    let (status, ctype, body) = match method {
        // HEAD: the headers GET would send (monitoring probes use it), no body.
        "GET" | "HEAD" if metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(gw),
        ),
        _ if metrics => (
            "405 Method Not Allowed\r\nAllow: GET, HEAD",
            "text/plain",
            "GET or HEAD /metrics\n".to_string(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "espada serves /metrics\n".to_string(),
        ),
    };
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if method == "HEAD" { "" } else { body.as_str() }
    )?;
    w.flush()
}
