//! The last stage, both sides: each transmit list goes to its port in one burst. What the
//! port could not take (its ring full) is counted `tx_full`, and the port has already
//! returned those buffers to the pool.

use super::*;

impl Worker {
    /// Sends red's and black's transmit lists.
    #[inline(always)]
    pub(super) fn transmit(&mut self) {
        let s = &mut self.stats;
        send(
            &mut *self.red,
            &mut self.pool,
            &mut self.red_tx,
            &mut s.red_tx,
            &mut s.drops,
        );
        self.transmit_black();
    }

    /// Sends black's transmit list now (a burst on a shared SA kept in wire order leaves
    /// before its lock is let go).
    #[inline(always)]
    pub(super) fn transmit_black(&mut self) {
        let s = &mut self.stats;
        send(
            &mut *self.black,
            &mut self.pool,
            &mut self.black_tx,
            &mut s.black_tx,
            &mut s.drops,
        );
    }
}

/// One transmit list to its port: what went counts in `sent`, the rest as `tx_full`.
#[inline(always)]
fn send(
    port: &mut dyn PortQueue,
    pool: &mut PoolCache,
    list: &mut Vec<PktBuf>,
    sent: &mut u64,
    drops: &mut crate::drop::DropCounters,
) {
    if list.is_empty() {
        return;
    }
    let want = list.len();
    let n = port.tx_burst(pool, list);
    *sent += n as u64;
    for _ in n..want {
        drops.inc(DropReason::TxFull);
    }
}
