//! Gateway configuration: TOML in, a validated [`Config`] and an [`SaDb`] out.
//!
//! Every error names the file, the line and column, what is wrong and what is expected.
//! [`export`] renders the same SAs for the Linux kernel (`ip xfrm`) and for Wireshark.

pub mod export;
mod parse;

pub use parse::parse;

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

/// Backend figures (ns per seal) as measured for `auto`.
type Figures = Vec<(Backend, Vec<f64>)>;

/// Above this many tunnels `crypto = "auto"` leaves out backends that keep two key schedules
/// per SA (`ipsec-mb+ring`: ~580 bytes more per SA). A concentrator's memory per SA counts
/// more than ~20 % at 1400-byte packets; a lab or site gateway's does not.
pub const AUTO_TWO_SCHEDULES_MAX_TUNNELS: usize = 1000;

/// The packet sizes `crypto = "auto"` measures at: a small and a full-size packet, equally
/// weighted (see [`Backend::fastest_over`]).
pub const AUTO_SIZES: [usize; 2] = [64, 1400];

/// `crypto = "auto"`: measured once per process, algorithm and scale class.
fn auto_backend(alg: Algorithm, many_tunnels: bool) -> (Backend, Figures) {
    type Cached = (Algorithm, bool, Backend, Figures);
    static CACHE: std::sync::Mutex<Vec<Cached>> = std::sync::Mutex::new(Vec::new());
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, b, f)) = c.iter().find(|x| x.0 == alg && x.1 == many_tunnels) {
        return (*b, f.clone());
    }
    let skip: Vec<Backend> = Backend::available()
        .iter()
        .copied()
        .filter(|b| many_tunnels && b.two_schedules())
        .collect();
    let (b, f) =
        Backend::fastest_over(alg, &AUTO_SIZES, std::time::Duration::from_millis(5), &skip);
    c.push((alg, many_tunnels, b, f.clone()));
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
    /// measured once (a few milliseconds per backend, sealing 64- and 1400-byte payloads) and
    /// cached; with more than [`AUTO_TWO_SCHEDULES_MAX_TUNNELS`] tunnels, one with a single key
    /// schedule per SA.
    pub fn backend(&self) -> Backend {
        self.crypto
            .unwrap_or_else(|| auto_backend(self.auto_algorithm(), self.many_tunnels()).0)
    }

    fn auto_algorithm(&self) -> Algorithm {
        self.tunnels
            .first()
            .map_or(Algorithm::AesGcm128, |t| t.cipher)
    }

    fn many_tunnels(&self) -> bool {
        self.tunnels.len() > AUTO_TWO_SCHEDULES_MAX_TUNNELS
    }

    /// How the backend was chosen, for logs: "ring" or
    /// "auto: ipsec-mb+ring (ns per seal at 64/1400 B: ring 137/300, ...)".
    pub fn backend_report(&self) -> String {
        match self.crypto {
            Some(b) => b.to_string(),
            None => {
                let many = self.many_tunnels();
                let (b, figs) = auto_backend(self.auto_algorithm(), many);
                format!(
                    "auto: {b} (ns per seal at {} B: {}{})",
                    AUTO_SIZES.map(|s| s.to_string()).join("/"),
                    figs.iter()
                        .map(|(b, ns)| format!(
                            "{b} {}",
                            ns.iter()
                                .map(|n| format!("{n:.0}"))
                                .collect::<Vec<_>>()
                                .join("/")
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if many {
                        format!(
                            "; over {AUTO_TWO_SCHEDULES_MAX_TUNNELS} tunnels: one key schedule per SA"
                        )
                    } else {
                        String::new()
                    }
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
