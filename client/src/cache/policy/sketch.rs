//! A count-min sketch of access frequencies with periodic halving (TinyLFU's aging), so a key's
//! frequency survives its eviction and old popularity fades.

/// Estimated access counts of keys, in bounded memory.
#[derive(Debug)]
pub struct FrequencySketch {
    table: Vec<u8>,
    mask: usize,
    additions: u64,
    period: u64,
}

const DEPTH: usize = 4;
const SEEDS: [u64; DEPTH] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0x27D4_EB2F_1656_67C5,
];

fn mix(key: u64, seed: u64) -> u64 {
    let mut z = key ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FrequencySketch {
    /// A sketch sized for a cache of `capacity` lines: `4 x width` one-byte counters, with width
    /// the power of two at or above 8 x capacity, halved every `period` additions.
    pub fn new(capacity: usize, period: u64) -> Self {
        let width = (capacity.max(64) * 8).next_power_of_two();
        Self {
            table: vec![0; width * DEPTH],
            mask: width - 1,
            additions: 0,
            period: period.max(1),
        }
    }

    fn cells(&self, key: u64) -> [usize; DEPTH] {
        let width = self.mask + 1;
        std::array::from_fn(|d| d * width + (mix(key, SEEDS[d]) as usize & self.mask))
    }

    /// Counts one access to `key`; returns true when the sketch was just halved.
    pub fn increment(&mut self, key: u64) -> bool {
        let cells = self.cells(key);
        let min = cells.iter().map(|&c| self.table[c]).min().unwrap_or(0);
        // Conservative update: only the minimal counters grow.
        for c in cells {
            if self.table[c] == min && min < u8::MAX {
                self.table[c] += 1;
            }
        }
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
    }
}
