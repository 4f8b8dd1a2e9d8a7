//! Key streams for benchmarks, deterministic by seed.

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Keys drawn Zipf(s) over `rows` ranks, mapped to row ids by a random permutation so hot ids are
/// scattered over shards (rank 1 is the most popular).
pub struct ZipfKeys {
    zipf: Zipf<f64>,
    permutation: Vec<u64>,
    rng: SmallRng,
}

impl ZipfKeys {
    /// A stream over `rows` ids with exponent `s`, seeded.
    pub fn new(rows: u64, s: f64, seed: u64) -> anyhow::Result<Self> {
        let zipf = Zipf::new(rows, s).map_err(|e| anyhow::anyhow!("zipf({rows}, {s}): {e:?}"))?;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut permutation: Vec<u64> = (0..rows).collect();
        permutation.shuffle(&mut rng);
        Ok(Self {
            zipf,
            permutation,
            rng,
        })
    }

    /// Fills `out` with keys (duplicates kept).
    pub fn fill(&mut self, out: &mut [u64]) {
        for k in out {
            let rank = self.zipf.sample(&mut self.rng) as usize; // 1..=rows
            *k = self.permutation[rank - 1];
        }
    }
}

/// Keys uniform over `rows`, seeded.
pub struct UniformKeys {
    rows: u64,
    rng: SmallRng,
}

impl UniformKeys {
    /// A stream over `rows` ids.
    pub fn new(rows: u64, seed: u64) -> Self {
        Self {
            rows,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Fills `out` with keys.
    pub fn fill(&mut self, out: &mut [u64]) {
        for k in out {
            *k = self.rng.gen_range(0..self.rows);
        }
    }
}

/// Sorts and de-duplicates `keys` in place; returns the number of unique keys.
pub fn dedup(keys: &mut Vec<u64>) -> usize {
    keys.sort_unstable();
    keys.dedup();
    keys.len()
}
