//! One worker's cached view of a table: the [`CacheCore`] driven over the cluster's transports.

use std::time::Instant;

use hetkv_transport::{Carried, PushOutcome, ShardTransport, StaleRows, Traffic, TransportError};

use crate::cache::{CacheConfig, CacheCore, RequestKind, ShardRequest};
use crate::cluster::Table;
use crate::metrics::{CacheStatsHandle, PublishedStats};
use crate::stats::{CacheStats, PhaseTimes};
use crate::ClientError;

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
    traffic_at_start: Traffic,
    time: PhaseTimes,
    published: CacheStatsHandle,
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
        let traffic_at_start = table.cluster().traffic();
        Self {
            table,
            core,
            traffic_at_start,
            time: PhaseTimes::default(),
            published: CacheStatsHandle::default(),
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
        });
    }

    /// Multiplies every gradient sum this cache pushes by `scale` (see
    /// [`CacheCore::set_push_scale`]: model averaging of parameters every worker updates).
    pub fn with_push_scale(mut self, scale: f32) -> Self {
        self.core.set_push_scale(scale);
        self
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
        let result = self.lookup_inner(keys, out, None);
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
        let result = self.lookup_inner(keys, out, Some(clocks));
        self.publish();
        result
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

    /// Sends what the core asks for, round after round (shards in parallel), and hands every
    /// answer back to it, until it asks for nothing more or a shard fails. Every push's outcome
    /// reaches the core, whatever else fails; the first failure is returned.
    fn exchange(&mut self) -> Result<(), ClientError> {
        let cluster = self.table.cluster().clone();
        let name = self.table.spec().name.as_str();
        loop {
            let requests = self.core.requests();
            if requests.is_empty() {
                return Ok(());
            }
            let shards: Vec<usize> = requests.iter().map(|r| r.shard).collect();
            let answers = cluster.on_shards(&shards, |s, shard| {
                let r = requests
                    .iter()
                    .find(|r| r.shard == s)
                    .expect("a request for every shard asked");
                Ok(send(name, r, shard))
            });
            let mut first_error: Option<ClientError> = None;
            for (&s, answer) in shards.iter().zip(answers) {
                let (push, read) = match answer {
                    Ok(a) => a,
                    Err(e) => (PushOutcome::Lost, Err(e)),
                };
                let incarnation = cluster.shard(s).incarnation();
                if let Err(e) = self.core.on_reply(s, push, read.as_ref().ok(), incarnation) {
                    first_error.get_or_insert(ClientError::InconsistentCluster(format!(
                        "{}: {e}",
                        cluster.shard(s).addr()
                    )));
                }
                if let Err(e) = read {
                    first_error.get_or_insert(e.into());
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
    }

    /// Applies one gradient row per key occurrence (`grads` is keys x dim): locally at once, and on
    /// the shards when a line's unpushed updates exceed the push bound or the key is not cached.
    /// Nothing changes if a value is NaN or infinite, a key is out of range, or the length is wrong.
    pub fn update(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), ClientError> {
        let started = Instant::now();
        self.core.update(keys, grads)?;
        self.time.update_ns += nanos(started.elapsed());
        let result = self.push_pending();
        self.publish();
        result
    }

    /// Pushes every unpushed update and returns when the shards have applied them (those the
    /// transports hold after a deadline included).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.core.flush();
        let mut result = self.push_pending();
        if result.is_ok() {
            let cluster = self.table.cluster();
            result = (0..cluster.shard_count())
                .try_for_each(|s| cluster.shard(s).settle())
                .map_err(ClientError::from);
        }
        self.publish();
        result
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

/// Sends one request of the core to `shard`: the outcome of the rows it pushes and the rows read.
fn send(
    table: &str,
    r: &ShardRequest<'_>,
    shard: &dyn ShardTransport,
) -> (PushOutcome, Result<StaleRows, TransportError>) {
    let mut rows = StaleRows::default();
    match r.kind {
        RequestKind::Push => match r.push {
            Some(p) => {
                let c = Carried::one_request(true, shard.push(table, p.keys, p.counts, p.grads));
                (c.push, c.read.map(|()| rows))
            }
            None => (PushOutcome::NotSent, Ok(rows)),
        },
        RequestKind::Pull => {
            let pulled = shard.pull(table, r.keys, &mut rows.versions, &mut rows.rows);
            let read = pulled.map(|clock| {
                rows.table_clock = clock;
                rows.indices = (0..r.keys.len() as u32).collect();
                rows.since_held = true;
                rows
            });
            (PushOutcome::NotSent, read)
        }
        RequestKind::PullIfStale => {
            let c = shard.pull_if_stale(&r.query(table), &mut rows);
            (c.push, c.read.map(|()| rows))
        }
    }
}
