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

/// The load of one measurement.
#[derive(Debug, Clone)]
pub struct AbLoad {
    /// Namespace name prefix.
    pub prefix: String,
    /// Seconds of traffic.
    pub duration: f64,
    /// UDP payload bytes per datagram.
    pub size: usize,
    /// Parallel UDP flows.
    pub flows: usize,
}

/// Sends UDP datagrams of `size` bytes to `dst:port` from `flows` sockets for `duration`
/// seconds; returns a JSON object with what was sent (run inside sunset).
pub fn send(dst: IpAddr, port: u16, size: usize, flows: usize, duration: f64) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs_f64(duration);
    let threads: Vec<_> = (0..flows.max(1))
        .map(|_| {
            std::thread::spawn(move || -> (u64, u64) {
                let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
                    return (0, 0);
                };
                let buf = vec![0xa5u8; size];
                let (mut n, mut b) = (0u64, 0u64);
                while Instant::now() < until {
                    for _ in 0..64 {
                        if s.send_to(&buf, (dst, port)).is_ok() {
                            n += 1;
                            b += size as u64;
                        }
                    }
                }
                (n, b)
            })
        })
        .collect();
    let (mut n, mut b) = (0, 0);
    for t in threads {
        let (x, y) = t.join().unwrap_or((0, 0));
        n += x;
        b += y;
    }
    serde_json::json!({"sent": n, "bytes": b, "seconds": duration})
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

/// The commands that build one half of the A/B lab (pure: tested without running them).
pub fn setup(
    prefix: &str,
    w: &Config,
    e: &Config,
    kernel: bool,
    pcpu: bool,
    espada: &str,
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
    c.push(format!(
        "ip -n {} link set s0 mtu {inner_mtu}",
        ns("sunset")
    ));
    c.push(format!(
        "ip -n {} link set s0 mtu {inner_mtu}",
        ns("sunrise")
    ));
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
    if kernel {
        for (n, cfg, r, b) in [("west", w, wr, wb), ("east", e, er, eb)] {
            c.push(format!(
                "ip -n {} addr add {}/{} dev {}",
                ns(n),
                r.address,
                r.prefix.len(),
                r.interface
            ));
            c.push(format!(
                "ip -n {} addr add {}/{} dev {}",
                ns(n),
                b.address,
                b.prefix.len(),
                b.interface
            ));
            c.push(format!(
                "ip netns exec {} sysctl -qw net.ipv4.ip_forward=1",
                ns(n)
            ));
            let db = cfg.sadb(cfg.resolved_workers())?;
            for l in xfrm::render(cfg, &db, pcpu)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.file.display()))?
                .lines()
                .filter(|l| l.starts_with("ip xfrm"))
            {
                c.push(format!("ip -n {} {}", ns(n), l.trim_start_matches("ip ")));
            }
            // The kernel decapsulates ESP-in-UDP only for a UDP socket with UDP_ENCAP_ESPINUDP
            // on port 4500 (normally the IKE daemon's); this stands in for it.
            c.push(format!(
                "ip netns exec {} python3 -c \"import socket,time;s=socket.socket(2,2);s.setsockopt(17,100,2);s.bind(('0.0.0.0',4500));time.sleep(1e9)\" &",
                ns(n)
            ));
        }
    } else {
        let wf = w.file.display().to_string();
        let ef = e.file.display().to_string();
        c.push(format!(
            "ip netns exec {} {espada} run -c {wf} --new-keys --idle-sleep-us 50 --interval 0 &",
            ns("west")
        ));
        c.push(format!(
            "ip netns exec {} {espada} run -c {ef} --new-keys --idle-sleep-us 50 --interval 0 &",
            ns("east")
        ));
    }
    Ok(c)
}

#[derive(Serialize, Clone, Debug)]
pub struct Variant {
    pub name: String,
    pub ran: bool,
    pub note: String,
    pub sent: u64,
    pub received: u64,
    pub gbps_received: f64,
    pub loss: f64,
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
    let _ = Command::new("sh").arg("-c").arg(format!("for p in $(ip netns pids {prefix}west 2>/dev/null) $(ip netns pids {prefix}east 2>/dev/null); do kill -TERM $p; done; sleep 1; for n in sunset west east sunrise; do ip netns del {prefix}$n 2>/dev/null; done")).status();
}

/// Builds one half with `cmds`, runs `me ab-traffic` UDP load through it, tears it down.
pub fn measure(a: &AbLoad, me: &str, name: &str, cmds: &[String]) -> Result<Variant> {
    teardown(&a.prefix);
    for c in cmds {
        sh(c).with_context(|| format!("setting up the {name} half"))?;
    }
    let dst = "10.2.0.10";
    // Warm up ARP / neighbor entries.
    for _ in 0..50 {
        if Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}sunset", a.prefix),
                "ping",
                "-c1",
                "-W1",
                "-q",
                dst,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut recv = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}sunrise", a.prefix),
            me,
            "ab-traffic",
            "recv",
            "--port",
            "5400",
            "--max-seconds",
            &(a.duration + 10.0).to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(recv.stdout.take().context("receiver stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let send = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}sunset", a.prefix),
            me,
            "ab-traffic",
            "send",
            "--dst",
            dst,
            "--port",
            "5400",
            "--size",
            &a.size.to_string(),
            "--flows",
            &a.flows.to_string(),
            "--duration",
            &a.duration.to_string(),
        ])
        .output()?;
    let sv: serde_json::Value = serde_json::from_slice(&send.stdout).context("sender output")?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let _ = recv.wait();
    let rv: serde_json::Value = serde_json::from_str(&line).context("receiver output")?;
    teardown(&a.prefix);
    let sent = sv["sent"].as_u64().unwrap_or(0);
    let received = rv["received"].as_u64().unwrap_or(0);
    let secs = rv["seconds"].as_f64().unwrap_or(0.0).max(1e-3);
    Ok(Variant {
        name: name.into(),
        ran: true,
        note: String::new(),
        sent,
        received,
        gbps_received: rv["bytes"].as_f64().unwrap_or(0.0) * 8.0 / secs / 1e9,
        loss: if sent > 0 {
            1.0 - received as f64 / sent as f64
        } else {
            0.0
        },
    })
}
