//! Model-based test of the nonce rule (issue 24): the real SA database ([`SaDbHandle`] and its
//! counter book), the real per-core runtime ([`CoreSas`]) and real [`SeqGuard`]s are driven
//! through random sequences of sends on every core, reloads (same keys, `pcpu` up and down,
//! new keys, SPIs moved between cores), per-CPU and fallback hard expiries, SA installs and
//! deletions (as `sa add`/`sa del`/an IKE daemon make them), placeholders and restarts with the
//! durable state kept. After every step: no (key, sequence number) was ever issued twice, and
//! nothing was sent with a placeholder's key.

use super::tests::spd;
use super::*;
use crate::lifetime::Limits;
use espada_crypto::Algorithm;
use proptest::prelude::*;
use std::collections::{HashMap as StdMap, HashSet as StdSet};

const HARD_PACKETS: u64 = 1 << 40;
/// The public key a placeholder gets (as the lab configs derive from `lab_secret`).
const PLACEHOLDER_KEY: [u8; 20] = [0xee; 20];
const BLOCK: u64 = 64;

fn key_of(bytes: [u8; 20]) -> KeyMaterial {
    KeyMaterial::new(Algorithm::AesGcm128, &bytes).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Core `core` syncs and sends `n` packets on every tunnel.
    Send { core: usize, n: u32 },
    /// The configuration is re-read: `pcpu` per-CPU SAs, keys of generation `gen`, the CPU
    /// indices of the per-CPU SPIs reversed or not.
    Reload {
        pcpu: usize,
        new_keys: bool,
        swap: bool,
    },
    /// Core `core`'s SA on the tunnel reaches its hard lifetime.
    Expire { core: usize },
    /// `sa add`: a new outbound SA for slot `slot` (0 = fallback), new SPI or same SPI, new key.
    SaAdd { slot: usize, same_spi: bool },
    /// `sa del` of the tunnel's per-CPU SAs from `from` on.
    SaDel { from: usize },
    /// Slot `slot` becomes a placeholder awaiting the IKE daemon (an `ike = true` tunnel).
    Placeholder { slot: usize },
    /// The gateway restarts (or is killed): memory is gone, the state file stays.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 1..40u32).prop_map(|(core, n)| Op::Send { core, n }),
        2 => (0..4usize, any::<bool>(), any::<bool>())
            .prop_map(|(pcpu, new_keys, swap)| Op::Reload { pcpu, new_keys, swap }),
        2 => (0..3usize).prop_map(|core| Op::Expire { core }),
        2 => (0..4usize, any::<bool>()).prop_map(|(slot, same_spi)| Op::SaAdd { slot, same_spi }),
        1 => (0..4usize).prop_map(|from| Op::SaDel { from }),
        1 => (0..4usize).prop_map(|slot| Op::Placeholder { slot }),
        1 => Just(Op::Restart),
    ]
}

struct World {
    workers: usize,
    handle: Arc<SaDbHandle>,
    cores: Vec<Option<CoreSas>>,
    /// The "state file": durable limit per key fingerprint.
    durable: StdMap<u128, u64>,
    guards: StdMap<u128, Arc<SeqGuard>>,
    issued: StdSet<(u128, u64)>,
    /// Configuration: per-CPU SAs, key generation, swapped CPU indices.
    pcpu: usize,
    gen: u8,
    swap: bool,
    /// Keys handed out by `sa add` so far.
    added: u8,
    next_spi: u32,
}

fn life() -> Lifetimes {
    Lifetimes {
        soft: Limits::default(),
        hard: Limits {
            packets: Some(HARD_PACKETS),
            ..Default::default()
        },
    }
}

fn ep() -> TunnelEndpoints {
    TunnelEndpoints::new(
        "192.168.100.1".parse().unwrap(),
        "192.168.100.2".parse().unwrap(),
    )
}

impl World {
    fn new(workers: usize) -> World {
        let mut w = World {
            workers,
            handle: SaDbHandle::new(
                SaDb::new(SaMode::PerCpu, workers, Backend::Ring, vec![], spd()).unwrap(),
            ),
            cores: Vec::new(),
            durable: StdMap::new(),
            guards: StdMap::new(),
            issued: StdSet::new(),
            pcpu: 2,
            gen: 0,
            swap: false,
            added: 0,
            next_spi: 0x5000,
        };
        w.start();
        w
    }

    /// The configuration's tunnel, built afresh (what `config::sadb_at` does on every load).
    fn tunnel(&self) -> TunnelSas {
        let spec = |slot: usize| {
            let cpu = (slot > 0).then(|| {
                let i = slot - 1;
                if self.swap {
                    self.pcpu - 1 - i
                } else {
                    i
                }
            });
            let mut k = [0x11; 20];
            k[0] = self.gen;
            k[1] = slot as u8;
            let mut s = SaSpec::new(0x100 + slot as u32, key_of(k), false, 64, life(), ep(), cpu);
            s.seq_guard = None;
            s
        };
        let inbound = |slot: usize| {
            let mut k = [0x22; 20];
            k[0] = self.gen;
            k[1] = slot as u8;
            SaSpec::new(
                0x200 + slot as u32,
                key_of(k),
                false,
                64,
                life(),
                ep(),
                (slot > 0).then(|| slot - 1),
            )
        };
        let mut per_cpu: Vec<SaSpec> = (1..=self.pcpu).map(spec).collect();
        // The per-CPU list is indexed by CPU.
        per_cpu.sort_by_key(|s| s.cpu);
        TunnelSas {
            name: "lab".into(),
            local_subnets: vec!["10.1.0.0/24".parse().unwrap()],
            remote_subnets: vec!["10.2.0.0/24".parse().unwrap()],
            outbound: PerCpuSaGroup {
                fallback: spec(0),
                per_cpu,
            },
            inbound: PerCpuSaGroup {
                fallback: inbound(0),
                per_cpu: (1..=self.pcpu).map(inbound).collect(),
            },
            draining: vec![],
            pcpu_acquires: true,
            rekey_every: None,
        }
    }

    /// The supervisor's part: every outbound SA gets its key's durable guard.
    fn guard(&mut self, t: &mut TunnelSas) {
        for s in t.outbound.all_mut() {
            let fp = s.key_fingerprint();
            let resume = self.durable.get(&fp).copied().unwrap_or(0);
            let g = self
                .guards
                .entry(fp)
                .or_insert_with(|| Arc::new(SeqGuard::new(s.spi, resume)))
                .clone();
            s.seq_guard = Some(g);
        }
    }

    /// The persister: writes, then grants.
    fn persist(&mut self) {
        for (fp, g) in &self.guards {
            if let Some(l) = g.wants(BLOCK, u32::MAX as u64) {
                let d = self.durable.entry(*fp).or_insert(0);
                *d = (*d).max(l);
                g.grant(l);
            }
        }
    }

    fn publish(&mut self, mut t: TunnelSas) {
        self.guard(&mut t);
        let r = self.handle.update(|db| db.tunnels = vec![Arc::new(t)]);
        // A snapshot with one key on two SPIs is refused, never published.
        if let Err(e) = r {
            assert!(matches!(e, DbError::KeyReuse { .. }), "{e}");
        }
    }

    fn start(&mut self) {
        let mut t = self.tunnel();
        self.guard(&mut t);
        let db = SaDb::new(SaMode::PerCpu, self.workers, Backend::Ring, vec![t], spd()).unwrap();
        self.handle = SaDbHandle::new(db);
        self.persist();
        self.cores = (0..self.workers)
            .map(|c| Some(CoreSas::new(c, self.handle.load(), 0).unwrap()))
            .collect();
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Send { core, n } => {
                let core = core % self.workers;
                let cs = self.cores[core].as_mut().unwrap();
                let _ = cs.sync(&self.handle, 0);
                let db = cs.db().clone();
                for t in 0..db.tunnels.len() {
                    cs.note_use(t);
                    let Some(fp) = cs.outbound_key(t) else {
                        continue;
                    };
                    assert_ne!(
                        fp,
                        key_fingerprint(&key_of(PLACEHOLDER_KEY)),
                        "core {core} sends on a placeholder"
                    );
                    let sa = cs.outbound(t).unwrap();
                    let r = sa.reserve(n);
                    sa.counters.packets += r.count as u64;
                    for s in r.first..r.first + r.count as u64 {
                        assert!(
                            self.issued.insert((fp, s)),
                            "core {core}: SPI {:#x} sequence number {s} issued twice under one key",
                            sa.spi
                        );
                    }
                }
            }
            Op::Reload {
                pcpu,
                new_keys,
                swap,
            } => {
                self.pcpu = pcpu;
                self.swap = swap;
                if new_keys {
                    self.gen = self.gen.wrapping_add(1);
                }
                let t = self.tunnel();
                self.publish(t);
            }
            Op::Expire { core } => {
                let core = core % self.workers;
                let cs = self.cores[core].as_mut().unwrap();
                if let Some(sa) = cs.outbound(0) {
                    sa.counters.packets = HARD_PACKETS;
                }
                let q = EventQueue::new(64);
                cs.check_lifetimes(1, &q);
            }
            Op::SaAdd { slot, same_spi } => {
                let db = self.handle.load();
                let Some(tun) = db.tunnels.first() else {
                    return;
                };
                let g = &tun.outbound;
                let old = if slot == 0 {
                    &g.fallback
                } else {
                    match g.per_cpu.get(slot - 1) {
                        Some(s) => s,
                        None => return,
                    }
                };
                self.added = self.added.wrapping_add(1);
                let spi = if same_spi {
                    old.spi
                } else {
                    self.next_spi += 1;
                    self.next_spi
                };
                let mut k = [0x33; 20];
                k[0] = self.added;
                let spec = SaSpec::new(spi, key_of(k), false, 64, life(), ep(), old.cpu);
                let mut tun = TunnelSas::clone(tun);
                if slot == 0 {
                    tun.outbound.fallback = spec;
                } else {
                    tun.outbound.per_cpu[slot - 1] = spec;
                }
                self.publish(tun);
            }
            Op::SaDel { from } => {
                let db = self.handle.load();
                let Some(tun) = db.tunnels.first() else {
                    return;
                };
                let mut tun = TunnelSas::clone(tun);
                tun.outbound.per_cpu.truncate(from);
                self.publish(tun);
            }
            Op::Placeholder { slot } => {
                let db = self.handle.load();
                let Some(tun) = db.tunnels.first() else {
                    return;
                };
                let mut tun = TunnelSas::clone(tun);
                let g = &mut tun.outbound;
                let s = if slot == 0 {
                    &mut g.fallback
                } else {
                    match g.per_cpu.get_mut(slot - 1) {
                        Some(s) => s,
                        None => return,
                    }
                };
                let mut p = SaSpec::new(
                    s.spi,
                    key_of(PLACEHOLDER_KEY),
                    false,
                    64,
                    life(),
                    ep(),
                    s.cpu,
                );
                p.awaiting_ike = true;
                *s = p;
                self.publish(tun);
            }
            Op::Restart => {
                self.cores.clear();
                self.guards.clear();
                self.start();
            }
        }
        self.persist();
    }
}

proptest! {
    // Seeded (ESPADA_MODEL_SEED, default fixed): the same cases in every CI run; a failure
    // prints its smallest operation sequence.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("ESPADA_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        rng_seed: proptest::test_runner::RngSeed::Fixed(
            std::env::var("ESPADA_MODEL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_key_and_sequence_number_is_ever_issued_twice(
        workers in 1..4usize,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut w = World::new(workers);
        for op in &ops {
            w.apply(op);
        }
    }
}

/// Issue 24 item 1, as it was seen: after a reload that kept the fallback SA's SPI and key, a
/// core whose per-CPU SA hit its hard lifetime counted on a new counter while another core
/// kept the old one: "core 0 sends 11..=14 and core 1 sends 11..=14 on SA 0x100 with one key".
#[test]
fn reload_then_per_cpu_hard_expiry_keeps_one_fallback_counter() {
    let mut w = World::new(2);
    w.pcpu = 1;
    let t = w.tunnel();
    w.publish(t);
    w.apply(&Op::Send { core: 1, n: 10 }); // core 1 on the fallback SA: 1..=10
    let t = w.tunnel(); // the reload: same SPIs and keys, fresh objects
    w.publish(t);
    w.apply(&Op::Send { core: 1, n: 4 }); // core 1 kept its state: 11..=14
    w.apply(&Op::Expire { core: 0 }); // core 0's per-CPU SA dies: core 0 builds the fallback
    w.apply(&Op::Send { core: 0, n: 4 }); // must be 15..=18, not 11..=14
    let cs = w.cores[0].as_mut().unwrap();
    assert_eq!(cs.outbound(0).unwrap().spi, 0x100);
    assert_eq!(cs.outbound(0).unwrap().last_seq(), 18);
    // Core 1 goes on after 18 too (two counters would both have issued 15..=18).
    w.apply(&Op::Send { core: 1, n: 4 });
    assert_eq!(
        w.cores[1].as_ref().unwrap().outbound_key(0),
        w.cores[0].as_ref().unwrap().outbound_key(0)
    );
}

/// Issue 24 item 1, the per-CPU claim: a reload that moves an SPI from core 0 to core 1 lets
/// core 1 have it only after core 0 let go; meanwhile core 1 sends on the fallback SA.
#[test]
fn a_moved_per_cpu_sa_is_handed_over_after_the_old_core_lets_go() {
    let mut w = World::new(2);
    w.apply(&Op::Send { core: 0, n: 5 }); // 0x101 on core 0: 1..=5
    w.swap = true; // 0x101 now belongs to CPU 1, 0x102 to CPU 0
    let t = w.tunnel();
    w.publish(t);
    w.apply(&Op::Send { core: 1, n: 3 });
    let c1 = w.cores[1].as_mut().unwrap();
    assert!(c1.waiting_for_handover(), "core 0 still holds 0x101");
    assert_eq!(c1.outbound(0).unwrap().spi, 0x100, "the fallback meanwhile");
    w.apply(&Op::Send { core: 0, n: 1 }); // core 0 syncs: takes 0x102, lets 0x101 go
    w.apply(&Op::Send { core: 1, n: 3 });
    let c1 = w.cores[1].as_mut().unwrap();
    assert!(!c1.waiting_for_handover());
    assert_eq!(c1.outbound(0).unwrap().spi, 0x101);
    assert_eq!(c1.outbound(0).unwrap().last_seq(), 8, "on from core 0's 5");
}

/// Issue 24 item 2: a per-CPU hard expiry on an IKE tunnel whose fallback SA is still a
/// placeholder drops (and raises an acquire) instead of sending with the placeholder's key.
#[test]
fn hard_expiry_never_falls_back_onto_a_placeholder() {
    let mut w = World::new(1);
    w.apply(&Op::Placeholder { slot: 0 });
    w.apply(&Op::Send { core: 0, n: 2 });
    assert_eq!(
        w.cores[0].as_ref().unwrap().outbound_key(0).map(|_| ()),
        Some(())
    );
    w.apply(&Op::Expire { core: 0 });
    let cs = w.cores[0].as_mut().unwrap();
    assert!(
        cs.outbound(0).is_none(),
        "dropped, not sent on the placeholder"
    );
    cs.note_use(0);
    let q = AcquireQueue::new(4);
    assert_eq!(cs.raise_acquires(5, &q), 1);
    assert_eq!(
        q.pop().map(|a| a.cpu),
        Some(None),
        "an acquire for the fallback SA"
    );
}

/// Issue 24 item 5 (the database's half): one outbound key on two live SAs is refused
/// whatever builds the snapshot (`sa add`, a reload, an IKE install).
#[test]
fn one_key_on_two_live_outbound_sas_is_refused() {
    let w = World::new(2);
    let before = w.handle.generation();
    let e = w
        .handle
        .update(|db| {
            let k = db.tunnels[0].outbound.fallback.key.clone();
            let s = &mut db.tunnel_mut(0).outbound.per_cpu[0];
            *s = SaSpec::new(0x777, k, false, 64, life(), ep(), Some(0));
        })
        .unwrap_err();
    assert_eq!(
        e,
        DbError::KeyReuse {
            spi: 0x777,
            other: 0x100
        }
    );
    assert_eq!(w.handle.generation(), before, "not published");
}

/// A key deleted and installed again (`sa del` then `sa add` with the same key) resumes above
/// what it sent, also under another SPI.
#[test]
fn a_key_that_comes_back_resumes_its_counter() {
    let mut w = World::new(1);
    w.pcpu = 0;
    let t = w.tunnel();
    w.publish(t);
    w.apply(&Op::Send { core: 0, n: 7 });
    let old = w.handle.load().tunnels[0].clone();
    w.handle.update(|db| db.tunnels.clear()).unwrap();
    w.apply(&Op::Send { core: 0, n: 1 }); // the core lets go
    w.handle.update(|db| db.tunnels.clear()).unwrap(); // retires the key
    assert!(
        w.handle
            .with_book(|b| b.last_seq(old.outbound.fallback.key_fingerprint()))
            == Some(7)
    );
    let mut back = TunnelSas::clone(&old);
    back.outbound.fallback = SaSpec::new(
        0x999,
        back.outbound.fallback.key.clone(),
        false,
        64,
        life(),
        ep(),
        None,
    );
    w.handle
        .update(|db| db.tunnels = vec![Arc::new(back)])
        .unwrap();
    w.apply(&Op::Send { core: 0, n: 1 });
    assert_eq!(
        w.cores[0].as_mut().unwrap().outbound(0).unwrap().last_seq(),
        8
    );
}
