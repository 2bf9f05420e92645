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
use espada_dataplane::state::seqstore::SeqStore;
use espada_dataplane::worker::GatewayShared;
use espada_sadb::db::{Direction, SaDb, SaEvent, SaSpec, TunnelSas};
use espada_sadb::lifetime::{Lifetimes, Limits, Stage};
use espada_sadb::selector::Action;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

mod commands;
mod generations;
mod ike;
mod reload;
use reload::index;

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

/// Per-CPU acquires per tunnel the IKE daemon may leave unanswered by a per-CPU SA before
/// the tunnel stops asking for them (its peer does not do RFC 9611): the Child SAs such a
/// peer makes stay bounded by this, whatever it does.
pub const PCPU_ACQUIRES_UNANSWERED: u32 = 4;

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
