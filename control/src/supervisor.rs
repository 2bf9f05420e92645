//! The gateway's control loop, off the fast path: everything that changes a running gateway's
//! SA database goes through one [`Supervisor`], owned by the gateway's main thread. The socket
//! thread hands it requests ([`Command`]) and waits for the answer; the main thread calls
//! [`Supervisor::tick`] a few times a second and [`Supervisor::execute`] for each command.
//!
//! What it does:
//! * `lab_rekey` generations at their time boundaries (send on generation g, accept g±1);
//! * `reload` (also SIGHUP): re-read the configuration, publish it make-before-break;
//! * `sa rekey`: move `lab_rekey` tunnels one generation ahead now (the peer accepts g+1
//!   already; rekey it too and both sides send on the new keys, with no packet lost);
//! * `sa add` / `sa del`: a whole tunnel (deleted: its SAs go and its policies turn into
//!   discard placeholders, so its traffic is dropped and counted, never sent in the clear; added
//!   back: from the configuration), or one SA given by SPI and key (an inbound SA replaced this
//!   way keeps being accepted until deleted: make-before-break);
//! * `sa update`: new lifetimes for an SA (its clock and counters stay).
//!
//! Every change is published through [`SaDbHandle::update`](espada_sadb::db::SaDbHandle): the
//! workers pick it up at their next burst, keeping the runtime state of every SA whose SPI and
//! key stay. A reload returns the gateway to its file (runtime SA changes and tunnel deletions
//! are dropped) but keeps `sa rekey`'s generation offsets, which must stay in step with the peer.

use crate::{Request, Response};
use espada_config as config;
use espada_crypto::KeyMaterial;
use espada_dataplane::seqstore::SeqStore;
use espada_dataplane::worker::GatewayShared;
use espada_sadb::db::{Direction, SaDb, SaEvent, SaSpec, TunnelSas};
use espada_sadb::lifetime::{Lifetimes, Limits, Stage};
use espada_sadb::selector::Action;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

/// A request the socket thread passes to the supervisor, with where to send the answer.
pub struct Command {
    /// The request.
    pub req: Request,
    /// Where the answer goes.
    pub reply: mpsc::Sender<Response>,
}

/// The running gateway's control state.
pub struct Supervisor {
    /// The configuration in force.
    pub config: config::Config,
    path: PathBuf,
    workers: usize,
    shared: GatewayShared,
    seq: SeqStore,
    /// Per configured tunnel: the generation in force (`lab_rekey`).
    gens: Vec<Option<u64>>,
    /// Per tunnel name: generations moved ahead by `sa rekey`.
    bump: HashMap<String, u64>,
    /// Deleted tunnels: name → the names of the policies turned into placeholders.
    deleted: BTreeMap<String, Vec<String>>,
    /// Acquires raised by workers and not yet taken by the IKE daemon (`sa acquires`):
    /// (tunnel index, CPU), each once.
    acquires: Vec<(usize, Option<usize>)>,
    /// Lifetime events of SAs an IKE daemon installed, for it to rekey (soft) or delete (hard):
    /// (SPI, outbound, hard), each once.
    expires: Vec<(u32, bool, bool)>,
    /// This run of the gateway (nanoseconds since the epoch at start): the IKE daemon's
    /// plugin sees it change when espada restarted and lost the SAs it had installed.
    boot: u64,
    /// Per tunnel: per-CPU acquires handed to the IKE daemon since it last installed a
    /// per-CPU SA (a peer without RFC 9611 answers each with one more ordinary Child SA).
    pcpu_asked: HashMap<String, u32>,
    /// Tunnels whose per-CPU acquires were stopped by [`PCPU_ACQUIRES_UNANSWERED`] (reports).
    pub pcpu_stopped: u64,
    /// Lines for the gateway's log, taken by [`Supervisor::tick`].
    notes: Vec<String>,
    /// The IKE daemon run the plugin last named (`daemon` in its requests; 0: none yet).
    daemon: u64,
    /// Configured tunnels by name, and by black endpoints (local, remote: the first one).
    names: HashMap<String, usize>,
    ends: HashMap<(IpAddr, IpAddr), usize>,
    /// An open transaction (`sa batch`, a rekey of every tunnel, a tick's generations): the
    /// changes go to one copy, published once by [`Supervisor::commit`].
    txn: Option<Txn>,
    /// The next UNIX second at which a `lab_rekey` tunnel crosses a generation boundary (the
    /// tick looks at the tunnels only then; 0: look at the next tick).
    next_due: u64,
}

/// The copy a transaction changes, and what to restore if it is refused.
struct Txn {
    db: Arc<SaDb>,
    /// Sequence reservations to extend before the copy is published.
    advance: bool,
    gens: Vec<Option<u64>>,
    bump: HashMap<String, u64>,
    deleted: BTreeMap<String, Vec<String>>,
    pcpu_asked: HashMap<String, u32>,
    notes: usize,
}

/// Changes one `sa batch` request may carry (each batch is one snapshot).
pub const MAX_BATCH: usize = 20_000;

/// Tunnels moved to a new generation per snapshot (`sa rekey` of every tunnel, a generation
/// boundary): 10 000 tunnels in one snapshot kept each worker rebuilding for a third of a
/// second (a dip in every tunnel's traffic); 512 are a few milliseconds. The rest follow at
/// the next ticks, one slice each (the main loop ticks at least every 50 ms).
pub const REKEY_SLICE: usize = 512;

fn index(c: &config::Config) -> (HashMap<String, usize>, HashMap<(IpAddr, IpAddr), usize>) {
    let mut names = HashMap::with_capacity(c.tunnels.len());
    let mut ends = HashMap::with_capacity(c.tunnels.len());
    for (i, t) in c.tunnels.iter().enumerate() {
        names.entry(t.name.clone()).or_insert(i);
        ends.entry((t.local, t.remote)).or_insert(i);
    }
    (names, ends)
}

/// Per-CPU acquires per tunnel the IKE daemon may leave unanswered by a per-CPU SA before
/// the tunnel stops asking for them (its peer does not do RFC 9611): the Child SAs such a
/// peer makes stay bounded by this, whatever it does.
pub const PCPU_ACQUIRES_UNANSWERED: u32 = 4;

/// Carries the SAs an IKE daemon installed in `old` (same tunnel, previous snapshot) over to
/// `new`, which a reload built from the file (placeholders only): slot by slot, for the slots
/// the new configuration still has; the replaced inbound SAs still draining go along. Returns
/// how many SAs were kept.
fn keep_installed(new: &mut TunnelSas, old: &TunnelSas) -> usize {
    new.pcpu_acquires = old.pcpu_acquires;
    let mut n = 0;
    for (ng, og) in [
        (&mut new.outbound, &old.outbound),
        (&mut new.inbound, &old.inbound),
    ] {
        for (ns, os) in ng.all_mut().zip(og.all()) {
            if !os.awaiting_ike && ns.awaiting_ike && ns.cpu == os.cpu {
                *ns = os.clone();
                n += 1;
            }
        }
    }
    for d in &old.draining {
        if !new.draining.iter().any(|x| x.spi == d.spi) {
            new.draining.push(d.clone());
        }
    }
    n
}

fn ok(data: Value) -> Response {
    Response {
        ok: true,
        error: None,
        data,
    }
}

fn err(msg: impl Into<String>) -> Response {
    Response {
        ok: false,
        error: Some(msg.into()),
        data: Value::Null,
    }
}

const PLACEHOLDER: &str = " [tunnel deleted]";

impl Supervisor {
    /// Takes over a gateway whose SA database was built from `config` (read from `path`) for
    /// `workers` workers at UNIX time `now`.
    pub fn new(
        config: config::Config,
        path: PathBuf,
        workers: usize,
        shared: GatewayShared,
        seq: SeqStore,
        now: u64,
    ) -> Supervisor {
        let gens = (0..config.tunnels.len())
            .map(|t| config.generation(t, now))
            .collect();
        let (names, ends) = index(&config);
        Supervisor {
            names,
            ends,
            txn: None,
            next_due: 0,
            config,
            path,
            workers,
            shared,
            seq,
            gens,
            bump: HashMap::new(),
            deleted: BTreeMap::new(),
            acquires: Vec::new(),
            expires: Vec::new(),
            pcpu_asked: HashMap::new(),
            pcpu_stopped: 0,
            notes: Vec::new(),
            daemon: 0,
            boot: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        }
    }

    /// The SA database this supervisor publishes to.
    pub fn sadb(&self) -> std::sync::Arc<espada_sadb::db::SaDbHandle> {
        self.shared.sadb.clone()
    }

    /// The sequence-number reservations (for the gateway's reports).
    pub fn seq_store(&self) -> &SeqStore {
        &self.seq
    }

    fn generation(&self, t: usize, now: u64) -> Option<u64> {
        let b = self
            .bump
            .get(&self.config.tunnels[t].name)
            .copied()
            .unwrap_or(0);
        self.config.generation(t, now).map(|g| g + b)
    }

    fn guard(&mut self, ts: &mut TunnelSas) -> Result<(), String> {
        self.seq.attach_tunnel(ts);
        self.reserve()
    }

    /// Extends the sequence reservations now, or (in a transaction) before it is published.
    fn reserve(&mut self) -> Result<(), String> {
        if let Some(t) = &mut self.txn {
            t.advance = true;
            return Ok(());
        }
        self.seq
            .advance()
            .map(|_| ())
            .map_err(|e| format!("cannot reserve sequence numbers: {e}"))
    }

    /// The snapshot commands read: the transaction's copy while one is open.
    fn view(&self) -> Arc<SaDb> {
        match &self.txn {
            Some(t) => t.db.clone(),
            None => self.shared.sadb.load(),
        }
    }

    /// Runs `f` as one transaction: everything it changes is published as one snapshot, or
    /// (if `f` or the publication fails) nothing is. Inside an open transaction, `f` joins it.
    pub fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<R, String>,
    ) -> Result<R, String> {
        if self.txn.is_some() {
            return f(self);
        }
        self.txn = Some(Txn {
            db: self.shared.sadb.load(),
            advance: false,
            gens: self.gens.clone(),
            bump: self.bump.clone(),
            deleted: self.deleted.clone(),
            pcpu_asked: self.pcpu_asked.clone(),
            notes: self.notes.len(),
        });
        let r = f(self);
        let t = self.txn.take().expect("the transaction is open");
        let done = r.and_then(|v| {
            if t.advance {
                self.seq
                    .advance()
                    .map_err(|e| format!("cannot reserve sequence numbers: {e}"))?;
            }
            // Unchanged: nothing to publish.
            if !Arc::ptr_eq(&t.db, &self.shared.sadb.load()) {
                let db = Arc::try_unwrap(t.db.clone()).unwrap_or_else(|a| (*a).clone());
                self.shared.sadb.replace(db).map_err(|e| e.to_string())?;
            }
            Ok(v)
        });
        if done.is_err() {
            self.gens = t.gens;
            self.bump = t.bump;
            self.deleted = t.deleted;
            self.pcpu_asked = t.pcpu_asked;
            self.notes.truncate(t.notes);
        }
        done
    }

    /// Publishes configured tunnel `t` at generation `g`; returns the SPIs it now sends on.
    fn install_generation(&mut self, t: usize, g: u64) -> Result<Vec<u32>, String> {
        let name = self.config.tunnels[t].name.clone();
        if self.deleted.contains_key(&name) {
            self.gens[t] = Some(g);
            return Ok(vec![]);
        }
        let mut ts = self.config.tunnel_sas(t, Some(g));
        self.guard(&mut ts)?;
        let spis: Vec<u32> = ts.outbound.all().map(|s| s.spi).collect();
        let mut missing = false;
        self.publish(|db| match db.tunnel(&name) {
            Some(i) => db.tunnels[i] = Arc::new(ts),
            None => missing = true,
        })?;
        if missing {
            return Err(format!("tunnel \"{name}\" is not in the SA database"));
        }
        self.gens[t] = Some(g);
        Ok(spis)
    }

    /// Housekeeping, a few times a second: `lab_rekey` generation boundaries, and the
    /// sequence-number reservations. Returns what it did, for the log.
    pub fn tick(&mut self, now: u64) -> Vec<String> {
        let mut log = std::mem::take(&mut self.notes);
        if now >= self.next_due {
            log.extend(self.generations(now));
        }
        if let Err(e) = self.seq.advance() {
            let n = self.seq.write_errors();
            if n == 1 || n.is_multiple_of(100) {
                log.push(format!("cannot extend the sequence reservations ({e}); SAs stop sending when their reservation runs out (drop reason seq-unreserved)"));
            }
        }
        log
    }

    /// Installs the generation every `lab_rekey` tunnel is due for at `now`, in one snapshot.
    fn generations(&mut self, now: u64) -> Vec<String> {
        let mut log = Vec::new();
        // The next boundary of any tunnel (boundaries are multiples of its soft lifetime).
        self.next_due = self
            .config
            .tunnels
            .iter()
            .filter_map(|t| {
                t.lab_rekey
                    .as_ref()
                    .map(|r| (now / r.seconds + 1) * r.seconds)
            })
            .min()
            .unwrap_or(u64::MAX);
        let mut due: Vec<(usize, u64)> = (0..self.config.tunnels.len())
            .filter_map(|t| {
                let g = self.generation(t, now)?;
                (self.gens[t] != Some(g)).then_some((t, g))
            })
            .collect();
        if due.len() > REKEY_SLICE {
            // The rest at the next tick.
            due.truncate(REKEY_SLICE);
            self.next_due = 0;
        }
        if !due.is_empty() {
            // Tunnels crossing a generation boundary together are published as one snapshot
            // per slice: each worker revisits those tunnels once.
            let r = self.transaction(|s| {
                let mut lines = Vec::new();
                for &(t, g) in &due {
                    let name = s.config.tunnels[t].name.clone();
                    let spis = s
                        .install_generation(t, g)
                        .map_err(|e| format!("tunnel \"{name}\": {e}"))?;
                    if !spis.is_empty() {
                        lines.push(format!(
                            "tunnel \"{name}\" rekeyed to generation {g}: sending on {}",
                            hexes(&spis)
                        ));
                    }
                }
                Ok(lines)
            });
            match r {
                Ok(lines) if lines.len() > 8 => log.push(format!(
                    "{} tunnels rekeyed to their next generation in one snapshot (first: {}){}",
                    lines.len(),
                    lines[0],
                    if self.next_due == 0 {
                        "; more follow at the next tick"
                    } else {
                        ""
                    }
                )),
                Ok(lines) => log.extend(lines),
                Err(e) => {
                    // Tried again at the next tick.
                    self.next_due = 0;
                    log.push(format!(
                        "{} due for their next generation not rekeyed ({e}); staying on the current one",
                        count(due.len(), "tunnel", "tunnels")
                    ))
                }
            }
        }
        log
    }

    /// Re-reads the configuration file and publishes it (make-before-break). What a running
    /// gateway cannot change (name, interfaces, addresses, SA mode) is refused with the reason.
    pub fn reload(&mut self, now: u64) -> Result<String, String> {
        let c = config::load(&self.path).map_err(|e| e.to_string())?;
        let old = &self.config;
        let side =
            |p: &Option<config::PortConfig>| p.as_ref().map(|p| (p.interface.clone(), p.address));
        if c.name != old.name {
            return Err(format!(
                "the gateway name changed ({} -> {}): restart to rename",
                old.name, c.name
            ));
        }
        if side(&c.red) != side(&old.red) || side(&c.black) != side(&old.black) {
            return Err("interfaces or addresses changed: restart to move the gateway".into());
        }
        if c.sa_mode != old.sa_mode {
            return Err("sa_mode changed: restart to change it".into());
        }
        let mut db = c
            .sadb_at(self.workers, Some(now))
            .map_err(|e| e.to_string())?;
        // Generations moved ahead by `sa rekey` stay ahead (the peer is there too).
        let mut gens = Vec::with_capacity(c.tunnels.len());
        for (t, tc) in c.tunnels.iter().enumerate() {
            let b = self.bump.get(&tc.name).copied().unwrap_or(0);
            let g = c.generation(t, now).map(|g| g + b);
            if b > 0 {
                db.tunnels[t] = Arc::new(c.tunnel_sas(t, g));
            }
            gens.push(g);
        }
        let seq = &mut self.seq;
        seq.attach(&mut db);
        seq.advance()
            .map_err(|e| format!("cannot reserve sequence numbers: {e}"))?;
        let ike: Vec<String> = c
            .tunnels
            .iter()
            .filter(|t| t.ike)
            .map(|t| t.name.clone())
            .collect();
        let mut kept = 0;
        let mut same = 0;
        let g = self
            .shared
            .sadb
            .update(|cur| {
                // SAs the IKE daemon installed stay: the file only has placeholders for them.
                for t in db.tunnels.iter_mut() {
                    let Some(i) = cur.tunnel(&t.name) else {
                        continue;
                    };
                    let old = &cur.tunnels[i];
                    if ike.contains(&t.name) {
                        kept += keep_installed(Arc::make_mut(t), old);
                    }
                    // A tunnel the file leaves as it was stays shared with the snapshot in
                    // force: the workers do not revisit it (10 000 tunnels, one edited).
                    if old.same_as(t) {
                        *t = old.clone();
                        same += 1;
                    }
                }
                cur.tunnels = db.tunnels;
                cur.spd = db.spd;
            })
            .map_err(|e| e.to_string())?;
        let msg = format!(
            "reloaded {}: {} ({same} unchanged), {} (snapshot {g}); SAs whose SPI and key stay keep their counters and windows{}",
            self.path.display(),
            count(c.tunnels.len(), "tunnel", "tunnels"),
            count(c.spd.policies.len(), "policy", "policies"),
            if kept > 0 {
                format!("; {} the IKE daemon installed kept", count(kept, "SA", "SAs"))
            } else {
                String::new()
            }
        );
        self.gens = gens;
        self.deleted.clear();
        (self.names, self.ends) = index(&c);
        self.config = c;
        self.next_due = 0;
        Ok(msg)
    }

    /// A worker's acquire (an SA the IKE daemon has not negotiated yet): kept until the
    /// daemon asks (`sa acquires`), once per tunnel and CPU. Returns a line for the log the
    /// first time.
    pub fn note_acquire(&mut self, a: espada_sadb::db::Acquire) -> Option<String> {
        if self.acquires.contains(&(a.tunnel, a.cpu)) || self.acquires.len() >= 1024 {
            return None;
        }
        self.acquires.push((a.tunnel, a.cpu));
        let db = self.shared.sadb.load();
        let name = db.tunnels.get(a.tunnel).map_or("?", |t| t.name.as_str());
        Some(match a.cpu {
            Some(c) => format!("acquire: tunnel \"{name}\" wants its per-CPU SA {c} (core {} sends on the fallback SA meanwhile)", a.core),
            None => format!("acquire: tunnel \"{name}\" has no SA yet (core {} drops its packets until the IKE daemon installs one)", a.core),
        })
    }

    /// A lifetime event: for an SA of a tunnel an IKE daemon keys, kept until the daemon asks
    /// (`sa acquires`), as the kernel's expire messages tell it to rekey or delete.
    pub fn note_expire(&mut self, e: &SaEvent) {
        let db = self.shared.sadb.load();
        let Some(t) = db.tunnels.get(e.tunnel) else {
            return;
        };
        let ike = self.is_ike(&t.name);
        let k = (e.spi, e.dir == Direction::Outbound, e.stage == Stage::Hard);
        // A soft event about the sequence-number space is a soft expire too: the daemon
        // rekeys before the space (2^32 without ESN) runs out.
        if ike && !self.expires.contains(&k) && self.expires.len() < 1024 {
            self.expires.push(k);
        }
    }

    /// The IKE daemon's plugin names its run in every request. A new run (charon restarted or
    /// killed) means the SAs the old one installed are orphans: nobody will rekey or delete
    /// them. They keep forwarding until the new run installs its first SA in their tunnel
    /// (see [`Supervisor::retire_orphans`]), so traffic goes on meanwhile.
    fn note_daemon(&mut self, d: u64) {
        if d == 0 || d == self.daemon {
            return;
        }
        if self.daemon != 0 {
            self.notes.push(format!(
                "a new IKE daemon run ({d:#x}, was {:#x}): the SAs the old one installed forward until the new one installs its own, then go",
                self.daemon
            ));
        }
        self.daemon = d;
    }

    /// The current daemon run installed an outbound SA in tunnel `i`: every SA an earlier run installed
    /// there goes (its slot awaits the daemon again; a replaced inbound SA still draining is
    /// removed). Returns how many went.
    fn retire_orphans(db: &mut SaDb, i: usize, current: u64) -> usize {
        let orphan = |s: &SaSpec| !s.awaiting_ike && s.daemon != 0 && s.daemon != current;
        let t = db.tunnel_mut(i);
        let mut n = 0;
        for s in t.outbound.all_mut().chain(t.inbound.all_mut()) {
            if orphan(s) {
                s.awaiting_ike = true;
                n += 1;
            }
        }
        let before = t.draining.len();
        t.draining.retain(|s| !orphan(s));
        n + before - t.draining.len()
    }

    /// Per-CPU acquires on or off for a tunnel (the IKE daemon's policy says whether its peer
    /// agreed to per-CPU SAs: `pcpu_acquires` of the kernel interface).
    fn acquire_mode(&mut self, a: &Value) -> Result<Value, String> {
        let name = self.tunnel_of(a)?;
        let on = a
            .get("pcpu")
            .and_then(Value::as_bool)
            .ok_or("sa acquire-mode needs \"pcpu\": true or false")?;
        let db = self.view();
        let i = db
            .tunnel(&name)
            .ok_or_else(|| format!("tunnel \"{name}\" is not up"))?;
        if db.tunnels[i].pcpu_acquires != on {
            drop(db);
            self.publish(|db| db.tunnel_mut(i).pcpu_acquires = on)?;
            self.notes.push(format!(
                "tunnel \"{name}\": per-CPU acquires {} (the IKE daemon's policy{})",
                if on { "on" } else { "off" },
                if on {
                    ""
                } else {
                    ": its peer did not agree to per-CPU SAs, every core sends on the fallback SA"
                }
            ));
        }
        if on {
            self.pcpu_asked.remove(&name);
        }
        Ok(json!({"tunnel": name, "pcpu_acquires": on}))
    }

    /// Counts a per-CPU acquire handed to the daemon for tunnel `i`; past
    /// [`PCPU_ACQUIRES_UNANSWERED`] without a per-CPU SA installed, the tunnel stops asking.
    fn count_pcpu_acquire(&mut self, i: usize) {
        let db = self.shared.sadb.load();
        let Some(t) = db.tunnels.get(i) else { return };
        let name = t.name.clone();
        let n = self.pcpu_asked.entry(name.clone()).or_insert(0);
        *n += 1;
        if *n >= PCPU_ACQUIRES_UNANSWERED && t.pcpu_acquires {
            drop(db);
            if self
                .publish(|db| db.tunnel_mut(i).pcpu_acquires = false)
                .is_ok()
            {
                self.pcpu_stopped += 1;
                self.notes.push(format!(
                    "tunnel \"{name}\": {PCPU_ACQUIRES_UNANSWERED} per-CPU acquires were answered without a per-CPU SA (the IKE peer does not do RFC 9611 per-CPU SAs): no more per-CPU acquires, every core sends on the fallback SA"
                ));
            }
        }
    }

    /// The pending acquires, for the IKE daemon's kernel interface; they are taken.
    fn take_acquires(&mut self) -> Value {
        let pcpu: Vec<usize> = self
            .acquires
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(t, _)| *t)
            .collect();
        for t in pcpu {
            self.count_pcpu_acquire(t);
        }
        let db = self.shared.sadb.load();
        let list: Vec<Value> = self
            .acquires
            .drain(..)
            .filter_map(|(t, cpu)| {
                let t = db.tunnels.get(t)?;
                let ep = t.outbound.fallback.endpoints;
                Some(json!({
                    "tunnel": t.name, "cpu": cpu,
                    "local": ep.local.to_string(), "remote": ep.remote.to_string(),
                }))
            })
            .collect();
        let expires: Vec<Value> = self
            .expires
            .drain(..)
            .filter_map(|(spi, outbound, hard)| {
                // The SA's destination, as the kernel's expire names it.
                let t = db.tunnels.iter().find(|t| {
                    t.outbound
                        .all()
                        .chain(t.inbound.all())
                        .chain(t.draining.iter())
                        .any(|s| s.spi == spi)
                })?;
                let ep = t.outbound.fallback.endpoints;
                let dst = if outbound { ep.remote } else { ep.local };
                Some(json!({"spi": spi, "hard": hard, "dst": dst.to_string()}))
            })
            .collect();
        json!({ "acquires": list, "expires": expires, "boot": self.boot })
    }

    /// Answers a command that changes the gateway (`reload`, `sa ...`).
    pub fn execute(&mut self, req: &Request, now: u64) -> Response {
        let a = &req.args;
        if let Some(d) = a.get("daemon").and_then(Value::as_u64) {
            self.note_daemon(d);
        }
        let r = match (req.cmd.as_str(), req.what.as_str()) {
            ("reload", _) => self.reload(now).map(|m| json!({ "reload": m })),
            ("sa", "rekey") => {
                let t = a.get("tunnel").and_then(Value::as_str);
                self.transaction(|s| s.rekey(t, now))
            }
            ("sa", "batch") => self.batch(a, now),
            ("sa", "add") => self.add(a),
            ("sa", "del") => self.del(a),
            ("sa", "update") => self.update(a),
            ("sa", "acquires") => Ok(self.take_acquires()),
            ("sa", "acquire-mode") => self.acquire_mode(a),
            ("sa", w) => Err(format!(
                "unknown sa command \"{w}\"; one of: add, del, update, rekey, batch, acquires, acquire-mode"
            )),
            (c, _) => Err(format!("the supervisor does not take \"{c}\"")),
        };
        match r {
            Ok(v) => ok(v),
            Err(e) => err(e),
        }
    }

    /// A lifetime event as a person can act on it; `true` when it deserves a warning.
    pub fn describe_event(&self, e: &SaEvent) -> (bool, String) {
        let db = self.shared.sadb.load();
        let t = db.tunnels.get(e.tunnel);
        let name = t.map_or("?", |t| t.name.as_str());
        let lab = self
            .config
            .tunnels
            .iter()
            .any(|c| c.name == name && c.lab_rekey.is_some());
        let how = if lab {
            "`espada sa rekey` (lab_secret keys)"
        } else {
            "new keys: `espada sa add` on both gateways, or a reload with new [tunnel.keys]"
        };
        let spi = e.spi;
        if e.seq_space {
            return (true, format!(
                "outbound SA {spi:#010x} of tunnel \"{name}\" on core {} has used {:.0}% of its sequence-number space; rekey it before it runs out ({how}), or it stops sending (drop reason seq-cycled)",
                e.core, 100.0 * db.seq_warn
            ));
        }
        let fallback = t.map(|t| t.outbound.fallback.spi);
        match (e.dir, e.stage) {
            (Direction::Outbound, Stage::Hard) => match fallback {
                Some(f) if f != spi => (true, format!(
                    "per-CPU SA {spi:#010x} of tunnel \"{name}\" on core {c} expired (hard lifetime); core {c} now sends on fallback SA {f:#010x}",
                    c = e.core
                )),
                _ => (true, format!(
                    "outbound SA {spi:#010x} of tunnel \"{name}\" expired on core {} (hard lifetime): its packets are dropped (no-outbound-sa), never sent in the clear, until it gets new keys: {how}",
                    e.core
                )),
            },
            (Direction::Outbound, _) => (true, format!(
                "outbound SA {spi:#010x} of tunnel \"{name}\" on core {} reached its soft lifetime: rekey it now with {how}; at the hard lifetime it stops sending",
                e.core
            )),
            (Direction::Inbound, Stage::Hard) => (true, format!(
                "inbound SA {spi:#010x} of tunnel \"{name}\" expired on core {} (hard lifetime): packets on it are dropped (sa-expired)",
                e.core
            )),
            (Direction::Inbound, _) => (false, format!(
                "inbound SA {spi:#010x} of tunnel \"{name}\" reached its soft lifetime on core {}: the peer should rekey it",
                e.core
            )),
        }
    }

    fn tunnel_index(&self, name: &str) -> Result<usize, String> {
        self.names.get(name).copied().ok_or_else(|| {
            let n = self.config.tunnels.len();
            let some: Vec<&str> = self
                .config
                .tunnels
                .iter()
                .take(8)
                .map(|t| t.name.as_str())
                .collect();
            format!(
                "no tunnel \"{name}\" in {}; tunnels: {}{}",
                self.path.display(),
                some.join(", "),
                if n > 8 {
                    format!(" and {} more", n - 8)
                } else {
                    String::new()
                }
            )
        })
    }

    /// Whether the configured tunnel `name` is keyed by an IKE daemon.
    fn is_ike(&self, name: &str) -> bool {
        self.names
            .get(name)
            .is_some_and(|&i| self.config.tunnels[i].ike)
    }

    /// `sa batch`: the changes in `ops` (each `{"what": "add"|"del"|"update"|"rekey", "args":
    /// {...}}`, as the single commands take them) published as one snapshot. All or nothing: the
    /// first change refused refuses the batch, and nothing of it is applied.
    fn batch(&mut self, a: &Value, now: u64) -> Result<Value, String> {
        let ops = a
            .get("ops")
            .and_then(Value::as_array)
            .ok_or("sa batch needs \"ops\": a list of {\"what\": \"add\"|\"del\"|\"update\"|\"rekey\", \"args\": {...}}")?;
        if ops.len() > MAX_BATCH {
            return Err(format!(
                "a batch holds at most {MAX_BATCH} changes ({} given): split it",
                ops.len()
            ));
        }
        let null = Value::Null;
        let results = self.transaction(|s| {
            let mut out = Vec::with_capacity(ops.len());
            for (i, op) in ops.iter().enumerate() {
                let what = op.get("what").and_then(Value::as_str).unwrap_or("");
                let args = op.get("args").unwrap_or(&null);
                let r = match what {
                    "add" => s.add(args),
                    "del" => s.del(args),
                    "update" => s.update(args),
                    "rekey" => s.rekey(args.get("tunnel").and_then(Value::as_str), now),
                    w => Err(format!(
                        "\"{w}\" cannot be batched; one of: add, del, update, rekey"
                    )),
                };
                out.push(r.map_err(|e| format!("change {} ({what}): {e}", i + 1))?);
            }
            Ok(out)
        });
        let results = results.map_err(|e| format!("{e}; nothing of the batch was applied"))?;
        Ok(json!({
            "applied": results.len(),
            "snapshot": self.shared.sadb.generation(),
            "results": results,
        }))
    }

    fn rekey(&mut self, tunnel: Option<&str>, now: u64) -> Result<Value, String> {
        let ts: Vec<usize> = match tunnel {
            Some(n) => vec![self.tunnel_index(n)?],
            None => (0..self.config.tunnels.len()).collect(),
        };
        let mut done = Vec::new();
        let mut later = 0usize;
        for t in ts {
            let name = self.config.tunnels[t].name.clone();
            if self.config.tunnels[t].lab_rekey.is_none() {
                if tunnel.is_some() {
                    return Err(format!(
                        "tunnel \"{name}\" has static keys: no key can be derived for it. Install the new SAs with `espada sa add --tunnel {name} --dir in|out --spi SPI --key-file FILE` on both gateways (inbound first), then remove the old inbound ones with `espada sa del --spi SPI`"
                    ));
                }
                continue;
            }
            *self.bump.entry(name.clone()).or_insert(0) += 1;
            let g = self.generation(t, now).expect("lab_rekey tunnel");
            if done.len() >= REKEY_SLICE {
                // Installed by the next ticks, a slice each (see REKEY_SLICE).
                done.push(
                    json!({"tunnel": name, "generation": g, "sending_on": [], "pending": true}),
                );
                later += 1;
                self.next_due = 0;
                continue;
            }
            match self.install_generation(t, g) {
                Ok(spis) => done.push(json!({"tunnel": name, "generation": g, "sending_on": spis})),
                Err(e) => {
                    *self.bump.get_mut(&name).expect("just set") -= 1;
                    return Err(format!("tunnel \"{name}\": {e}"));
                }
            }
        }
        if done.is_empty() {
            return Err("no tunnel derives its keys from lab_secret with lab_rekey: nothing can be rekeyed without new keys (see `espada sa add`)".into());
        }
        let slices = later.div_ceil(REKEY_SLICE);
        Ok(json!({ "rekeyed": done, "pending": later, "slices_to_follow": slices }))
    }

    /// The tunnel an `sa add` names, or (as an IKE daemon's kernel interface gives it) the
    /// one whose black endpoints are `local` and `remote`.
    fn tunnel_of(&self, a: &Value) -> Result<String, String> {
        if let Some(t) = a.get("tunnel").and_then(Value::as_str) {
            return Ok(t.to_string());
        }
        let addr = |k: &str| {
            a.get(k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<std::net::IpAddr>().ok())
        };
        let (Some(l), Some(r)) = (addr("local"), addr("remote")) else {
            return Err("sa add needs a tunnel (or its local and remote addresses)".into());
        };
        self.ends
            .get(&(l, r))
            .map(|&i| self.config.tunnels[i].name.clone())
            .ok_or_else(|| format!("no tunnel from {l} to {r} in {}", self.path.display()))
    }

    fn add(&mut self, a: &Value) -> Result<Value, String> {
        let name = self.tunnel_of(a)?;
        match a.get("spi") {
            None => self.add_tunnel(&name),
            Some(_) => self.add_sa(&name, a),
        }
    }

    /// Puts a deleted tunnel back, as the configuration defines it.
    fn add_tunnel(&mut self, name: &str) -> Result<Value, String> {
        let t = self.tunnel_index(name)?;
        let Some(placeholders) = self.deleted.get(name).cloned() else {
            return Err(format!(
                "tunnel \"{name}\" is up already (to replace one of its SAs, give --spi and --key-file)"
            ));
        };
        let g = self.gens[t];
        let mut ts = self.config.tunnel_sas(t, g);
        self.guard(&mut ts)?;
        let spis: Vec<u32> = ts.outbound.all().map(|s| s.spi).collect();
        self.publish(|db| {
            db.tunnels.push(Arc::new(ts));
            let i = db.tunnels.len() - 1;
            for p in db.spd.policies.iter_mut() {
                if let Some(orig) = p.name.strip_suffix(PLACEHOLDER) {
                    if placeholders.iter().any(|n| n == orig) {
                        p.name = orig.to_string();
                        p.action = Action::Protect(i);
                    }
                }
            }
        })?;
        self.deleted.remove(name);
        Ok(json!({"tunnel": name, "added": true, "sending_on": spis, "policies": placeholders}))
    }

    fn add_sa(&mut self, name: &str, a: &Value) -> Result<Value, String> {
        let spi = a
            .get("spi")
            .and_then(Value::as_u64)
            .filter(|s| *s >= 256 && *s <= u32::MAX as u64)
            .ok_or(
                "spi must be a number from 256 to 2^32-1 (SPIs 1-255 are reserved, RFC 4303 §2.1)",
            )? as u32;
        let inbound = match a.get("dir").and_then(Value::as_str) {
            Some("in") => true,
            Some("out") => false,
            _ => return Err("dir must be \"in\" or \"out\"".into()),
        };
        let cpu = a.get("cpu").and_then(Value::as_u64).map(|c| c as usize);
        let key_hex = a
            .get("key")
            .and_then(Value::as_str)
            .ok_or("sa add with an SPI needs the key (hex: key then 4-byte salt)")?;
        let db = self.view();
        let i = db
            .tunnel(name)
            .ok_or_else(|| format!("tunnel \"{name}\" is not up (add it first)"))?;
        let tun = &db.tunnels[i];
        let group = if inbound { &tun.inbound } else { &tun.outbound };
        let template = match cpu {
            Some(c) => group.per_cpu.get(c).ok_or_else(|| {
                format!(
                    "tunnel \"{name}\" has {} {}: cpu {c} is not one of them",
                    group.per_cpu.len(),
                    if inbound {
                        "inbound per-CPU SA"
                    } else {
                        "outbound per-CPU SA"
                    }
                    .to_string()
                        + if group.per_cpu.len() == 1 { "" } else { "s" }
                )
            })?,
            None => &group.fallback,
        };
        let alg = template.key.algorithm();
        let key = KeyMaterial::from_hex(alg, key_hex)
            .map_err(|e| format!("key for SPI {spi:#010x}: {e} (the tunnel's cipher is {alg})"))?;
        let mut ep = template.endpoints;
        if let Some(p) = a.get("port").and_then(Value::as_u64) {
            ep.src_port = u16::try_from(p).map_err(|_| "port must be 1-65535")?;
        }
        // An IKE daemon says what it negotiated: ESN and the replay window.
        let esn = a
            .get("esn")
            .and_then(Value::as_bool)
            .unwrap_or(template.esn);
        let window = match a.get("replay_window").and_then(Value::as_u64) {
            None => template.replay_window,
            Some(w) => u32::try_from(w)
                .ok()
                .filter(|w| (64..=65536).contains(w))
                .ok_or("replay_window must be between 64 and 65536")?,
        };
        // An IKE daemon gives the lifetimes it negotiated (seconds, bytes, packets; 0 = none).
        let mut lifetimes = template.lifetimes;
        for (k, soft, hard) in [
            (
                "seconds",
                &mut lifetimes.soft.seconds,
                &mut lifetimes.hard.seconds,
            ),
            (
                "bytes",
                &mut lifetimes.soft.bytes,
                &mut lifetimes.hard.bytes,
            ),
            (
                "packets",
                &mut lifetimes.soft.packets,
                &mut lifetimes.hard.packets,
            ),
        ] {
            if let Some(v) = a.get(format!("soft_{k}")).and_then(Value::as_u64) {
                *soft = (v > 0).then_some(v);
            }
            if let Some(v) = a.get(format!("hard_{k}")).and_then(Value::as_u64) {
                *hard = (v > 0).then_some(v);
            }
        }
        let mut spec = SaSpec::new(spi, key, esn, window, lifetimes, ep, cpu);
        spec.wire_order = template.wire_order;
        // Installed by an IKE daemon's plugin (it names its run), or by a person (`sa add`).
        let by_daemon = a.get("daemon").and_then(Value::as_u64).filter(|d| *d != 0);
        spec.daemon = by_daemon.unwrap_or(0);
        let current = self.daemon;
        let mut orphans = 0;
        // A key a person gives may be given again after a restart: its sequence numbers are
        // reserved durably first (an fsync, ~1.5 ms here). A key the IKE daemon negotiated
        // never outlives this run of espada (a new run makes the plugin delete every IKE_SA,
        // and charon installs a key only once, when it negotiates it), so the in-memory
        // counter book is enough and the install stays well under a millisecond.
        if !inbound && by_daemon.is_none() {
            spec.seq_guard = Some(self.seq.guard(&spec));
            self.reserve()?;
        }
        let replaced = template.spi;
        drop(db);
        self.publish(|db| {
            // The new run's first Child SA is complete once its outbound half is in (charon
            // installs the inbound one first): then the old run's SAs go.
            if current != 0 && !inbound {
                orphans = Self::retire_orphans(db, i, current);
            }
            let t = db.tunnel_mut(i);
            if cpu.is_some() && !inbound {
                // The peer does per-CPU SAs after all.
                t.pcpu_acquires = true;
            }
            let g = if inbound {
                &mut t.inbound
            } else {
                &mut t.outbound
            };
            let slot = match cpu {
                Some(c) => &mut g.per_cpu[c],
                None => &mut g.fallback,
            };
            let old = std::mem::replace(slot, spec);
            // Make-before-break: the replaced inbound SA is still accepted until deleted
            // (a placeholder an IKE daemon's first SA replaces never was).
            if inbound && old.spi != spi && !old.awaiting_ike {
                t.draining.push(old);
            }
        })?;
        if cpu.is_some() && !inbound {
            self.pcpu_asked.remove(name);
        }
        if orphans > 0 {
            self.notes.push(format!(
                "tunnel \"{name}\": the new IKE daemon run installed its first SA; {} of the old run removed",
                count(orphans, "SA", "SAs")
            ));
        }
        Ok(json!({
            "tunnel": name, "dir": if inbound { "in" } else { "out" }, "spi": spi, "cpu": cpu,
            "replaced": replaced,
            "note": if inbound { "the replaced SA is still accepted until `espada sa del` removes it" } else { "sent on from the next burst" },
        }))
    }

    fn del(&mut self, a: &Value) -> Result<Value, String> {
        match (
            a.get("tunnel").and_then(Value::as_str),
            a.get("spi").and_then(Value::as_u64),
        ) {
            (Some(t), None) => self.del_tunnel(t),
            (_, Some(spi)) => self.del_sa(spi as u32),
            (None, None) => Err("sa del needs --tunnel NAME or --spi SPI".into()),
        }
    }

    fn del_tunnel(&mut self, name: &str) -> Result<Value, String> {
        let db = self.view();
        let Some(i) = db.tunnel(name) else {
            return Err(if self.deleted.contains_key(name) {
                format!("tunnel \"{name}\" is deleted already")
            } else {
                format!("no tunnel \"{name}\" is up")
            });
        };
        let spis: Vec<u32> = {
            let t = &db.tunnels[i];
            t.outbound
                .all()
                .chain(t.inbound.all())
                .chain(t.draining.iter())
                .map(|s| s.spi)
                .collect()
        };
        drop(db);
        let mut names = Vec::new();
        self.publish(|db| {
            db.tunnels.remove(i);
            for p in db.spd.policies.iter_mut() {
                match p.action {
                    // Its traffic is dropped (counted), never sent in the clear.
                    Action::Protect(t) if t == i => {
                        names.push(p.name.clone());
                        p.name.push_str(PLACEHOLDER);
                        p.action = Action::Discard;
                    }
                    Action::Protect(t) if t > i => p.action = Action::Protect(t - 1),
                    _ => {}
                }
            }
        })?;
        self.deleted.insert(name.to_string(), names.clone());
        Ok(
            json!({"tunnel": name, "deleted": true, "sas_removed": spis, "policies_now_discard": names}),
        )
    }

    fn del_sa(&mut self, spi: u32) -> Result<Value, String> {
        // An IKE-keyed tunnel: the slot goes back to awaiting the daemon (nothing is sent or
        // received on it; a worker sends on the fallback SA and raises an acquire, or drops),
        // as the kernel does when the daemon deletes an SA.
        let db = self.view();
        let mut hit = None;
        for (i, t) in db.tunnels.iter().enumerate() {
            let ike = self.is_ike(&t.name);
            if !ike || t.draining.iter().any(|s| s.spi == spi) {
                continue;
            }
            for (inbound, g) in [(false, &t.outbound), (true, &t.inbound)] {
                let which = if g.fallback.spi == spi && !g.fallback.awaiting_ike {
                    Some(None)
                } else {
                    g.per_cpu
                        .iter()
                        .position(|s| s.spi == spi && !s.awaiting_ike)
                        .map(Some)
                };
                if let Some(w) = which {
                    hit = Some((i, inbound, w));
                }
            }
        }
        if let Some((i, inbound, which)) = hit {
            drop(db);
            self.publish(|db| {
                let t = db.tunnel_mut(i);
                let g = if inbound {
                    &mut t.inbound
                } else {
                    &mut t.outbound
                };
                match which {
                    None => g.fallback.awaiting_ike = true,
                    Some(c) => g.per_cpu[c].awaiting_ike = true,
                }
            })?;
            let slot = match which {
                None => "fallback".to_string(),
                Some(c) => format!("per-CPU {c}"),
            };
            let dir = if inbound { "inbound" } else { "outbound" };
            return Ok(
                json!({"spi": spi, "deleted": format!("{dir} {slot} SA: the slot awaits the IKE daemon again")}),
            );
        }
        for (i, t) in db.tunnels.iter().enumerate() {
            if t.draining.iter().any(|s| s.spi == spi) {
                drop(db);
                self.publish(|db| db.tunnel_mut(i).draining.retain(|s| s.spi != spi))?;
                return Ok(json!({"spi": spi, "deleted": "inbound (replaced) SA"}));
            }
            if let Some(c) = t.inbound.per_cpu.iter().position(|s| s.spi == spi) {
                if c + 1 != t.inbound.per_cpu.len() {
                    return Err(format!("inbound SA {spi:#010x} is the peer's per-CPU SA for CPU {c} of {}: only the last one can go (replace it with `espada sa add --cpu {c}`, or delete the tunnel)", t.inbound.per_cpu.len()));
                }
                drop(db);
                self.publish(|db| {
                    db.tunnel_mut(i).inbound.per_cpu.pop();
                })?;
                return Ok(json!({"spi": spi, "deleted": "inbound per-CPU SA"}));
            }
            if t.inbound.fallback.spi == spi {
                return Err(format!("SA {spi:#010x} is tunnel \"{}\"'s inbound fallback SA: it goes with the tunnel (`espada sa del --tunnel {}`) or is replaced (`espada sa add`)", t.name, t.name));
            }
            if t.outbound.all().any(|s| s.spi == spi) {
                return Err(format!("SA {spi:#010x} is an outbound SA of tunnel \"{}\": replace it (`espada sa add --dir out`) or delete the tunnel; a gateway always has an SA to send a protected packet with, or drops it", t.name));
            }
        }
        Err(format!("no SA with SPI {spi:#010x}"))
    }

    /// Changes the SA database with `f`: published at once, or (in a transaction) on its
    /// copy, published when it commits.
    fn publish(&mut self, f: impl FnOnce(&mut SaDb)) -> Result<u64, String> {
        if let Some(t) = &mut self.txn {
            f(Arc::make_mut(&mut t.db));
            return Ok(t.db.generation);
        }
        self.shared.sadb.update(f).map_err(|e| e.to_string())
    }

    fn update(&mut self, a: &Value) -> Result<Value, String> {
        let spi = a
            .get("spi")
            .and_then(Value::as_u64)
            .ok_or("sa update needs --spi")? as u32;
        let num = |k: &str| a.get(k).and_then(Value::as_u64);
        let keys = [
            "soft_seconds",
            "hard_seconds",
            "soft_bytes",
            "hard_bytes",
            "soft_packets",
            "hard_packets",
        ];
        if !keys.iter().any(|k| a.get(*k).is_some()) {
            return Err(format!(
                "sa update changes lifetimes: give one of {}",
                keys.join(", ")
            ));
        }
        let apply = |l: &mut Lifetimes| {
            let set = |lim: &mut Limits, p: &str| {
                if let Some(v) = num(&format!("{p}_seconds")) {
                    lim.seconds = (v > 0).then_some(v);
                }
                if let Some(v) = num(&format!("{p}_bytes")) {
                    lim.bytes = (v > 0).then_some(v);
                }
                if let Some(v) = num(&format!("{p}_packets")) {
                    lim.packets = (v > 0).then_some(v);
                }
            };
            set(&mut l.soft, "soft");
            set(&mut l.hard, "hard");
        };
        let mut found = None;
        self.publish(|db| {
            // Only the tunnels holding the SPI are changed (copied): not all 10 000.
            let holding: Vec<usize> = (0..db.tunnels.len())
                .filter(|&i| {
                    let t = &db.tunnels[i];
                    t.outbound
                        .all()
                        .chain(t.inbound.all())
                        .chain(t.draining.iter())
                        .any(|s| s.spi == spi)
                })
                .collect();
            for i in holding {
                let t = db.tunnel_mut(i);
                let TunnelSas {
                    outbound,
                    inbound,
                    draining,
                    ..
                } = t;
                for s in outbound
                    .all_mut()
                    .chain(inbound.all_mut())
                    .chain(draining.iter_mut())
                {
                    if s.spi == spi {
                        apply(&mut s.lifetimes);
                        found = Some(s.lifetimes);
                    }
                }
            }
        })?;
        match found {
            Some(l) => Ok(json!({"spi": spi, "soft": limits(&l.soft), "hard": limits(&l.hard)})),
            None => Err(format!("no SA with SPI {spi:#010x}")),
        }
    }
}

/// `1 policy`, `2 policies`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn limits(l: &Limits) -> Value {
    json!({"seconds": l.seconds, "bytes": l.bytes, "packets": l.packets})
}

fn hexes(spis: &[u32]) -> String {
    spis.iter()
        .map(|s| format!("{s:#010x}"))
        .collect::<Vec<_>>()
        .join(", ")
}
