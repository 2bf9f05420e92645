//! `lab_rekey` generations: installed at their time boundaries (send on g, accept g±1).

use super::*;

impl Supervisor {
    /// Publishes configured tunnel `t` at generation `g`; returns the SPIs it now sends on.
    pub(super) fn install_generation(&mut self, t: usize, g: u64) -> Result<Vec<u32>, String> {
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
    pub(super) fn generations(&mut self, now: u64) -> Vec<String> {
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
}
