//! From TOML text to a validated [`Config`]: serde reads the text into the `Raw*` structs
//! (spans kept, unknown fields denied), then one small pass per section checks and converts,
//! each with the same `file:line:col` errors: [`gateway`], [`port`], [`neighbors`], per
//! tunnel [`tunnel`] (its ports and SPIs, lifetimes, lab_rekey, keys) with the checks across
//! tunnels in [`Seen`], and the SPD in [`spd`].

use super::*;
use std::collections::{HashMap, HashSet};

/// The files a configuration is read from: the main one (source 0) and its includes.
struct Sources<'a> {
    path: &'a Path,
    text: &'a str,
    includes: Vec<(PathBuf, String, RawInclude)>,
}

impl Sources<'_> {
    /// The error context of source `i`.
    fn ctx(&self, i: usize) -> Ctx<'_> {
        match i {
            0 => Ctx {
                file: self.path,
                text: self.text,
            },
            i => Ctx {
                file: &self.includes[i - 1].0,
                text: &self.includes[i - 1].1,
            },
        }
    }
}

/// Parses and validates configuration text (`path` is used in messages and to find key files).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file: path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        toml_error(
            &ctx,
            &e,
            " (see configs/README.md for the fields of each section)",
        )
    })?;
    // The included files: each tunnel and policy keeps its file, for messages.
    let srcs = Sources {
        path,
        text,
        includes: includes(&ctx, &raw.gateway.include, text.len() as u64)?,
    };
    let mut all_tunnels: Vec<(usize, &RawTunnel)> = raw.tunnel.iter().map(|t| (0, t)).collect();
    let mut all_policies: Vec<(usize, &RawPolicy)> = raw.policy.iter().map(|p| (0, p)).collect();
    for (i, (_, _, inc)) in srcs.includes.iter().enumerate() {
        all_tunnels.extend(inc.tunnel.iter().map(|t| (i + 1, t)));
        all_policies.extend(inc.policy.iter().map(|p| (i + 1, p)));
    }
    let g = gateway(&ctx, &raw.gateway)?;
    let red = port(&ctx, &raw.red, "red")?;
    let black = port(&ctx, &raw.black, "black")?;
    let neighbors = neighbors(&ctx, &raw.neighbor)?;
    if all_tunnels.is_empty() {
        return Err(ctx.err(None, "no [[tunnel]]: a gateway needs at least one tunnel"));
    }
    let mut tunnels: Vec<TunnelConfig> = Vec::new();
    let mut seen = Seen::default();
    for &(src, t) in &all_tunnels {
        let tc = tunnel(&srcs, src, t, g.workers, &mut seen, &tunnels)?;
        tunnels.push(tc);
    }
    let spd = spd(&srcs, raw.policy.is_empty(), &all_policies, &tunnels)?;
    Ok(Config {
        file: path.to_path_buf(),
        name: raw.gateway.name.clone(),
        workers: g.workers,
        cores: g.cores,
        control_socket: raw.gateway.control_socket.as_ref().map(|p| {
            let p = PathBuf::from(p);
            if p.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            }
        }),
        sa_mode: g.sa_mode,
        crypto: g.crypto,
        red,
        black,
        neighbors,
        tunnels,
        spd,
        dpdk: raw.dpdk.as_ref().map(|d| DpdkConfig {
            eal: d
                .eal
                .as_deref()
                .map(|e| e.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
            red_port: d.red_port.clone(),
            black_port: d.black_port.clone(),
        }),
    })
}

/// `[gateway]`'s checked values.
struct GatewayValues {
    sa_mode: SaMode,
    crypto: Option<Backend>,
    cores: Option<Vec<usize>>,
    /// 0: as many as online cores.
    workers: usize,
}

/// `[gateway]`: SA mode, crypto backend, cores and workers.
fn gateway(ctx: &Ctx, g: &RawGateway) -> Result<GatewayValues, ConfigError> {
    let sa_mode = match g.sa_mode.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "pcpu")) => SaMode::PerCpu,
        Some((_, "shared")) => SaMode::Shared,
        Some((s, v)) => {
            return Err(ctx.at(
                s,
                format!("sa_mode must be \"pcpu\" or \"shared\", got \"{v}\""),
            ))
        }
    };
    let crypto = match &g.crypto {
        None => None,
        Some(s) if s.get_ref() == "auto" => None,
        Some(s) => match Backend::from_name(s.get_ref()) {
            Some(b) if Backend::available().contains(&b) => Some(b),
            Some(b) => return Err(ctx.at(s, format!("crypto backend \"{b}\" is not built into this binary (build with --features {b})"))),
            None => return Err(ctx.at(s, format!("crypto must be \"auto\", \"ring\", \"aes-gcm\", \"aws-lc\" or \"ipsec-mb\", got \"{}\"", s.get_ref()))),
        },
    };
    let cores = match &g.cores {
        None => None,
        Some(s) => {
            let v = espada_pinning::parse_cpu_list(s.get_ref())
                .map_err(|e| ctx.at(s, e.to_string()))?;
            if v.is_empty() {
                return Err(ctx.at(
                    s,
                    "cores lists no core (give e.g. cores = \"2-3\", or leave it out)",
                ));
            }
            Some(v)
        }
    };
    let workers = match (&g.workers, &cores) {
        (Some(w), Some(_)) => return Err(ctx.at(w, "give either workers or cores, not both")),
        (Some(w), None) => *w.get_ref(),
        (None, Some(c)) => c.len(),
        (None, None) => 0,
    };
    Ok(GatewayValues {
        sa_mode,
        crypto,
        cores,
        workers,
    })
}

/// `[red]` or `[black]` (`side`).
fn port(ctx: &Ctx, p: &Option<RawPort>, side: &str) -> Result<Option<PortConfig>, ConfigError> {
    let Some(p) = p else { return Ok(None) };
    let (address, prefix) = addr_prefix(ctx, &p.address, &format!("[{side}] address"))?;
    let address6 = match &p.address6 {
        None => None,
        Some(s) => match addr_prefix(ctx, s, &format!("[{side}] address6"))? {
            (IpAddr::V6(a), pf) => Some((a, pf)),
            (IpAddr::V4(_), _) => {
                return Err(ctx.at(
                    s,
                    format!(
                        "[{side}] address6 must be an IPv6 address with its prefix length, like fd00:1::1/64"
                    ),
                ))
            }
        },
    };
    let gateway6 = match &p.gateway6 {
        None => None,
        Some(s) => match (ip(ctx, s, &format!("[{side}] gateway6"))?, &address6) {
            (IpAddr::V6(g), Some((_, pf))) if pf.contains(IpAddr::V6(g)) => Some(g),
            (IpAddr::V6(_), Some((_, pf))) => {
                return Err(ctx.at(
                    s,
                    format!("[{side}] gateway6 must be on the IPv6 subnet {pf}"),
                ))
            }
            (IpAddr::V6(_), None) => {
                return Err(ctx.at(
                    s,
                    format!("[{side}] gateway6 needs address6 (the side's IPv6 address)"),
                ))
            }
            (IpAddr::V4(_), _) => {
                return Err(ctx.at(s, format!("[{side}] gateway6 must be an IPv6 address")))
            }
        },
    };
    let mtu = match &p.mtu {
        None => 1500,
        Some(m) if (576..=9216).contains(m.get_ref()) => *m.get_ref(),
        Some(m) => {
            return Err(ctx.at(
                m,
                format!(
                    "[{side}] mtu must be between 576 and 9216, got {}",
                    m.get_ref()
                ),
            ))
        }
    };
    if let (Some(s), true) = (&p.address6, mtu < 1280) {
        return Err(ctx.at(
            s,
            format!(
                "[{side}] address6: IPv6 needs an mtu of at least 1280 (RFC 8200 §5), got {mtu}"
            ),
        ));
    }
    if let Some(m) = &p.mac {
        mac(ctx, m, &format!("[{side}] mac"))?;
    }
    let gateway = match &p.gateway {
        None => None,
        Some(s) => Some(ip(ctx, s, &format!("[{side}] gateway"))?),
    };
    Ok(Some(PortConfig {
        interface: p.interface.clone(),
        address,
        prefix,
        mtu,
        gateway,
        address6,
        gateway6,
    }))
}

/// A MAC address (`what` names the field in the message).
fn mac(
    ctx: &Ctx,
    m: &Spanned<String>,
    what: &str,
) -> Result<espada_wire::ethernet::MacAddr, ConfigError> {
    espada_wire::ethernet::MacAddr::parse(m.get_ref()).ok_or_else(|| {
        ctx.at(
            m,
            format!(
                "{what}: `{}` is not a MAC address like 02:00:00:00:00:01",
                m.get_ref()
            ),
        )
    })
}

/// `[[neighbor]]`: static entries.
fn neighbors(
    ctx: &Ctx,
    raw: &[RawNeighbor],
) -> Result<Vec<(IpAddr, espada_wire::ethernet::MacAddr)>, ConfigError> {
    raw.iter()
        .map(|n| {
            Ok((
                ip(ctx, &n.ip, "neighbor ip")?,
                mac(ctx, &n.mac, "neighbor mac")?,
            ))
        })
        .collect()
}

/// What the tunnels so far hold, for the checks across tunnels (sets: linear in the number
/// of tunnels and SAs).
#[derive(Default)]
struct Seen {
    names: HashSet<String>,
    /// Inbound SPIs → (source, span of the tunnel's in_spi).
    spis: BTreeMap<u32, (usize, Range<usize>)>,
    /// Every key so far: fingerprint → (SPI, tunnel index).
    keys: HashMap<u128, (u32, usize)>,
}

/// A tunnel's SA ports and SPIs.
struct SaNumbers {
    pcpu: usize,
    peer_pcpu: usize,
    base_port: u16,
    peer_base_port: u16,
    fallback_port: u16,
    out_spi: u32,
    in_spi: u32,
}

impl SaNumbers {
    /// Ours (inbound): in_spi and one per peer per-CPU SA.
    fn in_spis(&self) -> Vec<u32> {
        std::iter::once(self.in_spi)
            .chain((0..self.peer_pcpu).map(|i| self.in_spi + 1 + i as u32))
            .collect()
    }

    /// The peer's (outbound): out_spi and one per per-CPU SA.
    fn out_spis(&self) -> Vec<u32> {
        std::iter::once(self.out_spi)
            .chain((0..self.pcpu).map(|i| self.out_spi + 1 + i as u32))
            .collect()
    }
}

/// A tunnel's keys and where they came from.
struct Keys {
    keys: BTreeMap<u32, KeyMaterial>,
    source: &'static str,
    warning: Option<String>,
}

/// One `[[tunnel]]` of source `src`, checked alone and against the tunnels before it.
fn tunnel(
    srcs: &Sources,
    src: usize,
    t: &RawTunnel,
    workers: usize,
    seen: &mut Seen,
    before: &[TunnelConfig],
) -> Result<TunnelConfig, ConfigError> {
    let ctx = srcs.ctx(src);
    let ctx = &ctx;
    let name = t.name.get_ref().clone();
    if !seen.names.insert(name.clone()) {
        return Err(ctx.at(&t.name, format!("duplicate tunnel name \"{name}\"")));
    }
    let local = ip(ctx, &t.local, "local")?;
    let remote = ip(ctx, &t.remote, "remote")?;
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(ctx.at(
            &t.remote,
            format!("remote {remote} is not of the same IP version as local {local}"),
        ));
    }
    let subnets = |v: &Vec<Spanned<String>>, what: &str| -> Result<Vec<Prefix>, ConfigError> {
        v.iter().map(|s| prefix(ctx, s, what)).collect()
    };
    let local_subnets = subnets(&t.local_subnets, "local_subnets")?;
    let remote_subnets = subnets(&t.remote_subnets, "remote_subnets")?;
    if local_subnets.is_empty() || remote_subnets.is_empty() {
        return Err(ctx.at(
            &t.name,
            "local_subnets and remote_subnets must each list at least one prefix",
        ));
    }
    let cipher = match &t.cipher {
        None => Algorithm::AesGcm128,
        Some(c) => Algorithm::from_name(c.get_ref()).ok_or_else(|| {
            ctx.at(
                c,
                format!(
                    "cipher must be \"aes-gcm-128\" or \"aes-gcm-256\", got \"{}\"",
                    c.get_ref()
                ),
            )
        })?,
    };
    let replay_window = ranged(
        ctx,
        &t.replay_window,
        "replay_window",
        MIN_WINDOW as i64,
        MAX_WINDOW as i64,
        4096,
    )? as u32;
    let sa = sa_numbers(ctx, t, workers)?;
    let (ttl, df, shared_sa_wire_order) = outer_header(ctx, t)?;
    let lifetimes = lifetimes(ctx, t)?;
    seen.check_spis(srcs, src, t, &sa)?;
    one_key_source(ctx, t)?;
    let lab_rekey = lab_rekey(ctx, t, &sa, lifetimes.soft.seconds)?;
    let all_spis: Vec<u32> = sa.in_spis().into_iter().chain(sa.out_spis()).collect();
    let keys = keys(ctx, t, &name, cipher, &all_spis)?;
    seen.check_keys(ctx, t, &keys.keys, before)?;
    Ok(TunnelConfig {
        name,
        local,
        remote,
        local_subnets,
        remote_subnets,
        cipher,
        esn: t.esn.unwrap_or(true),
        replay_window,
        pcpu: sa.pcpu,
        peer_pcpu: sa.peer_pcpu,
        base_port: sa.base_port,
        peer_base_port: sa.peer_base_port,
        fallback_port: sa.fallback_port,
        out_spi: sa.out_spi,
        in_spi: sa.in_spi,
        ttl,
        df,
        lifetimes,
        keys: keys.keys,
        key_source: keys.source,
        key_warning: keys.warning,
        lab_rekey,
        ike: t.ike.as_ref().is_some_and(|i| *i.get_ref()),
        shared_sa_wire_order,
    })
}

/// A tunnel's per-CPU SA counts, UDP ports and SPIs.
fn sa_numbers(ctx: &Ctx, t: &RawTunnel, workers: usize) -> Result<SaNumbers, ConfigError> {
    let default_pcpu = if workers > 0 {
        workers as i64
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get()) as i64
    };
    let pcpu = ranged(ctx, &t.pcpu, "pcpu", 0, 1024, default_pcpu)? as usize;
    let peer_pcpu = ranged(ctx, &t.peer_pcpu, "peer_pcpu", 0, 1024, pcpu as i64)? as usize;
    let fallback_port = ranged(ctx, &t.fallback_port, "fallback_port", 1, 65535, 4500)? as u16;
    let base_port = ranged(ctx, &t.base_port, "base_port", 1, 65535 - pcpu as i64, 4501)? as u16;
    let peer_base_port = ranged(
        ctx,
        &t.peer_base_port,
        "peer_base_port",
        1,
        65535 - peer_pcpu as i64,
        base_port as i64,
    )? as u16;
    if (base_port..base_port + pcpu as u16).contains(&fallback_port) {
        let s = t
            .base_port
            .as_ref()
            .or(t.fallback_port.as_ref())
            .unwrap_or(&t.out_spi);
        return Err(ctx.at(s, format!("the per-CPU source ports {base_port}..{} include the fallback port {fallback_port}: each SA needs its own port", base_port as usize + pcpu - 1)));
    }
    let out_spi = ranged(
        ctx,
        &Some(t.out_spi.clone()),
        "out_spi",
        256,
        u32::MAX as i64 - pcpu as i64 - 1,
        0,
    )? as u32;
    let in_spi = ranged(
        ctx,
        &Some(t.in_spi.clone()),
        "in_spi",
        256,
        u32::MAX as i64 - peer_pcpu as i64 - 1,
        0,
    )? as u32;
    Ok(SaNumbers {
        pcpu,
        peer_pcpu,
        base_port,
        peer_base_port,
        fallback_port,
        out_spi,
        in_spi,
    })
}

/// The outer header (ttl, df) and the shared SA's order.
fn outer_header(ctx: &Ctx, t: &RawTunnel) -> Result<(u8, DfMode, bool), ConfigError> {
    let ttl = ranged(ctx, &t.ttl, "ttl", 1, 255, 64)? as u8;
    let df = match &t.df {
        // RFC 4301 §8.1 leaves it to the implementation; set, so the black path never
        // fragments ESP (espada does not reassemble outer fragments: see `fragment`).
        None => DfMode::Set,
        Some(d) => DfMode::from_name(d.get_ref()).ok_or_else(|| {
            ctx.at(
                d,
                format!(
                    "df must be \"copy\", \"set\" or \"clear\", got \"{}\"",
                    d.get_ref()
                ),
            )
        })?,
    };
    let wire_order = match &t.shared_sa_order {
        None => true,
        Some(o) => match o.get_ref().as_str() {
            "wire" => true,
            "parallel" => false,
            other => {
                return Err(ctx.at(
                    o,
                    format!("shared_sa_order must be \"wire\" or \"parallel\", got \"{other}\""),
                ))
            }
        },
    };
    Ok((ttl, df, wire_order))
}

/// `[tunnel.lifetime]`: each soft limit below its hard limit.
fn lifetimes(ctx: &Ctx, t: &RawTunnel) -> Result<Lifetimes, ConfigError> {
    let l = t.lifetime.as_ref();
    let lt = |f: fn(&RawLifetime) -> Option<u64>| l.and_then(f);
    let lifetimes = Lifetimes {
        soft: Limits {
            packets: lt(|l| l.soft_packets),
            bytes: lt(|l| l.soft_bytes),
            seconds: lt(|l| l.soft_seconds),
        },
        hard: Limits {
            packets: lt(|l| l.hard_packets),
            bytes: lt(|l| l.hard_bytes),
            seconds: lt(|l| l.hard_seconds),
        },
    };
    for (s, h, what) in [
        (lifetimes.soft.packets, lifetimes.hard.packets, "packets"),
        (lifetimes.soft.bytes, lifetimes.hard.bytes, "bytes"),
        (lifetimes.soft.seconds, lifetimes.hard.seconds, "seconds"),
    ] {
        if let (Some(s), Some(h)) = (s, h) {
            if s >= h {
                return Err(ctx.at(
                    &t.name,
                    format!("lifetime: soft_{what} ({s}) must be below hard_{what} ({h})"),
                ));
            }
        }
    }
    Ok(lifetimes)
}

/// `lab_rekey`: keys derived from lab_secret, a new generation every soft_seconds.
fn lab_rekey(
    ctx: &Ctx,
    t: &RawTunnel,
    sa: &SaNumbers,
    soft_seconds: Option<u64>,
) -> Result<Option<LabRekey>, ConfigError> {
    if let (Some(i), Some(r)) = (&t.ike, &t.lab_rekey) {
        if *i.get_ref() && *r.get_ref() {
            return Err(ctx.at(
                r,
                "lab_rekey and ike = true exclude each other: with ike the IKE daemon rekeys",
            ));
        }
    }
    Ok(match (&t.lab_rekey, &t.lab_secret, soft_seconds) {
        (None, _, _) => None,
        (Some(r), _, _) if !r.get_ref() => None,
        (Some(r), None, _) => {
            return Err(ctx.at(r, "lab_rekey derives new keys from lab_secret: give lab_secret (with key_file or [tunnel.keys], rekey through IKE)"))
        }
        (Some(r), _, None) => {
            return Err(ctx.at(r, "lab_rekey rekeys every [tunnel.lifetime] soft_seconds: give soft_seconds"))
        }
        (Some(r), _, Some(s)) if s < 2 => {
            return Err(ctx.at(r, "lab_rekey needs soft_seconds of at least 2"))
        }
        (Some(r), Some(sec), Some(s)) => {
            let top = (sa.out_spi.max(sa.in_spi) as u64)
                + sa.pcpu.max(sa.peer_pcpu) as u64
                + (GENERATION_SLOTS - 1) * GENERATION_SPI_STRIDE as u64;
            if top > u32::MAX as u64 {
                return Err(ctx.at(r, format!("lab_rekey moves SPIs up by up to {:#x}: out_spi and in_spi must leave that room", (GENERATION_SLOTS - 1) * GENERATION_SPI_STRIDE as u64)));
            }
            Some(LabRekey {
                secret: zeroize::Zeroizing::new(sec.get_ref().as_bytes().to_vec()),
                seconds: s,
            })
        }
    })
}

/// Exactly one key source: lab_secret, a key file, or `[tunnel.keys]`.
fn one_key_source(ctx: &Ctx, t: &RawTunnel) -> Result<(), ConfigError> {
    let sources = [
        t.lab_secret.is_some(),
        t.key_file.is_some(),
        t.keys.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if sources != 1 {
        return Err(ctx.at(&t.name, "give exactly one key source: lab_secret = \"...\", key_file = \"path\", or a [tunnel.keys] table of SPI = \"hex\""));
    }
    Ok(())
}

/// A tunnel's keys, one per SPI of `all_spis`, from its one source (see [`one_key_source`]).
fn keys(
    ctx: &Ctx,
    t: &RawTunnel,
    name: &str,
    cipher: Algorithm,
    all_spis: &[u32],
) -> Result<Keys, ConfigError> {
    match &t.lab_secret {
        Some(secret) => lab_keys(ctx, secret, name, cipher, all_spis),
        None => table_keys(ctx, t, name, cipher, all_spis),
    }
}

/// Keys derived from lab_secret (HKDF-SHA256), with a warning for a weak or shipped secret.
fn lab_keys(
    ctx: &Ctx,
    secret: &Spanned<String>,
    name: &str,
    cipher: Algorithm,
    all_spis: &[u32],
) -> Result<Keys, ConfigError> {
    if secret.get_ref().len() < 8 {
        return Err(ctx.at(secret, "lab_secret must be at least 8 characters"));
    }
    let keys = all_spis
        .iter()
        .map(|s| {
            let km = derive_lab_key(
                cipher,
                secret.get_ref().as_bytes(),
                &format!("{name}|{s:#010x}"),
            );
            (*s, km)
        })
        .collect();
    let sec = secret.get_ref();
    let warning = if sec == SHIPPED_LAB_SECRET {
        Some(format!("tunnel \"{name}\" derives its keys from the lab secret shipped with espada: anyone can decrypt it. Fine in the namespace lab; on real interfaces use key_file (or at least your own long lab_secret)"))
    } else if sec.len() < 16 {
        Some(format!("tunnel \"{name}\" derives its keys from a lab_secret of {} characters: use 16 or more, or key_file", sec.len()))
    } else {
        None
    };
    Ok(Keys {
        keys,
        source: "lab-secret (HKDF-SHA256)",
        warning,
    })
}

/// Keys from a key file or `[tunnel.keys]`: SPI = "hex key+salt", every SA's SPI given, the
/// file readable by nobody else.
fn table_keys(
    ctx: &Ctx,
    t: &RawTunnel,
    name: &str,
    cipher: Algorithm,
    all_spis: &[u32],
) -> Result<Keys, ConfigError> {
    let (table, span, where_, source): (BTreeMap<String, String>, Range<usize>, String, _) =
        if let Some(kf) = &t.key_file {
            // Relative to the file the tunnel is in (an included one, maybe).
            let p = ctx
                .file
                .parent()
                .unwrap_or(Path::new("."))
                .join(kf.get_ref());
            check_key_file_mode(&p).map_err(|m| ctx.at(kf, m))?;
            let kt = std::fs::read_to_string(&p)
                .map_err(|e| ctx.at(kf, format!("cannot read key file {}: {e}", p.display())))?;
            let table: BTreeMap<String, String> = toml::from_str(&kt).map_err(|e| {
                ctx.at(
                    kf,
                    format!(
                        "key file {}: {} (expected lines like \"0x00001000\" = \"<hex key+salt>\")",
                        p.display(),
                        e.message().trim()
                    ),
                )
            })?;
            (
                table,
                kf.span(),
                format!("key file {}", p.display()),
                "key file",
            )
        } else {
            let k = t.keys.as_ref().expect("one source is set");
            (
                k.get_ref().clone(),
                k.span(),
                "[tunnel.keys]".to_string(),
                "hex in the configuration",
            )
        };
    let mut keys = BTreeMap::new();
    for (k, v) in &table {
        let spi = parse_spi_key(k).ok_or_else(|| {
            ctx.err(
                Some(span.clone()),
                format!("{where_}: `{k}` is not an SPI (use \"0x00001000\")"),
            )
        })?;
        if !all_spis.contains(&spi) {
            return Err(ctx.err(
                Some(span.clone()),
                format!("{where_}: SPI {spi:#010x} is not an SA of tunnel \"{name}\""),
            ));
        }
        let km = KeyMaterial::from_hex(cipher, v).map_err(|e| {
            ctx.err(
                Some(span.clone()),
                format!("{where_}: key for SPI {spi:#010x}: {e}"),
            )
        })?;
        keys.insert(spi, km);
    }
    // One rule for every file that holds keys: nobody else may read it.
    if let (Some(k), true) = (&t.keys, ctx.file.exists()) {
        check_key_file_mode(ctx.file).map_err(|m| {
            ctx.at(
                k,
                format!(
                    "[tunnel.keys]: {} (or move the keys to a key_file)",
                    m.replace("key file", "the configuration")
                ),
            )
        })?;
    }
    if let Some(missing) = all_spis.iter().find(|s| !keys.contains_key(s)) {
        return Err(ctx.err(
            Some(span),
            format!(
                "{where_}: no key for SPI {missing:#010x} (tunnel \"{name}\" needs keys for {})",
                all_spis
                    .iter()
                    .map(|s| format!("{s:#010x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(Keys {
        keys,
        source,
        warning: None,
    })
}

impl Seen {
    /// SPIs: ours (inbound) must be unique across the gateway; out SPIs are the peer's.
    fn check_spis(
        &mut self,
        srcs: &Sources,
        src: usize,
        t: &RawTunnel,
        sa: &SaNumbers,
    ) -> Result<(), ConfigError> {
        let ctx = srcs.ctx(src);
        let (in_spis, out_spis) = (sa.in_spis(), sa.out_spis());
        for s in &in_spis {
            if let Some((psrc, prev)) = self.spis.insert(*s, (src, t.in_spi.span())) {
                let p = srcs.ctx(psrc).err(Some(prev), "");
                let at = if psrc == src {
                    format!("line {}", p.line)
                } else {
                    format!("{}:{}", p.file.display(), p.line)
                };
                return Err(ctx.at(
                    &t.in_spi,
                    format!("duplicate SPI {s:#010x}: already used by the tunnel at {at}"),
                ));
            }
        }
        if let Some(s) = in_spis.iter().find(|s| out_spis.contains(s)) {
            return Err(ctx.at(&t.in_spi, format!(
                "duplicate SPI {s:#010x}: in_spi {:#x}..={:#x} overlaps out_spi {:#x}..={:#x}; give the two directions distinct SPIs so captures and counters are unambiguous",
                sa.in_spi, sa.in_spi + sa.peer_pcpu as u32, sa.out_spi, sa.out_spi + sa.pcpu as u32
            )));
        }
        for s in &out_spis {
            if self.spis.contains_key(s) && !in_spis.contains(s) {
                return Err(ctx.at(
                    &t.out_spi,
                    format!("duplicate SPI {s:#010x}: also an inbound SPI of another tunnel"),
                ));
            }
        }
        Ok(())
    }

    /// RFC 4106 §8.1: a (key, nonce) pair must never repeat. Two SAs with one key start
    /// their sequence numbers (the IVs) at 1 both: refuse shared keys outright. One set of
    /// every key seen so far (by fingerprint): linear in the number of SAs.
    fn check_keys(
        &mut self,
        ctx: &Ctx,
        t: &RawTunnel,
        keys: &BTreeMap<u32, KeyMaterial>,
        before: &[TunnelConfig],
    ) -> Result<(), ConfigError> {
        let name = t.name.get_ref();
        let here = before.len();
        for (spi, km) in keys.iter() {
            let fp = espada_sadb::db::key_fingerprint(km);
            if let Some(&(other, t_idx)) = self.keys.get(&fp) {
                let oname = before.get(t_idx).map_or(name.as_str(), |t| t.name.as_str());
                return Err(ctx.at(
                    &t.name,
                    format!(
                        "SPIs {other:#010x} (tunnel \"{oname}\") and {spi:#010x} (tunnel \"{name}\") have the same key: they would repeat AES-GCM nonces from their first packet (RFC 4106 §8.1); give every SA and direction its own key"
                    ),
                ));
            }
            self.keys.insert(fp, (*spi, here));
        }
        Ok(())
    }
}

/// The SPD: explicit `[[policy]]`s in order, or (when the main file has none) one protect
/// policy per (local, remote) subnet pair of each tunnel; no two overlapping policies with
/// different actions.
fn spd(
    srcs: &Sources,
    implicit: bool,
    all_policies: &[(usize, &RawPolicy)],
    tunnels: &[TunnelConfig],
) -> Result<Spd, ConfigError> {
    let mut spd = Spd::default();
    if implicit {
        spd.policies = implicit_policies(tunnels);
    }
    let mut policy_spans = Vec::new();
    for &(file, p) in all_policies {
        policy_spans.push((file, p.action.span()));
        spd.policies.push(policy(&srcs.ctx(file), p, tunnels)?);
    }
    if let Some(c) = spd.conflicts().first() {
        let (a, b) = (&spd.policies[c.first], &spd.policies[c.second]);
        let (file, span) = policy_spans
            .get(c.second)
            .cloned()
            .map_or((0, None), |(f, s)| (f, Some(s)));
        let first_line = policy_spans
            .get(c.first)
            .map(|(f, s)| srcs.ctx(*f).err(Some(s.clone()), "").line)
            .unwrap_or(0);
        return Err(srcs.ctx(file).err(span, format!(
            "policy \"{}\" ({}) overlaps policy \"{}\" (line {first_line}, {}) with a different action; put the narrower policy first or make them disjoint",
            b.name, b.selector, a.name, a.selector
        )));
    }
    Ok(spd)
}

/// One protect policy per (local, remote) subnet pair of each tunnel. IPv4 to IPv6 can match
/// no packet: a dual-stack tunnel gets one policy per pair of the same version.
fn implicit_policies(tunnels: &[TunnelConfig]) -> Vec<Policy> {
    let mut out = Vec::new();
    for (i, t) in tunnels.iter().enumerate() {
        for l in &t.local_subnets {
            for r in t
                .remote_subnets
                .iter()
                .filter(|r| r.addr().is_ipv4() == l.addr().is_ipv4())
            {
                out.push(Policy {
                    name: format!("{}:{l}->{r}", t.name),
                    selector: Selector {
                        src: *l,
                        dst: *r,
                        proto: None,
                        src_ports: PortRange::ANY,
                        dst_ports: PortRange::ANY,
                    },
                    action: Action::Protect(i),
                });
            }
        }
    }
    out
}

/// One `[[policy]]`.
fn policy(ctx: &Ctx, p: &RawPolicy, tunnels: &[TunnelConfig]) -> Result<Policy, ConfigError> {
    let src = prefix(ctx, &p.src, "policy src")?;
    let dst = prefix(ctx, &p.dst, "policy dst")?;
    if src.addr().is_ipv4() != dst.addr().is_ipv4() {
        return Err(ctx.at(&p.dst, "policy src and dst are of different IP versions"));
    }
    let proto = match &p.proto {
        None => None,
        Some(s) => Some(match s.get_ref().as_str() {
            "any" => None,
            "tcp" => Some(6),
            "udp" => Some(17),
            "icmp" => Some(1),
            "icmpv6" => Some(58),
            n => Some(n.parse::<u8>().map_err(|_| {
                ctx.at(
                    s,
                    format!(
                        "proto must be any, tcp, udp, icmp, icmpv6 or a number 0-255, got \"{n}\""
                    ),
                )
            })?),
        }),
    }
    .flatten();
    let ports = |v: &Option<Spanned<String>>| -> Result<PortRange, ConfigError> {
        match v {
            None => Ok(PortRange::ANY),
            Some(s) => {
                if !matches!(proto, Some(6) | Some(17) | Some(132)) {
                    return Err(ctx.at(s, "ports need proto = \"tcp\" or \"udp\""));
                }
                s.get_ref().parse().map_err(|e: String| ctx.at(s, e))
            }
        }
    };
    let src_ports = ports(&p.src_port)?;
    let dst_ports = ports(&p.dst_port)?;
    let action = match p.action.get_ref().as_str() {
        "protect" => {
            let tn = p.tunnel.as_ref().ok_or_else(|| {
                ctx.at(
                    &p.action,
                    "action \"protect\" needs tunnel = \"<name of a [[tunnel]]>\"",
                )
            })?;
            Action::Protect(
                tunnels
                    .iter()
                    .position(|t| &t.name == tn.get_ref())
                    .ok_or_else(|| ctx.at(tn, format!("no tunnel named \"{}\"", tn.get_ref())))?,
            )
        }
        "bypass" => Action::Bypass,
        "discard" => Action::Discard,
        a => {
            return Err(ctx.at(
                &p.action,
                format!("action must be \"protect\", \"bypass\" or \"discard\", got \"{a}\""),
            ))
        }
    };
    Ok(Policy {
        name: p.name.clone(),
        selector: Selector {
            src,
            dst,
            proto,
            src_ports,
            dst_ports,
        },
        action,
    })
}
