use super::*;
use crate::lifetime::Limits;
use crate::selector::{Action, Policy, PortRange, Selector};
use espada_crypto::Algorithm;

pub(crate) fn key(n: u8) -> KeyMaterial {
    KeyMaterial::new(Algorithm::AesGcm128, &[n; 20]).unwrap()
}

fn ep(port: u16) -> TunnelEndpoints {
    let mut e = TunnelEndpoints::new(
        "192.168.100.1".parse().unwrap(),
        "192.168.100.2".parse().unwrap(),
    );
    e.src_port = port;
    e
}

fn spec(spi: u32, cpu: Option<usize>, life: Lifetimes) -> SaSpec {
    SaSpec::new(
        spi,
        key(spi as u8),
        true,
        4096,
        life,
        ep(4500 + cpu.map_or(0, |c| c as u16 + 1)),
        cpu,
    )
}

fn tunnel(pcpu: usize, life: Lifetimes) -> TunnelSas {
    TunnelSas {
        name: "lab".into(),
        local_subnets: vec!["10.1.0.0/24".parse().unwrap()],
        remote_subnets: vec!["10.2.0.0/24".parse().unwrap()],
        outbound: PerCpuSaGroup {
            fallback: spec(0x100, None, life),
            per_cpu: (0..pcpu)
                .map(|i| spec(0x101 + i as u32, Some(i), life))
                .collect(),
        },
        inbound: PerCpuSaGroup {
            fallback: spec(0x200, None, life),
            per_cpu: (0..pcpu)
                .map(|i| spec(0x201 + i as u32, Some(i), life))
                .collect(),
        },
        draining: vec![],
        pcpu_acquires: true,
        rekey_every: None,
    }
}

pub(super) fn spd() -> Spd {
    Spd {
        policies: vec![Policy {
            name: "lab".into(),
            selector: Selector {
                src: "10.1.0.0/24".parse().unwrap(),
                dst: "10.2.0.0/24".parse().unwrap(),
                proto: None,
                src_ports: PortRange::ANY,
                dst_ports: PortRange::ANY,
            },
            action: Action::Protect(0),
        }],
    }
}

fn db(mode: SaMode, workers: usize, pcpu: usize) -> SaDb {
    SaDb::new(
        mode,
        workers,
        Backend::Ring,
        vec![tunnel(pcpu, Lifetimes::default())],
        spd(),
    )
    .unwrap()
}

#[test]
fn own_sa_then_fallback() {
    // 3 workers, only 2 per-CPU SAs: core 2 uses the fallback SA (RFC 9611).
    let d = Arc::new(db(SaMode::PerCpu, 3, 2));
    let mut cores: Vec<CoreSas> = (0..3)
        .map(|c| CoreSas::new(c, d.clone(), 0).unwrap())
        .collect();
    assert_eq!(cores[0].outbound(0).unwrap().spi, 0x101);
    assert_eq!(cores[1].outbound(0).unwrap().spi, 0x102);
    assert_eq!(cores[2].outbound(0).unwrap().spi, 0x100);
    assert!(!cores[0].outbound(0).unwrap().is_shared());
    assert!(cores[2].outbound(0).unwrap().is_shared());
    // Each per-CPU SA has its own UDP source port.
    assert_eq!(cores[0].outbound(0).unwrap().tunnel.src_port, 4501);
    assert_eq!(cores[1].outbound(0).unwrap().tunnel.src_port, 4502);
    // Shared mode: everyone uses the one SA.
    let s = Arc::new(db(SaMode::Shared, 2, 0));
    for c in 0..2 {
        let mut cs = CoreSas::new(c, s.clone(), 0).unwrap();
        assert_eq!(cs.outbound(0).unwrap().spi, 0x100);
        assert!(cs.outbound(0).unwrap().is_shared());
    }
}

#[test]
fn spi_lookup_and_handoff_routes() {
    let d = Arc::new(db(SaMode::PerCpu, 2, 2));
    let c0 = CoreSas::new(0, d.clone(), 0).unwrap();
    let c1 = CoreSas::new(1, d.clone(), 0).unwrap();
    assert_eq!(c0.route(0x201), Route::Local);
    assert_eq!(c0.route(0x202), Route::Handoff(1));
    assert_eq!(c1.route(0x201), Route::Handoff(0));
    assert_eq!(c1.route(0x202), Route::Local);
    // The fallback inbound SA may be processed anywhere (its window is locked).
    assert_eq!(c0.route(0x200), Route::Local);
    assert_eq!(c1.route(0x200), Route::Local);
    assert_eq!(c0.route(0xdead), Route::Unknown);
    assert_eq!(d.inbound_owner(0x202), Some((0, Owner::Core(1))));
    // More peer SAs than workers: SA i goes to core i mod workers.
    let d3 = Arc::new(db(SaMode::PerCpu, 2, 3));
    let c0 = CoreSas::new(0, d3, 0).unwrap();
    assert_eq!(c0.route(0x203), Route::Local);
}

#[test]
fn duplicate_spi_refused() {
    let mut t = tunnel(2, Lifetimes::default());
    t.inbound.per_cpu[1].spi = 0x201;
    let e = SaDb::new(SaMode::PerCpu, 2, Backend::Ring, vec![t], spd()).unwrap_err();
    assert_eq!(e, DbError::DuplicateSpi(0x201));
    assert_eq!(e.to_string(), "duplicate inbound SPI 0x00000201");
}

#[test]
fn snapshot_updates_keep_runtime_state() {
    let h = SaDbHandle::new(db(SaMode::PerCpu, 1, 1));
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    let r = c.outbound(0).unwrap().reserve(10);
    assert_eq!(r.first, 1);
    assert!(!c.sync(&h, 0).unwrap(), "no change, no rebuild");
    // An unrelated change (new SPD entry) keeps the sequence counter where it was.
    let g = h
        .update(|db| db.spd.policies.push(db.spd.policies[0].clone()))
        .unwrap();
    assert_eq!(g, 1);
    assert!(c.sync(&h, 0).unwrap());
    assert_eq!(c.outbound(0).unwrap().reserve(1).first, 11);
    // Deleting the tunnel's per-CPU SA moves the core to the fallback SA.
    h.update(|db| db.tunnel_mut(0).outbound.per_cpu.clear())
        .unwrap();
    c.sync(&h, 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().spi, 0x100);
    // An update that would make the database inconsistent is refused and not published.
    let before = h.generation();
    assert!(h
        .update(|db| db.tunnel_mut(0).inbound.fallback.spi = 0x201)
        .is_err());
    assert_eq!(h.generation(), before);
}

#[test]
fn lifetimes_soft_event_hard_switch_to_fallback() {
    let life = Lifetimes {
        soft: Limits {
            packets: Some(5),
            ..Default::default()
        },
        hard: Limits {
            packets: Some(8),
            seconds: Some(100),
            ..Default::default()
        },
    };
    let mut t = tunnel(1, life);
    t.outbound.fallback.lifetimes = Lifetimes::default();
    let d = Arc::new(SaDb::new(SaMode::PerCpu, 1, Backend::Ring, vec![t], spd()).unwrap());
    let mut c = CoreSas::new(0, d, 1000).unwrap();
    let q = EventQueue::new(16);
    c.outbound(0).unwrap().counters.packets = 5;
    c.check_lifetimes(1001, &q);
    assert_eq!(
        q.pop().map(|e| (e.spi, e.stage)),
        Some((0x101, Stage::Soft))
    );
    assert!(q.pop().is_none());
    c.outbound(0).unwrap().counters.packets = 8;
    c.check_lifetimes(1002, &q);
    assert_eq!(
        q.pop().map(|e| (e.spi, e.stage, e.dir)),
        Some((0x101, Stage::Hard, Direction::Outbound))
    );
    // Hard: the core now sends on the fallback SA, never in the clear.
    assert_eq!(c.outbound(0).unwrap().spi, 0x100);
    // Inbound per-CPU SA 0x201 hits its time limit on the fake clock.
    c.check_lifetimes(1100, &q);
    let evs: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
    assert!(
        evs.iter()
            .any(|e| e.spi == 0x201 && e.stage == Stage::Hard && e.dir == Direction::Inbound),
        "{evs:?}"
    );
    assert_eq!(c.route(0x201), Route::Expired);
    // When the fallback expires too, nothing is left: the caller drops.
    let mut t = tunnel(0, life);
    t.outbound.fallback.lifetimes = life;
    let d = Arc::new(SaDb::new(SaMode::PerCpu, 1, Backend::Ring, vec![t], spd()).unwrap());
    let mut c = CoreSas::new(0, d, 0).unwrap();
    c.outbound(0).unwrap().counters.packets = 9;
    c.check_lifetimes(1, &q);
    assert!(c.outbound(0).is_none());
}

#[test]
fn seq_guard_resumes_above_the_last_durable_limit_and_stops_at_the_limit() {
    // Issue 12 item 3: a restarted gateway with static keys resumes after what its previous
    // run had reserved, and never sends past what is durably reserved now.
    let mut d = db(SaMode::PerCpu, 2, 2);
    let guards: std::collections::HashMap<u32, Arc<SeqGuard>> = d
        .outbound_specs()
        .map(|s| (s.spi, Arc::new(SeqGuard::new(s.spi, 1000))))
        .collect();
    d.attach_seq_guards(|s| guards[&s.spi].clone());
    let h = SaDbHandle::new(d);
    let mut c0 = CoreSas::new(0, h.load(), 0).unwrap();
    let spi = c0.outbound(0).unwrap().spi;
    // Nothing granted yet: nothing may be sent, and the refusal says why.
    let r = c0.outbound(0).unwrap().reserve(4);
    assert_eq!((r.count, r.unreserved), (0, true));
    guards[&spi].grant(1010);
    let r = c0.outbound(0).unwrap().reserve(8);
    assert_eq!((r.first, r.count, r.unreserved), (1001, 8, false));
    let r = c0.outbound(0).unwrap().reserve(8);
    assert_eq!((r.first, r.count, r.unreserved), (1009, 2, true));
    assert_eq!(guards[&spi].used(), 1010);
    // The fallback SA (shared counter) resumes after the guard too, from every core.
    h.update(|db| db.tunnel_mut(0).outbound.per_cpu.clear())
        .unwrap();
    c0.sync(&h, 0).unwrap();
    let mut c1 = CoreSas::new(1, h.load(), 0).unwrap();
    let fb = c0.outbound(0).unwrap().spi;
    guards[&fb].grant(2000);
    let a = c0.outbound(0).unwrap().reserve(3);
    let b = c1.outbound(0).unwrap().reserve(3);
    assert_eq!((a.first, b.first), (1001, 1004));
    assert_eq!(guards[&fb].used(), 1006);
}

#[test]
fn nearing_the_end_of_the_sequence_space_raises_one_soft_event() {
    // Issue 12 item 10: a soft event at a configurable share of the space, once.
    let mut d = db(SaMode::PerCpu, 1, 1);
    d.seq_warn = 0.5;
    d.tunnel_mut(0).outbound.per_cpu[0].start_seq = (1u64 << 63) - 10; // ESN: 2^64 space
    let h = SaDbHandle::new(d);
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    let q = EventQueue::new(16);
    c.check_lifetimes(1, &q);
    assert!(q.pop().is_none(), "below the threshold");
    let r = c.outbound(0).unwrap().reserve(20);
    assert_eq!(r.first, (1u64 << 63) - 9);
    c.check_lifetimes(2, &q);
    let e = q.pop().expect("a sequence-space event");
    assert!(e.seq_space && e.stage == Stage::Soft && e.spi == 0x101);
    c.outbound(0).unwrap().reserve(20);
    c.check_lifetimes(3, &q);
    assert!(q.pop().is_none(), "only once");
}

#[test]
fn a_failed_rebuild_leaves_the_live_state_alone() {
    // Issue 12 item 4: a key schedule that fails part-way must not reset counters or windows.
    let h = SaDbHandle::new(db(SaMode::PerCpu, 1, 1));
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().reserve(10).first, 1);
    // A new tunnel in front whose key schedule fails.
    let e = h.update(|db| {
        let mut t = (*db.tunnels[0]).clone();
        t.name = "new".into();
        for (i, s) in t.outbound.all_mut().enumerate() {
            let mut n = SaSpec::new(
                0x900 + i as u32,
                key(0x90 + i as u8),
                true,
                4096,
                Lifetimes::default(),
                s.endpoints,
                s.cpu,
            );
            n.fail_key_schedule = true;
            *s = n;
        }
        for (i, s) in t.inbound.all_mut().enumerate() {
            s.spi = 0xa00 + i as u32;
        }
        db.tunnels.insert(0, Arc::new(t));
    });
    assert!(e.is_ok(), "the snapshot itself is valid");
    assert!(c.sync(&h, 0).is_err(), "the key schedule failed");
    // Still on the old snapshot, with its counter where it was.
    assert_eq!(c.db().tunnels.len(), 1);
    assert_eq!(c.outbound(0).unwrap().reserve(1).first, 11);
    assert!(c.inbound_mut(0x201).is_some());
}

#[test]
fn a_per_cpu_sa_is_held_by_one_worker_only() {
    // Issue 12 item 5: two workers with one core index would each count from 1 on the same
    // per-CPU SA; the second is refused, and the SA is free again once the first lets go.
    let h = SaDbHandle::new(db(SaMode::PerCpu, 2, 2));
    let a = CoreSas::new(0, h.load(), 0).unwrap();
    match CoreSas::new(0, h.load(), 0) {
        Err(DbError::Claimed { spi, owner, core }) => assert_eq!((spi, owner, core), (0x101, 0, 0)),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another core is fine, and so is core 0 again after the first worker is gone.
    let _b = CoreSas::new(1, h.load(), 0).unwrap();
    drop(a);
    CoreSas::new(0, h.load(), 0).unwrap();
}

#[test]
fn a_new_key_under_the_same_spi_is_a_new_sa() {
    // Reload with changed keys: runtime state (counter, window) moves on only when SPI and key
    // are both unchanged.
    let h = SaDbHandle::new(db(SaMode::PerCpu, 1, 1));
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().reserve(10).first, 1);
    // Same SPIs and keys, new objects (what a reload builds): the counter goes on.
    h.update(|db| db.tunnels[0] = Arc::new(tunnel(1, Lifetimes::default())))
        .unwrap();
    c.sync(&h, 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().reserve(1).first, 11);
    // A new key for the same SPI: a new SA (its own counter, its own window).
    h.update(|db| {
        let s = &mut db.tunnel_mut(0).outbound.per_cpu[0];
        *s = SaSpec::new(
            s.spi,
            key(0x77),
            true,
            4096,
            Lifetimes::default(),
            s.endpoints,
            s.cpu,
        );
    })
    .unwrap();
    c.sync(&h, 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().reserve(1).first, 1);
}

#[test]
fn slots_awaiting_ike_raise_acquires_and_are_never_used() {
    // Everything awaiting the IKE daemon: nothing sent or received; a packet raises an
    // acquire for the fallback SA, at most once a second.
    let mut d = db(SaMode::PerCpu, 2, 2);
    let t = d.tunnel_mut(0);
    for s in t.outbound.all_mut().chain(t.inbound.all_mut()) {
        s.awaiting_ike = true;
    }
    let q = AcquireQueue::new(16);
    let mut c0 = CoreSas::new(0, Arc::new(d.clone()), 0).unwrap();
    assert!(c0.outbound(0).is_none());
    let in_spi = d.tunnels[0].inbound.fallback.spi;
    assert!(
        c0.inbound_local(in_spi).is_none(),
        "a placeholder accepts nothing"
    );
    assert_eq!(c0.raise_acquires(10, &q), 0, "no packet wanted it yet");
    c0.note_use(0);
    assert_eq!(c0.raise_acquires(10, &q), 1);
    assert_eq!(
        q.pop(),
        Some(Acquire {
            tunnel: 0,
            cpu: None,
            core: 0
        })
    );
    c0.note_use(0);
    assert_eq!(c0.raise_acquires(10, &q), 0, "rate-limited");
    assert_eq!(c0.raise_acquires(11, &q), 1);
    q.pop();
    // The daemon installed the fallback SA: core 1 sends on it and asks for its per-CPU SA.
    d.tunnel_mut(0).outbound.fallback.awaiting_ike = false;
    let mut c1 = CoreSas::new(1, Arc::new(d.clone()), 0).unwrap();
    assert_eq!(
        c1.outbound(0).unwrap().spi,
        d.tunnel_mut(0).outbound.fallback.spi
    );
    c1.note_use(0);
    assert_eq!(c1.raise_acquires(20, &q), 1);
    assert_eq!(
        q.pop(),
        Some(Acquire {
            tunnel: 0,
            cpu: Some(1),
            core: 1
        })
    );
    // And its per-CPU SA: no more acquires.
    d.tunnel_mut(0).outbound.per_cpu[1].awaiting_ike = false;
    let mut c1 = CoreSas::new(1, Arc::new(d), 0).unwrap();
    assert_eq!(c1.outbound(0).unwrap().spi, 0x102);
    c1.note_use(0);
    assert_eq!(c1.raise_acquires(30, &q), 0);
}

#[test]
fn acquires_back_off_and_stop_where_per_cpu_sas_are_not_allowed() {
    // Issue 25 item 1: a peer without per-CPU SAs answers every per-CPU acquire with one more
    // ordinary Child SA; workers used to ask once a second for as long as traffic flowed.
    let mut d = db(SaMode::PerCpu, 2, 2);
    d.tunnel_mut(0).outbound.per_cpu[1].awaiting_ike = true;
    let h = SaDbHandle::new(d);
    let q = AcquireQueue::new(64);
    let mut c1 = CoreSas::new(1, h.load(), 0).unwrap();
    let mut times = Vec::new();
    for now in 1..=100 {
        c1.note_use(0);
        if c1.raise_acquires(now, &q) == 1 {
            times.push(now);
        }
    }
    assert_eq!(
        times,
        vec![1, 2, 4, 8, 16, 32, 64, 96],
        "1, 2, 4 ... up to 32 s apart"
    );
    // The daemon's policy says the peer did not agree to per-CPU SAs: no more per-CPU
    // acquires; core 1 sends on the fallback SA.
    h.update(|db| db.tunnel_mut(0).pcpu_acquires = false)
        .unwrap();
    c1.sync(&h, 200).unwrap();
    c1.note_use(0);
    assert_eq!(c1.raise_acquires(300, &q), 0);
    assert_eq!(c1.outbound(0).unwrap().spi, 0x100);
    // A fallback SA still awaiting the daemon is asked for whatever the flag.
    h.update(|db| db.tunnel_mut(0).outbound.fallback.awaiting_ike = true)
        .unwrap();
    c1.sync(&h, 300).unwrap();
    c1.note_use(0);
    assert_eq!(
        c1.raise_acquires(301, &q),
        1,
        "the wanted SA changed: at once"
    );
    while q.pop().is_some() {}
}

#[test]
fn an_sa_keeps_its_counters_after_its_workers_move_on() {
    // Issue 25 item 4: the fallback SA showed 0 once every worker had its own SA, although it
    // had carried traffic.
    let mut d = db(SaMode::PerCpu, 1, 1);
    d.tunnel_mut(0).outbound.per_cpu[0].awaiting_ike = true;
    let h = SaDbHandle::new(d);
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    let fb = c.outbound(0).unwrap();
    assert_eq!(fb.spi, 0x100);
    fb.reserve(7);
    fb.counters.packets = 7;
    fb.counters.bytes = 700;
    let st = c.db().tunnels[0].outbound.fallback.out_state().clone();
    st.note_use(1234);
    h.update(|db| db.tunnel_mut(0).outbound.per_cpu[0].awaiting_ike = false)
        .unwrap();
    c.sync(&h, 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().spi, 0x101, "on its own SA now");
    let r: Vec<_> = c
        .retired_outbound()
        .map(|(s, k)| (s, k.packets, k.bytes))
        .collect();
    assert_eq!(r, vec![(0x100, 7, 700)]);
    assert_eq!((st.last_seq(), st.last_use()), (7, 1234));
}

/// Issue 26: with more tunnels than one lifetime check looks at (LIFETIME_CHUNK), the checks
/// walk the SAs a slice at a time and every SA's lifetime still fires, within
/// ceil(tunnels / chunk) calls; none fires twice.
#[test]
fn lifetimes_of_thousands_of_tunnels_are_checked_a_slice_at_a_time() {
    let n = LIFETIME_CHUNK * 2 + 100;
    let life = Lifetimes {
        soft: Limits {
            seconds: Some(10),
            ..Default::default()
        },
        hard: Limits::default(),
    };
    let mut tunnels = Vec::new();
    let mut spd = Spd::default();
    for i in 0..n as u32 {
        let mk = |spi: u32| {
            let mut k = [0u8; 20];
            k[..4].copy_from_slice(&spi.to_be_bytes());
            SaSpec::new(
                spi,
                KeyMaterial::new(Algorithm::AesGcm128, &k).unwrap(),
                true,
                4096,
                life,
                ep(4500),
                None,
            )
        };
        let l: crate::selector::Prefix = format!("10.{}.{}.0/24", i >> 8, i & 255).parse().unwrap();
        let r: crate::selector::Prefix = format!("172.{}.{}.0/24", 16 + (i >> 8), i & 255)
            .parse()
            .unwrap();
        tunnels.push(TunnelSas {
            name: format!("t{i}"),
            local_subnets: vec![l],
            remote_subnets: vec![r],
            outbound: PerCpuSaGroup {
                fallback: mk(0x10_0000 + i),
                per_cpu: vec![],
            },
            inbound: PerCpuSaGroup {
                fallback: mk(0x80_0000 + i),
                per_cpu: vec![],
            },
            draining: vec![],
            pcpu_acquires: true,
            rekey_every: None,
        });
        spd.policies.push(Policy {
            name: format!("t{i}"),
            selector: Selector {
                src: l,
                dst: r,
                proto: None,
                src_ports: PortRange::ANY,
                dst_ports: PortRange::ANY,
            },
            action: Action::Protect(i as usize),
        });
    }
    let d = Arc::new(SaDb::new(SaMode::Shared, 1, Backend::Ring, tunnels, spd).unwrap());
    let mut c = CoreSas::new(0, d, 1000).unwrap();
    let q = EventQueue::new(4 * n);
    let calls = n.div_ceil(LIFETIME_CHUNK);
    let mut per_call = Vec::new();
    for _ in 0..calls {
        c.check_lifetimes(1011, &q);
        per_call.push(q.len());
    }
    let evs: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
    let out: HashSet<u32> = evs
        .iter()
        .filter(|e| e.dir == Direction::Outbound && e.stage == Stage::Soft)
        .map(|e| e.spi)
        .collect();
    let inb: HashSet<u32> = evs
        .iter()
        .filter(|e| e.dir == Direction::Inbound && e.stage == Stage::Soft)
        .map(|e| e.spi)
        .collect();
    assert_eq!(
        (out.len(), inb.len(), evs.len()),
        (n, n, 2 * n),
        "{per_call:?}"
    );
    // A slice per call: the first call saw at most a chunk of each direction.
    assert!(per_call[0] <= 2 * LIFETIME_CHUNK, "{per_call:?}");
    // Another round raises nothing new (soft fires once per SA).
    for _ in 0..calls {
        c.check_lifetimes(1012, &q);
    }
    assert_eq!(q.len(), 0);
}

#[test]
fn an_inbound_sa_that_expired_stays_expired_across_snapshots() {
    // An inbound SA removed at its hard lifetime used to come back, with an empty replay
    // window, at the next snapshot (any change anywhere): its old packets replayed would have
    // been accepted again.
    let life = Lifetimes {
        hard: Limits {
            packets: Some(3),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = tunnel(0, Lifetimes::default());
    t.inbound.fallback.lifetimes = life;
    let h = SaDbHandle::new(SaDb::new(SaMode::PerCpu, 1, Backend::Ring, vec![t], spd()).unwrap());
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    let q = EventQueue::new(16);
    assert_eq!(c.route(0x200), Route::Local);
    c.inbound_mut(0x200).unwrap().counters.packets = 3;
    c.check_lifetimes(1, &q);
    assert_eq!(c.route(0x200), Route::Expired);
    // A snapshot that changes the tunnel (another SA's lifetime) and one that does not.
    h.update(|db| db.tunnel_mut(0).outbound.fallback.lifetimes.hard.seconds = Some(9999))
        .unwrap();
    c.sync(&h, 2).unwrap();
    assert_eq!(c.route(0x200), Route::Expired, "not built again");
    h.update(|db| db.seq_warn = 0.8).unwrap();
    c.sync(&h, 3).unwrap();
    assert_eq!(c.route(0x200), Route::Expired);
    // A new key under that SPI is a new SA.
    h.update(|db| {
        let s = &mut db.tunnel_mut(0).inbound.fallback;
        *s = SaSpec::new(
            0x200,
            key(0x55),
            true,
            4096,
            Lifetimes::default(),
            s.endpoints,
            None,
        );
    })
    .unwrap();
    c.sync(&h, 4).unwrap();
    assert_eq!(c.route(0x200), Route::Local);
}

#[test]
fn a_snapshot_copies_and_a_worker_revisits_only_the_tunnels_that_changed() {
    // Issue 26: 10 000 tunnels; one changes. The new snapshot shares the others with the old
    // one, and a worker keeps their runtime state where it is.
    let tunnels: Vec<TunnelSas> = (0..3u32)
        .map(|i| {
            let mut t = tunnel(0, Lifetimes::default());
            t.name = format!("t{i}");
            t.outbound.fallback = spec(0x1000 + i, None, Lifetimes::default());
            t.inbound.fallback = spec(0x2000 + i, None, Lifetimes::default());
            t
        })
        .collect();
    let h = SaDbHandle::new(SaDb::new(SaMode::PerCpu, 1, Backend::Ring, tunnels, spd()).unwrap());
    let mut c = CoreSas::new(0, h.load(), 0).unwrap();
    assert_eq!(c.outbound(0).unwrap().reserve(5).first, 1);
    assert_eq!(c.outbound(2).unwrap().reserve(5).first, 1);
    let before = h.load();
    h.update(|db| db.tunnel_mut(1).outbound.fallback.lifetimes.hard.seconds = Some(60))
        .unwrap();
    let after = h.load();
    assert!(Arc::ptr_eq(&before.tunnels[0], &after.tunnels[0]));
    assert!(Arc::ptr_eq(&before.tunnels[2], &after.tunnels[2]));
    assert!(!Arc::ptr_eq(&before.tunnels[1], &after.tunnels[1]));
    c.sync(&h, 1).unwrap();
    assert_eq!(c.outbound(0).unwrap().reserve(1).first, 6, "state kept");
    assert_eq!(c.outbound(2).unwrap().reserve(1).first, 6);
    // A tunnel taken out moves the ones after it: they are looked at again, state kept.
    h.update(|db| {
        db.tunnels.remove(0);
    })
    .unwrap();
    c.sync(&h, 2).unwrap();
    assert_eq!(c.outbound(1).unwrap().spi, 0x1002);
    assert_eq!(c.outbound(1).unwrap().reserve(1).first, 7);
    assert_eq!(c.route(0x2000), Route::Unknown);
    assert_eq!(c.route(0x2002), Route::Local);
    assert_eq!(c.inbound_local(0x2002).map(|(_, t)| t), Some(1));
}
