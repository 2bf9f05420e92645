//! Style rule 4: no allocation per packet. A counting global allocator watches the worker loop
//! of both gateways of the in-memory pair in steady state (after warm-up) while traffic flows.

use espada_dataplane::port::memory::Steering;
use espada_harness::pair::{lab, Pair, PairSpec};
use espada_sadb::db::SaMode;
use espada_sadb::lifetime::Lifetimes;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarding to the system allocator with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarding.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarding.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn steady_state_allocations(mode: SaMode, steering: Steering) -> (u64, u64) {
    let (w, e) = lab::dbs(2, 2, mode, Lifetimes::default());
    let (ws, es) = lab::sides();
    let mut p = Pair::new(
        w,
        e,
        ws,
        es,
        PairSpec {
            workers: 2,
            size: 1000,
            flows: 8,
            limit: None,
            steering,
            ring_depth: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    for _ in 0..2000 {
        p.step();
    }
    let before = p.received.packets();
    ALLOCS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    for _ in 0..5000 {
        p.step();
    }
    COUNTING.store(false, Ordering::Relaxed);
    (
        ALLOCS.load(Ordering::Relaxed),
        p.received.packets() - before,
    )
}

#[test]
fn worker_loop_does_not_allocate() {
    // One test function: the counter is global, so the cases run one after the other.
    for (mode, steering) in [
        (SaMode::PerCpu, Steering::UdpSrcPort { base: 4501 }),
        (SaMode::PerCpu, Steering::Rss),
        (SaMode::Shared, Steering::Rss),
    ] {
        let (allocs, packets) = steady_state_allocations(mode, steering);
        assert!(
            packets > 100_000,
            "{mode:?}/{steering:?}: traffic must flow ({packets})"
        );
        assert_eq!(
            allocs, 0,
            "{mode:?}/{steering:?}: {allocs} allocations while {packets} packets went through"
        );
    }
}
