//! The SA database: RFC 9611 per-CPU SA groups per tunnel, published to workers as immutable
//! snapshots (RCU style, with `arc-swap`), and the per-core runtime state each worker builds
//! from them.
//!
//! * Control plane: builds an [`SaDb`], publishes it with [`SaDbHandle::publish`]. Adding,
//!   deleting and rekeying SAs is "clone the snapshot, change it, publish"; workers never wait.
//! * Worker: keeps a [`CoreSas`]; once per burst it calls [`CoreSas::sync`], which costs one
//!   atomic load when nothing changed. Runtime state (sequence counters, replay windows,
//!   counters, lifetimes) survives snapshot changes: it is keyed by SPI.
//!
//! Ownership (style rule 5): a per-CPU SA belongs to exactly one worker. The fallback SA (not
//! bound to a CPU, RFC 9611 §2) and the single SA of `sa_mode = "shared"` are used by several
//! workers: their sequence counter is an atomic and their replay window is behind a mutex, on
//! purpose, so that the kernel-like contention can be measured beside the per-CPU mode.

use crate::lifetime::{LifetimeTracker, Lifetimes, Stage};
use crate::replay::ReplayWindow;
use crate::sa::{InboundSa, OutboundSa, SaCounters, SendOrder, TunnelEndpoints};
use crate::selector::{Prefix, Spd};
use crate::seqguard::SeqGuard;
use crate::spimap::SpiMap;
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use espada_crypto::{Backend, Cipher, KeyMaterial};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Per-CPU SAs or one shared SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaMode {
    /// One SA per worker core (RFC 9611) plus the fallback SA.
    #[default]
    PerCpu,
    /// One SA used by every core (atomic sequence counter, locked replay window).
    Shared,
}

impl SaMode {
    /// Config name.
    pub fn name(self) -> &'static str {
        match self {
            SaMode::PerCpu => "pcpu",
            SaMode::Shared => "shared",
        }
    }
}

/// The sequence counter of one outbound key, and who holds it.
///
/// RFC 4106 §3: the nonce is salt ‖ IV and the IV is the sequence number, so one key must
/// never see one sequence number twice ("the same nonce ... MUST NOT be used twice with the
/// same key", §8.1). The rule has one owner: every outbound SA built from a published snapshot
/// counts on the one `OutState` of its key, which the [`SaDbHandle`]'s counter book hands out
/// (see [`CounterBook`]). A per-CPU SA's counter is touched by one core only (its claim), so
/// the atomic stays in that core's cache; the fallback SA's is shared by design.
#[derive(Debug)]
pub struct OutState {
    /// The last sequence number handed out under this key.
    seq: Arc<AtomicU64>,
    /// The core that holds this per-CPU SA, or `usize::MAX`: a per-CPU SA is used by one
    /// worker at a time, and handed over only after that worker has let go.
    owner: AtomicUsize,
    /// The SA reached its hard lifetime on some core: no core sends on it again.
    expired: AtomicBool,
    /// When a worker last saw this SA carry a packet (UNIX seconds, 0: never; published a few
    /// times a second, not per packet).
    last_use: AtomicU64,
    /// Wire order of this key's packets when several cores send on it ([`SendOrder`]).
    order: Arc<SendOrder>,
}

impl OutState {
    fn new() -> Arc<OutState> {
        Arc::new(OutState {
            seq: Arc::new(AtomicU64::new(0)),
            owner: AtomicUsize::new(usize::MAX),
            expired: AtomicBool::new(false),
            last_use: AtomicU64::new(0),
            order: Arc::new(SendOrder::default()),
        })
    }

    /// When a worker last saw this SA carry a packet (UNIX seconds; 0: never).
    pub fn last_use(&self) -> u64 {
        self.last_use.load(Ordering::Relaxed)
    }

    /// A worker saw this SA carry packets at `unix` (seconds).
    pub fn note_use(&self, unix: u64) {
        self.last_use.fetch_max(unix, Ordering::Relaxed);
    }

    /// The last sequence number handed out under this key.
    pub fn last_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Whether some core saw this SA reach its hard lifetime.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }
}

/// A worker's claim on an outbound per-CPU SA; released when the runtime state goes.
struct Claim {
    state: Arc<OutState>,
    core: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = self.state.owner.compare_exchange(
            self.core,
            usize::MAX,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Claim(core {})", self.core)
    }
}

/// A fingerprint of keying material (key ‖ salt): the first 16 bytes of
/// HMAC-SHA-256(key ‖ salt, "espada-seq"). It names a key in the SA database's counter book
/// and in the state file without revealing it; equal fingerprints mean the same key.
pub fn key_fingerprint(key: &KeyMaterial) -> u128 {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose_key_and_salt());
    let tag = ring::hmac::sign(&k, b"espada-seq");
    let mut b = [0u8; 16];
    b.copy_from_slice(&tag.as_ref()[..16]);
    u128::from_be_bytes(b)
}

/// One SA as the control plane describes it (immutable once published).
#[derive(Debug, Clone)]
pub struct SaSpec {
    /// SPI.
    pub spi: u32,
    /// Keying material (key ‖ salt).
    pub key: KeyMaterial,
    /// Extended sequence numbers.
    pub esn: bool,
    /// Replay window (inbound).
    pub replay_window: u32,
    /// Lifetimes.
    pub lifetimes: Lifetimes,
    /// Outer header (outbound: ours → peer; the source port is this SA's own port).
    pub endpoints: TunnelEndpoints,
    /// RFC 9611 resource: the CPU index this SA is bound to; `None` for the fallback SA.
    pub cpu: Option<usize>,
    /// Durable sequence reservation (outbound SAs of a gateway with a state directory).
    pub seq_guard: Option<Arc<SeqGuard>>,
    /// Outbound: the last sequence number counted as used before the first packet (0: the
    /// first packet carries 1). For tests of the sequence-space events and ESN wrap.
    pub start_seq: u64,
    /// A slot an IKE daemon has not filled yet (a tunnel with `ike = true`): never used to
    /// send or receive. A worker that would send on it raises an acquire instead (see
    /// [`Acquire`]) and sends on the fallback SA meanwhile, or drops when that one is waiting
    /// too.
    pub awaiting_ike: bool,
    /// The IKE daemon run that installed this SA (0: the configuration): a new daemon run
    /// (charon restarted, `kill -9` included) orphans the SAs of the old one.
    pub daemon: u64,
    /// An inbound SA of the next `lab_rekey` generation, accepted ahead of the peer's switch
    /// (among the tunnel's `draining` SAs, but not going away: reports say "next").
    pub next_generation: bool,
    /// Outbound, when several cores send on it: keep its packets in sequence order on the
    /// wire ([`SendOrder`]; the tunnel's `shared_sa_order = "wire"`, the default), or let cores
    /// send in parallel (`"parallel"`: only for peers with a wide replay window).
    pub wire_order: bool,
    /// Tests: make this SA's key schedule fail.
    #[cfg(test)]
    pub(crate) fail_key_schedule: bool,
    /// [`key_fingerprint`] of the key: a worker keeps an SA's runtime state across snapshots
    /// only while SPI *and* key stay the same, and the counter book keys counters by it.
    key_id: u128,
    /// Outbound: the counter of this key (the counter book's, once published).
    out: Arc<OutState>,
    /// Inbound, when several workers use the SA: its one replay window.
    window: Arc<Mutex<ReplayWindow>>,
}

impl SaSpec {
    /// A new SA description.
    pub fn new(
        spi: u32,
        key: KeyMaterial,
        esn: bool,
        replay_window: u32,
        lifetimes: Lifetimes,
        endpoints: TunnelEndpoints,
        cpu: Option<usize>,
    ) -> Self {
        let key_id = key_fingerprint(&key);
        SaSpec {
            spi,
            key,
            esn,
            replay_window,
            lifetimes,
            endpoints,
            cpu,
            seq_guard: None,
            start_seq: 0,
            awaiting_ike: false,
            daemon: 0,
            next_generation: false,
            wire_order: true,
            key_id,
            #[cfg(test)]
            fail_key_schedule: false,
            out: OutState::new(),
            // Allocated on first shared use (see `inbound`): ~1 KiB per SA otherwise, for
            // every outbound and per-CPU SA that never uses it.
            window: Arc::new(Mutex::new(ReplayWindow::deferred(esn))),
        }
    }

    /// The key's fingerprint ([`key_fingerprint`]): what the state file and the counter book
    /// know a key by.
    pub fn key_fingerprint(&self) -> u128 {
        self.key_id
    }

    /// The counter this SA sends with (outbound).
    pub fn out_state(&self) -> &Arc<OutState> {
        &self.out
    }

    /// Claims this SA's own counter for `core` (shared SAs need no claim).
    fn claim(&self, core: usize) -> Result<Claim, DbError> {
        match self
            .out
            .owner
            .compare_exchange(usize::MAX, core, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(Claim {
                state: self.out.clone(),
                core,
            }),
            Err(owner) => Err(DbError::Claimed {
                spi: self.spi,
                owner,
                core,
            }),
        }
    }

    /// The runtime SA a worker sends with. It counts on this key's one counter whether or not
    /// other cores use it (`shared` only says whether they may). A placeholder is refused:
    /// nothing is ever sent on a slot the IKE daemon has not filled.
    fn outbound(&self, backend: Backend, shared: bool) -> Result<OutboundSa, DbError> {
        if self.awaiting_ike {
            return Err(DbError::Placeholder(self.spi));
        }
        let key_err = |err| DbError::Key { spi: self.spi, err };
        #[cfg(test)]
        if self.fail_key_schedule {
            return Err(key_err(espada_crypto::KeyError::Backend(
                "injected failure",
            )));
        }
        let sa = OutboundSa::new(
            self.spi,
            Cipher::new(backend, &self.key).map_err(key_err)?,
            self.esn,
            self.endpoints,
        )
        .with_shared_seq(self.out.seq.clone())
        .shared_by_cores(shared)
        .with_send_order((shared && self.wire_order).then(|| self.out.order.clone()));
        let sa = if self.start_seq > sa.last_seq() {
            sa.with_last_seq(self.start_seq)
        } else {
            sa
        };
        Ok(match &self.seq_guard {
            Some(g) => sa.with_seq_guard(g.clone()),
            None => sa,
        })
    }

    fn inbound(
        &self,
        backend: Backend,
        shared: bool,
    ) -> Result<InboundSa, espada_crypto::KeyError> {
        let sa = InboundSa::new(
            self.spi,
            Cipher::new(backend, &self.key)?,
            self.esn,
            self.replay_window,
        );
        Ok(if shared {
            self.window
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allocate(self.replay_window);
            sa.with_shared_window(self.window.clone())
        } else {
            sa
        })
    }
}

/// A direction's SAs of one tunnel: the fallback SA and one SA per CPU.
#[derive(Debug, Clone)]
pub struct PerCpuSaGroup {
    /// Not bound to a CPU; used by cores without an SA of their own.
    pub fallback: SaSpec,
    /// SA i is bound to CPU i.
    pub per_cpu: Vec<SaSpec>,
}

impl PerCpuSaGroup {
    /// Every SA of the group.
    pub fn all(&self) -> impl Iterator<Item = &SaSpec> {
        std::iter::once(&self.fallback).chain(self.per_cpu.iter())
    }

    /// Every SA of the group, to change.
    pub fn all_mut(&mut self) -> impl Iterator<Item = &mut SaSpec> {
        std::iter::once(&mut self.fallback).chain(self.per_cpu.iter_mut())
    }
}

/// One tunnel: a pair of traffic selectors between two gateways and its SA groups.
#[derive(Debug, Clone)]
pub struct TunnelSas {
    /// Name from the configuration.
    pub name: String,
    /// Red subnets behind this gateway.
    pub local_subnets: Vec<Prefix>,
    /// Red subnets behind the peer.
    pub remote_subnets: Vec<Prefix>,
    /// SAs we send with.
    pub outbound: PerCpuSaGroup,
    /// SAs we receive with.
    pub inbound: PerCpuSaGroup,
    /// Inbound SAs replaced by a rekey, kept until drained (make-before-break).
    pub draining: Vec<SaSpec>,
    /// Whether workers may ask for per-CPU SAs (RFC 9611 per-CPU acquires). Off when the IKE
    /// peer did not agree to per-CPU SAs (the daemon's policy says so, or the supervisor saw
    /// per-CPU acquires answered only with ordinary Child SAs): every core then sends on the
    /// fallback SA and asks for nothing more.
    pub pcpu_acquires: bool,
    /// `lab_rekey`: the generation length in seconds (new SAs at every multiple of it in UNIX
    /// time); `None` for tunnels keyed otherwise. For reports: when the SAs will be replaced.
    pub rekey_every: Option<u64>,
}

impl SaSpec {
    /// Whether `other` describes the same SA: SPI, key, parameters, lifetimes, endpoints, slot,
    /// origin and sequence reservation. (The counter and window go with the key.)
    pub fn same_as(&self, other: &SaSpec) -> bool {
        self.spi == other.spi
            && self.key_id == other.key_id
            && self.esn == other.esn
            && self.replay_window == other.replay_window
            && self.lifetimes == other.lifetimes
            && self.endpoints == other.endpoints
            && self.cpu == other.cpu
            && self.start_seq == other.start_seq
            && self.awaiting_ike == other.awaiting_ike
            && self.daemon == other.daemon
            && self.next_generation == other.next_generation
            && self.wire_order == other.wire_order
            && match (&self.seq_guard, &other.seq_guard) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl TunnelSas {
    /// Whether `other` is this tunnel with the same SAs (a reload that leaves it alone): then
    /// the new snapshot keeps sharing this one, and no worker revisits it.
    pub fn same_as(&self, other: &TunnelSas) -> bool {
        let group = |a: &PerCpuSaGroup, b: &PerCpuSaGroup| {
            a.per_cpu.len() == b.per_cpu.len() && a.all().zip(b.all()).all(|(x, y)| x.same_as(y))
        };
        self.name == other.name
            && self.local_subnets == other.local_subnets
            && self.remote_subnets == other.remote_subnets
            && self.pcpu_acquires == other.pcpu_acquires
            && self.rekey_every == other.rekey_every
            && group(&self.outbound, &other.outbound)
            && group(&self.inbound, &other.inbound)
            && self.draining.len() == other.draining.len()
            && self
                .draining
                .iter()
                .zip(other.draining.iter())
                .all(|(x, y)| x.same_as(y))
    }
}

/// Who processes an inbound SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Exactly this worker (per-CPU SA).
    Core(usize),
    /// Any worker (fallback SA, shared mode).
    Any,
}

/// An immutable snapshot of the SA database.
#[derive(Debug, Clone)]
pub struct SaDb {
    /// Increases with every publication.
    pub generation: u64,
    /// Per-CPU or shared.
    pub mode: SaMode,
    /// Number of worker cores.
    pub workers: usize,
    /// Crypto backend for the key schedules.
    pub backend: Backend,
    /// Tunnels, each shared with the snapshots before it until it changes (change one with
    /// `Arc::make_mut`): a snapshot that changes one tunnel of 10 000 copies one, and a worker
    /// moving to it looks at that one only.
    pub tunnels: Vec<Arc<TunnelSas>>,
    /// Policies.
    pub spd: Spd,
    /// The policies compiled for IPv4: rebuilt by [`SaDb::new`], [`SaDbHandle::new`] and
    /// [`SaDbHandle::update`], the only ways a snapshot reaches the workers.
    pub spd_v4: crate::selector::SpdV4,
    /// Fraction of the sequence-number space after which an outbound SA raises a soft event
    /// (once per SA and core). Default 0.9.
    pub seq_warn: f64,
    inbound_index: HashMap<u32, (usize, Owner)>,
    /// Tunnel name → index, as of the last publication (checked on use: a copy being changed
    /// may have moved tunnels).
    names: HashMap<String, usize>,
}

/// Inconsistent databases are refused before they are published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// Two inbound SAs with one SPI.
    #[error("duplicate inbound SPI {0:#010x}")]
    DuplicateSpi(u32),
    /// A key the backend refused.
    #[error("SA {spi:#010x}: {err}")]
    Key {
        /// SPI.
        spi: u32,
        /// What the backend said.
        err: espada_crypto::KeyError,
    },
    /// No workers.
    #[error("at least one worker is needed")]
    NoWorkers,
    /// One outbound key on two live SAs (two SAs counting under one key would repeat nonces).
    #[error("outbound SA {spi:#010x} uses the key of outbound SA {other:#010x}: every outbound SA needs its own key")]
    KeyReuse {
        /// The SA refused.
        spi: u32,
        /// The live SA that has the key.
        other: u32,
    },
    /// A slot the IKE daemon has not filled was asked to send.
    #[error("SA {0:#010x} is a placeholder awaiting the IKE daemon: nothing is sent on it")]
    Placeholder(u32),
    /// A changed copy of snapshot `base` offered when `current` is in force.
    #[error("snapshot {base} was changed while snapshot {current} was published: nothing applied")]
    Stale {
        /// The snapshot the copy was taken from.
        base: u64,
        /// The snapshot in force.
        current: u64,
    },
    /// Two workers for one per-CPU SA (two workers with one core index).
    #[error("per-CPU SA {spi:#010x} is already held by worker {owner}; worker {core} cannot hold it too (two workers with one core index?)")]
    Claimed {
        /// SPI.
        spi: u32,
        /// The worker that holds it.
        owner: usize,
        /// The worker that asked.
        core: usize,
    },
}

impl SaDb {
    /// A snapshot (generation 0); fails on duplicate inbound SPIs.
    pub fn new(
        mode: SaMode,
        workers: usize,
        backend: Backend,
        tunnels: Vec<TunnelSas>,
        spd: Spd,
    ) -> Result<SaDb, DbError> {
        let mut db = SaDb {
            generation: 0,
            mode,
            workers,
            backend,
            tunnels: tunnels.into_iter().map(Arc::new).collect(),
            spd,
            spd_v4: Default::default(),
            seq_warn: 0.9,
            inbound_index: HashMap::default(),
            names: HashMap::default(),
        };
        db.reindex()?;
        Ok(db)
    }

    fn reindex(&mut self) -> Result<(), DbError> {
        if self.workers == 0 {
            return Err(DbError::NoWorkers);
        }
        self.spd_v4 = crate::selector::SpdV4::compile(&self.spd);
        let mut idx = HashMap::default();
        for (t, tun) in self.tunnels.iter().enumerate() {
            for s in tun.inbound.all().chain(tun.draining.iter()) {
                if idx.insert(s.spi, (t, self.owner_of(s))).is_some() {
                    return Err(DbError::DuplicateSpi(s.spi));
                }
            }
        }
        self.inbound_index = idx;
        self.names = self
            .tunnels
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(())
    }

    fn owner_of(&self, s: &SaSpec) -> Owner {
        match (self.mode, s.cpu) {
            (SaMode::PerCpu, Some(c)) => Owner::Core(c % self.workers),
            _ => Owner::Any,
        }
    }

    /// Which worker processes inbound SPI `spi`, and in which tunnel.
    #[inline]
    pub fn inbound_owner(&self, spi: u32) -> Option<(usize, Owner)> {
        self.inbound_index.get(&spi).copied()
    }

    /// The outbound SA `core` uses for tunnel `t`: its own per-CPU SA, else the fallback SA.
    pub fn outbound_for(&self, t: usize, core: usize) -> &SaSpec {
        let g = &self.tunnels[t].outbound;
        match self.mode {
            SaMode::PerCpu => g.per_cpu.get(core).unwrap_or(&g.fallback),
            SaMode::Shared => &g.fallback,
        }
    }

    /// Whether an outbound SA is used by more than one core.
    pub fn outbound_is_shared(&self, s: &SaSpec) -> bool {
        self.mode == SaMode::Shared || s.cpu.is_none()
    }

    /// Binds every outbound SA to a durable sequence reservation (`guard(spi)`); call before
    /// the snapshot is published. SAs sharing an SPI share the guard the closure returns.
    pub fn attach_seq_guards(&mut self, mut guard: impl FnMut(&SaSpec) -> Arc<SeqGuard>) {
        for t in self.tunnels.iter_mut() {
            let g = &mut Arc::make_mut(t).outbound;
            for s in std::iter::once(&mut g.fallback).chain(g.per_cpu.iter_mut()) {
                s.seq_guard = Some(guard(s));
            }
        }
    }

    /// Every outbound SA of every tunnel.
    pub fn outbound_specs(&self) -> impl Iterator<Item = &SaSpec> {
        self.tunnels.iter().flat_map(|t| t.outbound.all())
    }

    /// Tunnel `i`, to change: copied first if an earlier snapshot shares it.
    pub fn tunnel_mut(&mut self, i: usize) -> &mut TunnelSas {
        Arc::make_mut(&mut self.tunnels[i])
    }

    /// The tunnel index by name.
    pub fn tunnel(&self, name: &str) -> Option<usize> {
        match self.names.get(name) {
            Some(&i) if self.tunnels.get(i).is_some_and(|t| t.name == name) => Some(i),
            _ => self.tunnels.iter().position(|t| t.name == name),
        }
    }
}

/// The one owner of every outbound key's sequence counter (and of every shared inbound SA's
/// replay window), kept by the [`SaDbHandle`] across every snapshot it publishes.
///
/// Whatever builds a snapshot (a reload, `sa add`, a lab rekey, an IKE install) makes fresh
/// [`SaSpec`]s with fresh counters; publishing swaps each for the counter the book already has
/// for that key, so a key keeps one counter for the life of the gateway: workers that kept their
/// runtime state, workers that build the SA afresh (a hard expiry, a lower `pcpu`, a new
/// worker) and SAs deleted and added back all count on it. Keys no snapshot uses any more are
/// retired to their last sequence number (16 + 8 bytes each), so a key that comes back resumes
/// above it.
#[derive(Debug, Default)]
pub struct CounterBook {
    /// Key fingerprint → (the SPI it was last published under, its counter).
    live: HashMap<u128, (u32, Arc<OutState>)>,
    /// Key fingerprint → the last sequence number issued, for keys no longer in use.
    retired: HashMap<u128, u64>,
    /// (SPI, key fingerprint) → the replay window of an inbound SA.
    windows: HashMap<(u32, u128), Arc<Mutex<ReplayWindow>>>,
}

impl CounterBook {
    /// Refuses a snapshot in which two live outbound SAs with different SPIs share a key.
    fn check(db: &SaDb) -> Result<(), DbError> {
        let mut seen: HashMap<u128, u32> = HashMap::default();
        for s in db.outbound_specs().filter(|s| !s.awaiting_ike) {
            if let Some(other) = seen.insert(s.key_id, s.spi) {
                if other != s.spi {
                    return Err(DbError::KeyReuse { spi: s.spi, other });
                }
            }
        }
        Ok(())
    }

    /// Gives every SA of `db` the counter (outbound) or window (inbound) of its key. Cannot
    /// fail: call after [`CounterBook::check`] and the snapshot's own checks. Tunnels `db`
    /// shares with `prev` (the snapshot in force) were adopted when `prev` was published: they
    /// are only counted as in use, not copied.
    fn adopt(&mut self, db: &mut SaDb, prev: Option<&SaDb>) {
        let mut used: HashSet<u128> = HashSet::default();
        let mut windows = HashMap::default();
        let before: HashSet<*const TunnelSas> = prev
            .map(|p| p.tunnels.iter().map(Arc::as_ptr).collect())
            .unwrap_or_default();
        for t in db.tunnels.iter_mut() {
            if before.contains(&Arc::as_ptr(t)) {
                for s in t.outbound.all().filter(|s| !s.awaiting_ike) {
                    if let Some((spi, _)) = self.live.get_mut(&s.key_id) {
                        *spi = s.spi;
                    }
                    used.insert(s.key_id);
                }
                for s in t
                    .inbound
                    .all()
                    .chain(t.draining.iter())
                    .filter(|s| !s.awaiting_ike)
                {
                    let k = (s.spi, s.key_id);
                    let w = self.windows.remove(&k).unwrap_or_else(|| s.window.clone());
                    windows.insert(k, w);
                }
                continue;
            }
            let t = Arc::make_mut(t);
            for s in t.outbound.all_mut().filter(|s| !s.awaiting_ike) {
                let (spi, st) = self.live.entry(s.key_id).or_insert_with(|| {
                    let st = s.out.clone();
                    if let Some(last) = self.retired.remove(&s.key_id) {
                        st.seq.fetch_max(last, Ordering::Relaxed);
                    }
                    (s.spi, st)
                });
                *spi = s.spi;
                if !Arc::ptr_eq(st, &s.out) {
                    // A counter set up on the fresh spec (a test's `start_seq`) only raises it.
                    st.seq.fetch_max(s.out.last_seq(), Ordering::Relaxed);
                    s.out = st.clone();
                }
                used.insert(s.key_id);
            }
            for s in t
                .inbound
                .all_mut()
                .chain(t.draining.iter_mut())
                .filter(|s| !s.awaiting_ike)
            {
                let k = (s.spi, s.key_id);
                let w = self.windows.remove(&k).unwrap_or_else(|| s.window.clone());
                s.window = w.clone();
                windows.insert(k, w);
            }
        }
        self.windows = windows;
        // Counters no snapshot uses and no worker holds are retired to their last number.
        let retired = &mut self.retired;
        self.live.retain(|k, (_, st)| {
            if used.contains(k) || Arc::strong_count(st) > 1 || Arc::strong_count(&st.seq) > 1 {
                return true;
            }
            retired.insert(*k, st.last_seq());
            false
        });
    }

    /// The last sequence number issued under the key with fingerprint `fp`, if it was ever
    /// published.
    pub fn last_seq(&self, fp: u128) -> Option<u64> {
        self.live
            .get(&fp)
            .map(|(_, st)| st.last_seq())
            .or_else(|| self.retired.get(&fp).copied())
    }

    /// Keys the book knows (live and retired).
    pub fn len(&self) -> usize {
        self.live.len() + self.retired.len()
    }

    /// Whether the book knows no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Publishes snapshots to workers; the only way a snapshot reaches them, so every SA a worker
/// builds counts on its key's one counter (the [`CounterBook`] it keeps).
#[derive(Debug)]
pub struct SaDbHandle {
    current: ArcSwap<SaDb>,
    /// `current`'s generation, stored after it: what a worker checks every poll.
    gen: AtomicU64,
    book: Mutex<CounterBook>,
}

impl SaDbHandle {
    /// Starts with `db`. Panics if two outbound SAs of `db` share a key: use
    /// [`SaDbHandle::try_new`] for a database that was not checked.
    pub fn new(db: SaDb) -> Arc<SaDbHandle> {
        Self::try_new(db).expect("an inconsistent SA database")
    }

    /// Starts with `db`, or refuses it (two outbound SAs with one key, duplicate SPIs).
    pub fn try_new(mut db: SaDb) -> Result<Arc<SaDbHandle>, DbError> {
        CounterBook::check(&db)?;
        // The policies may have been edited since the snapshot was made: compile them now.
        db.reindex()?;
        let mut book = CounterBook::default();
        book.adopt(&mut db, None);
        Ok(Arc::new(SaDbHandle {
            gen: AtomicU64::new(db.generation),
            current: ArcSwap::from_pointee(db),
            book: Mutex::new(book),
        }))
    }

    /// The current snapshot (lock-free).
    #[inline]
    pub fn load(&self) -> Arc<SaDb> {
        self.current.load_full()
    }

    /// The current generation (one atomic load: workers check it every poll).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Changes the database with `f` on a copy of the current snapshot and publishes it with the
    /// next generation number. Control plane only; workers pick it up at their next burst.
    pub fn update(&self, f: impl FnOnce(&mut SaDb)) -> Result<u64, DbError> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (*self.current.load_full()).clone();
        f(&mut next);
        self.publish_locked(book, next)
    }

    /// Publishes `next`, a copy of the current snapshot changed by the caller (many changes
    /// at once: the control plane's transactions), with the next generation number. Refused,
    /// like [`SaDbHandle::update`], if inconsistent, and if another snapshot was published since
    /// the copy was taken.
    pub fn replace(&self, next: SaDb) -> Result<u64, DbError> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load().generation;
        if next.generation != cur {
            return Err(DbError::Stale {
                base: next.generation,
                current: cur,
            });
        }
        self.publish_locked(book, next)
    }

    fn publish_locked(
        &self,
        mut book: std::sync::MutexGuard<'_, CounterBook>,
        mut next: SaDb,
    ) -> Result<u64, DbError> {
        next.generation += 1;
        CounterBook::check(&next)?;
        next.reindex()?;
        let prev = self.current.load_full();
        book.adopt(&mut next, Some(&prev));
        drop(prev);
        let g = next.generation;
        self.current.store(Arc::new(next));
        self.gen.store(g, Ordering::Release);
        Ok(g)
    }

    /// Reads the counter book (reports, tests).
    pub fn with_book<R>(&self, f: impl FnOnce(&CounterBook) -> R) -> R {
        f(&self.book.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Direction of an SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// We send.
    Outbound,
    /// We receive.
    Inbound,
}

/// A lifetime event for the control plane (log, counter, rekey hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaEvent {
    /// Tunnel index.
    pub tunnel: usize,
    /// SPI.
    pub spi: u32,
    /// Direction.
    pub dir: Direction,
    /// Soft or hard.
    pub stage: Stage,
    /// The worker that saw it.
    pub core: usize,
    /// A soft event about the sequence-number space (the SA has used [`SaDb::seq_warn`] of
    /// 2^32, or of 2^64 with ESN: rekey before it runs out, RFC 4303 §3.3.3) rather than about
    /// its lifetime.
    pub seq_space: bool,
}

/// Events flow from workers to the control plane through a bounded lock-free queue.
pub type EventQueue = ArrayQueue<SaEvent>;

/// A worker's request for an SA the IKE daemon has not negotiated yet (RFC 9611 per-CPU
/// acquires, as the Linux kernel raises them): `cpu` names the per-CPU SA wanted, `None` the
/// fallback SA. Raised off the fast path, at most once a second per tunnel and worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquire {
    /// Tunnel index.
    pub tunnel: usize,
    /// The per-CPU SA wanted, or `None` for the fallback SA.
    pub cpu: Option<usize>,
    /// The worker that raised it.
    pub core: usize,
}

/// Acquires on their way to the control plane.
pub type AcquireQueue = ArrayQueue<Acquire>;

/// SAs of each direction one [`CoreSas::check_lifetimes`] call looks at, at most.
pub const LIFETIME_CHUNK: usize = 256;

/// The longest a worker waits before raising the same acquire again (seconds).
pub const ACQUIRE_BACKOFF_MAX: u64 = 32;

/// `repr(C)`, the SA first: what a packet reads is the first
/// [`OutboundSa::PREFETCH_BYTES`] (the rest is read per housekeeping pass or rebuild).
#[repr(C)]
struct OutRt {
    sa: OutboundSa,
    life: LifetimeTracker,
    seq_warned: bool,
    _claim: Option<Claim>,
    key_id: u128,
    state: Arc<OutState>,
}

/// `repr(C)`: the tunnel index and the SA's packet fields first, as in [`OutRt`].
#[repr(C)]
struct InRt {
    tunnel: usize,
    sa: InboundSa,
    life: LifetimeTracker,
    key_id: u128,
}

// The prefetch of `Option<OutRt>` counts on the payload at offset 0 (the `Arc` is the niche).
const _: () = assert!(std::mem::size_of::<Option<OutRt>>() == std::mem::size_of::<OutRt>());

/// Bytes of a key schedule a burst's prefetch step asks for: the round keys (176 bytes for
/// AES-128, 240 for AES-256) and the 8 GHASH key powers after them (368 bytes of
/// intel-ipsec-mb's `gcm_key_data` on AVX2), and the key's own fields behind an inline key;
/// a long packet's further powers on other paths are read while the AEAD's own work hides
/// them.
const KEY_HOT: usize = 448;

/// Bytes from the start of an [`InRt`] a packet reads.
const IN_RT_HOT: usize = std::mem::offset_of!(InRt, sa) + InboundSa::PREFETCH_BYTES;

/// Where an inbound SPI is processed, seen from one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Here.
    Local,
    /// By another worker: hand the packet over.
    Handoff(usize),
    /// The SA reached its hard lifetime.
    Expired,
    /// No SA has this SPI.
    Unknown,
}

/// SA states built in phase 1 of a rebuild, by SPI, in one vector: an SA's state is about a
/// kilobyte (its key schedule is inline), and a hash map of them took twice their size at
/// 10 000 tunnels and moved every one of them on each growth.
struct Fresh<T> {
    at: HashMap<u32, usize>,
    vals: Vec<Option<T>>,
}

impl<T> Fresh<T> {
    /// Room for `n` (an upper bound: untouched capacity of a large vector costs no memory,
    /// see `espada_dataplane::heap::HugeAlloc`).
    fn with_capacity(n: usize) -> Self {
        Fresh {
            at: HashMap::with_capacity_and_hasher(n, Default::default()),
            vals: Vec::with_capacity(n),
        }
    }

    fn contains_key(&self, spi: &u32) -> bool {
        self.at.contains_key(spi)
    }

    fn insert(&mut self, spi: u32, v: T) {
        match self.at.get(&spi) {
            Some(&i) => self.vals[i] = Some(v),
            None => {
                self.at.insert(spi, self.vals.len());
                self.vals.push(Some(v));
            }
        }
    }

    fn remove(&mut self, spi: &u32) -> Option<T> {
        self.at.remove(spi).and_then(|i| self.vals[i].take())
    }

    fn len(&self) -> usize {
        self.at.len()
    }
}

/// Phase 1's outbound decisions (see `CoreSas::rebuild`).
struct OutPlan {
    /// Key schedules built for SAs this core does not hold yet, by SPI.
    fresh: Fresh<OutRt>,
    /// Per tunnel: the SA to send on (SPI, key id, lifetimes), or none.
    plan: Vec<Option<(u32, u128, Lifetimes)>>,
    /// Per tunnel: the acquire wanted.
    acquire: Vec<Option<Option<usize>>>,
    /// Waiting for another worker to hand a per-CPU SA over.
    claim_wait: bool,
}

/// One worker's runtime SAs. Touched by that worker only.
pub struct CoreSas {
    core: usize,
    db: Arc<SaDb>,
    outbound: Vec<Option<OutRt>>,
    inbound: SpiMap<InRt>,
    /// SAs that reached a hard lifetime here: SPI → key. Never built again from a later
    /// snapshot under that key (an inbound SA would come back with an empty replay window);
    /// a new key under the SPI is a new SA.
    expired: HashMap<u32, u128>,
    events_lost: u64,
    /// Where the next [`CoreSas::check_lifetimes`] goes on (outbound tunnel, inbound
    /// position): each call looks at [`LIFETIME_CHUNK`] SAs of each direction at most.
    life_cursor: (usize, usize),
    /// Per tunnel: the acquire this worker would raise (`Some(cpu)`), when the SA it should
    /// send on is still awaiting the IKE daemon.
    acquire: Vec<Option<Option<usize>>>,
    /// Per tunnel: a packet wanted that SA since the last [`CoreSas::raise_acquires`].
    acquire_hit: Vec<bool>,
    /// Per tunnel: when the last acquire went (seconds).
    acquire_last: Vec<u64>,
    /// Per tunnel: seconds until the same acquire may go again (doubles each time, up to
    /// [`ACQUIRE_BACKOFF_MAX`]; back to 1 when the wanted SA changes).
    acquire_backoff: Vec<u64>,
    /// A per-CPU SA this worker should hold is still held by another worker (a reload moved
    /// it): this worker sends on the fallback SA meanwhile and tries again at each sync.
    claim_wait: bool,
    /// Outbound SAs this worker stopped using while they stay in the database (the fallback SA
    /// once the core has its own): what it sent on them, for reports. Pruned when the SA goes.
    retired: Vec<(u32, u128, SaCounters)>,
}

/// What a worker sends with on one tunnel: the one decision, used by every rebuild and every
/// hard expiry, so that no path sends on a placeholder or an expired SA.
enum Pick<'a> {
    /// This SA.
    Send(&'a SaSpec),
    /// Nothing: drop the tunnel's packets (counted).
    Drop,
}

impl CoreSas {
    /// Runtime state for worker `core` from snapshot `db` at time `now`.
    pub fn new(core: usize, db: Arc<SaDb>, now: u64) -> Result<CoreSas, DbError> {
        let mut c = CoreSas {
            core,
            db: db.clone(),
            outbound: Vec::new(),
            inbound: SpiMap::default(),
            expired: HashMap::default(),
            events_lost: 0,
            life_cursor: (0, 0),
            acquire: Vec::new(),
            acquire_hit: Vec::new(),
            acquire_last: Vec::new(),
            acquire_backoff: Vec::new(),
            claim_wait: false,
            retired: Vec::new(),
        };
        c.rebuild(db, now, true)?;
        Ok(c)
    }

    /// This worker's index.
    pub fn core(&self) -> usize {
        self.core
    }

    /// The snapshot in use.
    pub fn db(&self) -> &Arc<SaDb> {
        &self.db
    }

    /// Picks up a newer snapshot if there is one. Cheap when nothing changed.
    #[inline]
    pub fn sync(&mut self, handle: &SaDbHandle, now: u64) -> Result<bool, DbError> {
        if handle.generation() == self.db.generation && !self.claim_wait {
            return Ok(false);
        }
        self.rebuild(handle.load(), now, false)?;
        Ok(true)
    }

    /// Whether this worker waits for another to let go of a per-CPU SA it should hold.
    pub fn waiting_for_handover(&self) -> bool {
        self.claim_wait
    }

    /// Whether SA `s` may still send from this core (not hard-expired here or anywhere).
    fn alive(&self, s: &SaSpec) -> bool {
        self.expired.get(&s.spi) != Some(&s.key_id) && !s.out.expired()
    }

    /// The outbound SA this worker sends with on tunnel `t` of `db`, and the acquire to raise
    /// (`Some(cpu)`: the per-CPU SA `cpu`, or the fallback SA for `None`). A placeholder is
    /// never picked: a core whose SA awaits the IKE daemon sends on the fallback SA, and drops
    /// when that one awaits the daemon too (RFC 9611 §3: the fallback SA carries traffic
    /// until the per-CPU SA exists).
    fn pick<'a>(&self, db: &'a SaDb, t: usize) -> (Pick<'a>, Option<Option<usize>>) {
        let fallback = &db.tunnels[t].outbound.fallback;
        let own = db.outbound_for(t, self.core);
        let mut acquire = None;
        let mut spec = own;
        if spec.awaiting_ike {
            if spec.cpu.is_none() || db.tunnels[t].pcpu_acquires {
                acquire = Some(spec.cpu);
            }
            spec = fallback;
        }
        if !std::ptr::eq(spec, fallback) && !self.alive(spec) {
            spec = fallback;
        }
        if fallback.awaiting_ike && std::ptr::eq(spec, fallback) {
            return (Pick::Drop, Some(None));
        }
        if !self.alive(spec) {
            return (Pick::Drop, acquire);
        }
        (Pick::Send(spec), acquire)
    }

    /// Moves to snapshot `db`, keeping the runtime state (counters, sequence numbers, replay
    /// windows) of every SA that stays. Transactional: everything that can fail (the key
    /// schedules of SAs this core does not hold yet) is built first; on a failure nothing of the
    /// live state has been touched, so no counter or window restarts under the same key.
    /// `strict`: a per-CPU SA another worker holds is an error (a new worker with a core index
    /// already in use); otherwise this worker waits for the handover on the fallback SA.
    fn rebuild(&mut self, db: Arc<SaDb>, now: u64, strict: bool) -> Result<(), DbError> {
        let keep = self.kept_tunnels(&db, strict);
        // Phase 1 (may fail, changes nothing).
        let out = self.plan_outbound(&db, &keep, now, strict)?;
        let (fresh_in, in_plan) = self.plan_inbound(&db, &keep, now)?;
        // Phase 2 (cannot fail): assemble, moving the live state over.
        let old_out = self.install_outbound(&keep, out.plan, out.fresh);
        self.retire(old_out, &db);
        self.install_inbound(&keep, in_plan, fresh_in);
        self.set_acquires(out.acquire);
        self.claim_wait = out.claim_wait;
        self.db = db;
        Ok(())
    }

    /// Tunnels the new snapshot shares with the one this worker runs (the same `Arc` at the
    /// same index) need nothing: their runtime state is what the last rebuild made of them.
    /// Unless this worker's own state changed since (a hard expiry, a claim it waits for) or
    /// there was nothing before: then every tunnel is decided again.
    fn kept_tunnels(&self, db: &Arc<SaDb>, strict: bool) -> Vec<bool> {
        let full = strict || self.claim_wait || Arc::ptr_eq(db, &self.db);
        (0..db.tunnels.len())
            .map(|t| {
                !full
                    && t < self.outbound.len()
                    && t < self.acquire.len()
                    && self
                        .db
                        .tunnels
                        .get(t)
                        .is_some_and(|o| Arc::ptr_eq(o, &db.tunnels[t]))
            })
            .collect()
    }

    /// Phase 1, outbound: per tunnel, the SA to send on (or none) and the acquire wanted, and
    /// the key schedules of the SAs this core does not hold yet (claims taken for them).
    fn plan_outbound(
        &self,
        db: &SaDb,
        keep: &[bool],
        now: u64,
        strict: bool,
    ) -> Result<OutPlan, DbError> {
        let have_out: HashSet<(u32, u128)> = self
            .outbound
            .iter()
            .flatten()
            .map(|o| (o.sa.spi, o.key_id))
            .collect();
        let mut fresh_out: Fresh<OutRt> = Fresh::with_capacity(db.tunnels.len());
        let mut out_plan: Vec<Option<(u32, u128, Lifetimes)>> =
            Vec::with_capacity(db.tunnels.len());
        let mut acquire = Vec::with_capacity(db.tunnels.len());
        let mut claim_wait = false;
        for (t, &kept) in keep.iter().enumerate() {
            if kept {
                acquire.push(self.acquire[t]);
                out_plan.push(None); // not looked at: the slot stays
                continue;
            }
            let (pick, want) = self.pick(db, t);
            acquire.push(want);
            let Pick::Send(mut spec) = pick else {
                out_plan.push(None);
                continue;
            };
            let mut key = (spec.spi, spec.key_id);
            if !have_out.contains(&key) && !fresh_out.contains_key(&spec.spi) {
                let mut shared = db.outbound_is_shared(spec);
                // (A claim taken here and then abandoned by a later failure is released when
                // `fresh_out` is dropped.)
                let claim = if shared {
                    None
                } else {
                    match spec.claim(self.core) {
                        Ok(c) => Some(c),
                        Err(e) if strict => return Err(e),
                        Err(_) => {
                            // Another worker still sends on it: the fallback SA meanwhile.
                            claim_wait = true;
                            let fb = &db.tunnels[t].outbound.fallback;
                            if fb.awaiting_ike || !self.alive(fb) {
                                out_plan.push(None);
                                continue;
                            }
                            spec = fb;
                            shared = true;
                            key = (spec.spi, spec.key_id);
                            None
                        }
                    }
                };
                if !have_out.contains(&key) && !fresh_out.contains_key(&spec.spi) {
                    let sa = spec.outbound(db.backend, shared)?;
                    fresh_out.insert(
                        spec.spi,
                        OutRt {
                            sa,
                            life: LifetimeTracker::new(spec.lifetimes, now),
                            seq_warned: false,
                            _claim: claim,
                            key_id: spec.key_id,
                            state: spec.out.clone(),
                        },
                    );
                }
            }
            out_plan.push(Some((spec.spi, spec.key_id, spec.lifetimes)));
        }
        Ok(OutPlan {
            fresh: fresh_out,
            plan: out_plan,
            acquire,
            claim_wait,
        })
    }

    /// Phase 1, inbound: the SAs this core (or every core) receives on in the tunnels that
    /// changed, and the key schedules of those it does not hold yet.
    #[allow(clippy::type_complexity)]
    fn plan_inbound(
        &self,
        db: &SaDb,
        keep: &[bool],
        now: u64,
    ) -> Result<(Fresh<InRt>, Vec<(u32, usize, u128, Lifetimes)>), DbError> {
        let key_err = |spi| move |err| DbError::Key { spi, err };
        // At most every inbound SA of the tunnels rebuilt.
        let bound = (db.tunnels.iter().zip(keep))
            .filter(|(_, k)| !**k)
            .map(|(t, _)| t.inbound.all().count() + t.draining.len())
            .sum();
        let mut fresh_in: Fresh<InRt> = Fresh::with_capacity(bound);
        let mut in_plan: Vec<(u32, usize, u128, Lifetimes)> = Vec::with_capacity(bound);
        for (t, tun) in db.tunnels.iter().enumerate() {
            if keep[t] {
                continue;
            }
            for s in tun
                .inbound
                .all()
                .chain(tun.draining.iter())
                .filter(|s| !s.awaiting_ike && self.expired.get(&s.spi) != Some(&s.key_id))
            {
                let owner = db.owner_of(s);
                if owner != Owner::Core(self.core) && owner != Owner::Any {
                    continue;
                }
                in_plan.push((s.spi, t, s.key_id, s.lifetimes));
                let same = self
                    .inbound
                    .get(s.spi)
                    .is_some_and(|r| r.key_id == s.key_id);
                if !same && !fresh_in.contains_key(&s.spi) {
                    let sa = s
                        .inbound(db.backend, owner == Owner::Any)
                        .map_err(key_err(s.spi))?;
                    fresh_in.insert(
                        s.spi,
                        InRt {
                            sa,
                            life: LifetimeTracker::new(s.lifetimes, now),
                            tunnel: t,
                            key_id: s.key_id,
                        },
                    );
                }
            }
        }
        Ok((fresh_in, in_plan))
    }

    /// Phase 2, outbound. In place: an SA that stays in its tunnel's slot (same SPI and key)
    /// is not moved (10 000 tunnels are 80 000 SAs of ~1 KiB each: moving them all took a
    /// worker off its queues for hundreds of milliseconds at every snapshot). Returns the
    /// SAs this core leaves.
    fn install_outbound(
        &mut self,
        keep: &[bool],
        out_plan: Vec<Option<(u32, u128, Lifetimes)>>,
        mut fresh_out: Fresh<OutRt>,
    ) -> HashMap<u32, OutRt> {
        let mut old_out: HashMap<u32, OutRt> = HashMap::default();
        for (t, slot) in self.outbound.iter_mut().enumerate() {
            let stays = keep.get(t).copied().unwrap_or(false)
                || match (slot.as_ref(), out_plan.get(t).copied().flatten()) {
                    (Some(o), Some((spi, k, _))) => o.sa.spi == spi && o.key_id == k,
                    _ => false,
                };
            if !stays {
                if let Some(o) = slot.take() {
                    old_out.insert(o.sa.spi, o);
                }
            }
        }
        self.outbound.resize_with(out_plan.len(), || None);
        for (t, (slot, p)) in self.outbound.iter_mut().zip(out_plan).enumerate() {
            if keep[t] {
                continue;
            }
            let Some((spi, k, life)) = p else { continue };
            if let Some(rt) = slot {
                // Limits may have changed (`espada sa update`, a reload); the clock stays.
                rt.life.set_limits(life);
                continue;
            }
            // The live state moves on only under the same key (a new key is a new SA).
            *slot = old_out
                .remove(&spi)
                .filter(|o| o.key_id == k)
                .or_else(|| fresh_out.remove(&spi))
                .map(|mut rt| {
                    rt.life.set_limits(life);
                    rt
                });
        }
        old_out
    }

    /// What this core sent on SAs it leaves stays counted while the SA exists; what expired
    /// and left the database is forgotten (the sets stay bounded).
    fn retire(&mut self, mut old_out: HashMap<u32, OutRt>, db: &SaDb) {
        let mut at: HashMap<(u32, u128), usize> = self
            .retired
            .iter()
            .enumerate()
            .map(|(i, (s, k, _))| ((*s, *k), i))
            .collect();
        for (_, o) in old_out.drain() {
            let c = o.sa.counters;
            match at.get(&(o.sa.spi, o.key_id)) {
                Some(&i) => {
                    let r = &mut self.retired[i].2;
                    r.packets += c.packets;
                    r.bytes += c.bytes;
                }
                None => {
                    at.insert((o.sa.spi, o.key_id), self.retired.len());
                    self.retired.push((o.sa.spi, o.key_id, c));
                }
            }
        }
        let alive: HashSet<(u32, u128)> = db.outbound_specs().map(|s| (s.spi, s.key_id)).collect();
        self.retired.retain(|(s, k, _)| alive.contains(&(*s, *k)));
        // What expired and left the database is forgotten (the set stays bounded).
        self.expired
            .retain(|spi, k| alive.contains(&(*spi, *k)) || db.inbound_owner(*spi).is_some());
    }

    /// Phase 2, inbound, in place too: the SAs that go are taken out, the new ones put in.
    /// Only the tunnels that changed are looked at (every SA here came from this worker's
    /// snapshot).
    fn install_inbound(
        &mut self,
        keep: &[bool],
        in_plan: Vec<(u32, usize, u128, Lifetimes)>,
        mut fresh_in: Fresh<InRt>,
    ) {
        self.inbound.reserve(fresh_in.len());
        let planned: HashSet<u32> = in_plan.iter().map(|p| p.0).collect();
        let gone: Vec<u32> = self
            .db
            .tunnels
            .iter()
            .enumerate()
            .filter(|(t, _)| !keep.get(*t).copied().unwrap_or(false))
            .flat_map(|(_, tun)| tun.inbound.all().chain(tun.draining.iter()))
            .map(|s| s.spi)
            .filter(|spi| !planned.contains(spi) && self.inbound.contains_key(*spi))
            .collect();
        for spi in gone {
            self.inbound.remove(spi);
        }
        for (spi, t, k, life) in in_plan {
            match self.inbound.get_mut(spi) {
                Some(rt) if rt.key_id == k => {
                    rt.tunnel = t; // tunnels may have moved in the new snapshot
                    rt.life.set_limits(life);
                }
                // A new SA, or a new key under an SPI: a new window and clock.
                _ => match fresh_in.remove(&spi) {
                    Some(mut rt) => {
                        // A new key under an SPI that expired here: a new SA.
                        self.expired.remove(&spi);
                        rt.tunnel = t;
                        rt.life.set_limits(life);
                        self.inbound.insert(spi, rt);
                    }
                    None => {
                        self.inbound.remove(spi);
                    }
                },
            }
        }
    }

    /// The acquires wanted per tunnel; one that changed is asked at once, then backs off again.
    fn set_acquires(&mut self, acquire: Vec<Option<Option<usize>>>) {
        self.acquire_hit.resize(acquire.len(), false);
        self.acquire_last.resize(acquire.len(), 0);
        self.acquire_backoff.resize(acquire.len(), 1);
        for (t, want) in acquire.iter().enumerate() {
            if self.acquire.get(t) != Some(want) {
                // Another SA is wanted now: ask at once, then back off again.
                self.acquire_backoff[t] = 1;
                self.acquire_last[t] = 0;
            }
        }
        self.acquire = acquire;
    }

    /// A packet wants tunnel `t`'s SA (the fast path: one load and a branch). Notes it when
    /// that SA is still awaiting the IKE daemon.
    #[inline(always)]
    pub fn note_use(&mut self, t: usize) {
        if let Some(Some(_)) = self.acquire.get(t) {
            self.acquire_hit[t] = true;
        }
    }

    /// Raises the acquires of tunnels whose SA packets wanted since the last call (call every
    /// few hundred polls): the first at once, the same one again after 1, 2, 4, ... seconds up
    /// to [`ACQUIRE_BACKOFF_MAX`], whatever the IKE daemon or its peer do. Returns how many
    /// went.
    pub fn raise_acquires(&mut self, now: u64, q: &AcquireQueue) -> usize {
        let mut n = 0;
        for t in 0..self.acquire.len() {
            let Some(cpu) = self.acquire[t] else { continue };
            if !self.acquire_hit[t]
                || (self.acquire_last[t] != 0
                    && now < self.acquire_last[t] + self.acquire_backoff[t])
            {
                continue;
            }
            self.acquire_hit[t] = false;
            if self.acquire_last[t] != 0 {
                self.acquire_backoff[t] = (self.acquire_backoff[t] * 2).min(ACQUIRE_BACKOFF_MAX);
            }
            self.acquire_last[t] = now.max(1);
            if q.push(Acquire {
                tunnel: t,
                cpu,
                core: self.core,
            })
            .is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// The SA this worker sends with on tunnel `t` (`None`: none left, drop the packet and
    /// never send it in the clear).
    #[inline]
    pub fn outbound(&mut self, t: usize) -> Option<&mut OutboundSa> {
        self.outbound.get_mut(t)?.as_mut().map(|o| &mut o.sa)
    }

    /// The key fingerprint of the SA this worker sends with on tunnel `t` (reports, tests).
    pub fn outbound_key(&self, t: usize) -> Option<u128> {
        self.outbound.get(t)?.as_ref().map(|o| o.key_id)
    }

    /// Where to process inbound SPI `spi`.
    #[inline]
    pub fn route(&self, spi: u32) -> Route {
        if self.inbound.contains_key(spi) {
            return Route::Local;
        }
        if self.expired.contains_key(&spi) {
            return Route::Expired;
        }
        match self.db.inbound_owner(spi) {
            Some((_, Owner::Core(c))) if c != self.core => Route::Handoff(c),
            Some(_) => Route::Expired,
            None => Route::Unknown,
        }
    }

    /// A local inbound SA by SPI with the index of its tunnel: the one lookup of the fast path
    /// (a flat open-addressing table, [`crate::spimap::SpiMap`]: no SipHash; it holds only SAs
    /// this gateway installed).
    #[inline]
    pub fn inbound_local(&mut self, spi: u32) -> Option<(&mut InboundSa, usize)> {
        self.inbound.get_mut(spi).map(|r| (&mut r.sa, r.tunnel))
    }

    /// SAs from which a burst's prefetch steps pay: below, the policies, SAs and key
    /// schedules a core uses stay in its caches and the steps only cost instructions
    /// (measured: +17 % instructions per packet and 0.91× decrypt at 64 B with one SA).
    pub const PREFETCH_FROM: usize = 256;

    /// Whether this core holds enough SAs for the burst prefetch steps to pay.
    #[inline(always)]
    pub fn prefetch_pays(&self) -> bool {
        self.outbound.len() + self.inbound.len() >= Self::PREFETCH_FROM
    }

    /// Asks the CPU for the SPI table slot of `spi` (first step of a burst's prefetch).
    #[inline(always)]
    pub fn prefetch_inbound_slot(&self, spi: u32) {
        self.inbound.prefetch(spi);
    }

    /// Asks the CPU for the state of `spi`'s SA (second step, once the slots are in: reads
    /// only the slot).
    #[inline(always)]
    pub fn prefetch_inbound(&self, spi: u32) {
        if let Some(p) = self.inbound.value_ptr(spi) {
            crate::prefetch::range(p as *const u8, IN_RT_HOT, usize::MAX, IN_RT_HOT);
        }
    }

    /// Asks the CPU for the start of the key schedule of `spi`'s SA and the replay-window
    /// block of `seq_lo` (third step, once its state is in).
    #[inline(always)]
    pub fn prefetch_inbound_key(&self, spi: u32, seq_lo: u32) {
        if let Some(r) = self.inbound.get(spi) {
            let (k, len) = r.sa.cipher.schedule();
            crate::prefetch::range(k, len, KEY_HOT, KEY_HOT);
            r.sa.prefetch_window(seq_lo);
        }
    }

    /// Asks the CPU for the state of tunnel `t`'s outbound SA (reads nothing of it).
    #[inline(always)]
    pub fn prefetch_outbound(&self, t: usize) {
        if t < self.outbound.len() {
            let p = self.outbound.as_ptr().wrapping_add(t);
            // `Option<OutRt>` has `OutRt`'s layout (the `Arc` is its niche).
            let hot = OutboundSa::PREFETCH_BYTES;
            crate::prefetch::range(p as *const u8, hot, usize::MAX, hot);
        }
    }

    /// Asks the CPU for the start of tunnel `t`'s outbound key schedule and its sequence
    /// counter and reservation (once the SA's state is in).
    #[inline(always)]
    pub fn prefetch_outbound_key(&self, t: usize) {
        if let Some(Some(o)) = self.outbound.get(t) {
            let (k, len) = o.sa.cipher.schedule();
            crate::prefetch::range(k, len, KEY_HOT, KEY_HOT);
            o.sa.prefetch_seq();
        }
    }

    /// A local inbound SA by SPI.
    #[inline]
    pub fn inbound_mut(&mut self, spi: u32) -> Option<&mut InboundSa> {
        self.inbound.get_mut(spi).map(|r| &mut r.sa)
    }

    /// Local inbound SAs (for reports).
    pub fn inbound_sas(&self) -> impl Iterator<Item = &InboundSa> {
        self.inbound.values().map(|r| &r.sa)
    }

    /// Outbound SAs in use (for reports), one per tunnel.
    pub fn outbound_sas(&self) -> impl Iterator<Item = &OutboundSa> {
        self.outbound.iter().flatten().map(|o| &o.sa)
    }

    /// Outbound SAs this worker no longer uses, still in the database, with what it sent on
    /// them (reports).
    pub fn retired_outbound(&self) -> impl Iterator<Item = (u32, &SaCounters)> {
        self.retired.iter().map(|(s, _, c)| (*s, c))
    }

    /// Outbound SAs in use with their key's shared state (for reports: last use).
    pub fn outbound_states(
        &self,
    ) -> impl Iterator<Item = (&OutboundSa, &Arc<OutState>, &LifetimeTracker)> {
        self.outbound
            .iter()
            .flatten()
            .map(|o| (&o.sa, &o.state, &o.life))
    }

    /// Local inbound SAs with their lifetime clocks (for reports).
    pub fn inbound_lives(&self) -> impl Iterator<Item = (&InboundSa, &LifetimeTracker)> {
        self.inbound.values().map(|r| (&r.sa, &r.life))
    }

    /// Events that did not fit in the queue.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// Checks lifetimes after a burst (not per packet). Soft limits raise an event; hard limits
    /// raise one and remove the SA: outbound traffic moves to the fallback SA (or is dropped if
    /// the fallback itself expired), inbound traffic for it is dropped as expired.
    pub fn check_lifetimes(&mut self, now: u64, events: &EventQueue) {
        // A slice of the SAs per call (the worker calls every 256 polls): with ten thousand
        // tunnels a whole pass would stall the burst loop (measured: a tenth of the
        // throughput); up to LIFETIME_CHUNK SAs it is every SA every call, as before.
        let n_out = self.outbound.len();
        let out_from = if self.life_cursor.0 < n_out {
            self.life_cursor.0
        } else {
            0
        };
        let out_to = (out_from + LIFETIME_CHUNK).min(n_out);
        self.life_cursor.0 = if out_to >= n_out { 0 } else { out_to };
        let in_from = if self.life_cursor.1 < self.inbound.len() {
            self.life_cursor.1
        } else {
            0
        };
        self.life_cursor.1 = if in_from + LIFETIME_CHUNK >= self.inbound.len() {
            0
        } else {
            in_from + LIFETIME_CHUNK
        };
        let core = self.core;
        let mut lost = 0;
        let mut push = |e: SaEvent| {
            if events.push(e).is_err() {
                lost += 1;
            }
        };
        let mut switch = Vec::new();
        let warn = self.db.seq_warn;
        for (t, slot) in self
            .outbound
            .iter_mut()
            .enumerate()
            .take(out_to)
            .skip(out_from)
        {
            if let Some(o) = slot {
                let max = o.sa.max_seq() as u128;
                let at = max * (warn.clamp(0.0, 1.0) * 1e6) as u128 / 1_000_000;
                if !o.seq_warned && o.sa.last_seq() as u128 >= at {
                    o.seq_warned = true;
                    push(SaEvent {
                        tunnel: t,
                        spi: o.sa.spi,
                        dir: Direction::Outbound,
                        stage: Stage::Soft,
                        core,
                        seq_space: true,
                    });
                }
                if let Some(stage) = o.life.update(&o.sa.counters, now) {
                    push(SaEvent {
                        tunnel: t,
                        spi: o.sa.spi,
                        dir: Direction::Outbound,
                        stage,
                        core,
                        seq_space: false,
                    });
                    if stage == Stage::Hard {
                        // Dead for every core, not only this one.
                        o.state.expired.store(true, Ordering::Release);
                        switch.push((t, o.sa.spi, o.key_id));
                    }
                } else if o.state.expired() {
                    // Another core saw its hard lifetime.
                    switch.push((t, o.sa.spi, o.key_id));
                }
            }
        }
        let mut gone = Vec::new();
        for (spi, r) in self.inbound.iter_mut_from(in_from).take(LIFETIME_CHUNK) {
            if let Some(stage) = r.life.update(&r.sa.counters, now) {
                push(SaEvent {
                    tunnel: r.tunnel,
                    spi,
                    dir: Direction::Inbound,
                    stage,
                    core,
                    seq_space: false,
                });
                if stage == Stage::Hard {
                    gone.push((spi, r.key_id));
                }
            }
        }
        self.events_lost += lost;
        for (spi, k) in gone {
            self.inbound.remove(spi);
            self.expired.insert(spi, k);
        }
        if switch.is_empty() {
            return;
        }
        for &(_, spi, k) in &switch {
            self.expired.insert(spi, k);
        }
        // The same decision as any snapshot change (`pick`): the fallback SA if it may send,
        // never a placeholder; the counter stays the key's own.
        if self.rebuild(self.db.clone(), now, false).is_err() {
            for (t, _, _) in switch {
                self.outbound[t] = None;
            }
        }
    }
}

impl std::fmt::Debug for CoreSas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreSas")
            .field("core", &self.core)
            .field("generation", &self.db.generation)
            .finish()
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
