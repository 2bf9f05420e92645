//! Ports: where frames come from and go to. Every backend offers the same per-queue burst
//! interface over buffers from the worker's [`PoolCache`]; one queue belongs to one worker.
//!
//! * [`memory`]: lock-free rings linking two in-process gateways (tests, demo, benchmarks), with
//!   NIC-like steering (RSS hash or per-SA UDP source-port rules; the traffic generator and
//!   checking sink that feed them in tests and benchmarks are in espada-harness);
//! * [`pcap`]: read frames from a capture, write frames to one, and [`pcap::Tap`] to record any
//!   queue's traffic for Wireshark;
//! * `dpdk` (feature `dpdk`): DPDK ethdev queues through the in-tree `dpdk-sys`;
//! * [`af_packet`]: Linux AF_PACKET with TPACKET_V3 RX ring, mapped TX ring, fanout and qdisc
//!   bypass (veth in namespaces, real NICs).

pub mod af_packet;
#[cfg(feature = "af-xdp")]
pub mod af_xdp;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod memory;
pub mod pcap;

use crate::pktbuf::PktBuf;
use crate::pool::PoolCache;
use espada_wire::ethernet::MacAddr;

/// Counters a port queue keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames the port could not take (ring full).
    pub tx_dropped: u64,
    /// Frames lost on receive (ring overflow, kernel drops) as far as the backend can tell.
    pub rx_dropped: u64,
    /// Frames the port had accepted but could never hand to the device (a transmit ring reset
    /// after the link stopped taking frames); counted here, never silently.
    pub tx_lost: u64,
    /// Frames refused because they exceed the device MTU (never queued).
    pub tx_oversize: u64,
    /// Times the transmit ring was found stuck and rebuilt.
    pub tx_resets: u64,
    /// Frames the port had to copy into buffers of its own to send them (zero on a worker
    /// whose buffers are the port's own).
    pub tx_copied: u64,
    /// Frames refused at receive because they are not for this gateway at layer 2 (a VLAN
    /// tag the kernel had stripped: espada runs on no VLAN).
    pub rx_filtered: u64,
    /// Frames received with a TCP/UDP checksum their sender left partial (checksum offload on
    /// a virtual link), completed before forwarding.
    pub rx_csum_completed: u64,
}

/// One RX/TX queue pair of a port, owned by one worker.
pub trait PortQueue: Send {
    /// Receives up to `max` frames into `out` (appending). Returns how many.
    fn rx_burst(&mut self, pool: &mut PoolCache, out: &mut Vec<PktBuf>, max: usize) -> usize;
    /// Sends every frame of `pkts` it can, draining the vector; frames it could not send go
    /// back to the pool. Returns how many were sent.
    fn tx_burst(&mut self, pool: &mut PoolCache, pkts: &mut Vec<PktBuf>) -> usize;
    /// The port's MAC address.
    fn mac(&self) -> MacAddr;
    /// Counters.
    fn stats(&self) -> PortStats;
    /// A short description for logs ("memory:black/q0", "af_packet:west-red").
    fn describe(&self) -> String;
    /// Called once when the worker stops (flush buffered records, merge histograms).
    fn finish(&mut self) {}
    /// The DPDK mempool this port receives into, if it is a DPDK port: the worker then makes
    /// its own packets from it too, so everything it sends goes out in place.
    #[cfg(feature = "dpdk")]
    fn mbuf_pool(&self) -> Option<std::sync::Arc<dpdk::MbufPool>> {
        None
    }
}
