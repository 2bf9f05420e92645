//! Runtime SAs: what one worker core owns for one direction of one SA.

use crate::replay::ReplayWindow;
use espada_crypto::{Cipher, EspAead};
use espada_wire::{esp, ip_proto, ipv4, ipv6, udp};
use std::net::IpAddr;

/// What the encapsulator does with the outer DF bit (RFC 4301 §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DfMode {
    /// Copy DF from the inner IPv4 header (IPv6 inner: clear).
    Copy,
    /// Always set DF on the outer header.
    Set,
    /// Never set DF (the outer packet may be fragmented on the way).
    #[default]
    Clear,
}

impl DfMode {
    /// Parses `copy` / `set` / `clear`.
    pub fn from_name(s: &str) -> Option<DfMode> {
        match s {
            "copy" => Some(DfMode::Copy),
            "set" => Some(DfMode::Set),
            "clear" => Some(DfMode::Clear),
            _ => None,
        }
    }
    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            DfMode::Copy => "copy",
            DfMode::Set => "set",
            DfMode::Clear => "clear",
        }
    }
}

/// The outer header of a tunnel: addresses, UDP ports (RFC 3948), TTL and DF policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEndpoints {
    /// This gateway's black-side address (outer source).
    pub local: IpAddr,
    /// The peer gateway's black-side address (outer destination).
    pub remote: IpAddr,
    /// UDP source port (per-CPU SAs use base + core index so the peer can steer them).
    pub src_port: u16,
    /// UDP destination port (4500).
    pub dst_port: u16,
    /// Outer TTL / hop limit (RFC 4301 §5.1.2.1: set by the encapsulator; default 64).
    pub ttl: u8,
    /// DF policy for an IPv4 outer header.
    pub df: DfMode,
}

impl TunnelEndpoints {
    /// Endpoints with the defaults: ports 4500/4500, TTL 64, DF cleared.
    pub fn new(local: IpAddr, remote: IpAddr) -> Self {
        TunnelEndpoints {
            local,
            remote,
            src_port: esp::UDP_ENCAP_PORT,
            dst_port: esp::UDP_ENCAP_PORT,
            ttl: 64,
            df: DfMode::Clear,
        }
    }

    /// Outer IP + UDP header length.
    pub fn outer_len(&self) -> usize {
        match self.local {
            IpAddr::V4(_) => ipv4::HEADER_LEN + udp::HEADER_LEN,
            IpAddr::V6(_) => ipv6::HEADER_LEN + udp::HEADER_LEN,
        }
    }
}

/// Per-SA traffic counters (owned by one worker: plain integers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaCounters {
    /// Packets processed successfully.
    pub packets: u64,
    /// Inner bytes of those packets.
    pub bytes: u64,
}

/// Sequence numbers reserved for one burst: `first`, `first + 1`, …, `first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqReservation {
    /// First number.
    pub first: u64,
    /// How many were granted (fewer than asked when the space is exhausted).
    pub count: u32,
}

/// The sending half of an SA.
pub struct OutboundSa {
    /// SPI the peer chose.
    pub spi: u32,
    /// Key schedule.
    pub cipher: Cipher,
    /// Extended sequence numbers (RFC 4304).
    pub esn: bool,
    /// Outer header parameters.
    pub tunnel: TunnelEndpoints,
    /// Counters.
    pub counters: SaCounters,
    /// Last sequence number used (0: none yet; RFC 4303 §3.3.3 starts the counter at 0).
    last_seq: u64,
    /// Outer IP + UDP header with addresses, ports, TTL, protocol filled in.
    template: [u8; 48],
    template_len: u8,
    ip_id: u16,
}

impl core::fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OutboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("cipher", &self.cipher)
            .field("esn", &self.esn)
            .field("tunnel", &self.tunnel)
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

impl OutboundSa {
    /// A new SA whose first packet will carry sequence number 1.
    pub fn new(spi: u32, cipher: Cipher, esn: bool, tunnel: TunnelEndpoints) -> Self {
        let mut template = [0u8; 48];
        let len = tunnel.outer_len();
        match (tunnel.local, tunnel.remote) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let r = ipv4::Repr {
                    src: s,
                    dst: d,
                    protocol: ip_proto::UDP,
                    payload_len: 0,
                    ttl: tunnel.ttl,
                    tos: 0,
                    ident: 0,
                    dont_frag: false,
                };
                r.emit(&mut ipv4::Packet::new_unchecked(&mut template[..]));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let r = ipv6::Repr {
                    src: s,
                    dst: d,
                    next_header: ip_proto::UDP,
                    payload_len: 0,
                    hop_limit: tunnel.ttl,
                    traffic_class: 0,
                    flow_label: 0,
                };
                r.emit(&mut ipv6::Packet::new_unchecked(&mut template[..]));
            }
            // Configuration validation refuses mixed families; keep the template empty-safe.
            _ => {}
        }
        let ip_len = len - udp::HEADER_LEN;
        let mut u = udp::Packet::new_unchecked(&mut template[ip_len..len]);
        u.set_src_port(tunnel.src_port);
        u.set_dst_port(tunnel.dst_port);
        u.set_len(udp::HEADER_LEN as u16);
        u.set_checksum(0);
        OutboundSa {
            spi,
            cipher,
            esn,
            tunnel,
            counters: SaCounters::default(),
            last_seq: 0,
            template,
            template_len: len as u8,
            ip_id: (spi as u16) ^ 0x5a5a,
        }
    }

    /// Resumes at a given counter (the next packet carries `last_used + 1`): tests, and
    /// restoring state.
    pub fn with_last_seq(mut self, last_used: u64) -> Self {
        self.last_seq = last_used;
        self
    }

    /// The highest sequence number this SA may ever send: 2^32−1, or 2^64−1 with ESN
    /// (RFC 4303 §3.3.3: the counter must never cycle).
    pub fn max_seq(&self) -> u64 {
        if self.esn {
            u64::MAX
        } else {
            u32::MAX as u64
        }
    }

    /// Last number used.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Reserves up to `n` consecutive sequence numbers for one burst. Grants fewer (possibly
    /// zero) when the space is exhausted: the caller drops the rest as `SeqCycled`, because a
    /// repeated number would repeat a GCM nonce under the same key.
    #[inline]
    pub fn reserve(&mut self, n: u32) -> SeqReservation {
        let left = self.max_seq() - self.last_seq;
        let count = (n as u64).min(left) as u32;
        let first = self.last_seq.wrapping_add(1);
        self.last_seq += count as u64;
        SeqReservation { first, count }
    }

    /// The prebuilt outer IP + UDP header.
    #[inline]
    pub fn outer_template(&self) -> &[u8] {
        &self.template[..self.template_len as usize]
    }

    /// Next IPv4 identification value for the outer header.
    #[inline]
    pub fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Whether the key is AES-256.
    pub fn algorithm(&self) -> espada_crypto::Algorithm {
        self.cipher.algorithm()
    }
}

/// The receiving half of an SA.
pub struct InboundSa {
    /// Our SPI.
    pub spi: u32,
    /// Key schedule.
    pub cipher: Cipher,
    /// Anti-replay window (its `esn()` says whether ESN is on).
    pub window: ReplayWindow,
    /// Counters.
    pub counters: SaCounters,
}

impl core::fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("cipher", &self.cipher)
            .field("window", &self.window)
            .finish()
    }
}

impl InboundSa {
    /// A new inbound SA with an empty window of `window` packets.
    pub fn new(spi: u32, cipher: Cipher, esn: bool, window: u32) -> Self {
        InboundSa {
            spi,
            cipher,
            window: ReplayWindow::new(window, esn),
            counters: SaCounters::default(),
        }
    }

    /// Whether ESN is on.
    pub fn esn(&self) -> bool {
        self.window.esn()
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use espada_crypto::{Algorithm, Backend, KeyMaterial};

    fn cipher() -> Cipher {
        Cipher::new(
            Backend::Ring,
            &KeyMaterial::new(Algorithm::AesGcm128, &[1; 20]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn sequence_starts_at_one_and_never_cycles() {
        let t = TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut sa = OutboundSa::new(1, cipher(), false, t);
        assert_eq!(sa.reserve(4), SeqReservation { first: 1, count: 4 });
        assert_eq!(sa.reserve(2), SeqReservation { first: 5, count: 2 });
        let mut sa = OutboundSa::new(1, cipher(), false, t).with_last_seq(u32::MAX as u64 - 3);
        assert_eq!(sa.reserve(32).count, 3);
        assert_eq!(sa.reserve(32).count, 0);
        assert_eq!(sa.last_seq(), u32::MAX as u64);
        // ESN goes past 2^32 and stops at 2^64-1.
        let mut sa = OutboundSa::new(1, cipher(), true, t).with_last_seq(u32::MAX as u64 - 1);
        assert_eq!(
            sa.reserve(4),
            SeqReservation {
                first: u32::MAX as u64,
                count: 4
            }
        );
        let mut sa = OutboundSa::new(1, cipher(), true, t).with_last_seq(u64::MAX - 1);
        assert_eq!(sa.reserve(4).count, 1);
        assert_eq!(sa.reserve(4).count, 0);
    }

    #[test]
    fn templates() {
        let t = TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let sa = OutboundSa::new(1, cipher(), false, t);
        let tpl = sa.outer_template();
        assert_eq!(tpl.len(), 28);
        let ip = ipv4::Packet::new_unchecked(tpl);
        assert_eq!(ip.protocol(), 17);
        assert_eq!(ip.ttl(), 64);
        let u = udp::Packet::new_unchecked(&tpl[20..]);
        assert_eq!((u.src_port(), u.dst_port()), (4500, 4500));
        let t6 = TunnelEndpoints::new(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        );
        let sa6 = OutboundSa::new(1, cipher(), false, t6);
        assert_eq!(sa6.outer_template().len(), 48);
        assert_eq!(
            ipv6::Packet::new_unchecked(sa6.outer_template()).next_header(),
            17
        );
        assert!(!format!("{sa6:?}").contains("0101"));
    }
}
