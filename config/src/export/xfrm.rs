//! `ip xfrm` commands that set up (or, with [`render_delete`], remove) the same SAs and
//! policies in the Linux kernel as an espada gateway, and [`parse_back`], which checks every
//! emitted line against the syntax iproute2 takes. Used by `espada xfrm` and by the kernel
//! A/B harness.

use crate::Config;
use espada_sadb::db::{SaDb, SaSpec};
use espada_sadb::selector::{Action, Policy, PortRange};
use std::fmt::Write as _;
use std::net::IpAddr;

/// The largest anti-replay window the kernel takes (XFRMA_REPLAY_ESN_MAX, in packets).
const KERNEL_MAX_REPLAY: u32 = 4096;
/// Port ranges up to this many ports become one policy per port (iproute2 has no port masks).
const MAX_EXPANDED_PORTS: usize = 64;

fn state(
    s: &SaSpec,
    (src, dst): (IpAddr, IpAddr),
    reqid: usize,
    pcpu_num: Option<usize>,
    mixed: bool,
) -> String {
    // A per-CPU SA must say its direction (Linux: "SA_PCPU only supported with SA_DIR"), and an
    // SA marked `dir out` must have no replay window. Other SAs stay without `dir`, which
    // kernels before 6.10 and iproute2 before 6.10 do not know.
    let (dir, window) = match pcpu_num {
        Some(_) => (" dir out", 0),
        None => ("", s.replay_window.min(KERNEL_MAX_REPLAY)),
    };
    let mut l = format!(
        "ip xfrm state add src {src} dst {dst} proto esp spi {:#010x} reqid {reqid} mode tunnel{dir} replay-window {}{} aead 'rfc4106(gcm(aes))' 0x{} 128 encap espinudp {} {} {}",
        s.spi,
        window,
        // af-unspec: the SA carries inner packets of both families (an IPv4 subnet through an
        // IPv6 tunnel or the other way round); without it Linux checks every inner packet
        // against a selector of the outer family and drops the others (XfrmInStateMismatch).
        match (s.esn, mixed) {
            (true, true) => " flag esn af-unspec",
            (true, false) => " flag esn",
            (false, true) => " flag af-unspec",
            (false, false) => "",
        },
        hex::encode(s.key.expose_key_and_salt()),
        s.endpoints.src_port,
        s.endpoints.dst_port,
        // The original address (NAT-OA), unused in tunnel mode: of the tunnel's family.
        if dst.is_ipv6() { "::" } else { "0.0.0.0" },
    );
    let l2 = &s.lifetimes;
    for (k, v) in [
        ("time-soft", l2.soft.seconds),
        ("time-hard", l2.hard.seconds),
        ("byte-soft", l2.soft.bytes),
        ("byte-hard", l2.hard.bytes),
        ("packet-soft", l2.soft.packets),
        ("packet-hard", l2.hard.packets),
    ] {
        if let Some(v) = v {
            let _ = write!(l, " limit {k} {v}");
        }
    }
    if let Some(cpu) = pcpu_num {
        let _ = write!(l, " pcpu-num {cpu}");
    }
    l
}

/// The outbound SAs this gateway really sends on, as `espada check` lists them: the fallback
/// SA and the per-CPU SAs of the cores it runs (with pcpu > workers, the SAs of CPUs it does not
/// run carry nothing and are left out), or the fallback SA alone without `pcpu`. Also how many
/// per-CPU SAs were left out.
fn outbound_sas(db: &SaDb, ti: usize, pcpu: bool) -> (Vec<&SaSpec>, usize) {
    let tun = &db.tunnels[ti];
    if !pcpu {
        return (vec![&tun.outbound.fallback], 0);
    }
    let used: Vec<u32> = (0..db.workers)
        .map(|core| db.outbound_for(ti, core).spi)
        .collect();
    let outs: Vec<&SaSpec> = tun
        .outbound
        .all()
        .filter(|o| o.cpu.is_none() || used.contains(&o.spi))
        .collect();
    let unused = tun.outbound.per_cpu.len() + 1 - outs.len();
    (outs, unused)
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        1 => "icmp".to_string(),
        58 => "ipv6-icmp".to_string(),
        n => n.to_string(),
    }
}

/// The ports of a range as iproute2 can say them: any, or a list of single ports.
fn ports(r: &PortRange, what: &str, policy: &str) -> Result<Vec<Option<u16>>, String> {
    if r.is_any() {
        return Ok(vec![None]);
    }
    let n = r.hi as usize - r.lo as usize + 1;
    if n > MAX_EXPANDED_PORTS {
        return Err(format!(
            "policy \"{policy}\": {what} range {}-{} has {n} ports; iproute2 takes one port per policy (no masks), and more than {MAX_EXPANDED_PORTS} policies for one range are not emitted: narrow the range or drop the port selector",
            r.lo, r.hi
        ));
    }
    Ok((r.lo..=r.hi).map(Some).collect())
}

/// The `src .. dst .. [proto .. [sport ..] [dport ..]]` selectors of a policy (several when a
/// port range is expanded); empty when src and dst are of different families (no such
/// packet exists, and iproute2 refuses the policy).
fn policy_sels(p: &Policy) -> Result<Vec<String>, String> {
    let sel = &p.selector;
    if sel.src.addr().is_ipv4() != sel.dst.addr().is_ipv4() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    let base = format!("src {} dst {}", sel.src, sel.dst);
    let Some(proto) = sel.proto else {
        return Ok(vec![base]);
    };
    let ported = matches!(proto, 6 | 17 | 132 | 33);
    let (sp, dp) = if ported {
        (
            ports(&sel.src_ports, "source port", &p.name)?,
            ports(&sel.dst_ports, "destination port", &p.name)?,
        )
    } else {
        (vec![None], vec![None])
    };
    if sp.len() * dp.len() > MAX_EXPANDED_PORTS {
        return Err(format!(
            "policy \"{}\": its source and destination port ranges make {} policies; narrow them",
            p.name,
            sp.len() * dp.len()
        ));
    }
    for s in &sp {
        for d in &dp {
            let mut l = format!("{base} proto {}", proto_name(proto));
            if let Some(s) = s {
                let _ = write!(l, " sport {s}");
            }
            if let Some(d) = d {
                let _ = write!(l, " dport {d}");
            }
            out.push(l);
        }
    }
    Ok(out)
}

fn reversed(p: &Policy) -> Policy {
    let mut r = p.clone();
    std::mem::swap(&mut r.selector.src, &mut r.selector.dst);
    std::mem::swap(&mut r.selector.src_ports, &mut r.selector.dst_ports);
    r
}

/// The routes the kernel needs before XFRM sees a packet (it routes first, then applies the
/// policy): one per remote subnet of every tunnel, via the peer's black address, as `ip`
/// arguments (`route add 10.2.0.0/24 via 192.168.100.2`).
pub fn routes(c: &Config) -> Vec<String> {
    c.tunnels
        .iter()
        .flat_map(|t| routes_of(t).into_iter().map(|(_, r)| r))
        .collect()
}

fn routes_of(t: &crate::TunnelConfig) -> Vec<(String, String)> {
    t.remote_subnets
        .iter()
        .map(|r| {
            // An IPv4 subnet behind an IPv6 tunnel (or the other way round): a route through
            // a next hop of the other family (Linux >= 5.2: `via inet6`).
            let via = match (r.addr().is_ipv4(), t.remote.is_ipv4()) {
                (true, false) => "via inet6",
                (false, true) => "via inet",
                _ => "via",
            };
            (r.to_string(), format!("route add {r} {via} {}", t.remote))
        })
        .collect()
}

/// The commands, in the order to run them (states first, then policies).
pub fn render(c: &Config, db: &SaDb, pcpu: bool) -> Result<String, String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ip xfrm setup equivalent to espada gateway \"{}\" ({}, sa_mode {})",
        c.name,
        c.file.display(),
        db.mode.name()
    );
    let _ = writeln!(s, "# Inbound ESP-in-UDP reaches these SAs only while a UDP socket on port 4500 has UDP_ENCAP_ESPINUDP set (an IKE daemon's, or `espada xfrm --encap-socket &`).");
    if pcpu && db.tunnels.iter().any(|t| !t.outbound.per_cpu.is_empty()) {
        let _ = writeln!(s, "# Per-CPU SAs (`pcpu-num`, RFC 9611, with `dir out`) need Linux >= 6.13 and iproute2 >= 7.0; with older ones use `espada xfrm --no-pcpu`.");
    }
    for (ti, t) in c.tunnels.iter().enumerate() {
        let tun = &db.tunnels[ti];
        let reqid = ti + 1;
        if tun.outbound.fallback.replay_window > KERNEL_MAX_REPLAY {
            let _ = writeln!(s, "# tunnel \"{}\": replay_window {} is above the kernel's limit; the kernel's SAs get {KERNEL_MAX_REPLAY}", t.name, tun.outbound.fallback.replay_window);
        }
        for (r, route) in routes_of(t) {
            let _ = writeln!(s, "# tunnel \"{}\": the kernel routes before it applies a policy: it needs a route to {r}, e.g. `ip {route}`", t.name);
        }
        let note = if pcpu {
            "per-CPU SAs carry pcpu-num, the fallback SA does not"
        } else {
            "the fallback SA only: the kernel sends on one SA"
        };
        let mixed = t
            .local_subnets
            .iter()
            .chain(&t.remote_subnets)
            .any(|p| p.addr().is_ipv4() != t.remote.is_ipv4());
        let _ = writeln!(s, "# tunnel \"{}\": outbound SAs ({note})", t.name);
        let (outs, unused) = outbound_sas(db, ti, pcpu);
        if unused > 0 {
            let _ = writeln!(s, "# tunnel \"{}\": pcpu = {} but the gateway runs {} worker(s): the {unused} per-CPU SA(s) of the CPUs it does not run send nothing and are left out (as in `espada check`)", t.name, tun.outbound.per_cpu.len(), db.workers);
        }
        for o in outs {
            let cpu = if pcpu { o.cpu } else { None };
            let _ = writeln!(s, "{}", state(o, (t.local, t.remote), reqid, cpu, mixed));
        }
        let _ = writeln!(
            s,
            "# tunnel \"{}\": inbound SAs (every SPI the peer sends on, per-CPU ones included; no pcpu-num: inbound SAs need none)",
            t.name
        );
        for i in tun.inbound.all() {
            let _ = writeln!(s, "{}", state(i, (t.remote, t.local), reqid, None, mixed));
        }
    }
    let _ = writeln!(
        s,
        "# policies, in espada's order (lower priority value = checked first)"
    );
    for (i, p) in db.spd.policies.iter().enumerate() {
        let prio = 1000 + i * 10;
        let fwd = policy_sels(p)?;
        if fwd.is_empty() {
            let _ = writeln!(s, "# policy \"{}\" ({} -> {}) mixes IPv4 and IPv6: no packet matches it, nothing to emit", p.name, p.selector.src, p.selector.dst);
            continue;
        }
        match p.action {
            Action::Protect(ti) => {
                let t = &c.tunnels[ti];
                let reqid = ti + 1;
                for sel in &fwd {
                    let _ = writeln!(s, "ip xfrm policy add {sel} dir out priority {prio} tmpl src {} dst {} proto esp reqid {reqid} mode tunnel", t.local, t.remote);
                }
                for rev in policy_sels(&reversed(p))? {
                    for dir in ["in", "fwd"] {
                        let _ = writeln!(s, "ip xfrm policy add {rev} dir {dir} priority {prio} tmpl src {} dst {} proto esp reqid {reqid} mode tunnel", t.remote, t.local);
                    }
                }
            }
            Action::Bypass | Action::Discard => {
                let what = if p.action == Action::Bypass {
                    "allow"
                } else {
                    "block"
                };
                for sel in &fwd {
                    for dir in ["out", "fwd"] {
                        let _ = writeln!(
                            s,
                            "ip xfrm policy add {sel} dir {dir} priority {prio} action {what}"
                        );
                    }
                }
            }
        }
    }
    Ok(s)
}

/// The commands that remove what [`render`] with the same `pcpu` sets up: policies first, then
/// the SAs.
pub fn render_delete(c: &Config, db: &SaDb, pcpu: bool) -> Result<String, String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# remove the ip xfrm setup of espada gateway \"{}\" ({})",
        c.name,
        c.file.display()
    );
    for p in &db.spd.policies {
        let dirs: &[(&str, bool)] = match p.action {
            Action::Protect(_) => &[("out", false), ("in", true), ("fwd", true)],
            _ => &[("out", false), ("fwd", false)],
        };
        for (dir, rev) in dirs {
            let sels = if *rev {
                policy_sels(&reversed(p))?
            } else {
                policy_sels(p)?
            };
            for sel in sels {
                let _ = writeln!(s, "ip xfrm policy delete {sel} dir {dir}");
            }
        }
    }
    for (ti, t) in c.tunnels.iter().enumerate() {
        let tun = &db.tunnels[ti];
        let (outs, _) = outbound_sas(db, ti, pcpu);
        for o in outs {
            let _ = writeln!(
                s,
                "ip xfrm state delete src {} dst {} proto esp spi {:#010x}",
                t.local, t.remote, o.spi
            );
        }
        for i in tun.inbound.all() {
            let _ = writeln!(
                s,
                "ip xfrm state delete src {} dst {} proto esp spi {:#010x}",
                t.remote, t.local, i.spi
            );
        }
    }
    Ok(s)
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
            Some(["ip", "xfrm", "policy", "delete"]) => {
                check_policy_delete(&t[4..]).map_err(|m| err(&m))?
            }
            Some(["ip", "xfrm", "state", "delete"]) => {
                check_state_delete(&t[4..]).map_err(|m| err(&m))?
            }
            _ => {
                return Err(err(
                    "not an `ip xfrm state add|delete` or `ip xfrm policy add|delete` command",
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
        if k == "limit" {
            let what = t.get(i + 1).copied().unwrap_or("");
            if ![
                "time-soft",
                "time-hard",
                "byte-soft",
                "byte-hard",
                "packet-soft",
                "packet-hard",
            ]
            .contains(&what)
            {
                return Err(format!("unknown limit `{what}`"));
            }
            if !seen.insert(what) {
                return Err(format!("limit `{what}` given twice"));
            }
            want_num(t.get(i + 2), what)?;
            i += 3;
            continue;
        }
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
            "dir" => {
                if !["in", "out"].contains(t.get(i + 1).unwrap_or(&"")) {
                    return Err("an SA's dir is in or out".into());
                }
                i += 2;
            }
            "flag" => {
                i += 1;
                let mut n = 0;
                while let Some(f) = t.get(i).filter(|f| ["esn", "af-unspec"].contains(f)) {
                    let _ = f;
                    i += 1;
                    n += 1;
                }
                if n == 0 {
                    return Err("only flags esn and af-unspec are emitted".into());
                }
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

fn check_state_delete(t: &[&str]) -> Result<(), String> {
    match t {
        ["src", a, "dst", b, "proto", "esp", "spi", spi] => {
            want_addr(Some(a), "src")?;
            want_addr(Some(b), "dst")?;
            want_num(Some(spi), "spi").map(|_| ())
        }
        _ => Err("expected: src ADDR dst ADDR proto esp spi SPI".into()),
    }
}

fn check_policy_delete(t: &[&str]) -> Result<(), String> {
    if t.iter().any(|k| ["tmpl", "action", "priority"].contains(k)) {
        return Err("a policy is deleted by its selector and dir only".into());
    }
    let mut with = t.to_vec();
    with.extend(["action", "allow"]);
    check_policy(&with)
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
    use super::{parse_back, render, render_delete};

    fn east() -> crate::Config {
        crate::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/east.toml"
        )))
        .unwrap()
    }

    fn lines<'a>(out: &'a str, has: &str) -> Vec<&'a str> {
        out.lines().filter(|l| l.contains(has)).collect()
    }

    #[test]
    fn inbound_sas_cover_every_peer_spi_and_carry_no_pcpu_num() {
        let c = east();
        let db = c.sadb(c.resolved_workers()).unwrap();
        for pcpu in [true, false] {
            let out = render(&c, &db, pcpu).unwrap();
            parse_back(&out).unwrap();
            let inbound = lines(
                &out,
                "state add src 192.168.100.1 dst 192.168.100.2 proto esp",
            );
            // The peer (west) sends on its fallback SA and its two per-CPU SAs.
            assert_eq!(inbound.len(), 3, "{out}");
            assert!(inbound.iter().all(|l| !l.contains("pcpu-num")), "{out}");
            let outbound = lines(
                &out,
                "state add src 192.168.100.2 dst 192.168.100.1 proto esp",
            );
            if pcpu {
                assert_eq!(outbound.len(), 3);
                assert_eq!(
                    outbound.iter().filter(|l| l.contains("pcpu-num")).count(),
                    2
                );
            } else {
                assert_eq!(outbound.len(), 1, "--no-pcpu sends on the fallback SA");
                assert!(outbound.iter().all(|l| !l.contains("pcpu-num")));
            }
            // Lifetimes reach the kernel.
            assert!(inbound[0].contains("limit time-soft 3300 limit time-hard 3600"));
            // --delete removes exactly what was added.
            let del = render_delete(&c, &db, pcpu).unwrap();
            parse_back(&del).unwrap();
            assert_eq!(
                lines(&del, "state delete").len(),
                inbound.len() + outbound.len()
            );
            assert_eq!(lines(&del, "policy delete").len(), 3);
        }
    }

    #[test]
    fn kernel_limits_families_and_port_ranges() {
        let mut c = east();
        c.tunnels[0].replay_window = 8192;
        let mut v6 = c.spd.policies[0].clone();
        v6.name = "mixed".into();
        v6.selector.dst = "fd00:2::/64".parse().unwrap();
        c.spd.policies.push(v6);
        let mut ports = c.spd.policies[0].clone();
        ports.name = "ports".into();
        ports.selector.proto = Some(17);
        ports.selector.dst_ports = espada_sadb::selector::PortRange { lo: 5000, hi: 5003 };
        c.spd.policies.insert(0, ports);
        let db = c.sadb(c.resolved_workers()).unwrap();
        let out = render(&c, &db, false).unwrap();
        parse_back(&out).unwrap();
        assert!(!out.contains("replay-window 8192") && out.contains("replay-window 4096"));
        assert!(out.contains("mixes IPv4 and IPv6"), "{out}");
        assert!(!out.contains("fd00:2::/64 dir"), "{out}");
        for p in 5000..=5003 {
            assert!(out.contains(&format!("dport {p} dir out")), "{out}");
        }
        c.spd.policies[0].selector.dst_ports.hi = 6000;
        let db = c.sadb(c.resolved_workers()).unwrap();
        let e = render(&c, &db, false).unwrap_err();
        assert!(e.contains("5000-6000 has 1001 ports"), "{e}");
    }

    const GOOD: &str = "ip xfrm state add src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x00001001 reqid 1 mode tunnel replay-window 4096 flag esn aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 128 encap espinudp 4501 4500 0.0.0.0 pcpu-num 0\nip xfrm policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir out priority 1000 tmpl src 10.0.0.1 dst 10.0.0.2 proto esp reqid 1 mode tunnel\n";

    #[test]
    fn pcpu_above_workers_emits_what_check_lists() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/east.toml"))
                .unwrap();
        let text = text.replace("\npcpu = 2", "\npcpu = 4");
        let path = std::env::temp_dir().join(format!("espada-xfrm-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let c = crate::load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(c.tunnels[0].pcpu, 4);
        let db = c.sadb(2).unwrap();
        let out = render(&c, &db, true).unwrap();
        parse_back(&out).unwrap();
        // What `espada check` lists for the two cores, and the fallback SA.
        let mut want: Vec<u32> = (0..2).map(|core| db.outbound_for(0, core).spi).collect();
        want.push(db.tunnels[0].outbound.fallback.spi);
        want.sort();
        let mut got: Vec<u32> = lines(&out, "ip xfrm state add")
            .iter()
            .filter(|l| l.contains("src 192.168.100.2 "))
            .map(|l| {
                let spi = l.split(" spi ").nth(1).unwrap().split(' ').next().unwrap();
                u32::from_str_radix(spi.trim_start_matches("0x"), 16).unwrap()
            })
            .collect();
        got.sort();
        assert_eq!(got, want, "{out}");
        assert!(
            out.contains("pcpu = 4 but the gateway runs 2 worker(s)"),
            "{out}"
        );
        // --delete removes the same set.
        let del = render_delete(&c, &db, true).unwrap();
        assert_eq!(
            lines(&del, "state delete src 192.168.100.2 ").len(),
            want.len(),
            "{del}"
        );
    }

    #[test]
    fn an_ipv6_tunnel_with_both_families_inside() {
        let c = crate::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/lab/east-dual.toml"
        )))
        .unwrap();
        let db = c.sadb(c.resolved_workers()).unwrap();
        let out = render(&c, &db, false).unwrap();
        parse_back(&out).unwrap();
        let states = lines(&out, "ip xfrm state add");
        assert_eq!(states.len(), 4, "{out}");
        for l in &states {
            // IPv4 and IPv6 inner packets on one SA: its selector must not be of one family.
            assert!(l.contains("flag esn af-unspec"), "{l}");
            // The NAT-OA of an IPv6 SA is an IPv6 address.
            assert!(
                l.contains("encap espinudp 450") && l.contains(" :: "),
                "{l}"
            );
        }
        // One policy set per family; none mixes them.
        assert_eq!(
            lines(&out, "ip xfrm policy add src 10.2.0.0/24 dst 10.1.0.0/24").len(),
            1
        );
        assert_eq!(
            lines(&out, "ip xfrm policy add src fd00:2::/64 dst fd00:1::/64").len(),
            1
        );
        assert!(lines(&out, "ip xfrm policy add src 10.").iter().all(|l| !l
            .split(" dir ")
            .next()
            .unwrap()
            .contains("fd00")));
        assert!(
            out.contains("ip route add 10.1.0.0/24 via inet6 fd00:100::1"),
            "{out}"
        );
        // An IPv4-only tunnel keeps its plain flags.
        let v4 = east();
        let out = render(&v4, &v4.sadb(v4.resolved_workers()).unwrap(), false).unwrap();
        assert!(
            !out.contains("af-unspec") && out.contains(" 0.0.0.0"),
            "{out}"
        );
    }

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
