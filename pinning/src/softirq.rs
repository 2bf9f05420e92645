//! Where the kernel's receive work for a gateway's interfaces runs (issue 28). With AF_PACKET and
//! AF_XDP ports a frame is received in the kernel first, in the softirq of the CPU its queue's
//! interrupt points to, or of the CPU RPS (`queues/rx-N/rps_cpus`) steers it to. On a worker's
//! core that softirq takes the core from the poll loop exactly when traffic is heaviest: under
//! 2x overload the lab's worker got 1-6 % of its core and forwarded a tenth of its rate (a
//! receive livelock). `espada pin` never plans it, `espada pin check` fails on it, and `espada run`
//! refuses to start on it.

use crate::{format_cpu_list, parse_cpu_list};
use std::path::Path;

/// Every way the kernel's receive work for `nics` can land on one of `workers`: a queue IRQ
/// whose affinity includes a worker's core, an RPS mask that does. One line each (empty: none).
pub fn on_workers(root: &Path, nics: &[&str], workers: &[usize]) -> Vec<String> {
    let mut out = Vec::new();
    let hit = |cpus: &[usize]| -> Vec<usize> {
        cpus.iter()
            .copied()
            .filter(|c| workers.contains(c))
            .collect()
    };
    let word = |n: usize| {
        if n == 1 {
            "worker core"
        } else {
            "worker cores"
        }
    };
    for nic in nics {
        let base = root.join("sys/class/net").join(nic);
        let mut irqs: Vec<u32> = std::fs::read_dir(base.join("device/msi_irqs"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        irqs.sort_unstable();
        for irq in irqs {
            let Some(cpus) =
                std::fs::read_to_string(root.join(format!("proc/irq/{irq}/smp_affinity_list")))
                    .ok()
                    .and_then(|s| parse_cpu_list(s.trim()).ok())
            else {
                continue;
            };
            let h = hit(&cpus);
            if !h.is_empty() {
                out.push(format!(
                    "{nic}: irq {irq} may run on {} {} (its affinity is {}): its receive softirq would compete with the worker",
                    word(h.len()),
                    format_cpu_list(&h),
                    format_cpu_list(&cpus)
                ));
            }
        }
        let mut queues: Vec<String> = std::fs::read_dir(base.join("queues"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("rx-"))
                    .collect()
            })
            .unwrap_or_default();
        queues.sort();
        for q in queues {
            let Some(mask) = std::fs::read_to_string(base.join("queues").join(&q).join("rps_cpus"))
                .ok()
                .and_then(|s| parse_cpu_mask(s.trim()))
            else {
                continue;
            };
            let h = hit(&mask);
            if !h.is_empty() {
                out.push(format!(
                    "{nic} {q}: RPS steers received frames to {} {} (rps_cpus {}): their softirq would compete with the worker",
                    word(h.len()),
                    format_cpu_list(&h),
                    format_cpu_list(&mask)
                ));
            }
        }
    }
    out
}

/// The kernel's CPU bitmask syntax (`rps_cpus`, `smp_affinity`): hex words of 32 bits,
/// comma-separated, most significant first (`00000000,00000003` is CPUs 0 and 1).
pub fn parse_cpu_mask(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    let words: Vec<&str> = s.split(',').collect();
    for (i, w) in words.iter().rev().enumerate() {
        let v = u32::from_str_radix(w.trim(), 16).ok()?;
        for b in 0..32 {
            if v & (1 << b) != 0 {
                cpus.push(i * 32 + b);
            }
        }
    }
    cpus.sort_unstable();
    Some(cpus)
}

/// Each CPU's softirq share of its time since the last reading, from /proc/stat (`espada run`
/// watches its workers' cores with it).
#[derive(Debug, Default)]
pub struct SoftirqMeter {
    last: std::collections::HashMap<usize, (u64, u64)>,
}

impl SoftirqMeter {
    /// The share (0..1) of `cpus`' time spent in softirq since the previous call (`None` for a
    /// CPU on the first call or when /proc/stat cannot be read).
    pub fn read(&mut self, root: &Path, cpus: &[usize]) -> Vec<(usize, Option<f64>)> {
        let text = std::fs::read_to_string(root.join("proc/stat")).unwrap_or_default();
        let mut now = std::collections::HashMap::new();
        for l in text.lines() {
            let mut f = l.split_whitespace();
            let Some(id) = f
                .next()
                .and_then(|c| c.strip_prefix("cpu"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal ...
            if v.len() >= 7 {
                now.insert(id, (v.iter().sum::<u64>(), v[6]));
            }
        }
        let out = cpus
            .iter()
            .map(|c| {
                let share = match (self.last.get(c), now.get(c)) {
                    (Some(&(t0, s0)), Some(&(t1, s1))) if t1 > t0 => {
                        Some((s1.saturating_sub(s0)) as f64 / (t1 - t0) as f64)
                    }
                    _ => None,
                };
                (*c, share)
            })
            .collect();
        self.last = now;
        out
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn cpu_masks_read_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_mask("00000003"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_mask("00000001,00000000"), Some(vec![32]));
        assert_eq!(parse_cpu_mask("0"), Some(vec![]));
        assert_eq!(parse_cpu_mask("zz"), None);
    }

    #[test]
    fn softirq_share_comes_from_two_readings_of_proc_stat() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        let stat = |soft1: u64| {
            format!("cpu  1 2 3 4 5 6 7 0 0 0\ncpu0 100 0 0 800 0 0 100 0 0 0\ncpu1 100 0 0 800 0 0 {soft1} 0 0 0\n")
        };
        std::fs::write(d.path().join("proc/stat"), stat(0)).unwrap();
        let mut m = SoftirqMeter::default();
        assert_eq!(m.read(d.path(), &[0, 1]), vec![(0, None), (1, None)]);
        // cpu1: 500 more jiffies of softirq out of 500 more in all.
        std::fs::write(
            d.path().join("proc/stat"),
            "cpu  1 2 3 4 5 6 7 0 0 0\ncpu0 200 0 0 1700 0 0 100 0 0 0\ncpu1 100 0 0 800 0 0 500 0 0 0\n",
        )
        .unwrap();
        let r = m.read(d.path(), &[0, 1]);
        assert_eq!(r[0], (0, Some(0.0)));
        assert_eq!(r[1], (1, Some(1.0)));
    }
}
