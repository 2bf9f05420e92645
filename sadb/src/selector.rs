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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpdV4 {
    rules: Option<Vec<V4Rule>>,
}

impl SpdV4 {
    /// Compiles the IPv4 policies of `spd`, in order.
    pub fn compile(spd: &Spd) -> SpdV4 {
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
        let rules = spd
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
        SpdV4 { rules: Some(rules) }
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
        Some(
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
        )
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
    /// entirely inside the later one.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (i, a) in self.policies.iter().enumerate() {
            for (j, b) in self.policies.iter().enumerate().skip(i + 1) {
                if a.action != b.action
                    && a.selector.overlaps(&b.selector)
                    && !b.selector.covers(&a.selector)
                {
                    out.push(Conflict {
                        first: i,
                        second: j,
                    });
                }
            }
        }
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
