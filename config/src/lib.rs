//! Gateway configuration: TOML in, a validated [`Config`] and an [`SaDb`] out.
//!
//! Every error names the file, the line and column, what is wrong and what is expected.
//! [`export`] renders the same SAs for the Linux kernel (`ip xfrm`) and for Wireshark.

pub mod export;

use espada_crypto::{derive_lab_key, Algorithm, Backend, KeyMaterial};
use espada_sadb::db::{PerCpuSaGroup, SaDb, SaMode, SaSpec, TunnelSas};
use espada_sadb::lifetime::{Lifetimes, Limits};
use espada_sadb::replay::{MAX_WINDOW, MIN_WINDOW};
use espada_sadb::selector::{Action, Policy, PortRange, Prefix, Selector, Spd};
use espada_sadb::{DfMode, TunnelEndpoints};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A configuration error with its place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub col: usize,
    /// What is wrong and what is expected.
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.msg
            )
        } else {
            write!(f, "{}: {}", self.file.display(), self.msg)
        }
    }
}

impl std::error::Error for ConfigError {}

// ------------------------------------------------------------------ raw TOML schema

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    red: Option<RawPort>,
    #[serde(default)]
    black: Option<RawPort>,
    #[serde(default)]
    tunnel: Vec<RawTunnel>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
    #[serde(default)]
    neighbor: Vec<RawNeighbor>,
    #[serde(default)]
    dpdk: Option<RawDpdk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDpdk {
    #[serde(default)]
    eal: Option<String>,
    red_port: String,
    black_port: String,
}

/// `[dpdk]`: how `espada run --port dpdk` binds the NICs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpdkConfig {
    /// EAL arguments (default: no hugepages, no PCI, for labs and CI).
    pub eal: Vec<String>,
    /// The red port: a PCI address (`0000:3b:00.0`) or a vdev name (`net_af_packet0`).
    pub red_port: String,
    /// The black port.
    pub black_port: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    name: String,
    #[serde(default)]
    workers: Option<Spanned<usize>>,
    #[serde(default)]
    cores: Option<Spanned<String>>,
    #[serde(default)]
    sa_mode: Option<Spanned<String>>,
    #[serde(default)]
    crypto: Option<Spanned<String>>,
    #[serde(default)]
    control_socket: Option<String>,
    /// More files of `[[tunnel]]` and `[[policy]]` tables (`conf.d/*.toml`), relative to this
    /// file's directory.
    #[serde(default)]
    include: Vec<Spanned<String>>,
}

/// An SPI as a TOML integer (`0x1000`, `4096`) or, as the CLI takes it, a string (`"0x1000"`).
fn spi_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Spanned<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrText {
        Int(i64),
        Text(String),
    }
    let v = Spanned::<IntOrText>::deserialize(d)?;
    let span = v.span();
    let n = match v.into_inner() {
        IntOrText::Int(n) => n,
        IntOrText::Text(t) => {
            let t = t.trim();
            let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => i64::from_str_radix(&h.replace('_', ""), 16),
                None => t.replace('_', "").parse(),
            };
            r.map_err(|_| {
                serde::de::Error::custom(format!(
                    "\"{t}\" is not an SPI (a number: 0x1000 or 4096, quoted or not)"
                ))
            })?
        }
    };
    Ok(Spanned::new(span, n))
}

/// What an included file may hold.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInclude {
    #[serde(default)]
    tunnel: Vec<RawTunnel>,
    #[serde(default)]
    policy: Vec<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    interface: String,
    address: Spanned<String>,
    #[serde(default)]
    mtu: Option<Spanned<u32>>,
    #[serde(default)]
    mac: Option<Spanned<String>>,
    #[serde(default)]
    gateway: Option<Spanned<String>>,
    #[serde(default)]
    address6: Option<Spanned<String>>,
    #[serde(default)]
    gateway6: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbor {
    ip: Spanned<String>,
    mac: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    name: Spanned<String>,
    local: Spanned<String>,
    remote: Spanned<String>,
    local_subnets: Vec<Spanned<String>>,
    remote_subnets: Vec<Spanned<String>>,
    #[serde(default)]
    cipher: Option<Spanned<String>>,
    #[serde(default)]
    esn: Option<bool>,
    #[serde(default)]
    replay_window: Option<Spanned<i64>>,
    #[serde(default)]
    pcpu: Option<Spanned<i64>>,
    #[serde(default)]
    peer_pcpu: Option<Spanned<i64>>,
    #[serde(default)]
    base_port: Option<Spanned<i64>>,
    #[serde(default)]
    peer_base_port: Option<Spanned<i64>>,
    #[serde(default)]
    fallback_port: Option<Spanned<i64>>,
    #[serde(deserialize_with = "spi_value")]
    out_spi: Spanned<i64>,
    #[serde(deserialize_with = "spi_value")]
    in_spi: Spanned<i64>,
    #[serde(default)]
    ttl: Option<Spanned<i64>>,
    #[serde(default)]
    df: Option<Spanned<String>>,
    #[serde(default)]
    shared_sa_order: Option<Spanned<String>>,
    #[serde(default)]
    lab_secret: Option<Spanned<String>>,
    #[serde(default)]
    key_file: Option<Spanned<String>>,
    #[serde(default)]
    keys: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    lifetime: Option<RawLifetime>,
    #[serde(default)]
    lab_rekey: Option<Spanned<bool>>,
    #[serde(default)]
    ike: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLifetime {
    soft_packets: Option<u64>,
    hard_packets: Option<u64>,
    soft_bytes: Option<u64>,
    hard_bytes: Option<u64>,
    soft_seconds: Option<u64>,
    hard_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    src: Spanned<String>,
    dst: Spanned<String>,
    #[serde(default)]
    proto: Option<Spanned<String>>,
    #[serde(default)]
    src_port: Option<Spanned<String>>,
    #[serde(default)]
    dst_port: Option<Spanned<String>>,
    action: Spanned<String>,
    #[serde(default)]
    tunnel: Option<Spanned<String>>,
}

// ------------------------------------------------------------------ validated config

/// A red or black interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Interface name.
    pub interface: String,
    /// The gateway's address on it.
    pub address: IpAddr,
    /// The subnet of that address.
    pub prefix: Prefix,
    /// MTU.
    pub mtu: u32,
    /// Next hop for traffic beyond the connected subnet (optional).
    pub gateway: Option<IpAddr>,
    /// The gateway's IPv6 address and subnet on this side (dual stack), if any.
    pub address6: Option<(std::net::Ipv6Addr, Prefix)>,
    /// IPv6 next hop for traffic beyond the IPv6 subnet (optional).
    pub gateway6: Option<std::net::Ipv6Addr>,
}

/// One tunnel as configured.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Name (the same on both gateways).
    pub name: String,
    /// Our black address.
    pub local: IpAddr,
    /// The peer's black address.
    pub remote: IpAddr,
    /// Red subnets behind us.
    pub local_subnets: Vec<Prefix>,
    /// Red subnets behind the peer.
    pub remote_subnets: Vec<Prefix>,
    /// Cipher.
    pub cipher: Algorithm,
    /// ESN.
    pub esn: bool,
    /// Replay window.
    pub replay_window: u32,
    /// Per-CPU SAs we send with.
    pub pcpu: usize,
    /// Per-CPU SAs the peer sends with.
    pub peer_pcpu: usize,
    /// Our per-CPU SA i sends from base_port + i.
    pub base_port: u16,
    /// The peer's per-CPU SA i sends from peer_base_port + i.
    pub peer_base_port: u16,
    /// The fallback SA's source port (both sides).
    pub fallback_port: u16,
    /// Fallback outbound SPI; per-CPU SA i uses out_spi + 1 + i.
    pub out_spi: u32,
    /// Fallback inbound SPI; the peer's per-CPU SA i uses in_spi + 1 + i.
    pub in_spi: u32,
    /// Outer TTL.
    pub ttl: u8,
    /// DF policy.
    pub df: DfMode,
    /// Lifetimes.
    pub lifetimes: Lifetimes,
    /// Keys by SPI.
    pub keys: BTreeMap<u32, KeyMaterial>,
    /// How the keys were given (for reports).
    pub key_source: &'static str,
    /// Why these keys are not fit for real traffic, if they are not (derived from the lab
    /// secret shipped with espada, or from a short one).
    pub key_warning: Option<String>,
    /// Rekey without IKE (`lab_rekey = true`, lab_secret keys): see [`Config::generation`].
    pub lab_rekey: Option<LabRekey>,
    /// An IKE daemon negotiates the SAs (`ike = true`, through the kernel-espada plugin):
    /// until it installs them, the configured ones are placeholders nothing is sent or
    /// received with, and workers raise acquires (see `espada_sadb::db::Acquire`).
    pub ike: bool,
    /// An outbound SA several workers send on (the fallback SA, `sa_mode = "shared"`) keeps
    /// its packets in sequence order on the wire (`shared_sa_order = "wire"`, the default:
    /// peers with a replay window of 32, as Linux under strongSwan has, drop what falls
    /// further behind), or is sent from every worker in parallel (`"parallel"`).
    pub shared_sa_wire_order: bool,
}

impl TunnelConfig {
    /// Outbound SPI of SA `cpu` (`None` = fallback).
    pub fn out_spi_of(&self, cpu: Option<usize>) -> u32 {
        cpu.map_or(self.out_spi, |i| self.out_spi + 1 + i as u32)
    }
    /// Inbound SPI of the peer's SA `cpu` (`None` = fallback).
    pub fn in_spi_of(&self, cpu: Option<usize>) -> u32 {
        cpu.map_or(self.in_spi, |i| self.in_spi + 1 + i as u32)
    }
    /// Our source port for SA `cpu`.
    pub fn out_port_of(&self, cpu: Option<usize>) -> u16 {
        cpu.map_or(self.fallback_port, |i| self.base_port + i as u16)
    }
    /// The peer's source port for its SA `cpu`.
    pub fn in_port_of(&self, cpu: Option<usize>) -> u16 {
        cpu.map_or(self.fallback_port, |i| self.peer_base_port + i as u16)
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub file: PathBuf,
    /// Gateway name.
    pub name: String,
    /// Worker count (0 = all online cores, resolved at start).
    pub workers: usize,
    /// Explicit worker cores.
    pub cores: Option<Vec<usize>>,
    /// Control socket path (`[gateway] control_socket`; default /run/espada/NAME.sock).
    pub control_socket: Option<PathBuf>,
    /// Per-CPU or shared SAs.
    pub sa_mode: SaMode,
    /// Crypto backend; `None` = `auto` (the fastest available, measured at start-up).
    pub crypto: Option<Backend>,
    /// Red side.
    pub red: Option<PortConfig>,
    /// Black side.
    pub black: Option<PortConfig>,
    /// Static neighbors (IP → MAC).
    pub neighbors: Vec<(IpAddr, espada_wire::ethernet::MacAddr)>,
    /// Tunnels.
    pub tunnels: Vec<TunnelConfig>,
    /// The SPD.
    pub spd: Spd,
    /// DPDK binding, if configured.
    pub dpdk: Option<DpdkConfig>,
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Option<Range<usize>>, msg: impl Into<String>) -> ConfigError {
        let (line, col) = match span {
            Some(s) => {
                let before = &self.text[..s.start.min(self.text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                (line, col)
            }
            None => (0, 0),
        };
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            msg: msg.into(),
        }
    }

    fn at<T>(&self, s: &Spanned<T>, msg: impl Into<String>) -> ConfigError {
        self.err(Some(s.span()), msg)
    }
}

fn ip(ctx: &Ctx, s: &Spanned<String>, what: &str) -> Result<IpAddr, ConfigError> {
    s.get_ref().parse().map_err(|_| {
        ctx.at(
            s,
            format!("{what}: `{}` is not an IPv4 or IPv6 address", s.get_ref()),
        )
    })
}

fn addr_prefix(
    ctx: &Ctx,
    s: &Spanned<String>,
    what: &str,
) -> Result<(IpAddr, Prefix), ConfigError> {
    let (a, l) = s.get_ref().split_once('/').ok_or_else(|| {
        ctx.at(
            s,
            format!("{what} must be an address with its prefix length, like 10.1.0.1/24"),
        )
    })?;
    let address: IpAddr = a
        .parse()
        .map_err(|_| ctx.at(s, format!("{what}: `{a}` is not an IP address")))?;
    let len: u8 = l
        .parse()
        .map_err(|_| ctx.at(s, format!("{what}: `{l}` is not a prefix length")))?;
    let net = match address {
        IpAddr::V4(a) => IpAddr::V4(
            (u32::from(a)
                & if len == 0 {
                    0
                } else {
                    !0u32 << (32 - len.min(32) as u32)
                })
            .into(),
        ),
        IpAddr::V6(a) => IpAddr::V6(
            (u128::from(a)
                & if len == 0 {
                    0
                } else {
                    !0u128 << (128 - len.min(128) as u32)
                })
            .into(),
        ),
    };
    let prefix = Prefix::new(net, len).map_err(|e| ctx.at(s, format!("{what}: {e}")))?;
    Ok((address, prefix))
}

fn prefix(ctx: &Ctx, s: &Spanned<String>, what: &str) -> Result<Prefix, ConfigError> {
    s.get_ref()
        .parse::<Prefix>()
        .map_err(|e| ctx.at(s, format!("{what}: {e}")))
}

fn ranged(
    ctx: &Ctx,
    v: &Option<Spanned<i64>>,
    what: &str,
    lo: i64,
    hi: i64,
    default: i64,
) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if (lo..=hi).contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(ctx.at(
            s,
            format!("{what} must be between {lo} and {hi}, got {}", s.get_ref()),
        )),
    }
}

fn parse_spi_key(k: &str) -> Option<u32> {
    let k = k.trim();
    match k.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => k.parse().ok(),
    }
}

/// Loads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    use std::io::Read;
    let err = |msg: String| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        col: 0,
        msg,
    };
    // Read at most MAX_CONFIG_BYTES (so `-c /dev/zero` or a runaway file is refused instead of
    // exhausting memory).
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| err(format!("cannot read the configuration: {e}")))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(err(format!(
            "the configuration is larger than {} MiB: not a configuration file?",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    parse(path, &text)
}

/// Keys and SPIs that change by generation: generation `g` covers the wall-clock interval
/// `[g·S, (g+1)·S)` of `S = soft_seconds`, so both gateways, started apart and restarted at
/// will, agree on it without talking. Generation `g`'s SAs use the configured SPIs plus
/// `(g mod 64) · 0x10000` and keys derived from the lab secret with `g` in the HKDF info, so no
/// two generations share a (key, SPI). Each gateway sends on generation `g` and accepts
/// `g−1`, `g` and `g+1`: the switch at a boundary is make-before-break on both sides, whatever
/// the clock skew (up to `S`).
#[derive(Clone)]
pub struct LabRekey {
    secret: zeroize::Zeroizing<Vec<u8>>,
    /// The generation length (the soft lifetime).
    pub seconds: u64,
}

impl std::fmt::Debug for LabRekey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LabRekey(every {} s)", self.seconds)
    }
}

/// Seconds since the UNIX epoch (the generation clock).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// SPI offset between generation slots.
pub const GENERATION_SPI_STRIDE: u32 = 0x1_0000;
/// Generation slots before SPIs repeat (with new keys).
pub const GENERATION_SLOTS: u64 = 64;

/// The lab secret in the shipped configurations (`configs/west.toml`, `east.toml`).
pub const SHIPPED_LAB_SECRET: &str = "espada-lab-secret-change-me";

/// Largest configuration file accepted: room for 100 000 tunnels (~400 bytes each), still a
/// bound (`-c /dev/zero` or a runaway file is refused instead of exhausting memory).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// Reads the files `include` names (`[gateway] include = ["conf.d/*.toml"]`, relative to the
/// configuration's directory; a `*` in the file name matches any run of characters, files in
/// name order). A pattern with a `*` may match nothing (an empty `conf.d`); a plain name must
/// exist. The main file and the included ones together stay under [`MAX_CONFIG_BYTES`].
fn includes(
    ctx: &Ctx,
    include: &[Spanned<String>],
    mut total: u64,
) -> Result<Vec<(PathBuf, String, RawInclude)>, ConfigError> {
    use std::io::Read;
    let base = ctx.file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for pat in include {
        let p = base.join(pat.get_ref());
        let (dir, name) = match (p.parent(), p.file_name().and_then(|n| n.to_str())) {
            (Some(d), Some(n)) => (d.to_path_buf(), n.to_string()),
            _ => return Err(ctx.at(pat, format!("include: `{}` names no file", pat.get_ref()))),
        };
        let mut files: Vec<PathBuf> = if let Some((pre, suf)) = name.split_once('*') {
            if suf.contains('*') {
                return Err(ctx.at(pat, "include: one `*` at most, in the file name"));
            }
            let rd = std::fs::read_dir(&dir)
                .map_err(|e| ctx.at(pat, format!("include: cannot list {}: {e}", dir.display())))?;
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.to_string();
                    (n.len() >= pre.len() + suf.len()
                        && n.starts_with(pre)
                        && n.ends_with(suf)
                        && !n.starts_with('.')
                        && e.path().is_file())
                    .then(|| e.path())
                })
                .collect()
        } else {
            vec![p.clone()]
        };
        files.sort();
        for f in files {
            if f == ctx.file {
                return Err(ctx.at(pat, "include: a configuration cannot include itself"));
            }
            let mut text = String::new();
            std::fs::File::open(&f)
                .and_then(|h| h.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
                .map_err(|e| ctx.at(pat, format!("include: cannot read {}: {e}", f.display())))?;
            total += text.len() as u64;
            if total > MAX_CONFIG_BYTES {
                return Err(ctx.at(pat, format!("include: the configuration and its included files are larger than {} MiB together", MAX_CONFIG_BYTES >> 20)));
            }
            let raw: RawInclude = toml::from_str(&text).map_err(|e| {
                let c = Ctx {
                    file: &f,
                    text: &text,
                };
                toml_error(
                    &c,
                    &e,
                    ": an included file holds [[tunnel]] and [[policy]] tables only",
                )
            })?;
            out.push((f, text, raw));
        }
    }
    Ok(out)
}

/// A TOML or schema error at its place; an unknown field gets a guess and `unknown_hint`.
fn toml_error(ctx: &Ctx, e: &toml::de::Error, unknown_hint: &str) -> ConfigError {
    let msg = e.message().trim().to_string();
    let msg = if msg.starts_with("unknown field") {
        format!("{msg}{}{unknown_hint}", did_you_mean(&msg))
    } else {
        msg
    };
    ctx.err(e.span(), msg)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": ` (did you mean `a`?)` when
/// one of the expected fields is close to `x` (a typo), else nothing.
fn did_you_mean(msg: &str) -> String {
    let mut ticks = msg.split('`').skip(1).step_by(2);
    let Some(unknown) = ticks.next() else {
        return String::new();
    };
    ticks
        .map(|f| (strsim::damerau_levenshtein(unknown, f), f))
        .filter(|(d, f)| *d <= 2.max(f.len() / 4))
        .min()
        .map_or(String::new(), |(_, f)| format!(" (did you mean `{f}`?)"))
}

/// Every field the parser takes, by section (`[gateway]`, `[red]`, `[[tunnel]]`, ...): asked of
/// the parser itself (serde lists the expected fields when it meets an unknown one), so the
/// reference texts (configs/README.md, espada.toml(5)) are tested against what the code takes.
pub fn fields() -> Vec<(&'static str, Vec<String>)> {
    let tunnel = "[[tunnel]]\nname = \"t\"\nlocal = \"192.168.100.1\"\nremote = \"192.168.100.2\"\nlocal_subnets = [\"10.1.0.0/24\"]\nremote_subnets = [\"10.2.0.0/24\"]\nout_spi = 0x1000\nin_spi = 0x2000\nlab_secret = \"0123456789\"\n";
    let base = format!("[gateway]\nname = \"w\"\n{tunnel}");
    let probes = [
        (
            "[gateway]",
            "[gateway]\nname = \"w\"\nzzz_unknown = 1\n".to_string() + tunnel,
        ),
        ("[red]", format!("{base}[red]\nzzz_unknown = 1\n")),
        (
            "[[tunnel]]",
            format!("[gateway]\nname = \"w\"\n{tunnel}zzz_unknown = 1\n"),
        ),
        (
            "[tunnel.lifetime]",
            format!("{base}[tunnel.lifetime]\nzzz_unknown = 1\n"),
        ),
        ("[[policy]]", format!("{base}[[policy]]\nzzz_unknown = 1\n")),
        (
            "[[neighbor]]",
            format!("{base}[[neighbor]]\nzzz_unknown = 1\n"),
        ),
        ("[dpdk]", format!("{base}[dpdk]\nzzz_unknown = 1\n")),
    ];
    probes
        .into_iter()
        .map(|(section, text)| {
            let e = parse(Path::new("probe.toml"), &text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let list = e.split("expected").nth(1).unwrap_or("");
            let fields = list
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            (section, fields)
        })
        .collect()
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
    let srcs = includes(&ctx, &raw.gateway.include, text.len() as u64)?;
    let mut all_tunnels: Vec<(usize, &RawTunnel)> = raw.tunnel.iter().map(|t| (0, t)).collect();
    let mut all_policies: Vec<(usize, &RawPolicy)> = raw.policy.iter().map(|p| (0, p)).collect();
    for (i, (_, _, inc)) in srcs.iter().enumerate() {
        all_tunnels.extend(inc.tunnel.iter().map(|t| (i + 1, t)));
        all_policies.extend(inc.policy.iter().map(|p| (i + 1, p)));
    }
    let ctx_of = |src: usize| match src {
        0 => Ctx { file: path, text },
        i => Ctx {
            file: &srcs[i - 1].0,
            text: &srcs[i - 1].1,
        },
    };

    let g = &raw.gateway;
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

    let port = |p: &Option<RawPort>, side: &str| -> Result<Option<PortConfig>, ConfigError> {
        let Some(p) = p else { return Ok(None) };
        let (address, prefix) = addr_prefix(&ctx, &p.address, &format!("[{side}] address"))?;
        let address6 = match &p.address6 {
            None => None,
            Some(s) => match addr_prefix(&ctx, s, &format!("[{side}] address6"))? {
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
            Some(s) => match (ip(&ctx, s, &format!("[{side}] gateway6"))?, &address6) {
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
                format!("[{side}] address6: IPv6 needs an mtu of at least 1280 (RFC 8200 §5), got {mtu}"),
            ));
        }
        if let Some(m) = &p.mac {
            espada_wire::ethernet::MacAddr::parse(m.get_ref()).ok_or_else(|| {
                ctx.at(
                    m,
                    format!(
                        "[{side}] mac: `{}` is not a MAC address like 02:00:00:00:00:01",
                        m.get_ref()
                    ),
                )
            })?;
        }
        let gateway = match &p.gateway {
            None => None,
            Some(s) => Some(ip(&ctx, s, &format!("[{side}] gateway"))?),
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
    };
    let red = port(&raw.red, "red")?;
    let black = port(&raw.black, "black")?;

    let mut neighbors = Vec::new();
    for n in &raw.neighbor {
        let a = ip(&ctx, &n.ip, "neighbor ip")?;
        let m = espada_wire::ethernet::MacAddr::parse(n.mac.get_ref()).ok_or_else(|| {
            ctx.at(
                &n.mac,
                format!(
                    "neighbor mac: `{}` is not a MAC address like 02:00:00:00:00:01",
                    n.mac.get_ref()
                ),
            )
        })?;
        neighbors.push((a, m));
    }

    if all_tunnels.is_empty() {
        return Err(ctx.err(None, "no [[tunnel]]: a gateway needs at least one tunnel"));
    }
    let mut tunnels: Vec<TunnelConfig> = Vec::new();
    // Every key of the tunnels so far: fingerprint → (SPI, tunnel index).
    let mut key_seen: std::collections::HashMap<u128, (u32, usize)> = Default::default();
    let mut spis: BTreeMap<u32, (usize, Range<usize>)> = BTreeMap::new();
    let mut names: std::collections::HashSet<String> = Default::default();
    for &(src, t) in &all_tunnels {
        let ctx = ctx_of(src);
        let name = t.name.get_ref().clone();
        if !names.insert(name.clone()) {
            return Err(ctx.at(&t.name, format!("duplicate tunnel name \"{name}\"")));
        }
        let local = ip(&ctx, &t.local, "local")?;
        let remote = ip(&ctx, &t.remote, "remote")?;
        if local.is_ipv4() != remote.is_ipv4() {
            return Err(ctx.at(
                &t.remote,
                format!("remote {remote} is not of the same IP version as local {local}"),
            ));
        }
        let subnets = |v: &Vec<Spanned<String>>, what: &str| -> Result<Vec<Prefix>, ConfigError> {
            v.iter().map(|s| prefix(&ctx, s, what)).collect()
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
            &ctx,
            &t.replay_window,
            "replay_window",
            MIN_WINDOW as i64,
            MAX_WINDOW as i64,
            4096,
        )? as u32;
        let default_pcpu = if workers > 0 {
            workers as i64
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get()) as i64
        };
        let pcpu = ranged(&ctx, &t.pcpu, "pcpu", 0, 1024, default_pcpu)? as usize;
        let peer_pcpu = ranged(&ctx, &t.peer_pcpu, "peer_pcpu", 0, 1024, pcpu as i64)? as usize;
        let fallback_port = ranged(&ctx, &t.fallback_port, "fallback_port", 1, 65535, 4500)? as u16;
        let base_port = ranged(
            &ctx,
            &t.base_port,
            "base_port",
            1,
            65535 - pcpu as i64,
            4501,
        )? as u16;
        let peer_base_port = ranged(
            &ctx,
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
            &ctx,
            &Some(t.out_spi.clone()),
            "out_spi",
            256,
            u32::MAX as i64 - pcpu as i64 - 1,
            0,
        )? as u32;
        let in_spi = ranged(
            &ctx,
            &Some(t.in_spi.clone()),
            "in_spi",
            256,
            u32::MAX as i64 - peer_pcpu as i64 - 1,
            0,
        )? as u32;
        let ttl = ranged(&ctx, &t.ttl, "ttl", 1, 255, 64)? as u8;
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
        let shared_sa_wire_order = match &t.shared_sa_order {
            None => true,
            Some(o) => match o.get_ref().as_str() {
                "wire" => true,
                "parallel" => false,
                other => {
                    return Err(ctx.at(
                        o,
                        format!(
                            "shared_sa_order must be \"wire\" or \"parallel\", got \"{other}\""
                        ),
                    ))
                }
            },
        };
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

        // SPIs: ours (inbound) must be unique across the gateway; out SPIs are the peer's.
        let in_spis: Vec<u32> = std::iter::once(in_spi)
            .chain((0..peer_pcpu).map(|i| in_spi + 1 + i as u32))
            .collect();
        let out_spis: Vec<u32> = std::iter::once(out_spi)
            .chain((0..pcpu).map(|i| out_spi + 1 + i as u32))
            .collect();
        for s in &in_spis {
            if let Some((psrc, prev)) = spis.insert(*s, (src, t.in_spi.span())) {
                let p = ctx_of(psrc).err(Some(prev), "");
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
                in_spi, in_spi + peer_pcpu as u32, out_spi, out_spi + pcpu as u32
            )));
        }
        for s in &out_spis {
            if spis.contains_key(s) && !in_spis.contains(s) {
                return Err(ctx.at(
                    &t.out_spi,
                    format!("duplicate SPI {s:#010x}: also an inbound SPI of another tunnel"),
                ));
            }
        }

        // Keys.
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
        let mut keys = BTreeMap::new();
        let key_source;
        let mut key_warning = None;
        let ike = t.ike.as_ref().is_some_and(|i| *i.get_ref());
        if let (Some(i), Some(r)) = (&t.ike, &t.lab_rekey) {
            if *i.get_ref() && *r.get_ref() {
                return Err(ctx.at(
                    r,
                    "lab_rekey and ike = true exclude each other: with ike the IKE daemon rekeys",
                ));
            }
        }
        let lab_rekey = match (&t.lab_rekey, &t.lab_secret, lifetimes.soft.seconds) {
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
                let top = (out_spi.max(in_spi) as u64)
                    + pcpu.max(peer_pcpu) as u64
                    + (GENERATION_SLOTS - 1) * GENERATION_SPI_STRIDE as u64;
                if top > u32::MAX as u64 {
                    return Err(ctx.at(r, format!("lab_rekey moves SPIs up by up to {:#x}: out_spi and in_spi must leave that room", (GENERATION_SLOTS - 1) * GENERATION_SPI_STRIDE as u64)));
                }
                Some(LabRekey {
                    secret: zeroize::Zeroizing::new(sec.get_ref().as_bytes().to_vec()),
                    seconds: s,
                })
            }
        };
        let all_spis: Vec<u32> = in_spis.iter().chain(out_spis.iter()).copied().collect();
        if let Some(secret) = &t.lab_secret {
            if secret.get_ref().len() < 8 {
                return Err(ctx.at(secret, "lab_secret must be at least 8 characters"));
            }
            for s in &all_spis {
                keys.insert(
                    *s,
                    derive_lab_key(
                        cipher,
                        secret.get_ref().as_bytes(),
                        &format!("{name}|{s:#010x}"),
                    ),
                );
            }
            key_source = "lab-secret (HKDF-SHA256)";
            let sec = secret.get_ref();
            if sec == SHIPPED_LAB_SECRET {
                key_warning = Some(format!("tunnel \"{name}\" derives its keys from the lab secret shipped with espada: anyone can decrypt it. Fine in the namespace lab; on real interfaces use key_file (or at least your own long lab_secret)"));
            } else if sec.len() < 16 {
                key_warning = Some(format!("tunnel \"{name}\" derives its keys from a lab_secret of {} characters: use 16 or more, or key_file", sec.len()));
            }
        } else {
            let (table, span, where_): (BTreeMap<String, String>, Range<usize>, String) =
                if let Some(kf) = &t.key_file {
                    // Relative to the file the tunnel is in (an included one, maybe).
                    let p = ctx
                        .file
                        .parent()
                        .unwrap_or(Path::new("."))
                        .join(kf.get_ref());
                    check_key_file_mode(&p).map_err(|m| ctx.at(kf, m))?;
                    let kt = std::fs::read_to_string(&p).map_err(|e| {
                        ctx.at(kf, format!("cannot read key file {}: {e}", p.display()))
                    })?;
                    let table: BTreeMap<String, String> = toml::from_str(&kt).map_err(|e| ctx.at(kf, format!("key file {}: {} (expected lines like \"0x00001000\" = \"<hex key+salt>\")", p.display(), e.message().trim())))?;
                    key_source = "key file";
                    (table, kf.span(), format!("key file {}", p.display()))
                } else {
                    let k = t.keys.as_ref().expect("one source is set");
                    key_source = "hex in the configuration";
                    (k.get_ref().clone(), k.span(), "[tunnel.keys]".to_string())
                };
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
                return Err(ctx.err(Some(span), format!("{where_}: no key for SPI {missing:#010x} (tunnel \"{name}\" needs keys for {})", all_spis.iter().map(|s| format!("{s:#010x}")).collect::<Vec<_>>().join(", "))));
            }
        }

        // RFC 4106 §8.1: a (key, nonce) pair must never repeat. Two SAs with one key start
        // their sequence numbers (the IVs) at 1 both: refuse shared keys outright.
        // One set of every key seen so far (by fingerprint): linear in the number of SAs.
        for (spi, km) in keys.iter() {
            let fp = espada_sadb::db::key_fingerprint(km);
            let here = tunnels.len();
            if let Some(&(other, t_idx)) = key_seen.get(&fp) {
                let oname = tunnels
                    .get(t_idx)
                    .map_or(name.as_str(), |t| t.name.as_str());
                return Err(ctx.at(
                    &t.name,
                    format!(
                        "SPIs {other:#010x} (tunnel \"{oname}\") and {spi:#010x} (tunnel \"{name}\") have the same key: they would repeat AES-GCM nonces from their first packet (RFC 4106 §8.1); give every SA and direction its own key"
                    ),
                ));
            }
            key_seen.insert(fp, (*spi, here));
        }

        tunnels.push(TunnelConfig {
            name,
            local,
            remote,
            local_subnets,
            remote_subnets,
            cipher,
            esn: t.esn.unwrap_or(true),
            replay_window,
            pcpu,
            peer_pcpu,
            base_port,
            peer_base_port,
            fallback_port,
            out_spi,
            in_spi,
            ttl,
            df,
            lifetimes,
            keys,
            key_source,
            key_warning,
            lab_rekey,
            ike,
            shared_sa_wire_order,
        });
    }

    // SPD: explicit policies, or one protect policy per (local, remote) subnet pair.
    let mut spd = Spd::default();
    if raw.policy.is_empty() {
        for (i, t) in tunnels.iter().enumerate() {
            for l in &t.local_subnets {
                // IPv4 to IPv6 can match no packet: a dual-stack tunnel gets one policy per
                // pair of the same version.
                for r in t
                    .remote_subnets
                    .iter()
                    .filter(|r| r.addr().is_ipv4() == l.addr().is_ipv4())
                {
                    spd.policies.push(Policy {
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
    }
    let mut policy_spans = Vec::new();
    for &(file, p) in &all_policies {
        let ctx = ctx_of(file);
        let src = prefix(&ctx, &p.src, "policy src")?;
        let dst = prefix(&ctx, &p.dst, "policy dst")?;
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
                n => Some(n.parse::<u8>().map_err(|_| ctx.at(s, format!("proto must be any, tcp, udp, icmp, icmpv6 or a number 0-255, got \"{n}\"")))?),
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
                        .ok_or_else(|| {
                            ctx.at(tn, format!("no tunnel named \"{}\"", tn.get_ref()))
                        })?,
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
        policy_spans.push((file, p.action.span()));
        spd.policies.push(Policy {
            name: p.name.clone(),
            selector: Selector {
                src,
                dst,
                proto,
                src_ports,
                dst_ports,
            },
            action,
        });
    }
    if let Some(c) = spd.conflicts().first() {
        let (a, b) = (&spd.policies[c.first], &spd.policies[c.second]);
        let (file, span) = policy_spans
            .get(c.second)
            .cloned()
            .map_or((0, None), |(f, s)| (f, Some(s)));
        let first_line = policy_spans
            .get(c.first)
            .map(|(f, s)| ctx_of(*f).err(Some(s.clone()), "").line)
            .unwrap_or(0);
        return Err(ctx_of(file).err(span, format!(
            "policy \"{}\" ({}) overlaps policy \"{}\" (line {first_line}, {}) with a different action; put the narrower policy first or make them disjoint",
            b.name, b.selector, a.name, a.selector
        )));
    }

    Ok(Config {
        file: path.to_path_buf(),
        name: g.name.clone(),
        workers,
        cores,
        control_socket: g.control_socket.as_ref().map(|p| {
            let p = PathBuf::from(p);
            if p.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            }
        }),
        sa_mode,
        crypto,
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

/// Backend figures (ns per seal) as measured for `auto`.
type Figures = Vec<(Backend, f64)>;

/// `crypto = "auto"`: measured once per process and algorithm.
fn auto_backend(alg: Algorithm) -> (Backend, Vec<(Backend, f64)>) {
    static CACHE: std::sync::Mutex<Vec<(Algorithm, Backend, Figures)>> =
        std::sync::Mutex::new(Vec::new());
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, b, f)) = c.iter().find(|x| x.0 == alg) {
        return (*b, f.clone());
    }
    let (b, f) = Backend::fastest(alg, 1400, std::time::Duration::from_millis(5));
    c.push((alg, b, f.clone()));
    (b, f)
}

#[cfg(unix)]
/// Refuses a key file that others than its owner can read (the config and `espada sa add` apply
/// the same rule).
pub fn check_key_file_mode(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let m =
        std::fs::metadata(p).map_err(|e| format!("cannot read key file {}: {e}", p.display()))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key file {} is readable by others (mode {mode:o}); run chmod 600 {}",
            p.display(),
            p.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn check_key_file_mode(_: &Path) -> Result<(), String> {
    Ok(())
}

impl Config {
    /// The crypto backend: the configured one, or for `auto` the fastest available one,
    /// measured once (a few milliseconds per backend, sealing 1400-byte payloads) and cached.
    pub fn backend(&self) -> Backend {
        self.crypto.unwrap_or_else(|| {
            auto_backend(
                self.tunnels
                    .first()
                    .map_or(Algorithm::AesGcm128, |t| t.cipher),
            )
            .0
        })
    }

    /// How the backend was chosen, for logs: "ring" or "auto: ipsec-mb (ring 266 ns, ...)".
    pub fn backend_report(&self) -> String {
        match self.crypto {
            Some(b) => b.to_string(),
            None => {
                let (b, figs) = auto_backend(
                    self.tunnels
                        .first()
                        .map_or(Algorithm::AesGcm128, |t| t.cipher),
                );
                format!(
                    "auto: {b} ({})",
                    figs.iter()
                        .map(|(b, ns)| format!("{b} {ns:.0} ns"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }

    /// Worker count with 0 resolved to the online cores.
    pub fn resolved_workers(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Builds the SA database snapshot for `workers` worker cores.
    pub fn sadb(&self, workers: usize) -> Result<SaDb, espada_sadb::db::DbError> {
        self.sadb_at(workers, None)
    }

    /// The SA database a running gateway uses at UNIX time `now`: with `lab_rekey`, the
    /// generation of that moment (see [`LabRekey`]); [`Config::sadb`] is the configured SAs.
    pub fn sadb_at(
        &self,
        workers: usize,
        now: Option<u64>,
    ) -> Result<SaDb, espada_sadb::db::DbError> {
        let tunnels = (0..self.tunnels.len())
            .map(|t| self.tunnel_sas(t, now.and_then(|n| self.generation(t, n))))
            .collect();
        SaDb::new(
            self.sa_mode,
            workers,
            self.backend(),
            tunnels,
            self.spd.clone(),
        )
    }

    /// The generation tunnel `t` is in at UNIX time `now` (`None` without `lab_rekey`).
    pub fn generation(&self, t: usize, now: u64) -> Option<u64> {
        self.tunnels[t].lab_rekey.as_ref().map(|r| now / r.seconds)
    }

    /// Tunnel `t`'s SAs: as configured, or for generation `gen` (send on `gen`; accept
    /// `gen−1`, `gen`, `gen+1`; see [`LabRekey`]).
    pub fn tunnel_sas(&self, t: usize, gen: Option<u64>) -> TunnelSas {
        let t = &self.tunnels[t];
        let (pcpu, peer_pcpu) = match self.sa_mode {
            SaMode::PerCpu => (t.pcpu, t.peer_pcpu),
            SaMode::Shared => (0, 0),
        };
        // Under lab_rekey the control plane retires generations itself: no soft event (the
        // switch comes first), the hard limit stays as a safety net on what is sent, and what is
        // received ends when its generation leaves the window.
        let (out_life, in_life) = match gen {
            None => (t.lifetimes, t.lifetimes),
            Some(_) => (
                Lifetimes {
                    soft: Limits::default(),
                    hard: t.lifetimes.hard,
                },
                Lifetimes::default(),
            ),
        };
        let spec = |base: u32, g: Option<u64>, cpu: Option<usize>, sport: u16, life: Lifetimes| {
            let mut ep = TunnelEndpoints::new(t.local, t.remote);
            ep.src_port = sport;
            ep.dst_port = 4500;
            ep.ttl = t.ttl;
            ep.df = t.df;
            let (spi, key) = match (g, &t.lab_rekey) {
                (Some(g), Some(r)) => {
                    let spi = base + (g % GENERATION_SLOTS) as u32 * GENERATION_SPI_STRIDE;
                    let km = derive_lab_key(
                        t.cipher,
                        &r.secret,
                        &format!("{}|{spi:#010x}|generation {g}", t.name),
                    );
                    (spi, km)
                }
                _ => (base, t.keys[&base].clone()),
            };
            let mut s = SaSpec::new(spi, key, t.esn, t.replay_window, life, ep, cpu);
            s.wire_order = t.shared_sa_wire_order;
            s
        };
        let group = |out: bool, g: Option<u64>, life: Lifetimes| {
            let n = if out { pcpu } else { peer_pcpu };
            let sa = |c: Option<usize>| {
                let (spi, port) = if out {
                    (t.out_spi_of(c), t.out_port_of(c))
                } else {
                    (t.in_spi_of(c), t.in_port_of(c))
                };
                spec(spi, g, c, port, life)
            };
            PerCpuSaGroup {
                fallback: sa(None),
                per_cpu: (0..n).map(|i| sa(Some(i))).collect(),
            }
        };
        let draining = match gen {
            None => vec![],
            Some(g) => [g.checked_sub(1), Some(g + 1)]
                .into_iter()
                .flatten()
                .flat_map(|x| {
                    let gr = group(false, Some(x), in_life);
                    std::iter::once(gr.fallback)
                        .chain(gr.per_cpu)
                        .map(move |mut s| {
                            s.next_generation = x > g;
                            s
                        })
                })
                .collect(),
        };
        let mut ts = TunnelSas {
            name: t.name.clone(),
            local_subnets: t.local_subnets.clone(),
            remote_subnets: t.remote_subnets.clone(),
            outbound: group(true, gen, out_life),
            inbound: group(false, gen, in_life),
            draining,
            pcpu_acquires: true,
            rekey_every: t.lab_rekey.as_ref().map(|r| r.seconds),
        };
        if t.ike {
            for s in ts.outbound.all_mut().chain(ts.inbound.all_mut()) {
                s.awaiting_ike = true;
            }
        }
        ts
    }

    /// Checks that `peer` is the mirror of this configuration: for every tunnel of the same
    /// name, addresses, subnets, SPIs, ports, cipher, ESN and keys agree. Returns every mismatch.
    pub fn mirror_mismatches(&self, peer: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let by_name: std::collections::HashMap<&str, &TunnelConfig> =
            peer.tunnels.iter().map(|p| (p.name.as_str(), p)).collect();
        for t in &self.tunnels {
            let Some(&p) = by_name.get(t.name.as_str()) else {
                out.push(format!(
                    "tunnel \"{}\" is missing from {}",
                    t.name,
                    peer.file.display()
                ));
                continue;
            };
            let mut check = |ok: bool, what: String| {
                if !ok {
                    out.push(format!("tunnel \"{}\": {what}", t.name));
                }
            };
            check(
                t.local == p.remote && t.remote == p.local,
                format!(
                    "local/remote {}/{} do not mirror the peer's {}/{}",
                    t.local, t.remote, p.local, p.remote
                ),
            );
            check(
                t.local_subnets == p.remote_subnets && t.remote_subnets == p.local_subnets,
                "local_subnets/remote_subnets do not mirror the peer's".into(),
            );
            check(
                t.cipher == p.cipher,
                format!("cipher {} differs from the peer's {}", t.cipher, p.cipher),
            );
            check(
                t.esn == p.esn,
                format!("esn = {} differs from the peer's esn = {}", t.esn, p.esn),
            );
            check(t.out_spi == p.in_spi && t.in_spi == p.out_spi, format!("out_spi {:#x}/in_spi {:#x} do not mirror the peer's in_spi {:#x}/out_spi {:#x}", t.out_spi, t.in_spi, p.in_spi, p.out_spi));
            check(
                t.pcpu == p.peer_pcpu && t.peer_pcpu == p.pcpu,
                format!(
                    "pcpu {}/peer_pcpu {} do not mirror the peer's peer_pcpu {}/pcpu {}",
                    t.pcpu, t.peer_pcpu, p.peer_pcpu, p.pcpu
                ),
            );
            check(
                t.base_port == p.peer_base_port
                    && t.peer_base_port == p.base_port
                    && t.fallback_port == p.fallback_port,
                "base_port/peer_base_port/fallback_port do not mirror the peer's".into(),
            );
            let keys_agree = t
                .keys
                .iter()
                .all(|(spi, k)| p.keys.get(spi).is_none_or(|pk| pk == k));
            check(
                keys_agree,
                "keys differ for at least one SPI (same lab_secret and tunnel name on both sides?)"
                    .into(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests;
