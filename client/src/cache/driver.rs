//! One worker's cached view of a table: the [`CacheCore`] driven over the cluster's transports.

use std::time::Instant;

use hetkv_transport::{Exchange, PushOutcome, ShardTransport, StaleRows, Traffic, TransportError};

use super::exchange::ShardRequest;
use super::prefetch::{Helper, OwnedRequest, SharedAnswers};
use super::rule::{UpdateRule, UpdateRuleKind};
use super::{Bound, CacheConfig, CacheCore, LineView};
use crate::cluster::{Cluster, Table};
use crate::metrics::{CacheStatsHandle, PublishedStats};
use crate::stats::{CacheStats, PhaseTimes};
use crate::ClientError;

mod group;
pub(super) use group::send_batched;
pub use group::{lookup_many, prefetch_many, update_many};

/// One shard's answer: what became of the rows pushed, the rows read (and the rows the push
/// produced and handed back, valid when the push was applied), and whether the read succeeded.
pub(super) type Answer = (PushOutcome, StaleRows, Result<(), TransportError>);

impl Table {
    /// A cache of this table for one worker (see [`CachedTable`]).
    pub fn cached(&self, config: CacheConfig) -> CachedTable {
        CachedTable::new(self.clone(), config)
    }
}

/// One worker's HET cache of one table.
///
/// `lookup` returns rows that lag the server by at most `pull_bound` updates at the moment they
/// were validated and include this worker's own updates, taken with the table's optimizer (a
/// line shows the row the shards produce once its pending updates are pushed); after `update` returns no line holds more
/// than `push_bound` unpushed updates; `flush` returns when the shards have applied every pending
/// update. Every call that evicts a dirty line pushes it, to its shard, before returning.
///
/// A `CachedTable` is owned by one worker thread (`&mut self`); create one per worker from a shared
/// [`Table`]. Byte counts in [`CachedTable::stats`] are those of the table's [`crate::Cluster`]:
/// give each worker its own cluster connection to count per worker.
///
/// # Prefetching
///
/// [`CachedTable::prefetch`] starts the lookup of the next batch's keys on a helper thread and
/// returns: the worker computes the current batch meanwhile, and the [`CachedTable::lookup`] of
/// those keys waits only for what is left of the round trip. The prefetch carries every row queued
/// for pushing, so a worker that prefetches each batch sends one request per batch and shard:
/// batch t's gradients, applied locally by `update` while batch t+1's prefetch is in flight, ride
/// with batch t+2's. While a prefetch is in flight `update` checks its input and keeps it; the
/// updates are applied when the prefetch lands (at the next `lookup`, `prefetch` or `flush`), in
/// order, and the rows they touch are brought up to date before `lookup` returns them.
///
/// What holds for a row that `lookup` takes from a prefetch (checked by the model-based test):
/// - it lags the server *as it stood when `prefetch` was called* by at most `pull_bound` updates
///   (it was validated when its shard answered, which is later), and its values are exactly those
///   of its clock;
/// - it includes every update this worker made before the `lookup`, those made while the
///   prefetch was in flight included;
/// - updates other workers apply to the row between the `prefetch` and the `lookup` are not
///   bounded: prefetching one batch ahead, they are those of one batch interval.
///
/// And of the write bound: updates made while a prefetch is in flight wait for it to land, and the
/// rows they leave to push go with the next request, so the shards may lack, of a key, up to
/// `push_bound` updates plus that key's updates of the last two batches. Every call made with no
/// prefetch in flight keeps the bound as stated above.
pub struct CachedTable {
    table: Table,
    core: CacheCore,
    traffic_at_start: Traffic,
    time: PhaseTimes,
    published: CacheStatsHandle,
    /// The prefetch in flight, if any.
    inflight: Option<InFlight>,
    /// The thread that sends prefetches, started by the first one.
    helper: Option<Helper>,
    /// Updates made while a prefetch was in flight, applied when it lands: keys, gradients.
    late_keys: Vec<u64>,
    late_grads: Vec<f32>,
    /// Where a prefetch nobody looked up lands.
    discard: Vec<f32>,
    prefetches: PrefetchCounts,
}

/// Prefetches used by their lookup, and landed without it.
#[derive(Clone, Copy, Debug, Default)]
struct PrefetchCounts {
    used: u64,
    unused: u64,
}

/// A prefetch sent and not yet landed.
#[derive(Debug)]
struct InFlight {
    keys: Vec<u64>,
    /// Whether a request went out (a lookup of hits under an infinite bound needs none).
    sent: bool,
    /// Of a prefetch of several caches ([`prefetch_many`]): the answers they share, and where
    /// this cache's are among them. None: this cache's own helper has them.
    shared: Option<(std::sync::Arc<SharedAnswers>, Vec<usize>)>,
}

fn nanos(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl Drop for CachedTable {
    /// A cache dropped with updates the shards never got says so (through `tracing`, which the
    /// Python package forwards to `logging`): they are lost. Call [`CachedTable::flush`] first.
    fn drop(&mut self) {
        let pending = self.core.pending_updates() + self.late_keys.len() as u64;
        if pending > 0 {
            tracing::warn!(
                table = %self.table.spec().name,
                updates = pending,
                "a cache was dropped with updates the shards never got: they are lost (call \
                 flush before dropping it)"
            );
        }
    }
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
        let traffic_at_start = table.cluster().traffic();
        Self {
            table,
            core,
            traffic_at_start,
            time: PhaseTimes::default(),
            published: CacheStatsHandle::default(),
            inflight: None,
            helper: None,
            late_keys: Vec::new(),
            late_grads: Vec::new(),
            discard: Vec::new(),
            prefetches: PrefetchCounts::default(),
        }
    }

    /// A handle on this cache's counters as of the end of its last call, readable from other
    /// threads (a metrics scrape: [`crate::metrics::register`]).
    pub fn stats_handle(&self) -> CacheStatsHandle {
        self.publish();
        self.published.clone()
    }

    fn publish(&self) {
        self.published.publish(PublishedStats {
            stats: self.stats(),
            resident: self.core.resident(),
            capacity: self.core.capacity(),
            bounds: self.core.bounds(),
        });
    }

    /// The update rule this cache uses ([`UpdateRuleKind::PushWhole`], HET's semantics, unless
    /// set): how its updates of a key count, in its lines and in its pushes.
    pub fn with_update_rule(mut self, rule: UpdateRuleKind) -> Self {
        self.core.set_update_rule(rule.build());
        self
    }

    /// [`CachedTable::with_update_rule`] with a rule of the caller's own.
    pub fn with_custom_update_rule(mut self, rule: Box<dyn UpdateRule>) -> Self {
        self.core.set_update_rule(rule);
        self
    }

    /// What the cache holds of `key` (its value, the version it derives from, its unpushed
    /// updates), without touching the eviction policy or asking a shard; `None` when not cached.
    /// A prefetch in flight is not landed, so updates made meanwhile are not in it yet.
    pub fn peek(&self, key: u64) -> Option<LineView> {
        self.core.peek(key)
    }

    /// Changes the read and write bounds: later calls keep the new ones ([`CacheCore::set_bounds`]).
    /// A prefetch in flight lands first (into the cache only, counted as unused), as it was made
    /// under the old bounds; lines holding more unpushed updates than a lowered write bound are
    /// pushed before this returns. A trainer that starts synchronous and then lets staleness in
    /// (post-local SGD) calls it once, with looser bounds.
    pub fn set_bounds(&mut self, pull: Bound, push: Bound) -> Result<(), ClientError> {
        self.table.cluster().check_open()?;
        self.land_unused();
        self.core.set_bounds(pull, push);
        let result = self.push_pending();
        self.publish();
        result
    }

    /// The table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The sans-IO core (capacity, residency, per-key unpushed counts).
    pub fn core(&self) -> &CacheCore {
        &self.core
    }

    /// Updates of this worker to `key` not yet acknowledged by its shard as far as this cache
    /// knows: those in its line, those queued for pushing (after a prefetch landed, they go with
    /// the next request), and those made while a prefetch is in flight (not applied yet).
    pub fn unpushed(&self, key: u64) -> u64 {
        let late = self.late_keys.iter().filter(|&&k| k == key).count() as u64;
        self.core.unpushed(key) + late
    }

    /// Whether a prefetch is in flight.
    pub fn prefetching(&self) -> bool {
        self.inflight.is_some()
    }

    /// Starts the lookup of `keys` (the next batch's) and returns without waiting for it: the
    /// [`CachedTable::lookup`] of the same keys completes it. The request carries every row queued
    /// for pushing. A prefetch still in flight lands first. See the type's documentation for what
    /// holds of prefetched rows.
    pub fn prefetch(&mut self, keys: &[u64]) -> Result<(), ClientError> {
        let result = self
            .prefetch_inner(keys)
            .and_then(|()| self.table.cluster().check_rollbacks());
        self.publish();
        result
    }

    fn prefetch_inner(&mut self, keys: &[u64]) -> Result<(), ClientError> {
        self.table.cluster().check_open()?;
        self.land_unused();
        let started = Instant::now();
        self.core.start_prefetch(keys)?;
        let requests: Vec<OwnedRequest> =
            self.core.requests().iter().map(OwnedRequest::new).collect();
        let sent = !requests.is_empty();
        if sent {
            if self.helper.is_none() {
                let cluster = self.table.cluster().clone();
                let name = self.table.spec().name.clone();
                match Helper::start(cluster, name) {
                    Ok(helper) => self.helper = Some(helper),
                    Err(e) => {
                        self.unsent_prefetch();
                        return Err(ClientError::Prefetch(format!(
                            "cannot start the thread: {e}"
                        )));
                    }
                }
            }
            let helper = self.helper.as_ref().expect("started above");
            if !helper.send(requests) {
                self.unsent_prefetch();
                return Err(ClientError::Prefetch("the thread is gone".into()));
            }
        }
        self.time.plan_ns += nanos(started.elapsed());
        self.inflight = Some(InFlight {
            keys: keys.to_vec(),
            sent,
            shared: None,
        });
        Ok(())
    }

    /// Undoes a prefetch planned but never sent: the rows its requests would have pushed are kept
    /// for the next call (as a push whose delivery is unknown is), the reserved slots given back.
    fn unsent_prefetch(&mut self) {
        let shards: Vec<usize> = self.core.requests().iter().map(|r| r.shard).collect();
        let nothing = StaleRows::default();
        for s in shards {
            // Cannot fail: every listed shard awaits an answer.
            let _ = self.core.on_reply(s, PushOutcome::Lost, &nothing, false);
        }
        self.core.abort_lookup();
    }

    /// Lands a prefetch in flight that no lookup asked for: its rows go into the cache only. Its
    /// read failing fails nothing (no caller wants those rows; what it pushed is accounted for as
    /// always, and the updates made meanwhile are applied): it is logged.
    fn land_unused(&mut self) {
        let Some(p) = self.inflight.take() else {
            return;
        };
        self.prefetches.unused += 1;
        let mut out = std::mem::take(&mut self.discard);
        out.resize(p.keys.len() * self.table.spec().dim as usize, 0.0);
        if let Err(e) = self.land(&p, &mut out, None) {
            tracing::warn!(table = %self.table.spec().name, error = %e, "an unused prefetch failed");
        }
        self.discard = out;
    }

    /// Waits for the prefetch `p`'s answers, completes its lookup into `out`, then applies the
    /// updates made meanwhile (whatever became of the lookup) and brings `out` up to date.
    fn land(
        &mut self,
        p: &InFlight,
        out: &mut [f32],
        mut clocks: Option<&mut [u64]>,
    ) -> Result<(), ClientError> {
        let started = Instant::now();
        let mut result = Ok(());
        if p.sent {
            let shards: Vec<usize> = self.core.requests().iter().map(|r| r.shard).collect();
            let answers = match &p.shared {
                Some((shared, mine)) => shared.take(mine),
                None => self
                    .helper
                    .as_ref()
                    .expect("a prefetch was sent through it")
                    .answers(),
            };
            let answers = answers.unwrap_or_else(|| {
                // Nothing is known of what was sent: its pushes are kept for the next call.
                let cluster = self.table.cluster();
                let gone = |s: usize| TransportError::Io {
                    addr: cluster.shard(s).addr().to_string(),
                    source: std::io::Error::other("the prefetch thread is gone"),
                };
                shards
                    .iter()
                    .map(|&s| (PushOutcome::Lost, StaleRows::default(), Err(gone(s))))
                    .collect()
            });
            result = self.take_answers(&shards, answers);
        }
        let answered = Instant::now();
        self.time.request_ns += nanos(answered - started);
        // Follow-up rounds (claims that did not hold, restarts) are sent here, synchronously.
        result = result.and_then(|()| self.exchange());
        result = match result {
            Ok(()) => self
                .core
                .complete_lookup(out, clocks.as_deref_mut())
                .map_err(ClientError::from),
            Err(e) => {
                self.core.abort_lookup();
                Err(e)
            }
        };
        let late_keys = std::mem::take(&mut self.late_keys);
        let late_grads = std::mem::take(&mut self.late_grads);
        // The late updates were checked when they were made: applying them cannot fail.
        let applied = if result.is_ok() {
            self.core
                .update_after_lookup(&p.keys, out, clocks, &late_keys, &late_grads)
        } else {
            self.core.update(&late_keys, &late_grads)
        };
        self.late_keys = late_keys;
        self.late_keys.clear();
        self.late_grads = late_grads;
        self.late_grads.clear();
        self.time.place_ns += nanos(answered.elapsed());
        result.and(applied.map_err(ClientError::from))
    }

    /// Reads the rows of `keys` (duplicates allowed) into `out` (keys x dim).
    pub fn lookup(&mut self, keys: &[u64], out: &mut [f32]) -> Result<(), ClientError> {
        let result = self
            .lookup_inner(keys, out, None)
            .and_then(|()| self.table.cluster().check_rollbacks());
        self.publish();
        result
    }

    /// Like [`CachedTable::lookup`], and writes each returned row's clock (`c_s + p`: the server
    /// version it reflects plus this worker's unpushed updates in it) into `clocks`.
    pub fn lookup_with_clocks(
        &mut self,
        keys: &[u64],
        out: &mut [f32],
        clocks: &mut [u64],
    ) -> Result<(), ClientError> {
        let result = self
            .lookup_inner(keys, out, Some(clocks))
            .and_then(|()| self.table.cluster().check_rollbacks());
        self.publish();
        result
    }

    fn lookup_inner(
        &mut self,
        keys: &[u64],
        out: &mut [f32],
        clocks: Option<&mut [u64]>,
    ) -> Result<(), ClientError> {
        self.table.cluster().check_open()?;
        self.check_rows(keys, out.len())?;
        if clocks.as_ref().is_some_and(|c| c.len() != keys.len()) {
            return Err(self.wrong_dim(keys, out.len()));
        }
        if let Some(p) = self.inflight.take() {
            if p.keys == keys {
                self.prefetches.used += 1;
                return self.land(&p, out, clocks);
            }
            self.inflight = Some(p);
            self.land_unused();
        }
        let started = Instant::now();
        self.core.start_lookup(keys)?;
        let planned = Instant::now();
        let result = self.exchange();
        let answered = Instant::now();
        if let Err(e) = result {
            self.core.abort_lookup();
            return Err(e);
        }
        self.core.complete_lookup(out, clocks)?;
        self.time.plan_ns += nanos(planned - started);
        self.time.request_ns += nanos(answered - planned);
        self.time.place_ns += nanos(answered.elapsed());
        Ok(())
    }

    /// Fails unless `len` values hold the rows of `keys`.
    fn check_rows(&self, keys: &[u64], len: usize) -> Result<(), ClientError> {
        if len == keys.len() * self.table.spec().dim as usize {
            Ok(())
        } else {
            Err(self.wrong_dim(keys, len))
        }
    }

    fn wrong_dim(&self, keys: &[u64], len: usize) -> ClientError {
        ClientError::WrongDim {
            table: self.table.spec().name.clone(),
            dim: self.table.spec().dim as usize,
            keys: keys.len(),
            len,
        }
    }

    /// Sends what the core asks for, round after round (shards in parallel), and hands every
    /// answer back to it, until it asks for nothing more or a shard fails. Every push's outcome
    /// reaches the core, whatever else fails; the first failure is returned.
    fn exchange(&mut self) -> Result<(), ClientError> {
        let cluster = self.table.cluster().clone();
        loop {
            let requests = self.core.requests();
            if requests.is_empty() {
                return Ok(());
            }
            let shards: Vec<usize> = requests.iter().map(|r| r.shard).collect();
            let answers = send_round(&cluster, &self.table.spec().name, &requests);
            self.take_answers(&shards, answers)?;
        }
    }

    /// Hands one round's answers (`answers[i]` from `shards[i]`) to the core; the first failure
    /// is returned, after every answer was taken.
    fn take_answers(&mut self, shards: &[usize], answers: Vec<Answer>) -> Result<(), ClientError> {
        let cluster = self.table.cluster().clone();
        let mut first_error: Option<ClientError> = None;
        for (&s, (push, rows, read)) in shards.iter().zip(answers) {
            if let Err(e) = self.core.on_reply(s, push, &rows, read.is_ok()) {
                first_error.get_or_insert(ClientError::InconsistentCluster(format!(
                    "{}: {e}",
                    cluster.shard(s).addr()
                )));
            }
            if let Err(e) = read {
                first_error.get_or_insert(e.into());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Applies one gradient row per key occurrence (`grads` is keys x dim): locally at once, and on
    /// the shards when a line's unpushed updates exceed the push bound or the key is not cached.
    /// Nothing changes if a value is NaN or infinite, a key is out of range, or the length is wrong.
    ///
    /// With a prefetch in flight, the input is checked and kept, and applied when the prefetch
    /// lands (see the type's documentation).
    pub fn update(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), ClientError> {
        self.table.cluster().check_open()?;
        let started = Instant::now();
        if self.inflight.is_some() {
            self.core.check_update(keys, grads)?;
            self.late_keys.extend_from_slice(keys);
            self.late_grads.extend_from_slice(grads);
            self.time.update_ns += nanos(started.elapsed());
            return Ok(());
        }
        self.core.update(keys, grads)?;
        self.time.update_ns += nanos(started.elapsed());
        let result = self
            .push_pending()
            .and_then(|()| self.table.cluster().check_rollbacks());
        self.publish();
        result
    }

    /// Pushes every unpushed update and returns when the shards have applied them (those the
    /// transports hold after a deadline included).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.table.cluster().check_open()?;
        self.land_unused();
        self.core.flush();
        let mut result = self.push_pending();
        if result.is_ok() {
            let cluster = self.table.cluster();
            result = (0..cluster.shard_count())
                .try_for_each(|s| cluster.shard(s).settle())
                .map_err(ClientError::from)
                .and_then(|()| cluster.check_rollbacks());
        }
        self.publish();
        result
    }

    /// Pushes every unpushed update ([`CachedTable::flush`]), then forgets every line
    /// ([`CacheCore::forget_lines`]): each key's next lookup reads the shards' row. For after the
    /// table's rows were replaced behind the cache's back (`assign`, an import, a saved model
    /// loaded), which moves each row's version by one only, so that a line could still be
    /// within its bound.
    pub fn invalidate(&mut self) -> Result<(), ClientError> {
        self.flush()?;
        self.core.forget_lines()?;
        self.publish();
        Ok(())
    }

    /// Counters, with the bytes the cluster's transports moved since this cache was created.
    pub fn stats(&self) -> CacheStats {
        let mut s = *self.core.stats();
        s.time = self.time;
        s.prefetched = self.prefetches.used;
        s.prefetches_unused = self.prefetches.unused;
        let now = self.table.cluster().traffic();
        s.bytes_sent = now.sent - self.traffic_at_start.sent;
        s.bytes_received = now.received - self.traffic_at_start.received;
        s
    }

    /// Sends every queued push, grouped by shard. Rows whose delivery is unknown are kept for the
    /// next call; the first error is returned.
    fn push_pending(&mut self) -> Result<(), ClientError> {
        self.core.start_push();
        let started = Instant::now();
        let result = self.exchange();
        self.time.push_ns += nanos(started.elapsed());
        if let Err(e) = &result {
            if self.core.unsent() > 0 {
                tracing::warn!(rows = self.core.unsent(), error = %e, "push failed; rows kept for the next call");
            }
        }
        result
    }
}

/// Sends one round of requests, shards in parallel; the answers in the requests' order (a shard
/// that could not be reached: its push `Lost`, its read failed).
pub(super) fn send_round(
    cluster: &Cluster,
    table: &str,
    requests: &[ShardRequest<'_>],
) -> Vec<Answer> {
    let shards: Vec<usize> = requests.iter().map(|r| r.shard).collect();
    cluster
        .on_shards(&shards, |s, shard| {
            let r = requests
                .iter()
                .find(|r| r.shard == s)
                .expect("a request for every shard asked");
            Ok(send(table, r, shard))
        })
        .into_iter()
        .map(|a| a.unwrap_or_else(|e| (PushOutcome::Lost, StaleRows::default(), Err(e))))
        .collect()
}

/// Sends one request of the core to `shard`: the outcome of the rows it pushes (and the rows
/// the push produced), the rows read, and the read's result.
fn send(table: &str, r: &ShardRequest<'_>, shard: &dyn ShardTransport) -> Answer {
    let mut rows = StaleRows::default();
    match r.exchange(table) {
        Some(e) => {
            let c = shard.exchange(&e, &mut rows);
            (c.push, rows, c.read)
        }
        None => (PushOutcome::NotSent, rows, Ok(())),
    }
}
