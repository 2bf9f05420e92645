//! Durable sequence-number reservations: a static-key gateway must never send two packets with
//! the same (key, sequence number), because the AES-GCM nonce is salt ‖ IV and the IV is the
//! sequence number (RFC 4106 §3, §8.1: "the same nonce ... MUST NOT be used twice with the same
//! key"). Sequence numbers live in memory, so a restart would start again at 1.
//!
//! A [`SeqGuard`] is the contract between the worker that sends on an SA and the gateway's
//! persister: the worker may use numbers up to [`SeqGuard::limit`], which the persister only
//! raises *after* it has written the new limit to stable storage; the worker publishes the last
//! number it used, so the persister can reserve the next block ahead of it. After a crash the
//! gateway resumes above the last *written* limit: it skips numbers, it never repeats one.
//! No I/O here: the persister lives with the gateway.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sequence-number reservation state of one outbound SA, shared by its sender(s) and the
/// persister.
#[derive(Debug)]
pub struct SeqGuard {
    /// SPI (for the state file and reports).
    pub spi: u32,
    used: AtomicU64,
    limit: AtomicU64,
}

impl SeqGuard {
    /// A guard whose sender resumes after `resume_after` (the last durable limit of a previous
    /// run, or 0), with nothing reserved yet: the persister must [`grant`](SeqGuard::grant)
    /// before the first packet can go.
    pub fn new(spi: u32, resume_after: u64) -> SeqGuard {
        SeqGuard {
            spi,
            used: AtomicU64::new(resume_after),
            limit: AtomicU64::new(resume_after),
        }
    }

    /// Highest number the sender may use (durably reserved).
    #[inline]
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Last number a sender used (or the resume point).
    #[inline]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// A sender reports that it has used every number up to `last`.
    #[inline]
    pub fn note_used(&self, last: u64) {
        self.used.fetch_max(last, Ordering::Relaxed);
    }

    /// The persister raises the limit to `limit`; call only after `limit` is durable.
    pub fn grant(&self, limit: u64) {
        self.limit.fetch_max(limit, Ordering::Release);
    }

    /// The limit the persister should write next, if the sender is within `block / 2` of the
    /// current one: `used + block`, capped at `max`.
    pub fn wants(&self, block: u64, max: u64) -> Option<u64> {
        let (used, limit) = (self.used(), self.limit());
        if limit >= max || limit.saturating_sub(used) >= block / 2 {
            return None;
        }
        Some(used.saturating_add(block).min(max))
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn wants_more_only_near_the_limit() {
        let g = SeqGuard::new(0x1001, 500);
        assert_eq!(g.used(), 500);
        assert_eq!(g.limit(), 500);
        assert_eq!(g.wants(1000, u32::MAX as u64), Some(1500));
        g.grant(1500);
        assert_eq!(g.wants(1000, u32::MAX as u64), None);
        g.note_used(1100);
        assert_eq!(g.wants(1000, u32::MAX as u64), Some(2100));
        g.note_used(900); // never goes back
        assert_eq!(g.used(), 1100);
        g.grant(1200); // never goes back either
        assert_eq!(g.limit(), 1500);
        assert_eq!(g.wants(1000, 1600), Some(1600));
        g.grant(1600);
        assert_eq!(g.wants(1000, 1600), None, "nothing beyond the space");
    }
}
