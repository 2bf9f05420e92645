//! SA lifetimes (RFC 4301 §4.4.2.1): soft limits raise an event so a control plane can rekey,
//! hard limits end the SA. Time is passed in (`now`, seconds on any monotonic clock), so tests
//! use a fake clock.

use crate::sa::SaCounters;

/// One set of limits; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Packets.
    pub packets: Option<u64>,
    /// Inner bytes.
    pub bytes: Option<u64>,
    /// Seconds since the SA was installed.
    pub seconds: Option<u64>,
}

impl Limits {
    fn reached(&self, c: &SaCounters, age: u64) -> bool {
        self.packets.is_some_and(|l| c.packets >= l)
            || self.bytes.is_some_and(|l| c.bytes >= l)
            || self.seconds.is_some_and(|l| age >= l)
    }

    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.packets.is_none() && self.bytes.is_none() && self.seconds.is_none()
    }
}

/// Soft and hard limits of an SA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetimes {
    /// Soft: raise an event (rekey now).
    pub soft: Limits,
    /// Hard: the SA ends.
    pub hard: Limits,
}

/// Where an SA stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Within limits.
    Live,
    /// A soft limit was reached.
    Soft,
    /// A hard limit was reached: the SA must not be used.
    Hard,
}

/// Tracks one SA's lifetime on the worker that owns it. Each transition is reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifetimeTracker {
    limits: Lifetimes,
    installed_at: u64,
    stage: Stage,
}

impl LifetimeTracker {
    /// Starts the clock at `now`.
    pub fn new(limits: Lifetimes, now: u64) -> Self {
        LifetimeTracker {
            limits,
            installed_at: now,
            stage: Stage::Live,
        }
    }

    /// When the clock started (the caller's clock, as given to [`LifetimeTracker::new`]).
    pub fn installed_at(&self) -> u64 {
        self.installed_at
    }

    /// New limits for an SA that stays (`espada sa update`, a reload): the clock and the
    /// stage reached so far are kept; the new limits apply from the next check.
    pub fn set_limits(&mut self, limits: Lifetimes) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> Lifetimes {
        self.limits
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Re-evaluates with the SA's counters; returns the new stage when it changed (at most once
    /// per stage), so the caller raises one event per transition.
    #[inline]
    pub fn update(&mut self, c: &SaCounters, now: u64) -> Option<Stage> {
        if self.stage == Stage::Hard {
            return None;
        }
        let age = now.saturating_sub(self.installed_at);
        let next = if self.limits.hard.reached(c, age) {
            Stage::Hard
        } else if self.limits.soft.reached(c, age) {
            Stage::Soft
        } else {
            Stage::Live
        };
        if next > self.stage {
            self.stage = next;
            Some(next)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn soft_then_hard_each_once() {
        let l = Lifetimes {
            soft: Limits {
                packets: Some(10),
                bytes: None,
                seconds: Some(100),
            },
            hard: Limits {
                packets: Some(20),
                bytes: Some(1_000_000),
                seconds: Some(200),
            },
        };
        let mut t = LifetimeTracker::new(l, 1000);
        let mut c = SaCounters::default();
        assert_eq!(t.update(&c, 1000), None);
        c.packets = 10;
        assert_eq!(t.update(&c, 1001), Some(Stage::Soft));
        assert_eq!(t.update(&c, 1002), None);
        c.packets = 20;
        assert_eq!(t.update(&c, 1003), Some(Stage::Hard));
        assert_eq!(t.update(&c, 1004), None);
        assert_eq!(t.stage(), Stage::Hard);
    }

    #[test]
    fn time_limits_with_a_fake_clock() {
        let l = Lifetimes {
            soft: Limits {
                seconds: Some(60),
                ..Default::default()
            },
            hard: Limits {
                seconds: Some(90),
                ..Default::default()
            },
        };
        let mut t = LifetimeTracker::new(l, 0);
        let c = SaCounters::default();
        assert_eq!(t.update(&c, 59), None);
        assert_eq!(t.update(&c, 60), Some(Stage::Soft));
        // jumping straight past hard reports hard
        let mut t2 = LifetimeTracker::new(l, 0);
        assert_eq!(t2.update(&c, 500), Some(Stage::Hard));
        assert!(Lifetimes::default().soft.is_unlimited());
    }

    #[test]
    fn bytes_limit() {
        let l = Lifetimes {
            soft: Limits::default(),
            hard: Limits {
                bytes: Some(1500),
                ..Default::default()
            },
        };
        let mut t = LifetimeTracker::new(l, 0);
        let c = SaCounters {
            packets: 1,
            bytes: 1500,
            ..Default::default()
        };
        assert_eq!(t.update(&c, 0), Some(Stage::Hard));
    }
}
