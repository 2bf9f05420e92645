//! A gateway's ports, opened the way `espada run` needs them: one red and one black queue per
//! worker on AF_PACKET (fanout), AF_XDP (one shared UMEM per worker) or DPDK (EAL main lcore
//! off the worker cores, one mbuf pool per NUMA socket, rte_flow steering per per-CPU SA).
//! What happened is returned as notes for the caller to log; errors say what to do.

use crate::port::af_packet::{AfPacketQueue, RingConfig};
use crate::port::pcap::Tap;
use crate::port::PortQueue;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which kind of port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// Linux AF_PACKET (TPACKET_V3).
    AfPacket,
    /// Linux AF_XDP (feature `af-xdp`).
    AfXdp,
    /// DPDK (feature `dpdk`).
    Dpdk,
}

/// The DPDK side of a gateway's configuration.
#[derive(Debug, Clone, Default)]
pub struct DpdkPorts {
    /// The red port's DPDK name (vdev or PCI address).
    pub red_port: String,
    /// The black port's DPDK name.
    pub black_port: String,
    /// EAL arguments (empty: no hugepages, no PCI).
    pub eal: Vec<String>,
    /// rte_flow rules to ask for on black: (peer's UDP source port, queue).
    pub steer: Vec<(u16, u16)>,
}

/// What a gateway needs opened.
#[derive(Debug, Clone)]
pub struct PortsSpec<'a> {
    /// The kind of port.
    pub kind: PortKind,
    /// Red interface (AF_PACKET, AF_XDP).
    pub red: &'a str,
    /// Black interface.
    pub black: &'a str,
    /// Worker count (queues per side).
    pub workers: usize,
    /// The workers' cores (DPDK keeps its main lcore off them).
    pub cores: &'a [usize],
    /// Every CPU the process may use.
    pub online: &'a [usize],
    /// Record the black side's frames into `<base>-q<N>.pcap` (AF_PACKET).
    pub pcap_black: Option<&'a Path>,
    /// DPDK ports.
    pub dpdk: Option<&'a DpdkPorts>,
}

/// Open ports: one red and one black queue per worker, and what must stay alive with them.
pub struct Ports {
    /// Red queues, one per worker.
    pub red: Vec<Box<dyn PortQueue>>,
    /// Black queues, one per worker.
    pub black: Vec<Box<dyn PortQueue>>,
    /// What happened, for the log.
    pub notes: Vec<String>,
    /// DPDK ports (and their flow rules), kept until the workers are done.
    #[cfg(feature = "dpdk")]
    pub dpdk: Vec<crate::port::dpdk::DpdkPort>,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            red: Vec::new(),
            black: Vec::new(),
            notes: Vec::new(),
            #[cfg(feature = "dpdk")]
            dpdk: Vec::new(),
        }
    }
}

/// Opens the ports `s` describes.
pub fn open(s: &PortsSpec) -> Result<Ports, String> {
    match s.kind {
        PortKind::AfPacket => af_packet(s),
        PortKind::AfXdp => af_xdp(s),
        PortKind::Dpdk => dpdk(s),
    }
}

fn af_packet(s: &PortsSpec) -> Result<Ports, String> {
    let n = s.workers;
    let mut p = Ports::new();
    for (name, iface) in [("red", s.red), ("black", s.black)] {
        let rxq = crate::port::af_packet::rx_queues(iface);
        p.notes.push(format!(
            "{name} {iface}: RX queues {rxq}, workers {n}: {}",
            if n == 1 {
                "one socket"
            } else if rxq >= n {
                "queue-mapped fanout (the NIC's queue picks the worker)"
            } else {
                "hash fanout (packets for another core's SA are handed off)"
            }
        ));
    }
    let fanout = (std::process::id() as u16) ^ 0x5a00;
    for i in 0..n {
        p.red.push(af_packet_queue(s.red, i, n, fanout, None)?);
        p.black.push(af_packet_queue(
            s.black,
            i,
            n,
            fanout.wrapping_add(1),
            s.pcap_black,
        )?);
    }
    Ok(p)
}

fn af_packet_queue(
    iface: &str,
    q: usize,
    n: usize,
    fanout: u16,
    tap: Option<&Path>,
) -> Result<Box<dyn PortQueue>, String> {
    let mut last = None;
    // A socket of a previous run may still be going away: retry briefly.
    for _ in 0..20 {
        match AfPacketQueue::open(iface, q, n, fanout, RingConfig::default()) {
            Ok(p) => {
                return Ok(match tap {
                    Some(base) => Box::new(
                        Tap::new(p, &PathBuf::from(format!("{}-q{q}.pcap", base.display())))
                            .map_err(|e| format!("{}: {e}", base.display()))?,
                    ),
                    None => Box::new(p),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("interface {iface}: {e}"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "interface {iface}: {e} (AF_PACKET needs root or CAP_NET_RAW)"
                ))
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last.map_or_else(
        || format!("interface {iface}: cannot open"),
        |e| format!("interface {iface} queue {q}: {e}"),
    ))
}

#[cfg(feature = "af-xdp")]
fn af_xdp(s: &PortsSpec) -> Result<Ports, String> {
    use crate::port::af_xdp::AfXdpQueue;
    let mut p = Ports::new();
    for q in 0..s.workers as u32 {
        // One UMEM per worker, shared by its red and black sockets: packets go out from the
        // frame they arrived in.
        let (rq, bq) = AfXdpQueue::open_pair(s.red, s.black, q, 4096)?;
        p.red.push(Box::new(rq));
        p.black.push(Box::new(bq));
    }
    p.notes.push(format!(
        "AF_XDP sockets on {} and {}, queues 0..{}, one shared UMEM per worker (zero copy; steer per-CPU SAs with `espada pin apply`)",
        s.red,
        s.black,
        s.workers - 1
    ));
    Ok(p)
}

#[cfg(not(feature = "af-xdp"))]
fn af_xdp(_s: &PortsSpec) -> Result<Ports, String> {
    Err("this espada was built without AF_XDP: cargo build --release --features af-xdp (needs clang, libelf-dev, zlib1g-dev, m4)".into())
}

#[cfg(feature = "dpdk")]
fn dpdk(s: &PortsSpec) -> Result<Ports, String> {
    use crate::port::dpdk::{
        eal_init, main_lcore_args, port_socket, DpdkPort, SocketPools, NO_HUGE_ARGS,
    };
    let d = s
        .dpdk
        .ok_or("--port dpdk needs a [dpdk] section (red_port, black_port, eal)")?;
    let n = s.workers;
    let mut args: Vec<String> = if d.eal.is_empty() {
        NO_HUGE_ARGS.iter().map(|s| s.to_string()).collect()
    } else {
        d.eal.clone()
    };
    if !args.iter().any(|x| x == "-l" || x.starts_with("--lcores")) {
        // The EAL main lcore (the caller's thread: control socket, reports) floats over the
        // CPUs no worker uses; the workers are registered threads on their own cores.
        args.extend(main_lcore_args(s.online, &s.cores[..n.min(s.cores.len())]));
    }
    eal_init(&args)?;
    // One mbuf pool per NUMA socket the two ports sit on.
    let mut pools = SocketPools::new("espada_run", (n as u32 * 16384).max(16383), 2048 + 256);
    let mut open = |name: &str| -> Result<DpdkPort, String> {
        let (_, socket) = port_socket(name)?;
        DpdkPort::open(name, n as u16, pools.for_socket(socket)?)
    };
    let red = open(&d.red_port)?;
    let mut black = open(&d.black_port)?;
    let mut p = Ports::new();
    p.notes.push(format!(
        "dpdk: EAL main lcore off the worker cores; mbuf pools: {}, one per NUMA socket",
        pools.len()
    ));
    // One rte_flow rule per per-CPU SA of the peer: its UDP source port -> the owning queue.
    for &(sport, q) in &d.steer {
        if let Err(e) = black.steer_udp_source_port(sport, 4500, q) {
            p.notes.push(format!("{} refuses rte_flow rules ({e}); RSS spreads the SAs and espada hands packets to the owning core", d.black_port));
            break;
        }
        p.notes.push(format!(
            "rte_flow on {}: udp src {sport} dst 4500 -> queue {q}",
            d.black_port
        ));
    }
    for (port, name) in [(&red, &d.red_port), (&black, &d.black_port)] {
        let (speed, up) = port.link();
        p.notes.push(format!(
            "dpdk port {name}: link {} {speed} Mbit/s",
            if up { "up" } else { "DOWN" }
        ));
    }
    for q in 0..n as u16 {
        p.red.push(Box::new(red.queue(q)));
        p.black.push(Box::new(black.queue(q)));
    }
    p.dpdk = vec![red, black];
    Ok(p)
}

#[cfg(not(feature = "dpdk"))]
fn dpdk(_s: &PortsSpec) -> Result<Ports, String> {
    Err("this espada was built without DPDK: cargo build --release --features dpdk (needs libdpdk-dev)".into())
}
