//! Per-core reports shared by `espada demo` and `espada run`: a table like `mpstat -P ALL`,
//! and JSON.

use espada_dataplane::worker::{StatsCell, WorkerStats};
use espada_harness::pair::{GatewayHalf, Pair};
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

/// The SA a core's row names: the one of this direction that carried the most (the one it
/// sends with when nothing was sent), and how many others carried packets too, so a core's
/// total is not credited to one SA when rekeys or several tunnels shared it.
pub fn sa_label(v: &[espada_dataplane::worker::SaStat], encap: bool) -> String {
    let mine: Vec<_> = v.iter().filter(|x| x.outbound == encap).collect();
    // (The first of equals: with nothing sent, the SA the core sends with comes first.)
    let Some(top) = mine
        .iter()
        .filter(|x| !x.retired || x.packets > 0)
        .rev()
        .max_by_key(|x| (x.packets, !x.retired))
    else {
        return String::new();
    };
    let name = if encap && !top.retired {
        format!("{:#010x}:{}", top.spi, top.port)
    } else {
        format!("{:#010x}", top.spi)
    };
    let others = mine
        .iter()
        .filter(|x| x.packets > 0 && !std::ptr::eq(**x, *top))
        .count();
    match others {
        0 => name,
        n => format!("{name} +{n} SA{}", if n == 1 { "" } else { "s" }),
    }
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
        .map(|v| sa_label(&v, encap))
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
            sent: p.sent.packets(),
            received: p.received.packets(),
        }
    }
}

/// One part of a per-core table: the first column's word for its rows (`west`, `out`), what
/// its total row says (`encapsulated`), its cores, and whether each core's drops (by reason,
/// under its row) are shown there (a worker's drops are counted once: give them to one
/// direction's rows only).
pub struct Part<'a> {
    pub who: &'a str,
    pub what: &'a str,
    pub cores: &'a [CoreReport],
    pub drops: bool,
}

/// Per-core rows and a total per part, in one table (`first` and `sa` name the first and third
/// columns).
pub fn core_table(first: &str, sa: &str, parts: &[Part]) -> String {
    let head = [
        first,
        "core",
        sa,
        "packets",
        "Mpps",
        "Gbit/s",
        "ns/pkt",
        "handoff out/in",
        "drops",
        "",
    ];
    let mut t = crate::table::new(
        &head,
        &[
            "core",
            "packets",
            "Mpps",
            "Gbit/s",
            "ns/pkt",
            "handoff out/in",
            "drops",
        ],
    );
    for part in parts {
        let (mut p, mut m, mut g, mut d) = (0u64, 0f64, 0f64, 0u64);
        let dash = || "-".to_string();
        for c in part.cores {
            t.add_row(vec![
                part.who.to_string(),
                c.core.to_string(),
                c.out_sa.clone(),
                c.packets.to_string(),
                format!("{:.3}", c.mpps),
                format!("{:.2}", c.gbps_inner),
                format!("{:.0}", c.ns_per_packet),
                format!("{}/{}", c.handoff_out, c.handoff_in),
                if part.drops {
                    c.drops_total.to_string()
                } else {
                    dash()
                },
                String::new(),
            ]);
            if part.drops {
                for (r, n) in &c.drops {
                    let mut row = vec![String::new(); head.len()];
                    row[2] = format!("  drop {r}");
                    row[8] = n.to_string();
                    t.add_row(row);
                }
            }
            p += c.packets;
            m += c.mpps;
            g += c.gbps_inner;
            d += c.drops_total;
        }
        t.add_row(vec![
            part.who.to_string(),
            "all".into(),
            String::new(),
            p.to_string(),
            format!("{m:.3}"),
            format!("{g:.2}"),
            String::new(),
            String::new(),
            if part.drops { d.to_string() } else { dash() },
            format!("({})", part.what),
        ]);
    }
    crate::table::render(&t)
}

pub fn table(r: &Report) -> String {
    let mut s = core_table(
        "gw",
        "SA:port",
        &[
            Part {
                who: "west",
                what: "encapsulated",
                cores: &r.west,
                drops: true,
            },
            Part {
                who: "east",
                what: "decapsulated",
                cores: &r.east,
                drops: true,
            },
        ],
    );
    let _ = writeln!(s, "Gbit/s counts inner IP bytes; ns/pkt is busy time per packet handled by that gateway's worker (west and east share each core).");
    s
}

/// Fails before a measurement starts when `file` could not be written at its end (a missing
/// directory, no permission), instead of after minutes of work.
pub fn check_writable(file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let existed = file.exists();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    if !existed {
        let _ = std::fs::remove_file(file);
    }
    Ok(())
}

/// As [`check_writable`] for a directory the results go into (made when missing).
pub fn check_dir_writable(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    check_writable(&dir.join(".espada-write-check"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use espada_dataplane::worker::SaStat;

    fn sa(outbound: bool, spi: u32, packets: u64, retired: bool) -> SaStat {
        SaStat {
            outbound,
            spi,
            port: 4501,
            packets,
            retired,
            ..Default::default()
        }
    }

    /// Issue 27 paper cut: the totals credited a whole core's packets to its current SA.
    #[test]
    fn a_core_that_used_several_sas_says_so() {
        let v = [
            sa(true, 0x1001, 0, false),
            sa(true, 0x2001, 0, false),
            sa(false, 0x3001, 5, false),
        ];
        assert_eq!(sa_label(&v, true), "0x00001001:4501");
        assert_eq!(sa_label(&v, false), "0x00003001");
        let v = [
            sa(true, 0x1001, 300, false),
            sa(true, 0x0f01, 700, true),
            sa(true, 0x2001, 10, false),
        ];
        assert_eq!(sa_label(&v, true), "0x00000f01 +2 SAs");
        assert_eq!(sa_label(&v[..1], true), "0x00001001:4501");
    }
}
