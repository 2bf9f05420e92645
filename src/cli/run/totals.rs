//! The end of a run: the workers joined, the totals printed (per core and direction, per
//! worker, neighbors, the control path, the IKE daemon), the final JSON record written.

use super::start::Running;
use super::RunArgs;
use anyhow::Result;
use espada_benches::report::{core_report, core_table, CoreReport, Part};
use espada_control::supervisor::count;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

impl Running {
    pub fn finish(mut self, a: &RunArgs) -> Result<ExitCode> {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let secs = self.started.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Relaxed);
        let mut done = Vec::new();
        for h in self.workers.drain(..) {
            done.push(h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?);
        }
        let report = |encap: bool| -> Vec<CoreReport> {
            done.iter()
                .zip(self.cells.iter())
                .map(|(w, c)| core_report(w.core(), w.stats(), c, secs, encap))
                .collect()
        };
        let (enc, dec) = (report(true), report(false));
        let s = core_table(
            "dir",
            "SA:port",
            &[
                Part {
                    who: "out",
                    what: "encapsulated",
                    cores: &enc,
                    drops: false,
                },
                Part {
                    who: "in",
                    what: "decapsulated",
                    cores: &dec,
                    drops: true,
                },
            ],
        );
        println!(
            "espada run: gateway \"{}\" stopped after {secs:.1} s; totals:",
            self.c.name
        );
        print!("{s}");
        for w in &done {
            print_worker_totals(w);
        }
        #[cfg(feature = "dpdk")]
        {
            for p in &self.dpdk {
                let s = p.pmd_stats();
                println!(
                    "dpdk port {}: PMD rx {} tx {} rx-bytes {} tx-bytes {} missed {} tx-errors {}",
                    p.id, s[0], s[1], s[2], s[3], s[4], s[5]
                );
            }
            // The ports (and their flow rules) go away only now, after the workers stopped.
            self.dpdk.clear();
        }
        self.print_gateway_totals();
        if let Some(p) = &a.stats_json {
            let mut f = std::fs::OpenOptions::new().append(true).open(p)?;
            let _ = writeln!(
                f,
                "{}",
                serde_json::json!({"final": true, "seconds": secs, "encap": enc, "decap": dec})
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The gateway's own totals: neighbors, buffers reclaimed, IKE dropped or punted.
    fn print_gateway_totals(&mut self) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (family, n) in [
            ("ARP", &self.shared.neighbors.counters),
            ("IPv6 ND", &self.shared.neighbors6.counters),
        ] {
            if family == "IPv6 ND" && l(&n.learned) + l(&n.unsolicited) == 0 {
                continue;
            }
            println!(
                "neighbors ({family}): {} learned, {} expired, {} refreshed; {} provisional from requests ({} rate-limited, {} pushed out); refused: {} unsolicited, {} for configured entries, {} too soon after a change, {} table full",
                l(&n.learned), l(&n.expired), l(&n.refreshed), l(&n.provisional), l(&n.limited), l(&n.evicted), l(&n.unsolicited), l(&n.static_kept), l(&n.too_soon), l(&n.full)
            );
        }
        if self.pool.reclaimed() > 0 {
            println!(
                "{} came back to the pool by being dropped (control path)",
                count(self.pool.reclaimed() as usize, "buffer", "buffers")
            );
        }
        if self.ike_dropped > 0 {
            println!(
                "{} reached the control path (no IKE daemon is attached: dropped there)",
                count(self.ike_dropped as usize, "IKE message", "IKE messages")
            );
        }
        if let Some((t, c)) = self.punt.take() {
            let _ = t.join();
            println!(
                "IKE daemon (--ike-tun): packets {} to it, {} from it; dropped: {} not IKE from our black address, {} queue full, {} write errors",
                l(&c.to_daemon), l(&c.from_daemon), l(&c.not_ike), l(&c.queue_full), l(&c.write_errors)
            );
        }
    }
}

/// One worker's totals at the end: frames per side, handoffs, ARP, ICMP, port drops and
/// losses, burst latency, and its SAs (those that carried traffic, with thousands).
fn print_worker_totals(w: &espada_dataplane::worker::Worker) {
    let st = w.stats();
    let (r, b) = w.ports();
    println!(
        "core {}: red rx {} tx {} | black rx {} tx {} | handoff out {} in {} | arp replies {} requests {} | icmp {} | port drops red {} black {}",
        w.core(), st.red_rx, st.red_tx, st.black_rx, st.black_tx, st.handoff_out, st.handoff_in, st.arp_replies, st.arp_requests, st.icmp_sent,
        r.stats().tx_dropped + r.stats().rx_dropped, b.stats().tx_dropped + b.stats().rx_dropped
    );
    for (side, ps) in [("red", r.stats()), ("black", b.stats())] {
        if ps.tx_lost + ps.tx_oversize + ps.tx_resets > 0 {
            println!(
                "  {side} port: {} lost in {} (link not taking frames), {} over the device MTU",
                count(ps.tx_lost as usize, "frame", "frames"),
                count(
                    ps.tx_resets as usize,
                    "transmit ring reset",
                    "transmit ring resets"
                ),
                ps.tx_oversize
            );
        }
    }
    if let Some(l) = w.burst_latency_us() {
        println!("  burst latency (rx to tx, sampled): p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs", l[0], l[1], l[2], l[3]);
    }
    // Every SA up to a few dozen; with thousands of tunnels, those that carried traffic.
    let many = w.sas().outbound_sas().count() + w.sas().inbound_sas().count() > 64;
    let mut quiet = (0, 0);
    for sa in w.sas().outbound_sas() {
        if many && sa.counters.packets == 0 {
            quiet.0 += 1;
            continue;
        }
        println!(
            "  out SA {:#010x} port {}: {} packets, {} bytes",
            sa.spi, sa.tunnel.src_port, sa.counters.packets, sa.counters.bytes
        );
    }
    for sa in w.sas().inbound_sas() {
        if many && sa.counters.packets == 0 {
            quiet.1 += 1;
            continue;
        }
        println!(
            "  in  SA {:#010x}: {} packets, {} bytes",
            sa.spi, sa.counters.packets, sa.counters.bytes
        );
    }
    if quiet != (0, 0) {
        println!(
            "  and {} outbound, {} inbound {} that carried nothing",
            quiet.0,
            quiet.1,
            if quiet.1 == 1 { "SA" } else { "SAs" }
        );
    }
}
