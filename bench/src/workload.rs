//! Key streams for benchmarks, deterministic by seed.

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Keys drawn Zipf(s) over `rows` ranks, mapped to row ids by a random permutation so hot ids are
/// scattered over shards (rank 1 is the most popular).
pub struct ZipfKeys {
    zipf: Zipf<f64>,
    permutation: std::sync::Arc<Vec<u64>>,
    rng: SmallRng,
}

impl ZipfKeys {
    /// The rank-to-id permutation for `rows` ids, seeded: share it between streams that must agree
    /// on which ids are popular.
    pub fn permutation(rows: u64, seed: u64) -> std::sync::Arc<Vec<u64>> {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5045_524D);
        let mut permutation: Vec<u64> = (0..rows).collect();
        permutation.shuffle(&mut rng);
        std::sync::Arc::new(permutation)
    }

    /// A stream over a shared permutation, with its own draws.
    pub fn with_permutation(
        s: f64,
        permutation: std::sync::Arc<Vec<u64>>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let rows = permutation.len() as u64;
        let zipf = Zipf::new(rows, s).map_err(|e| anyhow::anyhow!("zipf({rows}, {s}): {e:?}"))?;
        Ok(Self {
            zipf,
            permutation,
            rng: SmallRng::seed_from_u64(seed),
        })
    }

    /// Fills `out` with keys (duplicates kept) and, when given, their ranks (0 = most popular).
    pub fn fill_ranked(&mut self, out: &mut [u64], mut ranks: Option<&mut [u64]>) {
        for (i, k) in out.iter_mut().enumerate() {
            let rank = self.zipf.sample(&mut self.rng) as usize - 1; // sample is 1..=rows
            *k = self.permutation[rank];
            if let Some(r) = ranks.as_deref_mut() {
                r[i] = rank as u64;
            }
        }
    }

    /// Fills `out` with keys (duplicates kept).
    pub fn fill(&mut self, out: &mut [u64]) {
        self.fill_ranked(out, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_keys_are_deterministic_by_seed_over_a_bijection() {
        let p = ZipfKeys::permutation(1000, 9);
        let mut sorted = p.to_vec();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..1000).collect::<Vec<u64>>(),
            "a permutation of the ids"
        );
        let (mut a, mut b) = (vec![0u64; 500], vec![0u64; 500]);
        ZipfKeys::with_permutation(1.05, ZipfKeys::permutation(1000, 3), 3)
            .unwrap()
            .fill(&mut a);
        ZipfKeys::with_permutation(1.05, ZipfKeys::permutation(1000, 3), 3)
            .unwrap()
            .fill(&mut b);
        assert_eq!(a, b);
        ZipfKeys::with_permutation(1.05, ZipfKeys::permutation(1000, 4), 4)
            .unwrap()
            .fill(&mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn zipf_rank_frequencies_follow_the_law() {
        // P(rank k) = k^-s / H(n, s): check the first ranks against the formula.
        let (n, s) = (10_000u64, 1.05);
        let h: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
        let mut g = ZipfKeys::with_permutation(s, ZipfKeys::permutation(n, 1), 1).unwrap();
        let draws = 400_000;
        let (mut keys, mut ranks) = (vec![0u64; draws], vec![0u64; draws]);
        g.fill_ranked(&mut keys, Some(&mut ranks));
        for k in [1u64, 2, 5, 10] {
            let observed = ranks.iter().filter(|&&r| r == k - 1).count() as f64 / draws as f64;
            let expected = (k as f64).powf(-s) / h;
            assert!(
                (observed - expected).abs() < 0.1 * expected + 0.001,
                "rank {k}: {observed} vs {expected}"
            );
        }
        assert!(keys
            .iter()
            .zip(&ranks)
            .all(|(&key, &rank)| g.permutation[rank as usize] == key));
    }
}
