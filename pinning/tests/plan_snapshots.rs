//! Plans for fake hosts, pinned as snapshots (`UPDATE_SNAPSHOTS=1 cargo test -p espada-pinning`
//! rewrites them), and `apply` against a fake root.

use espada_pinning::apply::{apply, check, Runner};
use espada_pinning::plan::{plan, render_script, Needs, PlanError};
use espada_pinning::topology::discover;
use std::fs;
use std::path::Path;

struct FakeNic {
    name: &'static str,
    node: i32,
    queues: usize,
    driver: &'static str,
    irq_base: u32,
    irq_prefix: &'static str,
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A fake sysfs/procfs: `sockets` sockets of `cores` cores each, `threads` threads per core
/// (Linux numbering: thread t of core c is CPU c + t * total_cores).
fn fake(
    sockets: usize,
    cores: usize,
    threads: usize,
    nics: &[FakeNic],
    cmdline: &str,
    irqbalance: bool,
) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let total_cores = sockets * cores;
    let n = total_cores * threads;
    write(
        r,
        "sys/devices/system/cpu/online",
        &format!("0-{}\n", n - 1),
    );
    let mut nodes: Vec<Vec<usize>> = vec![Vec::new(); sockets];
    for c in 0..n {
        let core = c % total_cores;
        let pkg = core / cores;
        let sib: Vec<String> = (0..threads)
            .map(|t| (core + t * total_cores).to_string())
            .collect();
        write(
            r,
            &format!("sys/devices/system/cpu/cpu{c}/topology/physical_package_id"),
            &format!("{pkg}\n"),
        );
        write(
            r,
            &format!("sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"),
            &format!("{}\n", sib.join(",")),
        );
        nodes[pkg].push(c);
    }
    for (i, cpus) in nodes.iter().enumerate() {
        write(
            r,
            &format!("sys/devices/system/node/node{i}/cpulist"),
            &format!("{}\n", espada_pinning::format_cpu_list(cpus)),
        );
    }
    write(r, "proc/cmdline", &format!("{cmdline}\n"));
    let mut interrupts = String::from("           CPU0       CPU1\n");
    for nic in nics {
        let base = format!("sys/class/net/{}", nic.name);
        write(
            r,
            &format!("{base}/device/numa_node"),
            &format!("{}\n", nic.node),
        );
        write(r, &format!("{base}/device/driver_name"), nic.driver);
        for q in 0..nic.queues {
            fs::create_dir_all(r.join(format!("{base}/queues/rx-{q}"))).unwrap();
            let irq = nic.irq_base + q as u32;
            write(r, &format!("{base}/device/msi_irqs/{irq}"), "msix\n");
            write(
                r,
                &format!("proc/irq/{irq}/smp_affinity_list"),
                &format!("0-{}\n", n - 1),
            );
            interrupts.push_str(&format!(
                " {irq}:  0  0  IR-PCI-MSI {irq}-edge  {}{q}@pci:0000:3b:00.0\n",
                nic.irq_prefix
            ));
        }
        // A non-queue IRQ the planner must ignore.
        let a = nic.irq_base + 100;
        write(r, &format!("{base}/device/msi_irqs/{a}"), "msix\n");
        interrupts.push_str(&format!(
            " {a}:  0  0  IR-PCI-MSI {a}-edge  mlx5_async{a}@pci:0000:3b:00.0\n"
        ));
    }
    write(r, "proc/interrupts", &interrupts);
    if irqbalance {
        write(r, "proc/4242/comm", "irqbalance\n");
    }
    write(
        r,
        "proc/net/softnet_stat",
        "0000a000 00000000 00000001\n0000b000 00000003 00000000\n",
    );
    d
}

fn cx5(name: &'static str, node: i32, queues: usize, irq_base: u32) -> FakeNic {
    FakeNic {
        name,
        node,
        queues,
        driver: "mlx5_core",
        irq_base,
        irq_prefix: "mlx5_comp",
    }
}

fn needs(workers: usize, pcpu: usize) -> Needs {
    Needs {
        gateway: "west".into(),
        workers,
        cores: None,
        red: "ens1f0".into(),
        black: "ens1f1".into(),
        peer_pcpu: pcpu,
        peer_base_port: 4501,
        in_spi_base: 0x2001,
        pcpu,
        base_port: 4501,
        out_spi_base: 0x1001,
        allow_smt: false,
    }
}

fn snapshot(name: &str, text: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/snapshots/{name}.sh"));
    if std::env::var("UPDATE_SNAPSHOTS").is_ok() || !p.exists() && std::env::var("CI").is_err() {
        fs::write(&p, text).unwrap();
    }
    let want =
        fs::read_to_string(&p).unwrap_or_else(|_| panic!("missing snapshot {}", p.display()));
    assert_eq!(
        text, want,
        "plan for {name} changed; rerun with UPDATE_SNAPSHOTS=1 if intended"
    );
}

#[test]
fn lab_host_16_cores_connectx5_red_and_black() {
    let d = fake(
        1,
        16,
        2,
        &[cx5("ens1f0", 0, 16, 100), cx5("ens1f1", 0, 16, 200)],
        "quiet",
        true,
    );
    let t = discover(d.path(), &["ens1f0", "ens1f1"]).unwrap();
    assert_eq!(t.cpus.len(), 32);
    let p = plan(&t, &needs(16, 16)).unwrap();
    assert_eq!(
        p.worker_cores,
        (0..16).collect::<Vec<_>>(),
        "one thread per physical core"
    );
    assert_eq!(p.flow_rules.len(), 16);
    assert_eq!(p.irqs.len(), 32);
    assert!(p.stop_irqbalance);
    let s = render_script(&p);
    assert!(s.contains("ethtool -N ens1f1 flow-type udp4 src-port 4516 dst-port 4500 action 15"));
    // Issue 28: every core is a worker's (one thread per physical core): the interrupts go to
    // the free SMT siblings, never to a worker's core.
    assert!(s.contains("echo 31 > /proc/irq/215/smp_affinity_list   # ens1f1 queue 15"));
    assert!(p.irqs.iter().all(|i| !p.worker_cores.contains(&i.core)));
    snapshot("lab-16core-cx5", &s);
}

#[test]
fn two_sockets_nic_on_node_1() {
    let d = fake(
        2,
        8,
        2,
        &[cx5("ens1f0", 1, 16, 100), cx5("ens1f1", 1, 16, 200)],
        "quiet",
        false,
    );
    let t = discover(d.path(), &["ens1f0", "ens1f1"]).unwrap();
    let p = plan(&t, &needs(4, 4)).unwrap();
    assert_eq!(
        p.worker_cores,
        vec![8, 9, 10, 11],
        "cores on the NIC's node"
    );
    snapshot("two-socket-nic-node1", &render_script(&p));
}

#[test]
fn isolcpus_first() {
    let d = fake(
        1,
        8,
        1,
        &[cx5("ens1f0", 0, 8, 100), cx5("ens1f1", 0, 8, 200)],
        "isolcpus=domain,managed_irq,4-7 nohz_full=4-7",
        false,
    );
    let t = discover(d.path(), &["ens1f0", "ens1f1"]).unwrap();
    assert_eq!(t.isolated, vec![4, 5, 6, 7]);
    let p = plan(&t, &needs(4, 4)).unwrap();
    assert_eq!(p.worker_cores, vec![4, 5, 6, 7]);
    snapshot("isolcpus", &render_script(&p));
}

#[test]
fn fewer_queues_than_workers_is_refused_clearly() {
    let d = fake(
        1,
        8,
        1,
        &[cx5("ens1f0", 0, 8, 100), cx5("ens1f1", 0, 4, 200)],
        "quiet",
        false,
    );
    let t = discover(d.path(), &["ens1f0", "ens1f1"]).unwrap();
    let e = plan(&t, &needs(8, 8)).unwrap_err();
    assert_eq!(
        e,
        PlanError::Queues {
            nic: "ens1f1".into(),
            queues: 4,
            workers: 8
        }
    );
    assert_eq!(e.to_string(), "ens1f1 has 4 receive queues, fewer than the 8 workers: lower workers to 4, or raise the queue count with `ethtool -L ens1f1 combined 8`");
    let e = plan(&t, &needs(9, 9)).unwrap_err();
    assert!(matches!(
        e,
        PlanError::Cores {
            want: 9,
            have: 8,
            ..
        }
    ));
}

#[derive(Default)]
struct Recorder {
    cmds: Vec<String>,
    rules: Vec<String>,
}

impl Runner for Recorder {
    fn run(&mut self, argv: &[String]) -> Result<String, String> {
        let c = argv.join(" ");
        self.cmds.push(c.clone());
        if c.starts_with("ethtool -n") {
            return Ok(self.rules.join("\n"));
        }
        if let Some(rest) = c.strip_prefix("ethtool -N ens1f1 flow-type udp4 src-port ") {
            let v: Vec<&str> = rest.split_whitespace().collect();
            self.rules.push(format!("Filter: {}\n\tRule Type: UDP over IPv4\n\tSrc port: {} mask: 0x0\n\tDest port: {} mask: 0x0\n\tAction: Direct to queue {}\n", self.rules.len(), v[0], v[2], v[4]));
        }
        if c.starts_with("ethtool -a") {
            return Ok(
                "Pause parameters for ens1f1:\nAutonegotiate:\toff\nRX:\t\ton\nTX:\t\toff\n".into(),
            );
        }
        if c.starts_with("ethtool -S") {
            return Ok("NIC statistics:\n     rx_out_of_buffer: 12\n     rx_packets: 100\n".into());
        }
        Ok(String::new())
    }
}

#[test]
fn apply_writes_what_the_kernel_reads_and_is_idempotent() {
    // Six cores, four workers: the queue interrupts go to cores 4 and 5.
    let d = fake(
        1,
        6,
        1,
        &[cx5("ens1f0", 0, 4, 100), cx5("ens1f1", 0, 4, 200)],
        "quiet",
        true,
    );
    let t = discover(d.path(), &["ens1f0", "ens1f1"]).unwrap();
    let p = plan(&t, &needs(4, 4)).unwrap();
    let mut rec = Recorder::default();
    let r = apply(&p, d.path(), &mut rec);
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert_eq!(
        fs::read_to_string(d.path().join("proc/irq/203/smp_affinity_list")).unwrap(),
        "5"
    );
    assert_eq!(
        fs::read_to_string(d.path().join("proc/irq/101/smp_affinity_list")).unwrap(),
        "5"
    );
    assert!(rec.cmds.contains(&"systemctl stop irqbalance".to_string()));
    assert!(rec.cmds.contains(
        &"ethtool -N ens1f1 flow-type udp4 src-port 4504 dst-port 4500 action 3".to_string()
    ));
    assert!(rec
        .cmds
        .contains(&"ethtool -N ens1f0 rx-flow-hash udp4 sdfn".to_string()));
    // Second run: IRQs and rules already in place.
    let r2 = apply(&p, d.path(), &mut rec);
    assert_eq!(r2.unchanged.len(), 8 + 4, "{:?}", r2);
    assert!(!r2.done.iter().any(|x| x.contains("flow-type")));
    // check: IRQs now match; pause frames and drops are reported.
    let f = check(&p, &t, d.path(), &mut rec);
    let text: Vec<String> = f
        .iter()
        .map(|x| format!("{} {}", x.level, x.what))
        .collect();
    assert!(
        text.iter().any(|x| x == "ok irq 203 (ens1f1 q3) on core 5"),
        "{text:?}"
    );
    assert!(text
        .iter()
        .any(|x| x.starts_with("bad irqbalance is running")));
    assert!(text.iter().any(|x| x.contains("pause frames enabled")));
    assert!(text.iter().any(|x| x.contains("rx_out_of_buffer=12")));
    assert!(
        text.iter().any(|x| x == "bad softnet drops: cpu1=3"),
        "{text:?}"
    );
    // Issue 28: an interrupt moved onto a worker's core, or RPS steering a queue's receive
    // work there, fails the check (a receive livelock under overload).
    fs::write(d.path().join("proc/irq/203/smp_affinity_list"), "2").unwrap();
    write(
        d.path(),
        "sys/class/net/ens1f0/queues/rx-0/rps_cpus",
        "00000001\n",
    );
    let f = check(&p, &t, d.path(), &mut rec);
    let bad: Vec<&String> = f
        .iter()
        .filter(|x| x.level == "bad")
        .map(|x| &x.what)
        .collect();
    assert!(
        bad.iter()
            .any(|x| x.contains("irq 203") && x.contains("worker core 2")),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|x| x.contains("ens1f0 rx-0") && x.contains("RPS") && x.contains("worker core 0")),
        "{bad:?}"
    );
}

#[test]
fn no_ntuple_support_is_refused_in_one_line() {
    struct NoNtuple;
    impl Runner for NoNtuple {
        fn run(&mut self, argv: &[String]) -> Result<String, String> {
            Ok(if argv.join(" ").starts_with("ethtool -k") {
                "ntuple-filters: off [fixed]\n".into()
            } else {
                String::new()
            })
        }
    }
    let d = fake(
        1,
        2,
        1,
        &[cx5("ens1f0", 0, 2, 100), cx5("ens1f1", 0, 2, 200)],
        "quiet",
        false,
    );
    let t = discover(d.path(), &["ens1f0", "ens1f1"]).unwrap();
    let p = plan(&t, &needs(2, 2)).unwrap();
    let r = apply(&p, d.path(), &mut NoNtuple);
    assert_eq!(r.refused, vec!["ens1f1 has no ntuple filter support: flow rules impossible; espada hands packets to the owning core in software".to_string()]);
}
