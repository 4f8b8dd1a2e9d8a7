//! Where a row lives (DESIGN section 3): row `r` of a cluster of `S` shards lives on shard `r % S`
//! at local index `r / S`, so hot ids spread over every shard.
//!
//! This is the one home of that rule: the client's cluster and cache, the store's tables and the
//! region descriptors that one-sided readers use all ask a [`Routing`].

/// The placement of rows over the shards of one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Routing {
    shards: u32,
}

impl Routing {
    /// Rows spread over `shards` shards (at least one).
    pub fn new(shards: u32) -> Self {
        Self {
            shards: shards.max(1),
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard holding row `key`.
    pub fn shard_of(&self, key: u64) -> usize {
        (key % u64::from(self.shards)) as usize
    }

    /// The index of row `key` within its shard.
    pub fn local_index(&self, key: u64) -> u64 {
        key / u64::from(self.shards)
    }

    /// The row at local index `local` of shard `shard`.
    pub fn global_key(&self, shard: u32, local: u64) -> u64 {
        local * u64::from(self.shards) + u64::from(shard)
    }

    /// How many rows of a table of `rows` rows shard `shard` holds.
    pub fn local_rows(&self, rows: u64, shard: u32) -> u64 {
        let s = u64::from(shard);
        if s >= rows {
            0
        } else {
            (rows - s).div_ceil(u64::from(self.shards))
        }
    }

    /// The local index of `key` on shard `shard` of a shard holding `local_rows` rows, or `None`
    /// when the key lives on another shard or past the table's end.
    pub fn local_on(&self, key: u64, shard: u32, local_rows: u64) -> Option<u64> {
        let local = self.local_index(key);
        (self.shard_of(key) == shard as usize && local < local_rows).then_some(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_partition_over_shards_and_map_back() {
        for shards in 1..6u32 {
            let r = Routing::new(shards);
            for rows in [0u64, 1, 7, 100] {
                let total: u64 = (0..shards).map(|s| r.local_rows(rows, s)).sum();
                assert_eq!(total, rows, "{shards} shards, {rows} rows");
                for key in 0..rows {
                    let (s, l) = (r.shard_of(key) as u32, r.local_index(key));
                    assert!(l < r.local_rows(rows, s));
                    assert_eq!(r.global_key(s, l), key);
                    assert_eq!(r.local_on(key, s, r.local_rows(rows, s)), Some(l));
                    assert_eq!(r.local_on(key, (s + 1) % shards, u64::MAX), {
                        (shards == 1).then_some(l)
                    });
                }
            }
        }
        assert_eq!(Routing::new(0), Routing::new(1));
    }
}
