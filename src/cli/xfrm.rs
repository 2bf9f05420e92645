//! `espada xfrm -c FILE`: the Linux `ip xfrm` commands that set up the same SAs and policies in
//! the kernel, for an A/B run against kernel XFRM (per-CPU SAs with `pcpu-num`, kernel >= 6.13,
//! iproute2 >= 7.0).

use crate::config::{self, Config};
use anyhow::Result;
use clap::Args;
use espada_sadb::db::{SaDb, SaSpec};
use espada_sadb::selector::{Action, Policy};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct XfrmArgs {
    /// Configuration file.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Emit one SA per tunnel and direction instead of per-CPU SAs (kernels before 6.13).
    #[arg(long)]
    no_pcpu: bool,
}

pub fn run(a: XfrmArgs) -> Result<ExitCode> {
    let c = match config::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let db = c.sadb(c.resolved_workers())?;
    for t in c.tunnels.iter().filter(|t| t.lab_rekey.is_some()) {
        eprintln!("# espada xfrm: tunnel \"{}\" has lab_rekey: espada moves to new keys and SPIs every soft_seconds and a kernel peer does not; these are the configured SAs (set lab_rekey = false on both sides to pair with the kernel)", t.name);
    }
    let out = render(&c, &db, !a.no_pcpu);
    if let Err(e) = parse_back(&out) {
        anyhow::bail!("internal error: generated an invalid ip xfrm command: {e}");
    }
    eprintln!("# espada xfrm: the output contains keys; treat it like the key file");
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn state(
    s: &SaSpec,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    reqid: usize,
    bits: usize,
    pcpu: bool,
) -> String {
    let mut l = format!(
        "ip xfrm state add src {src} dst {dst} proto esp spi {:#010x} reqid {reqid} mode tunnel replay-window {}{} aead 'rfc4106(gcm(aes))' 0x{} 128 encap espinudp {} {} 0.0.0.0",
        s.spi,
        s.replay_window,
        if s.esn { " flag esn" } else { "" },
        hex::encode(s.key.expose_key_and_salt()),
        s.endpoints.src_port,
        s.endpoints.dst_port,
    );
    let _ = bits;
    if let (true, Some(cpu)) = (pcpu, s.cpu) {
        let _ = write!(l, " pcpu-num {cpu}");
    }
    l
}

fn policy_sel(p: &Policy) -> String {
    let sel = &p.selector;
    let mut l = format!("src {} dst {}", sel.src, sel.dst);
    if let Some(proto) = sel.proto {
        let name = match proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            1 => "icmp".to_string(),
            58 => "ipv6-icmp".to_string(),
            n => n.to_string(),
        };
        let _ = write!(l, " proto {name}");
        if !sel.src_ports.is_any() {
            let _ = write!(l, " sport {}", sel.src_ports.lo);
        }
        if !sel.dst_ports.is_any() {
            let _ = write!(l, " dport {}", sel.dst_ports.lo);
        }
    }
    l
}

/// The commands, in the order to run them (states first, then policies).
pub fn render(c: &Config, db: &SaDb, pcpu: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ip xfrm setup equivalent to espada gateway \"{}\" ({}, sa_mode {})",
        c.name,
        c.file.display(),
        db.mode.name()
    );
    for (ti, t) in c.tunnels.iter().enumerate() {
        let tun = &db.tunnels[ti];
        let reqid = ti + 1;
        let bits = t.cipher.key_bits();
        let note = if pcpu {
            " (per-CPU SAs carry pcpu-num, the fallback SA does not)"
        } else {
            " (one SA per direction)"
        };
        let _ = writeln!(s, "# tunnel \"{}\": outbound SAs{note}", t.name);
        for o in tun.outbound.all().filter(|o| pcpu || o.cpu.is_none()) {
            let _ = writeln!(s, "{}", state(o, t.local, t.remote, reqid, bits, pcpu));
        }
        let _ = writeln!(s, "# tunnel \"{}\": inbound SAs", t.name);
        for i in tun.inbound.all().filter(|o| pcpu || o.cpu.is_none()) {
            let _ = writeln!(s, "{}", state(i, t.remote, t.local, reqid, bits, pcpu));
        }
    }
    let _ = writeln!(
        s,
        "# policies, in espada's order (lower priority value = checked first)"
    );
    for (i, p) in db.spd.policies.iter().enumerate() {
        let prio = 1000 + i * 10;
        match p.action {
            Action::Protect(ti) => {
                let t = &c.tunnels[ti];
                let reqid = ti + 1;
                let fwd = policy_sel(p);
                let rev = {
                    let mut r = p.clone();
                    std::mem::swap(&mut r.selector.src, &mut r.selector.dst);
                    std::mem::swap(&mut r.selector.src_ports, &mut r.selector.dst_ports);
                    policy_sel(&r)
                };
                let _ = writeln!(s, "ip xfrm policy add {fwd} dir out priority {prio} tmpl src {} dst {} proto esp reqid {reqid} mode tunnel", t.local, t.remote);
                for dir in ["in", "fwd"] {
                    let _ = writeln!(s, "ip xfrm policy add {rev} dir {dir} priority {prio} tmpl src {} dst {} proto esp reqid {reqid} mode tunnel", t.remote, t.local);
                }
            }
            Action::Bypass => {
                for dir in ["out", "fwd"] {
                    let _ = writeln!(
                        s,
                        "ip xfrm policy add {} dir {dir} priority {prio} action allow",
                        policy_sel(p)
                    );
                }
            }
            Action::Discard => {
                for dir in ["out", "fwd"] {
                    let _ = writeln!(
                        s,
                        "ip xfrm policy add {} dir {dir} priority {prio} action block",
                        policy_sel(p)
                    );
                }
            }
        }
    }
    s
}

/// Checks that every command line is well-formed for `ip xfrm` (the subset espada emits): the
/// keywords, their order and their argument types. Returns the first problem.
pub fn parse_back(text: &str) -> Result<usize, String> {
    let mut n = 0;
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let toks = shell_words(line).map_err(|e| format!("line {}: {e}", ln + 1))?;
        let err = |m: &str| format!("line {}: {m}: {line}", ln + 1);
        let t: Vec<&str> = toks.iter().map(|s| s.as_str()).collect();
        match t.get(..4) {
            Some(["ip", "xfrm", "state", "add"]) => check_state(&t[4..]).map_err(|m| err(&m))?,
            Some(["ip", "xfrm", "policy", "add"]) => check_policy(&t[4..]).map_err(|m| err(&m))?,
            _ => {
                return Err(err(
                    "not an `ip xfrm state add` or `ip xfrm policy add` command",
                ))
            }
        }
        n += 1;
    }
    Ok(n)
}

fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if any {
        out.push(cur);
    }
    Ok(out)
}

fn want_addr(v: Option<&&str>, what: &str) -> Result<(), String> {
    v.and_then(|s| s.parse::<std::net::IpAddr>().ok())
        .map(|_| ())
        .ok_or_else(|| format!("{what} needs an address"))
}

fn want_num(v: Option<&&str>, what: &str) -> Result<u64, String> {
    let s = v.ok_or_else(|| format!("{what} needs a value"))?;
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{what}: `{s}` is not a number"))
}

fn check_state(t: &[&str]) -> Result<(), String> {
    let mut i = 0;
    let mut seen = std::collections::HashSet::new();
    while i < t.len() {
        let k = t[i];
        if !seen.insert(k) {
            return Err(format!("`{k}` given twice"));
        }
        match k {
            "src" | "dst" => {
                want_addr(t.get(i + 1), k)?;
                i += 2;
            }
            "proto" => {
                if t.get(i + 1) != Some(&"esp") {
                    return Err("proto must be esp".into());
                }
                i += 2;
            }
            "spi" | "reqid" | "replay-window" | "pcpu-num" => {
                want_num(t.get(i + 1), k)?;
                i += 2;
            }
            "mode" => {
                if t.get(i + 1) != Some(&"tunnel") {
                    return Err("mode must be tunnel".into());
                }
                i += 2;
            }
            "flag" => {
                if t.get(i + 1) != Some(&"esn") {
                    return Err("only flag esn is emitted".into());
                }
                i += 2;
            }
            "aead" => {
                if t.get(i + 1) != Some(&"rfc4106(gcm(aes))") {
                    return Err("aead algorithm must be rfc4106(gcm(aes))".into());
                }
                let key = t
                    .get(i + 2)
                    .and_then(|k| k.strip_prefix("0x"))
                    .ok_or("aead needs a 0x key")?;
                if hex::decode(key)
                    .map(|k| k.len())
                    .ok()
                    .filter(|l| *l == 20 || *l == 36)
                    .is_none()
                {
                    return Err("rfc4106 key must be 16 or 32 bytes + 4-byte salt".into());
                }
                if want_num(t.get(i + 3), "ICV length")? != 128 {
                    return Err("ICV length must be 128 bits".into());
                }
                i += 4;
            }
            "encap" => {
                if t.get(i + 1) != Some(&"espinudp") {
                    return Err("encap type must be espinudp".into());
                }
                want_num(t.get(i + 2), "encap sport")?;
                want_num(t.get(i + 3), "encap dport")?;
                want_addr(t.get(i + 4), "encap oa")?;
                i += 5;
            }
            _ => return Err(format!("unknown state keyword `{k}`")),
        }
    }
    for k in ["src", "dst", "proto", "spi", "mode", "aead"] {
        if !seen.contains(k) {
            return Err(format!("missing `{k}`"));
        }
    }
    Ok(())
}

fn check_policy(t: &[&str]) -> Result<(), String> {
    let mut i = 0;
    let mut has_tmpl_or_action = false;
    let mut dir = false;
    while i < t.len() {
        match t[i] {
            "src" | "dst" => {
                let v = t.get(i + 1).ok_or("src/dst need a prefix")?;
                v.parse::<espada_sadb::selector::Prefix>()
                    .map_err(|e| e.to_string())?;
                i += 2;
            }
            "proto" => {
                if !["tcp", "udp", "icmp", "ipv6-icmp"].contains(t.get(i + 1).unwrap_or(&"")) {
                    want_num(t.get(i + 1), "proto")?;
                }
                i += 2;
            }
            "sport" | "dport" | "priority" => {
                want_num(t.get(i + 1), t[i])?;
                i += 2;
            }
            "dir" => {
                if !["in", "out", "fwd"].contains(t.get(i + 1).unwrap_or(&"")) {
                    return Err("dir must be in, out or fwd".into());
                }
                dir = true;
                i += 2;
            }
            "action" => {
                if !["allow", "block"].contains(t.get(i + 1).unwrap_or(&"")) {
                    return Err("action must be allow or block".into());
                }
                has_tmpl_or_action = true;
                i += 2;
            }
            "tmpl" => {
                check_state(&t[i + 1..]).or_else(|e| {
                    if e.starts_with("missing") {
                        Ok(())
                    } else {
                        Err(format!("tmpl: {e}"))
                    }
                })?;
                has_tmpl_or_action = true;
                i = t.len();
            }
            k => return Err(format!("unknown policy keyword `{k}`")),
        }
    }
    if !dir || !has_tmpl_or_action {
        return Err("a policy needs dir and a tmpl or an action".into());
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::parse_back;

    const GOOD: &str = "ip xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x00001001 reqid 1 mode tunnel replay-window 4096 flag esn aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128 encap espinudp 4501 4500 0.0.0.0 pcpu-num 0\nip xfrm policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir out priority 1000 tmpl src 10.0.0.1 dst 10.0.0.2 proto esp reqid 1 mode tunnel\n";

    #[test]
    fn accepts_good_and_rejects_broken_lines() {
        assert_eq!(parse_back(GOOD), Ok(2));
        for (from, to) in [
            (
                "aead 'rfc4106(gcm(aes))' 0x01",
                "aead 'rfc4106(gcm(aes))' 0x1",
            ),
            (" 128 encap", " 96 encap"),
            ("espinudp 4501", "espinudp x"),
            ("proto esp spi", "proto ah spi"),
            ("pcpu-num 0", "pcpu 0"),
            ("dir out", "dir sideways"),
            ("10.1.0.0/24", "10.1.0.1/24"),
            ("'rfc4106(gcm(aes))'", "'rfc4106(gcm(aes))"),
        ] {
            let bad = GOOD.replacen(from, to, 1);
            assert!(
                parse_back(&bad).is_err(),
                "{from} -> {to} should be refused"
            );
        }
    }
}
