//! The last stage, both sides: each transmit list goes to its port in one burst. What the
//! port could not take (its ring full) is counted `tx_full`, and the port has already
//! returned those buffers to the pool.

use super::*;

impl Worker {
    /// Sends red's and black's transmit lists.
    #[inline(always)]
    pub(super) fn transmit(&mut self) {
        if !self.red_tx.is_empty() {
            let want = self.red_tx.len();
            let sent = self.red.tx_burst(&mut self.pool, &mut self.red_tx);
            self.stats.red_tx += sent as u64;
            for _ in sent..want {
                self.stats.drops.inc(DropReason::TxFull);
            }
        }
        if !self.black_tx.is_empty() {
            let want = self.black_tx.len();
            let sent = self.black.tx_burst(&mut self.pool, &mut self.black_tx);
            self.stats.black_tx += sent as u64;
            for _ in sent..want {
                self.stats.drops.inc(DropReason::TxFull);
            }
        }
    }
}
