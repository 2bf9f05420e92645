//! The A/B harness behind `espada ab`: the same four-namespace lab once with kernel XFRM as
//! both gateways (SAs from `espada xfrm`) and once with espada, the same UDP load through each,
//! and what reached sunrise. The CLI parses arguments and prints; this builds and measures.

use anyhow::{bail, Context, Result};
use espada_config::export::xfrm;
use espada_config::{self as config, Config};
use serde::Serialize;
use std::net::{IpAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub mod pktgen;

/// The load of one measurement.
#[derive(Debug, Clone)]
pub struct AbLoad {
    /// Namespace name prefix.
    pub prefix: String,
    /// Seconds of traffic per trial.
    pub duration: f64,
    /// UDP payload bytes per datagram.
    pub size: usize,
    /// Parallel UDP flows.
    pub flows: usize,
    /// Offered rate in packets per second over all flows (`None`: as fast as the sockets go).
    pub rate: Option<u64>,
    /// Where the load and the gateways run.
    pub layout: Layout,
    /// West's black interface (its transmit counter: what went onto the ESP link).
    pub west_black: String,
    /// The generator: `pktgen` (the kernel's), `af-packet` or `af-xdp` (Ethernet frames
    /// through espada's own AF_PACKET ring or AF_XDP socket: no UDP socket, no qdisc) or `udp`
    /// (UDP sockets). Never `auto`: the caller resolves it.
    pub generator: String,
    /// Sunset's address and its gateway (west's red address), for the AF_PACKET generator.
    pub sunset: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
}

/// Where west (the gateway under test) runs, and where everything else does: `split` gives
/// west CPUs of its own and puts sunset's generator, sunrise's sink and east on the others
/// (processes with `taskset`, a kernel gateway's receive work with RPS on its interfaces), so
/// that west is never slowed by its own load and per-CPU usage tells the two apart. (Two
/// busy-polling gateways on one CPU would take turns by scheduler slices, which measures the
/// scheduler, not the gateway.)
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// West's CPUs (empty: anywhere).
    pub west: Vec<usize>,
    /// CPUs for the generator, the sink and east (empty: anywhere).
    pub others: Vec<usize>,
}

impl Layout {
    /// The split layout on this host: the first half of the CPUs (at least one) for west, the
    /// rest for the others (one CPU: nothing to split).
    pub fn split(online: &[usize]) -> Layout {
        if online.len() < 2 {
            return Layout::default();
        }
        Layout::split_at(online, online.len() / 2)
    }

    /// West on the first `n` online CPUs, the others on the rest (`0 < n < online.len()`).
    pub fn split_at(online: &[usize], n: usize) -> Layout {
        let (west, others) = online.split_at(n.clamp(1, online.len().saturating_sub(1)));
        Layout {
            west: west.to_vec(),
            others: others.to_vec(),
        }
    }

    /// Split or not.
    pub fn is_split(&self) -> bool {
        !self.west.is_empty()
    }

    /// The CPUs of gateway `n` (`west` or `east`).
    fn gateway(&self, n: &str) -> &[usize] {
        if n == "west" {
            &self.west
        } else {
            &self.others
        }
    }

    fn taskset(cpus: &[usize]) -> String {
        if cpus.is_empty() {
            String::new()
        } else {
            format!(
                "taskset -c {} ",
                cpus.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
    }

    fn mask(cpus: &[usize]) -> String {
        format!("{:x}", cpus.iter().fold(0u128, |m, c| m | 1u128 << c))
    }
}

/// UDP payload sizes, cycled per datagram: one size, or IMIX (7:4:1 of 64, 594 and 1418-byte
/// frames, the largest kept under the lab's inner MTU).
pub fn payloads(size: &str) -> Result<Vec<usize>> {
    const HEADERS: usize = 14 + 20 + 8;
    if size == "imix" {
        let mut v = vec![64 - HEADERS; 7];
        v.extend([594 - HEADERS; 4]);
        v.push(1418 - HEADERS);
        return Ok(v);
    }
    let frame: usize = size.parse().map_err(|_| {
        anyhow::anyhow!("a size is a frame length in bytes or `imix`, got `{size}`")
    })?;
    if !(64..=1418).contains(&frame) {
        bail!("a frame size must be between 64 and 1418 bytes (the lab's inner MTU), got {frame}");
    }
    Ok(vec![frame - HEADERS])
}

/// Sends UDP datagrams (sizes cycled from `sizes`) to `dst:port` from `flows` sockets for
/// `duration` seconds, at `rate` packets per second over all flows if given (paced in bursts
/// of 32); returns a JSON object with what was sent and how many sends the kernel refused
/// (a full socket or device queue: the generator's own loss) (run inside sunset).
pub fn send(
    dst: IpAddr,
    port: u16,
    sizes: &[usize],
    flows: usize,
    duration: f64,
    rate: Option<u64>,
) -> serde_json::Value {
    let flows = flows.max(1);
    let until = Instant::now() + Duration::from_secs_f64(duration);
    let per_flow = rate.map(|r| (r as f64 / flows as f64).max(1.0));
    let threads: Vec<_> = (0..flows)
        .map(|_| {
            let sizes = sizes.to_vec();
            std::thread::spawn(move || -> (u64, u64, u64) {
                let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
                    return (0, 0, 0);
                };
                let buf = vec![0xa5u8; sizes.iter().copied().max().unwrap_or(0)];
                let (mut n, mut b, mut errors) = (0u64, 0u64, 0u64);
                let start = Instant::now();
                let mut i = 0usize;
                while Instant::now() < until {
                    if let Some(pps) = per_flow {
                        // Paced: the next burst leaves when the schedule says.
                        let due = start + Duration::from_secs_f64((n + errors) as f64 / pps);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                    for _ in 0..32 {
                        let len = sizes[i % sizes.len()];
                        i += 1;
                        match s.send_to(&buf[..len], (dst, port)) {
                            Ok(_) => {
                                n += 1;
                                b += len as u64;
                            }
                            Err(_) => errors += 1,
                        }
                    }
                }
                (n, b, errors)
            })
        })
        .collect();
    let (mut n, mut b, mut errors) = (0, 0, 0);
    for t in threads {
        let (x, y, z) = t.join().unwrap_or((0, 0, 0));
        n += x;
        b += y;
        errors += z;
    }
    serde_json::json!({"sent": n, "bytes": b, "send_errors": errors, "seconds": duration})
}

/// What the AF_PACKET generator sends: Ethernet frames from sunset's interface straight to
/// its gateway (no UDP socket, no qdisc, one syscall per burst of 32), UDP source port
/// `40000 + flow`, the IPv4 header checksum computed, UDP checksum 0 (none, RFC 768).
#[derive(Debug, Clone)]
pub struct RawLoad {
    /// Sunset's interface.
    pub iface: String,
    /// Sunset's address.
    pub src: std::net::Ipv4Addr,
    /// Sunrise's address.
    pub dst: std::net::Ipv4Addr,
    /// The gateway whose MAC the frames go to (from sunset's ARP table: ping it first).
    pub gateway: std::net::Ipv4Addr,
    pub port: u16,
}

/// The MAC of `ip` in this namespace's ARP table.
fn arp_mac(ip: std::net::Ipv4Addr) -> Option<espada_wire::ethernet::MacAddr> {
    let t = std::fs::read_to_string("/proc/net/arp").ok()?;
    t.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first()? == &ip.to_string())
            .then(|| espada_wire::ethernet::MacAddr::parse(f.get(3)?))
            .flatten()
    })
}

/// One frame of the AF_PACKET generator.
fn raw_frame(
    r: &RawLoad,
    dst_mac: espada_wire::ethernet::MacAddr,
    src_mac: espada_wire::ethernet::MacAddr,
    flow: usize,
    payload: usize,
) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + payload];
    f[0..6].copy_from_slice(&dst_mac.0);
    f[6..12].copy_from_slice(&src_mac.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + payload) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&r.src.octets());
    ip[16..20].copy_from_slice(&r.dst.octets());
    let c = espada_wire::checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&(40000 + flow as u16).to_be_bytes());
    udp[2..4].copy_from_slice(&r.port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    f
}

/// The frame generators that write Ethernet frames themselves (no UDP socket, no qdisc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// Prebuilt frames through espada's own AF_PACKET transmit ring (one syscall per 32).
    AfPacket,
    /// Prebuilt frames through espada's own AF_XDP socket (builds with feature `af-xdp`).
    AfXdp,
    /// The kernel's packet generator (`pktgen`: kernel threads, no user space per packet).
    Pktgen,
}

impl RawKind {
    /// The name `--generator` takes.
    pub fn name(self) -> &'static str {
        match self {
            RawKind::AfPacket => "af-packet",
            RawKind::AfXdp => "af-xdp",
            RawKind::Pktgen => "pktgen",
        }
    }
}

/// The raw generators (run inside sunset): frames of `sizes` (payload bytes, cycled) over
/// `flows` source ports for `duration` seconds, at `rate` packets per second if given.
/// Returns what was sent and what the generator could not send (`send_errors`).
pub fn send_raw(
    r: &RawLoad,
    kind: RawKind,
    sizes: &[usize],
    flows: usize,
    duration: f64,
    rate: Option<u64>,
) -> Result<serde_json::Value> {
    use espada_dataplane::port::af_packet::{interface_mac, AfPacketQueue, RingConfig};
    let dst_mac = arp_mac(r.gateway).with_context(|| {
        format!(
            "no ARP entry for the gateway {} in this namespace (ping it first)",
            r.gateway
        )
    })?;
    let src_mac = interface_mac(&r.iface)?;
    let flows = flows.max(1);
    match kind {
        RawKind::Pktgen => pktgen::send(r, dst_mac, sizes, flows, duration, rate),
        RawKind::AfPacket => {
            let q = AfPacketQueue::open(&r.iface, 0, 1, 0, RingConfig::default())?;
            blast(q, kind, r, (dst_mac, src_mac), sizes, flows, duration, rate)
        }
        #[cfg(feature = "af-xdp")]
        RawKind::AfXdp => {
            let q = espada_dataplane::port::af_xdp::AfXdpQueue::open(&r.iface, 0, 4096)
                .map_err(|e| anyhow::anyhow!("AF_XDP on {}: {e}", r.iface))?;
            blast(q, kind, r, (dst_mac, src_mac), sizes, flows, duration, rate)
        }
        #[cfg(not(feature = "af-xdp"))]
        RawKind::AfXdp => {
            bail!("this espada was built without AF_XDP (cargo feature af-xdp): use --generator af-packet")
        }
    }
}

/// Sends prebuilt frames through a port queue in bursts of 32, paced to `rate` if given.
#[allow(clippy::too_many_arguments)]
fn blast<Q: espada_dataplane::port::PortQueue>(
    mut q: Q,
    kind: RawKind,
    r: &RawLoad,
    (dst_mac, src_mac): (
        espada_wire::ethernet::MacAddr,
        espada_wire::ethernet::MacAddr,
    ),
    sizes: &[usize],
    flows: usize,
    duration: f64,
    rate: Option<u64>,
) -> Result<serde_json::Value> {
    use espada_dataplane::pktbuf::PacketBuf;
    let frames: Vec<Vec<u8>> = (0..flows * sizes.len())
        .map(|i| raw_frame(r, dst_mac, src_mac, i % flows, sizes[i % sizes.len()]))
        .collect();
    let pool = espada_dataplane::pool::Pool::new(1024, 2048);
    let mut cache = espada_dataplane::pool::PoolCache::new(pool);
    let mut burst = Vec::with_capacity(32);
    let (mut n, mut b, mut i) = (0u64, 0u64, 0usize);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(duration);
    let mut offered = 0u64;
    while Instant::now() < until {
        if let Some(pps) = rate {
            let due = start + Duration::from_secs_f64(offered as f64 / pps.max(1) as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        for _ in 0..32 {
            let Some(mut buf) = cache.get() else { break };
            let f = &frames[i % frames.len()];
            i += 1;
            if buf.load(f) {
                burst.push(buf);
            }
        }
        let want = burst.len() as u64;
        let bytes: u64 = burst.iter().map(|p| p.data().len() as u64 - 42).sum();
        let sent = q.tx_burst(&mut cache, &mut burst) as u64;
        offered += want;
        n += sent;
        if sent == want {
            b += bytes;
        }
    }
    // Let the socket hand over what it still holds (AF_XDP completes asynchronously).
    let mut empty = Vec::new();
    let settle = Instant::now() + Duration::from_millis(50);
    while Instant::now() < settle {
        q.tx_burst(&mut cache, &mut empty);
        std::thread::sleep(Duration::from_millis(1));
    }
    let st = q.stats();
    Ok(
        serde_json::json!({"sent": n, "bytes": b, "send_errors": offered - n,
        "seconds": duration, "generator": kind.name(), "ring_full": st.tx_dropped}),
    )
}

/// Counts UDP datagrams on `port` until idle for a second (or `max_seconds`); prints "ready"
/// first, then returns a JSON object with what was received (run inside sunrise).
pub fn recv(port: u16, max_seconds: f64) -> Result<serde_json::Value> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    s.set_read_timeout(Some(Duration::from_millis(1000)))?;
    let mut buf = vec![0u8; 65536];
    let (mut n, mut b) = (0u64, 0u64);
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = start;
    println!("ready");
    while start.elapsed().as_secs_f64() < max_seconds {
        match s.recv_from(&mut buf) {
            Ok((len, _)) => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                n += 1;
                b += len as u64;
            }
            Err(_) if first.is_some() => break,
            Err(_) => {}
        }
    }
    let secs = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    Ok(serde_json::json!({"received": n, "bytes": b, "seconds": secs}))
}

/// Tries to install one ESP SA in a scratch namespace. `Err` carries what the kernel said.
pub fn probe_kernel_esp(prefix: &str) -> Result<bool, String> {
    let ns = format!("{prefix}probe");
    let _ = Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(Stdio::null())
        .status();
    let add = Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !add.status.success() {
        return Err(format!(
            "cannot create a network namespace: {}",
            String::from_utf8_lossy(&add.stderr).trim()
        ));
    }
    let key = format!("0x{}", "11".repeat(20));
    // One ESP SA, and one per-CPU SA (Linux >= 6.13 and iproute2 >= 7.0; the kernel takes
    // `pcpu-num` only on an SA with a direction).
    let state_add = |spi: &str, extra: &[&str]| {
        Command::new("ip")
            .args([
                "-n",
                &ns,
                "xfrm",
                "state",
                "add",
                "src",
                "192.0.2.1",
                "dst",
                "192.0.2.2",
            ])
            .args(["proto", "esp", "spi", spi, "reqid", "1", "mode", "tunnel"])
            .args(extra)
            .args(["aead", "rfc4106(gcm(aes))", &key, "128"])
            .output()
    };
    let r = state_add("0x101", &["encap", "espinudp", "4500", "4500", "0.0.0.0"]);
    let pcpu = state_add(
        "0x102",
        &["dir", "out", "replay-window", "0", "pcpu-num", "0"],
    )
    .map(|o| o.status.success())
    .unwrap_or(false);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    match r {
        Ok(o) if o.status.success() => Ok(pcpu),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("ip: {e}")),
    }
}

fn v4(a: IpAddr) -> String {
    a.to_string()
}

/// Which gateway pair one half of the A/B runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Plain kernel routing, no IPsec: the ceiling of the lab and its load (if a gateway
    /// reaches it, the generator, not the gateway, was the limit).
    Loop,
    /// Kernel XFRM from `espada xfrm`, with per-CPU SAs (`pcpu-num`) or one SA per tunnel.
    Kernel { pcpu: bool },
    /// espada on both gateways.
    Espada,
}

impl Half {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Half::Loop => "loop (kernel routing, no IPsec)",
            Half::Kernel { pcpu: true } => "kernel XFRM, per-CPU SAs",
            Half::Kernel { pcpu: false } => "kernel XFRM, one SA (--no-pcpu)",
            Half::Espada => "espada, per-CPU SAs",
        }
    }
}

/// The commands that build one half of the A/B lab (pure: tested without running them).
pub fn setup(
    prefix: &str,
    w: &Config,
    e: &Config,
    half: Half,
    espada: &str,
    layout: &Layout,
) -> Result<Vec<String>> {
    let (wr, wb, er, eb) = match (&w.red, &w.black, &e.red, &e.black) {
        (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
        _ => bail!("both configurations need [red] and [black]"),
    };
    let ns = |n: &str| format!("{prefix}{n}");
    let host = |p: &config::PortConfig| match p.prefix.addr() {
        IpAddr::V4(a) => format!(
            "{}/{}",
            std::net::Ipv4Addr::from(u32::from(a) + 10),
            p.prefix.len()
        ),
        IpAddr::V6(_) => String::new(),
    };
    let mut c = Vec::new();
    for n in ["sunset", "west", "east", "sunrise"] {
        c.push(format!("ip netns add {}", ns(n)));
        c.push(format!("ip -n {} link set lo up", ns(n)));
    }
    c.push(format!(
        "ip link add s0 netns {} type veth peer name {} netns {}",
        ns("sunset"),
        wr.interface,
        ns("west")
    ));
    c.push(format!(
        "ip link add {} netns {} type veth peer name {} netns {}",
        wb.interface,
        ns("west"),
        eb.interface,
        ns("east")
    ));
    c.push(format!(
        "ip link add {} netns {} type veth peer name s0 netns {}",
        er.interface,
        ns("east"),
        ns("sunrise")
    ));
    for (n, dev) in [
        ("sunset", "s0"),
        ("west", wr.interface.as_str()),
        ("west", wb.interface.as_str()),
        ("east", eb.interface.as_str()),
        ("east", er.interface.as_str()),
        ("sunrise", "s0"),
    ] {
        c.push(format!(
            "ip netns exec {} sysctl -qw net.ipv6.conf.{dev}.disable_ipv6=1",
            ns(n)
        ));
        c.push(format!(
            "ip netns exec {} ethtool -K {dev} tx off rx off tso off gso off gro off",
            ns(n)
        ));
        c.push(format!("ip -n {} link set {dev} up", ns(n)));
    }
    let inner_mtu = wb.mtu.min(eb.mtu) - 100;
    for n in ["sunset", "sunrise"] {
        c.push(format!("ip -n {} link set s0 mtu {inner_mtu}", ns(n)));
    }
    c.push(format!(
        "ip -n {} addr add {} dev s0",
        ns("sunset"),
        host(wr)
    ));
    c.push(format!(
        "ip -n {} route add default via {}",
        ns("sunset"),
        v4(wr.address)
    ));
    c.push(format!(
        "ip -n {} addr add {} dev s0",
        ns("sunrise"),
        host(er)
    ));
    c.push(format!(
        "ip -n {} route add default via {}",
        ns("sunrise"),
        v4(er.address)
    ));
    match half {
        Half::Loop | Half::Kernel { .. } => {
            for (n, cfg, r, b) in [("west", w, wr, wb), ("east", e, er, eb)] {
                kernel_gateway(&mut c, (&ns(n), n), cfg, r, b, half, espada, layout)?;
            }
        }
        Half::Espada => {
            for (n, cfg) in [("west", w), ("east", e)] {
                // Split: one worker per CPU of the gateway's set, unpinned inside the taskset.
                let cpus = layout.gateway(n);
                let pin = if layout.is_split() {
                    format!(" --no-pin --workers {}", cpus.len().max(1))
                } else {
                    String::new()
                };
                c.push(format!(
                    "ip netns exec {} {}{espada} run -c {} --new-keys --state-dir /tmp/{prefix}{n}-state --control none --idle-sleep-us 50 --interval 0{pin} &",
                    ns(n),
                    Layout::taskset(cpus),
                    cfg.file.display(),
                ));
            }
        }
    }
    Ok(c)
}

/// One kernel gateway: addresses, forwarding, the routes XFRM needs (the kernel routes
/// before it applies a policy), and for the IPsec half the SAs and policies of `espada
/// xfrm` and a UDP_ENCAP_ESPINUDP socket on 4500 (`espada xfrm --encap-socket`; without it
/// the kernel does not decapsulate ESP-in-UDP). Split layout: the receive work of its ingress
/// interfaces (RPS) on the gateway CPUs.
#[allow(clippy::too_many_arguments)]
fn kernel_gateway(
    c: &mut Vec<String>,
    (ns, which): (&str, &str),
    cfg: &Config,
    r: &config::PortConfig,
    b: &config::PortConfig,
    half: Half,
    espada: &str,
    layout: &Layout,
) -> Result<()> {
    for p in [r, b] {
        c.push(format!(
            "ip -n {ns} addr add {}/{} dev {}",
            p.address,
            p.prefix.len(),
            p.interface
        ));
    }
    c.push(format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1"
    ));
    for route in xfrm::routes(cfg) {
        c.push(format!("ip -n {ns} {route}"));
    }
    if layout.is_split() {
        let cpus = layout.gateway(which);
        for p in [r, b] {
            c.push(format!(
                "ip netns exec {ns} sh -c 'echo {} > /sys/class/net/{}/queues/rx-0/rps_cpus'",
                Layout::mask(cpus),
                p.interface
            ));
        }
    }
    let Half::Kernel { pcpu } = half else {
        return Ok(());
    };
    let db = cfg.sadb(cfg.resolved_workers())?;
    for l in xfrm::render(cfg, &db, pcpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.file.display()))?
        .lines()
        .filter(|l| l.starts_with("ip xfrm"))
    {
        c.push(format!("ip -n {ns} {}", l.trim_start_matches("ip ")));
    }
    c.push(format!("ip netns exec {ns} {espada} xfrm --encap-socket &"));
    Ok(())
}

/// Time one CPU spent in each state over a trial, as fractions of the trial (from
/// /proc/stat: the kernel's work on the gateways shows as softirq on the CPU that received).
#[derive(Serialize, Clone, Debug, Default)]
pub struct CpuUse {
    pub cpu: usize,
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
    pub idle: f64,
}

/// Per-CPU jiffies: (cpu, user+nice, system, softirq+irq, idle+iowait, total).
fn cpu_times() -> Vec<(usize, [u64; 5])> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu: usize = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            let g = |i: usize| v.get(i).copied().unwrap_or(0);
            let total = v.iter().take(8).sum();
            Some((cpu, [g(0) + g(1), g(2), g(5) + g(6), g(3) + g(4), total]))
        })
        .collect()
}

fn cpu_use(before: &[(usize, [u64; 5])], after: &[(usize, [u64; 5])]) -> Vec<CpuUse> {
    after
        .iter()
        .filter_map(|(cpu, a)| {
            let b = before.iter().find(|(c, _)| c == cpu)?.1;
            let d = |i: usize| a[i].saturating_sub(b[i]) as f64;
            let total = d(4).max(1.0);
            Some(CpuUse {
                cpu: *cpu,
                user: d(0) / total,
                system: d(1) / total,
                softirq: d(2) / total,
                idle: d(3) / total,
            })
        })
        .collect()
}

/// What one trial measured.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Trial {
    /// Offered rate (packets/s), `None` for as fast as the sockets go.
    pub offered_pps: Option<u64>,
    pub sent: u64,
    /// Sends the kernel refused in sunset (the generator's own loss).
    pub send_errors: u64,
    /// Frames west put on its black link (the ESP side; the ceiling of what east can get).
    pub west_black_tx: u64,
    pub received: u64,
    pub seconds: f64,
    pub gbps_received: f64,
    pub pps_received: f64,
    pub loss: f64,
    pub cpu: Vec<CpuUse>,
}

/// The no-drop rate of one frame size: the highest offered rate with loss at or under the
/// threshold (a binary search on the offered rate, RFC 2544 §26.1 style).
#[derive(Serialize, Clone, Debug)]
pub struct Ndr {
    pub size: String,
    pub pps: f64,
    pub gbps: f64,
    pub loss: f64,
    /// The trials of the search, in order.
    pub trials: Vec<Trial>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Variant {
    pub name: String,
    /// The half was set up and measured.
    pub ran: bool,
    /// Packets reached sunrise through it before the load (a ping).
    pub forwarded: bool,
    /// Why it did not run or did not forward.
    pub note: String,
    pub sent: u64,
    pub send_errors: u64,
    pub west_black_tx: u64,
    pub received: u64,
    pub gbps_received: f64,
    pub loss: f64,
    pub cpu: Vec<CpuUse>,
    pub ndr: Vec<Ndr>,
    /// Kernel halves: packets per SA on west (`ip -s xfrm state`), SPI and direction.
    pub sa_packets: Vec<(String, u64)>,
}

impl Variant {
    /// A half that was not measured, and why.
    pub fn not_run(name: &str, note: impl Into<String>) -> Variant {
        Variant {
            name: name.into(),
            note: note.into(),
            ..Default::default()
        }
    }
}

fn sh(cmd: &str) -> Result<()> {
    if cmd.ends_with('&') {
        // Background daemons must not hold a pipe to us (they would die of SIGPIPE).
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        return Ok(());
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() && !cmd.contains("ethtool") {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Stops what runs in the lab's namespaces and removes them.
pub fn teardown(prefix: &str) {
    let _ = Command::new("sh").arg("-c").arg(format!("for p in $(ip netns pids {prefix}west 2>/dev/null) $(ip netns pids {prefix}east 2>/dev/null); do kill -TERM $p; done; sleep 1; for n in sunset west east sunrise; do ip netns del {prefix}$n 2>/dev/null; done; rm -rf /tmp/{prefix}west-state /tmp/{prefix}east-state")).status();
}

/// What a measurement does beyond one fixed load.
#[derive(Debug, Clone, Default)]
pub struct Search {
    /// Frame sizes (`64`, `1400`, `imix`) whose no-drop rate is searched (empty: none).
    pub sizes: Vec<String>,
    /// Loss accepted at the no-drop rate (0: none).
    pub threshold: f64,
    /// Trials per search.
    pub steps: u32,
}

/// Builds one half with `cmds`, checks that it forwards (a ping sunset → sunrise), runs the
/// load through it (and the no-drop-rate searches of `search`), reads the kernel's per-SA
/// counters, tears it down. A half that cannot be set up or does not forward comes back with
/// `forwarded: false` and why, not as an error: the other halves are still measured.
pub fn measure(a: &AbLoad, me: &str, half: Half, cmds: &[String], search: &Search) -> Variant {
    let mut v = Variant::not_run(half.name(), "");
    teardown(&a.prefix);
    for c in cmds {
        if let Err(e) = sh(c) {
            v.note = format!("setup failed: {e:#}");
            teardown(&a.prefix);
            return v;
        }
    }
    v.ran = true;
    v.forwarded = forwards(a);
    if !v.forwarded {
        v.note = "a ping from sunset did not reach sunrise through this half in 10 s: it does not forward (see `espada ab --print-setup`)".into();
        teardown(&a.prefix);
        return v;
    }
    match trial(a, me, a.rate, &[a.size]) {
        Ok(t) => {
            v.sent = t.sent;
            v.send_errors = t.send_errors;
            v.west_black_tx = t.west_black_tx;
            v.received = t.received;
            v.gbps_received = t.gbps_received;
            v.loss = t.loss;
            v.cpu = t.cpu;
        }
        Err(e) => v.note = format!("the load failed: {e:#}"),
    }
    for size in &search.sizes {
        match ndr(a, me, size, search) {
            Ok(n) => v.ndr.push(n),
            Err(e) => v.note = format!("no-drop rate at {size}: {e:#}"),
        }
    }
    if let Half::Kernel { .. } = half {
        v.sa_packets = kernel_sa_packets(&format!("{}west", a.prefix));
    }
    teardown(&a.prefix);
    v
}

fn in_ns(prefix: &str, ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &format!("{prefix}{ns}")]);
    c
}

/// A ping from sunset reaches sunrise within 10 s (neighbors learned on the way).
fn forwards(a: &AbLoad) -> bool {
    (0..50).any(|_| {
        let ok = in_ns(&a.prefix, "sunset")
            .args(["ping", "-c1", "-W1", "-q", "10.2.0.10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    })
}

/// A counter of west's black interface (the veth's, as the kernel saw it).
fn west_black_tx(a: &AbLoad, dev: &str) -> u64 {
    in_ns(&a.prefix, "west")
        .args([
            "cat",
            &format!("/sys/class/net/{dev}/statistics/tx_packets"),
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// One load through a lab that forwards: sink in sunrise, generator in sunset (pinned by the
/// layout), /proc/stat and west's black counters read around it.
pub fn trial(a: &AbLoad, me: &str, rate: Option<u64>, sizes: &[usize]) -> Result<Trial> {
    let pin: Vec<String> = if a.layout.others.is_empty() {
        Vec::new()
    } else {
        vec![
            "taskset".into(),
            "-c".into(),
            a.layout
                .others
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ]
    };
    let mut recv = in_ns(&a.prefix, "sunrise")
        .args(&pin)
        .args([me, "ab-traffic", "recv", "--port", "5400", "--max-seconds"])
        .arg((a.duration + 10.0).to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(recv.stdout.take().context("receiver stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let tx0 = west_black_tx(a, &a.west_black);
    let cpu0 = cpu_times();
    let sizes_arg = sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut send = in_ns(&a.prefix, "sunset");
    send.args(&pin).args([
        me,
        "ab-traffic",
        "send",
        "--dst",
        "10.2.0.10",
        "--port",
        "5400",
    ]);
    send.args(["--sizes", &sizes_arg, "--flows", &a.flows.to_string()]);
    if matches!(a.generator.as_str(), "af-packet" | "af-xdp" | "pktgen") {
        send.args([
            &format!("--{}", a.generator),
            "s0",
            "--src",
            &a.sunset.to_string(),
        ]);
        send.args(["--gateway", &a.gateway.to_string()]);
    }
    send.args(["--duration", &a.duration.to_string()]);
    if let Some(r) = rate {
        send.args(["--rate", &r.to_string()]);
    }
    let send = send.output()?;
    let cpu1 = cpu_times();
    let sv: serde_json::Value = serde_json::from_slice(&send.stdout).context("sender output")?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let _ = recv.wait();
    let tx1 = west_black_tx(a, &a.west_black);
    let rv: serde_json::Value = serde_json::from_str(&line).context("receiver output")?;
    let sent = sv["sent"].as_u64().unwrap_or(0);
    let received = rv["received"].as_u64().unwrap_or(0);
    let secs = rv["seconds"].as_f64().unwrap_or(0.0).max(1e-3);
    Ok(Trial {
        offered_pps: rate,
        sent,
        send_errors: sv["send_errors"].as_u64().unwrap_or(0),
        west_black_tx: tx1.saturating_sub(tx0),
        received,
        seconds: secs,
        gbps_received: rv["bytes"].as_f64().unwrap_or(0.0) * 8.0 / secs / 1e9,
        pps_received: received as f64 / secs,
        loss: if sent > 0 {
            1.0 - received as f64 / sent as f64
        } else {
            0.0
        },
        cpu: cpu_use(&cpu0, &cpu1),
    })
}

/// The no-drop rate of one frame size: first as fast as the generator goes (the upper bound
/// is what got through), then a binary search on the offered rate for `search.steps` trials.
pub fn ndr(a: &AbLoad, me: &str, size: &str, search: &Search) -> Result<Ndr> {
    let sizes = payloads(size)?;
    let mut trials = Vec::new();
    let top = trial(a, me, None, &sizes)?;
    let mut best: Option<Trial> = (top.loss <= search.threshold).then(|| top.clone());
    // The no-drop rate is at most what got through at full speed (with a margin: the
    // receiver's clock starts at its first datagram).
    let offered = top.sent as f64 / a.duration.max(1e-3);
    let (mut lo, mut hi) = (0.0f64, offered.min(top.pps_received * 1.1).max(1.0));
    trials.push(top);
    for _ in 0..search.steps {
        if best.as_ref().is_some_and(|b| b.offered_pps.is_none()) {
            break; // no loss at full speed: nothing to search
        }
        let rate = ((lo + hi) / 2.0).max(1.0) as u64;
        let t = trial(a, me, Some(rate), &sizes)?;
        if t.loss <= search.threshold {
            lo = rate as f64;
            best = Some(t.clone());
        } else {
            hi = rate as f64;
        }
        trials.push(t);
    }
    let (pps, gbps, loss) = best.as_ref().map_or((0.0, 0.0, 1.0), |b| {
        (b.pps_received, b.gbps_received, b.loss)
    });
    Ok(Ndr {
        size: size.to_string(),
        pps,
        gbps,
        loss,
        trials,
    })
}

/// Packets per SA in namespace `ns` (`ip -s xfrm state`): which SA carried what.
fn kernel_sa_packets(ns: &str) -> Vec<(String, u64)> {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "xfrm", "state"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_sa_packets(&out)
}

/// SPI (with `dir` and `pcpu-num` when given) → packets, from `ip -s xfrm state` text (one
/// block per SA, each starting with its `src … dst …` line).
pub fn parse_sa_packets(text: &str) -> Vec<(String, u64)> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for l in text.lines() {
        if l.starts_with("src ") || blocks.is_empty() {
            blocks.push(Vec::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push(l.trim());
        }
    }
    fn word_after<'a>(b: &[&'a str], key: &str) -> Option<&'a str> {
        b.iter().find_map(|l| {
            let i = l.find(key)?;
            (i == 0 || l[..i].ends_with(' '))
                .then(|| l[i + key.len()..].split_whitespace().next())?
        })
    }
    blocks
        .iter()
        .filter_map(|b| {
            let spi = word_after(b, "spi ")?;
            // iproute2 >= 6.x adds the decimal: `0x00001001(4097)`.
            let mut name = spi.split('(').next().unwrap_or(spi).to_string();
            if let Some(d) = word_after(b, "dir ") {
                name.push_str(&format!(" {d}"));
            }
            if let Some(c) = word_after(b, "pcpu-num ") {
                name.push_str(&format!(" cpu {c}"));
            }
            let at = b.iter().position(|l| l.starts_with("lifetime current:"))?;
            let packets = b
                .get(at + 1)?
                .split(',')
                .find(|x| x.contains("(packets)"))?
                .trim()
                .trim_end_matches("(packets)")
                .parse()
                .ok()?;
            Some((name, packets))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imix_and_frame_sizes() {
        assert_eq!(payloads("64").unwrap(), vec![22]);
        assert_eq!(payloads("1400").unwrap(), vec![1358]);
        let imix = payloads("imix").unwrap();
        assert_eq!(imix.len(), 12);
        assert_eq!(imix.iter().filter(|s| **s == 22).count(), 7);
        assert!(payloads("9000").is_err() && payloads("big").is_err());
    }

    #[test]
    fn the_split_layout_keeps_the_load_off_the_gateways() {
        let l = Layout::split(&[0, 1, 2, 3]);
        assert_eq!((&l.west, &l.others), (&vec![0, 1], &vec![2, 3]));
        assert_eq!(l.gateway("east"), &[2, 3]);
        let l = Layout::split(&[0, 1, 2]);
        assert_eq!((l.west, l.others), (vec![0], vec![1, 2]));
        assert!(!Layout::split(&[0]).is_split());
        let l = Layout::split_at(&[0, 1, 2, 3], 3);
        assert_eq!((l.west, l.others), (vec![0, 1, 2], vec![3]));
        assert_eq!(Layout::mask(&[0, 2]), "5");
    }

    #[test]
    fn per_sa_packets_from_ip_s_xfrm_state() {
        let text = "src 192.168.100.1 dst 192.168.100.2\n\tproto esp spi 0x00001002(4098) reqid 1 mode tunnel\n\treplay-window 0 flag af-unspec\n\taead rfc4106(gcm(aes)) 0x00 128\n\tencap type espinudp sport 4502 dport 4502 addr 0.0.0.0\n\tlifetime config:\n\t  limit: soft (INF)(bytes), hard (INF)(bytes)\n\tlifetime current:\n\t  1200(bytes), 10(packets)\n\t  add 2026-12-07 use 2026-12-07\n\tdir out\n\tpcpu-num 1\nsrc 192.168.100.2 dst 192.168.100.1\n\tproto esp spi 0x00002001 reqid 1 mode tunnel\n\tlifetime current:\n\t  0(bytes), 0(packets)\n";
        let v = parse_sa_packets(text);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].1, 10);
        assert_eq!(v[0].0, "0x00001002 out cpu 1");
        assert_eq!(v[1], ("0x00002001".to_string(), 0));
    }
}
