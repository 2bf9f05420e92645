//! Neighbor (ARP) table shared by the workers of one gateway: read lock-free on the fast path
//! (an `arc-swap` snapshot, and each worker's [`NeighborCache`] in front of it), written rarely.
//!
//! Poisoning is refused (RFC 826 trusts whoever speaks; a gateway must not): an entry is learned
//! only from a *reply to a request this gateway sent* (within [`SOLICIT_WINDOW`]); gratuitous and
//! unsolicited ARP change nothing; configured (`[[neighbor]]`) entries are never overridden; an
//! entry's MAC changes at most once per [`CHANGE_HOLD`]; the table holds at most [`MAX_ENTRIES`]
//! learned entries; entries not confirmed for [`MAX_AGE`] are forgotten (the next packet to them
//! asks again), and entries still there [`REFRESH_BEFORE`] ahead of that are asked for again
//! ([`NeighborTable::take_refresh`]), so a neighbor in use never ages out. Every refusal is
//! counted.
//!
//! A request (ARP request, neighbor solicitation) from an on-link address only makes a
//! *provisional* entry, kept apart from the learned ones (at most [`MAX_PROVISIONAL`], the
//! oldest going first, at most [`PROVISIONAL_PER_SEC`] new ones a second, each for
//! [`PROVISIONAL_AGE`]): it lets the gateway answer the asker's traffic at once (as RFC 826
//! has it), and the gateway asks that address itself. A solicited answer always replaces a
//! provisional entry, so requests from invented sources can neither fill the table nor keep
//! the real neighbor's answer out.

use arc_swap::ArcSwap;
use espada_wire::arp;
use espada_wire::ethernet::{self, MacAddr};
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after our request a reply is accepted.
pub const SOLICIT_WINDOW: Duration = Duration::from_secs(3);
/// Least time between two changes of one entry's MAC.
pub const CHANGE_HOLD: Duration = Duration::from_secs(1);
/// Most learned entries.
pub const MAX_ENTRIES: usize = 4096;
/// Learned entries not confirmed for this long are forgotten.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Learned entries are asked for again this long before they would age out.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// Most provisional entries (made by requests).
pub const MAX_PROVISIONAL: usize = 256;
/// New provisional entries a second, at most.
pub const PROVISIONAL_PER_SEC: u32 = 64;
/// A provisional entry lives this long unless a solicited answer makes it a learned one.
pub const PROVISIONAL_AGE: Duration = Duration::from_secs(30);

/// What became of an ARP reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// New entry, or a new MAC for a known address.
    Learned,
    /// Same MAC as before: the entry's age restarts.
    Confirmed,
    /// Nobody asked (gratuitous or unsolicited reply): ignored.
    Unsolicited,
    /// The address has a configured entry: ignored.
    Static,
    /// The entry changed less than [`CHANGE_HOLD`] ago: ignored.
    TooSoon,
    /// [`MAX_ENTRIES`] learned entries already: ignored.
    Full,
    /// Broadcast, multicast or zero MAC: ignored.
    BadMac,
    /// A request made a provisional entry: ask the address to confirm it.
    Provisional,
    /// More new provisional entries this second than [`PROVISIONAL_PER_SEC`]: ignored.
    Limited,
}

/// Counters of the table (control path).
#[derive(Debug, Default)]
pub struct NeighborCounters {
    /// Entries learned or changed.
    pub learned: AtomicU64,
    /// Replies nobody asked for.
    pub unsolicited: AtomicU64,
    /// Replies for configured addresses.
    pub static_kept: AtomicU64,
    /// Changes refused by the hold time.
    pub too_soon: AtomicU64,
    /// Replies refused because the table is full.
    pub full: AtomicU64,
    /// Entries forgotten by age.
    pub expired: AtomicU64,
    /// Provisional entries made by requests.
    pub provisional: AtomicU64,
    /// Requests that made no provisional entry (rate limit).
    pub limited: AtomicU64,
    /// Provisional entries pushed out by newer ones.
    pub evicted: AtomicU64,
    /// Learned entries asked for again before they aged out.
    pub refreshed: AtomicU64,
}

/// An address family the neighbor table holds: IPv4 (learned through ARP) or IPv6 (through
/// neighbor discovery, RFC 4861). The same rules hold for both.
pub trait NeighborAddr: Copy + Eq + Hash + Ord + Debug + Send + Sync + 'static {
    /// The key of a worker's cache slot; the unspecified address (never a next hop) maps to
    /// zero, which marks an empty slot.
    fn key(self) -> u128;
}

impl NeighborAddr for Ipv4Addr {
    #[inline(always)]
    fn key(self) -> u128 {
        u32::from(self) as u128
    }
}

impl NeighborAddr for Ipv6Addr {
    #[inline(always)]
    fn key(self) -> u128 {
        u128::from(self)
    }
}

#[derive(Debug)]
struct Bookkeeping<A> {
    /// Outstanding requests: address → when we last asked.
    asked: HashMap<A, Instant>,
    /// Learned entries: address → (last confirmed, last changed).
    learned: HashMap<A, (Instant, Instant)>,
    /// Provisional entries: address → (MAC, made).
    provisional: HashMap<A, (MacAddr, Instant)>,
    /// The second the provisional rate limit counts in, and how many were made in it.
    prov_second: Option<(Instant, u32)>,
    /// Learned entries due to be asked for again (taken by a worker).
    refresh: Vec<A>,
}

impl<A> Default for Bookkeeping<A> {
    fn default() -> Self {
        Bookkeeping {
            asked: HashMap::new(),
            learned: HashMap::new(),
            provisional: HashMap::new(),
            prov_second: None,
            refresh: Vec::new(),
        }
    }
}

/// IP → MAC, shared by every worker of a gateway: `NeighborTable` (IPv4, ARP) or
/// `NeighborTable<Ipv6Addr>` (IPv6, neighbor discovery).
#[derive(Debug)]
pub struct NeighborTable<A = Ipv4Addr> {
    map: ArcSwap<HashMap<A, MacAddr>>,
    /// Provisional entries (small, apart: making one never copies the learned table).
    prov: ArcSwap<HashMap<A, MacAddr>>,
    statics: HashMap<A, MacAddr>,
    book: Mutex<Bookkeeping<A>>,
    generation: AtomicU64,
    /// What became of the ARP replies seen.
    pub counters: NeighborCounters,
}

impl<A: NeighborAddr> Default for NeighborTable<A> {
    fn default() -> Self {
        NeighborTable {
            map: ArcSwap::from_pointee(HashMap::new()),
            prov: ArcSwap::from_pointee(HashMap::new()),
            statics: HashMap::new(),
            book: Mutex::new(Bookkeeping::default()),
            generation: AtomicU64::new(0),
            counters: NeighborCounters::default(),
        }
    }
}

impl<A: NeighborAddr> NeighborTable<A> {
    /// A table with configured entries (never overridden).
    pub fn new(static_entries: &[(A, MacAddr)]) -> Arc<NeighborTable<A>> {
        let statics: HashMap<_, _> = static_entries.iter().copied().collect();
        let t = NeighborTable {
            statics: statics.clone(),
            ..Default::default()
        };
        t.map.store(Arc::new(statics));
        Arc::new(t)
    }

    /// Looks up a MAC: a learned or configured entry, else a provisional one.
    #[inline]
    pub fn get(&self, ip: A) -> Option<MacAddr> {
        match self.map.load().get(&ip) {
            Some(m) => Some(*m),
            None => self.prov.load().get(&ip).copied(),
        }
    }

    fn publish_prov(&self, b: &Bookkeeping<A>) {
        self.prov.store(Arc::new(
            b.provisional.iter().map(|(a, (m, _))| (*a, *m)).collect(),
        ));
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Bookkeeping<A>> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that this gateway asked for `ip` (a worker sent an ARP request; rate-limited
    /// there, so this lock is taken at most a few times a second per address).
    pub fn asked(&self, ip: A, now: Instant) {
        let mut b = self.book();
        if b.asked.len() >= MAX_ENTRIES {
            b.asked
                .retain(|_, t| now.duration_since(*t) < SOLICIT_WINDOW);
        }
        if b.asked.len() < MAX_ENTRIES {
            b.asked.insert(ip, now);
        }
    }

    /// An ARP reply from `ip` at `mac` (control path: the table is copied only on a change).
    pub fn learn_reply(&self, ip: A, mac: MacAddr, now: Instant) -> Learn {
        let c = &self.counters;
        if mac.is_multicast() || mac == MacAddr::ZERO {
            return Learn::BadMac;
        }
        if self.statics.contains_key(&ip) {
            c.static_kept.fetch_add(1, Ordering::Relaxed);
            return Learn::Static;
        }
        let mut b = self.book();
        let solicited = b
            .asked
            .get(&ip)
            .is_some_and(|t| now.duration_since(*t) < SOLICIT_WINDOW);
        if !solicited {
            c.unsolicited.fetch_add(1, Ordering::Relaxed);
            return Learn::Unsolicited;
        }
        // A solicited answer always replaces a provisional entry (a request may have come
        // from anyone).
        if b.provisional.remove(&ip).is_some() {
            self.publish_prov(&b);
        }
        let current = self.map.load().get(&ip).copied();
        if current == Some(mac) {
            if let Some(e) = b.learned.get_mut(&ip) {
                e.0 = now;
            }
            b.asked.remove(&ip);
            return Learn::Confirmed;
        }
        if current.is_some() {
            if let Some((_, changed)) = b.learned.get(&ip) {
                if now.duration_since(*changed) < CHANGE_HOLD {
                    c.too_soon.fetch_add(1, Ordering::Relaxed);
                    return Learn::TooSoon;
                }
            }
        } else if b.learned.len() >= MAX_ENTRIES {
            c.full.fetch_add(1, Ordering::Relaxed);
            return Learn::Full;
        }
        b.asked.remove(&ip);
        self.insert_learned(&mut b, ip, mac, now)
    }

    /// Publishes a learned entry (a new snapshot; workers see the new generation).
    fn insert_learned(&self, b: &mut Bookkeeping<A>, ip: A, mac: MacAddr, now: Instant) -> Learn {
        b.learned.insert(ip, (now, now));
        let mut m = (**self.map.load()).clone();
        m.insert(ip, mac);
        self.map.store(Arc::new(m));
        self.generation.fetch_add(1, Ordering::Release);
        self.counters.learned.fetch_add(1, Ordering::Relaxed);
        Learn::Learned
    }

    /// An ARP request (or neighbor solicitation) for one of our addresses from the on-link
    /// address `ip` at `mac`. As RFC 826 has it, the asker gets an entry when it has none, so
    /// that the answer to its traffic needs no lookup of our own, but only a provisional one
    /// (see the module): it never changes an entry, never a configured one, never fills the
    /// learned table, and a solicited answer replaces it. On [`Learn::Provisional`] the caller
    /// asks `ip` itself.
    pub fn learn_request(&self, ip: A, mac: MacAddr, now: Instant) -> Learn {
        if mac.is_multicast() || mac == MacAddr::ZERO {
            return Learn::BadMac;
        }
        if self.statics.contains_key(&ip) {
            return if self.statics[&ip] == mac {
                Learn::Confirmed
            } else {
                self.counters.static_kept.fetch_add(1, Ordering::Relaxed);
                Learn::Static
            };
        }
        if let Some(m) = self.get(ip) {
            return if m == mac {
                Learn::Confirmed
            } else {
                self.counters.unsolicited.fetch_add(1, Ordering::Relaxed);
                Learn::Unsolicited
            };
        }
        let mut b = self.book();
        let (start, n) = match b.prov_second {
            Some((t, n)) if now.duration_since(t) < Duration::from_secs(1) => (t, n),
            _ => (now, 0),
        };
        if n >= PROVISIONAL_PER_SEC {
            self.counters.limited.fetch_add(1, Ordering::Relaxed);
            return Learn::Limited;
        }
        b.prov_second = Some((start, n + 1));
        if b.provisional.len() >= MAX_PROVISIONAL {
            let oldest = b
                .provisional
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(a, _)| *a);
            if let Some(a) = oldest {
                b.provisional.remove(&a);
                self.counters.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        b.provisional.insert(ip, (mac, now));
        self.publish_prov(&b);
        self.counters.provisional.fetch_add(1, Ordering::Relaxed);
        Learn::Provisional
    }

    /// Learned entries due to be asked for again (at most `max`; each once per round): a worker
    /// sends them requests, and the solicited answers restart their age.
    pub fn take_refresh(&self, max: usize) -> Vec<A> {
        let mut b = self.book();
        let n = b.refresh.len().min(max);
        let out: Vec<A> = b.refresh.drain(..n).collect();
        self.counters
            .refreshed
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }

    /// Forgets learned entries not confirmed for [`MAX_AGE`] (call from the control loop).
    /// Returns how many went.
    pub fn expire(&self, now: Instant) -> usize {
        let mut b = self.book();
        b.asked
            .retain(|_, t| now.duration_since(*t) < SOLICIT_WINDOW);
        let before = b.provisional.len();
        b.provisional
            .retain(|_, (_, t)| now.duration_since(*t) < PROVISIONAL_AGE);
        if b.provisional.len() != before {
            self.publish_prov(&b);
        }
        // Entries close to their age are asked for again (once per round: the request is
        // outstanding until answered or the window ends).
        let due: Vec<A> = b
            .learned
            .iter()
            .filter(|(ip, (seen, _))| {
                let age = now.duration_since(*seen);
                age + REFRESH_BEFORE >= MAX_AGE && age < MAX_AGE && !b.asked.contains_key(*ip)
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            if !b.refresh.contains(&ip) {
                b.refresh.push(ip);
            }
        }
        let old: Vec<A> = b
            .learned
            .iter()
            .filter(|(_, (seen, _))| now.duration_since(*seen) >= MAX_AGE)
            .map(|(ip, _)| *ip)
            .collect();
        if old.is_empty() {
            return 0;
        }
        let mut m = (**self.map.load()).clone();
        for ip in &old {
            b.learned.remove(ip);
            b.refresh.retain(|r| r != ip);
            m.remove(ip);
        }
        self.map.store(Arc::new(m));
        self.generation.fetch_add(1, Ordering::Release);
        self.counters
            .expired
            .fetch_add(old.len() as u64, Ordering::Relaxed);
        old.len()
    }

    /// Every entry (address, MAC, configured?) for reports, sorted by address.
    pub fn entries(&self) -> Vec<(A, MacAddr, bool)> {
        let mut v: Vec<_> = self
            .map
            .load()
            .iter()
            .chain(self.prov.load().iter())
            .map(|(ip, m)| (*ip, *m, self.statics.contains_key(ip)))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }

    /// Increases with every change: a worker's [`NeighborCache`] checks it once per burst.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of entries (provisional ones included).
    pub fn len(&self) -> usize {
        self.map.load().len() + self.prov.load().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A worker's private copy of the next hops it uses, so the fast path neither loads the shared
/// snapshot nor hashes per packet: a few direct-mapped slots, emptied whenever the shared
/// table's generation moves (checked once per burst).
#[derive(Debug)]
pub struct NeighborCache<A = Ipv4Addr> {
    slots: [(u128, MacAddr); NEIGHBOR_CACHE_SLOTS],
    generation: u64,
    _family: std::marker::PhantomData<A>,
}

const NEIGHBOR_CACHE_SLOTS: usize = 16;

impl<A> Default for NeighborCache<A> {
    fn default() -> Self {
        NeighborCache {
            slots: [(0, MacAddr::ZERO); NEIGHBOR_CACHE_SLOTS],
            generation: u64::MAX,
            _family: std::marker::PhantomData,
        }
    }
}

impl<A: NeighborAddr> NeighborCache<A> {
    /// Forgets everything if `table` changed since the last call; `true` when it did.
    #[inline]
    pub fn sync(&mut self, table: &NeighborTable<A>) -> bool {
        let g = table.generation();
        if g != self.generation {
            self.slots = [(0, MacAddr::ZERO); NEIGHBOR_CACHE_SLOTS];
            self.generation = g;
            return true;
        }
        false
    }

    /// The MAC of `ip`, from the cache or else from `table` (then cached).
    #[inline(always)]
    pub fn get(&mut self, table: &NeighborTable<A>, ip: A) -> Option<MacAddr> {
        let k = ip.key();
        // 0.0.0.0 and :: are never next hops, so zero marks an empty slot.
        let slot = ((k ^ (k >> 8)) as usize) % NEIGHBOR_CACHE_SLOTS;
        let e = &mut self.slots[slot];
        if e.0 == k && k != 0 {
            return Some(e.1);
        }
        let mac = table.get(ip)?;
        *e = (k, mac);
        Some(mac)
    }
}

/// Writes an Ethernet + ARP frame into `buf` (42 bytes).
pub fn emit_arp(buf: &mut [u8], src_mac: MacAddr, dst_mac: MacAddr, r: &arp::Repr) {
    let mut eth = ethernet::Frame::new_unchecked(&mut buf[..]);
    eth.set_dst_addr(dst_mac);
    eth.set_src_addr(src_mac);
    eth.set_ethertype(ethernet::ethertype::ARP);
    r.emit(&mut arp::Packet::new_unchecked(
        &mut buf[ethernet::HEADER_LEN..],
    ));
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn learn_and_lookup() {
        let t = NeighborTable::new(&[("10.0.0.1".parse().unwrap(), MacAddr([2, 0, 0, 0, 0, 1]))]);
        let now = Instant::now();
        assert_eq!(
            t.get("10.0.0.1".parse().unwrap()),
            Some(MacAddr([2, 0, 0, 0, 0, 1]))
        );
        let ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
        assert_eq!(t.get(ip), None);
        // Unsolicited: ignored. Asked for: learned.
        assert_eq!(
            t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 2]), now),
            Learn::Unsolicited
        );
        t.asked(ip, now);
        assert_eq!(
            t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 2]), now),
            Learn::Learned
        );
        assert_eq!(t.learn_reply(ip, MacAddr::BROADCAST, now), Learn::BadMac);
        assert_eq!(t.len(), 2);
        // A worker's cache follows changes of the table.
        let mut c = NeighborCache::default();
        c.sync(&t);
        assert_eq!(c.get(&t, ip), Some(MacAddr([2, 0, 0, 0, 0, 2])));
        // A change needs a new request, and not within the hold time.
        let later = now + CHANGE_HOLD / 2;
        assert_eq!(
            t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 9]), later),
            Learn::Unsolicited
        );
        t.asked(ip, later);
        assert_eq!(
            t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 9]), later),
            Learn::TooSoon
        );
        let much_later = now + CHANGE_HOLD * 2;
        t.asked(ip, much_later);
        assert_eq!(
            t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 9]), much_later),
            Learn::Learned
        );
        assert_eq!(
            c.get(&t, ip),
            Some(MacAddr([2, 0, 0, 0, 0, 2])),
            "until the next sync"
        );
        c.sync(&t);
        assert_eq!(c.get(&t, ip), Some(MacAddr([2, 0, 0, 0, 0, 9])));
        assert_eq!(c.get(&t, "10.0.0.7".parse().unwrap()), None);
    }

    #[test]
    fn configured_entries_are_never_overridden_and_old_ones_age_out() {
        let s: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let t = NeighborTable::new(&[(s, MacAddr([2, 0, 0, 0, 0, 1]))]);
        let now = Instant::now();
        t.asked(s, now);
        assert_eq!(
            t.learn_reply(s, MacAddr([2, 0, 0, 0, 6, 6]), now),
            Learn::Static
        );
        assert_eq!(t.get(s), Some(MacAddr([2, 0, 0, 0, 0, 1])));
        let ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
        t.asked(ip, now);
        t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 2]), now);
        assert_eq!(t.expire(now + MAX_AGE / 2), 0);
        assert_eq!(t.expire(now + MAX_AGE), 1);
        assert_eq!(t.get(ip), None);
        assert_eq!(
            t.get(s),
            Some(MacAddr([2, 0, 0, 0, 0, 1])),
            "configured entries stay"
        );
        assert_eq!(t.counters.static_kept.load(Ordering::Relaxed), 1);
        assert_eq!(t.counters.expired.load(Ordering::Relaxed), 1);
        // A request creates a missing entry (provisional) but never changes one.
        let r: Ipv4Addr = "10.0.0.3".parse().unwrap();
        assert_eq!(
            t.learn_request(r, MacAddr([2, 0, 0, 0, 0, 3]), now),
            Learn::Provisional
        );
        assert_eq!(
            t.learn_request(r, MacAddr([2, 0, 0, 0, 6, 6]), now),
            Learn::Unsolicited
        );
        assert_eq!(
            t.learn_request(s, MacAddr([2, 0, 0, 0, 6, 6]), now),
            Learn::Static
        );
        assert_eq!(t.get(r), Some(MacAddr([2, 0, 0, 0, 0, 3])));
    }

    /// Issue 24 ("also found"): a request no longer pre-empts the real neighbor. The attacker's
    /// request makes a provisional entry; the real neighbor's solicited answer replaces it at
    /// once (it used to be refused as `TooSoon`).
    #[test]
    fn a_solicited_answer_replaces_what_a_request_made() {
        let t = NeighborTable::new(&[]);
        let now = Instant::now();
        let ip: Ipv4Addr = "10.0.0.9".parse().unwrap();
        let evil = MacAddr([2, 0, 0, 0, 0x66, 6]);
        let real = MacAddr([2, 0, 0, 0, 0, 9]);
        assert_eq!(t.learn_request(ip, evil, now), Learn::Provisional);
        assert_eq!(t.get(ip), Some(evil), "usable at once (RFC 826)");
        t.asked(ip, now);
        assert_eq!(t.learn_reply(ip, real, now), Learn::Learned);
        assert_eq!(t.get(ip), Some(real));
        // And a later request from elsewhere changes nothing.
        assert_eq!(t.learn_request(ip, evil, now), Learn::Unsolicited);
        assert_eq!(t.get(ip), Some(real));
    }

    /// A flood of requests from invented sources (about 7 a second used to keep the table full
    /// for good) cannot keep the next hop from being learned: provisional entries are bounded,
    /// rate-limited, age out, and never count against the learned table.
    #[test]
    fn a_request_flood_never_fills_the_table() {
        let t = NeighborTable::new(&[]);
        let t0 = Instant::now();
        let mut made = 0;
        for s in 0..120u64 {
            for i in 0..100u32 {
                let ip = Ipv4Addr::from(0x0a00_0000 + (s as u32) * 100 + i);
                let now = t0 + Duration::from_secs(s);
                if t.learn_request(ip, MacAddr([2, 0, 0, 1, 0, 1]), now) == Learn::Provisional {
                    made += 1;
                }
            }
            t.expire(t0 + Duration::from_secs(s));
            assert!(t.len() <= MAX_PROVISIONAL, "{}", t.len());
        }
        assert!(made <= 120 * PROVISIONAL_PER_SEC as usize);
        assert!(t.counters.limited.load(Ordering::Relaxed) > 0);
        // The gateway's next hop is still learned the moment it answers.
        let hop: Ipv4Addr = "192.168.100.2".parse().unwrap();
        let now = t0 + Duration::from_secs(120);
        t.asked(hop, now);
        assert_eq!(
            t.learn_reply(hop, MacAddr([2, 0, 0, 0, 0, 2]), now),
            Learn::Learned
        );
        // Provisional entries go by themselves.
        t.expire(now + PROVISIONAL_AGE);
        assert_eq!(t.len(), 1);
    }

    /// An entry in use is asked for again before it ages out; its answer restarts its age.
    #[test]
    fn learned_entries_are_refreshed_before_they_age_out() {
        let t = NeighborTable::new(&[]);
        let t0 = Instant::now();
        let ip: Ipv4Addr = "10.0.0.2".parse().unwrap();
        t.asked(ip, t0);
        t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 2]), t0);
        t.expire(t0 + MAX_AGE / 2);
        assert!(t.take_refresh(16).is_empty(), "not due yet");
        let due = t0 + MAX_AGE - REFRESH_BEFORE / 2;
        t.expire(due);
        assert_eq!(t.take_refresh(16), vec![ip]);
        t.asked(ip, due);
        assert_eq!(
            t.learn_reply(ip, MacAddr([2, 0, 0, 0, 0, 2]), due),
            Learn::Confirmed
        );
        assert_eq!(
            t.expire(t0 + MAX_AGE + Duration::from_secs(1)),
            0,
            "still there"
        );
        assert_eq!(t.get(ip), Some(MacAddr([2, 0, 0, 0, 0, 2])));
    }
}
