//! `--metrics ADDR`: the Prometheus text exposition format (version 0.0.4) of a running
//! gateway over HTTP (`GET /metrics`), from what the workers publish. Counters are cumulative
//! since the gateway started (or since `espada clear` for the worker counters); names and
//! labels follow the Prometheus conventions (`espada_` prefix, base units, `_total` counters,
//! one label per dimension, the same name for the same idea everywhere), and the test suite
//! checks the output with Prometheus' own `promtool check metrics`.
//!
//! The exposition is written by the `prometheus` crate (tikv's, text format 0.0.4: its
//! `TextEncoder`), with its process collector for the standard `process_*` series. Each scrape
//! builds a fresh registry from what the workers published: the workers count in their own
//! cache lines and never touch a Prometheus type.
//!
//! Labels, the same everywhere:
//!
//! | label | values |
//! |---|---|
//! | `worker` | the worker's index (0, 1, ...) |
//! | `direction` | `encap`/`decap` (packets, bytes, SAs), `rx`/`tx` (frames), `in`/`out` (handoffs) |
//! | `side` | `red` (cleartext) or `black` (ESP) |
//! | `tunnel`, `spi` | the tunnel's name, the SA's SPI (`0x...`) |
//! | `reason` | a drop reason (`espada show errors` lists them) |

use crate::conn::{self, ConnLimits, Slots};
use crate::server::Gateway;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One metric family: help, type, and its samples (label set → value).
struct Family {
    help: &'static str,
    counter: bool,
    samples: BTreeMap<Vec<(&'static str, String)>, f64>,
}

/// The families of one scrape, gathered before they go to the `prometheus` registry (a
/// family's samples must all have the same label names; several sources may add to one
/// sample: a worker's rows of one SA).
#[derive(Default)]
struct Exposition {
    families: BTreeMap<&'static str, Family>,
}

const C: bool = true;
const G: bool = false;

/// Drop reasons that are a protocol's normal traffic rather than trouble: RFC 3948 NAT-T
/// keepalives and RFC 4303 TFC dummy packets. Counted in `espada_discarded_total`, not as
/// drops, so a drop alert does not fire on a peer's keepalives.
fn expected_discard(r: espada_dataplane::DropReason) -> bool {
    use espada_dataplane::DropReason as D;
    matches!(r, D::Keepalive | D::Dummy)
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        counter: bool,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        v: f64,
    ) {
        let f = self.families.entry(name).or_insert(Family {
            help,
            counter,
            samples: BTreeMap::new(),
        });
        *f.samples.entry(labels).or_insert(0.0) += v;
    }

    /// The text exposition: these families and the process collector's, through the
    /// `prometheus` crate's registry and text encoder.
    fn text(self) -> String {
        use prometheus::core::Collector;
        let reg = prometheus::Registry::new();
        for (name, f) in self.families {
            let keys: Vec<&str> = f
                .samples
                .keys()
                .next()
                .map(|l| l.iter().map(|(k, _)| *k).collect())
                .unwrap_or_default();
            let opts = prometheus::Opts::new(name, f.help);
            let c: Box<dyn Collector> = if f.counter {
                let Ok(v) = prometheus::CounterVec::new(opts, &keys) else {
                    continue;
                };
                for (labels, x) in &f.samples {
                    let vals: Vec<&str> = labels.iter().map(|(_, v)| v.as_str()).collect();
                    if let Ok(c) = v.get_metric_with_label_values(&vals) {
                        c.inc_by(x.max(0.0));
                    }
                }
                Box::new(v)
            } else {
                let Ok(v) = prometheus::GaugeVec::new(opts, &keys) else {
                    continue;
                };
                for (labels, x) in &f.samples {
                    let vals: Vec<&str> = labels.iter().map(|(_, v)| v.as_str()).collect();
                    if let Ok(g) = v.get_metric_with_label_values(&vals) {
                        g.set(*x);
                    }
                }
                Box::new(v)
            };
            let _ = reg.register(c);
        }
        let _ = reg.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        prometheus::TextEncoder::new()
            .encode_to_string(&reg.gather())
            .unwrap_or_default()
    }
}

/// The exposition text for `gw` now.
pub fn render(gw: &Gateway) -> String {
    let mut e = Exposition::default();
    let db = gw.shared.sadb.load();
    // (SPI, outbound) → tunnel, for the SA series' `tunnel` label.
    let mut tunnel_of: HashMap<(u32, bool), &str> = HashMap::new();
    for t in db.tunnels.iter() {
        for s in t.outbound.all() {
            tunnel_of.insert((s.spi, true), &t.name);
        }
        for s in t.inbound.all().chain(t.draining.iter()) {
            tunnel_of.insert((s.spi, false), &t.name);
        }
    }
    for (i, c) in gw.cells.iter().enumerate() {
        worker_series(&mut e, gw, i, c, &tunnel_of);
    }
    gateway_series(&mut e, gw, &db);
    e.text()
}

/// One worker's series: packets, frames, drops, time, its SAs, its ports.
fn worker_series(
    e: &mut Exposition,
    gw: &Gateway,
    i: usize,
    c: &espada_dataplane::worker::StatsCell,
    tunnel_of: &HashMap<(u32, bool), &str>,
) {
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
            "Frames received and sent, by worker, side and direction (rx, tx).",
            vec![w(), ("side", side.into()), ("direction", dir.into())],
            n as f64,
        );
    }
    // Every reason present at 0 on every worker makes `rate()` work from the start.
    let counts: HashMap<_, _> = s.drops.nonzero().collect();
    for r in espada_dataplane::DropReason::ALL {
        let n = counts.get(r).copied().unwrap_or(0) as f64;
        if expected_discard(*r) {
            e.add(
                "espada_discarded_total",
                C,
                "Packets discarded as their protocol says (NAT-T keepalives, TFC dummy packets): normal traffic, not drops.",
                vec![w(), ("reason", r.label().into())],
                n,
            );
        } else {
            e.add(
                "espada_drops_total",
                C,
                "Packets dropped, by worker and reason (espada's drop reasons; `espada show errors`).",
                vec![w(), ("reason", r.label().into())],
                n,
            );
        }
    }
    for (dir, n) in [("out", s.handoff_out), ("in", s.handoff_in)] {
        e.add(
            "espada_handoffs_total",
            C,
            "Packets handed to (out) or taken from (in) another worker.",
            vec![w(), ("direction", dir.into())],
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
    for (stage, ns) in [("red", s.red_ns), ("black", s.black_ns)] {
        e.add(
            "espada_stage_seconds_total",
            C,
            "Time in a worker's stage (red: receive, classify, seal; black: receive, open, checks) of bursts that carried packets; ÷ the side's rx frames is its cost per packet.",
            vec![w(), ("side", stage.into())],
            ns as f64 / 1e9,
        );
    }
    e.add(
        "espada_worker_heartbeats_total",
        C,
        "Times the worker published its counters (several a second while it polls; a stalled worker's stays still).",
        vec![w()],
        c.heartbeat() as f64,
    );
    if let Ok(v) = c.sas.lock() {
        sa_series(e, i, &v, tunnel_of);
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
            e.add(
                "espada_port_checksums_completed_total",
                C,
                "Frames received with a TCP/UDP checksum their sender left partial (checksum offload on a virtual link), completed before forwarding.",
                vec![w(), ("side", side.into())],
                ps.rx_csum_completed as f64,
            );
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

/// One worker's SA series (`v`: the SAs it published).
fn sa_series(
    e: &mut Exposition,
    i: usize,
    v: &[espada_dataplane::worker::SaStat],
    tunnel_of: &HashMap<(u32, bool), &str>,
) {
    let w = || ("worker", i.to_string());
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
            (
                "tunnel",
                tunnel_of
                    .get(&(spi, outbound))
                    .copied()
                    .unwrap_or("")
                    .to_string(),
            ),
            ("spi", format!("{spi:#010x}")),
            ("direction", if outbound { "encap" } else { "decap" }.into()),
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
            "Encap: last sequence number sent; decap: top of the replay window.",
            k,
            seq as f64,
        );
    }
}

/// The gateway's own series: tunnels, database, neighbors, build, reloads, events.
fn gateway_series(e: &mut Exposition, gw: &Gateway, db: &espada_sadb::db::SaDb) {
    // What the SA database holds, per tunnel: an alert on a tunnel without SAs.
    for t in db.tunnels.iter() {
        for (dir, n) in [
            ("encap", t.outbound.all().count()),
            ("decap", t.inbound.all().count()),
        ] {
            e.add(
                "espada_tunnel_sas",
                G,
                "SAs installed per tunnel and direction (0: the tunnel carries nothing that way).",
                vec![("tunnel", t.name.clone()), ("direction", dir.into())],
                n as f64,
            );
        }
    }
    e.add(
        "espada_sadb_generation",
        G,
        "Snapshot of the SA database in force (grows with every reload or SA change).",
        vec![],
        db.generation as f64,
    );
    let neighbors = gw.shared.neighbors.len() + gw.shared.neighbors6.len();
    e.add(
        "espada_neighbors",
        G,
        "Entries in the neighbor tables (ARP and IPv6 neighbor discovery).",
        vec![],
        neighbors as f64,
    );
    e.add(
        "espada_control_queue_depth",
        G,
        "IKE messages waiting for the control plane.",
        vec![],
        gw.shared.control.len() as f64,
    );
    e.add(
        "espada_build_info",
        G,
        "Always 1; the labels say which espada and which gateway.",
        vec![
            ("version", gw.version.clone()),
            ("gateway", gw.name.clone()),
        ],
        1.0,
    );
    let m = &gw.monitor;
    let started_unix = crate::monitor::unix_now() - gw.started.elapsed().as_secs_f64();
    e.add(
        "espada_config_last_reload_successful",
        G,
        "Whether the last reload was accepted (1) or refused (0); 1 before the first.",
        vec![],
        if m.reload_failed.load(Ordering::Relaxed) {
            0.0
        } else {
            1.0
        },
    );
    let ok_at = f64::from_bits(m.reload_ok_unix.load(Ordering::Relaxed));
    e.add(
        "espada_config_last_reload_success_timestamp_seconds",
        G,
        "When the configuration in force was loaded (start or last accepted reload), UNIX time.",
        vec![],
        if ok_at > 0.0 { ok_at } else { started_unix },
    );
    for (kind, n) in m.counts() {
        e.add(
            "espada_events_total",
            C,
            "Events the gateway published (`espada monitor`), by kind (reload, reload-refused, sa, sa-refused, rekey, acquire, lifetime, ...).",
            vec![("kind", kind.to_string())],
            n as f64,
        );
    }
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
