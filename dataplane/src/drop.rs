//! Every reason espada drops a packet. Each dropped packet increments exactly one counter.

use core::fmt;

macro_rules! drop_reasons {
    ($( $(#[$doc:meta])* $name:ident => $label:literal, )*) => {
        /// Why a packet was dropped. The only source of drop counters (VPP-style error list).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason {
            $( $(#[$doc])* $name, )*
        }

        impl DropReason {
            /// All reasons, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons.
            pub const COUNT: usize = DropReason::ALL.len();
            /// Stable short name used in reports, JSON and vector files (`drop:<label>`).
            pub const fn label(self) -> &'static str {
                match self { $(DropReason::$name => $label,)* }
            }
        }
    };
}

drop_reasons! {
    /// Outer header, UDP or ESP header too short or inconsistent.
    Malformed => "malformed",
    /// No inbound SA has this SPI.
    NoSa => "no-sa",
    /// Duplicate, too old, or an ESN high half that cannot be inferred (RFC 4303 §3.4.3).
    Replay => "replay",
    /// The ICV did not verify (forged, corrupted, or a wrong ESN guess: RFC 4303 A2.2).
    Integrity => "integrity",
    /// Authentic, but the padding bytes are not 1, 2, 3, … (RFC 4303 §2.4).
    Padding => "padding",
    /// Authentic TFC dummy packet, next header 59 (RFC 4303 §2.6): discarded silently.
    Dummy => "dummy",
    /// RFC 3948 §2.3 NAT-keepalive (a single 0xFF byte): discarded silently.
    Keepalive => "keepalive",
    /// Authentic, but the next header is neither 4 (IPv4) nor 41 (IPv6).
    NextHeader => "next-header",
    /// The (inner) IP packet is not a valid IPv4/IPv6 packet.
    InnerMalformed => "inner-malformed",
    /// The sequence number space of the SA is exhausted (RFC 4303 §3.3.3: never cycle).
    SeqCycled => "seq-cycled",
    /// The buffer has no room in front for the outer headers.
    NoHeadroom => "no-headroom",
    /// The buffer has no room behind for the trailer and ICV.
    NoTailroom => "no-tailroom",
    /// The encapsulated packet would exceed 65535 bytes.
    TooBig => "too-big",
    /// Red side: no SPD policy matches (RFC 4301: unmatched traffic is dropped).
    NoPolicy => "no-policy",
    /// Red side: a discard policy matched.
    PolicyDiscard => "policy-discard",
    /// Black side: the decrypted inner packet is outside the tunnel's selectors.
    PolicyMismatch => "policy-mismatch",
    /// The tunnel has no usable outbound SA left (hard lifetime, fallback too): never sent in
    /// the clear.
    NoOutboundSa => "no-outbound-sa",
    /// The inbound SA reached its hard lifetime.
    SaExpired => "sa-expired",
    /// Inner TTL / hop limit would reach zero.
    TtlExpired => "ttl-expired",
    /// Encapsulated packet exceeds the black MTU (an ICMP "fragmentation needed" / "packet too
    /// big" goes back when DF is set).
    MtuExceeded => "mtu-exceeded",
    /// Not addressed to this gateway (black side), or an EtherType / protocol espada does not
    /// forward.
    NotForUs => "not-for-us",
    /// The next hop's MAC address is not known yet (an ARP request went out).
    NoNeighbor => "no-neighbor",
    /// Held for a next hop being resolved, but its hold queue was full (a few packets per
    /// neighbor, as the kernel's `unres_qlen`).
    NeighborHoldFull => "neighbor-hold-full",
    /// The owning core's handoff queue was full.
    HandoffFull => "handoff-full",
    /// The port did not take the packet (transmit ring full after bounded retries).
    TxFull => "tx-full",
    /// The control-path queue (IKE) was full.
    ControlFull => "control-full",
    /// No packet buffer was free.
    NoBuffer => "no-buffer",
    /// The SA's durably reserved sequence numbers ran out (the state file could not be written
    /// in time): refused rather than risk repeating an AES-GCM nonce after a restart.
    SeqUnreserved => "seq-unreserved",
    /// An outer IPv4 fragment of ESP-in-UDP to us. espada does not reassemble (RFC 4303 §3.4.1
    /// wants reassembly before ESP processing); it sends with DF set so a path never needs to
    /// fragment, and counts what arrives fragmented here.
    Fragment => "fragment",
    /// Decapsulation: the outer header says Congestion Experienced but the inner packet is
    /// not ECN-capable (RFC 6040 §4.2: drop).
    EcnNotEct => "ecn-ce-not-ect",
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl DropReason {
    /// Parses a label.
    pub fn from_label(s: &str) -> Option<DropReason> {
        DropReason::ALL.iter().copied().find(|r| r.label() == s)
    }
}

/// One counter per reason; owned by one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCounters {
    counts: [u64; DropReason::COUNT],
}

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters {
            counts: [0; DropReason::COUNT],
        }
    }
}

impl DropCounters {
    /// Counts one drop.
    #[inline(always)]
    pub fn inc(&mut self, r: DropReason) {
        self.counts[r as usize] += 1;
    }
    /// Adds `n` drops of one reason.
    #[inline]
    pub fn add(&mut self, r: DropReason, n: u64) {
        self.counts[r as usize] += n;
    }
    /// The count for one reason.
    pub fn get(&self, r: DropReason) -> u64 {
        self.counts[r as usize]
    }
    /// All drops.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// Adds another set of counters (aggregating workers).
    pub fn merge(&mut self, o: &DropCounters) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
    }
    /// Non-zero counters with their reasons.
    pub fn nonzero(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn labels_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in DropReason::ALL {
            assert!(seen.insert(r.label()));
            assert_eq!(DropReason::from_label(r.label()), Some(*r));
        }
    }

    #[test]
    fn counters() {
        let mut c = DropCounters::default();
        c.inc(DropReason::Replay);
        c.inc(DropReason::Replay);
        c.inc(DropReason::NoSa);
        let mut d = DropCounters::default();
        d.merge(&c);
        assert_eq!(d.get(DropReason::Replay), 2);
        assert_eq!(d.total(), 3);
        assert_eq!(d.nonzero().count(), 2);
    }
}
