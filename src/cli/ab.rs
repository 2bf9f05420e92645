//! `espada ab`: the A/B against kernel XFRM. Builds the namespace lab twice, once with the
//! kernel doing IPsec (configured from `espada xfrm`, per-CPU SAs with `pcpu-num` when the
//! kernel has them) and once with espada, sends the same UDP load through both, and writes one
//! report (table, JSON, plot) with both side by side.
//!
//! On a kernel without ESP (CONFIG_INET_ESP off, like the CI machines) it says so in one line
//! and exits 1; `--espada-only` still measures the espada half, and `--print-setup kernel|espada`
//! shows the exact commands either half runs.

use crate::config::{self, Config};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use espada_config::export::xfrm;
use serde::Serialize;
use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const WEST: &str = include_str!("../../configs/west.toml");
const EAST: &str = include_str!("../../configs/east.toml");

#[derive(Args)]
pub struct AbArgs {
    /// West configuration (default: built-in configs/west.toml).
    #[arg(long)]
    west: Option<PathBuf>,
    /// East configuration (default: built-in configs/east.toml).
    #[arg(long)]
    east: Option<PathBuf>,
    /// Seconds of traffic per variant.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// UDP payload bytes per datagram.
    #[arg(long, default_value_t = 1300)]
    size: usize,
    /// Parallel UDP flows (distinct source ports).
    #[arg(long, default_value_t = 4)]
    flows: usize,
    /// Namespace name prefix.
    #[arg(long, default_value = "ab-")]
    prefix: String,
    /// Report directory.
    #[arg(long, default_value = "ab-out")]
    out: PathBuf,
    /// Measure only the espada half (for kernels without ESP).
    #[arg(long)]
    espada_only: bool,
    /// Print the commands that set up one half (`kernel` or `espada`) and exit.
    #[arg(long)]
    print_setup: Option<String>,
}

/// Hidden helper run inside the namespaces: a UDP load generator and counter.
#[derive(Subcommand)]
pub enum TrafficCmd {
    /// Send UDP datagrams for a while; prints a JSON line with what was sent.
    Send {
        #[arg(long)]
        dst: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        flows: usize,
        #[arg(long)]
        duration: f64,
    },
    /// Count UDP datagrams until idle for a second; prints a JSON line.
    Recv {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        max_seconds: f64,
    },
}

pub fn traffic(cmd: TrafficCmd) -> Result<ExitCode> {
    match cmd {
        TrafficCmd::Send {
            dst,
            port,
            size,
            flows,
            duration,
        } => {
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
            println!(
                "{}",
                serde_json::json!({"sent": n, "bytes": b, "seconds": duration})
            );
        }
        TrafficCmd::Recv { port, max_seconds } => {
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
            println!(
                "{}",
                serde_json::json!({"received": n, "bytes": b, "seconds": secs})
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load(p: &Option<PathBuf>, builtin: &str, name: &str) -> Result<Config> {
    match p {
        Some(p) => config::load(p),
        None => config::parse(
            Path::new(&format!("(built-in) configs/{name}.toml")),
            builtin,
        ),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
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
    let r = Command::new("ip")
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
            "proto",
            "esp",
            "spi",
            "0x101",
            "reqid",
            "1",
            "mode",
            "tunnel",
            "aead",
            "rfc4106(gcm(aes))",
            &key,
            "128",
            "encap",
            "espinudp",
            "4500",
            "4500",
            "0.0.0.0",
        ])
        .output();
    let pcpu = Command::new("ip")
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
            "proto",
            "esp",
            "spi",
            "0x102",
            "reqid",
            "1",
            "mode",
            "tunnel",
            "aead",
            "rfc4106(gcm(aes))",
            &key,
            "128",
            "pcpu-num",
            "0",
        ])
        .output()
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
            "ip netns exec {} {espada} run -c {wf} --idle-sleep-us 50 --interval 0 &",
            ns("west")
        ));
        c.push(format!(
            "ip netns exec {} {espada} run -c {ef} --idle-sleep-us 50 --interval 0 &",
            ns("east")
        ));
    }
    Ok(c)
}

#[derive(Serialize, Clone, Debug)]
struct Variant {
    name: String,
    ran: bool,
    note: String,
    sent: u64,
    received: u64,
    gbps_received: f64,
    loss: f64,
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

fn teardown(prefix: &str) {
    let _ = Command::new("sh").arg("-c").arg(format!("for p in $(ip netns pids {prefix}west 2>/dev/null) $(ip netns pids {prefix}east 2>/dev/null); do kill -TERM $p; done; sleep 1; for n in sunset west east sunrise; do ip netns del {prefix}$n 2>/dev/null; done")).status();
}

fn measure(a: &AbArgs, me: &str, name: &str, cmds: &[String]) -> Result<Variant> {
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

pub fn run(a: AbArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    // `espada run` inside the namespaces needs files: write the built-in configs out.
    let materialise = |p: &Option<PathBuf>, text: &str, name: &str| -> Result<Option<PathBuf>> {
        Ok(match p {
            Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?),
            None => {
                let f = std::fs::canonicalize(&a.out)?.join(format!("{name}.toml"));
                std::fs::write(&f, text)?;
                Some(f)
            }
        })
    };
    let wp = materialise(&a.west, WEST, "west")?;
    let ep = materialise(&a.east, EAST, "east")?;
    let w = load(&wp, WEST, "west")?;
    let e = load(&ep, EAST, "east")?;
    let me = std::env::current_exe()?.display().to_string();
    if let Some(which) = &a.print_setup {
        let kernel = match which.as_str() {
            "kernel" => true,
            "espada" => false,
            s => bail!("--print-setup must be kernel or espada, got {s}"),
        };
        for c in setup(&a.prefix, &w, &e, kernel, true, &me)? {
            println!("{c}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let probe = probe_kernel_esp(&a.prefix);
    let kernel_ok = match &probe {
        Ok(_) => true,
        Err(msg) if !a.espada_only => {
            eprintln!("espada ab: this kernel cannot do ESP, so there is no kernel XFRM half to compare with (ip xfrm state add: {msg}); run it on a host or VM whose kernel has CONFIG_INET_ESP, or use --espada-only");
            return Ok(ExitCode::from(1));
        }
        Err(_) => false,
    };
    std::fs::create_dir_all(&a.out)?;
    let mut variants = Vec::new();
    if kernel_ok && !a.espada_only {
        let pcpu = probe.as_ref().map(|p| *p).unwrap_or(false);
        variants.push(measure(
            &a,
            &me,
            if pcpu {
                "kernel XFRM, per-CPU SAs"
            } else {
                "kernel XFRM, one SA"
            },
            &setup(&a.prefix, &w, &e, true, pcpu, &me)?,
        )?);
    } else {
        variants.push(Variant {
            name: "kernel XFRM".into(),
            ran: false,
            note: probe.err().unwrap_or_else(|| "--espada-only".into()),
            sent: 0,
            received: 0,
            gbps_received: 0.0,
            loss: 0.0,
        });
    }
    variants.push(measure(
        &a,
        &me,
        "espada, per-CPU SAs",
        &setup(&a.prefix, &w, &e, false, true, &me)?,
    )?);
    if let Some(v) = variants.iter().find(|v| v.ran && v.received == 0) {
        eprintln!("espada ab: nothing reached sunrise through \"{}\": the lab did not forward (see `--print-setup`)", v.name);
        return Ok(ExitCode::from(1));
    }
    let mut md = String::from("| variant | ran | sent | received | loss | Gbit/s received (UDP payload) |\n|---|---|---:|---:|---:|---:|\n");
    for v in &variants {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2}% | {:.3} |\n",
            v.name,
            if v.ran { "yes" } else { "no" },
            v.sent,
            v.received,
            v.loss * 100.0,
            v.gbps_received
        ));
    }
    print!("{md}");
    for v in variants.iter().filter(|v| !v.ran) {
        println!("{}: not run ({})", v.name, v.note);
    }
    std::fs::write(a.out.join("ab.md"), &md)?;
    std::fs::write(
        a.out.join("ab.json"),
        serde_json::to_string_pretty(&variants)? + "\n",
    )?;
    println!("wrote {}/ab.{{md,json}}", a.out.display());
    Ok(ExitCode::SUCCESS)
}
