//! A hint to the CPU that a cache line will be read soon: the one `unsafe` of this crate.
//!
//! A burst looks up 32 packets' policies and SAs; with ten thousand tunnels each lookup is a
//! cache (and TLB) miss, taken one after the other. Asking for every packet's line first and
//! reading them afterwards overlaps the misses, as VPP's and DPDK's burst loops do.

/// Asks for the cache line holding `*p` (no fault whatever the address: a prefetch of an
/// invalid address is dropped by the CPU).
#[inline(always)]
#[allow(unsafe_code)]
pub fn read<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 reads nothing architecturally and cannot fault; SSE is part of the
    // x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for `len` bytes from `p` (at most `max` bytes: a large key schedule is asked for
/// only in part), the first `l1` bytes into the first-level cache, the rest into the second.
#[inline(always)]
#[allow(unsafe_code)]
pub fn range(p: *const u8, len: usize, l1: usize, max: usize) {
    // Every line the bytes touch, from the line `p` is in (`p` need not start a line).
    let lead = (p as usize) & 63;
    let end = lead + len.min(max);
    let mut off = 0;
    while off < end {
        let q = p.wrapping_sub(lead).wrapping_add(off);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `read`: a prefetch reads nothing architecturally and cannot fault.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
            if off < l1 {
                _mm_prefetch::<_MM_HINT_T0>(q as *const i8);
            } else {
                _mm_prefetch::<_MM_HINT_T1>(q as *const i8);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (q, l1);
        off += 64;
    }
}
