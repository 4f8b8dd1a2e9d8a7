//! One worker's cached view of a table: the [`CacheCore`] driven over the cluster's transports.

use std::time::Instant;

use hetkv_transport::wire::NOT_CACHED;
use hetkv_transport::{PushRef, StaleRows, Traffic, TransportError};

use crate::cache::{CacheConfig, CacheCore, PushBatch, Replies};
use crate::cluster::Table;
use crate::stats::{CacheStats, PhaseTimes};
use crate::ClientError;
use hetkv_transport::wire::PushResponse;

/// Per-shard scratch of one call.
#[derive(Debug, Default)]
struct ShardBatch {
    keys: Vec<u64>,
    clocks: Vec<u64>,
    /// Request (or push-row) index of each key.
    origin: Vec<u32>,
    /// Hits whose checks are left to the table clock: keys, clocks, request indices.
    skip_keys: Vec<u64>,
    skip_clocks: Vec<u64>,
    skip_origin: Vec<u32>,
    counts: Vec<u32>,
    grads: Vec<f32>,
}

impl ShardBatch {
    fn clear(&mut self) {
        self.keys.clear();
        self.clocks.clear();
        self.origin.clear();
        self.skip_keys.clear();
        self.skip_clocks.clear();
        self.skip_origin.clear();
        self.counts.clear();
        self.grads.clear();
    }
}

/// One worker's HET cache of one table.
///
/// `lookup` returns rows that lag the server by at most `pull_bound` updates at the moment they
/// were validated and include this worker's own updates; after `update` returns no line holds more
/// than `push_bound` unpushed updates; `flush` returns when the shards have applied every pending
/// update. Every call that evicts a dirty line pushes it, to its shard, before returning.
///
/// A `CachedTable` is owned by one worker thread (`&mut self`); create one per worker from a shared
/// [`Table`]. Byte counts in [`CachedTable::stats`] are those of the table's [`crate::Cluster`]:
/// give each worker its own cluster connection to count per worker.
pub struct CachedTable {
    table: Table,
    core: CacheCore,
    /// Per-shard requests of the current lookup.
    shards: Vec<ShardBatch>,
    /// Per-shard rows of the current push.
    push_shards: Vec<ShardBatch>,
    replies: Replies,
    traffic_at_start: Traffic,
    time: PhaseTimes,
}

fn nanos(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl std::fmt::Debug for CachedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTable")
            .field("table", &self.table.spec().name)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl CachedTable {
    /// A cache of `table` under `config`.
    pub fn new(table: Table, config: CacheConfig) -> Self {
        let core = CacheCore::new(table.spec(), &config, table.cluster().shard_count());
        let batches = || {
            (0..table.cluster().shard_count())
                .map(|_| ShardBatch::default())
                .collect()
        };
        let (shards, push_shards) = (batches(), batches());
        let traffic_at_start = table.cluster().traffic();
        Self {
            table,
            core,
            shards,
            push_shards,
            replies: Replies::default(),
            traffic_at_start,
            time: PhaseTimes::default(),
        }
    }

    /// The table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The sans-IO core (capacity, residency, per-key unpushed counts).
    pub fn core(&self) -> &CacheCore {
        &self.core
    }

    /// Reads the rows of `keys` (duplicates allowed) into `out` (keys x dim).
    pub fn lookup(&mut self, keys: &[u64], out: &mut [f32]) -> Result<(), ClientError> {
        self.lookup_inner(keys, out, None)
    }

    /// Like [`CachedTable::lookup`], and writes each returned row's clock (`c_s + p`: the server
    /// version it reflects plus this worker's unpushed updates in it) into `clocks`.
    pub fn lookup_with_clocks(
        &mut self,
        keys: &[u64],
        out: &mut [f32],
        clocks: &mut [u64],
    ) -> Result<(), ClientError> {
        self.lookup_inner(keys, out, Some(clocks))
    }

    fn lookup_inner(
        &mut self,
        keys: &[u64],
        out: &mut [f32],
        clocks: Option<&mut [u64]>,
    ) -> Result<(), ClientError> {
        let dim = self.table.spec().dim as usize;
        if out.len() != keys.len() * dim || clocks.as_ref().is_some_and(|c| c.len() != keys.len()) {
            return Err(ClientError::WrongDim {
                table: self.table.spec().name.clone(),
                dim,
                keys: keys.len(),
                len: out.len(),
            });
        }
        let started = Instant::now();
        let plan = self.core.plan_lookup(keys)?;
        let bound = plan.bound;
        let since: Vec<_> = plan.since.to_vec();
        let cluster = self.table.cluster().clone();
        for s in &mut self.shards {
            s.clear();
        }
        for (i, ((&k, &c), &skipped)) in plan
            .keys
            .iter()
            .zip(plan.clocks)
            .zip(plan.skipped)
            .enumerate()
        {
            let s = &mut self.shards[cluster.shard_of(k)];
            let (keys, clocks, origin) = if skipped {
                (&mut s.skip_keys, &mut s.skip_clocks, &mut s.skip_origin)
            } else {
                (&mut s.keys, &mut s.clocks, &mut s.origin)
            };
            keys.push(k);
            clocks.push(c);
            origin.push(i as u32);
        }
        // The lines evicted to make room for the misses (and any rows an earlier call could not
        // deliver) travel with each shard's request: one round trip, applied before the pull.
        let victims = self.core.take_pushes();
        self.group_pushes(&victims);
        let busy: Vec<usize> = (0..self.shards.len())
            .filter(|&s| {
                let (b, p) = (&self.shards[s], &self.push_shards[s]);
                !b.keys.is_empty() || !b.skip_keys.is_empty() || !p.keys.is_empty()
            })
            .collect();
        let name = self.table.spec().name.as_str();
        let (shards, push_shards) = (&self.shards, &self.push_shards);
        let planned = Instant::now();
        let results = cluster.on_shards(&busy, |s, shard| {
            let (b, p) = (&shards[s], &push_shards[s]);
            let mut rows = StaleRows::default();
            if p.keys.is_empty()
                && b.skip_keys.is_empty()
                && b.clocks.iter().all(|&c| c == NOT_CACHED)
            {
                // Only misses and nothing to push: a plain pull sends no clocks.
                rows.table_clock = shard.pull(name, &b.keys, &mut rows.versions, &mut rows.rows)?;
                rows.indices = (0..b.keys.len() as u32).collect();
                rows.since_held = true;
            } else {
                let push = (!p.keys.is_empty()).then_some(PushRef {
                    keys: &p.keys,
                    counts: &p.counts,
                    grads: &p.grads,
                });
                shard.pull_if_stale(name, &b.keys, &b.clocks, bound, since[s], push, &mut rows)?;
            }
            // The shard could not vouch for the checks left out: send them now.
            let retry = if rows.since_held || b.skip_keys.is_empty() {
                None
            } else {
                let mut retry = StaleRows::default();
                shard.pull_if_stale(
                    name,
                    &b.skip_keys,
                    &b.skip_clocks,
                    bound,
                    None,
                    None,
                    &mut retry,
                )?;
                Some(retry)
            };
            Ok((rows, retry))
        });
        let answered = Instant::now();
        // Account for the pushed rows shard by shard before anything else can fail.
        let mut lost = PushBatch::default();
        for (&s, result) in busy.iter().zip(&results) {
            let p = &self.push_shards[s];
            match result {
                Ok((rows, _)) => self.core.pushed(s, p.keys.len(), rows.pushed_updates),
                Err(e) => {
                    if matches!(e, TransportError::Io { .. }) {
                        // Lost in transit, perhaps applied: kept for the next call.
                        lost.keys.extend_from_slice(&p.keys);
                        lost.counts.extend_from_slice(&p.counts);
                        lost.grads.extend_from_slice(&p.grads);
                    } else if !p.keys.is_empty() {
                        tracing::error!(rows = p.keys.len(), error = %e, "shard refused pushed rows");
                    }
                }
            }
        }
        if !lost.is_empty() {
            self.core.requeue(&lost);
        }
        let mut results_ok = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(v) => results_ok.push(v),
                Err(e) => {
                    self.core.abort_lookup();
                    return Err(e.into());
                }
            }
        }
        self.replies.clear();
        for (&s, (rows, retry)) in busy.iter().zip(results_ok) {
            self.core.observe(s, rows.table_clock);
            let b = &self.shards[s];
            for (part, origin) in std::iter::once((&rows, &b.origin))
                .chain(retry.as_ref().map(|r| (r, &b.skip_origin)))
            {
                if part.rows.len() != part.indices.len() * dim
                    || part.versions.len() != part.indices.len()
                    || part.indices.iter().any(|&i| i as usize >= origin.len())
                {
                    self.core.abort_lookup();
                    return Err(ClientError::InconsistentCluster(format!(
                        "{} answered {} rows of {} values for {} keys of table {name} (dim {dim})",
                        cluster.shard(s).addr(),
                        part.indices.len(),
                        part.rows.len(),
                        origin.len()
                    )));
                }
                for &i in &part.indices {
                    self.replies.requests.push(origin[i as usize]);
                }
                self.replies.versions.extend_from_slice(&part.versions);
                self.replies.rows.extend_from_slice(&part.rows);
            }
            if retry.is_some() {
                self.core.claim_failed();
            }
        }
        self.core.finish_lookup(&self.replies, out, clocks)?;
        self.time.plan_ns += nanos(planned - started);
        self.time.request_ns += nanos(answered - planned);
        self.time.place_ns += nanos(answered.elapsed());
        Ok(())
    }

    /// Applies one gradient row per key occurrence (`grads` is keys x dim): locally at once, and on
    /// the shards when a line's unpushed updates exceed the push bound or the key is not cached.
    /// Nothing changes if a value is NaN or infinite, a key is out of range, or the length is wrong.
    pub fn update(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), ClientError> {
        let started = Instant::now();
        self.core.update(keys, grads)?;
        self.time.update_ns += nanos(started.elapsed());
        self.push_pending()
    }

    /// Pushes every unpushed update and returns when the shards have applied them.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.core.flush();
        self.push_pending()
    }

    /// Counters, with the bytes the cluster's transports moved since this cache was created.
    pub fn stats(&self) -> CacheStats {
        let mut s = *self.core.stats();
        s.time = self.time;
        let now = self.table.cluster().traffic();
        s.bytes_sent = now.sent - self.traffic_at_start.sent;
        s.bytes_received = now.received - self.traffic_at_start.received;
        s
    }

    /// Sends the core's push batch, grouped by shard. Rows a shard did not acknowledge are kept
    /// for the next call; the first error is returned.
    fn push_pending(&mut self) -> Result<(), ClientError> {
        let batch = self.core.take_pushes();
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let busy = self.group_pushes(&batch);
        let results = run_pushes(&self.table, &self.push_shards, &busy);
        let result = self.settle_pushes(&busy, results);
        self.time.push_ns += nanos(started.elapsed());
        result
    }

    /// Spreads a push batch over the per-shard push buffers; returns the shards with rows.
    fn group_pushes(&mut self, batch: &PushBatch) -> Vec<usize> {
        let dim = self.table.spec().dim as usize;
        let cluster = self.table.cluster();
        for s in &mut self.push_shards {
            s.clear();
        }
        for (i, &k) in batch.keys.iter().enumerate() {
            let s = &mut self.push_shards[cluster.shard_of(k)];
            s.keys.push(k);
            s.counts.push(batch.counts[i]);
            s.grads
                .extend_from_slice(&batch.grads[i * dim..(i + 1) * dim]);
        }
        (0..self.push_shards.len())
            .filter(|&s| !self.push_shards[s].keys.is_empty())
            .collect()
    }

    /// Accounts for the shards' answers to a push: acknowledged rows are counted; rows lost in
    /// transit are kept for the next call; the first error is returned.
    fn settle_pushes(
        &mut self,
        busy: &[usize],
        results: Vec<Result<PushResponse, TransportError>>,
    ) -> Result<(), ClientError> {
        let mut failed = PushBatch::default();
        let mut first_error = None;
        for (&s, result) in busy.iter().zip(results) {
            let b = &self.push_shards[s];
            match result {
                Ok(ack) => self.core.pushed(s, b.keys.len(), ack.updates),
                // Lost in transit: keep the rows for the next call. A shard's refusal of rows the
                // core validated (an unknown table after a daemon restart, say) would be refused
                // again, so it is reported, not retried.
                Err(e @ TransportError::Io { .. }) => {
                    failed.keys.extend_from_slice(&b.keys);
                    failed.counts.extend_from_slice(&b.counts);
                    failed.grads.extend_from_slice(&b.grads);
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    tracing::error!(rows = b.keys.len(), error = %e, "shard refused pushed rows");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => {
                if !failed.is_empty() {
                    tracing::warn!(rows = failed.len(), error = %e, "push failed; rows kept for the next call");
                    self.core.requeue(&failed);
                }
                Err(e.into())
            }
        }
    }
}

/// Sends each listed shard's push buffer, shards in parallel.
fn run_pushes(
    table: &Table,
    shards: &[ShardBatch],
    busy: &[usize],
) -> Vec<Result<PushResponse, TransportError>> {
    let name = &table.spec().name;
    table.cluster().on_shards(busy, |s, shard| {
        let b = &shards[s];
        shard.push(name, &b.keys, &b.counts, &b.grads)
    })
}
