//! espada-dataplane: the packet path.
//!
//! * [`esp`]: ESP-in-UDP tunnel-mode encapsulation and decapsulation as pure functions over a
//!   packet buffer and an SA (no I/O, no allocation, no clock);
//! * [`drop`]: [`DropReason`], the single list every drop counter comes from;
//! * [`pktbuf`]: the [`PacketBuf`] trait (headroom/tailroom operations like DPDK's mbuf) and a
//!   heap-backed buffer allocated once at start-up.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod affinity;
pub mod drop;
pub mod esp;
pub mod gateway;
pub mod heap;
pub mod launch;
pub mod neighbor;
pub mod pktbuf;
pub mod pool;
pub mod port;
pub mod punt;
pub mod state;
pub mod worker;

pub use drop::{DropCounters, DropReason};
pub use pktbuf::{PacketBuf, PktBuf};
