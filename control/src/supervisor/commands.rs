//! The SA commands: `sa batch`, `sa rekey`, `sa add`, `sa del`, `sa update`.

use super::*;

impl Supervisor {
    pub(super) fn tunnel_index(&self, name: &str) -> Result<usize, String> {
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
    pub(super) fn is_ike(&self, name: &str) -> bool {
        self.names
            .get(name)
            .is_some_and(|&i| self.config.tunnels[i].ike)
    }

    /// `sa batch`: the changes in `ops` (each `{"what": "add"|"del"|"update"|"rekey", "args":
    /// {...}}`, as the single commands take them) published as one snapshot. All or nothing: the
    /// first change refused refuses the batch, and nothing of it is applied.
    pub(super) fn batch(&mut self, a: &Value, now: u64) -> Result<Value, String> {
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

    pub(super) fn rekey(&mut self, tunnel: Option<&str>, now: u64) -> Result<Value, String> {
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
    pub(super) fn tunnel_of(&self, a: &Value) -> Result<String, String> {
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

    pub(super) fn add(&mut self, a: &Value) -> Result<Value, String> {
        let name = self.tunnel_of(a)?;
        match a.get("spi") {
            None => self.add_tunnel(&name),
            Some(_) => self.add_sa(&name, a),
        }
    }

    /// Puts a deleted tunnel back, as the configuration defines it.
    pub(super) fn add_tunnel(&mut self, name: &str) -> Result<Value, String> {
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

    pub(super) fn add_sa(&mut self, name: &str, a: &Value) -> Result<Value, String> {
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

    pub(super) fn del(&mut self, a: &Value) -> Result<Value, String> {
        match (
            a.get("tunnel").and_then(Value::as_str),
            a.get("spi").and_then(Value::as_u64),
        ) {
            (Some(t), None) => self.del_tunnel(t),
            (_, Some(spi)) => self.del_sa(spi as u32),
            (None, None) => Err("sa del needs --tunnel NAME or --spi SPI".into()),
        }
    }

    pub(super) fn del_tunnel(&mut self, name: &str) -> Result<Value, String> {
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

    pub(super) fn del_sa(&mut self, spi: u32) -> Result<Value, String> {
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
    pub(super) fn publish(&mut self, f: impl FnOnce(&mut SaDb)) -> Result<u64, String> {
        if let Some(t) = &mut self.txn {
            f(Arc::make_mut(&mut t.db));
            return Ok(t.db.generation);
        }
        self.shared.sadb.update(f).map_err(|e| e.to_string())
    }

    pub(super) fn update(&mut self, a: &Value) -> Result<Value, String> {
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
