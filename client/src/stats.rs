//! Cache statistics: exact counters, bumped once per key or per batch.

use serde::Serialize;

/// What one worker's cache of one table has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Keys looked up, duplicates included.
    pub lookups: u64,
    /// Unique keys per lookup, summed over lookups.
    pub unique_keys: u64,
    /// Unique keys found in the cache (stale ones included).
    pub hits: u64,
    /// Unique keys not in the cache.
    pub misses: u64,
    /// Hits whose server version exceeded their clock plus the read bound: refreshed.
    pub stale_refreshes: u64,
    /// Hits whose version was checked with the shards.
    pub version_checks: u64,
    /// Hits whose check the shard's table clock vouched for (no key or clock sent).
    pub checks_skipped: u64,
    /// Lookups in which a shard's table clock could not vouch for the skipped checks, which were
    /// then sent in a second round trip.
    pub clock_retries: u64,
    /// Rows received from the shards.
    pub rows_pulled: u64,
    /// Rows pushed to the shards (each `(key, count, gradient sum)` once).
    pub rows_pushed: u64,
    /// Lines evicted.
    pub evictions: u64,
    /// Evicted lines that held unpushed updates (pushed before the evicting call returned).
    pub dirty_evictions: u64,
    /// Updated keys that were not cached and went straight to the shards.
    pub write_throughs: u64,
    /// Misses the policy did not admit (served without caching).
    pub not_admitted: u64,
    /// Gradient rows given to `update`, duplicates included.
    pub updates: u64,
    /// Bytes sent by this client's transports, framing included.
    pub bytes_sent: u64,
    /// Bytes received by this client's transports, framing included.
    pub bytes_received: u64,
    /// Wall-clock nanoseconds spent in each phase of the calls, for finding where time goes.
    pub time: PhaseTimes,
}

/// Wall-clock nanoseconds per phase, summed over calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PhaseTimes {
    /// Lookups: de-duplication, policy and request planning.
    pub plan_ns: u64,
    /// Lookups: the requests to the shards, until every answer is in.
    pub request_ns: u64,
    /// Lookups: refreshing, inserting and writing rows out.
    pub place_ns: u64,
    /// Pushes of evicted, bound-exceeding and written-through rows, in all calls.
    pub push_ns: u64,
    /// Updates: applying gradients locally.
    pub update_ns: u64,
}

impl PhaseTimes {
    fn since(&self, e: &PhaseTimes) -> PhaseTimes {
        PhaseTimes {
            plan_ns: self.plan_ns - e.plan_ns,
            request_ns: self.request_ns - e.request_ns,
            place_ns: self.place_ns - e.place_ns,
            push_ns: self.push_ns - e.push_ns,
            update_ns: self.update_ns - e.update_ns,
        }
    }

    /// The sum of two.
    pub fn add(&self, o: &PhaseTimes) -> PhaseTimes {
        PhaseTimes {
            plan_ns: self.plan_ns + o.plan_ns,
            request_ns: self.request_ns + o.request_ns,
            place_ns: self.place_ns + o.place_ns,
            push_ns: self.push_ns + o.push_ns,
            update_ns: self.update_ns + o.update_ns,
        }
    }
}

impl CacheStats {
    /// Hits over unique keys looked up.
    pub fn hit_rate(&self) -> f64 {
        if self.unique_keys == 0 {
            0.0
        } else {
            self.hits as f64 / self.unique_keys as f64
        }
    }

    /// The counters accumulated since `earlier`.
    pub fn since(&self, earlier: &CacheStats) -> CacheStats {
        CacheStats {
            lookups: self.lookups - earlier.lookups,
            unique_keys: self.unique_keys - earlier.unique_keys,
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            stale_refreshes: self.stale_refreshes - earlier.stale_refreshes,
            version_checks: self.version_checks - earlier.version_checks,
            checks_skipped: self.checks_skipped - earlier.checks_skipped,
            clock_retries: self.clock_retries - earlier.clock_retries,
            rows_pulled: self.rows_pulled - earlier.rows_pulled,
            rows_pushed: self.rows_pushed - earlier.rows_pushed,
            evictions: self.evictions - earlier.evictions,
            dirty_evictions: self.dirty_evictions - earlier.dirty_evictions,
            write_throughs: self.write_throughs - earlier.write_throughs,
            not_admitted: self.not_admitted - earlier.not_admitted,
            updates: self.updates - earlier.updates,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
            time: self.time.since(&earlier.time),
        }
    }
}
