//! The client side of a shard transport: the operations of DESIGN section 6 as one interface,
//! carried by TCP, shared memory plus TCP, or RDMA plus TCP.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::{TableInfo, TableSpec};
use crate::wire::{
    CheckpointResponse, CreateResponse, Endpoint, HelloResponse, PushResponse, RegionDescriptor,
    ShardStats, Since, Span, WireError,
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
    /// A numbered push whose delivery was still unknown at the call's deadline (the connection
    /// failed or stalled after it was sent): the transport holds the request and sends it again,
    /// under the same number, before its next request to the shard and at
    /// [`ShardTransport::settle`], so that it is applied exactly once. Do not push its rows again.
    #[error(
        "shard {addr}: {source}; the push is held and will be sent again under its number (do \
         not send its rows again)"
    )]
    Held {
        /// The shard's address.
        addr: String,
        /// The last I/O error.
        #[source]
        source: io::Error,
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
    /// Pushes given up with their fate unknown since the last [`ShardTransport::settle`]: the
    /// shard could no longer say whether it applied them (their number was below what it
    /// remembers), or their answer could not be read. They were never sent again.
    #[error(
        "shard {addr}: {pushes} pushes ({rows} rows) of unknown fate: the shard may or may not \
         have applied them, and they were not sent again"
    )]
    Unknown {
        /// The shard's address.
        addr: String,
        /// Pushes.
        pushes: u64,
        /// Their rows.
        rows: u64,
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

    /// The same error again, for each of several requests that one failure ended (the
    /// requests of a batch): an I/O error keeps its kind and message.
    pub fn again(&self) -> Self {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Self::Io { addr, source } => Self::Io {
                addr: addr.clone(),
                source: io(source),
            },
            Self::Held { addr, source } => Self::Held {
                addr: addr.clone(),
                source: io(source),
            },
            Self::Remote { addr, error } => Self::Remote {
                addr: addr.clone(),
                error: error.clone(),
            },
            Self::Protocol { addr, message } => Self::Protocol {
                addr: addr.clone(),
                message: message.clone(),
            },
            Self::InvalidRequest { addr, message } => Self::InvalidRequest {
                addr: addr.clone(),
                message: message.clone(),
            },
            Self::Unknown { addr, pushes, rows } => Self::Unknown {
                addr: addr.clone(),
                pushes: *pushes,
                rows: *rows,
            },
        }
    }
}

/// The optimizer state of rows as a shard hands it out beside them
/// ([`crate::optimizer::StateShape`]): `len` f32 values a row and, for optimizers that count
/// steps, one u64 a row. Each row's state is of the same moment as its value and version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowStates {
    /// Values, rows x the shape's `len`.
    pub values: Vec<f32>,
    /// Step counts, one a row (empty unless the optimizer counts steps).
    pub steps: Vec<u64>,
}

impl RowStates {
    /// Empties them, keeping their buffers.
    pub fn clear(&mut self) {
        self.values.clear();
        self.steps.clear();
    }
}

/// Rows a push produced and handed back: those whose version before the push was not the base
/// version the pusher sent ([`crate::wire::PushRequest::bases`]), each with its new version and
/// optimizer state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Produced {
    /// Indices into the push's rows, ascending.
    pub indices: Vec<u32>,
    /// The rows' versions after the push.
    pub versions: Vec<u64>,
    /// Their values, `indices.len() x dim`.
    pub rows: Vec<f32>,
    /// Their optimizer state.
    pub states: RowStates,
    /// A dynamic table's: each row's birth stamp (the incarnation of its key; 0 for a key not
    /// held). Empty for a fixed table.
    pub births: Vec<u64>,
    /// A dynamic table's `push`: the indices (into the push's rows, ascending) of the rows whose
    /// key it did not admit, their updates dropped. Empty otherwise, and for a push acknowledged
    /// as a repeat (what it refused was reported the first time).
    pub refused: Vec<u32>,
}

impl Produced {
    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.indices.clear();
        self.versions.clear();
        self.rows.clear();
        self.states.clear();
        self.births.clear();
        self.refused.clear();
    }

    /// Rows handed back.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
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
    /// The optimizer state of the returned rows whose index is below the query's `state_keys`:
    /// the first ones, since indices ascend.
    pub states: RowStates,
    /// The table's clock on the shard, read before any row.
    pub table_clock: u64,
    /// Whether the request's `since` claim held (true when there was none).
    pub since_held: bool,
    /// The rows the query's push produced and handed back (when the push was applied).
    pub produced: Produced,
    /// A dynamic table's (the query sent `births`): each returned row's birth stamp. Empty
    /// otherwise.
    pub births: Vec<u64>,
    /// The incarnation of the daemon these rows and this clock are of: the answer's (its frame
    /// head), or for a one-sided read the incarnation whose memory was read. 0 where unknown.
    /// A cache never takes rows or a clock of an incarnation other than the one its push was
    /// applied by.
    pub incarnation: u64,
}

impl StaleRows {
    /// Completes the answer of a consistent read of `keys` keys (whose versions and rows are
    /// in): every row comes back, the table's clock and incarnation as `pulled` says.
    pub fn pulled(&mut self, pulled: Pulled, keys: usize) {
        self.incarnation = pulled.incarnation;
        self.table_clock = pulled.clock;
        self.indices.extend(0..keys as u32);
        self.since_held = true;
    }

    /// Empties the answer, keeping its buffers.
    pub fn clear(&mut self) {
        self.indices.clear();
        self.versions.clear();
        self.rows.clear();
        self.states.clear();
        self.table_clock = 0;
        self.since_held = false;
        self.produced.clear();
        self.births.clear();
        self.incarnation = 0;
    }
}

/// A conditional pull (DESIGN section 5): the rows of `keys` whose server version exceeds
/// `clocks[i] + bound` ([`crate::wire::is_stale`]), with rows pushed first in the same call.
#[derive(Clone, Copy, Debug)]
pub struct StaleQuery<'a> {
    /// Table name.
    pub table: &'a str,
    /// Keys, all of this shard.
    pub keys: &'a [u64],
    /// The client's clock of each key, or [`crate::wire::NOT_CACHED`].
    pub clocks: &'a [u64],
    /// A dynamic table's: the birth stamp of each key's line (0: none, or a key not held); a
    /// key held under another stamp comes back whatever its version.
    pub births: Option<&'a [u64]>,
    /// The staleness bound (`u64::MAX`: cached rows never come back).
    pub bound: u64,
    /// A claim about the checks the client did not send, for the shard to verify.
    pub since: Option<Since>,
    /// Rows to apply, all or nothing, before the table clock and any row are read.
    pub push: Option<PushRef<'a>>,
    /// The first `state_keys` keys also want their optimizer state with their rows.
    pub state_keys: u32,
}

/// What became of rows pushed with a read, reported apart from the read's own result: a read that
/// fails after its push was applied must not make the caller push the rows again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// The call pushed nothing.
    NotSent,
    /// The shard applied the rows.
    Applied(PushResponse),
    /// The shard refused the rows, and applied none of them; it would refuse them again.
    Refused,
    /// The rows were not delivered, or their acknowledgement was lost: the shard may or may not
    /// have applied them. A caller that sends them again risks applying them twice.
    Lost,
    /// Their delivery was unknown at the deadline and the transport holds the request: it sends
    /// it again under its number until the shard answers ([`TransportError::Held`]), so the rows
    /// are applied exactly once. The caller must not send them again.
    Held,
    /// The shard may or may not have applied them, and no one can tell any more: the transport
    /// gave them up and reports them at its next [`ShardTransport::settle`]. The caller must not
    /// send them again (that could apply them twice).
    Unknown,
}

impl PushOutcome {
    /// The outcome of a push whose request failed with `error`.
    pub fn failed(error: &TransportError) -> Self {
        match error {
            // The shard no longer knows whether it applied the push, or its answer could not be
            // read: the transport gave it up and reports it at `settle`; sending its rows again
            // could apply them twice.
            TransportError::Remote { error, .. }
                if error.code == crate::wire::ErrorCode::SequenceForgotten =>
            {
                Self::Unknown
            }
            // Not applied, for want of room to remember its number: it may go again later.
            TransportError::Remote { error, .. }
                if error.code == crate::wire::ErrorCode::SessionsFull =>
            {
                Self::Lost
            }
            TransportError::Remote { .. } | TransportError::InvalidRequest { .. } => Self::Refused,
            TransportError::Io { .. } => Self::Lost,
            TransportError::Protocol { .. } | TransportError::Unknown { .. } => Self::Unknown,
            TransportError::Held { .. } => Self::Held,
        }
    }
}

/// The result of a call that may carry a push: the push's outcome and the read's result apart.
/// When anything failed, `read` holds the error.
#[must_use = "the push outcome says whether the pushed rows were applied"]
#[derive(Debug)]
pub struct Carried {
    /// What became of the rows pushed with the call.
    pub push: PushOutcome,
    /// The read's result.
    pub read: Result<(), TransportError>,
}

impl Carried {
    /// A call whose push and read travelled in one request, which ended with `result` (the
    /// acknowledgement of the pushed rows when it succeeded); `carried_rows` says whether it
    /// pushed any.
    pub fn one_request(carried_rows: bool, result: Result<PushResponse, TransportError>) -> Self {
        let push = match (&result, carried_rows) {
            (_, false) => PushOutcome::NotSent,
            (Ok(ack), true) => PushOutcome::Applied(*ack),
            (Err(e), true) => PushOutcome::failed(e),
        };
        Self {
            push,
            read: result.map(|_| ()),
        }
    }

    /// The read's result, for callers that pushed nothing.
    pub fn into_result(self) -> Result<(), TransportError> {
        self.read
    }
}

/// Rows to push: `(key, count, gradient sum)`, grads keys x dim, and optionally each row's base
/// version (the pusher's copy's version before this push, or [`crate::wire::NO_BASE`]): where
/// the shard's row was at another version, the shard hands back the row it produced.
#[derive(Clone, Copy, Debug)]
pub struct PushRef<'a> {
    /// Keys.
    pub keys: &'a [u64],
    /// Update counts.
    pub counts: &'a [u32],
    /// Gradient sums.
    pub grads: &'a [f32],
    /// Base versions, one a row, when the pusher wants produced rows back.
    pub bases: Option<&'a [u64]>,
}

impl<'a> PushRef<'a> {
    /// Rows without base versions (nothing is handed back).
    pub fn new(keys: &'a [u64], counts: &'a [u32], grads: &'a [f32]) -> Self {
        Self {
            keys,
            counts,
            grads,
            bases: None,
        }
    }

    /// Whether the lengths agree with one another (the dim is the shard's to check).
    pub fn lengths_agree(&self) -> bool {
        self.keys.len() == self.counts.len()
            && self.bases.is_none_or(|b| b.len() == self.keys.len())
    }
}

/// What a client has seen of one shard's restarts (new incarnations), and what each cost it.
///
/// After a restart from a checkpoint, the pushes the previous incarnation acknowledged after
/// that checkpoint are gone from the shard: the client counts them by comparing the numbers it
/// saw acknowledged with those the new incarnation remembers applying (its hello's answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Restarts {
    /// New incarnations seen after the first.
    pub seen: u64,
    /// Acknowledged pushes that the new incarnation does not hold (rolled back by the restart).
    pub pushes_rolled_back: u64,
    /// Their rows.
    pub rows_rolled_back: u64,
    /// Acknowledged pushes older than what the new incarnation remembers of this client: whether
    /// it holds them is unknown.
    pub pushes_unknown: u64,
}

impl Restarts {
    /// The sum of two reports (several shards').
    pub fn plus(&self, o: &Restarts) -> Restarts {
        Restarts {
            seen: self.seen + o.seen,
            pushes_rolled_back: self.pushes_rolled_back + o.pushes_rolled_back,
            rows_rolled_back: self.rows_rolled_back + o.rows_rolled_back,
            pushes_unknown: self.pushes_unknown + o.pushes_unknown,
        }
    }
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
/// `positions` of `versions` and `rows` (`dim` values per row). Returns what the pull answered
/// (None when no key was left to pull): the caller compares its incarnation with the one whose
/// memory it read the other rows from.
pub(crate) fn pull_into<C: ShardTransport + ?Sized>(
    control: &C,
    table: &str,
    keys: &[u64],
    positions: &[usize],
    dim: usize,
    versions: &mut [u64],
    rows: &mut [f32],
) -> Result<Option<Pulled>, TransportError> {
    if keys.is_empty() {
        return Ok(None);
    }
    let (mut v, mut r) = (Vec::new(), Vec::new());
    let pulled = control.pull(table, keys, &mut v, &mut r)?;
    for (t, &n) in positions.iter().enumerate() {
        versions[n] = v[t];
        rows[n * dim..(n + 1) * dim].copy_from_slice(&r[t * dim..(t + 1) * dim]);
    }
    Ok(Some(pulled))
}

/// One data request to a shard, as one of a batch ([`ShardTransport::exchange_batch`]) or
/// alone ([`ShardTransport::exchange`]); its answer is a [`Carried`] and a [`StaleRows`].
#[derive(Clone, Copy, Debug)]
pub enum Exchange<'a> {
    /// A consistent read of `keys` of `table` ([`ShardTransport::pull`]): every row comes back
    /// (`indices` 0, 1, ...), the claim-free way.
    Pull {
        /// Table name.
        table: &'a str,
        /// Keys.
        keys: &'a [u64],
    },
    /// A conditional pull, with the push it carries ([`ShardTransport::pull_if_stale`]).
    PullIfStale(StaleQuery<'a>),
    /// Rows to apply ([`ShardTransport::push_rows`]); what they produced comes back in the
    /// answer's `produced`.
    Push {
        /// Table name.
        table: &'a str,
        /// The rows.
        rows: PushRef<'a>,
    },
}

impl Exchange<'_> {
    /// The table the request is of.
    pub fn table(&self) -> &str {
        match self {
            Self::Pull { table, .. } | Self::Push { table, .. } => table,
            Self::PullIfStale(q) => q.table,
        }
    }

    /// Whether the request carries pushed rows.
    pub fn pushes(&self) -> bool {
        match self {
            Self::Pull { .. } => false,
            Self::PullIfStale(q) => q.push.is_some(),
            Self::Push { .. } => true,
        }
    }
}

/// What a consistent read ([`ShardTransport::pull`]) answered besides its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pulled {
    /// The table's clock on the shard, read before any row.
    pub clock: u64,
    /// The incarnation of the daemon whose memory the rows were read from: the answer's own,
    /// never what the transport heard last (0: a transport that has no daemon behind it).
    pub incarnation: u64,
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
    /// Drops a table on this shard; whether the shard held it.
    fn drop_table(&self, table: &str) -> Result<bool, TransportError> {
        Err(TransportError::Remote {
            addr: self.addr().to_string(),
            error: WireError::new(
                crate::wire::ErrorCode::Unsupported,
                format!("this transport drops no table (table {table})"),
            ),
        })
    }
    /// One-sided read of spans; `out` receives their bytes concatenated.
    fn read(&self, spans: &[Span], out: &mut Vec<u8>) -> Result<(), TransportError>;
    /// Consistent read: `versions` and `rows` (keys x dim) are replaced. Returns the table's
    /// clock on the shard, read before any row, and the incarnation the rows are of.
    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<Pulled, TransportError>;
    /// The rows of `query` that are stale ([`crate::wire::is_stale`]); with a `since` claim, the
    /// shard also says whether the claim about the checks not sent holds. Rows in the query's
    /// `push` are applied first, all or nothing; their outcome is reported apart from the read's.
    fn pull_if_stale(&self, query: &StaleQuery<'_>, out: &mut StaleRows) -> Carried;
    /// Applies `(key, count, gradient sum)` rows, all or nothing; where the rows carry base
    /// versions, `produced` is replaced by the rows the shard hands back (cleared otherwise).
    fn push_rows(
        &self,
        table: &str,
        rows: &PushRef<'_>,
        produced: &mut Produced,
    ) -> Result<PushResponse, TransportError>;
    /// Applies `(key, count, gradient sum)` rows; `grads` is keys x dim.
    fn push(
        &self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, TransportError> {
        let mut produced = Produced::default();
        self.push_rows(table, &PushRef::new(keys, counts, grads), &mut produced)
    }
    /// Sets rows, all or nothing: their values (or keeps them) and their optimizer state
    /// (reset, kept or set), each row's version growing by one (imports, warm starts, a model's
    /// or an optimizer's state loaded).
    fn assign(
        &self,
        table: &str,
        rows: &crate::codec::assign::Assignment<'_>,
    ) -> Result<PushResponse, TransportError>;
    /// Asks the shard to write checkpoint `name` of all its tables into its data directory
    /// (docs/CHECKPOINTS.md); returns when it is committed.
    fn checkpoint(
        &self,
        name: &str,
        incremental: bool,
    ) -> Result<CheckpointResponse, TransportError>;
    /// The shard's counters and tables.
    fn stats(&self) -> Result<ShardStats, TransportError>;
    /// The held rows of dynamic table `table` (of dim `dim`) in slots `[from, from + slots)` of
    /// this shard ([`crate::wire::ScanRequest`]).
    fn scan(
        &self,
        table: &str,
        dim: u32,
        from: u64,
        slots: u32,
    ) -> Result<crate::codec::scan::Scanned, TransportError> {
        let _ = (dim, from, slots);
        Err(TransportError::Remote {
            addr: self.addr().to_string(),
            error: WireError::new(
                crate::wire::ErrorCode::Unsupported,
                format!("this transport scans no table (table {table})"),
            ),
        })
    }
    /// Up to `max` evictions of dynamic table `table` on this shard from `cursor`
    /// ([`crate::wire::EvictionsRequest`]).
    fn evictions(
        &self,
        table: &str,
        cursor: u64,
        max: u32,
    ) -> Result<crate::wire::EvictionsResponse, TransportError> {
        let _ = (cursor, max);
        Err(TransportError::Remote {
            addr: self.addr().to_string(),
            error: WireError::new(
                crate::wire::ErrorCode::Unsupported,
                format!("this transport reads no eviction stream (table {table})"),
            ),
        })
    }
    /// Moves dynamic table `table`'s training step on this shard to `step`, expiring the rows
    /// its time to live no longer covers ([`crate::wire::AdvanceStepRequest`]).
    fn advance_step(
        &self,
        table: &str,
        step: u64,
    ) -> Result<crate::wire::AdvanceStepResponse, TransportError> {
        let _ = step;
        Err(TransportError::Remote {
            addr: self.addr().to_string(),
            error: WireError::new(
                crate::wire::ErrorCode::Unsupported,
                format!("this transport moves no training step (table {table})"),
            ),
        })
    }
    /// Sends one data request and writes its answer into `out` (cleared first): the one
    /// mapping of an [`Exchange`] onto this trait's calls.
    fn exchange(&self, request: &Exchange<'_>, out: &mut StaleRows) -> Carried {
        out.clear();
        match *request {
            Exchange::Pull { table, keys } => {
                let pulled = self.pull(table, keys, &mut out.versions, &mut out.rows);
                let read = pulled.map(|pulled| out.pulled(pulled, keys.len()));
                Carried {
                    push: PushOutcome::NotSent,
                    read,
                }
            }
            Exchange::PullIfStale(q) => self.pull_if_stale(&q, out),
            Exchange::Push { table, rows } => {
                Carried::one_request(true, self.push_rows(table, &rows, &mut out.produced))
            }
        }
    }

    /// Sends several data requests, of any tables, and writes each one's answer into its
    /// `outs` entry; returns each one's outcome, in order. Each is carried out on its own, as
    /// if sent alone (pushes numbered one by one, each applied exactly once); a transport that
    /// can carries them in one frame (`Batch`, one round trip), the others send them one after
    /// another.
    fn exchange_batch(&self, requests: &[Exchange<'_>], outs: &mut [StaleRows]) -> Vec<Carried> {
        requests
            .iter()
            .zip(outs.iter_mut())
            .map(|(r, out)| self.exchange(r, out))
            .collect()
    }
    /// Bytes moved so far by this transport.
    fn traffic(&self) -> Traffic;
    /// The incarnation of the shard's daemon in the latest answer (0 before any): it changes
    /// when the daemon restarts (ARCHITECTURE, "Restarts").
    fn incarnation(&self) -> u64;
    /// What this client has seen of the shard's restarts.
    fn restarts(&self) -> Restarts {
        Restarts::default()
    }
    /// Delivers every push this transport holds ([`PushOutcome::Held`]); fails while the shard
    /// still cannot be reached.
    fn settle(&self) -> Result<(), TransportError> {
        Ok(())
    }
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
