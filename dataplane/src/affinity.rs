//! Thread placement beyond one core: `core_affinity` pins a thread to one CPU; an unpinned
//! worker (`espada run --no-pin`) must instead be free to run on every CPU, whatever mask the
//! thread that started it had (after `rte_eal_init` the main thread is bound to the EAL main
//! lcore's CPUs, and threads inherit that).
#![allow(unsafe_code)]

/// Lets the calling thread run on any of `cpus`.
pub fn run_on_any(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain bits; CPU_ZERO/CPU_SET write inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: c is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: 0 is the calling thread; the set is initialised above.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPUs the calling thread may run on.
pub fn current() -> Vec<usize> {
    // SAFETY: as above, read back.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: 0 is the calling thread; the set is ours to fill.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: c is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_can_be_spread_over_every_cpu_again() {
        let all = super::current();
        assert!(!all.is_empty());
        std::thread::spawn(move || {
            super::run_on_any(&all[..1]).unwrap();
            assert_eq!(super::current(), all[..1].to_vec(), "narrowed to one CPU");
            super::run_on_any(&all).unwrap();
            assert_eq!(super::current(), all, "free to run on all of them again");
        })
        .join()
        .unwrap();
    }
}
