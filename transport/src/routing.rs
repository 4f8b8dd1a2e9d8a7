//! Where a row lives (DESIGN section 3, "Placement"): row `r` of a table of `B` placement buckets
//! is in bucket `r % B`; bucket `b` of a cluster of `S` shards is on shard `b % S` (the bucket
//! map); on its shard, row `r` is at local index `(r / B) * n + b / S`, where `n` is the number of
//! buckets the shard owns. Rows are dense on every shard (no holes), hot ids (small `r`) spread
//! over every shard, and when `S` divides `B` the layout is `r % S` at `r / S`.
//!
//! A dynamic table's keys are any u64 (raw feature ids, most of them unknown in advance), so its
//! bucket is the key's hash instead: bucket `((splitmix64(k) mod 2^32) * B) >> 32` (the low half
//! of the hash, independent of the high bits that pick a key's bucket of digests inside its
//! shard's region, `keyed.rs`), owned by shard `b % S` as above. Such a shard holds no row at a
//! computed index; it finds keys through its region's buckets, of which each placement bucket
//! owns the same number on any shard (so a placement bucket moves with its region buckets
//! whole), and its capacity is its placement buckets' region slots.
//!
//! The bucket is the unit of resharding: a table's `B` never changes, so a checkpoint of `S`
//! shards is moved onto `S'` bucket by bucket (`hetkv checkpoint reshard`).
//!
//! This is the one home of that rule: the client's cluster and cache, the store's tables, its
//! checkpoints and the region descriptors that one-sided readers use all ask a [`Routing`].

/// The placement of one table's rows over the shards of one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Routing {
    shards: u32,
    buckets: u32,
    /// A fixed table with `buckets % shards == 0`: the shard of row `r` is `r % shards` (one
    /// division).
    aligned: bool,
    /// A dynamic table's: buckets by the key's hash.
    hashed: bool,
}

impl Routing {
    /// Rows of a table of `buckets` placement buckets over `shards` shards (each at least one).
    pub fn new(shards: u32, buckets: u32) -> Self {
        let (shards, buckets) = (shards.max(1), buckets.max(1));
        Self {
            shards,
            buckets,
            aligned: buckets % shards == 0,
            hashed: false,
        }
    }

    /// A dynamic table's keys over `shards` shards, in `buckets` buckets by their hash.
    pub fn hashed(shards: u32, buckets: u32) -> Self {
        Self {
            aligned: false,
            hashed: true,
            ..Self::new(shards, buckets)
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Number of placement buckets.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The placement bucket of `key`.
    pub fn bucket_of(&self, key: u64) -> u32 {
        if self.hashed {
            let low = crate::hash::splitmix64(key) & u64::from(u32::MAX);
            ((low * u64::from(self.buckets)) >> 32) as u32
        } else {
            (key % u64::from(self.buckets)) as u32
        }
    }

    /// The shard that owns bucket `bucket` (the bucket map).
    pub fn shard_of_bucket(&self, bucket: u32) -> u32 {
        bucket % self.shards
    }

    /// The buckets shard `shard` owns.
    pub fn buckets_on(&self, shard: u32) -> u32 {
        if shard >= self.buckets {
            0
        } else {
            (self.buckets - shard).div_ceil(self.shards)
        }
    }

    /// The shard holding row `key`.
    #[inline]
    pub fn shard_of(&self, key: u64) -> usize {
        if self.aligned {
            (key % u64::from(self.shards)) as usize
        } else {
            self.shard_of_bucket(self.bucket_of(key)) as usize
        }
    }

    /// The index of row `key` within its shard (a fixed table's: a dynamic table's shard finds
    /// keys through its region's buckets).
    pub fn local_index(&self, key: u64) -> u64 {
        debug_assert!(
            !self.hashed,
            "a dynamic table's rows have no computed index"
        );
        if self.aligned {
            return key / u64::from(self.shards);
        }
        let b = self.bucket_of(key);
        let round = key / u64::from(self.buckets);
        let shard = self.shard_of_bucket(b);
        round * u64::from(self.buckets_on(shard)) + u64::from(b / self.shards)
    }

    /// The row at local index `local` of shard `shard` (which must own a bucket; a fixed
    /// table's).
    pub fn global_key(&self, shard: u32, local: u64) -> u64 {
        debug_assert!(
            !self.hashed,
            "a dynamic table's rows have no computed index"
        );
        let per_round = u64::from(self.buckets_on(shard).max(1));
        let (round, rank) = (local / per_round, local % per_round);
        round * u64::from(self.buckets) + rank * u64::from(self.shards) + u64::from(shard)
    }

    /// The index of `key`'s placement bucket among those its shard owns (bucket `b` is the
    /// `b / S`-th of shard `b % S`).
    pub fn local_bucket(&self, key: u64) -> u32 {
        self.bucket_of(key) / self.shards
    }

    /// A dynamic table of capacity `rows`: the region buckets (of
    /// [`BUCKET_SLOTS`](crate::keyed::BUCKET_SLOTS) slots) each placement bucket owns, the same on
    /// every shard, so that a placement bucket moves between shards with its region buckets
    /// whole: `ceil(rows / (B * 32))`, at least 1.
    pub fn region_buckets_per_bucket(&self, rows: u64) -> u64 {
        let per = u64::from(self.buckets) * crate::keyed::BUCKET_SLOTS as u64;
        rows.div_ceil(per).max(1)
    }

    /// How many rows of a table of `rows` rows shard `shard` holds: for a dynamic table, at most
    /// (its placement buckets times [`Routing::region_buckets_per_bucket`] region buckets of 32
    /// slots: `rows` rounded up to whole region buckets for every placement bucket).
    pub fn local_rows(&self, rows: u64, shard: u32) -> u64 {
        if self.hashed {
            let slots = crate::keyed::BUCKET_SLOTS as u64;
            return u64::from(self.buckets_on(shard))
                .saturating_mul(self.region_buckets_per_bucket(rows))
                .saturating_mul(slots);
        }
        let full_rounds = rows / u64::from(self.buckets);
        // The last, partial round holds buckets `[0, rest)`.
        let rest = (rows % u64::from(self.buckets)) as u32;
        let in_rest = if shard < rest {
            (rest - shard).div_ceil(self.shards)
        } else {
            0
        };
        full_rounds * u64::from(self.buckets_on(shard)) + u64::from(in_rest)
    }

    /// The local index of `key` on shard `shard` of a shard holding `local_rows` rows, or `None`
    /// when the key lives on another shard or past the table's end (or the table is dynamic).
    pub fn local_on(&self, key: u64, shard: u32, local_rows: u64) -> Option<u64> {
        if self.hashed || self.shard_of(key) != shard as usize {
            return None;
        }
        let local = self.local_index(key);
        (local < local_rows).then_some(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_partition_over_shards_and_map_back() {
        for buckets in [1u32, 2, 3, 4, 5, 7, 8, 12, 64] {
            for shards in 1..7u32 {
                let r = Routing::new(shards, buckets);
                for rows in [0u64, 1, 7, 100, 131] {
                    let total: u64 = (0..shards).map(|s| r.local_rows(rows, s)).sum();
                    assert_eq!(
                        total, rows,
                        "{shards} shards, {buckets} buckets, {rows} rows"
                    );
                    let mut seen: Vec<Vec<bool>> = (0..shards)
                        .map(|s| vec![false; r.local_rows(rows, s) as usize])
                        .collect();
                    for key in 0..rows {
                        let (s, l) = (r.shard_of(key) as u32, r.local_index(key));
                        assert_eq!(s, r.shard_of_bucket(r.bucket_of(key)));
                        assert!(l < r.local_rows(rows, s), "key {key} {shards}x{buckets}");
                        assert!(!std::mem::replace(&mut seen[s as usize][l as usize], true));
                        assert_eq!(r.global_key(s, l), key);
                        assert_eq!(r.local_on(key, s, r.local_rows(rows, s)), Some(l));
                        if shards > 1 {
                            assert_eq!(r.local_on(key, (s + 1) % shards, u64::MAX), None);
                        }
                    }
                    // Dense: every local index of every shard holds a row.
                    assert!(seen.iter().flatten().all(|&x| x));
                }
            }
        }
        assert_eq!(Routing::new(0, 0), Routing::new(1, 1));
    }

    #[test]
    fn aligned_bucket_counts_keep_the_modulo_layout() {
        for shards in [1u32, 2, 4, 8] {
            let r = Routing::new(shards, 4096);
            for key in (0..100_000u64).step_by(37) {
                assert_eq!(r.shard_of(key), (key % u64::from(shards)) as usize);
                assert_eq!(r.local_index(key), key / u64::from(shards));
            }
        }
    }

    #[test]
    fn hashed_keys_spread_over_buckets_and_shards_and_capacity_is_shared() {
        let r = Routing::hashed(3, 4096);
        let mut per_shard = [0u64; 3];
        let mut per_bucket = vec![0u32; 4096];
        // Raw ids as CTR logs carry them: 0, u64::MAX, and hashed ids of every magnitude.
        for i in 0..400_000u64 {
            let key = crate::hash::splitmix64(i ^ 0xfeed) | (i & 1) << 63;
            per_shard[r.shard_of(key)] += 1;
            per_bucket[r.bucket_of(key) as usize] += 1;
        }
        for key in [0, 1, u64::MAX, 1 << 63] {
            assert!(r.bucket_of(key) < 4096 && r.shard_of(key) < 3);
        }
        for n in per_shard {
            assert!((130_000..137_000).contains(&n), "{per_shard:?}");
        }
        assert!(per_bucket.iter().all(|&n| (50..150).contains(&n)));
        // Sequential ids (a consecutive vocabulary) are spread too, not striped.
        let seq: Vec<usize> = (0..9u64).map(|k| r.shard_of(k)).collect();
        assert_ne!(seq, (0..9).map(|k| k % 3).collect::<Vec<_>>());
        // A capacity of 1,000,000 over 4,096 placement buckets: 8 region buckets (256 slots)
        // each, whatever the shard count, so a bucket moves between shards with its slots.
        assert_eq!(r.region_buckets_per_bucket(1_000_000), 8);
        assert_eq!(r.region_buckets_per_bucket(1), 1);
        assert_eq!(r.region_buckets_per_bucket(4096 * 32), 1);
        assert_eq!(r.region_buckets_per_bucket(4096 * 32 + 1), 2);
        let caps: Vec<u64> = (0..3).map(|s| r.local_rows(1_000_000, s)).collect();
        assert_eq!(caps, [1366 * 256, 1365 * 256, 1365 * 256]);
        assert_eq!(caps.iter().sum::<u64>(), 4096 * 256);
        let one = Routing::hashed(1, 4096).local_rows(1_000_000, 0);
        assert_eq!(
            one,
            caps.iter().sum::<u64>(),
            "the same capacity on any shard count"
        );
        for key in [0, 7, u64::MAX] {
            assert_eq!(r.local_bucket(key), r.bucket_of(key) / 3);
        }
        assert_eq!(r.local_on(5, r.shard_of(5) as u32, u64::MAX), None);
    }

    #[test]
    fn unaligned_bucket_counts_balance_the_shards() {
        let r = Routing::new(3, 4096);
        let rows = 1_000_000;
        let held: Vec<u64> = (0..3).map(|s| r.local_rows(rows, s)).collect();
        let (lo, hi) = (*held.iter().min().unwrap(), *held.iter().max().unwrap());
        assert!(hi - lo <= rows / 4096 + 1, "{held:?}");
    }
}
