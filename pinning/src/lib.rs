//! espada-pinning: the lab's tuning scripts as a planner.
//!
//! * [`topology::discover`] reads CPUs, SMT siblings, NUMA nodes, `isolcpus`/`nohz_full`, each
//!   NIC's node, queues and IRQs, and irqbalance from a sysfs/procfs root;
//! * [`plan::plan`] is a pure function of that topology and the gateway's needs: worker cores,
//!   IRQ affinities, flow rules per per-CPU SA, RSS, and the SA → core → queue → IRQ → port table;
//! * [`plan::render_script`] writes it as a reviewable shell script; [`apply::apply`] applies it
//!   (idempotently) and [`apply::check`] compares a host with it.
//!
//! Also the kernel's CPU-list syntax (`0-3,8,10-11`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod apply;
pub mod plan;
pub mod softirq;
pub mod topology;

use std::fmt::Write as _;

/// A bad CPU list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// A part is not a number or a range `a-b` with a <= b.
    #[error("bad CPU list `{list}`: `{part}` is not a CPU number or a range like 2-5")]
    Syntax {
        /// The whole list.
        list: String,
        /// The offending part.
        part: String,
    },
    /// A CPU number above the supported maximum.
    #[error("bad CPU list `{list}`: CPU {cpu} is above the maximum of {max}")]
    TooLarge {
        /// The whole list.
        list: String,
        /// The CPU.
        cpu: usize,
        /// The maximum.
        max: usize,
    },
}

/// Largest CPU number accepted (Linux's default NR_CPUS on x86_64 is 8192).
pub const MAX_CPU: usize = 8191;

/// Parses `0-3,8,10-11` into a sorted, de-duplicated list. Empty input is an empty list.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, CpuListError> {
    let mut out = Vec::new();
    let list = s.trim();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let syntax = || CpuListError::Syntax {
            list: list.to_string(),
            part: part.to_string(),
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<usize>().map_err(|_| syntax())?,
                b.trim().parse::<usize>().map_err(|_| syntax())?,
            ),
            None => {
                let v = part.parse::<usize>().map_err(|_| syntax())?;
                (v, v)
            }
        };
        if a > b {
            return Err(syntax());
        }
        if b > MAX_CPU {
            return Err(CpuListError::TooLarge {
                list: list.to_string(),
                cpu: b,
                max: MAX_CPU,
            });
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Prints a list in the kernel's compact form (`0-3,8`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut s = String::new();
    let mut i = 0;
    while i < v.len() {
        let start = v[i];
        let mut end = start;
        while i + 1 < v.len() && v[i + 1] == end + 1 {
            i += 1;
            end = v[i];
        }
        if !s.is_empty() {
            s.push(',');
        }
        if start == end {
            let _ = write!(s, "{start}");
        } else {
            let _ = write!(s, "{start}-{end}");
        }
        i += 1;
    }
    s
}

/// Worker cores: `count` cores from `online`, preferring those in `isolated` (kept free of other
/// work by the kernel), in ascending order. `count == 0` means all online cores.
pub fn choose_worker_cores(online: &[usize], isolated: &[usize], count: usize) -> Vec<usize> {
    let want = if count == 0 { online.len() } else { count };
    let mut ordered: Vec<usize> = online
        .iter()
        .copied()
        .filter(|c| isolated.contains(c))
        .collect();
    ordered.extend(online.iter().copied().filter(|c| !isolated.contains(c)));
    ordered.truncate(want);
    ordered.sort_unstable();
    ordered
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parse_and_format() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list(" 3, 1 ,1-2\n").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn errors_name_the_part() {
        assert_eq!(
            parse_cpu_list("0-3,x").unwrap_err().to_string(),
            "bad CPU list `0-3,x`: `x` is not a CPU number or a range like 2-5"
        );
        assert!(matches!(
            parse_cpu_list("5-2"),
            Err(CpuListError::Syntax { .. })
        ));
        assert!(matches!(
            parse_cpu_list("9000"),
            Err(CpuListError::TooLarge { .. })
        ));
    }

    #[test]
    fn isolated_cores_first() {
        let online: Vec<usize> = (0..8).collect();
        assert_eq!(choose_worker_cores(&online, &[6, 7], 2), vec![6, 7]);
        assert_eq!(choose_worker_cores(&online, &[6, 7], 3), vec![0, 6, 7]);
        assert_eq!(choose_worker_cores(&online, &[], 0), online);
    }
}
