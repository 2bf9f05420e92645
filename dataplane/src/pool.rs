//! Packet buffer pool: every buffer is allocated once at start-up; workers take and return them
//! through a per-worker cache that refills from / spills to a shared lock-free ring in bulk, as
//! DPDK's mempool does with its per-lcore caches. Nothing allocates in steady state.

use crate::pktbuf::PktBuf;
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The shared ring of free buffers.
#[derive(Debug)]
pub struct Pool {
    free: ArrayQueue<PktBuf>,
    buf_size: usize,
    total: usize,
    reclaimed: AtomicU64,
}

impl Pool {
    /// `count` buffers of `buf_size` bytes each.
    pub fn new(count: usize, buf_size: usize) -> Arc<Pool> {
        Arc::new_cyclic(|home| {
            let free = ArrayQueue::new(count.max(1));
            for _ in 0..count {
                let _ = free.push(PktBuf::new_in(buf_size, home.clone()));
            }
            Pool {
                free,
                buf_size,
                total: count,
                reclaimed: AtomicU64::new(0),
            }
        })
    }

    /// Takes back a buffer that was dropped instead of returned (see [`PktBuf`]'s `Drop`).
    pub(crate) fn reclaim(&self, b: PktBuf, count: bool) {
        if count {
            self.reclaimed.fetch_add(1, Ordering::Relaxed);
        }
        // The ring has room for every buffer of the pool, and only this pool's buffers go in.
        // Should that ever not hold, the buffer's memory is freed rather than recursing.
        if let Err(b) = self.free.push(b) {
            b.orphan();
        }
    }

    /// Buffers that came back by being dropped rather than returned: each one a path that
    /// forgot its buffer (and would have leaked it before buffers knew their pool).
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed.load(Ordering::Relaxed)
    }

    /// Buffers currently in the shared ring.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// All buffers of the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }
}

/// How many buffers move between a cache and the shared ring at once.
pub const CACHE_BULK: usize = 64;

/// A worker's private cache in front of the shared pool; with DPDK ports, the buffers it hands
/// out are mbufs from the port's mempool instead (bulk-allocated and bulk-freed), so a packet
/// the worker makes (the traffic generator's, an ARP reply) is sent in place too.
#[derive(Debug)]
pub struct PoolCache {
    pool: Arc<Pool>,
    local: Vec<PktBuf>,
    #[cfg(feature = "dpdk")]
    mbufs: Option<crate::port::dpdk::MbufCache>,
}

impl PoolCache {
    /// An empty cache (its vector is allocated now, once, with room for two bulks).
    pub fn new(pool: Arc<Pool>) -> PoolCache {
        PoolCache {
            pool,
            local: Vec::with_capacity(CACHE_BULK * 2),
            #[cfg(feature = "dpdk")]
            mbufs: None,
        }
    }

    /// Hands out mbufs from `mp` from now on (heap buffers still come back to the pool).
    #[cfg(feature = "dpdk")]
    pub fn use_mbufs(&mut self, mp: Arc<crate::port::dpdk::MbufPool>) {
        self.mbufs = Some(crate::port::dpdk::MbufCache::new(mp));
    }

    /// Whether this cache hands out mbufs.
    pub fn uses_mbufs(&self) -> bool {
        #[cfg(feature = "dpdk")]
        {
            self.mbufs.is_some()
        }
        #[cfg(not(feature = "dpdk"))]
        {
            false
        }
    }

    /// A free buffer, reset to the default headroom; `None` when the pool is empty.
    #[inline]
    pub fn get(&mut self) -> Option<PktBuf> {
        #[cfg(feature = "dpdk")]
        if let Some(m) = &mut self.mbufs {
            return m.get();
        }
        if self.local.is_empty() {
            for _ in 0..CACHE_BULK {
                match self.pool.free.pop() {
                    Some(b) => self.local.push(b),
                    None => break,
                }
            }
        }
        let mut b = self.local.pop()?;
        b.reset();
        Some(b)
    }

    /// Appends up to `n` free buffers, each reset to the default headroom, to `out` (a port's
    /// receive: DPDK's `rte_pktmbuf_alloc_bulk`); returns how many. Fewer than `n` only when
    /// the pool runs out. `out` must have room for them (burst lists do: they never grow).
    #[inline]
    pub fn get_burst(&mut self, out: &mut Vec<PktBuf>, n: usize) -> usize {
        #[cfg(feature = "dpdk")]
        if self.mbufs.is_some() {
            let mut k = 0;
            while k < n {
                let Some(b) = self.get() else { break };
                out.push(b);
                k += 1;
            }
            return k;
        }
        if self.local.len() < n {
            self.refill(n);
        }
        let k = n.min(self.local.len());
        let start = out.len();
        out.extend(self.local.drain(self.local.len() - k..));
        for b in &mut out[start..] {
            b.reset();
        }
        k
    }

    /// Tops the local cache up from the shared ring to at least `want` buffers (one bulk more
    /// than asked, within the cache's room), or as many as the ring has.
    #[cold]
    fn refill(&mut self, want: usize) {
        let target = (want + CACHE_BULK).min(self.local.capacity());
        while self.local.len() < target {
            match self.pool.free.pop() {
                Some(b) => self.local.push(b),
                None => break,
            }
        }
    }

    /// Returns every buffer of `list` (a port's transmit done, or a burst dropped whole:
    /// DPDK's `rte_pktmbuf_free_bulk`), leaving it empty. Buffers of this pool, the usual
    /// case, move into the cache in one copy; any other goes through [`PoolCache::put`].
    #[inline]
    pub fn put_burst(&mut self, list: &mut Vec<PktBuf>) {
        let ours = list.iter().all(|b| b.belongs_to(&self.pool));
        if ours && list.len() <= CACHE_BULK {
            if self.local.len() + list.len() > self.local.capacity() {
                self.spill();
            }
            self.local.append(list);
            return;
        }
        for b in list.drain(..) {
            self.put(b);
        }
    }

    /// Moves one bulk of buffers from the cache to the shared ring.
    #[cold]
    fn spill(&mut self) {
        for _ in 0..CACHE_BULK {
            if let Some(x) = self.local.pop() {
                // The ring holds every buffer of the pool, so it is never full here.
                let _ = self.pool.free.push(x);
            }
        }
    }

    /// Returns a buffer.
    #[inline]
    pub fn put(&mut self, b: PktBuf) {
        // A buffer of another pool (handed off, or steered to this worker) goes home.
        #[cfg(not(feature = "dpdk"))]
        if !b.belongs_to(&self.pool) {
            return b.go_home();
        }
        #[cfg(feature = "dpdk")]
        let b = match (b.is_mbuf(), &mut self.mbufs) {
            (true, Some(m)) => return m.put(b),
            (true, None) => return drop(b), // frees the mbuf
            (false, _) if !b.belongs_to(&self.pool) => return b.go_home(),
            (false, _) => b,
        };
        if self.local.len() >= CACHE_BULK * 2 {
            self.spill();
        }
        self.local.push(b);
    }

    /// Gives every cached buffer back to the shared ring (at shutdown).
    pub fn flush(&mut self) {
        while let Some(x) = self.local.pop() {
            let _ = self.pool.free.push(x);
        }
        #[cfg(feature = "dpdk")]
        if let Some(m) = &mut self.mbufs {
            m.flush();
        }
    }

    /// The shared pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for PoolCache {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::pktbuf::PacketBuf;

    #[test]
    fn buffers_circulate_without_loss() {
        let pool = Pool::new(300, 2048);
        let mut a = PoolCache::new(pool.clone());
        let mut b = PoolCache::new(pool.clone());
        let mut held = Vec::new();
        for _ in 0..300 {
            held.push(a.get().unwrap());
        }
        assert!(a.get().is_none(), "pool exhausted");
        for h in held.drain(..) {
            b.put(h);
        }
        let mut x = b.get().unwrap();
        assert_eq!(x.headroom(), crate::pktbuf::DEFAULT_HEADROOM);
        x.append(10).unwrap();
        b.put(x);
        drop(a);
        drop(b);
        assert_eq!(pool.available(), 300);
        assert_eq!(pool.reclaimed(), 0);
    }

    #[test]
    fn bursts_come_and_go_in_bulk() {
        let pool = Pool::new(300, 2048);
        let other = Pool::new(4, 2048);
        let mut c = PoolCache::new(pool.clone());
        let mut list = Vec::with_capacity(128);
        // Used buffers come back reset.
        assert_eq!(c.get_burst(&mut list, 32), 32);
        for b in &mut list {
            b.adj(10);
            b.append(100).unwrap();
        }
        c.put_burst(&mut list);
        assert!(list.is_empty());
        assert_eq!(c.get_burst(&mut list, 32), 32);
        assert!(list
            .iter()
            .all(|b| b.is_empty() && b.headroom() == crate::pktbuf::DEFAULT_HEADROOM));
        c.put_burst(&mut list);
        // Everything, a burst at a time (the cache refills from the shared ring), then back
        // in lists of every size: up to a bulk in one move, longer ones one by one.
        let mut all: Vec<PktBuf> = Vec::new();
        loop {
            let got = c.get_burst(&mut list, 32);
            if got == 0 {
                break;
            }
            all.append(&mut list);
        }
        assert_eq!(all.len(), 300);
        for size in [1, 64, 100, 35, 100] {
            list.extend(all.drain(..size));
            c.put_burst(&mut list);
            assert!(list.is_empty());
        }
        drop(c);
        assert_eq!(pool.available(), 300);
        assert_eq!(pool.reclaimed(), 0);
        // A buffer of another pool in a burst goes to its own pool.
        let mut c = PoolCache::new(pool.clone());
        let mut oc = PoolCache::new(other.clone());
        let mut list = Vec::with_capacity(128);
        c.get_burst(&mut list, 3);
        list.push(oc.get().unwrap());
        c.put_burst(&mut list);
        drop(oc);
        assert_eq!(other.available(), 4);
        drop(c);
        assert_eq!(pool.available(), 300);
    }

    #[test]
    fn a_burst_stops_where_the_pool_ends() {
        let pool = Pool::new(10, 2048);
        let mut c = PoolCache::new(pool.clone());
        let mut list = Vec::with_capacity(128);
        assert_eq!(c.get_burst(&mut list, 32), 10);
        assert_eq!(c.get_burst(&mut list, 32), 0);
        c.put_burst(&mut list);
        assert_eq!(c.get_burst(&mut list, 4), 4);
        c.put_burst(&mut list);
        drop(c);
        assert_eq!(pool.available(), 10);
        assert_eq!(pool.reclaimed(), 0);
    }

    #[test]
    fn a_dropped_buffer_goes_home() {
        let pool = Pool::new(8, 2048);
        let mut c = PoolCache::new(pool.clone());
        // Take everything, then drop the buffers on the floor (as a full control queue or a
        // forgotten branch would): the pool must be whole again.
        let held: Vec<PktBuf> = std::iter::from_fn(|| c.get()).collect();
        assert_eq!(held.len(), 8);
        drop(held);
        drop(c);
        assert_eq!(pool.available(), 8);
        assert_eq!(pool.reclaimed(), 8);
        // A copy belongs to no pool: dropping it does not grow the pool.
        let mut c = PoolCache::new(pool.clone());
        let b = c.get().unwrap();
        drop(b.clone());
        c.put(b);
        drop(c);
        assert_eq!(pool.available(), 8);
    }
}
