//! Per-core reports shared by `espada demo` and `espada run`: a table like `mpstat -P ALL`,
//! and JSON.

use espada_dataplane::pair::{GatewayHalf, Pair};
use espada_dataplane::worker::{StatsCell, WorkerStats};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

#[derive(Serialize, Clone, Debug)]
pub struct CoreReport {
    pub core: usize,
    pub out_sa: String,
    pub packets: u64,
    pub mpps: f64,
    pub gbps_inner: f64,
    pub ns_per_packet: f64,
    pub handoff_out: u64,
    pub handoff_in: u64,
    pub drops_total: u64,
    pub drops: std::collections::BTreeMap<String, u64>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Report {
    pub seconds: f64,
    pub packet_size: usize,
    pub west: Vec<CoreReport>,
    pub east: Vec<CoreReport>,
    pub sent: u64,
    pub received: u64,
}

pub fn core_report(
    core: usize,
    s: &WorkerStats,
    cell: &StatsCell,
    secs: f64,
    encap: bool,
) -> CoreReport {
    let (p, b) = if encap {
        (s.encap_packets, s.encap_bytes)
    } else {
        (s.decap_packets, s.decap_bytes)
    };
    let out_sa = cell
        .sas
        .lock()
        .map(|v| {
            v.iter()
                .find(|x| x.outbound)
                .map(|x| format!("{:#010x}:{}", x.spi, x.port))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    CoreReport {
        core,
        out_sa,
        packets: p,
        mpps: p as f64 / secs / 1e6,
        gbps_inner: b as f64 * 8.0 / secs / 1e9,
        ns_per_packet: if s.red_rx + s.black_rx + s.handoff_in > 0 {
            s.busy_ns as f64 / (s.red_rx + s.black_rx + s.handoff_in) as f64
        } else {
            0.0
        },
        handoff_out: s.handoff_out,
        handoff_in: s.handoff_in,
        drops_total: s.drops.total(),
        drops: s
            .drops
            .nonzero()
            .map(|(r, n)| (r.label().to_string(), n))
            .collect(),
    }
}

fn half(h: &GatewayHalf, secs: f64, encap: bool) -> Vec<CoreReport> {
    h.workers
        .iter()
        .zip(h.cells.iter())
        .map(|(w, c)| core_report(w.core(), w.stats(), c, secs, encap))
        .collect()
}

impl Report {
    pub fn from_pair(p: &Pair, elapsed: Duration, size: usize) -> Report {
        let secs = elapsed.as_secs_f64();
        Report {
            seconds: secs,
            packet_size: size,
            west: half(&p.west, secs, true),
            east: half(&p.east, secs, false),
            sent: p.sent.packets.load(std::sync::atomic::Ordering::Relaxed),
            received: p
                .received
                .packets
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

pub fn rows(s: &mut String, who: &str, what: &str, v: &[CoreReport]) {
    let (mut p, mut m, mut g, mut d) = (0u64, 0f64, 0f64, 0u64);
    for c in v {
        let _ = writeln!(
            s,
            "{who:<5} {:>4}  {:<17} {:>12} {:>8.3} {:>8.2} {:>8.0} {:>9}/{:<9} {:>7}",
            c.core,
            c.out_sa,
            c.packets,
            c.mpps,
            c.gbps_inner,
            c.ns_per_packet,
            c.handoff_out,
            c.handoff_in,
            c.drops_total
        );
        for (r, n) in &c.drops {
            let _ = writeln!(s, "{:>12} drop {r}: {n}", "");
        }
        p += c.packets;
        m += c.mpps;
        g += c.gbps_inner;
        d += c.drops_total;
    }
    let _ = writeln!(
        s,
        "{who:<5} {:>4}  {:<17} {p:>12} {m:>8.3} {g:>8.2} {:>8} {:>19} {d:>7}   ({what})",
        "all", "", "", ""
    );
}

pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<5} {:>4}  {:<17} {:>12} {:>8} {:>8} {:>8} {:>19} {:>7}",
        "gw",
        "core",
        "out SA:port",
        "packets",
        "Mpps",
        "Gbit/s",
        "ns/pkt",
        "handoff out/in",
        "drops"
    );
    rows(&mut s, "west", "encapsulated", &r.west);
    rows(&mut s, "east", "decapsulated", &r.east);
    let _ = writeln!(s, "Gbit/s counts inner IP bytes; ns/pkt is busy time per packet handled by that gateway's worker (west and east share each core).");
    s
}
