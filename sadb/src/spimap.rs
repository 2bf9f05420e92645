//! A flat SPI table: the one lookup of the inbound fast path.
//!
//! The values sit in one dense vector; beside it an open-addressed index of `(spi, position)`
//! pairs, 8 bytes a slot, at most half full, probed linearly from a multiplicative (Fibonacci)
//! hash of the SPI. A lookup is one multiply, a shift and usually one 8-byte load before the
//! value itself: no SipHash, no control-byte groups, no tombstones. Inserts and removals are
//! control-path events (a snapshot rebuild, an SA's hard lifetime): a removal rebuilds the
//! index, which is a few dozen slots.

/// Knuth's multiplicative constant (2^32 / φ): consecutive SPIs land far apart.
const FIB: u32 = 0x9E37_79B9;
const MIN_SLOTS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    spi: u32,
    /// Position in the dense vectors plus one; 0 is an empty slot (so SPI 0 needs no marker).
    at: u32,
}

/// A map from SPI to `V`, read on every inbound packet.
#[derive(Debug, Clone)]
pub struct SpiMap<V> {
    spis: Vec<u32>,
    vals: Vec<V>,
    slots: Box<[Slot]>,
    shift: u32,
}

impl<V> Default for SpiMap<V> {
    fn default() -> Self {
        SpiMap {
            spis: Vec::new(),
            vals: Vec::new(),
            slots: vec![Slot::default(); MIN_SLOTS].into_boxed_slice(),
            shift: 32 - MIN_SLOTS.trailing_zeros(),
        }
    }
}

impl<V> SpiMap<V> {
    /// Entries.
    pub fn len(&self) -> usize {
        self.vals.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }

    #[inline(always)]
    fn home(&self, spi: u32) -> usize {
        (spi.wrapping_mul(FIB) >> self.shift) as usize
    }

    /// Where `spi`'s value sits in the dense vectors.
    #[inline(always)]
    fn position(&self, spi: u32) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(spi);
        // Terminates: the index is never more than half full.
        loop {
            let s = self.slots[i & mask];
            if s.at == 0 {
                return None;
            }
            if s.spi == spi {
                return Some(s.at as usize - 1);
            }
            i = (i & mask) + 1;
        }
    }

    /// Asks the CPU for `spi`'s slot (a burst asks for all its packets' first).
    #[inline(always)]
    pub fn prefetch(&self, spi: u32) {
        if let Some(s) = self
            .slots
            .get(self.home(spi) & (self.slots.len().wrapping_sub(1)))
        {
            crate::prefetch::read(s);
        }
    }

    /// Where `spi`'s value lives (reads the slot, not the value: for a prefetch).
    #[inline(always)]
    pub fn value_ptr(&self, spi: u32) -> Option<*const V> {
        self.position(spi)
            .map(|p| self.vals.as_ptr().wrapping_add(p))
    }

    /// `spi`'s value.
    #[inline]
    pub fn get(&self, spi: u32) -> Option<&V> {
        self.position(spi).map(|p| &self.vals[p])
    }

    /// `spi`'s value, to change.
    #[inline(always)]
    pub fn get_mut(&mut self, spi: u32) -> Option<&mut V> {
        self.position(spi).map(|p| &mut self.vals[p])
    }

    /// Whether `spi` has a value.
    #[inline]
    pub fn contains_key(&self, spi: u32) -> bool {
        self.position(spi).is_some()
    }

    /// Room for `additional` more values without moving them again (a rebuild that adds
    /// thousands), and a little more for the single adds after it.
    pub fn reserve(&mut self, additional: usize) {
        if self.vals.capacity() - self.vals.len() < additional {
            let more = additional + self.vals.len() / 16;
            self.vals.reserve_exact(more);
            self.spis.reserve_exact(more);
        }
    }

    /// Sets `spi`'s value; returns the one it replaced.
    pub fn insert(&mut self, spi: u32, v: V) -> Option<V> {
        if let Some(p) = self.position(spi) {
            return Some(std::mem::replace(&mut self.vals[p], v));
        }
        if self.vals.len() == self.vals.capacity() {
            // Grown by an eighth, not doubled: a value is about a kilobyte, and with tens of
            // thousands of SAs a doubling left up to half of the largest table empty.
            let more = (self.vals.len() / 8).max(16);
            self.vals.reserve_exact(more);
            self.spis.reserve_exact(more);
        }
        self.spis.push(spi);
        self.vals.push(v);
        if self.vals.len() * 2 > self.slots.len() {
            self.reindex();
        } else {
            self.place(spi, self.vals.len());
        }
        None
    }

    /// Takes `spi`'s value out: O(1) on average (a snapshot rebuild takes thousands out).
    pub fn remove(&mut self, spi: u32) -> Option<V> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(spi) & mask;
        loop {
            let s = self.slots[i];
            if s.at == 0 {
                return None;
            }
            if s.spi == spi {
                break;
            }
            i = (i + 1) & mask;
        }
        let p = self.slots[i].at as usize - 1;
        // Backward-shift deletion: the entries after the hole that may move into it do, so
        // every probe sequence stays unbroken without tombstones.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.at == 0 {
                break;
            }
            let home = self.home(s.spi) & mask;
            // `s` stays if its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = Slot::default();
        self.spis.swap_remove(p);
        let v = self.vals.swap_remove(p);
        // The last entry moved to position `p`: its slot says so now.
        if let Some(&moved) = self.spis.get(p) {
            let mut k = self.home(moved) & mask;
            while !(self.slots[k].at != 0 && self.slots[k].spi == moved) {
                k = (k + 1) & mask;
            }
            self.slots[k].at = u32::try_from(p + 1).expect("fewer than 2^32 SAs");
        }
        Some(v)
    }

    /// Every `(spi, value)`, values changeable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut V)> {
        self.spis.iter().copied().zip(self.vals.iter_mut())
    }

    /// The `(spi, value)` pairs from position `start` of the map's (arbitrary, stable between
    /// changes) order: a caller walking a large map a slice at a time.
    pub fn iter_mut_from(&mut self, start: usize) -> impl Iterator<Item = (u32, &mut V)> {
        let s = start.min(self.vals.len());
        self.spis[s..]
            .iter()
            .copied()
            .zip(self.vals[s..].iter_mut())
    }

    /// Every value.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.vals.iter()
    }

    fn place(&mut self, spi: u32, at: usize) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(spi) & mask;
        while self.slots[i].at != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = Slot {
            spi,
            at: u32::try_from(at).expect("fewer than 2^32 SAs"),
        };
    }

    /// Rebuilds the index at the size the entries need (at most half full).
    fn reindex(&mut self) {
        let n = (self.vals.len() * 2).next_power_of_two().max(MIN_SLOTS);
        self.slots = vec![Slot::default(); n].into_boxed_slice();
        self.shift = 32 - n.trailing_zeros();
        for p in 0..self.spis.len() {
            self.place(self.spis[p], p + 1);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn empty_finds_nothing_and_spi_zero_is_a_key() {
        let mut m: SpiMap<u8> = SpiMap::default();
        assert!(m.get(0).is_none() && m.get(7).is_none() && m.is_empty());
        assert_eq!(m.insert(0, 1), None);
        assert_eq!(m.get(0), Some(&1));
        assert_eq!(m.insert(0, 2), Some(1));
        assert_eq!(m.len(), 1);
        assert_eq!(m.remove(0), Some(2));
        assert!(m.get(0).is_none());
    }

    #[test]
    fn consecutive_spis_and_growth() {
        let mut m = SpiMap::default();
        for s in 0x1000u32..0x1400 {
            m.insert(s, s ^ 0xffff);
        }
        assert_eq!(m.len(), 0x400);
        assert!(m.slots.len() >= 2 * m.len());
        for s in 0x1000u32..0x1400 {
            assert_eq!(m.get(s), Some(&(s ^ 0xffff)));
        }
        assert!(m.get(0x1400).is_none() && m.get(0xfff).is_none());
    }

    #[test]
    fn thousands_of_removals_keep_every_other_key_found() {
        // Issue 26: a removal used to rebuild the whole index; a snapshot rebuild that takes
        // 30 000 SAs out one by one stalled a worker for seconds.
        let mut m = SpiMap::default();
        let mut model = HashMap::new();
        for s in 0..40_000u32 {
            let k = s.wrapping_mul(2_654_435_761) ^ 0x5a5a;
            m.insert(k, s);
            model.insert(k, s);
        }
        let keys: Vec<u32> = model.keys().copied().collect();
        for k in keys.iter().step_by(3) {
            assert_eq!(m.remove(*k), model.remove(k));
        }
        assert_eq!(m.len(), model.len());
        for k in &keys {
            assert_eq!(m.get(*k), model.get(k));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u16),
        Remove(u32),
        Get(u32),
        Bump(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        // A small key space, so operations meet the same keys often; plus the edges.
        let key = prop_oneof![
            0u32..48,
            // Keys whose homes collide (the top bits of SPI × FIB), and the edges.
            (0u32..16).prop_map(|k| k.wrapping_mul(0x61C8_8647)),
            Just(u32::MAX),
            Just(0x8000_0000)
        ];
        prop_oneof![
            (key.clone(), any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Remove),
            key.clone().prop_map(Op::Get),
            key.prop_map(Op::Bump),
        ]
    }

    proptest! {
        /// Any sequence of operations answers as a `HashMap` does.
        #[test]
        fn behaves_as_a_hash_map(ops in proptest::collection::vec(op(), 0..600)) {
            let mut m = SpiMap::default();
            let mut model = HashMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(m.remove(k), model.remove(&k)),
                    Op::Get(k) => prop_assert_eq!(m.get(k), model.get(&k)),
                    Op::Bump(k) => {
                        if let (Some(a), Some(b)) = (m.get_mut(k), model.get_mut(&k)) {
                            *a = a.wrapping_add(1);
                            *b = b.wrapping_add(1);
                        } else {
                            prop_assert_eq!(m.contains_key(k), model.contains_key(&k));
                        }
                    }
                }
                prop_assert_eq!(m.len(), model.len());
            }
            let mut all: Vec<(u32, u16)> = m.iter_mut().map(|(k, v)| (k, *v)).collect();
            all.sort_unstable();
            let mut want: Vec<(u32, u16)> = model.into_iter().collect();
            want.sort_unstable();
            prop_assert_eq!(all, want);
        }
    }
}
