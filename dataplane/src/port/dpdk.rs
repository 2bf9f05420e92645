//! DPDK ports (feature `dpdk`): EAL set-up, an mbuf pool per NUMA socket, one RX and one TX
//! queue per worker, bounded transmit retries with leftovers counted, link state, the PMD's
//! counters, and `rte_flow` rules steering each per-CPU SA's UDP source port to its queue.
//!
//! Zero copy: a received mbuf becomes a [`PktBuf`] that views its data room (no copy), the
//! pipeline works on it in place, and transmit hands the same mbuf to the PMD. Buffers the
//! worker makes itself come from the same mempool ([`MbufCache`]). Only a heap buffer (none on
//! a DPDK-only worker) is copied into an mbuf at transmit, counted as `tx_copied`.
//!
//! Every `unsafe` block here calls into DPDK through `dpdk-sys`; each says why it is sound.
#![allow(unsafe_code)]

use super::{PortQueue, PortStats};
use crate::pktbuf::{PacketBuf, PktBuf};
use crate::pool::PoolCache;
use dpdk_sys as sys;
use espada_wire::ethernet::MacAddr;
use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// EAL arguments that work without hugepages or a PCI device (CI, labs, this machine).
pub const NO_HUGE_ARGS: &[&str] = &[
    "--no-huge",
    "-m",
    "256",
    "--no-pci",
    "--no-shconf",
    "--log-level=error",
];

static EAL: OnceLock<Result<(), String>> = OnceLock::new();

fn strerror(e: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local string.
    unsafe { CStr::from_ptr(sys::rte_strerror(e)) }
        .to_string_lossy()
        .into_owned()
}

/// Initialises DPDK's EAL once per process with `args` (program name excluded). Later calls
/// return the first result.
pub fn eal_init(args: &[String]) -> Result<(), String> {
    EAL.get_or_init(|| {
        let mut owned: Vec<CString> = vec![CString::new("espada").expect("no NUL")];
        for a in args {
            owned.push(
                CString::new(a.as_str())
                    .map_err(|_| format!("EAL argument contains NUL: {a:?}"))?,
            );
        }
        // DPDK may permute argv; give it its own array of pointers into `owned`, which lives
        // for the rest of the process (leaked on purpose: EAL keeps references).
        let owned = Box::leak(owned.into_boxed_slice());
        let mut ptrs: Vec<*mut std::os::raw::c_char> =
            owned.iter().map(|c| c.as_ptr() as *mut _).collect();
        let argv = Box::leak(ptrs.clone().into_boxed_slice());
        ptrs.clear();
        // SAFETY: argc/argv describe valid NUL-terminated strings that outlive the call.
        let r = unsafe { sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        if r < 0 {
            // SAFETY: plain getter.
            let e = unsafe { sys::espada_rte_errno() };
            Err(format!(
                "rte_eal_init failed: {} (arguments: {})",
                strerror(e),
                args.join(" ")
            ))
        } else {
            Ok(())
        }
    })
    .clone()
}

/// An mbuf pool.
pub struct MbufPool {
    pool: *mut sys::rte_mempool,
}

// SAFETY: DPDK mempools are multi-producer/multi-consumer safe.
unsafe impl Send for MbufPool {}
// SAFETY: as above.
unsafe impl Sync for MbufPool {}

/// A worker's mbufs: allocated and freed in bulks of [`MBUF_BULK`] (DPDK's
/// `rte_pktmbuf_alloc_bulk` / `free_bulk`), so the mempool is touched once per bulk.
pub struct MbufCache {
    pool: std::sync::Arc<MbufPool>,
    ready: [*mut sys::rte_mbuf; MBUF_BULK],
    n_ready: usize,
    done: [*mut sys::rte_mbuf; MBUF_BULK],
    n_done: usize,
}

/// mbufs per bulk allocation or free.
pub const MBUF_BULK: usize = 32;

impl std::fmt::Debug for MbufCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MbufCache({} ready, {} to free)",
            self.n_ready, self.n_done
        )
    }
}

// SAFETY: the mbufs held are owned by this cache; a cache belongs to one worker at a time.
unsafe impl Send for MbufCache {}

impl MbufCache {
    /// An empty cache over `pool`.
    pub fn new(pool: std::sync::Arc<MbufPool>) -> MbufCache {
        MbufCache {
            pool,
            ready: [std::ptr::null_mut(); MBUF_BULK],
            n_ready: 0,
            done: [std::ptr::null_mut(); MBUF_BULK],
            n_done: 0,
        }
    }

    /// A fresh mbuf (default headroom, empty) as a buffer; `None` when the mempool is empty.
    #[inline]
    pub fn get(&mut self) -> Option<PktBuf> {
        if self.n_ready == 0 {
            // Reuse what is waiting to be freed first (already ours), else ask the mempool.
            if self.n_done > 0 {
                for i in 0..self.n_done {
                    // SAFETY: these mbufs are ours; reset puts them back to the state
                    // rte_pktmbuf_alloc returns (headroom restored, one empty segment).
                    unsafe { sys::espada_mbuf_reset(self.done[i]) };
                }
                self.ready[..self.n_done].copy_from_slice(&self.done[..self.n_done]);
                self.n_ready = self.n_done;
                self.n_done = 0;
            } else {
                // SAFETY: ready has room for MBUF_BULK pointers; the pool is live.
                let r = unsafe {
                    sys::espada_mbuf_alloc_bulk(
                        self.pool.pool,
                        self.ready.as_mut_ptr(),
                        MBUF_BULK as u32,
                    )
                };
                if r != 0 {
                    return None;
                }
                self.n_ready = MBUF_BULK;
            }
        }
        self.n_ready -= 1;
        let m = std::ptr::NonNull::new(self.ready[self.n_ready])?;
        // SAFETY: a fresh one-segment mbuf, owned by us, handed to the buffer.
        unsafe { from_mbuf(m) }
    }

    /// Takes back an mbuf buffer (freed with the next bulk).
    #[inline]
    pub fn put(&mut self, b: PktBuf) {
        let Ok(m) = into_mbuf(b) else { return };
        if self.n_done == MBUF_BULK {
            self.flush_done();
        }
        self.done[self.n_done] = m.as_ptr();
        self.n_done += 1;
    }

    fn flush_done(&mut self) {
        if self.n_done > 0 {
            // SAFETY: the first n_done entries are mbufs we own, freed once.
            unsafe { sys::espada_mbuf_free_bulk(self.done.as_mut_ptr(), self.n_done as u32) };
            self.n_done = 0;
        }
    }

    /// Frees everything held (at shutdown).
    pub fn flush(&mut self) {
        self.flush_done();
        if self.n_ready > 0 {
            // SAFETY: as above.
            unsafe { sys::espada_mbuf_free_bulk(self.ready.as_mut_ptr(), self.n_ready as u32) };
            self.n_ready = 0;
        }
    }
}

impl Drop for MbufCache {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Gives the calling thread a DPDK lcore id (`rte_thread_register`) so the mempool's per-lcore
/// cache serves it; returns whether DPDK accepted. Threads that are EAL lcores already are fine.
pub fn register_thread() -> bool {
    // SAFETY: plain call; EAL is initialised when mbufs exist.
    unsafe { sys::espada_thread_register() == 0 }
}

impl MbufPool {
    /// `n` mbufs with `data_room` bytes each (headroom included) on NUMA `socket`.
    pub fn new(name: &str, n: u32, data_room: u16, socket: i32) -> Result<MbufPool, String> {
        let c = CString::new(name).map_err(|_| "pool name contains NUL".to_string())?;
        // SAFETY: EAL is initialised by the caller (eal_init); name is a valid C string.
        let pool = unsafe { sys::espada_pool_create(c.as_ptr(), n, data_room, socket) };
        if pool.is_null() {
            // SAFETY: plain getter.
            return Err(format!(
                "mbuf pool {name}: {}",
                strerror(unsafe { sys::espada_rte_errno() })
            ));
        }
        Ok(MbufPool { pool })
    }
}

/// The DPDK port id and NUMA socket of the port named `name` (a vdev, or a PCI address);
/// socket -1 when DPDK does not know it (virtual devices).
pub fn port_socket(name: &str) -> Result<(u16, i32), String> {
    let c = CString::new(name).map_err(|_| "port name contains NUL".to_string())?;
    let mut id = 0u16;
    // SAFETY: valid C string and out-pointer.
    if unsafe { sys::rte_eth_dev_get_port_by_name(c.as_ptr(), &mut id) } != 0 {
        return Err(format!(
            "no DPDK port named {name} (is its --vdev/--allow in the EAL arguments?)"
        ));
    }
    // SAFETY: id names an existing port.
    Ok((id, unsafe { sys::rte_eth_dev_socket_id(id) }))
}

/// EAL arguments that keep DPDK's main lcore off the worker cores: lcore 0 floats over the
/// online CPUs no worker uses (all of them when every CPU runs a worker), and the workers are
/// registered threads pinned by espada. Without this, `-l <worker cores>` puts the main thread
/// (control socket, reports) on worker 0's core, and every thread it starts inherits that core.
pub fn main_lcore_args(online: &[usize], workers: &[usize]) -> Vec<String> {
    let mut free: Vec<usize> = online
        .iter()
        .copied()
        .filter(|c| !workers.contains(c))
        .collect();
    if free.is_empty() {
        free = online.to_vec();
    }
    let set = free
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    vec!["--lcores".to_string(), format!("0@({set})")]
}

/// One mbuf pool per NUMA socket, made on first use: a port's queues receive into the pool of
/// the socket its device sits on.
pub struct SocketPools {
    name: String,
    n: u32,
    data_room: u16,
    pools: Vec<(i32, std::sync::Arc<MbufPool>)>,
}

impl SocketPools {
    /// Pools called `name` + socket, of `n` mbufs with `data_room` bytes each.
    pub fn new(name: &str, n: u32, data_room: u16) -> SocketPools {
        SocketPools {
            name: name.to_string(),
            n,
            data_room,
            pools: Vec::new(),
        }
    }

    /// The pool of NUMA `socket` (-1: any).
    pub fn for_socket(&mut self, socket: i32) -> Result<std::sync::Arc<MbufPool>, String> {
        if let Some((_, p)) = self.pools.iter().find(|(s, _)| *s == socket) {
            return Ok(p.clone());
        }
        let tag = if socket < 0 {
            "any".to_string()
        } else {
            socket.to_string()
        };
        let p = std::sync::Arc::new(MbufPool::new(
            &format!("{}_s{tag}", self.name),
            self.n,
            self.data_room,
            socket,
        )?);
        self.pools.push((socket, p.clone()));
        Ok(p)
    }

    /// How many pools exist (one per socket used).
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether no pool was made yet.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

/// One ethdev port, configured with `nq` queue pairs and started.
pub struct DpdkPort {
    /// DPDK port id.
    pub id: u16,
    nq: u16,
    pool: std::sync::Arc<MbufPool>,
    flows: Vec<*mut sys::rte_flow>,
}

// SAFETY: the port id and flow handles are plain identifiers usable from any thread; queue
// access is split per worker by `queue()`.
unsafe impl Send for DpdkPort {}

impl DpdkPort {
    fn setup(id: u16, nq: u16, pool: std::sync::Arc<MbufPool>) -> Result<DpdkPort, String> {
        // SAFETY: id names an existing port; pool is a live mempool.
        let r = unsafe { sys::espada_port_setup(id, nq, pool.pool, 1024) };
        if r != 0 {
            return Err(format!(
                "port {id}: setup with {nq} queues failed: {}",
                strerror(-r)
            ));
        }
        Ok(DpdkPort {
            id,
            nq,
            pool,
            flows: Vec::new(),
        })
    }

    /// The port named `name` (a vdev such as `net_ring0`, `net_af_packet0`, or a PCI address).
    pub fn open(name: &str, nq: u16, pool: std::sync::Arc<MbufPool>) -> Result<DpdkPort, String> {
        let c = CString::new(name).map_err(|_| "port name contains NUL".to_string())?;
        let mut id = 0u16;
        // SAFETY: valid C string and out-pointer.
        let r = unsafe { sys::rte_eth_dev_get_port_by_name(c.as_ptr(), &mut id) };
        if r != 0 {
            return Err(format!(
                "no DPDK port named {name} (is its --vdev/--allow in the EAL arguments?)"
            ));
        }
        Self::setup(id, nq, pool)
    }

    /// Two ports joined back to back by rings, `nq` queues each: what one sends on queue i
    /// the other receives on queue i.
    pub fn ring_pair(
        name: &str,
        nq: u16,
        pool: std::sync::Arc<MbufPool>,
    ) -> Result<(DpdkPort, DpdkPort), String> {
        let c = CString::new(name).map_err(|_| "name contains NUL".to_string())?;
        let (mut a, mut b) = (0u16, 0u16);
        // SAFETY: valid C string and out-pointers; EAL initialised.
        let r = unsafe { sys::espada_ring_pair(c.as_ptr(), nq, 0, &mut a, &mut b) };
        if r != 0 {
            return Err(format!("ring pair {name}: {}", strerror(-r)));
        }
        Ok((Self::setup(a, nq, pool.clone())?, Self::setup(b, nq, pool)?))
    }

    /// Queue `q` for one worker.
    pub fn queue(&self, q: u16) -> DpdkQueue {
        let mut mac = [0u8; 6];
        // SAFETY: valid out-buffer of 6 bytes.
        unsafe { sys::espada_port_mac(self.id, mac.as_mut_ptr()) };
        DpdkQueue {
            port: self.id,
            q: q.min(self.nq.saturating_sub(1)),
            pool: self.pool.clone(),
            rx: [std::ptr::null_mut(); 64],
            tx: Vec::with_capacity(256),
            mac: MacAddr(mac),
            stats: PortStats::default(),
        }
    }

    /// Link speed in Mbit/s and whether it is up.
    pub fn link(&self) -> (u32, bool) {
        let (mut speed, mut up) = (0u32, 0i32);
        // SAFETY: valid out-pointers.
        unsafe { sys::espada_port_link(self.id, &mut speed, &mut up) };
        (speed, up != 0)
    }

    /// The PMD's counters: (rx packets, tx packets, rx bytes, tx bytes, rx missed, tx errors).
    pub fn pmd_stats(&self) -> [u64; 6] {
        let mut s = [0u64; 6];
        // SAFETY: valid out-buffer of 6 u64.
        unsafe { sys::espada_port_stats(self.id, s.as_mut_ptr()) };
        s
    }

    /// One rte_flow rule: UDP source port `sport`, destination `dport` → queue. The PMD's own
    /// words when it refuses (virtual devices do).
    pub fn steer_udp_source_port(
        &mut self,
        sport: u16,
        dport: u16,
        queue: u16,
    ) -> Result<(), String> {
        let mut msg = [0 as std::os::raw::c_char; 256];
        // SAFETY: msg is a writable buffer of the length passed.
        let f = unsafe {
            sys::espada_flow_udp_to_queue(self.id, sport, dport, queue, msg.as_mut_ptr(), msg.len())
        };
        if f.is_null() {
            // SAFETY: the shim NUL-terminates what it wrote.
            return Err(unsafe { CStr::from_ptr(msg.as_ptr()) }
                .to_string_lossy()
                .into_owned());
        }
        self.flows.push(f);
        Ok(())
    }
}

impl Drop for DpdkPort {
    fn drop(&mut self) {
        for f in self.flows.drain(..) {
            // SAFETY: f was created on this port and is destroyed once.
            unsafe { sys::espada_flow_destroy(self.id, f) };
        }
        // SAFETY: stopping a started port.
        unsafe { sys::rte_eth_dev_stop(self.id) };
    }
}

/// One queue pair of a DPDK port, owned by one worker.
pub struct DpdkQueue {
    port: u16,
    q: u16,
    pool: std::sync::Arc<MbufPool>,
    rx: [*mut sys::rte_mbuf; 64],
    tx: Vec<*mut sys::rte_mbuf>,
    mac: MacAddr,
    stats: PortStats,
}

// SAFETY: a queue is used by exactly one worker thread at a time (DPDK's rule for lockless
// queues); the mbuf pointers it holds are owned by it.
unsafe impl Send for DpdkQueue {}

/// Transmit retries before leftovers are dropped (and counted).
const TX_RETRIES: usize = 3;

impl PortQueue for DpdkQueue {
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize {
        let n = max.min(self.rx.len()) as u16;
        // SAFETY: rx has room for n mbuf pointers; the queue belongs to this worker.
        let got =
            unsafe { sys::espada_rx_burst(self.port, self.q, self.rx.as_mut_ptr(), n) } as usize;
        let mut delivered = 0;
        let _ = pool;
        for &m in &self.rx[..got] {
            let Some(m) = std::ptr::NonNull::new(m) else {
                continue;
            };
            // SAFETY: m is a valid mbuf the PMD just handed us; the buffer takes it over.
            match unsafe { from_mbuf(m) } {
                Some(b) => {
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += b.len() as u64;
                    out.push(b);
                    delivered += 1;
                }
                // Chained mbufs (jumbo frames on some PMDs) are not handled: freed, counted.
                None => self.stats.rx_dropped += 1,
            }
        }
        delivered
    }

    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize {
        self.tx.clear();
        for b in pkts.drain(..) {
            let len = b.len();
            // In place: the buffer is an mbuf (received, or made from the mempool).
            let b = match into_mbuf(b) {
                Ok(m) => {
                    self.stats.tx_bytes += len as u64;
                    self.tx.push(m.as_ptr());
                    continue;
                }
                Err(b) => b,
            };
            // A heap buffer: copied into an mbuf (counted; none on a DPDK-only worker).
            self.stats.tx_copied += 1;
            // SAFETY: the pool is live for the port's lifetime.
            let m = unsafe { sys::espada_mbuf_alloc(self.pool.pool) };
            if m.is_null() {
                self.stats.tx_dropped += 1;
                pool.put(b);
                continue;
            }
            // SAFETY: m is a fresh mbuf; append returns NULL if it lacks tailroom.
            let dst = unsafe { sys::espada_mbuf_append(m, len as u16) };
            if dst.is_null() || len > u16::MAX as usize {
                // SAFETY: freeing the mbuf allocated above.
                unsafe { sys::espada_mbuf_free(m) };
                self.stats.tx_dropped += 1;
                pool.put(b);
                continue;
            }
            // SAFETY: dst has len writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(b.data().as_ptr(), dst, len) };
            self.stats.tx_bytes += len as u64;
            self.tx.push(m);
            pool.put(b);
        }
        let mut sent = 0usize;
        for _ in 0..=TX_RETRIES {
            if sent == self.tx.len() {
                break;
            }
            // SAFETY: the slice holds mbufs owned by us; the PMD takes those it sends.
            sent += unsafe {
                sys::espada_tx_burst(
                    self.port,
                    self.q,
                    self.tx.as_mut_ptr().add(sent),
                    (self.tx.len() - sent) as u16,
                )
            } as usize;
        }
        for &m in &self.tx[sent..] {
            // SAFETY: leftovers were not taken by the PMD: ours to free.
            unsafe { sys::espada_mbuf_free(m) };
            self.stats.tx_dropped += 1;
        }
        self.stats.tx_packets += sent as u64;
        sent
    }

    fn mac(&self) -> MacAddr {
        self.mac
    }

    fn stats(&self) -> PortStats {
        self.stats
    }

    fn describe(&self) -> String {
        format!("dpdk:port{}/q{}", self.port, self.q)
    }

    fn mbuf_pool(&self) -> Option<std::sync::Arc<MbufPool>> {
        Some(self.pool.clone())
    }
}

/// `rte_mbuf` field offsets espada uses (first cache line; asserted in `dpdk-sys`'s shim).
mod mbuf_field {
    pub const BUF_ADDR: usize = 0;
    pub const DATA_OFF: usize = 16;
    pub const NB_SEGS: usize = 20;
    pub const PKT_LEN: usize = 36;
    pub const DATA_LEN: usize = 40;
    pub const BUF_LEN: usize = 54;
    pub const OL_FLAGS: usize = 24;
    /// `RTE_MBUF_F_RX_IP_CKSUM_MASK` and `_GOOD`, `RTE_MBUF_F_RX_L4_CKSUM_MASK` and `_GOOD`.
    pub const IP_CKSUM_MASK: u64 = (1 << 4) | (1 << 7);
    pub const IP_CKSUM_GOOD: u64 = 1 << 7;
    pub const L4_CKSUM_MASK: u64 = (1 << 3) | (1 << 8);
    pub const L4_CKSUM_GOOD: u64 = 1 << 8;
}

/// How a lent mbuf goes back: freed to its mempool (the buffer's context is the mbuf).
static MBUF: crate::pktbuf::LentOps = crate::pktbuf::LentOps {
    kind: crate::pktbuf::LentKind::Mbuf,
    give_back: free_mbuf,
};

/// # Safety
/// `m` is an mbuf the buffer owned; freed once.
unsafe fn free_mbuf(m: std::ptr::NonNull<()>, _base: std::ptr::NonNull<u8>) {
    // SAFETY (caller).
    unsafe { sys::espada_mbuf_free(m.as_ptr().cast()) }
}

/// Wraps a one-segment mbuf just received (no copy): the view is its data room. The fields
/// are read from its first cache line once here (and written back once by [`into_mbuf`]), so
/// the pipeline works on plain Rust with no call into DPDK per access. `None` (the mbuf freed
/// with the buffer) for a chained mbuf.
///
/// # Safety
/// `m` is a valid mbuf owned by the caller, which hands the ownership over.
pub unsafe fn from_mbuf(m: std::ptr::NonNull<sys::rte_mbuf>) -> Option<PktBuf> {
    use crate::pktbuf::{HW_IP_CSUM_GOOD, HW_L4_CSUM_GOOD};
    let p = m.as_ptr() as *const u8;
    // SAFETY (caller): m is valid; the offsets are those of DPDK's struct (asserted).
    let (buf_addr, data_off, nb_segs, data_len, buf_len, ol_flags) = unsafe {
        (
            std::ptr::read(p.add(mbuf_field::BUF_ADDR) as *const *mut u8),
            std::ptr::read(p.add(mbuf_field::DATA_OFF) as *const u16) as usize,
            std::ptr::read(p.add(mbuf_field::NB_SEGS) as *const u16),
            std::ptr::read(p.add(mbuf_field::DATA_LEN) as *const u16) as usize,
            std::ptr::read(p.add(mbuf_field::BUF_LEN) as *const u16) as usize,
            std::ptr::read(p.add(mbuf_field::OL_FLAGS) as *const u64),
        )
    };
    // Only GOOD counts: BAD, UNKNOWN and NONE all leave the check to software.
    let hw_csum = if ol_flags & mbuf_field::IP_CKSUM_MASK == mbuf_field::IP_CKSUM_GOOD {
        HW_IP_CSUM_GOOD
    } else {
        0
    } | if ol_flags & mbuf_field::L4_CKSUM_MASK == mbuf_field::L4_CKSUM_GOOD {
        HW_L4_CSUM_GOOD
    } else {
        0
    };
    let Some(base) = std::ptr::NonNull::new(buf_addr) else {
        // SAFETY (caller): ours to free.
        unsafe { sys::espada_mbuf_free(m.as_ptr()) };
        return None;
    };
    let head = data_off.min(buf_len);
    // SAFETY: the mbuf's data room is `buf_len` bytes from `buf_addr`, owned with the mbuf.
    let b = unsafe {
        PktBuf::lend(
            &MBUF,
            m.cast(),
            base,
            buf_len,
            head,
            data_len.min(buf_len - head),
            hw_csum,
        )
    };
    // Chained mbufs are not handled: the caller drops (and counts) them; dropping `b` frees
    // the whole chain.
    (nb_segs == 1).then_some(b)
}

/// The mbuf behind a buffer with its offsets written back, ready for `rte_eth_tx_burst` (no
/// copy); `Err(b)` for any other buffer, which the port must copy.
pub fn into_mbuf(b: PktBuf) -> Result<std::ptr::NonNull<sys::rte_mbuf>, PktBuf> {
    let Some(ctx) = b.lent_ctx(&MBUF) else {
        return Err(b);
    };
    let (_, head, len) = b.take_lent(&MBUF, ctx)?;
    let m: std::ptr::NonNull<sys::rte_mbuf> = ctx.cast();
    let p = m.as_ptr() as *mut u8;
    // SAFETY: m is the valid mbuf the buffer owned; head <= cap <= u16::MAX and len <= cap
    // (buf_len is a u16), so the casts are exact.
    unsafe {
        std::ptr::write(p.add(mbuf_field::DATA_OFF) as *mut u16, head as u16);
        std::ptr::write(p.add(mbuf_field::DATA_LEN) as *mut u16, len as u16);
        std::ptr::write(p.add(mbuf_field::PKT_LEN) as *mut u32, len as u32);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::main_lcore_args;

    #[test]
    fn the_main_lcore_stays_off_the_worker_cores() {
        assert_eq!(
            main_lcore_args(&[0, 1, 2, 3], &[2, 3]),
            ["--lcores", "0@(0,1)"]
        );
        // Every CPU runs a worker: the main lcore floats over all of them rather than
        // sitting on worker 0's.
        assert_eq!(main_lcore_args(&[0, 1], &[0, 1]), ["--lcores", "0@(0,1)"]);
        assert_eq!(main_lcore_args(&[0, 1, 2], &[1]), ["--lcores", "0@(0,2)"]);
    }
}
