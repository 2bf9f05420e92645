//! Security policy database (RFC 4301 §4.4.1): ordered policies whose selectors match the inner
//! packet's addresses, protocol and ports; the first match decides protect, bypass or discard.

use core::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address prefix such as `10.1.0.0/24` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not `address/length`.
    #[error("`{0}` is not a prefix like 10.1.0.0/24 or 2001:db8::/64")]
    Syntax(String),
    /// Length beyond 32 or 128.
    #[error("`{0}`: prefix length must be at most {1}")]
    Length(String, u8),
    /// Host bits set.
    #[error("`{0}` has host bits set; did you mean {1}?")]
    HostBits(String, String),
}

impl Prefix {
    /// Builds a prefix; host bits must be zero.
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(PrefixError::Length(format!("{addr}/{len}"), max));
        }
        let p = Prefix { addr, len };
        let net = p.network();
        if net != addr {
            return Err(PrefixError::HostBits(
                format!("{addr}/{len}"),
                format!("{net}/{len}"),
            ));
        }
        Ok(p)
    }

    /// The whole IPv4 or IPv6 space.
    pub fn any(v6: bool) -> Prefix {
        if v6 {
            Prefix {
                addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                len: 0,
            }
        } else {
            Prefix {
                addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                len: 0,
            }
        }
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    /// The length.
    pub fn len(&self) -> u8 {
        self.len
    }
    /// Whether this is a /0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask_bits(v: u128, bits: u32, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            let keep = (len as u32).min(bits);
            let m = (!0u128) << (bits - keep);
            v & (m & if bits == 128 { !0 } else { (1u128 << bits) - 1 })
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                IpAddr::V4((Self::mask_bits(u32::from(a) as u128, 32, self.len) as u32).into())
            }
            IpAddr::V6(a) => IpAddr::V6(Self::mask_bits(u128::from(a), 128, self.len).into()),
        }
    }

    /// Whether `ip` is inside.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                Self::mask_bits(u32::from(a) as u128, 32, self.len) == u32::from(n) as u128
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                Self::mask_bits(u128::from(a), 128, self.len) == u128::from(n)
            }
            _ => false,
        }
    }

    /// [`Self::contains`] for an IPv4 address, in 32-bit arithmetic (the per-packet next-hop
    /// check: no `IpAddr` built, no 128-bit masks).
    #[inline(always)]
    pub fn contains_v4(&self, a: std::net::Ipv4Addr) -> bool {
        match self.addr {
            IpAddr::V4(n) => {
                let m = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len.min(32) as u32)
                };
                u32::from(a) & m == u32::from(n)
            }
            IpAddr::V6(_) => false,
        }
    }

    /// Whether every address of `other` is inside `self`.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| PrefixError::Syntax(s.into()))?;
        let len = match l {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .map_err(|_| PrefixError::Syntax(s.into()))?,
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
        };
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An inclusive port range; `0-65535` is "any".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Lowest port.
    pub lo: u16,
    /// Highest port.
    pub hi: u16,
}

impl PortRange {
    /// Any port.
    pub const ANY: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };
    /// Whether `p` is inside.
    #[inline]
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
    /// Whether the ranges share a port.
    pub fn overlaps(&self, o: &PortRange) -> bool {
        self.lo <= o.hi && o.lo <= self.hi
    }
    /// Whether `o` is inside `self`.
    pub fn covers(&self, o: &PortRange) -> bool {
        self.lo <= o.lo && o.hi <= self.hi
    }
    /// Whether this is every port.
    pub fn is_any(&self) -> bool {
        *self == Self::ANY
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let bad = || format!("`{s}` is not a port or a range like 1000-2000");
        if s == "any" {
            return Ok(PortRange::ANY);
        }
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            None => {
                let p = s.trim().parse().map_err(|_| bad())?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(bad());
        }
        Ok(PortRange { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("any")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// What an inner packet looks like to the SPD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol.
    pub proto: u8,
    /// Source port (0 when the protocol has none).
    pub src_port: u16,
    /// Destination port (0 when the protocol has none).
    pub dst_port: u16,
}

impl FlowKey {
    /// The same flow seen from the other side (source and destination swapped), for the
    /// inbound SPD check of packets that arrive from the peer (RFC 4301 §5.2).
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }

    /// Reads the flow of an IPv4/IPv6 packet (ports for TCP, UDP and SCTP when present and not
    /// a later fragment). `None` when the bytes are not a valid IP packet.
    #[inline]
    pub fn from_packet(pkt: &[u8]) -> Option<FlowKey> {
        use espada_wire::{ipv4, ipv6};
        let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match pkt.first()? >> 4 {
            4 => {
                let p = ipv4::Packet::new_checked(pkt).ok()?;
                let (hl, tl) = (p.header_len() as usize, p.total_len() as usize);
                let l4 = if p.frag_offset() == 0 {
                    &pkt[hl..tl]
                } else {
                    &[]
                };
                (p.src_addr().into(), p.dst_addr().into(), p.protocol(), l4)
            }
            6 => {
                let p = ipv6::Packet::new_checked(pkt).ok()?;
                let tl = p.total_len();
                (
                    p.src_addr().into(),
                    p.dst_addr().into(),
                    p.next_header(),
                    &pkt[ipv6::HEADER_LEN..tl],
                )
            }
            _ => return None,
        };
        let (src_port, dst_port) = match proto {
            6 | 17 | 132 if l4.len() >= 4 => (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            ),
            _ => (0, 0),
        };
        Some(FlowKey {
            src,
            dst,
            proto,
            src_port,
            dst_port,
        })
    }
}

/// Traffic selectors of one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    /// Source prefix.
    pub src: Prefix,
    /// Destination prefix.
    pub dst: Prefix,
    /// Protocol, or any.
    pub proto: Option<u8>,
    /// Source ports.
    pub src_ports: PortRange,
    /// Destination ports.
    pub dst_ports: PortRange,
}

impl Selector {
    /// Matches a flow.
    #[inline]
    pub fn matches(&self, f: &FlowKey) -> bool {
        self.src.contains(f.src)
            && self.dst.contains(f.dst)
            && self.proto.is_none_or(|p| p == f.proto)
            && self.src_ports.contains(f.src_port)
            && self.dst_ports.contains(f.dst_port)
    }
    /// Whether some flow matches both.
    pub fn overlaps(&self, o: &Selector) -> bool {
        self.src.overlaps(&o.src)
            && self.dst.overlaps(&o.dst)
            && (self.proto.is_none() || o.proto.is_none() || self.proto == o.proto)
            && self.src_ports.overlaps(&o.src_ports)
            && self.dst_ports.overlaps(&o.dst_ports)
    }
    /// Whether every flow matching `o` matches `self`.
    pub fn covers(&self, o: &Selector) -> bool {
        self.src.covers(&o.src)
            && self.dst.covers(&o.dst)
            && (self.proto.is_none() || self.proto == o.proto)
            && self.src_ports.covers(&o.src_ports)
            && self.dst_ports.covers(&o.dst_ports)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)?;
        if let Some(p) = self.proto {
            write!(f, " proto {p}")?;
        }
        if !self.src_ports.is_any() {
            write!(f, " sport {}", self.src_ports)?;
        }
        if !self.dst_ports.is_any() {
            write!(f, " dport {}", self.dst_ports)?;
        }
        Ok(())
    }
}

/// What a policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send through the tunnel with this index (never in the clear).
    Protect(usize),
    /// Forward in the clear.
    Bypass,
    /// Drop.
    Discard,
}

/// One SPD entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Name for reports and errors.
    pub name: String,
    /// Selectors.
    pub selector: Selector,
    /// Action.
    pub action: Action,
}

/// One policy compiled for IPv4 flows: prefixes as (network, mask) words, so a lookup is a few
/// integer compares per policy (the fast path's form of [`Spd::lookup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4Rule {
    src: (u32, u32),
    dst: (u32, u32),
    proto: Option<u8>,
    src_ports: PortRange,
    dst_ports: PortRange,
    /// The policy's action.
    pub action: Action,
}

/// The IPv4 policies of an SPD, compiled (IPv6 policies left out: they match no IPv4 packet).
///
/// Small SPDs are scanned in order. From [`SpdV4::SCAN_MAX`] rules on, a lookup goes through a
/// tuple space (as Open vSwitch's classifier): rules grouped by their pair of prefix lengths,
/// each group a hash of (masked source, masked destination) to its rules in SPD order. A
/// packet probes each group once (a VPN concentrator's SPD of subnet pairs has one or two
/// groups, however many tunnels), and the first match in SPD order is the smallest rule index
/// any group finds: exactly the scan's answer (a property test checks it over random SPDs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpdV4 {
    rules: Option<Vec<V4Rule>>,
    /// The tuple space, for SPDs of more than `SCAN_MAX` rules.
    groups: Vec<TupleGroup>,
}

/// The rules of one pair of prefix lengths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TupleGroup {
    /// Source and destination masks.
    masks: (u32, u32),
    /// The group's smallest rule index: a group whose first rule comes after the best match
    /// found so far cannot improve it (groups are kept in this order).
    first: u32,
    /// (source & mask, destination & mask) → its rules, in SPD order.
    table: ExactTable,
}

/// One (masked source, masked destination) of a group: 24 bytes, so a lookup of a subnet
/// pair reads one slot (usually one cache line) and nothing else: the first rule's index and
/// action inline, and whether that rule matches every protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// Masked source (high half) and destination (low half).
    key: u64,
    /// The first rule's index; `EMPTY` for a free slot.
    first: u32,
    /// The first rule's action ([`Slot::encode`]); bit 31: the rule has no protocol or port
    /// condition (any packet of the pair matches it).
    action: u32,
    /// The pair's other rules: `ExactTable::rest[rest.0..rest.0 + rest.1]`, ascending.
    rest: (u32, u32),
}

impl Slot {
    const EMPTY: u32 = u32::MAX;
    const PLAIN: u32 = 1 << 31;
    const BYPASS: u32 = Self::PLAIN - 1;
    const DISCARD: u32 = Self::PLAIN - 2;
    /// A tunnel index too large to encode: the action is read from the rule.
    const RULE: u32 = Self::PLAIN - 3;

    fn encode(a: Action) -> u32 {
        match a {
            Action::Protect(t) => u32::try_from(t).unwrap_or(Self::RULE).min(Self::RULE),
            Action::Bypass => Self::BYPASS,
            Action::Discard => Self::DISCARD,
        }
    }

    #[inline]
    fn decode(&self, rules: &[V4Rule]) -> Option<Action> {
        match self.action & !Self::PLAIN {
            Self::BYPASS => Some(Action::Bypass),
            Self::DISCARD => Some(Action::Discard),
            Self::RULE => rules.get(self.first as usize).map(|r| r.action),
            t => Some(Action::Protect(t as usize)),
        }
    }
}

/// An open-addressed hash of (masked source, masked destination) pairs to [`Slot`]s, linear
/// probing, at most 5/8 full: compact (24 bytes a pair, 10 000 tunnels in 384 KiB rather
/// than the 1.4 MiB a general map of whole rules took, measured as a cache and TLB miss per
/// packet) and with a [`ExactTable::prefetch`] a burst can call before it looks up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ExactTable {
    slots: Vec<Slot>,
    /// `slots.len() - 1` (a power of two minus one).
    mask: usize,
    rest: Vec<u32>,
}

impl ExactTable {
    /// Builds the table from (key, rule indices ascending, first rule) entries.
    fn build(entries: Vec<(u64, Vec<u32>, V4Rule)>) -> ExactTable {
        let n = (entries.len() * 8 / 5 + 1).next_power_of_two().max(8);
        let mut t = ExactTable {
            slots: vec![
                Slot {
                    key: 0,
                    first: Slot::EMPTY,
                    action: 0,
                    rest: (0, 0),
                };
                n
            ],
            mask: n - 1,
            rest: Vec::new(),
        };
        for (key, idx, rule) in entries {
            let plain = rule.proto.is_none() && rule.src_ports.is_any() && rule.dst_ports.is_any();
            let rest = (t.rest.len() as u32, idx.len() as u32 - 1);
            t.rest.extend_from_slice(&idx[1..]);
            let mut i = t.home(key);
            while t.slots[i].first != Slot::EMPTY {
                i = (i + 1) & t.mask;
            }
            t.slots[i] = Slot {
                key,
                first: idx[0],
                action: Slot::encode(rule.action) | if plain { Slot::PLAIN } else { 0 },
                rest,
            };
        }
        t
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        // Fibonacci hashing: the product's high bits mix every bit of the key (tunnel subnets
        // differ only in their middle bits).
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    #[inline]
    fn get(&self, key: u64) -> Option<&Slot> {
        let mut i = self.home(key);
        loop {
            let s = self.slots.get(i)?;
            if s.first == Slot::EMPTY {
                return None;
            }
            if s.key == key {
                return Some(s);
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline(always)]
    fn prefetch(&self, key: u64) {
        if let Some(s) = self.slots.get(self.home(key)) {
            crate::prefetch::read(s);
        }
    }

    fn rest(&self, s: &Slot) -> &[u32] {
        self.rest
            .get(s.rest.0 as usize..(s.rest.0 + s.rest.1) as usize)
            .unwrap_or(&[])
    }
}

fn pair_key(src: u32, dst: u32) -> u64 {
    ((src as u64) << 32) | dst as u64
}

impl SpdV4 {
    /// Up to this many rules, a lookup scans them in order (a hash probe costs more than a
    /// few compares).
    pub const SCAN_MAX: usize = 8;

    /// Compiles the IPv4 policies of `spd`, in order.
    pub fn compile(spd: &Spd) -> SpdV4 {
        Self::compile_with(spd, Self::SCAN_MAX)
    }

    /// Like [`SpdV4::compile`], with the tuple space from `scan_max` rules on (tests).
    pub fn compile_with(spd: &Spd, scan_max: usize) -> SpdV4 {
        let v4 = |p: &Prefix| match p.addr() {
            IpAddr::V4(a) => {
                let m = if p.is_empty() {
                    0
                } else {
                    u32::MAX << (32 - p.len().min(32) as u32)
                };
                Some((u32::from(a) & m, m))
            }
            IpAddr::V6(_) => None,
        };
        // An IPv6 (or mixed) policy matches no IPv4 packet: leaving it out keeps the first
        // match of every IPv4 flow the same, so a dual-stack SPD still has its fast form.
        let rules: Vec<V4Rule> = spd
            .policies
            .iter()
            .filter_map(|p| {
                Some(V4Rule {
                    src: v4(&p.selector.src)?,
                    dst: v4(&p.selector.dst)?,
                    proto: p.selector.proto,
                    src_ports: p.selector.src_ports,
                    dst_ports: p.selector.dst_ports,
                    action: p.action,
                })
            })
            .collect();
        let mut groups: Vec<TupleGroup> = Vec::new();
        if rules.len() > scan_max {
            // (group, key) → the pair's rule indices, in SPD order.
            let mut pairs: Vec<rustc_hash::FxHashMap<u64, Vec<u32>>> = Vec::new();
            for (i, r) in rules.iter().enumerate() {
                let masks = (r.src.1, r.dst.1);
                let g = match groups.iter_mut().position(|g| g.masks == masks) {
                    Some(g) => g,
                    None => {
                        groups.push(TupleGroup {
                            masks,
                            first: i as u32,
                            table: Default::default(),
                        });
                        pairs.push(Default::default());
                        groups.len() - 1
                    }
                };
                pairs[g]
                    .entry(pair_key(r.src.0, r.dst.0))
                    .or_default()
                    .push(i as u32);
            }
            for (g, p) in groups.iter_mut().zip(pairs) {
                g.table = ExactTable::build(
                    p.into_iter()
                        .map(|(k, idx)| {
                            let r = rules[idx[0] as usize];
                            (k, idx, r)
                        })
                        .collect(),
                );
            }
            // Groups are created in order of their first rule already.
        }
        SpdV4 {
            rules: Some(rules),
            groups,
        }
    }

    /// The first matching rule's action for the reversed flow of an IPv4 packet (an inbound
    /// packet against the SPD written for our outbound side), read straight from its bytes:
    /// no [`FlowKey`] is built. `None` when the SPD could not be compiled or `pkt` is not a
    /// well-formed IPv4 packet; use [`FlowKey::from_packet`] and [`Spd::lookup`] then.
    #[inline]
    pub fn lookup_reversed_ipv4(&self, pkt: &[u8]) -> Option<Option<Action>> {
        self.rules.as_ref()?;
        // The fixed header as an array: every field below is read with no bounds check.
        let h = pkt.first_chunk::<20>()?;
        if h[0] >> 4 != 4 {
            return None;
        }
        let hl = ((h[0] & 0x0f) as usize) * 4;
        let tl = u16::from_be_bytes([h[2], h[3]]) as usize;
        if hl < 20 || tl < hl || tl > pkt.len() {
            return None;
        }
        let src = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let dst = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let proto = h[9];
        let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
        let (sport, dport) = match (proto, pkt[..tl].get(hl..hl + 4)) {
            (6 | 17 | 132, Some(p)) if first_fragment => (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ),
            _ => (0, 0),
        };
        self.lookup(dst, src, proto, dport, sport)
    }

    /// The first matching rule's action: `Some(None)` for no match, `None` when the SPD could
    /// not be compiled (use [`Spd::lookup`]).
    #[inline]
    pub fn lookup(
        &self,
        src: u32,
        dst: u32,
        proto: u8,
        sport: u16,
        dport: u16,
    ) -> Option<Option<Action>> {
        let rules = self.rules.as_ref()?;
        if self.groups.is_empty() {
            return Some(
                rules
                    .iter()
                    .find(|r| {
                        src & r.src.1 == r.src.0
                            && dst & r.dst.1 == r.dst.0
                            && r.proto.is_none_or(|p| p == proto)
                            && r.src_ports.contains(sport)
                            && r.dst_ports.contains(dport)
                    })
                    .map(|r| r.action),
            );
        }
        self.lookup_tuples(rules, src, dst, proto, sport, dport)
    }

    /// The tuple-space half of [`SpdV4::lookup`] (out of line: small SPDs never come here).
    #[inline(never)]
    fn lookup_tuples(
        &self,
        rules: &[V4Rule],
        src: u32,
        dst: u32,
        proto: u8,
        sport: u16,
        dport: u16,
    ) -> Option<Option<Action>> {
        let rest = |r: &V4Rule| {
            r.proto.is_none_or(|p| p == proto)
                && r.src_ports.contains(sport)
                && r.dst_ports.contains(dport)
        };
        let mut best = u32::MAX;
        let mut action = None;
        for g in &self.groups {
            if g.first >= best {
                break;
            }
            let Some(s) = g.table.get(pair_key(src & g.masks.0, dst & g.masks.1)) else {
                continue;
            };
            if s.first >= best {
                continue;
            }
            if s.action & Slot::PLAIN != 0 || rules.get(s.first as usize).is_some_and(rest) {
                best = s.first;
                action = s.decode(rules);
                continue;
            }
            for &i in g.table.rest(s) {
                if i >= best {
                    break;
                }
                if let Some(r) = rules.get(i as usize).filter(|r| rest(r)) {
                    best = i;
                    action = Some(r.action);
                    break;
                }
            }
        }
        Some(action)
    }

    /// Asks the CPU for the memory a [`SpdV4::lookup`] of (`src`, `dst`) will read (the
    /// first two tuple groups' slots), so a burst can ask for all its packets' first and
    /// look up afterwards, the misses overlapping.
    #[inline(always)]
    pub fn prefetch(&self, src: u32, dst: u32) {
        for g in self.groups.iter().take(2) {
            g.table.prefetch(pair_key(src & g.masks.0, dst & g.masks.1));
        }
    }

    /// How many probes a lookup makes at most (tuple groups; 0: the rules are scanned).
    pub fn tuple_groups(&self) -> usize {
        self.groups.len()
    }
}

/// An ordered SPD: the first matching policy wins; no match means drop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spd {
    /// Policies in order.
    pub policies: Vec<Policy>,
}

/// Two policies that can match the same packet with different actions, where the earlier is
/// not a narrower exception to the later one (which would be the usual, intended pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Index of the earlier policy.
    pub first: usize,
    /// Index of the later policy.
    pub second: usize,
}

impl Spd {
    /// The first policy matching `f`.
    #[inline]
    pub fn lookup(&self, f: &FlowKey) -> Option<&Policy> {
        self.policies.iter().find(|p| p.selector.matches(f))
    }

    /// Pairs of policies that overlap with different actions, where the earlier one is not
    /// entirely inside the later one, in order (by the earlier policy, then the later).
    ///
    /// Two selectors overlap only where their destination prefixes do, that is where one
    /// contains the other: each policy looks up the policies whose destination contains its
    /// own (one hash probe per prefix length in use), so an SPD of disjoint subnet pairs is
    /// checked in linear time, not by comparing every pair (10 000 tunnels: 50 million pairs).
    pub fn conflicts(&self) -> Vec<Conflict> {
        fn masked(p: &Prefix, len: u8) -> (bool, u8, u128) {
            let (v6, bits, width) = match p.addr() {
                IpAddr::V4(a) => (false, u32::from(a) as u128, 32u32),
                IpAddr::V6(a) => (true, u128::from(a), 128),
            };
            let keep = len as u32;
            let m = if keep == 0 {
                0
            } else {
                (u128::MAX << (width - keep)) & (u128::MAX >> (128 - width))
            };
            (v6, len, bits & m)
        }
        let mut by_dst: rustc_hash::FxHashMap<(bool, u8, u128), Vec<usize>> = Default::default();
        let mut lens: Vec<(bool, u8)> = Vec::new();
        for (i, p) in self.policies.iter().enumerate() {
            let d = &p.selector.dst;
            let key = masked(d, d.len());
            by_dst.entry(key).or_default().push(i);
            if !lens.contains(&(key.0, key.1)) {
                lens.push((key.0, key.1));
            }
        }
        let mut out = Vec::new();
        for (j, b) in self.policies.iter().enumerate() {
            let d = &b.selector.dst;
            let v6 = d.addr().is_ipv6();
            for &(fam, l) in &lens {
                if fam != v6 || l > d.len() {
                    continue;
                }
                let Some(cands) = by_dst.get(&masked(d, l)) else {
                    continue;
                };
                for &i in cands {
                    // Each unordered pair once: from its more specific destination, or, for
                    // equal destinations, from the later policy.
                    if l == d.len() && i >= j {
                        continue;
                    }
                    let (first, second) = (i.min(j), i.max(j));
                    let (a, c) = (&self.policies[first], &self.policies[second]);
                    if a.action != c.action
                        && a.selector.overlaps(&c.selector)
                        && !c.selector.covers(&a.selector)
                    {
                        out.push(Conflict { first, second });
                    }
                }
            }
        }
        out.sort_unstable_by_key(|c| (c.first, c.second));
        out
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn sel(src: &str, dst: &str) -> Selector {
        Selector {
            src: p(src),
            dst: p(dst),
            proto: None,
            src_ports: PortRange::ANY,
            dst_ports: PortRange::ANY,
        }
    }

    fn flow(src: &str, dst: &str, proto: u8, dport: u16) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            src_port: 1234,
            dst_port: dport,
        }
    }

    #[test]
    fn prefixes() {
        assert!(p("10.1.0.0/24").contains("10.1.0.77".parse().unwrap()));
        assert!(!p("10.1.0.0/24").contains("10.1.1.1".parse().unwrap()));
        assert!(p("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(!p("0.0.0.0/0").contains("::1".parse().unwrap()));
        assert!(p("2001:db8::/32").contains("2001:db8:1::5".parse().unwrap()));
        assert!(p("10.0.0.0/8").covers(&p("10.1.0.0/16")));
        assert!(!p("10.1.0.0/16").covers(&p("10.0.0.0/8")));
        assert_eq!(p("10.1.0.5").to_string(), "10.1.0.5/32");
        assert_eq!(
            "10.1.0.1/24".parse::<Prefix>().unwrap_err().to_string(),
            "`10.1.0.1/24` has host bits set; did you mean 10.1.0.0/24?"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Prefix>(),
            Err(PrefixError::Length(..))
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Prefix>(),
            Err(PrefixError::Syntax(..))
        ));
    }

    #[test]
    fn ports() {
        let r: PortRange = "1000-2000".parse().unwrap();
        assert!(r.contains(1500) && !r.contains(999));
        assert_eq!("any".parse::<PortRange>().unwrap(), PortRange::ANY);
        assert!("9-1".parse::<PortRange>().is_err());
        assert_eq!(r.to_string(), "1000-2000");
    }

    #[test]
    fn first_match_wins_and_no_match_is_none() {
        let mut bypass = sel("10.1.0.0/24", "10.2.0.0/24");
        bypass.proto = Some(17);
        bypass.dst_ports = PortRange { lo: 53, hi: 53 };
        let spd = Spd {
            policies: vec![
                Policy {
                    name: "dns".into(),
                    selector: bypass,
                    action: Action::Bypass,
                },
                Policy {
                    name: "tunnel".into(),
                    selector: sel("10.1.0.0/24", "10.2.0.0/24"),
                    action: Action::Protect(0),
                },
                Policy {
                    name: "drop-rest".into(),
                    selector: sel("10.0.0.0/8", "10.0.0.0/8"),
                    action: Action::Discard,
                },
            ],
        };
        assert_eq!(
            spd.lookup(&flow("10.1.0.5", "10.2.0.9", 17, 53))
                .unwrap()
                .action,
            Action::Bypass
        );
        assert_eq!(
            spd.lookup(&flow("10.1.0.5", "10.2.0.9", 6, 53))
                .unwrap()
                .action,
            Action::Protect(0)
        );
        assert_eq!(
            spd.lookup(&flow("10.9.0.5", "10.2.0.9", 6, 80))
                .unwrap()
                .action,
            Action::Discard
        );
        assert!(spd.lookup(&flow("192.0.2.1", "10.2.0.9", 6, 80)).is_none());
        // exceptions before broader rules are fine
        assert!(spd.conflicts().is_empty());
        // a broad rule before a narrower one with another action is a conflict
        let bad = Spd {
            policies: vec![spd.policies[2].clone(), spd.policies[1].clone()],
        };
        assert_eq!(
            bad.conflicts(),
            vec![Conflict {
                first: 0,
                second: 1
            }]
        );
    }

    #[test]
    fn flow_from_packets() {
        let mut b = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 0, 5, 10, 2, 0, 9, 0x04, 0xd2, 0x00,
            0x35, 0, 8, 0, 0,
        ];
        espada_wire::ipv4::Packet::new_unchecked(&mut b[..]).fill_checksum();
        assert_eq!(
            FlowKey::from_packet(&b),
            Some(flow("10.1.0.5", "10.2.0.9", 17, 53))
        );
        assert_eq!(FlowKey::from_packet(&b[..10]), None);
        assert_eq!(FlowKey::from_packet(&[]), None);
    }

    proptest::proptest! {
        /// The compiled IPv4 table answers exactly as the ordered SPD does.
        #[test]
        fn compiled_v4_lookup_agrees_with_the_spd(
            src in proptest::num::u32::ANY, dst in proptest::num::u32::ANY,
            proto in proptest::sample::select(vec![1u8, 6, 17, 50]),
            sport in proptest::num::u16::ANY, dport in proptest::num::u16::ANY,
            pick in 0usize..4,
        ) {
            let pol = |name: &str, src: &str, dst: &str, proto: Option<u8>, dp: PortRange, action| Policy {
                name: name.into(),
                selector: Selector {
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    proto,
                    src_ports: PortRange::ANY,
                    dst_ports: dp,
                },
                action,
            };
            let spd = Spd {
                policies: vec![
                    pol("a", "10.1.0.0/16", "10.2.3.0/24", Some(17), PortRange { lo: 5000, hi: 6000 }, Action::Discard),
                    pol("b", "10.1.0.0/16", "10.2.0.0/16", None, PortRange::ANY, Action::Protect(0)),
                    pol("c", "0.0.0.0/0", "192.168.7.7/32", Some(6), PortRange::ANY, Action::Bypass),
                ],
            };
            let v4 = SpdV4::compile(&spd);
            // Steer some flows into the policies' ranges.
            let (src, dst) = match pick {
                0 => (0x0a01_0000 | (src & 0xffff), 0x0a02_0300 | (dst & 0xff)),
                1 => (0x0a01_0000 | (src & 0xffff), 0x0a02_0000 | (dst & 0xffff)),
                2 => (src, 0xc0a8_0707),
                _ => (src, dst),
            };
            let f = FlowKey {
                src: IpAddr::V4(src.into()),
                dst: IpAddr::V4(dst.into()),
                proto,
                src_port: sport,
                dst_port: dport,
            };
            let want = spd.lookup(&f).map(|p| p.action);
            proptest::prop_assert_eq!(v4.lookup(src, dst, proto, sport, dport), Some(want));
        }
    }

    /// A random IPv4 policy drawn from a few nested and overlapping prefixes, protocols, port
    /// ranges and actions (so random flows hit several policies at once).
    fn random_policy() -> impl proptest::strategy::Strategy<Value = Policy> {
        use proptest::prelude::*;
        let prefix = (0usize..8, 0u32..4).prop_map(|(k, low)| {
            let (net, len): (u32, u8) = [
                (0x0a00_0000, 8),
                (0x0a01_0000, 16),
                (0x0a01_0000, 24),
                (0x0a01_0100, 24),
                (0x0a01_0100, 32),
                (0x0a02_0000, 16),
                (0x0a02_0000, 24),
                (0, 0),
            ][k];
            let net = if (24..32).contains(&len) {
                net | (low << 8)
            } else {
                net
            };
            Prefix::new(IpAddr::V4(net.into()), len).unwrap()
        });
        let ports = prop_oneof![
            Just(PortRange::ANY),
            (0u16..8).prop_map(|a| PortRange {
                lo: 1000 + a,
                hi: 1003 + a
            }),
        ];
        let action = prop_oneof![
            (0usize..3).prop_map(Action::Protect),
            Just(Action::Bypass),
            Just(Action::Discard),
        ];
        (
            prefix.clone(),
            prefix,
            proptest::option::of(proptest::sample::select(vec![6u8, 17])),
            ports.clone(),
            ports,
            action,
        )
            .prop_map(|(src, dst, proto, src_ports, dst_ports, action)| Policy {
                name: "p".into(),
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

    /// The compact table at scale: 20 000 subnet pairs (the slots probe past collisions),
    /// each found with its own action, a miss between them, and a tunnel index too large for
    /// a slot read from its rule.
    #[test]
    fn twenty_thousand_subnet_pairs_each_find_their_own_policy() {
        let v4 = |a: u32, len: u8| Prefix::new(IpAddr::V4(a.into()), len).expect("prefix");
        let n = 20_000u32;
        let mut policies: Vec<Policy> = (0..n)
            .map(|k| Policy {
                name: format!("t{k}"),
                selector: Selector {
                    src: v4(0x0a40_0000 + (k << 8), 24),
                    dst: v4(0x0a80_0000 + (k << 8), 24),
                    proto: None,
                    src_ports: PortRange::ANY,
                    dst_ports: PortRange::ANY,
                },
                action: match k % 3 {
                    0 => Action::Protect(k as usize),
                    1 => Action::Bypass,
                    _ => Action::Discard,
                },
            })
            .collect();
        policies[7].action = Action::Protect(usize::MAX / 2);
        let spd = Spd { policies };
        let t = SpdV4::compile(&spd);
        assert_eq!(t.tuple_groups(), 1);
        for k in 0..n {
            let (s, d) = (0x0a40_0000 + (k << 8) + 5, 0x0a80_0000 + (k << 8) + 9);
            t.prefetch(s, d);
            assert_eq!(
                t.lookup(s, d, 17, 1, 2),
                Some(Some(spd.policies[k as usize].action)),
                "tunnel {k}"
            );
            // Source of one tunnel, destination of another: no policy.
            assert_eq!(
                t.lookup(s, 0x0a80_0000 + (((k + 1) % n) << 8), 17, 1, 2),
                Some(None)
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Issue 26: the tuple space answers every flow exactly as the ordered SPD's first
        /// match, over random SPDs of overlapping policies (and so does the scan).
        #[test]
        fn tuple_space_lookup_is_the_first_match_in_order(
            policies in proptest::collection::vec(random_policy(), 0..40),
            flows in proptest::collection::vec(
                (0u32..4, 0u32..1024, 0u32..4, 0u32..1024, proptest::sample::select(vec![1u8, 6, 17]), 998u16..1014, 998u16..1014),
                64),
        ) {
            let spd = Spd { policies };
            let tuple = SpdV4::compile_with(&spd, 0);
            let scan = SpdV4::compile_with(&spd, usize::MAX);
            proptest::prop_assert!(spd.policies.is_empty() || tuple.tuple_groups() > 0);
            proptest::prop_assert_eq!(scan.tuple_groups(), 0);
            for (sn, sh, dn, dh, proto, sport, dport) in flows {
                let base = [0x0a01_0000u32, 0x0a02_0000, 0x0a00_0000, 0xc0a8_0000];
                let src = base[sn as usize] | sh;
                let dst = base[dn as usize] | dh;
                let f = FlowKey {
                    src: IpAddr::V4(src.into()),
                    dst: IpAddr::V4(dst.into()),
                    proto,
                    src_port: sport,
                    dst_port: dport,
                };
                let want = spd.lookup(&f).map(|p| p.action);
                proptest::prop_assert_eq!(tuple.lookup(src, dst, proto, sport, dport), Some(want));
                proptest::prop_assert_eq!(scan.lookup(src, dst, proto, sport, dport), Some(want));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Issue 26: the indexed conflict check finds exactly the pairs the pairwise one does,
        /// in the same order (IPv6 policies mixed in).
        #[test]
        fn indexed_conflicts_equal_the_pairwise_check(
            policies in proptest::collection::vec(random_policy(), 0..40),
            v6 in proptest::collection::vec(proptest::prelude::any::<bool>(), 40),
        ) {
            let mut spd = Spd { policies };
            for (p, six) in spd.policies.iter_mut().zip(v6) {
                if six {
                    // The same nesting, inside 2001:db8::/32.
                    let IpAddr::V4(a) = p.selector.dst.addr() else { continue };
                    let addr = (0x2001_0db8u128 << 96) | ((u32::from(a) as u128) << 64);
                    p.selector.dst = Prefix::new(IpAddr::V6(addr.into()), 32 + p.selector.dst.len()).unwrap();
                    p.selector.src = Prefix::any(true);
                }
            }
            let mut want = Vec::new();
            for (i, a) in spd.policies.iter().enumerate() {
                for (j, b) in spd.policies.iter().enumerate().skip(i + 1) {
                    if a.action != b.action && a.selector.overlaps(&b.selector) && !b.selector.covers(&a.selector) {
                        want.push(Conflict { first: i, second: j });
                    }
                }
            }
            proptest::prop_assert_eq!(spd.conflicts(), want);
        }
    }

    #[test]
    fn ten_thousand_subnet_pairs_take_one_probe() {
        let policies = (0..10_000u32)
            .map(|i| Policy {
                name: format!("t{i}"),
                selector: Selector {
                    src: Prefix::new(IpAddr::V4((0x0a00_0000 | (i << 8)).into()), 24).unwrap(),
                    dst: Prefix::new(IpAddr::V4((0xac00_0000 | (i << 8)).into()), 24).unwrap(),
                    proto: None,
                    src_ports: PortRange::ANY,
                    dst_ports: PortRange::ANY,
                },
                action: Action::Protect(i as usize),
            })
            .collect();
        let v4 = SpdV4::compile(&Spd { policies });
        assert_eq!(v4.tuple_groups(), 1);
        assert_eq!(
            v4.lookup(
                0x0a00_0000 | (9_999 << 8) | 5,
                0xac00_0000 | (9_999 << 8) | 7,
                17,
                1,
                2
            ),
            Some(Some(Action::Protect(9_999)))
        );
        assert_eq!(v4.lookup(0x0b00_0000, 0xac00_0000, 17, 1, 2), Some(None));
    }

    #[test]
    fn v6_policies_leave_the_v4_form_to_the_v4_policies() {
        let mut spd = Spd::default();
        spd.policies.push(Policy {
            name: "v6".into(),
            selector: Selector {
                src: "2001:db8::/32".parse().unwrap(),
                dst: "2001:db8:1::/48".parse().unwrap(),
                proto: None,
                src_ports: PortRange::ANY,
                dst_ports: PortRange::ANY,
            },
            action: Action::Bypass,
        });
        // Only IPv6: no IPv4 packet matches.
        assert_eq!(SpdV4::compile(&spd).lookup(1, 2, 17, 1, 2), Some(None));
        spd.policies.push(Policy {
            name: "v4".into(),
            selector: Selector {
                src: "0.0.0.0/0".parse().unwrap(),
                dst: "0.0.0.0/0".parse().unwrap(),
                proto: None,
                src_ports: PortRange::ANY,
                dst_ports: PortRange::ANY,
            },
            action: Action::Protect(3),
        });
        assert_eq!(
            SpdV4::compile(&spd).lookup(1, 2, 17, 1, 2),
            Some(Some(Action::Protect(3)))
        );
    }

    proptest::proptest! {
        /// The 32-bit containment check agrees with the general one for every IPv4 prefix
        /// length and address, and says no for an IPv6 prefix.
        #[test]
        fn contains_v4_agrees_with_contains(
            net in proptest::num::u32::ANY, len in 0u8..=32, a in proptest::num::u32::ANY,
            near in proptest::prelude::any::<bool>(),
        ) {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            let p = Prefix::new(IpAddr::V4((net & m).into()), len).unwrap();
            // Half the addresses inside the prefix, so both answers are exercised.
            let a = if near { (net & m) | (a & !m) } else { a };
            let a = std::net::Ipv4Addr::from(a);
            proptest::prop_assert_eq!(p.contains_v4(a), p.contains(IpAddr::V4(a)));
            proptest::prop_assert!(!Prefix::any(true).contains_v4(a));
        }
    }

    proptest::proptest! {
        /// The byte-level IPv4 lookup agrees with FlowKey + Spd::lookup on the reversed flow,
        /// for any header bytes (fragments, short payloads, bad lengths included).
        #[test]
        fn reversed_ipv4_lookup_agrees_with_the_flow_key_path(
            hdr in proptest::collection::vec(proptest::prelude::any::<u8>(), 20..40),
            ihl in 5u8..7, proto in proptest::sample::select(vec![1u8, 6, 17, 132, 50]),
            frag in proptest::prelude::any::<bool>(), src_last in 0u8..4, dst_last in 0u8..4,
        ) {
            let mut pkt = hdr.clone();
            pkt[0] = 0x40 | ihl;
            let tl = pkt.len() as u16;
            pkt[2..4].copy_from_slice(&tl.to_be_bytes());
            pkt[6..8].copy_from_slice(&(if frag { 0x0010u16 } else { 0x4000 }).to_be_bytes());
            pkt[9] = proto;
            pkt[12..16].copy_from_slice(&[10, 2, 0, src_last]);
            pkt[16..20].copy_from_slice(&[10, 1, 0, dst_last]);
            let pol = |name: &str, sel: &str, dports: &str, action| Policy {
                name: name.into(),
                selector: Selector {
                    src: "10.1.0.0/30".parse().unwrap(),
                    dst: sel.parse().unwrap(),
                    proto: (dports != "any").then_some(17),
                    src_ports: PortRange::ANY,
                    dst_ports: if dports == "any" { PortRange::ANY } else { dports.parse().unwrap() },
                },
                action,
            };
            let spd = Spd {
                policies: vec![
                    Policy {
                        name: "v6".into(),
                        selector: Selector {
                            src: "::/0".parse().unwrap(),
                            dst: "::/0".parse().unwrap(),
                            proto: None,
                            src_ports: PortRange::ANY,
                            dst_ports: PortRange::ANY,
                        },
                        action: Action::Discard,
                    },
                    pol("udp", "10.2.0.0/31", "1000-40000", Action::Protect(1)),
                    pol("all", "10.2.0.0/30", "any", Action::Protect(0)),
                ],
            };
            let fast = SpdV4::compile(&spd).lookup_reversed_ipv4(&pkt);
            match FlowKey::from_packet(&pkt) {
                Some(f) => proptest::prop_assert_eq!(
                    fast,
                    Some(spd.lookup(&f.reversed()).map(|p| p.action))
                ),
                None => proptest::prop_assert_eq!(fast, None),
            }
        }
    }
}
