//! `espada monitor`: what happens to a running gateway, as it happens — SAs installed, rekeyed,
//! expired or deleted, reloads accepted or refused, acquires — one JSON object per line on a
//! control connection that stays open (as `ip xfrm monitor` streams the kernel's).
//!
//! The gateway's main thread publishes; each watcher has a bounded queue of its own. A watcher
//! that does not keep up loses events (counted and told in its stream), and never slows the
//! gateway down.

use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

/// Events a watcher may have waiting before newer ones are lost.
pub const QUEUE: usize = 1024;

/// Watchers at once (each holds a control connection).
pub const MAX_WATCHERS: usize = 4;

/// The gateway's event feed.
#[derive(Debug, Default)]
pub struct Monitor {
    watchers: Mutex<Vec<(SyncSender<String>, u64)>>,
    /// Events published so far.
    pub published: AtomicU64,
    /// The last reload was refused (metrics: `espada_config_last_reload_successful`).
    pub reload_failed: std::sync::atomic::AtomicBool,
    /// When the last reload was accepted (UNIX seconds as f64 bits; 0: none yet).
    pub reload_ok_unix: AtomicU64,
    /// Events by kind (metrics: `espada_events_total`).
    by_kind: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// UNIX time now, in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Monitor {
    /// A new watcher's queue, or `None` when [`MAX_WATCHERS`] watch already.
    pub fn watch(&self) -> Option<Receiver<String>> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= MAX_WATCHERS {
            return None;
        }
        let (tx, rx) = sync_channel(QUEUE);
        w.push((tx, 0));
        Some(rx)
    }

    /// Publishes one event: `kind` (`reload`, `reload-refused`, `sa`, `sa-refused`, `rekey`,
    /// `acquire`, `lifetime`, `worker`, `neighbor`) and the line the log has for it. Never blocks.
    pub fn publish(&self, kind: &str, text: &str) {
        self.published.fetch_add(1, Ordering::Relaxed);
        match kind {
            "reload" => {
                self.reload_failed.store(false, Ordering::Relaxed);
                self.reload_ok_unix
                    .store(unix_now().to_bits(), Ordering::Relaxed);
            }
            "reload-refused" => self.reload_failed.store(true, Ordering::Relaxed),
            _ => {}
        }
        if let Ok(mut m) = self.by_kind.lock() {
            match m.get_mut(kind) {
                Some(n) => *n += 1,
                None => {
                    m.insert(kind.to_string(), 1);
                }
            }
        }
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_empty() {
            return;
        }
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let line = json!({"unix_time": unix, "kind": kind, "text": text}).to_string();
        w.retain_mut(|(tx, lost)| {
            if *lost > 0 {
                let note = json!({"unix_time": unix, "kind": "lost", "text": format!("{} lost: this watcher did not keep up", crate::supervisor::count(*lost as usize, "event", "events"))}).to_string();
                if tx.try_send(note).is_ok() {
                    *lost = 0;
                }
            }
            match tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    *lost += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// Events published so far, by kind; the kinds an alert watches are always there (at 0).
    pub fn counts(&self) -> Vec<(String, u64)> {
        let mut m = self.by_kind.lock().map(|m| m.clone()).unwrap_or_default();
        for k in ["reload", "reload-refused", "sa-refused"] {
            m.entry(k.to_string()).or_insert(0);
        }
        m.into_iter().collect()
    }

    /// Watchers now.
    pub fn watchers(&self) -> usize {
        self.watchers.lock().map_or(0, |w| w.len())
    }
}

/// What `espada monitor` says about the neighbor tables (ARP, IPv6 neighbor discovery): the
/// run loop hands it the entries when a table's generation moved, and it answers one line per
/// entry learned, changed or gone since the last call.
#[derive(Debug, Default)]
pub struct NeighborWatch {
    seen: std::collections::BTreeMap<String, String>,
    generations: (u64, u64),
    started: bool,
}

impl NeighborWatch {
    /// Lines for what changed, given both tables' generations and entries (ip, mac). The
    /// first call only takes note (the configured entries are not news).
    pub fn changes<I: Iterator<Item = (String, String)>>(
        &mut self,
        generations: (u64, u64),
        entries: impl FnOnce() -> I,
    ) -> Vec<String> {
        if self.started && generations == self.generations {
            return Vec::new();
        }
        self.generations = generations;
        let now: std::collections::BTreeMap<String, String> = entries().collect();
        let mut out = Vec::new();
        if self.started {
            for (ip, mac) in &now {
                match self.seen.get(ip) {
                    None => out.push(format!("neighbor {ip} learned: {mac}")),
                    Some(old) if old != mac => {
                        out.push(format!("neighbor {ip} changed: {old} -> {mac}"))
                    }
                    _ => {}
                }
            }
            for (ip, mac) in &self.seen {
                if !now.contains_key(ip) {
                    out.push(format!("neighbor {ip} gone (was {mac})"));
                }
            }
        }
        self.started = true;
        self.seen = now;
        out
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn neighbor_changes_are_told_once() {
        let mut w = NeighborWatch::default();
        let e = |v: &'static [(&'static str, &'static str)]| {
            move || v.iter().map(|(a, b)| (a.to_string(), b.to_string()))
        };
        assert!(w
            .changes((1, 1), e(&[("10.1.0.1", "02:00:00:00:00:01")]))
            .is_empty());
        // Same generations: nothing read, nothing said.
        assert!(w.changes((1, 1), e(&[])).is_empty());
        let c = w.changes(
            (2, 1),
            e(&[
                ("10.1.0.1", "02:00:00:00:00:09"),
                ("10.1.0.10", "02:00:00:00:00:0a"),
            ]),
        );
        assert_eq!(
            c,
            vec![
                "neighbor 10.1.0.1 changed: 02:00:00:00:00:01 -> 02:00:00:00:00:09",
                "neighbor 10.1.0.10 learned: 02:00:00:00:00:0a"
            ]
        );
        let c = w.changes((3, 1), e(&[("10.1.0.10", "02:00:00:00:00:0a")]));
        assert_eq!(c, vec!["neighbor 10.1.0.1 gone (was 02:00:00:00:00:09)"]);
    }

    #[test]
    fn watchers_get_every_event_and_a_slow_one_is_told_what_it_lost() {
        let m = Monitor::default();
        m.publish("sa", "before anyone watched");
        let a = m.watch().unwrap();
        let b = m.watch().unwrap();
        for i in 0..QUEUE + 10 {
            m.publish("sa", &format!("event {i}"));
            // `a` keeps up, `b` does not read.
            let l = a.try_recv().unwrap();
            assert!(l.contains(&format!("\"event {i}\"")), "{l}");
        }
        let got: Vec<String> = b.try_iter().collect();
        assert_eq!(got.len(), QUEUE);
        m.publish("reload", "after");
        let next: Vec<String> = b.try_iter().collect();
        assert!(
            next[0].contains("\"kind\":\"lost\"") && next[0].contains("10 events lost"),
            "{next:?}"
        );
        assert!(next[1].contains("after"));
        drop(a);
        m.publish("sa", "x");
        assert_eq!(m.watchers(), 1, "a watcher that left is forgotten");
        for _ in 0..MAX_WATCHERS - 1 {
            m.watch().unwrap();
        }
        assert!(m.watch().is_none());
    }
}
