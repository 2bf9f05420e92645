//! Giving memory back after a large control-plane change. A reload of 10 000 tunnels parses the
//! file, builds a second database beside the one in force and drops the old one: the C
//! allocator keeps those freed pages (in its arenas, fragmented) and the gateway's RSS stayed at
//! ~2.7 times its starting level after the first reload. `malloc_trim` hands the free pages
//! back to the kernel. Control thread only: it walks the heap (milliseconds).
//!
//! And placing the tables a worker reads per packet on huge pages: [`HugeAlloc`].
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Returns the allocator's free pages to the kernel; whether any were released.
pub fn give_back() -> bool {
    // SAFETY: malloc_trim only reads and releases the allocator's own free lists; 0 keeps no
    // padding at the top of the heap.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// The size of a transparent huge page on x86_64 and aarch64 (4 KiB base pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// A global allocator that puts every allocation of [`HUGE_PAGE`] bytes or more on its own
/// 2 MiB-aligned mapping marked `MADV_HUGEPAGE`; everything smaller goes to the C allocator.
///
/// The allocations this catches are few and long-lived: a core's SA tables (its outbound
/// `Vec` and inbound SPI map hold every SA's state and key schedule inline), the SPD's hash
/// tables, packet pools. With ten thousand tunnels and traffic spread over them, every packet
/// reads SA state and keys in a different 4 KiB page: ~22 MB per core is ~5 600 pages, more
/// than the second-level TLB holds, and in a virtual machine each miss walks two page tables.
/// On 2 MiB pages the same tables take a dozen TLB entries. Where THP is off
/// (`/sys/kernel/mm/transparent_hugepage/enabled` = never) the advice is ignored and the
/// mapping is ordinary anonymous memory, returned to the kernel on free (no fragmentation of
/// the C heap by large tables, either).
pub struct HugeAlloc;

fn huge_layout(l: &Layout) -> bool {
    l.size() >= HUGE_PAGE && l.align() <= HUGE_PAGE
}

fn mapped_len(size: usize) -> usize {
    size.div_ceil(HUGE_PAGE) * HUGE_PAGE
}

/// A fresh, zeroed, 2 MiB-aligned anonymous mapping of `size` bytes rounded up to huge pages,
/// advised `MADV_HUGEPAGE`; null if the kernel refuses.
unsafe fn map_huge(size: usize) -> *mut u8 {
    let len = mapped_len(size);
    let Some(span) = len.checked_add(HUGE_PAGE) else {
        return std::ptr::null_mut();
    };
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if m == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let start = m as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (aligned - start, span - len - (aligned - start));
    // SAFETY: the head and the tail are parts of the mapping just made that nothing uses;
    // madvise only advises on the aligned part, which is ours.
    unsafe {
        if head > 0 {
            libc::munmap(m, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    aligned as *mut u8
}

// SAFETY: large blocks are whole mappings of their own, found again by their layout's size
// (the same rounding on free as on allocation); everything else is the system allocator's.
unsafe impl GlobalAlloc for HugeAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if huge_layout(&l) {
            // SAFETY: see map_huge.
            unsafe { map_huge(l.size()) }
        } else {
            // SAFETY: forwarded as given.
            unsafe { System.alloc(l) }
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if huge_layout(&l) {
            // SAFETY: a fresh anonymous mapping is zeroed by the kernel.
            unsafe { map_huge(l.size()) }
        } else {
            // SAFETY: forwarded as given.
            unsafe { System.alloc_zeroed(l) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if huge_layout(&l) {
            // SAFETY: `p` is the start of a mapping of `mapped_len(l.size())` bytes (alloc).
            unsafe {
                libc::munmap(p as *mut libc::c_void, mapped_len(l.size()));
            }
        } else {
            // SAFETY: forwarded as given.
            unsafe { System.dealloc(p, l) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (all branches): the caller's contract, forwarded; a move between kinds copies
        // the smaller of the two sizes into a fresh block of the new kind.
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, l.align());
            match (huge_layout(&l), huge_layout(&new)) {
                (false, false) => System.realloc(p, l, new_size),
                (true, true) if mapped_len(l.size()) == mapped_len(new_size) => p,
                _ => {
                    let q = self.alloc(new);
                    if !q.is_null() {
                        std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                        self.dealloc(p, l);
                    }
                    q
                }
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn large_blocks_are_aligned_mappings_and_survive_every_move() {
        let a = HugeAlloc;
        // SAFETY: layouts of non-zero size; every block is freed with the layout it has.
        unsafe {
            let small = Layout::from_size_align(1000, 8).unwrap();
            let big = Layout::from_size_align(3 * HUGE_PAGE + 5, 64).unwrap();
            let p = a.alloc(small);
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            // small → big: a mapping of its own, 2 MiB-aligned, the bytes carried over.
            let q = a.realloc(p, small, big.size());
            assert_eq!(q as usize % HUGE_PAGE, 0);
            assert!((0..1000).all(|i| *q.add(i) == i as u8));
            *q.add(big.size() - 1) = 7;
            // big → big in the same huge pages: in place.
            let r = a.realloc(q, big, big.size() + 100);
            assert_eq!(r, q);
            let big2 = Layout::from_size_align(big.size() + 100, 64).unwrap();
            // big → bigger: moved, still aligned, the bytes carried over.
            let s = a.realloc(r, big2, 5 * HUGE_PAGE);
            assert_eq!(s as usize % HUGE_PAGE, 0);
            assert_eq!(*s.add(big.size() - 1), 7);
            assert!((0..1000).all(|i| *s.add(i) == i as u8));
            let big3 = Layout::from_size_align(5 * HUGE_PAGE, 64).unwrap();
            // big → small: back to the C heap.
            let t = a.realloc(s, big3, 500);
            assert!((0..500).all(|i| *t.add(i) == i as u8));
            a.dealloc(t, Layout::from_size_align(500, 64).unwrap());
            // zeroed: a fresh mapping.
            let z = a.alloc_zeroed(big);
            assert!((0..big.size()).step_by(4093).all(|i| *z.add(i) == 0));
            a.dealloc(z, big);
        }
    }

    #[test]
    fn freed_memory_goes_back_to_the_kernel() {
        fn rss_kb() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap()
        }
        // Many small allocations (as a parsed configuration is), freed in an order that
        // leaves the top of the heap in use, so the allocator keeps the pages on its own.
        let mut v: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 400]).collect();
        let keep: Vec<Vec<u8>> = v.iter().step_by(1000).cloned().collect();
        let before = rss_kb();
        v.clear();
        v.shrink_to_fit();
        let _last = vec![1u8; 400]; // in use at the top
        super::give_back();
        let after = rss_kb();
        assert!(
            after + 40_000 < before,
            "RSS {before} kB -> {after} kB after freeing ~80 MB"
        );
        drop(keep);
    }
}
