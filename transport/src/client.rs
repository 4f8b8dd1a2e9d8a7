//! The client side of a shard transport: the operations of DESIGN section 6 as one interface,
//! carried by TCP, shared memory plus TCP, or RDMA plus TCP.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::{TableInfo, TableSpec};
use crate::wire::{
    CreateResponse, Endpoint, HelloResponse, PushResponse, RegionDescriptor, ShardStats, Since,
    Span, WireError,
};

/// Errors of a shard transport, naming the shard.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection failed or broke.
    #[error("shard {addr}: {source}")]
    Io {
        /// The shard's address.
        addr: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The shard answered with an error.
    #[error("shard {addr} refused the request: {error}")]
    Remote {
        /// The shard's address.
        addr: String,
        /// The error it sent.
        error: WireError,
    },
    /// The shard sent something that does not follow the protocol.
    #[error("shard {addr} broke the protocol: {message}")]
    Protocol {
        /// The shard's address.
        addr: String,
        /// What was wrong.
        message: String,
    },
    /// The request is not valid as asked (too large for one frame, mismatched lengths).
    #[error("invalid request to shard {addr}: {message}")]
    InvalidRequest {
        /// The shard's address.
        addr: String,
        /// What was wrong.
        message: String,
    },
}

impl TransportError {
    /// The error the shard sent, when it sent one.
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            Self::Remote { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Rows returned by a conditional pull.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StaleRows {
    /// Indices into the request's keys, ascending.
    pub indices: Vec<u32>,
    /// Server versions of those rows.
    pub versions: Vec<u64>,
    /// Their values, `indices.len() x dim`.
    pub rows: Vec<f32>,
    /// The table's clock on the shard, read before any row.
    pub table_clock: u64,
    /// Whether the request's `since` claim held (true when there was none).
    pub since_held: bool,
    /// Updates applied from the rows pushed with the request.
    pub pushed_updates: u64,
}

/// Rows to push with a conditional pull: `(key, count, gradient sum)`, grads keys x dim.
#[derive(Clone, Copy, Debug)]
pub struct PushRef<'a> {
    /// Keys.
    pub keys: &'a [u64],
    /// Update counts.
    pub counts: &'a [u32],
    /// Gradient sums.
    pub grads: &'a [f32],
}

/// Bytes a transport has moved, as it counts them (frame prefixes and headers included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes sent.
    pub sent: u64,
    /// Bytes received.
    pub received: u64,
}

/// Atomic traffic counters for transports shared by many threads.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl TrafficCounters {
    /// Counts `n` bytes sent.
    pub fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts `n` bytes received.
    pub fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn snapshot(&self) -> Traffic {
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// The last step of the verifying reader (DESIGN section 4) for the one-sided backends: the rows
/// of `keys`, whose copies kept tearing, are read with the `pull` RPC and written at
/// `positions` of `versions` and `rows` (`dim` values per row).
pub(crate) fn pull_into<C: ShardTransport + ?Sized>(
    control: &C,
    table: &str,
    keys: &[u64],
    positions: &[usize],
    dim: usize,
    versions: &mut [u64],
    rows: &mut [f32],
) -> Result<(), TransportError> {
    if keys.is_empty() {
        return Ok(());
    }
    let (mut v, mut r) = (Vec::new(), Vec::new());
    control.pull(table, keys, &mut v, &mut r)?;
    for (t, &n) in positions.iter().enumerate() {
        versions[n] = v[t];
        rows[n * dim..(n + 1) * dim].copy_from_slice(&r[t * dim..(t + 1) * dim]);
    }
    Ok(())
}

/// One shard as a client sees it. Implementations are shared by many threads (`&self`), and hold
/// no lock across network calls.
pub trait ShardTransport: Send + Sync {
    /// The shard's address, for messages.
    fn addr(&self) -> &str;
    /// What the shard said in its hello.
    fn hello(&self) -> &HelloResponse;
    /// The shard's tables.
    fn list_tables(&self) -> Result<Vec<TableInfo>, TransportError>;
    /// Creates a table (idempotent for an identical spec).
    fn create_table(&self, spec: &TableSpec) -> Result<CreateResponse, TransportError>;
    /// Describes a table's region on this shard.
    fn region_info(&self, table: &str) -> Result<RegionDescriptor, TransportError>;
    /// One-sided read of spans; `out` receives their bytes concatenated.
    fn read(&self, spans: &[Span], out: &mut Vec<u8>) -> Result<(), TransportError>;
    /// Consistent read: `versions` and `rows` (keys x dim) are replaced. Returns the table's
    /// clock on the shard, read before any row.
    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<u64, TransportError>;
    /// Rows whose server version exceeds `clocks[i] + bound`, or whose clock is
    /// [`crate::wire::NOT_CACHED`]; with `since`, the shard also says whether the claim about the
    /// checks not sent holds. Rows in `push` are applied first, all or nothing, in the same
    /// request.
    #[allow(clippy::too_many_arguments)]
    fn pull_if_stale(
        &self,
        table: &str,
        keys: &[u64],
        clocks: &[u64],
        bound: u64,
        since: Option<Since>,
        push: Option<PushRef<'_>>,
        out: &mut StaleRows,
    ) -> Result<(), TransportError>;
    /// Applies `(key, count, gradient sum)` rows; `grads` is keys x dim.
    fn push(
        &self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, TransportError>;
    /// The shard's counters and tables.
    fn stats(&self) -> Result<ShardStats, TransportError>;
    /// Bytes moved so far by this transport.
    fn traffic(&self) -> Traffic;
    /// Sends this side's RDMA endpoint to the shard, which connects a queue pair to it (held for
    /// the life of the connection that carried the request) and answers with its own.
    fn rdma_connect(&self, ours: &Endpoint) -> Result<Endpoint, TransportError> {
        let _ = ours;
        Err(TransportError::InvalidRequest {
            addr: self.addr().to_string(),
            message: "this transport cannot set up RDMA connections".into(),
        })
    }
}
