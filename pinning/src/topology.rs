//! Host discovery from a sysfs/procfs root (default `/`; tests point it at fake trees).

use crate::{parse_cpu_list, CpuListError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One logical CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cpu {
    /// Logical CPU number.
    pub id: usize,
    /// Physical package (socket).
    pub package: usize,
    /// NUMA node.
    pub node: usize,
    /// Logical CPUs sharing this CPU's physical core (itself included).
    pub siblings: Vec<usize>,
}

/// One interrupt of a NIC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Irq {
    /// IRQ number.
    pub num: u32,
    /// Name from /proc/interrupts (e.g. `mlx5_comp3@pci:0000:3b:00.0`).
    pub name: String,
    /// The queue it serves, when the name says (`mlx5_comp3` → 3, `eth0-TxRx-3` → 3).
    pub queue: Option<usize>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// NUMA node of its PCI device (`None`: unknown or virtual).
    pub node: Option<usize>,
    /// Driver name (`mlx5_core`, `bnxt_en`, `veth`...).
    pub driver: Option<String>,
    /// Receive queues.
    pub rx_queues: usize,
    /// Its queue interrupts, by queue.
    pub irqs: Vec<Irq>,
    /// Whether it is a physical PCI device.
    pub physical: bool,
}

/// What the planner knows about the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    /// Online CPUs.
    pub cpus: Vec<Cpu>,
    /// `isolcpus=` from the kernel command line (CPU numbers only).
    pub isolated: Vec<usize>,
    /// `nohz_full=` from the kernel command line.
    pub nohz_full: Vec<usize>,
    /// Interfaces asked for.
    pub nics: BTreeMap<String, Nic>,
    /// Whether an irqbalance process runs.
    pub irqbalance_running: bool,
    /// What could not be found, in words.
    pub notes: Vec<String>,
}

/// Discovery failures that make planning impossible.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A file the planner cannot do without.
    #[error("cannot read {path}: {err}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Error.
        err: std::io::Error,
    },
    /// Bad CPU list in a system file.
    #[error("{0}")]
    CpuList(#[from] CpuListError),
}

fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The queue number at the end of an IRQ name: `mlx5_comp3@pci:...` → 3, `eth0-TxRx-12` → 12.
pub fn irq_queue(name: &str) -> Option<usize> {
    let base = name.split('@').next().unwrap_or(name);
    let digits: String = base
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .chars()
        .rev()
        .collect();
    if digits.is_empty() {
        return None;
    }
    let lower = base.to_ascii_lowercase();
    if lower.contains("async") || lower.contains("ctrl") || lower.contains("-misc") {
        return None;
    }
    digits.parse().ok()
}

/// Kernel command line values of `key=` (isolcpus may carry flags: `isolcpus=domain,managed_irq,2-5`).
fn cmdline_cpus(cmdline: &str, key: &str) -> Result<Vec<usize>, CpuListError> {
    for tok in cmdline.split_whitespace() {
        if let Some(v) = tok.strip_prefix(&format!("{key}=")) {
            let list: Vec<&str> = v
                .split(',')
                .filter(|p| p.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .collect();
            return parse_cpu_list(&list.join(","));
        }
    }
    Ok(Vec::new())
}

/// Reads the host (or a fake tree) for the given interfaces.
pub fn discover(root: &Path, nics: &[&str]) -> Result<Topology, DiscoveryError> {
    let mut notes = Vec::new();
    let online_s =
        read(root, "sys/devices/system/cpu/online").ok_or_else(|| DiscoveryError::Read {
            path: root.join("sys/devices/system/cpu/online"),
            err: std::io::Error::new(std::io::ErrorKind::NotFound, "no CPU list"),
        })?;
    let online = parse_cpu_list(&online_s)?;
    // NUMA nodes.
    let mut node_of = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(root.join("sys/devices/system/node")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(id) = n.strip_prefix("node").and_then(|x| x.parse::<usize>().ok()) {
                if let Some(l) = read(root, &format!("sys/devices/system/node/{n}/cpulist")) {
                    for c in parse_cpu_list(&l)? {
                        node_of.insert(c, id);
                    }
                }
            }
        }
    }
    if node_of.is_empty() {
        notes
            .push("no NUMA information (sys/devices/system/node): all CPUs taken as node 0".into());
    }
    let mut cpus = Vec::new();
    for &id in &online {
        let t = format!("sys/devices/system/cpu/cpu{id}/topology");
        let package = read(root, &format!("{t}/physical_package_id"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let siblings = read(root, &format!("{t}/thread_siblings_list"))
            .map(|s| parse_cpu_list(&s))
            .transpose()?
            .unwrap_or_else(|| vec![id]);
        cpus.push(Cpu {
            id,
            package,
            node: node_of.get(&id).copied().unwrap_or(0),
            siblings,
        });
    }
    let cmdline = read(root, "proc/cmdline").unwrap_or_default();
    let isolated = cmdline_cpus(&cmdline, "isolcpus")?;
    let nohz_full = cmdline_cpus(&cmdline, "nohz_full")?;
    let irq_names = irq_names(root, &mut notes);
    let mut found = BTreeMap::new();
    for &name in nics {
        if let Some(nic) = nic(root, name, &irq_names, &mut notes) {
            found.insert(name.to_string(), nic);
        }
    }
    let irqbalance_running = irqbalance_running(root);
    Ok(Topology {
        cpus,
        isolated,
        nohz_full,
        nics: found,
        irqbalance_running,
        notes,
    })
}

/// IRQ number → name, from /proc/interrupts (its last column).
fn irq_names(root: &Path, notes: &mut Vec<String>) -> BTreeMap<u32, String> {
    let mut irq_names = BTreeMap::new();
    if let Some(t) = read(root, "proc/interrupts") {
        for l in t.lines().skip(1) {
            let l = l.trim();
            let Some((num, rest)) = l.split_once(':') else {
                continue;
            };
            let Ok(num) = num.trim().parse::<u32>() else {
                continue;
            };
            if let Some(name) = rest.split_whitespace().last() {
                irq_names.insert(num, name.to_string());
            }
        }
    } else {
        notes.push("no /proc/interrupts: IRQ names unknown".into());
    }
    irq_names
}

/// What sysfs says about interface `name`: NUMA node, driver, queues, MSI IRQs.
fn nic(
    root: &Path,
    name: &str,
    irq_names: &BTreeMap<u32, String>,
    notes: &mut Vec<String>,
) -> Option<Nic> {
    let base = format!("sys/class/net/{name}");
    if !root.join(&base).exists() {
        notes.push(format!("interface {name} does not exist on this host"));
        return None;
    }
    let physical = root.join(format!("{base}/device")).exists();
    let node = read(root, &format!("{base}/device/numa_node"))
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(|n| n as usize);
    let driver = std::fs::read_link(root.join(format!("{base}/device/driver")))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().to_string()))
        .or_else(|| read(root, &format!("{base}/device/driver_name")));
    let rx_queues = std::fs::read_dir(root.join(format!("{base}/queues")))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(1);
    let mut irqs = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root.join(format!("{base}/device/msi_irqs"))) {
        let mut nums: Vec<u32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
            .collect();
        nums.sort_unstable();
        for num in nums {
            let n = irq_names.get(&num).cloned().unwrap_or_default();
            irqs.push(Irq {
                num,
                queue: irq_queue(&n),
                name: n,
            });
        }
    }
    if !physical {
        notes.push(format!(
            "interface {name} is not a PCI device ({}): no queue IRQs to pin, no flow rules",
            driver.clone().unwrap_or_else(|| "virtual".into())
        ));
    } else if irqs.is_empty() {
        notes.push(format!(
            "interface {name}: no MSI IRQs found under device/msi_irqs"
        ));
    }
    if physical && node.is_none() {
        notes.push(format!(
            "interface {name}: NUMA node unknown (numa_node = -1)"
        ));
    }
    Some(Nic {
        name: name.to_string(),
        node,
        driver,
        rx_queues,
        irqs,
        physical,
    })
}

/// Whether an irqbalance process runs (it would move the IRQs a plan pins).
fn irqbalance_running(root: &Path) -> bool {
    std::fs::read_dir(root.join("proc"))
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .chars()
                    .all(|c| c.is_ascii_digit())
                    && std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "irqbalance")
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn irq_names() {
        assert_eq!(irq_queue("mlx5_comp3@pci:0000:3b:00.0"), Some(3));
        assert_eq!(irq_queue("bnxt_en-TxRx-12"), Some(12));
        assert_eq!(irq_queue("mlx5_async17@pci:0000:3b:00.0"), None);
        assert_eq!(irq_queue("eth0"), Some(0));
        assert_eq!(irq_queue("timer"), None);
    }

    #[test]
    fn cmdline() {
        let c = "BOOT_IMAGE=/vmlinuz isolcpus=domain,managed_irq,2-5,8 nohz_full=2-5 quiet";
        assert_eq!(cmdline_cpus(c, "isolcpus").unwrap(), vec![2, 3, 4, 5, 8]);
        assert_eq!(cmdline_cpus(c, "nohz_full").unwrap(), vec![2, 3, 4, 5]);
        assert!(cmdline_cpus("quiet", "isolcpus").unwrap().is_empty());
    }
}
