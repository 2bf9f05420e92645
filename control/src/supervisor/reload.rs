//! `reload` (also SIGHUP): the configuration read again and published make-before-break.

use super::*;

impl Supervisor {
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
}

pub(super) fn index(
    c: &config::Config,
) -> (HashMap<String, usize>, HashMap<(IpAddr, IpAddr), usize>) {
    let mut names = HashMap::with_capacity(c.tunnels.len());
    let mut ends = HashMap::with_capacity(c.tunnels.len());
    for (i, t) in c.tunnels.iter().enumerate() {
        names.entry(t.name.clone()).or_insert(i);
        ends.entry((t.local, t.remote)).or_insert(i);
    }
    (names, ends)
}

/// Carries the SAs an IKE daemon installed in `old` (same tunnel, previous snapshot) over to
/// `new`, which a reload built from the file (placeholders only): slot by slot, for the slots
/// the new configuration still has; the replaced inbound SAs still draining go along. Returns
/// how many SAs were kept.
pub(super) fn keep_installed(new: &mut TunnelSas, old: &TunnelSas) -> usize {
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
