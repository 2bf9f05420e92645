//! `espada sa add|del|update|rekey`: change a running gateway's SAs through its control socket.
//! Every change is published make-before-break; the gateway logs it and answers with what it
//! did. Keys are read from a file (or stdin) and travel only over the socket (mode 0600).

use crate::cli::show::socket_of;
use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use espada_control::{client, Request};
use serde_json::{json, Map, Value};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct SaArgs {
    #[command(subcommand)]
    cmd: SaCmd,
    /// The gateway's control socket (default: from the configuration's gateway name,
    /// /run/espada/NAME.sock).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// The gateway's configuration (to find its control socket).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Print the gateway's JSON answer as it is.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    /// An SA we receive with (install it before the peer sends on it).
    In,
    /// An SA we send with.
    Out,
}

#[derive(Subcommand)]
enum SaCmd {
    /// Put a tunnel deleted with `sa del --tunnel` back as the configuration defines it; or,
    /// with --spi and --key-file, install one SA in a tunnel's slot (an inbound SA it replaces
    /// stays accepted until `sa del --spi` removes it).
    Add {
        /// The tunnel (its name in the configuration).
        #[arg(long)]
        tunnel: String,
        /// SPI of the new SA (decimal or 0x hex).
        #[arg(long, value_parser = parse_u32, requires_all = ["dir", "key_file"])]
        spi: Option<u32>,
        /// Direction of the new SA.
        #[arg(long, value_enum)]
        dir: Option<Dir>,
        /// The RFC 9611 per-CPU slot (the CPU ID); none: the tunnel's fallback SA.
        #[arg(long)]
        cpu: Option<u64>,
        /// File holding the key and 4-byte salt in hex (`-`: stdin). Never a command-line
        /// argument: other users can read those.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// UDP source port to send the SA's packets from (outbound; default: the slot's).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Delete a whole tunnel (its SAs go; its policies turn into discard placeholders, so its
    /// traffic is dropped and counted, never sent in the clear), or one inbound SA by SPI.
    Del {
        /// The tunnel to delete.
        #[arg(long, conflicts_with = "spi", required_unless_present = "spi")]
        tunnel: Option<String>,
        /// The SA to delete (inbound: a replaced SA, or the last per-CPU one).
        #[arg(long, value_parser = parse_u32)]
        spi: Option<u32>,
    },
    /// New lifetimes for an SA (its clock and counters stay); 0 removes a limit.
    Update {
        /// The SA.
        #[arg(long, value_parser = parse_u32)]
        spi: u32,
        #[arg(long)]
        soft_seconds: Option<u64>,
        #[arg(long)]
        hard_seconds: Option<u64>,
        #[arg(long)]
        soft_bytes: Option<u64>,
        #[arg(long)]
        hard_bytes: Option<u64>,
        #[arg(long)]
        soft_packets: Option<u64>,
        #[arg(long)]
        hard_packets: Option<u64>,
    },
    /// Move tunnels whose keys come from lab_secret (lab_rekey) to their next key generation
    /// now, with new SPIs. The peer accepts the next generation already: rekey it too, and
    /// both send on new keys with no packet lost. Static keys: use `sa add`.
    Rekey {
        /// Only this tunnel (default: every lab_rekey tunnel, all in one snapshot).
        #[arg(long)]
        tunnel: Option<String>,
    },
    /// Many changes at once: JSON lines from FILE (`-`: stdin), each one change as the control
    /// socket takes it, e.g. `{"what":"add","args":{"tunnel":"t7","dir":"in","spi":4096,
    /// "key":"<hex key and salt>"}}` (`what`: add, del, update, rekey). They are sent in
    /// batches of --chunk; each batch is published as one snapshot (each worker rebuilds its
    /// SAs once), all or nothing: a batch refused is not applied at all, and the batches after
    /// it are not sent. The file holds keys: only its owner may read it.
    Batch {
        /// The changes, one JSON object per line (`-`: stdin).
        file: PathBuf,
        /// Changes per batch (at most 20000; a batch is also kept under 3 MiB).
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=20000))]
        chunk: u64,
    },
}

/// Reads `sa batch` lines: each a change (`what`, `args`), with its line number in errors.
fn read_batch(p: &PathBuf) -> Result<Vec<Value>, String> {
    let mut text = String::new();
    if p.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("stdin: {e}"))?;
    } else {
        espada_config::check_key_file_mode(p)?;
        text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let mut ops = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |what: String| format!("{}:{}: {what}", p.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON ({e})")))?;
        let what = v.get("what").and_then(Value::as_str).unwrap_or("");
        if !["add", "del", "update", "rekey"].contains(&what) {
            return Err(at(format!(
                "\"what\" must be add, del, update or rekey (got {:?})",
                v.get("what").map(|w| w.to_string()).unwrap_or_default()
            )));
        }
        if v.get("cmd").is_some_and(|c| c != "sa") {
            return Err(at("only `sa` changes can be batched".into()));
        }
        let args = v.get("args").cloned().unwrap_or(Value::Null);
        if !(args.is_object() || args.is_null()) {
            return Err(at("\"args\" must be an object".into()));
        }
        ops.push(json!({"what": what, "args": args}));
    }
    if ops.is_empty() {
        return Err(format!("{}: no changes", p.display()));
    }
    Ok(ops)
}

/// Sends `ops` in batches; prints what was done.
fn batch(socket: &std::path::Path, ops: Vec<Value>, chunk: usize, raw: bool) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    let total = ops.len();
    let (mut sent, mut batches, mut first, mut last) = (0, 0, None, 0);
    let mut rest = ops.into_iter().peekable();
    while rest.peek().is_some() {
        let mut part = Vec::new();
        let mut bytes = 0;
        while let Some(op) = rest.peek() {
            let n = op.to_string().len() + 1;
            if !part.is_empty() && (part.len() >= chunk || bytes + n > 3 << 20) {
                break;
            }
            bytes += n;
            part.push(rest.next().expect("peeked"));
        }
        let n = part.len();
        let mut req = Request::new("sa", "batch");
        req.args = json!({ "ops": part });
        let r = client::request(socket, &req).map_err(|e| anyhow::anyhow!(e))?;
        if !r.ok {
            eprintln!(
                "error: batch {} (changes {}-{}): {}",
                batches + 1,
                sent + 1,
                sent + n,
                r.error.unwrap_or_default()
            );
            if sent > 0 {
                eprintln!(
                    "the {} before it were applied",
                    espada_control::supervisor::count(sent, "change", "changes")
                );
            }
            return Ok(ExitCode::from(1));
        }
        if raw {
            println!("{}", r.data);
        }
        sent += n;
        batches += 1;
        let g = r.data["snapshot"].as_u64().unwrap_or(0);
        first.get_or_insert(g);
        last = g;
    }
    let secs = start.elapsed().as_secs_f64();
    if !raw {
        println!(
            "{} applied in {} (snapshots {}-{last}) in {secs:.3} s: {:.0} changes/s",
            espada_control::supervisor::count(total, "change", "changes"),
            espada_control::supervisor::count(batches, "batch", "batches"),
            first.unwrap_or(0),
            total as f64 / secs.max(1e-9)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("\"{s}\" is not a 32-bit number (decimal or 0x hex)"))
}

fn read_key(p: &PathBuf) -> Result<String, String> {
    let mut s = String::new();
    if p.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("stdin: {e}"))?;
    } else {
        // The configuration's rule: a key file only its owner can read.
        espada_config::check_key_file_mode(p)?;
        s = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let hex: String = s
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{}: expected the key and salt in hex (e.g. 20 bytes for AES-GCM-128)",
            p.display()
        ));
    }
    Ok(hex)
}

pub fn run(a: SaArgs) -> Result<ExitCode> {
    let fail = |e: String| {
        eprintln!("error: {e}");
        Ok(ExitCode::from(1))
    };
    let socket = match socket_of(&a.socket, &a.config) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let SaCmd::Batch { file, chunk } = &a.cmd {
        return match read_batch(file) {
            Ok(ops) => batch(&socket, ops, *chunk as usize, a.json),
            Err(e) => fail(e),
        };
    }
    let mut args = Map::new();
    let what = match &a.cmd {
        SaCmd::Add {
            tunnel,
            spi,
            dir,
            cpu,
            key_file,
            port,
        } => {
            args.insert("tunnel".into(), json!(tunnel));
            if let Some(spi) = spi {
                args.insert("spi".into(), json!(spi));
                args.insert(
                    "dir".into(),
                    json!(match dir {
                        Some(Dir::In) => "in",
                        _ => "out",
                    }),
                );
                if let Some(c) = cpu {
                    args.insert("cpu".into(), json!(c));
                }
                if let Some(p) = port {
                    args.insert("port".into(), json!(p));
                }
                let Some(kf) = key_file else {
                    return fail("--spi needs --key-file".into());
                };
                match read_key(kf) {
                    Ok(k) => args.insert("key".into(), json!(k)),
                    Err(e) => return fail(e),
                };
            }
            "add"
        }
        SaCmd::Del { tunnel, spi } => {
            if let Some(t) = tunnel {
                args.insert("tunnel".into(), json!(t));
            }
            if let Some(s) = spi {
                args.insert("spi".into(), json!(s));
            }
            "del"
        }
        SaCmd::Update {
            spi,
            soft_seconds,
            hard_seconds,
            soft_bytes,
            hard_bytes,
            soft_packets,
            hard_packets,
        } => {
            args.insert("spi".into(), json!(spi));
            for (k, v) in [
                ("soft_seconds", soft_seconds),
                ("hard_seconds", hard_seconds),
                ("soft_bytes", soft_bytes),
                ("hard_bytes", hard_bytes),
                ("soft_packets", soft_packets),
                ("hard_packets", hard_packets),
            ] {
                if let Some(v) = v {
                    args.insert(k.into(), json!(v));
                }
            }
            "update"
        }
        SaCmd::Rekey { tunnel } => {
            if let Some(t) = tunnel {
                args.insert("tunnel".into(), json!(t));
            }
            "rekey"
        }
        SaCmd::Batch { .. } => unreachable!("handled above"),
    };
    let mut req = Request::new("sa", what);
    req.args = Value::Object(args);
    let r = match client::request(&socket, &req) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if !r.ok {
        return fail(r.error.unwrap_or_default());
    }
    if a.json {
        println!("{}", r.data);
    } else {
        print_answer(what, &r.data);
    }
    Ok(ExitCode::SUCCESS)
}

fn hex(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| v.to_string(), |s| format!("{s:#010x}"))
}

fn hexes(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(hex).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

fn print_answer(what: &str, d: &Value) {
    match what {
        "rekey" => {
            let all = d["rekeyed"].as_array().cloned().unwrap_or_default();
            let pending = d["pending"].as_u64().unwrap_or(0);
            if pending > 0 {
                println!(
                    "{} tunnels rekeyed: {} now, {pending} in {} of up to 512 tunnels, one every tick of the gateway (~50 ms; its log says when); the first 10:",
                    all.len(),
                    all.len() as u64 - pending,
                    espada_control::supervisor::count(d["slices_to_follow"].as_u64().unwrap_or(0) as usize, "more snapshot", "more snapshots")
                );
            } else if all.len() > 10 {
                println!(
                    "{} tunnels rekeyed in one snapshot; the first 10:",
                    all.len()
                );
            }
            for t in all.iter().take(10) {
                println!(
                    "tunnel {}: generation {}, sending on {}",
                    t["tunnel"].as_str().unwrap_or("?"),
                    t["generation"],
                    hexes(&t["sending_on"])
                );
            }
        }
        "add" if d.get("added").is_some() => println!(
            "tunnel {} is up again, sending on {}; policies back in force: {}",
            d["tunnel"].as_str().unwrap_or("?"),
            hexes(&d["sending_on"]),
            d["policies"]
        ),
        "add" => println!(
            "tunnel {}: {} SA {} installed (replacing {}); {}",
            d["tunnel"].as_str().unwrap_or("?"),
            d["dir"].as_str().unwrap_or("?"),
            hex(&d["spi"]),
            hex(&d["replaced"]),
            d["note"].as_str().unwrap_or("")
        ),
        "del" if d.get("tunnel").is_some() => println!(
            "tunnel {} deleted: SAs {} removed; its policies now discard: {}",
            d["tunnel"].as_str().unwrap_or("?"),
            hexes(&d["sas_removed"]),
            d["policies_now_discard"]
        ),
        "del" => println!(
            "SA {} deleted ({})",
            hex(&d["spi"]),
            d["deleted"].as_str().unwrap_or("")
        ),
        _ => println!(
            "SA {}: lifetimes now soft {}, hard {}",
            hex(&d["spi"]),
            limits_text(&d["soft"]),
            limits_text(&d["hard"])
        ),
    }
}

/// `{"seconds": 60, "bytes": null, "packets": 1000}` as `60 s, 1000 packets` (`none`).
fn limits_text(v: &Value) -> String {
    let parts: Vec<String> = [("seconds", "s"), ("bytes", "bytes"), ("packets", "packets")]
        .iter()
        .filter_map(|(k, unit)| v[*k].as_u64().map(|n| format!("{n} {unit}")))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Issue 27 paper cut: `sa update` printed raw JSON (`soft {"bytes":null,...}`).
    #[test]
    fn lifetimes_read_as_words() {
        assert_eq!(
            limits_text(&json!({"seconds": 60, "bytes": null, "packets": 1000})),
            "60 s, 1000 packets"
        );
        assert_eq!(
            limits_text(&json!({"seconds": null, "bytes": null, "packets": null})),
            "none"
        );
    }

    /// Issue 24 item 5: `sa add --key-file` takes a key file others can read, which the
    /// configuration refuses: the same rule everywhere now.
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.hex");
        std::fs::write(&p, "00112233445566778899aabbccddeeff01020304\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key(&p).unwrap_err();
        assert!(e.contains("readable by others (mode 644)"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_key(&p).unwrap(),
            "00112233445566778899aabbccddeeff01020304"
        );
    }
}
