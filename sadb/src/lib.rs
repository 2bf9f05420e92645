//! espada-sadb: the security associations the dataplane works with.
//!
//! * [`ReplayWindow`]: RFC 6479 bucketed anti-replay window with RFC 4303 Appendix A ESN
//!   inference;
//! * [`OutboundSa`] / [`InboundSa`]: the runtime state one worker core owns (sequence counter or
//!   replay window, key schedule, counters, prebuilt outer-header template). Nothing in them is
//!   shared between threads, so nothing is locked or atomic.
#![deny(unsafe_code)] // one exception: `prefetch::read`
#![deny(missing_docs)]

pub mod db;
pub mod lifetime;
pub mod prefetch;
pub mod replay;
pub mod sa;
pub mod selector;
pub mod seqguard;
pub mod spimap;

pub use replay::{ReplayError, ReplayWindow};
pub use sa::{
    DfMode, InboundSa, OutboundSa, SaCounters, SeqReservation, TunnelEndpoints, WindowCell,
};
pub use seqguard::SeqGuard;
