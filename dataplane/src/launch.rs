//! Starting a worker the way a per-core dataplane should: on its own thread, placed first
//! (pinned to its core, or free to run anywhere), and only then built. Everything the worker
//! allocates for itself (its SA state, key schedules, replay windows, packet lists, neighbor
//! caches, counters) is first touched by the core that will use it: it lands in that thread's
//! allocator arena and, on a NUMA machine, in that core's memory, and never shares a cache line
//! with another worker's hot state.
//!
//! The thread answers once it is built (or failed to build), so the caller still gets a build
//! error before it goes on, as it would building in place.

use crate::worker::{StatsCell, Worker};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running worker thread: join it to get the worker back when it stops.
#[derive(Debug)]
pub struct WorkerThread {
    handle: JoinHandle<Option<Worker>>,
    /// The worker's published counters.
    pub cell: Arc<StatsCell>,
}

impl WorkerThread {
    /// Waits for the thread's body to return and gives the worker back (`Err`: it panicked).
    pub fn join(self) -> std::thread::Result<Worker> {
        // Only a built worker makes a `WorkerThread`, and its thread returns it.
        self.handle
            .join()?
            .ok_or_else(|| Box::new("worker missing") as Box<dyn std::any::Any + Send>)
    }
}

/// Why a worker did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError<E: std::fmt::Display + std::fmt::Debug> {
    /// The thread could not be created.
    #[error("starting the worker thread: {0}")]
    Spawn(#[from] std::io::Error),
    /// The worker could not be built.
    #[error("{0}")]
    Build(E),
    /// The thread ended before it answered (a panic while building).
    #[error("the worker thread ended while building its worker")]
    Died,
}

/// Starts thread `name`: it runs `place` (pinning), builds its worker with `build`, reports
/// back, then runs `body` and returns the worker. Returns once the worker is built.
pub fn spawn_worker<E>(
    name: String,
    place: impl FnOnce() + Send + 'static,
    build: impl FnOnce() -> Result<Worker, E> + Send + 'static,
    body: impl FnOnce(&mut Worker) + Send + 'static,
) -> Result<WorkerThread, LaunchError<E>>
where
    E: std::fmt::Display + std::fmt::Debug + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel::<Result<Arc<StatsCell>, E>>(1);
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        place();
        let mut w = match build() {
            Ok(w) => w,
            Err(e) => {
                // Nothing to run: the caller gets the error and the thread ends here.
                let _ = tx.send(Err(e));
                return None;
            }
        };
        let _ = tx.send(Ok(w.stats_cell()));
        drop(tx);
        body(&mut w);
        Some(w)
    })?;
    match rx.recv() {
        Ok(Ok(cell)) => Ok(WorkerThread { handle, cell }),
        Ok(Err(e)) => Err(LaunchError::Build(e)),
        Err(_) => Err(LaunchError::Died),
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::pair::lab;
    use crate::pool::{Pool, PoolCache};
    use crate::solo::NullPort;
    use espada_wire::ethernet::MacAddr;

    fn worker(core: usize) -> Result<Worker, espada_sadb::db::DbError> {
        let (w, _) = lab::dbs(
            1,
            1,
            espada_sadb::db::SaMode::PerCpu,
            espada_sadb::lifetime::Lifetimes::default(),
        );
        let (ws, _) = lab::sides();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sh = crate::pair::shared(ws, w, 1, &[], stop);
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
}
