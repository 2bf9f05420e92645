//! Giving memory back after a large control-plane change. A reload of 10 000 tunnels parses the
//! file, builds a second database beside the one in force and drops the old one: the C
//! allocator keeps those freed pages (in its arenas, fragmented) and the gateway's RSS stayed at
//! ~2.7 times its starting level after the first reload. `malloc_trim` hands the free pages
//! back to the kernel. Control thread only: it walks the heap (milliseconds).
#![allow(unsafe_code)]

/// Returns the allocator's free pages to the kernel; whether any were released.
pub fn give_back() -> bool {
    // SAFETY: malloc_trim only reads and releases the allocator's own free lists; 0 keeps no
    // padding at the top of the heap.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// The environment variable that turns [`huge_pages`] off (`ESPADA_HUGE_PAGES=0`).
pub const HUGE_PAGES_ENV: &str = "ESPADA_HUGE_PAGES";

/// What [`huge_pages`] decides for a process with these settings: the `GLIBC_TUNABLES` value
/// to run again with, or `None` to go on as it is (turned off, the tunable already set by the
/// operator, or transparent huge pages off in the kernel).
pub fn huge_pages_plan(
    thp: Option<&str>,
    tunables: Option<&str>,
    off: Option<&str>,
) -> Option<String> {
    if off.is_some_and(|v| v == "0" || v.eq_ignore_ascii_case("false")) {
        return None;
    }
    // "always [madvise] never": the bracketed word is the mode.
    let mode = thp?.split_whitespace().find(|w| w.starts_with('['))?;
    if mode == "[never]" {
        return None;
    }
    match tunables {
        Some(t) if t.contains("glibc.malloc.hugetlb") => None,
        Some(t) if !t.is_empty() => Some(format!("{t}:glibc.malloc.hugetlb=1")),
        _ => Some("glibc.malloc.hugetlb=1".into()),
    }
}

/// Runs the program again with the C allocator asking for transparent huge pages
/// (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, read by glibc only at start, hence the exec; same
/// PID, same arguments). With ten thousand tunnels every packet reads a policy slot, an SA and
/// a key schedule in a different 4 KiB page: TLB misses (page walks, nested ones in a VM)
/// were a large part of the per-packet cost, and 2 MiB pages cut them (measured with `espada
/// bench --sweep tunnels`; RSS +2 %). Returns only if nothing was done or the exec failed.
/// Off with `ESPADA_HUGE_PAGES=0`; an operator's own `glibc.malloc.hugetlb` is left as set.
pub fn huge_pages() {
    use std::os::unix::process::CommandExt;
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok();
    let Some(t) = huge_pages_plan(
        thp.as_deref(),
        std::env::var("GLIBC_TUNABLES").ok().as_deref(),
        std::env::var(HUGE_PAGES_ENV).ok().as_deref(),
    ) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    // Marked so a glibc that ignores the tunable cannot loop.
    let err = std::process::Command::new(exe)
        .arg0(argv0)
        .args(args)
        .env("GLIBC_TUNABLES", t)
        .env(HUGE_PAGES_ENV, "0")
        .exec();
    // Logging is not set up yet; going on without huge pages is what an error means here.
    let _ = err;
}

#[cfg(test)]
mod test {
    #[test]
    fn huge_pages_are_asked_for_only_where_they_can_be_and_are_not_refused() {
        use super::huge_pages_plan as plan;
        let m = Some("always [madvise] never");
        assert_eq!(
            plan(m, None, None).as_deref(),
            Some("glibc.malloc.hugetlb=1")
        );
        assert_eq!(
            plan(
                Some("[always] madvise never"),
                Some("glibc.malloc.arena_max=2"),
                None
            )
            .as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
        );
        assert_eq!(plan(Some("always madvise [never]"), None, None), None);
        assert_eq!(plan(None, None, None), None, "no THP in the kernel");
        assert_eq!(
            plan(m, Some("glibc.malloc.hugetlb=0"), None),
            None,
            "the operator's"
        );
        assert_eq!(plan(m, None, Some("0")), None);
        assert_eq!(plan(m, None, Some("false")), None);
        assert_eq!(
            plan(m, None, Some("1")).as_deref(),
            Some("glibc.malloc.hugetlb=1")
        );
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
