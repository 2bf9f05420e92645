//! The IKE daemon's side: acquires, expires, daemon restarts, and the events told back.

use super::*;

impl Supervisor {
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
    pub(super) fn note_daemon(&mut self, d: u64) {
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
    pub(super) fn retire_orphans(db: &mut SaDb, i: usize, current: u64) -> usize {
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
    pub(super) fn acquire_mode(&mut self, a: &Value) -> Result<Value, String> {
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
    pub(super) fn count_pcpu_acquire(&mut self, i: usize) {
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
    pub(super) fn take_acquires(&mut self) -> Value {
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
}
