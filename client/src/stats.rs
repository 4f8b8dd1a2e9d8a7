//! Cache statistics: exact counters, bumped once per key or per batch.

use serde::{Deserialize, Serialize};

/// What one worker's cache of one table has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Pushed rows a shard refused (and applied none of); they are dropped, not retried.
    pub rows_refused: u64,
    /// Pushed rows unanswered at their deadline, held by the transport and sent again under
    /// their numbers (so applied exactly once), not by the cache.
    pub rows_held: u64,
    /// Pushed rows whose fate no one can tell any more (the shard no longer knew whether it
    /// applied them, or their answer could not be read): dropped, not retried, and reported by
    /// the next `flush`.
    pub rows_unknown: u64,
    /// Rows a push produced that its shard handed back because another update came between
    /// the line's base and the push: the line took them (a refresh that cost no request).
    pub rows_handed_back: u64,
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
    /// Restarts of a shard noticed (its incarnation changed between two answers).
    pub restarts: u64,
    /// Lines marked for reading again because their shard restarted.
    pub lines_revalidated: u64,
    /// Lines read again after a restart whose server version was below the one they had seen
    /// (the shard restored an earlier state).
    pub rows_went_back: u64,
    /// Unpushed updates held in lines of a restarted shard: kept, and pushed to the new
    /// incarnation (which never saw them).
    pub updates_kept: u64,
    /// Lookups whose rows a prefetch had requested (`CachedTable::prefetch`).
    pub prefetched: u64,
    /// Prefetches landed without the lookup they were for (another lookup, or a flush, came
    /// first): their rows went into the cache only.
    pub prefetches_unused: u64,
    /// Bytes sent by this client's transports, framing included.
    pub bytes_sent: u64,
    /// Bytes received by this client's transports, framing included.
    pub bytes_received: u64,
    /// Wall-clock nanoseconds spent in each phase of the calls, for finding where time goes.
    pub time: PhaseTimes,
}

/// Wall-clock nanoseconds per phase, summed over calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

type Field = (&'static str, &'static str, fn(&CacheStats) -> u64);

/// Every counter of [`CacheStats`]: name, description, how to read it.
const COUNTERS: &[Field] = &[
    ("lookups", "Keys looked up, duplicates included", |s| {
        s.lookups
    }),
    ("unique_keys", "Unique keys per lookup, summed", |s| {
        s.unique_keys
    }),
    ("hits", "Unique keys found in the cache", |s| s.hits),
    ("misses", "Unique keys not in the cache", |s| s.misses),
    (
        "stale_refreshes",
        "Hits refreshed because they exceeded the read bound",
        |s| s.stale_refreshes,
    ),
    (
        "version_checks",
        "Hits whose version was checked with the shards",
        |s| s.version_checks,
    ),
    (
        "checks_skipped",
        "Hits whose check a shard's table clock vouched for",
        |s| s.checks_skipped,
    ),
    (
        "clock_retries",
        "Lookups whose table-clock claim failed (a second round trip)",
        |s| s.clock_retries,
    ),
    ("rows_pulled", "Rows received from the shards", |s| {
        s.rows_pulled
    }),
    ("rows_pushed", "Rows pushed to the shards", |s| {
        s.rows_pushed
    }),
    (
        "rows_refused",
        "Pushed rows a shard refused (dropped)",
        |s| s.rows_refused,
    ),
    (
        "rows_held",
        "Pushed rows unanswered at their deadline, sent again by the transport under their numbers",
        |s| s.rows_held,
    ),
    (
        "rows_unknown",
        "Pushed rows of unknown fate (dropped, reported by flush)",
        |s| s.rows_unknown,
    ),
    (
        "rows_handed_back",
        "Rows a push produced, handed back because another update came between",
        |s| s.rows_handed_back,
    ),
    ("evictions", "Lines evicted", |s| s.evictions),
    (
        "dirty_evictions",
        "Evicted lines that held unpushed updates",
        |s| s.dirty_evictions,
    ),
    (
        "write_throughs",
        "Updated keys not cached, sent straight to the shards",
        |s| s.write_throughs,
    ),
    ("not_admitted", "Misses the policy did not admit", |s| {
        s.not_admitted
    }),
    ("updates", "Gradient rows given to update", |s| s.updates),
    (
        "restarts",
        "Shard restarts noticed (a new incarnation)",
        |s| s.restarts,
    ),
    (
        "lines_revalidated",
        "Lines read again because their shard restarted",
        |s| s.lines_revalidated,
    ),
    (
        "rows_went_back",
        "Lines read again after a restart that found an older version",
        |s| s.rows_went_back,
    ),
    (
        "updates_kept",
        "Unpushed updates kept through a shard's restart",
        |s| s.updates_kept,
    ),
    (
        "prefetched",
        "Lookups whose rows a prefetch had requested",
        |s| s.prefetched,
    ),
    (
        "prefetches_unused",
        "Prefetches landed without the lookup they were for",
        |s| s.prefetches_unused,
    ),
    ("bytes_sent", "Bytes sent by the cache's transports", |s| {
        s.bytes_sent
    }),
    (
        "bytes_received",
        "Bytes received by the cache's transports",
        |s| s.bytes_received,
    ),
];

impl CacheStats {
    /// Every counter (the phase times aside) with its name and a description, in declaration
    /// order: what a metrics exporter or a binding lists.
    pub fn counters(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        COUNTERS
            .iter()
            .map(move |(name, help, field)| (*name, *help, field(self)))
    }

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
        self.zip(earlier, |a, b| a - b)
    }

    /// The sum of two sets of counters (several workers' caches, say).
    pub fn plus(&self, other: &CacheStats) -> CacheStats {
        self.zip(other, |a, b| a + b)
    }

    /// Combines every counter of `self` and `o` with `f`.
    fn zip(&self, o: &CacheStats, f: impl Fn(u64, u64) -> u64) -> CacheStats {
        CacheStats {
            lookups: f(self.lookups, o.lookups),
            unique_keys: f(self.unique_keys, o.unique_keys),
            hits: f(self.hits, o.hits),
            misses: f(self.misses, o.misses),
            stale_refreshes: f(self.stale_refreshes, o.stale_refreshes),
            version_checks: f(self.version_checks, o.version_checks),
            checks_skipped: f(self.checks_skipped, o.checks_skipped),
            clock_retries: f(self.clock_retries, o.clock_retries),
            rows_pulled: f(self.rows_pulled, o.rows_pulled),
            rows_pushed: f(self.rows_pushed, o.rows_pushed),
            rows_refused: f(self.rows_refused, o.rows_refused),
            rows_held: f(self.rows_held, o.rows_held),
            rows_unknown: f(self.rows_unknown, o.rows_unknown),
            rows_handed_back: f(self.rows_handed_back, o.rows_handed_back),
            evictions: f(self.evictions, o.evictions),
            dirty_evictions: f(self.dirty_evictions, o.dirty_evictions),
            write_throughs: f(self.write_throughs, o.write_throughs),
            not_admitted: f(self.not_admitted, o.not_admitted),
            updates: f(self.updates, o.updates),
            restarts: f(self.restarts, o.restarts),
            lines_revalidated: f(self.lines_revalidated, o.lines_revalidated),
            rows_went_back: f(self.rows_went_back, o.rows_went_back),
            updates_kept: f(self.updates_kept, o.updates_kept),
            prefetched: f(self.prefetched, o.prefetched),
            prefetches_unused: f(self.prefetches_unused, o.prefetches_unused),
            bytes_sent: f(self.bytes_sent, o.bytes_sent),
            bytes_received: f(self.bytes_received, o.bytes_received),
            time: PhaseTimes {
                plan_ns: f(self.time.plan_ns, o.time.plan_ns),
                request_ns: f(self.time.request_ns, o.time.request_ns),
                place_ns: f(self.time.place_ns, o.time.place_ns),
                push_ns: f(self.time.push_ns, o.time.push_ns),
                update_ns: f(self.time.update_ns, o.time.update_ns),
            },
        }
    }
}
