//! `espada_dataplane::launch`: a worker is placed, then built, on its own thread (tested here,
//! where the lab's databases and null ports are).

use espada_dataplane::launch::{spawn_worker, LaunchError};
use espada_dataplane::pool::{Pool, PoolCache};
use espada_dataplane::worker::Worker;
use espada_harness::pair::lab;
use espada_harness::solo::NullPort;
use espada_wire::ethernet::MacAddr;
use std::sync::{mpsc, Arc};

fn worker(core: usize) -> Result<Worker, espada_sadb::db::DbError> {
    let (w, _) = lab::dbs(
        1,
        1,
        espada_sadb::db::SaMode::PerCpu,
        espada_sadb::lifetime::Lifetimes::default(),
    );
    let (ws, _) = lab::sides();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sh = espada_harness::pair::shared(ws, w, 1, &[], stop);
    Worker::new(
        core,
        sh,
        Box::new(NullPort::new(MacAddr([2, 0, 0, 0, 0, 1]))),
        Box::new(NullPort::new(MacAddr([2, 0, 0, 0, 0, 2]))),
        PoolCache::new(Pool::new(64, 2048)),
    )
}

#[test]
fn the_worker_is_built_on_its_own_thread_after_placement() {
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let t = spawn_worker(
        "espada-test-w".into(),
        move || tx.send(("place", std::thread::current().id())).unwrap(),
        move || {
            tx2.send(("build", std::thread::current().id())).unwrap();
            worker(0)
        },
        |w| {
            w.poll();
        },
    )
    .unwrap();
    let w = t.join().unwrap();
    assert_eq!(w.core(), 0);
    let (a, b) = (rx.recv().unwrap(), rx.recv().unwrap());
    assert_eq!((a.0, b.0), ("place", "build"), "placed first, then built");
    assert_eq!(a.1, b.1);
    assert_ne!(
        a.1,
        std::thread::current().id(),
        "not on the caller's thread"
    );
}

#[test]
fn a_build_error_reaches_the_caller() {
    let r = spawn_worker(
        "espada-test-w".into(),
        || {},
        || Err::<Worker, _>("no SA for this core"),
        |_| {},
    );
    match r {
        Err(LaunchError::Build(e)) => assert_eq!(e, "no SA for this core"),
        other => panic!("expected the build error, got {other:?}"),
    }
}
