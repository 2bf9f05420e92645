//! espada-harness: what measures and tests the dataplane, kept out of what a gateway runs.
//!
//! * [`pair`]: the in-process west/east pair (two gateways joined by memory ports, sunset's
//!   generator on west's red side, sunrise's checking sink on east's), the demo's and the
//!   benchmarks' lab, and the worker tests' fixture;
//! * [`solo`]: the one-core replay harness (one direction on one pinned core, the shape DPDK
//!   ipsec-secgw's single lcore measures);
//! * [`traffic`]: the red-side traffic generator and checking sink (the lab's TRex).
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod pair;
pub mod solo;
pub mod traffic;
