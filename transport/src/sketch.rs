//! A count-min sketch of access frequencies with periodic halving (TinyLFU's aging), so a key's
//! frequency survives its eviction and old popularity fades: the caches' LFU policy counts every
//! access with it, and a dynamic table's admission counts the updates of keys it has not admitted.
//!
//! Blocked layout: a key's four counters lie in one 64-byte block (one in each 16-byte quarter), so
//! counting an access costs one cache miss, not four. The block and the positions within it come
//! from independent bits of one 64-bit mix of the key.

use crate::hash::splitmix64;

/// Estimated access counts of keys, in bounded memory.
#[derive(Clone, Debug)]
pub struct FrequencySketch {
    table: Vec<u8>,
    block_mask: usize,
    additions: u64,
    period: u64,
}

const BLOCK: usize = 64;
const DEPTH: usize = 4;
const QUARTER: usize = BLOCK / DEPTH;

impl FrequencySketch {
    /// A sketch sized for a cache of `capacity` lines: about 8 one-byte counters per line
    /// (a power of two of 64-byte blocks), halved every `period` additions.
    pub fn new(capacity: usize, period: u64) -> Self {
        let blocks = Self::bytes_for(capacity) / BLOCK;
        Self {
            table: vec![0; blocks * BLOCK],
            block_mask: blocks - 1,
            additions: 0,
            period: period.max(1),
        }
    }

    /// Bytes of the counters of a sketch sized for `capacity` lines.
    pub fn bytes_for(capacity: usize) -> usize {
        (capacity.max(64) * 8 / BLOCK).next_power_of_two() * BLOCK
    }

    fn cells(&self, key: u64) -> [usize; DEPTH] {
        let h = splitmix64(key);
        let base = ((h >> 16) as usize & self.block_mask) * BLOCK;
        // Four 4-bit offsets from the low 16 bits, one per quarter of the block.
        std::array::from_fn(|d| base + d * QUARTER + ((h >> (4 * d)) as usize & (QUARTER - 1)))
    }

    /// Asks the CPU to load `key`'s counters (one block), ahead of counting or estimating it.
    pub fn prefetch(&self, key: u64) {
        let at = self.cells(key)[0] & !(BLOCK - 1);
        crate::region::prefetch(&self.table[at..at + BLOCK]);
    }

    /// Counts one access to `key`; returns true when the sketch was just halved.
    pub fn increment(&mut self, key: u64) -> bool {
        self.count(key).0
    }

    /// Counts one access to `key`; returns whether the sketch was just halved and `key`'s
    /// estimate after the access (what [`FrequencySketch::estimate`] would say now).
    pub fn count(&mut self, key: u64) -> (bool, u8) {
        let cells = self.cells(key);
        let min = cells.iter().map(|&c| self.table[c]).min().unwrap_or(0);
        // Conservative update: only the minimal counters grow, so the new minimum is one more.
        for c in cells {
            if self.table[c] == min && min < u8::MAX {
                self.table[c] += 1;
            }
        }
        if self.tick() {
            return (true, self.estimate(key));
        }
        (false, min.saturating_add(1))
    }

    /// Counts one access that touches no counter (an access the caller counts elsewhere, such as
    /// a hit of a resident line), so that aging keeps its pace; returns true when the sketch was
    /// just halved.
    pub fn tick(&mut self) -> bool {
        self.additions += 1;
        if self.additions >= self.period {
            self.additions = 0;
            for v in &mut self.table {
                *v >>= 1;
            }
            return true;
        }
        false
    }

    /// Raises `key`'s counters to at least `count`, so that its estimate is at least `count`
    /// (a count kept elsewhere while the key was resident, handed back when it leaves).
    pub fn raise(&mut self, key: u64, count: u8) {
        for c in self.cells(key) {
            self.table[c] = self.table[c].max(count);
        }
    }

    /// The estimated count of `key` (never below the true count since the last halving).
    pub fn estimate(&self, key: u64) -> u8 {
        self.cells(key)
            .iter()
            .map(|&c| self.table[c])
            .min()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_never_undercount_and_halve_with_age() {
        let mut s = FrequencySketch::new(100, 1_000_000);
        for k in 0..500u64 {
            for _ in 0..(k % 7) {
                s.increment(k);
            }
        }
        for k in 0..500u64 {
            assert!(s.estimate(k) as u64 >= k % 7, "key {k}");
        }
        let mut small = FrequencySketch::new(100, 10);
        for _ in 0..9 {
            small.increment(1);
        }
        assert_eq!(small.estimate(1), 9);
        assert!(small.increment(1));
        assert_eq!(small.estimate(1), 5);
        // Counting says what estimating would.
        let mut s = FrequencySketch::new(1000, 1 << 30);
        for k in 0..3000u64 {
            let (_, after) = s.count(k % 97);
            assert_eq!(after, s.estimate(k % 97));
        }
    }

    #[test]
    fn ticks_age_without_counting_and_raising_sets_a_floor() {
        let mut s = FrequencySketch::new(100, 10);
        for _ in 0..5 {
            s.increment(1);
        }
        for _ in 0..4 {
            assert!(!s.tick());
        }
        assert_eq!(s.estimate(1), 5, "ticks touch no counter");
        assert!(s.tick(), "the tenth access halves");
        assert_eq!(s.estimate(1), 2);
        s.raise(1, 9);
        assert_eq!(s.estimate(1), 9);
        s.raise(1, 3);
        assert_eq!(s.estimate(1), 9, "raising never lowers");
    }

    #[test]
    fn a_keys_counters_share_one_block() {
        let s = FrequencySketch::new(10_000, 1 << 30);
        for key in 0..1000u64 {
            let cells = s.cells(key);
            let block = cells[0] / BLOCK;
            assert!(cells.iter().all(|&c| c / BLOCK == block));
            for (d, &c) in cells.iter().enumerate() {
                assert_eq!((c % BLOCK) / QUARTER, d, "counter {d} in its own quarter");
            }
        }
    }
}
