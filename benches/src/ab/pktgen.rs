//! The kernel's packet generator as `espada ab`'s load (`--generator pktgen`): kernel threads
//! build and transmit the frames, so at small frames the generator costs a fraction of what a
//! user-space one does, and the load is not limited by sunset's syscalls. pktgen is per network
//! namespace (`/proc/net/pktgen` of the namespace the writer is in, one `kpktgend_N` thread per
//! CPU), so this runs inside sunset like the other generators.
//!
//! Commands are written one per `write` to the files under `/proc/net/pktgen`
//! (Documentation/networking/pktgen.rst); a device file's `Result:` line says whether the last
//! command was taken.

use super::RawLoad;
use anyhow::{bail, Context, Result};
use espada_wire::ethernet::MacAddr;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PG: &str = "/proc/net/pktgen";

/// Whether this kernel has pktgen (loading the module if it is not loaded), and if not why.
pub fn available() -> Result<(), String> {
    let ctrl = Path::new(PG).join("pgctrl");
    if ctrl.exists() {
        return Ok(());
    }
    let why = match Command::new("modprobe").arg("pktgen").output() {
        Ok(o) if o.status.success() => String::new(),
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => e.to_string(),
    };
    if ctrl.exists() {
        Ok(())
    } else if why.is_empty() {
        Err(format!(
            "modprobe pktgen ran but {} is missing",
            ctrl.display()
        ))
    } else {
        Err(format!("modprobe pktgen: {why}"))
    }
}

fn write(file: &str, cmd: &str) -> Result<()> {
    let path = Path::new(PG).join(file);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("pktgen: cannot open {}", path.display()))?;
    f.write_all(cmd.as_bytes())
        .with_context(|| format!("pktgen: `{cmd}` to {}", path.display()))?;
    Ok(())
}

/// A device command, checked against the device file's `Result:` line.
fn dev(iface: &str, cmd: &str) -> Result<()> {
    write(iface, cmd)?;
    let text = std::fs::read_to_string(Path::new(PG).join(iface)).unwrap_or_default();
    match text.lines().find_map(|l| l.trim().strip_prefix("Result:")) {
        Some(r) if r.trim_start().starts_with("OK") => Ok(()),
        Some(r) => bail!("pktgen refused `{cmd}` on {iface}:{r}"),
        None => Ok(()),
    }
}

/// `pkts-sofar` and `errors` of a device file.
pub fn counts(text: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("pkts-sofar:"), field("errors:"))
}

/// The size commands for `sizes` (UDP payload bytes, cycled): `pkt_size` for one size,
/// `imix_weights` (Linux >= 5.11) for several. pktgen's sizes are frames without the FCS.
pub fn size_commands(sizes: &[usize]) -> Vec<String> {
    let mut weights: Vec<(usize, usize)> = Vec::new();
    for s in sizes {
        let frame = s + 14 + 20 + 8;
        match weights.iter_mut().find(|w| w.0 == frame) {
            Some(w) => w.1 += 1,
            None => weights.push((frame, 1)),
        }
    }
    if weights.len() == 1 {
        vec![format!("pkt_size {}", weights[0].0)]
    } else {
        let bins: Vec<String> = weights.iter().map(|(f, w)| format!("{f},{w}")).collect();
        vec![format!("imix_weights {}", bins.join(" "))]
    }
}

/// Sends for `duration` seconds on the thread of the first CPU this process may run on.
pub fn send(
    r: &RawLoad,
    dst_mac: MacAddr,
    sizes: &[usize],
    flows: usize,
    duration: f64,
    rate: Option<u64>,
) -> Result<serde_json::Value> {
    available().map_err(|e| anyhow::anyhow!("pktgen is not available: {e}"))?;
    let cpu = core_affinity::get_core_ids()
        .and_then(|c| c.first().map(|c| c.id))
        .unwrap_or(0);
    write("pgctrl", "reset")?;
    write(
        &format!("kpktgend_{cpu}"),
        &format!("add_device {}", r.iface),
    )?;
    let iface = r.iface.as_str();
    let mut cmds = vec![
        "count 0".to_string(),
        "clone_skb 0".to_string(),
        "flag NO_TIMESTAMP".to_string(),
        format!("dst {}", r.dst),
        format!("src_min {}", r.src),
        format!("src_max {}", r.src),
        format!("dst_mac {}", dst_mac),
        "udp_src_min 40000".to_string(),
        format!("udp_src_max {}", 40000 + flows.max(1) - 1),
        format!("udp_dst_min {}", r.port),
        format!("udp_dst_max {}", r.port),
    ];
    cmds.extend(size_commands(sizes));
    cmds.push(match rate {
        Some(pps) => format!("ratep {}", pps.max(1)),
        None => "delay 0".to_string(),
    });
    for c in &cmds {
        if let Err(e) = dev(iface, c) {
            let _ = write("pgctrl", "reset");
            return Err(e);
        }
    }
    // `start` returns when the threads stop: another thread writes `stop` after the run.
    let runner = std::thread::spawn(|| write("pgctrl", "start"));
    std::thread::sleep(Duration::from_secs_f64(duration));
    write("pgctrl", "stop")?;
    let started = runner
        .join()
        .map_err(|_| anyhow::anyhow!("pktgen start panicked"))?;
    let text = std::fs::read_to_string(Path::new(PG).join(iface)).unwrap_or_default();
    let _ = write("pgctrl", "reset");
    started?;
    let (sent, errors) = counts(&text);
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
    Ok(
        serde_json::json!({"sent": sent, "bytes": (sent as f64 * mean) as u64,
        "send_errors": errors, "seconds": duration, "generator": "pktgen", "cpu": cpu}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_device_file() {
        // The shape of /proc/net/pktgen/<dev> after a run (Linux 6.x).
        let t = "Params: count 0  min_pkt_size: 64  max_pkt_size: 64\n     frags: 0  delay: 0  clone_skb: 0  ifname: s0\n\
                 Current:\n     pkts-sofar: 123456  errors: 7\n     started: 1us  stopped: 2us idle: 0us\n\
                 Result: OK: 1000(c900+d100) usec, 123456 (64byte,0frags)\n";
        assert_eq!(counts(t), (123456, 7));
        assert_eq!(counts("nothing"), (0, 0));
    }

    #[test]
    fn sizes_become_pkt_size_or_imix_weights() {
        assert_eq!(size_commands(&[22]), ["pkt_size 64"]);
        let imix = crate::ab::payloads("imix").unwrap();
        assert_eq!(size_commands(&imix), ["imix_weights 64,7 594,4 1418,1"]);
    }
}
