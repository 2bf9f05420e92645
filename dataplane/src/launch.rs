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
