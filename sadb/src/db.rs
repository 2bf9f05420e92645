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
use crate::sa::{InboundSa, OutboundSa, TunnelEndpoints};
use crate::selector::{Prefix, Spd};
use crate::seqguard::SeqGuard;
use crate::spimap::SpiMap;
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use espada_crypto::{Backend, Cipher, KeyMaterial};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// State of an SA that several workers use.
#[derive(Debug)]
pub struct SharedState {
    seq: Arc<AtomicU64>,
    window: Arc<Mutex<ReplayWindow>>,
    /// The core that holds this SA's own (unshared) sequence counter, or `usize::MAX`: a
    /// per-CPU SA is claimed by one worker, so two workers can never count on their own.
    owner: AtomicUsize,
}

/// A worker's claim on an outbound per-CPU SA; released when the runtime state goes.
struct Claim {
    state: Arc<SharedState>,
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
    /// Tests: make this SA's key schedule fail.
    #[cfg(test)]
    pub(crate) fail_key_schedule: bool,
    /// A fingerprint of the key (equality only, never shown): a worker keeps an SA's runtime
    /// state across snapshots only while SPI *and* key stay the same.
    key_id: u64,
    shared: Arc<SharedState>,
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
        let key_id = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.expose_key_and_salt().hash(&mut h);
            h.finish()
        };
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
            key_id,
            #[cfg(test)]
            fail_key_schedule: false,
            shared: Arc::new(SharedState {
                seq: Arc::new(AtomicU64::new(0)),
                window: Arc::new(Mutex::new(ReplayWindow::new(replay_window, esn))),
                owner: AtomicUsize::new(usize::MAX),
            }),
        }
    }

    /// Claims this SA's own counter for `core` (shared SAs need no claim).
    fn claim(&self, core: usize) -> Result<Claim, DbError> {
        match self.shared.owner.compare_exchange(
            usize::MAX,
            core,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(Claim {
                state: self.shared.clone(),
                core,
            }),
            Err(owner) => Err(DbError::Claimed {
                spi: self.spi,
                owner,
                core,
            }),
        }
    }

    fn outbound(
        &self,
        backend: Backend,
        shared: bool,
    ) -> Result<OutboundSa, espada_crypto::KeyError> {
        #[cfg(test)]
        if self.fail_key_schedule {
            return Err(espada_crypto::KeyError::Backend("injected failure"));
        }
        let sa = OutboundSa::new(
            self.spi,
            Cipher::new(backend, &self.key)?,
            self.esn,
            self.endpoints,
        );
        let sa = if shared {
            sa.with_shared_seq(self.shared.seq.clone())
        } else {
            sa
        };
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
            sa.with_shared_window(self.shared.window.clone())
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
    /// Tunnels.
    pub tunnels: Vec<TunnelSas>,
    /// Policies.
    pub spd: Spd,
    /// The policies compiled for IPv4: rebuilt by [`SaDb::new`], [`SaDbHandle::new`] and
    /// [`SaDbHandle::update`], the only ways a snapshot reaches the workers.
    pub spd_v4: crate::selector::SpdV4,
    /// Fraction of the sequence-number space after which an outbound SA raises a soft event
    /// (once per SA and core). Default 0.9.
    pub seq_warn: f64,
    inbound_index: HashMap<u32, (usize, Owner)>,
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
            tunnels,
            spd,
            spd_v4: Default::default(),
            seq_warn: 0.9,
            inbound_index: HashMap::default(),
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
            let g = &mut t.outbound;
            for s in std::iter::once(&mut g.fallback).chain(g.per_cpu.iter_mut()) {
                s.seq_guard = Some(guard(s));
            }
        }
    }

    /// Every outbound SA of every tunnel.
    pub fn outbound_specs(&self) -> impl Iterator<Item = &SaSpec> {
        self.tunnels.iter().flat_map(|t| t.outbound.all())
    }

    /// The tunnel index by name.
    pub fn tunnel(&self, name: &str) -> Option<usize> {
        self.tunnels.iter().position(|t| t.name == name)
    }
}

/// Publishes snapshots to workers.
#[derive(Debug)]
pub struct SaDbHandle {
    current: ArcSwap<SaDb>,
    publish_lock: Mutex<()>,
}

impl SaDbHandle {
    /// Starts with `db`.
    pub fn new(mut db: SaDb) -> Arc<SaDbHandle> {
        // The policies may have been edited since the snapshot was made: compile them now.
        db.spd_v4 = crate::selector::SpdV4::compile(&db.spd);
        Arc::new(SaDbHandle {
            current: ArcSwap::from_pointee(db),
            publish_lock: Mutex::new(()),
        })
    }

    /// The current snapshot (lock-free).
    #[inline]
    pub fn load(&self) -> Arc<SaDb> {
        self.current.load_full()
    }

    /// The current generation (one atomic load and no reference count change).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Changes the database with `f` on a copy of the current snapshot and publishes it with the
    /// next generation number. Control plane only; workers pick it up at their next burst.
    pub fn update(&self, f: impl FnOnce(&mut SaDb)) -> Result<u64, DbError> {
        let _g = self.publish_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (*self.current.load_full()).clone();
        f(&mut next);
        next.generation += 1;
        next.reindex()?;
        let g = next.generation;
        self.current.store(Arc::new(next));
        Ok(g)
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

struct OutRt {
    sa: OutboundSa,
    life: LifetimeTracker,
    seq_warned: bool,
    _claim: Option<Claim>,
    key_id: u64,
}

struct InRt {
    sa: InboundSa,
    life: LifetimeTracker,
    tunnel: usize,
    key_id: u64,
}

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

/// One worker's runtime SAs. Touched by that worker only.
pub struct CoreSas {
    core: usize,
    db: Arc<SaDb>,
    outbound: Vec<Option<OutRt>>,
    inbound: SpiMap<InRt>,
    expired: HashSet<u32>,
    events_lost: u64,
    /// Per tunnel: the acquire this worker would raise (`Some(cpu)`), when the SA it should
    /// send on is still awaiting the IKE daemon.
    acquire: Vec<Option<Option<usize>>>,
    /// Per tunnel: a packet wanted that SA since the last [`CoreSas::raise_acquires`].
    acquire_hit: Vec<bool>,
    /// Per tunnel: when the last acquire went (seconds).
    acquire_last: Vec<u64>,
}

impl CoreSas {
    /// Runtime state for worker `core` from snapshot `db` at time `now`.
    pub fn new(core: usize, db: Arc<SaDb>, now: u64) -> Result<CoreSas, DbError> {
        let mut c = CoreSas {
            core,
            db: db.clone(),
            outbound: Vec::new(),
            inbound: SpiMap::default(),
            expired: HashSet::default(),
            events_lost: 0,
            acquire: Vec::new(),
            acquire_hit: Vec::new(),
            acquire_last: Vec::new(),
        };
        c.rebuild(db, now)?;
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
        if handle.generation() == self.db.generation {
            return Ok(false);
        }
        self.rebuild(handle.load(), now)?;
        Ok(true)
    }

    /// Moves to snapshot `db`, keeping the runtime state (counters, sequence numbers, replay
    /// windows) of every SA that stays. Transactional: everything that can fail (the key
    /// schedules of SAs this core does not hold yet) is built first; on a failure nothing of the
    /// live state has been touched, so no counter or window restarts under the same key.
    fn rebuild(&mut self, db: Arc<SaDb>, now: u64) -> Result<(), DbError> {
        let key_err = |spi| move |err| DbError::Key { spi, err };
        // Phase 1 (may fail, changes nothing).
        let have_out: HashSet<(u32, u64)> = self
            .outbound
            .iter()
            .flatten()
            .map(|o| (o.sa.spi, o.key_id))
            .collect();
        let mut fresh_out: HashMap<u32, OutRt> = HashMap::default();
        let mut out_plan: Vec<Option<(u32, u64, Lifetimes)>> = Vec::with_capacity(db.tunnels.len());
        let mut acquire = Vec::with_capacity(db.tunnels.len());
        for t in 0..db.tunnels.len() {
            let mut spec = db.outbound_for(t, self.core);
            let mut want = None;
            // A slot the IKE daemon has not filled: ask for it, and send on the fallback SA
            // meanwhile (or drop, when that one is waiting too).
            if spec.awaiting_ike {
                want = Some(spec.cpu);
                spec = &db.tunnels[t].outbound.fallback;
            }
            if spec.awaiting_ike {
                acquire.push(Some(None));
                out_plan.push(None);
                continue;
            }
            acquire.push(want);
            if self.expired.contains(&spec.spi) {
                spec = &db.tunnels[t].outbound.fallback;
            }
            if self.expired.contains(&spec.spi) {
                out_plan.push(None);
                continue;
            }
            out_plan.push(Some((spec.spi, spec.key_id, spec.lifetimes)));
            if !have_out.contains(&(spec.spi, spec.key_id)) && !fresh_out.contains_key(&spec.spi) {
                let shared = db.outbound_is_shared(spec);
                // (A claim taken here and then abandoned by a later failure is released when
                // `fresh_out` is dropped.)
                let claim = if shared {
                    None
                } else {
                    Some(spec.claim(self.core)?)
                };
                let sa = spec
                    .outbound(db.backend, shared)
                    .map_err(key_err(spec.spi))?;
                fresh_out.insert(
                    spec.spi,
                    OutRt {
                        sa,
                        life: LifetimeTracker::new(spec.lifetimes, now),
                        seq_warned: false,
                        _claim: claim,
                        key_id: spec.key_id,
                    },
                );
            }
        }
        let mut fresh_in: HashMap<u32, InRt> = HashMap::default();
        let mut in_plan: Vec<(u32, usize, u64, Lifetimes)> = Vec::new();
        for (t, tun) in db.tunnels.iter().enumerate() {
            for s in tun
                .inbound
                .all()
                .chain(tun.draining.iter())
                .filter(|s| !s.awaiting_ike)
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
        // Phase 2 (cannot fail): assemble, moving the live state over.
        let mut old_out: HashMap<u32, OutRt> = self
            .outbound
            .drain(..)
            .flatten()
            .map(|o| (o.sa.spi, o))
            .collect();
        for p in out_plan {
            // The live state moves on only under the same key (a new key is a new SA).
            let rt = p.and_then(|(spi, k, life)| {
                let mut rt = old_out
                    .remove(&spi)
                    .filter(|o| o.key_id == k)
                    .or_else(|| fresh_out.remove(&spi))?;
                // Limits may have changed (`espada sa update`, a reload); the clock stays.
                rt.life.set_limits(life);
                Some(rt)
            });
            self.outbound.push(rt);
        }
        let mut old_in = std::mem::take(&mut self.inbound);
        for (spi, t, k, life) in in_plan {
            let kept = old_in.remove(spi).filter(|r| r.key_id == k);
            if let Some(mut rt) = kept.or_else(|| fresh_in.remove(&spi)) {
                rt.tunnel = t; // tunnels may have moved in the new snapshot
                rt.life.set_limits(life);
                self.inbound.insert(spi, rt);
            }
        }
        self.acquire_hit.resize(acquire.len(), false);
        self.acquire_last.resize(acquire.len(), 0);
        self.acquire = acquire;
        self.db = db;
        Ok(())
    }

    /// A packet wants tunnel `t`'s SA (the fast path: one load and a branch). Notes it when
    /// that SA is still awaiting the IKE daemon.
    #[inline(always)]
    pub fn note_use(&mut self, t: usize) {
        if let Some(Some(_)) = self.acquire.get(t) {
            self.acquire_hit[t] = true;
        }
    }

    /// Raises the acquires of tunnels whose SA packets wanted since the last call, at most once
    /// a second per tunnel (call every few hundred polls). Returns how many went.
    pub fn raise_acquires(&mut self, now: u64, q: &AcquireQueue) -> usize {
        let mut n = 0;
        for t in 0..self.acquire.len() {
            let Some(cpu) = self.acquire[t] else { continue };
            if !self.acquire_hit[t] || (self.acquire_last[t] != 0 && now < self.acquire_last[t] + 1)
            {
                continue;
            }
            self.acquire_hit[t] = false;
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

    /// Where to process inbound SPI `spi`.
    #[inline]
    pub fn route(&self, spi: u32) -> Route {
        if self.inbound.contains_key(spi) {
            return Route::Local;
        }
        if self.expired.contains(&spi) {
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

    /// Events that did not fit in the queue.
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    /// Checks lifetimes after a burst (not per packet). Soft limits raise an event; hard limits
    /// raise one and remove the SA: outbound traffic moves to the fallback SA (or is dropped if
    /// the fallback itself expired), inbound traffic for it is dropped as expired.
    pub fn check_lifetimes(&mut self, now: u64, events: &EventQueue) {
        let core = self.core;
        let mut lost = 0;
        let mut push = |e: SaEvent| {
            if events.push(e).is_err() {
                lost += 1;
            }
        };
        let mut switch = Vec::new();
        let warn = self.db.seq_warn;
        for (t, slot) in self.outbound.iter_mut().enumerate() {
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
                        switch.push((t, o.sa.spi));
                    }
                }
            }
        }
        let mut gone = Vec::new();
        for (spi, r) in self.inbound.iter_mut() {
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
                    gone.push(spi);
                }
            }
        }
        self.events_lost += lost;
        for spi in gone {
            self.inbound.remove(spi);
            self.expired.insert(spi);
        }
        for (t, spi) in switch {
            self.expired.insert(spi);
            let fb = &self.db.tunnels[t].outbound.fallback;
            self.outbound[t] = if self.expired.contains(&fb.spi) {
                None
            } else {
                fb.outbound(self.db.backend, true).ok().map(|sa| OutRt {
                    sa,
                    life: LifetimeTracker::new(fb.lifetimes, now),
                    seq_warned: false,
                    _claim: None,
                    key_id: fb.key_id,
                })
            };
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
mod tests;
