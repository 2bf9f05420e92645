//! The plan: a pure function of the topology and what the gateway needs. Worker cores, one
//! queue IRQ per worker core on each NIC, flow rules steering each per-CPU SA's UDP source port
//! to its core's queue on the black NIC, RSS hash fields, and the SA → core → queue → IRQ →
//! port table.

use crate::format_cpu_list;
use crate::topology::{Nic, Topology};
use std::fmt::Write as _;

/// What the gateway needs (from its configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Needs {
    /// Gateway name.
    pub gateway: String,
    /// Worker count (0: one per usable core).
    pub workers: usize,
    /// Explicit worker cores from the configuration, if any.
    pub cores: Option<Vec<usize>>,
    /// Red interface.
    pub red: String,
    /// Black interface.
    pub black: String,
    /// Per-CPU SAs the peer sends to us: SA i arrives from UDP port `peer_base_port + i`.
    pub peer_pcpu: usize,
    /// Source port of the peer's per-CPU SA 0.
    pub peer_base_port: u16,
    /// SPI of the peer's per-CPU SA 0 towards us.
    pub in_spi_base: u32,
    /// Our per-CPU SAs: SA i leaves from `base_port + i`.
    pub pcpu: usize,
    /// Source port of our per-CPU SA 0.
    pub base_port: u16,
    /// SPI of our per-CPU SA 0.
    pub out_spi_base: u32,
    /// Allow two workers on SMT siblings of one physical core.
    pub allow_smt: bool,
}

/// One row of the SA table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SaRow {
    /// Per-CPU SA index.
    pub index: usize,
    /// Direction (`in`: the peer's SA arriving here; `out`: ours).
    pub dir: &'static str,
    /// SPI.
    pub spi: u32,
    /// UDP source port.
    pub udp_sport: u16,
    /// Worker core.
    pub core: usize,
    /// NIC queue (black NIC for `in`).
    pub queue: usize,
    /// IRQ of that queue, if known.
    pub irq: Option<u32>,
}

/// An IRQ affinity setting.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IrqPin {
    /// NIC.
    pub nic: String,
    /// Queue.
    pub queue: usize,
    /// IRQ.
    pub irq: u32,
    /// The core its interrupt and receive softirq run on: never a worker's (issue 28: a
    /// softirq on a worker's core starves the poll loop under overload, a receive livelock).
    pub core: usize,
}

/// An ntuple flow rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlowRule {
    /// NIC.
    pub nic: String,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
    /// Queue.
    pub queue: usize,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// What it is for.
    pub needs: Needs,
    /// Worker cores, worker i on `worker_cores[i]`.
    pub worker_cores: Vec<usize>,
    /// IRQ affinities.
    pub irqs: Vec<IrqPin>,
    /// Flow rules on the black NIC.
    pub flow_rules: Vec<FlowRule>,
    /// NICs whose RSS hash for UDP/IPv4 should include ports (`rx-flow-hash udp4 sdfn`).
    pub rss: Vec<String>,
    /// NICs with more queues than workers: spread RSS over the first `n` queues only.
    pub rss_equal: Vec<(String, usize)>,
    /// Per-CPU SA table.
    pub sas: Vec<SaRow>,
    /// Things a person should know (fallbacks, missing hardware).
    pub notes: Vec<String>,
    /// Whether irqbalance must be stopped.
    pub stop_irqbalance: bool,
}

/// Why no plan can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Not enough cores.
    #[error("{want} workers asked for, but only {have} usable cores ({why})")]
    Cores {
        /// Wanted.
        want: usize,
        /// Available.
        have: usize,
        /// Explanation.
        why: String,
    },
    /// Fewer queues than workers.
    #[error("{nic} has {queues} receive queues, fewer than the {workers} workers: lower workers to {queues}, or raise the queue count with `ethtool -L {nic} combined {workers}`")]
    Queues {
        /// NIC.
        nic: String,
        /// Its queues.
        queues: usize,
        /// Workers.
        workers: usize,
    },
    /// A configured core is not online.
    #[error("configured core {0} is not online")]
    Offline(usize),
}

fn queue_irq(nic: &Nic, q: usize) -> Option<u32> {
    nic.irqs
        .iter()
        .find(|i| i.queue == Some(q))
        .map(|i| i.num)
        .or_else(|| {
            // Unnamed IRQs: the n-th MSI vector serves queue n when the counts match.
            (nic.irqs.len() == nic.rx_queues && nic.irqs.iter().all(|i| i.queue.is_none()))
                .then(|| nic.irqs[q].num)
        })
}

/// Makes the plan.
pub fn plan(t: &Topology, n: &Needs) -> Result<Plan, PlanError> {
    let mut notes = t.notes.clone();
    let black = t.nics.get(&n.black);
    let red = t.nics.get(&n.red);
    let nic_node = black
        .and_then(|b| b.node)
        .or_else(|| red.and_then(|r| r.node));
    let worker_cores = worker_cores(t, n, nic_node)?;
    let w = worker_cores.len();
    if let Some(nn) = nic_node {
        let off: Vec<usize> = worker_cores
            .iter()
            .copied()
            .filter(|c| {
                t.cpus
                    .iter()
                    .find(|x| x.id == *c)
                    .is_some_and(|x| x.node != nn)
            })
            .collect();
        if !off.is_empty() {
            notes.push(format!(
                "cores {} are not on the NICs' NUMA node {nn}: packets cross the interconnect",
                format_cpu_list(&off)
            ));
        }
    }
    if !t.isolated.is_empty() && worker_cores.iter().any(|c| !t.isolated.contains(c)) {
        notes.push(format!(
            "not every worker core is isolated (isolcpus={})",
            format_cpu_list(&t.isolated)
        ));
    }
    // Queues and IRQs. A queue's interrupt (and the kernel's receive softirq with it: AF_PACKET,
    // AF_XDP) runs where its IRQ points; on a worker's core it would take that core from the
    // poll loop exactly when traffic is heaviest (a receive livelock: the worker got 1-6 % of
    // its core in the lab). So the IRQs go to the cores the workers leave free, the NIC's
    // NUMA node first and a worker's SMT sibling last; with no core left, they are not pinned
    // and the plan says why. (DPDK polls its queues without interrupts.)
    let irq_cores = irq_cores(t, &worker_cores, nic_node, [red, black], &mut notes);
    let mut irqs = Vec::new();
    let mut rss_equal = Vec::new();
    for nic in [red, black].into_iter().flatten() {
        if !nic.physical {
            continue;
        }
        if nic.rx_queues < w {
            return Err(PlanError::Queues {
                nic: nic.name.clone(),
                queues: nic.rx_queues,
                workers: w,
            });
        }
        for q in 0..w {
            match (queue_irq(nic, q), irq_cores.get(q % irq_cores.len().max(1))) {
                (Some(irq), Some(core)) => irqs.push(IrqPin {
                    nic: nic.name.clone(),
                    queue: q,
                    irq,
                    core: *core,
                }),
                (None, _) => notes.push(format!("{}: no IRQ found for queue {q}", nic.name)),
                (Some(_), None) => {}
            }
        }
        if nic.rx_queues > w {
            notes.push(format!(
                "{} has {} queues for {w} workers: RSS is limited to queues 0..{}",
                nic.name,
                nic.rx_queues,
                w - 1
            ));
            rss_equal.push((nic.name.clone(), w));
        }
    }
    // Flow rules on the black NIC: the peer's per-CPU SA i → queue i mod workers.
    let mut flow_rules = Vec::new();
    let mut sas = Vec::new();
    let black_phys = black.is_some_and(|b| b.physical);
    for i in 0..n.peer_pcpu {
        let q = i % w;
        let port = n.peer_base_port + i as u16;
        if black_phys {
            flow_rules.push(FlowRule {
                nic: n.black.clone(),
                src_port: port,
                dst_port: 4500,
                queue: q,
            });
        }
        sas.push(SaRow {
            index: i,
            dir: "in",
            spi: n.in_spi_base + i as u32,
            udp_sport: port,
            core: worker_cores[q],
            queue: q,
            irq: black.and_then(|b| queue_irq(b, q)),
        });
    }
    for (i, core) in worker_cores.iter().enumerate().take(n.pcpu) {
        sas.push(SaRow {
            index: i,
            dir: "out",
            spi: n.out_spi_base + i as u32,
            udp_sport: n.base_port + i as u16,
            core: *core,
            queue: i,
            irq: black.and_then(|b| queue_irq(b, i)),
        });
    }
    if n.pcpu > w {
        notes.push(format!(
            "{} per-CPU SAs for {w} workers: SAs {w}..{} are never used for sending",
            n.pcpu,
            n.pcpu - 1
        ));
    }
    if n.pcpu < w {
        notes.push(format!(
            "{w} workers but {} per-CPU SAs: cores without one send on the fallback SA",
            n.pcpu
        ));
    }
    if !black_phys {
        notes.push(format!("{} is not a physical NIC here: no flow rules; espada hands packets to the owning core in software", n.black));
    }
    let rss = [red, black]
        .into_iter()
        .flatten()
        .filter(|x| x.physical)
        .map(|x| x.name.clone())
        .collect();
    Ok(Plan {
        needs: n.clone(),
        worker_cores,
        irqs,
        flow_rules,
        rss,
        rss_equal,
        sas,
        notes,
        stop_irqbalance: t.irqbalance_running,
    })
}

/// The worker cores: as configured (each online), or chosen: isolated CPUs first, then the
/// NIC's NUMA node, then low numbers, one thread per physical core unless `allow_smt`.
fn worker_cores(t: &Topology, n: &Needs, nic_node: Option<usize>) -> Result<Vec<usize>, PlanError> {
    Ok(match &n.cores {
        Some(c) => {
            for x in c {
                if !t.cpus.iter().any(|cpu| cpu.id == *x) {
                    return Err(PlanError::Offline(*x));
                }
            }
            c.clone()
        }
        None => {
            let mut cands: Vec<&crate::topology::Cpu> = t.cpus.iter().collect();
            // Isolated first, then the NIC's NUMA node, then low numbers.
            cands.sort_by_key(|c| {
                (
                    !t.isolated.contains(&c.id),
                    nic_node.is_some_and(|nn| c.node != nn),
                    c.id,
                )
            });
            let mut chosen: Vec<usize> = Vec::new();
            for c in &cands {
                if !n.allow_smt && chosen.iter().any(|x| c.siblings.contains(x)) {
                    continue;
                }
                chosen.push(c.id);
            }
            let want = if n.workers == 0 {
                chosen.len()
            } else {
                n.workers
            };
            if chosen.len() < want {
                let why = if n.allow_smt {
                    "online CPUs".into()
                } else {
                    "one thread per physical core; allow_smt to use siblings".to_string()
                };
                return Err(PlanError::Cores {
                    want,
                    have: chosen.len(),
                    why,
                });
            }
            chosen.truncate(want);
            chosen.sort_unstable();
            chosen
        }
    })
}

/// The cores for the NICs' interrupts: online, not a worker's; the NIC's NUMA node first, a
/// worker's SMT sibling last, then low numbers.
fn irq_cores(
    t: &Topology,
    workers: &[usize],
    nic_node: Option<usize>,
    nics: [Option<&crate::topology::Nic>; 2],
    notes: &mut Vec<String>,
) -> Vec<usize> {
    let mut free: Vec<&crate::topology::Cpu> =
        t.cpus.iter().filter(|c| !workers.contains(&c.id)).collect();
    free.sort_by_key(|c| {
        (
            nic_node.is_some_and(|nn| c.node != nn),
            c.siblings.iter().any(|s| workers.contains(s)),
            c.id,
        )
    });
    let free: Vec<usize> = free.into_iter().map(|c| c.id).collect();
    if free.is_empty() && nics.into_iter().flatten().any(|n| n.physical) {
        notes.push(format!(
            "every online core is a worker ({}): no core is left for the NICs' interrupts and receive softirqs, which would then compete with the workers (a receive livelock under overload with AF_PACKET or AF_XDP; DPDK polls without interrupts): leave a core free",
            format_cpu_list(workers)
        ));
    }
    free
}

/// The plan as a commented shell script a person can review, then run.
pub fn render_script(p: &Plan) -> String {
    let mut s = String::new();
    let n = &p.needs;
    let _ = writeln!(
        s,
        "#!/bin/sh\n# espada pinning plan for gateway \"{}\" (red {}, black {})",
        n.gateway, n.red, n.black
    );
    let _ = writeln!(
        s,
        "# Review, then run as root, or use `espada pin apply`.\nset -e\n"
    );
    let _ = writeln!(
        s,
        "# Workers: {} on cores {}",
        p.worker_cores.len(),
        format_cpu_list(&p.worker_cores)
    );
    for (i, c) in p.worker_cores.iter().enumerate() {
        let _ = writeln!(s, "#   worker {i} -> core {c}");
    }
    for note in &p.notes {
        let _ = writeln!(s, "# NOTE: {note}");
    }
    if p.stop_irqbalance {
        let _ = writeln!(s, "\n# irqbalance would move the IRQs below again: stop it.\nsystemctl stop irqbalance || pkill -x irqbalance || true");
    }
    if !p.irqs.is_empty() {
        let _ = writeln!(
            s,
            "\n# Queue IRQs (and their receive softirqs) on cores the workers leave free, never a worker's."
        );
        for i in &p.irqs {
            let _ = writeln!(
                s,
                "echo {} > /proc/irq/{}/smp_affinity_list   # {} queue {}",
                i.core, i.irq, i.nic, i.queue
            );
        }
    }
    if !p.rss.is_empty() {
        let _ = writeln!(
            s,
            "\n# RSS over addresses and UDP ports, so flows spread by port too."
        );
        for nic in &p.rss {
            let _ = writeln!(s, "ethtool -N {nic} rx-flow-hash udp4 sdfn");
        }
        for (nic, w) in &p.rss_equal {
            let _ = writeln!(s, "ethtool -X {nic} equal {w}   # only the workers' queues");
        }
        let _ = writeln!(s, "ethtool -K {} ntuple on", n.black);
    }
    if !p.flow_rules.is_empty() {
        let _ = writeln!(s, "\n# Per-CPU SA steering on the black NIC: the peer's SA i (UDP source port base+i) -> queue i.");
        for r in &p.flow_rules {
            let _ = writeln!(
                s,
                "ethtool -N {} flow-type udp4 src-port {} dst-port {} action {}",
                r.nic, r.src_port, r.dst_port, r.queue
            );
        }
    }
    let _ = writeln!(
        s,
        "\n# Per-CPU SA table\n#   dir  index  spi         udp-sport  core  queue  irq"
    );
    for r in &p.sas {
        let _ = writeln!(
            s,
            "#   {:<4} {:>5}  {:#010x}  {:>9}  {:>4}  {:>5}  {}",
            r.dir,
            r.index,
            r.spi,
            r.udp_sport,
            r.core,
            r.queue,
            r.irq.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    s
}
