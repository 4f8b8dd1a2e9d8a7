//! hetkv's client: a cluster of shards, routing of rows (row r lives on shard `r % S`), and
//! table handles for trainers.
//!
//! This crate never depends on the store: a trainer links the client alone.
//!
//! - [`Cluster`] and [`Table`]: routing and direct reads and writes (no cache: the classic
//!   parameter server).
//! - [`CachedTable`]: one worker's HET cache of a table, with per-key read and write staleness
//!   bounds (DESIGN section 5). Its logic is the sans-IO [`cache::CacheCore`].
//! - [`metrics`]: a cache's counters in a Prometheus registry of the trainer's.
//!
//! Threads: a [`Cluster`] and its [`Table`]s are `Send + Sync` and meant to be shared. Each shard
//! transport keeps a pool of connections; a call takes one connection per shard it touches, so
//! concurrent calls proceed in parallel and no lock is held across network I/O. A
//! [`CachedTable`] belongs to one worker thread (`&mut self`, as in HET, where each worker has its
//! own cache): no locks at all on the lookup path. Workers of one process share the cluster's
//! connection pools, and the shards' versions keep their caches within the bounds of each other.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod barrier;
pub mod cache;
mod cluster;
pub mod metrics;
mod rdma_backend;
pub mod stats;

pub use barrier::CheckpointBarrier;
pub use cache::{
    lookup_many, prefetch_many, update_many, Bound, CacheConfig, CachedTable, Capacity, PolicyKind,
    UpdateRule, UpdateRuleKind,
};
pub use cluster::{
    shard_addrs, Cluster, OnRollback, PushReport, RowsWithState, Table, TransportKind,
};
pub use stats::{CacheStats, PhaseTimes};

use hetkv_transport::TransportError;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A shard failed or refused.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A key outside `[0, rows)`.
    #[error("key {key} is outside table {table} of {rows} rows")]
    KeyOutOfRange {
        /// Table name.
        table: String,
        /// The key.
        key: u64,
        /// The table's rows.
        rows: u64,
    },
    /// A buffer whose length does not match keys x dim.
    #[error("table {table} has dim {dim}: a buffer of {len} values does not fit {keys} keys")]
    WrongDim {
        /// Table name.
        table: String,
        /// Table dim.
        dim: usize,
        /// Keys given.
        keys: usize,
        /// Values given.
        len: usize,
    },
    /// The transport asked for cannot work here.
    #[error("transport unavailable: {0}")]
    TransportUnavailable(String),
    /// No shard holds a table of that name.
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    /// The cache refused the call before changing anything.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// The shards disagree (indices, counts, or table specs).
    #[error("inconsistent cluster: {0}")]
    InconsistentCluster(String),
    /// The prefetch thread could not be started, or is gone.
    #[error("prefetch: {0}")]
    Prefetch(String),
    /// A value refused before anything was sent: NaN or infinite, or an update count of 0.
    #[error("table {table}, key {key}: {what}; nothing was applied")]
    InvalidValue {
        /// Table name.
        table: String,
        /// The key whose row holds it.
        key: u64,
        /// What is wrong.
        what: String,
    },
    /// An assignment whose values or state do not make its rows (see
    /// [`hetkv_transport::codec::assign::Assignment::check`]).
    #[error("table {table}: {what}; nothing was assigned")]
    InvalidAssignment {
        /// Table name.
        table: String,
        /// What does not fit.
        what: String,
    },
    /// A write spanning shards that some applied and others did not (unreachable, or refusing
    /// for a reason only they could see): what each did.
    #[error("table {table}: {applied}; failed: {failed}")]
    PartlyApplied {
        /// Table name.
        table: String,
        /// The shards that applied their rows, and how many.
        applied: String,
        /// The shards that failed, with their errors.
        failed: String,
    },
    /// A shard restarted from a checkpoint that lacks pushes it had acknowledged to this client:
    /// the model lost those updates (`Cluster::restarts` has the account). Reported once per
    /// rollback by the call that learnt of it, after its own work; see [`OnRollback`] to go on
    /// without the error.
    #[error(
        "a shard restarted from a checkpoint that lacks {pushes} pushes it had acknowledged ({total_pushes} pushes, \
         {total_rows} rows rolled back by restarts so far): those updates are lost; the next \
         call goes on"
    )]
    RolledBack {
        /// Acknowledged pushes taken back since the last report.
        pushes: u64,
        /// Acknowledged pushes taken back by restarts so far, in all.
        total_pushes: u64,
        /// Their rows.
        total_rows: u64,
    },
    /// Caches given to [`lookup_many`] or [`update_many`] that cannot go together (of another
    /// cluster connection, one given twice, inputs not one a cache).
    #[error("caches driven together: {0}")]
    InvalidGroup(String),
    /// A cluster named by a pattern that names no shard ([`shard_addrs`]).
    #[error("cluster {pattern:?}: {what}")]
    ClusterName {
        /// The pattern.
        pattern: String,
        /// What is wrong with it.
        what: String,
    },
    /// The cluster was closed ([`Cluster::close`]).
    #[error("the cluster was closed")]
    Closed,
    /// A checkpoint barrier's flush or checkpoint failed (the message of the first failure).
    #[error("checkpoint failed: {0}")]
    CheckpointFailed(String),
}
