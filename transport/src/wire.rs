//! The wire format shared by every transport's control channel (byte-level spec in
//! `docs/PROTOCOL.md`).
//!
//! ```text
//! u32 LE   body_len     bytes after this field; refused above the configured maximum, before any
//!                       allocation
//! u8       op           Op (requests); responses echo the request's op
//! u8       status       0 = ok, 1 = error (the header is then a WireError)
//! u16 LE   reserved     0
//! u32 LE   header_len   <= body_len - head, <= MAX_HEADER (requests), <= MAX_RESPONSE_HEADER
//!                       (responses)
//! u64 LE   incarnation  responses only: the answering daemon's incarnation (random per start)
//! [header_len]          header: bincode 2, standard config, through serde
//! [rest]                payload: raw little-endian arrays (keys, clocks, counts, rows, gradients)
//! ```
//!
//! bincode is confined to this module (`start_frame`, `decode_header` and
//! `decode_response_header`): it is pinned at
//! `=2.0.1` and unmaintained, so nothing else names it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::spec::{TableInfo, TableSpec};

/// Version of this protocol. A hello with another version is refused.
pub const PROTOCOL_VERSION: u32 = 13;
/// Magic bytes at the start of every hello.
pub const MAGIC: [u8; 4] = *b"HTKV";
/// Length of the frame prefix (`body_len`).
pub const PREFIX_BYTES: usize = 4;
/// Fixed part of a request body before the header: op, status, reserved, header_len.
pub const HEAD_BYTES: usize = 8;
/// Fixed part of a response body before the header: a request's head, then the answering
/// daemon's incarnation (u64).
pub const RESPONSE_HEAD_BYTES: usize = HEAD_BYTES + 8;
/// Largest header of a request (requests' headers are small: names, counts, specs); also the
/// limit a daemon decodes any header with.
pub const MAX_HEADER: usize = 64 << 10;
/// Largest header of a response a client accepts: the answers that list a shard's tables (and
/// their statistics) grow with the number of tables, which a daemon bounds (`--max-tables`).
pub const MAX_RESPONSE_HEADER: usize = 64 << 20;
/// Default largest frame body, in bytes.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;
/// Bytes of one span in a read request: region u32, len u32, offset u64.
pub const SPAN_BYTES: usize = 16;

/// Operations (DESIGN section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Op {
    /// Handshake: protocol version and optional auth. Must be the first frame.
    Hello = 1,
    /// The tables this shard holds.
    ListTables = 2,
    /// Create a table (idempotent for an identical spec).
    CreateTable = 3,
    /// Where a table's region is and how it is laid out.
    RegionInfo = 4,
    /// Emulated one-sided read of (region, offset, len) spans.
    Read = 5,
    /// Server-side consistent read of rows.
    Pull = 6,
    /// Rows whose version exceeds the client's clock plus the bound.
    PullIfStale = 7,
    /// Apply (key, count, gradient sum) rows with the table's optimizer.
    Push = 8,
    /// Counters and tables.
    Stats = 9,
    /// Exchange RDMA queue-pair endpoints; the daemon's queue pair lives as long as this
    /// connection.
    RdmaConnect = 10,
    /// Ask for a nonce to authenticate the hello with (may precede the hello).
    Challenge = 11,
    /// Write a checkpoint of every table of the shard into its data directory.
    Checkpoint = 12,
    /// Set rows' values, optimizer state or both (an import, a warm start, a model's or an
    /// optimizer's state loaded): each row's version grows by one.
    Assign = 13,
    /// A page of a dynamic table's eviction stream on this shard, from a cursor.
    Evictions = 14,
    /// A dynamic table's held rows on this shard in a range of slots, with their keys.
    Scan = 15,
    /// Several data requests (`Pull`, `PullIfStale`, `Push`; of any tables) in one frame,
    /// answered by one frame holding each one's answer in order ([`crate::codec::batch`]).
    Batch = 16,
    /// Drop a table: its rows, state and region go; its name may be created again.
    DropTable = 17,
    /// Move a dynamic table's training step on this shard, expiring the rows its time to live
    /// no longer covers.
    AdvanceStep = 18,
}

impl Op {
    /// Decodes an op byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::ListTables,
            3 => Self::CreateTable,
            4 => Self::RegionInfo,
            5 => Self::Read,
            6 => Self::Pull,
            7 => Self::PullIfStale,
            8 => Self::Push,
            9 => Self::Stats,
            10 => Self::RdmaConnect,
            11 => Self::Challenge,
            12 => Self::Checkpoint,
            13 => Self::Assign,
            14 => Self::Evictions,
            15 => Self::Scan,
            16 => Self::Batch,
            17 => Self::DropTable,
            18 => Self::AdvanceStep,
            _ => return None,
        })
    }
}

/// Status byte of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The header is the op's response.
    Ok = 0,
    /// The header is a [`WireError`].
    Error = 1,
}

/// Error classes carried to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame that does not follow the format (bad lengths, undecodable header or payload).
    MalformedFrame,
    /// A frame larger than the receiver's maximum.
    FrameTooLarge,
    /// An op byte this daemon does not know.
    UnknownOp,
    /// The first frame was not a valid hello.
    HandshakeRequired,
    /// The peer speaks another protocol version.
    ProtocolVersion,
    /// Authentication failed.
    Unauthorized,
    /// No table of that name.
    UnknownTable,
    /// A table of that name exists with another spec.
    ConflictingTable,
    /// A spec that fails validation, or exceeds this daemon's limits.
    InvalidSpec,
    /// Rows or gradients whose length is not a multiple of the table's dim.
    WrongDim,
    /// A key outside `[0, rows)`, or one that does not live on this shard.
    KeyOutOfRange,
    /// A gradient with NaN or Inf, or a count of zero.
    InvalidGradient,
    /// A read span outside its region, or naming no region.
    InvalidSpan,
    /// The daemon failed (I/O, resources).
    Internal,
    /// The daemon cannot do this (an RDMA connect to a daemon without an RDMA device).
    Unsupported,
    /// A checkpoint could not be written (no data directory, a taken name, one already being
    /// written, an I/O error such as a full disk); nothing committed was lost.
    CheckpointFailed,
    /// A push's sequence number is older than what the shard remembers of its client: whether
    /// it was applied is unknown (the client reports it as lost, never as refused).
    SequenceForgotten,
    /// The shard's memory of push numbers is full (a stream spans too many unsettled numbers, or
    /// all streams together fill the shard's budget): nothing was applied; send it again later.
    SessionsFull,
}

/// An error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// The class.
    pub code: ErrorCode,
    /// A message for people.
    pub message: String,
}

impl WireError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

/// Hello request header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HelloRequest {
    /// Must be [`MAGIC`].
    pub magic: [u8; 4],
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// HMAC-SHA256(token, nonce) over the nonce of this connection's challenge, when the daemon
    /// requires a token ([`crate::auth`]).
    pub auth: Option<[u8; 32]>,
    /// Free text naming the client, for logs.
    pub client: String,
    /// The id in the origins of this client's pushes ([`Origin::client`]), when it numbers
    /// them: the hello's answer then says which of its pushes the shard remembers applying.
    pub client_id: Option<u64>,
}

pub use crate::pushes::AppliedPushes;

/// Challenge response header: the nonce a hello on this connection must answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// Fresh random bytes, spent by the next hello.
    pub nonce: [u8; 32],
}

/// Hello response header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloResponse {
    /// The daemon's protocol version.
    pub version: u32,
    /// This shard's index.
    pub shard: u32,
    /// The number of shards in its cluster.
    pub shards: u32,
    /// Largest frame body the daemon accepts.
    pub max_frame: u32,
    /// Free text naming the daemon build.
    pub server: String,
    /// The directory under which this daemon exposes its regions as shared-memory files, when it
    /// does. Its name carries a random instance id, so a client that finds it is on the daemon's
    /// host.
    pub shm_dir: Option<String>,
    /// This daemon's incarnation: random, fresh at every start (and so at every restore). Every
    /// response's head carries it too; a client that sees it change knows the shard restarted.
    pub incarnation: u64,
    /// What the shard remembers of the pushes of the hello's `client_id` (`None` when the hello
    /// named none, or the shard knows nothing of that client).
    pub pushes: Option<AppliedPushes>,
}

/// One side of an RDMA RC connection: what the other side needs to reach its queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Port GID (RoCE; may be zero on InfiniBand).
    pub gid: [u8; 16],
    /// Active path MTU (`ibv_mtu` value).
    pub mtu: u32,
}

/// Header naming a table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableRequest {
    /// Table name.
    pub table: String,
}

/// Drop-table response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropResponse {
    /// Whether this shard held the table (false: nothing to drop, as after an earlier drop).
    pub dropped: bool,
}

/// The bit of a table's clock word that says the table was dropped (its region and clock word
/// are no longer the table's, whatever their other bits hold): a one-sided reader that finds it
/// reads nothing more of that table and reports it unknown. A clock never reaches it by counting.
pub const DROPPED_CLOCK: u64 = 1 << 63;

/// Create-table response header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateResponse {
    /// The table as held.
    pub info: TableInfo,
    /// False when an identical table already existed.
    pub created: bool,
}

/// Create-table request header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The spec.
    pub spec: TableSpec,
}

/// List-tables response header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TablesResponse {
    /// Tables in creation order.
    pub tables: Vec<TableInfo>,
}

/// Where one table's region is on one shard (what a one-sided reader needs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDescriptor {
    /// Region id on this shard, used in read spans.
    pub region: u32,
    /// Table name.
    pub table: String,
    /// Row dimension.
    pub dim: u32,
    /// Bytes between rows.
    pub stride: u32,
    /// Rows in the region.
    pub rows: u64,
    /// The table's placement buckets: with the shard count, where each key's row is
    /// ([`Routing`](crate::Routing)).
    pub buckets: u32,
    /// Whether the region is a dynamic table's: buckets of key digests, then keyed rows
    /// ([`crate::keyed`]), `rows` being its slots; keys are then placed by their hashed bucket.
    pub keyed: bool,
    /// Length in bytes.
    pub len: u64,
    /// Virtual address in the daemon (for RDMA READ).
    pub addr: u64,
    /// Remote key, when registered with an RDMA device; 0 otherwise.
    pub rkey: u32,
    /// Path of the region file, when the daemon exposes it through shared memory.
    pub shm_path: Option<String>,
    /// Virtual address of the table's clock word (one u64: updates applied on this shard) in the
    /// daemon, for RDMA READ.
    pub clock_addr: u64,
    /// Remote key of the clock word's registration; 0 when not registered.
    pub clock_rkey: u32,
    /// Path of the clock word's file, when the daemon exposes it through shared memory.
    pub clock_shm_path: Option<String>,
    /// The incarnation of the daemon that described the region, from the answer's frame head.
    /// Not encoded in this header: the transport that decoded the answer fills it in (0 where
    /// none did).
    #[serde(skip)]
    pub incarnation: u64,
}

impl RegionDescriptor {
    /// Where the described table's rows live in a cluster of `shards` shards (a batch's local
    /// rows come from one: [`Routing::local_on`](crate::Routing::local_on) with this region's
    /// `rows`).
    pub fn routing(&self, shards: u32) -> crate::Routing {
        match self.keyed {
            false => crate::Routing::new(shards, self.buckets),
            true => crate::Routing::hashed(shards, self.buckets),
        }
    }

    /// The keyed layout of a dynamic table's region on shard `shard` of `shards`, after the
    /// checks of [`RegionDescriptor::check_layout`] and that `rows` is a whole number of region
    /// buckets for each placement bucket the shard owns; `None` for a fixed table's region.
    pub fn check_keyed_layout(
        &self,
        shard: u32,
        shards: u32,
    ) -> Result<Option<crate::keyed::KeyedLayout>, String> {
        if !self.keyed {
            return Ok(None);
        }
        self.check_layout()?;
        let routing = self.routing(shards);
        let slots = u64::from(routing.buckets_on(shard)) * crate::keyed::BUCKET_SLOTS as u64;
        if slots == 0 || self.rows == 0 || !self.rows.is_multiple_of(slots) {
            return Err(format!(
                "{} slots are not whole region buckets for the {} placement buckets of shard \
                 {shard} of {shards}",
                self.rows,
                routing.buckets_on(shard)
            ));
        }
        let per_group = self.rows / slots;
        // The capacity that gives `per_group` region buckets to each placement bucket.
        let rows =
            per_group.saturating_mul(u64::from(self.buckets) * crate::keyed::BUCKET_SLOTS as u64);
        let layout = crate::keyed::KeyedLayout::for_shard(self.dim, routing, shard, rows)
            .map_err(|e| e.to_string())?;
        if layout.capacity() != self.rows || layout.region_bytes() > self.len {
            return Err(format!(
                "{} slots in {} bytes do not fit dim {} keyed rows",
                self.rows, self.len, self.dim
            ));
        }
        Ok(Some(layout))
    }

    /// The row layout the descriptor implies, after checking that its dim is supported, its
    /// bucket count in range, its stride that dim's and its rows within its length (a reader
    /// relies on all four).
    pub fn check_layout(&self) -> Result<crate::row::RowLayout, String> {
        if !(1..=crate::row::MAX_DIM).contains(&self.dim) {
            return Err(format!(
                "dim {} outside 1..={}",
                self.dim,
                crate::row::MAX_DIM
            ));
        }
        if !(1..=crate::MAX_BUCKETS).contains(&self.buckets) {
            return Err(format!(
                "{} placement buckets outside 1..={}",
                self.buckets,
                crate::MAX_BUCKETS
            ));
        }
        let layout = match self.keyed {
            false => crate::row::RowLayout::new(self.dim),
            true => crate::row::RowLayout::keyed(self.dim),
        };
        if layout.stride() as u32 != self.stride || layout.region_bytes(self.rows) > self.len {
            return Err(format!(
                "stride {} and length {} do not fit dim {} and {} rows",
                self.stride, self.len, self.dim, self.rows
            ));
        }
        Ok(layout)
    }
}

/// Read request header; the payload holds `spans` spans of [`SPAN_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRequest {
    /// Number of spans.
    pub spans: u32,
}

/// One span of a read: `len` bytes at `offset` in region `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Region id from [`RegionDescriptor::region`].
    pub region: u32,
    /// Byte offset in the region.
    pub offset: u64,
    /// Bytes to read.
    pub len: u32,
}

impl Span {
    /// Appends the span's 16 wire bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.region.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
    }

    /// Decodes 16 wire bytes.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            region: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            len: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            offset: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// Read response header; the payload is the spans' bytes, concatenated in request order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadResponse {
    /// Total payload bytes.
    pub bytes: u64,
}

/// Batch request header; payload: `requests` complete request frames (each with its length
/// prefix), every one a `Pull`, `PullIfStale` or `Push`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRequest {
    /// Requests in the payload (at most [`MAX_BATCH`]).
    pub requests: u32,
}

/// Batch response header; payload: one complete response frame (each with its length prefix)
/// per request of the batch, in the batch's order, each a success or an error of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// Answers in the payload (= the batch's requests).
    pub answers: u32,
}

/// Most requests one batch may carry.
pub const MAX_BATCH: u32 = 4096;

/// Pull request header; payload: `keys` x u64 keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    /// Table name.
    pub table: String,
    /// Number of keys.
    pub keys: u32,
}

/// Pull response header; payload: `rows` x u64 versions, then `rows` x `dim` f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullResponse {
    /// Rows returned (= keys requested).
    pub rows: u32,
    /// Row dimension.
    pub dim: u32,
    /// The table's clock on this shard, read before any row: see [`PullIfStaleResponse`].
    pub table_clock: u64,
}

/// A client's claim that its unsent version checks are still within their bounds, for the shard
/// to verify (DESIGN section 5, check elision; `docs/PROTOCOL.md`).
///
/// The client last saw the table's clock at `clock`; since then it pushed `own` updates to this
/// shard's table (acknowledged ones, plus those carried by this very request, which the shard
/// applies before reading its clock). The claim holds when `table_clock - clock - own <=
/// max_foreign`, that is, when at most `max_foreign` updates from other clients were applied since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    /// The table clock the client last observed.
    pub clock: u64,
    /// Updates the client pushed to this shard's table since then, this request's included.
    pub own: u64,
    /// Foreign updates its unsent checks can absorb.
    pub max_foreign: u64,
}

impl Since {
    /// Whether the claim holds at `table_clock`: at most `max_foreign` updates from other
    /// clients were applied since `clock` (saturating). The daemon and the one-sided readers
    /// answer claims with this one rule.
    pub fn holds(&self, table_clock: u64) -> bool {
        table_clock
            .saturating_sub(self.clock)
            .saturating_sub(self.own)
            <= self.max_foreign
    }
}

/// Conditional pull header; payload: `keys` x u64 keys, then `keys` x u64 clocks.
///
/// A row comes back when its version `v > clock + bound` (saturating), or when its clock is
/// [`NOT_CACHED`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PullIfStaleRequest {
    /// Table name.
    pub table: String,
    /// Number of keys.
    pub keys: u32,
    /// The staleness bound; `u64::MAX` disables the check for cached keys.
    pub bound: u64,
    /// A claim about checks the client did not send, for the shard to verify.
    pub since: Option<Since>,
    /// Rows pushed with this request (the lines the lookup evicted): after the clocks, the payload
    /// holds `push_rows` x u64 keys, `push_rows` x u32 counts and `push_rows` x `dim` f32 gradient
    /// sums. They are validated with the keys and applied before the clock is read.
    pub push_rows: u32,
    /// Who sent the pushed rows and their number, for exactly-once application of a request sent
    /// again: present exactly when `push_rows` is not 0 (a carried push is numbered like any).
    pub origin: Option<Origin>,
    /// The first `state_keys` keys also want their optimizer state with their rows (a cache
    /// that mirrors the table's optimizer reads it into its lines; 0: none).
    pub state_keys: u32,
    /// The pushed rows carry each one's base version (between their counts and gradients): the
    /// shard hands back the row it produced wherever the row's version before the push was not
    /// the base ([`PushRequest::bases`]).
    pub push_bases: bool,
    /// Each key's birth stamp follows the clocks (`keys` x u64, before any pushed row): a cache of
    /// a dynamic table names the incarnation of the key its line holds (0: a key not held), and a
    /// key held under another stamp comes back whatever its version. The answer then carries
    /// the stamps of the rows it returns ([`PullIfStaleResponse::births`]).
    pub births: bool,
}

/// The sender of a push and its number: a shard applies each `(client, seq)` once, and
/// acknowledges a push it already applied without applying it again (docs/ARCHITECTURE.md,
/// "Exactly-once pushes"; the rule: [`crate::pushes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The sending stream's id: random, drawn by each process (a forked child draws its own),
    /// the same on all its connections and reconnections.
    pub client: u64,
    /// The push's number among that stream's pushes to this shard, from 1.
    pub seq: u64,
    /// Every number of this stream below this one is settled (acknowledged, refused, or given up
    /// and reported) and will never be sent again: the shard forgets them. At most `seq`.
    pub settled_below: u64,
}

/// A clock meaning "the client holds no copy": the row always comes back.
pub const NOT_CACHED: u64 = u64::MAX;

/// The stale rule of a conditional pull (DESIGN section 5): a row at server version `version`
/// comes back to a client whose copy has clock `clock` when `version > clock + bound`
/// (saturating, so a bound of `u64::MAX` never refreshes a cached row), or when the client holds
/// no copy ([`NOT_CACHED`]). The daemon, the one-sided readers and the tests all use this rule.
pub fn is_stale(version: u64, clock: u64, bound: u64) -> bool {
    clock == NOT_CACHED || version > clock.saturating_add(bound)
}

/// Conditional pull response; payload: `stale` x u32 indices into the request's keys (ascending),
/// `stale` x u64 versions, `stale` x `dim` f32 values; then the optimizer state of the returned
/// rows whose index is below the request's `state_keys` (the first `s` of them): `s` x
/// `state_len` f32 values and, when `steps`, `s` x u64 step counts; then the rows the push
/// produced ([`PushResponse`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullIfStaleResponse {
    /// Rows returned.
    pub stale: u32,
    /// Row dimension.
    pub dim: u32,
    /// The table's clock on this shard: the number of updates applied to it, read before any row.
    /// Every update is counted in the clock before its row changes.
    pub table_clock: u64,
    /// Whether the request's [`Since`] claim held at `table_clock` (true when there was none).
    pub since_held: bool,
    /// Updates applied from the rows pushed with the request.
    pub pushed_updates: u64,
    /// Updates of those rows dropped, not applied: a dynamic table's rows whose key it did not
    /// admit ([`PushResponse::refused`]).
    pub push_refused: u64,
    /// Whether those rows had been applied already (the request was sent again): they were
    /// acknowledged without being applied twice.
    pub push_duplicate: bool,
    /// f32 optimizer-state values per row in this answer's states (0 for SGD).
    pub state_len: u32,
    /// Whether each state also carries a u64 step count (Adam).
    pub steps: bool,
    /// Rows the push produced that are handed back ([`PushResponse::produced`]).
    pub produced: u32,
    /// The answer ends with the birth stamp of every returned row, then of every row handed back
    /// (a dynamic table's: `stale + produced` x u64; see [`PullIfStaleRequest::births`]).
    pub births: bool,
}

/// Rows to push, as a server reads them from a payload.
#[derive(Clone, Copy, Debug)]
pub struct PushRows<'a> {
    /// Keys.
    pub keys: U64s<'a>,
    /// Update counts.
    pub counts: U32s<'a>,
    /// Each row's base version, when the pusher sent them ([`PushRequest::bases`]).
    pub bases: Option<U64s<'a>>,
    /// Gradient sums, keys x dim.
    pub grads: F32s<'a>,
}

/// A base version meaning "hand nothing back" (the pusher keeps no line for the row: a write
/// through, or a line it evicted).
pub const NO_BASE: u64 = u64::MAX;
/// A base version meaning "hand back whatever this push produces": no row reaches it, so it is
/// never the row's version. A pusher whose copy may be of another incarnation of the shard (a
/// version seen before a restart can be reached again by other updates) sends it.
pub const ANY_BASE: u64 = u64::MAX - 1;

impl<'a> PushRows<'a> {
    /// Splits `rows` push rows off a payload: keys, counts, base versions when `bases`, then the
    /// rest as gradients.
    pub fn split(payload: &'a [u8], rows: usize, with_bases: bool) -> Result<Self, FrameError> {
        let fixed = rows.saturating_mul(if with_bases { 20 } else { 12 });
        if payload.len() < fixed || !(payload.len() - fixed).is_multiple_of(4) {
            return Err(FrameError::Malformed(format!(
                "{rows} push rows need {fixed} bytes of keys, counts and bases plus whole f32 \
                 gradients, got {} bytes",
                payload.len()
            )));
        }
        let (keys, rest) = payload.split_at(rows * 8);
        let (counts, rest) = rest.split_at(rows * 4);
        let (bases, grads) = rest.split_at(if with_bases { rows * 8 } else { 0 });
        Ok(Self {
            keys: le_array(keys),
            counts: le_array(counts),
            bases: with_bases.then(|| le_array(bases)),
            grads: le_array(grads),
        })
    }

    /// Row `n`'s base version ([`NO_BASE`] when the push carries none).
    pub fn base(&self, n: usize) -> u64 {
        self.bases.map_or(NO_BASE, |b| b.get(n))
    }
}

/// Push request header; payload: `rows` x u64 keys, `rows` x u32 counts, when `bases` `rows` x
/// u64 base versions, then `rows` x `dim` f32 gradient sums. The push is validated whole before
/// any row changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushRequest {
    /// Table name.
    pub table: String,
    /// Number of rows.
    pub rows: u32,
    /// Who sent it and its number, for exactly-once application of a request sent again: every
    /// push is numbered.
    pub origin: Origin,
    /// The rows carry base versions: each row's version as the pusher's copy holds it before
    /// this push (its line's `c_s`). Where the row's version before the entry is applied is not
    /// its base (another client's update came between, or a restart took the row back), the
    /// shard hands back the row it produced, with its version and optimizer state, so that the
    /// pusher's copy becomes that row. [`NO_BASE`] asks for nothing.
    pub bases: bool,
}

/// Push response header; payload: the rows the push produced that it hands back (the rows whose
/// version before the push was not their base): `produced` x u32 indices into the push's rows
/// (ascending), `produced` x u64 versions, `produced` x `dim` f32 values, `produced` x
/// `state_len` f32 optimizer-state values and, when `steps`, `produced` x u64 step counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// Rows of the push, each applied (or, for a dynamic table, refused: see `refused`).
    pub rows: u32,
    /// Sum of the counts applied (the versions added).
    pub updates: u64,
    /// Updates dropped, not applied: a dynamic table's rows whose key it did not admit (their
    /// counts summed; 0 for a fixed table).
    pub refused: u64,
    /// Whether the push had been applied already (the request was sent again): it was
    /// acknowledged without being applied twice. The rows handed back are then the rows as they
    /// are now, wherever their version is not base plus count.
    pub duplicate: bool,
    /// Rows handed back.
    pub produced: u32,
    /// f32 optimizer-state values per row handed back.
    pub state_len: u32,
    /// Whether each handed-back state also carries a u64 step count (Adam).
    pub steps: bool,
    /// The rows handed back end with their birth stamps (`produced` x u64): a dynamic table's
    /// rows, each with the stamp of its key's incarnation (0: the key is not held, the row its
    /// initial value as zeros at version 0).
    pub births: bool,
    /// Rows of the push whose key the dynamic table did not admit: their indices into the
    /// push's rows (ascending, `refused_rows` x u32) close the answer. 0 for a fixed table and
    /// for a repeat.
    pub refused_rows: u32,
    /// The incarnation of the daemon that applied the push, from the answer's frame head: the
    /// push outcome travels with it, never with what a transport last heard. Not encoded in this
    /// header: the transport that decoded the answer fills it in (0 where none did).
    #[serde(skip)]
    pub incarnation: u64,
}

/// Evictions request header (no payload): up to `max` evictions of dynamic table `table` on
/// this shard, from `cursor` (the count of evictions before the first one wanted; 0 is the
/// table's first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionsRequest {
    /// The table.
    pub table: String,
    /// Where to read from.
    pub cursor: u64,
    /// Most events to return (the shard returns at most [`MAX_EVICTIONS_PAGE`]).
    pub max: u32,
}

/// Most evictions one answer carries.
pub const MAX_EVICTIONS_PAGE: u32 = 65_536;

/// AdvanceStep request (op 18): dynamic table `table`'s training step on this shard becomes
/// `step` (a step below the one it holds changes nothing), and the rows whose time to live
/// ([`crate::Eviction::Ttl`]) it passes are evicted before the answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvanceStepRequest {
    /// The table.
    pub table: String,
    /// The training step the client has reached.
    pub step: u64,
}

/// AdvanceStep answer: the table's step on this shard now, and the rows this request expired
/// (each also in the eviction stream, op 14, with its score: the step of its last update).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvanceStepResponse {
    /// The table's training step on this shard.
    pub step: u64,
    /// Rows expired by this request.
    pub expired: u64,
}

/// One eviction: the key that left, its row's version then, and its eviction score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictedKey {
    /// The key.
    pub key: u64,
    /// The row's version when it left (the updates it took since its admission).
    pub version: u64,
    /// Its score when it left.
    pub score: u64,
}

/// Evictions response header (no payload).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionsResponse {
    /// The cursor of the first event returned: the cursor asked for, or the oldest the shard
    /// still holds when it no longer holds that one.
    pub first: u64,
    /// Evictions between the cursor asked for and `first` that the shard no longer holds (lost
    /// to this reader; 0 unless it fell behind).
    pub lost: u64,
    /// The events, oldest first.
    pub events: Vec<EvictedKey>,
    /// Where the next read starts (`first + events.len()`).
    pub next: u64,
}

/// Scan request header (no payload): the held rows of dynamic table `table` in slots
/// `[from, from + slots)` of this shard's region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    /// The table.
    pub table: String,
    /// The first slot.
    pub from: u64,
    /// Slots to scan (the shard scans at most [`MAX_SCAN_SLOTS`]).
    pub slots: u32,
}

/// Most slots one scan covers.
pub const MAX_SCAN_SLOTS: u32 = 65_536;

/// Scan response header; the payload holds `rows` u64 keys, `rows` u64 versions, then `rows` x
/// `dim` f32 values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanResponse {
    /// Held rows in the range.
    pub rows: u32,
    /// Values per row.
    pub dim: u32,
    /// The slot after the range scanned: where the next scan starts.
    pub next: u64,
    /// The shard's slots (its capacity): the scan is done when `next` reaches it.
    pub end: u64,
}

/// Checkpoint request header (no payload).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// The checkpoint's name (docs/CHECKPOINTS.md: 1 to 128 bytes of `[A-Za-z0-9_.-]`).
    pub name: String,
    /// Only the rows changed since the shard's previous checkpoint.
    pub incremental: bool,
}

/// What a shard wrote for a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointResponse {
    /// The checkpoint's name.
    pub name: String,
    /// Its order among the shard's checkpoints.
    pub seq: u64,
    /// The checkpoint it builds on (incremental ones).
    pub parent: Option<String>,
    /// Tables written.
    pub tables: u32,
    /// Row records written.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Time it took, microseconds.
    pub micros: u64,
}

/// Assign request header; payload: `rows` x u64 keys, then, when `values`, `rows` x `dim` f32
/// values, then, when `state` is [`AssignState::Set`], `rows` x the table's `state_len` f32
/// state values and, for an optimizer that counts steps, `rows` x u64 step counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssignRequest {
    /// Table name.
    pub table: String,
    /// Number of rows.
    pub rows: u32,
    /// Whether the rows' values are set (else kept: a key a dynamic table does not hold takes
    /// its initial value).
    pub values: bool,
    /// What becomes of the rows' optimizer state.
    pub state: AssignState,
}

/// What an assignment does to its rows' optimizer state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignState {
    /// Starts again, as a new optimizer's (an import, a warm start).
    #[default]
    Reset,
    /// Stays as it is (a model's weights loaded: torch leaves its optimizer's state alone).
    Keep,
    /// Set to the values (and step counts) the payload carries (an optimizer's state loaded).
    Set,
}

/// Per-table statistics of one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableStats {
    /// Table name.
    pub name: String,
    /// Global rows.
    pub rows: u64,
    /// Rows on this shard.
    pub local_rows: u64,
    /// Row dimension.
    pub dim: u32,
    /// Optimizer name.
    pub optimizer: String,
    /// Rows read by pulls, conditional pulls and span reads.
    pub rows_read: u64,
    /// Rows pushed.
    pub rows_pushed: u64,
    /// Updates applied (sum of pushed counts).
    pub updates: u64,
}

/// Statistics of one shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    /// This shard's index.
    pub shard: u32,
    /// Shards in the cluster.
    pub shards: u32,
    /// Frames handled.
    pub requests: u64,
    /// Frames answered with an error.
    pub errors: u64,
    /// Rows read (all tables).
    pub rows_read: u64,
    /// Rows pushed (all tables).
    pub rows_pushed: u64,
    /// Bytes received, frame prefixes included.
    pub bytes_in: u64,
    /// Bytes sent, frame prefixes included.
    pub bytes_out: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Tables in creation order.
    pub tables: Vec<TableStats>,
}

/// A frame's fixed fields and its two variable parts.
#[derive(Clone, Copy, Debug)]
pub struct FrameParts<'a> {
    /// Op byte (not yet validated).
    pub op: u8,
    /// Status byte (not yet validated).
    pub status: u8,
    /// The answering daemon's incarnation (responses; 0 in a request, whose head has none).
    pub incarnation: u64,
    /// The bincode header.
    pub header: &'a [u8],
    /// The raw payload.
    pub payload: &'a [u8],
}

/// Frame-level failures.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A body longer than the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// Configured maximum.
        max: u32,
    },
    /// A body that does not follow the format.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Checks a prefix against the maximum and returns the body length.
pub fn body_len(prefix: [u8; PREFIX_BYTES], max: u32) -> Result<u32, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    if (len as usize) < HEAD_BYTES {
        return Err(FrameError::Malformed(format!(
            "body of {len} bytes is shorter than the {HEAD_BYTES}-byte head"
        )));
    }
    Ok(len)
}

/// Splits a request body (everything after the prefix) into its parts.
pub fn split_body(body: &[u8]) -> Result<FrameParts<'_>, FrameError> {
    split_with(body, MAX_HEADER, HEAD_BYTES)
}

/// Splits a response body into its parts (a [`RESPONSE_HEAD_BYTES`] head with the incarnation,
/// a header up to [`MAX_RESPONSE_HEADER`]).
pub fn split_response(body: &[u8]) -> Result<FrameParts<'_>, FrameError> {
    split_with(body, MAX_RESPONSE_HEADER, RESPONSE_HEAD_BYTES)
}

fn split_with(body: &[u8], max_header: usize, head: usize) -> Result<FrameParts<'_>, FrameError> {
    if body.len() < head {
        return Err(FrameError::Malformed(format!(
            "body of {} bytes is shorter than the {head}-byte head",
            body.len()
        )));
    }
    let header_len = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
    if header_len > max_header || header_len > body.len() - head {
        return Err(FrameError::Malformed(format!(
            "header of {header_len} bytes does not fit a body of {} (max header {max_header})",
            body.len()
        )));
    }
    let incarnation = match head {
        RESPONSE_HEAD_BYTES => u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")),
        _ => 0,
    };
    Ok(FrameParts {
        op: body[0],
        status: body[1],
        incarnation,
        header: &body[head..head + header_len],
        payload: &body[head + header_len..],
    })
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_HEADER>()
}

/// Encodes one record as a header is encoded (PROTOCOL.md section 3, "Records"), for formats
/// outside frames that embed records (checkpoint headers).
pub fn encode_record<T: Serialize>(record: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(record, bincode::config::standard())
        .expect("encoding into a Vec cannot fail for hetkv's record types")
}

/// Decodes a request's header (at most [`MAX_HEADER`] bytes of claims); every byte must be
/// consumed.
pub fn decode_header<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let decoded = bincode::serde::decode_from_slice(bytes, bincode_config());
    consumed(decoded, bytes.len())
}

/// Decodes a response's header (at most [`MAX_RESPONSE_HEADER`] bytes of claims); every byte
/// must be consumed.
pub fn decode_response_header<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let config = bincode::config::standard().with_limit::<MAX_RESPONSE_HEADER>();
    consumed(
        bincode::serde::decode_from_slice(bytes, config),
        bytes.len(),
    )
}

fn consumed<T>(
    decoded: Result<(T, usize), bincode::error::DecodeError>,
    len: usize,
) -> Result<T, FrameError> {
    let (value, used) =
        decoded.map_err(|e| FrameError::Malformed(format!("undecodable header: {e}")))?;
    if used != len {
        return Err(FrameError::Malformed(format!(
            "header has {} trailing bytes",
            len - used
        )));
    }
    Ok(value)
}

/// Starts a request frame in `out` (cleared first): prefix placeholder, head and the encoded
/// header. Append the payload, then call [`finish_frame`].
pub fn start_frame<T: Serialize>(out: &mut Vec<u8>, op: u8, status: Status, header: &T) {
    start_with(out, &[op, status as u8, 0, 0, 0, 0, 0, 0], header);
}

/// Starts a response frame in `out` (cleared first): prefix placeholder, the response head with
/// `incarnation`, and the encoded header. Append the payload, then call [`finish_frame`].
pub fn start_response<T: Serialize>(
    out: &mut Vec<u8>,
    op: u8,
    status: Status,
    incarnation: u64,
    header: &T,
) {
    let mut head = [0u8; RESPONSE_HEAD_BYTES];
    head[0] = op;
    head[1] = status as u8;
    head[HEAD_BYTES..].copy_from_slice(&incarnation.to_le_bytes());
    start_with(out, &head, header);
}

fn start_with<T: Serialize>(out: &mut Vec<u8>, head: &[u8], header: &T) {
    out.clear();
    out.extend_from_slice(&[0; PREFIX_BYTES]);
    out.extend_from_slice(head);
    let start = out.len();
    bincode::serde::encode_into_std_write(header, out, bincode::config::standard())
        .expect("encoding into a Vec cannot fail for hetkv's header types");
    let header_len = (out.len() - start) as u32;
    out[PREFIX_BYTES + 4..PREFIX_BYTES + 8].copy_from_slice(&header_len.to_le_bytes());
}

/// Writes the body length into the prefix; fails if the frame exceeds `max`.
pub fn finish_frame(out: &mut [u8], max: u32) -> Result<(), FrameError> {
    let len = (out.len() - PREFIX_BYTES) as u64;
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..PREFIX_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Appends u64 values as little-endian bytes.
pub fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    out.reserve(values.len() * 8);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends u32 values as little-endian bytes.
pub fn put_u32s(out: &mut Vec<u8>, values: &[u32]) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends f32 values as little-endian bytes.
pub fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A value a payload array holds, little-endian and of fixed width.
pub trait LeValue: Copy + 'static {
    /// Bytes of one value.
    const WIDTH: usize;
    /// The value of `WIDTH` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
}

impl LeValue for u64 {
    const WIDTH: usize = 8;
    fn from_le(bytes: &[u8]) -> Self {
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }
}

impl LeValue for u32 {
    const WIDTH: usize = 4;
    fn from_le(bytes: &[u8]) -> Self {
        u32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
}

impl LeValue for f32 {
    const WIDTH: usize = 4;
    fn from_le(bytes: &[u8]) -> Self {
        f32::from_le_bytes(bytes.try_into().expect("4 bytes"))
    }
}

/// A little-endian array of `T` inside a payload, read without copying. The element type is
/// part of the type: a push's u32 counts ([`U32s`]) and its f32 gradients ([`F32s`]) are the
/// same width but cannot be passed for each other:
///
/// ```compile_fail
/// use hetkv_transport::wire::{le_array, U32s};
/// let grads = le_array::<f32>(&[0u8; 8]);
/// let counts: U32s<'_> = grads; // f32 values are not counts
/// ```
#[derive(Debug)]
pub struct LeArray<'a, T> {
    bytes: &'a [u8],
    _values: std::marker::PhantomData<T>,
}

impl<T> Clone for LeArray<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LeArray<'_, T> {}

impl<'a, T: LeValue> LeArray<'a, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / T::WIDTH
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Element `i`.
    pub fn get(&self, i: usize) -> T {
        T::from_le(&self.bytes[i * T::WIDTH..(i + 1) * T::WIDTH])
    }

    /// All elements.
    pub fn iter(&self) -> impl Iterator<Item = T> + 'a {
        self.bytes.chunks_exact(T::WIDTH).map(T::from_le)
    }

    /// Copies elements `[start, start + out.len())` into `out`.
    pub fn copy_to(&self, start: usize, out: &mut [T]) {
        let src = &self.bytes[start * T::WIDTH..(start + out.len()) * T::WIDTH];
        for (v, c) in out.iter_mut().zip(src.chunks_exact(T::WIDTH)) {
            *v = T::from_le(c);
        }
    }
}

/// u64 values.
pub type U64s<'a> = LeArray<'a, u64>;
/// u32 values.
pub type U32s<'a> = LeArray<'a, u32>;
/// f32 values.
pub type F32s<'a> = LeArray<'a, f32>;

/// Splits a payload into consecutive arrays of the given element counts. Fails unless the sizes
/// add up to the payload exactly.
pub fn split_payload<'a>(
    payload: &'a [u8],
    parts: &[(usize, usize)],
) -> Result<Vec<&'a [u8]>, FrameError> {
    let mut need: u64 = 0;
    for &(count, width) in parts {
        need = need.saturating_add((count as u64).saturating_mul(width as u64));
    }
    if need != payload.len() as u64 {
        return Err(FrameError::Malformed(format!(
            "payload of {} bytes, header implies {need}",
            payload.len()
        )));
    }
    let mut rest = payload;
    let mut out = Vec::with_capacity(parts.len());
    for &(count, width) in parts {
        let (head, tail) = rest.split_at(count * width);
        out.push(head);
        rest = tail;
    }
    Ok(out)
}

/// Wraps bytes as a little-endian array; the length must be a multiple of `W`.
pub fn le_array<T: LeValue>(bytes: &[u8]) -> LeArray<'_, T> {
    debug_assert_eq!(bytes.len() % T::WIDTH, 0);
    LeArray {
        bytes,
        _values: std::marker::PhantomData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let mut out = Vec::new();
        let req = PullRequest {
            table: "t".into(),
            keys: 2,
        };
        start_frame(&mut out, Op::Pull as u8, Status::Ok, &req);
        put_u64s(&mut out, &[7, 9]);
        finish_frame(&mut out, DEFAULT_MAX_FRAME).unwrap();
        let len = body_len(out[..4].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len as usize, out.len() - 4);
        let parts = split_body(&out[4..]).unwrap();
        assert_eq!(Op::from_u8(parts.op), Some(Op::Pull));
        assert_eq!(decode_header::<PullRequest>(parts.header).unwrap(), req);
        let keys: U64s = le_array(parts.payload);
        assert_eq!(keys.iter().collect::<Vec<_>>(), vec![7, 9]);
    }

    #[test]
    fn oversized_and_short_prefixes_are_refused() {
        assert!(matches!(
            body_len(u32::MAX.to_le_bytes(), DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            body_len(3u32.to_le_bytes(), 100),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn header_length_must_fit() {
        let mut body = vec![Op::Stats as u8, 0, 0, 0];
        body.extend_from_slice(&1000u32.to_le_bytes());
        body.extend_from_slice(&[0; 10]);
        assert!(split_body(&body).is_err());
    }

    #[test]
    fn header_claiming_a_huge_string_is_refused_without_allocating_it() {
        // A varint string length of 2^40 followed by nothing.
        let bytes = [0xFD, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(decode_header::<TableRequest>(&bytes).is_err());
        // Trailing garbage after a valid header is refused too.
        let mut out = Vec::new();
        start_frame(&mut out, 1, Status::Ok, &TableRequest { table: "x".into() });
        out.push(0);
        let parts = split_body(&out[4..]).unwrap();
        assert_eq!(parts.payload, &[0]);
    }

    #[test]
    fn payload_split_checks_sizes() {
        let p = [0u8; 24];
        assert!(split_payload(&p, &[(2, 8), (2, 4)]).is_ok());
        assert!(split_payload(&p, &[(2, 8)]).is_err());
        assert!(split_payload(&p, &[(usize::MAX, 8)]).is_err());
    }

    fn header_bytes<T: Serialize>(h: &T) -> Vec<u8> {
        let mut out = Vec::new();
        start_frame(&mut out, 0, Status::Ok, h);
        out[PREFIX_BYTES + HEAD_BYTES..].to_vec()
    }

    /// The examples of `docs/PROTOCOL.md`'s records section, byte for byte.
    #[test]
    fn records_encode_as_documented() {
        let since = Since {
            clock: 300,
            own: 1,
            max_foreign: 0,
        };
        assert_eq!(header_bytes(&since), [0xfb, 0x2c, 0x01, 0x01, 0x00]);
        assert_eq!(
            header_bytes(&TableRequest { table: "ab".into() }),
            [0x02, b'a', b'b']
        );
        let e = WireError::new(ErrorCode::UnknownTable, "x");
        assert_eq!(header_bytes(&e), [6, 1, b'x'], "UnknownTable is index 6");
        let spec = crate::spec::TableSpec {
            name: "t".into(),
            rows: 1000,
            dim: 8,
            init: crate::spec::Initializer::Uniform {
                bound: 0.5,
                seed: 7,
            },
            optimizer: crate::spec::OptimizerSpec::Sgd { lr: 1.0 },
            buckets: crate::DEFAULT_BUCKETS,
            dynamic: None,
        };
        let mut want = vec![1, b't', 0xfb, 0xe8, 0x03, 8, 1];
        want.extend_from_slice(&0.5f32.to_le_bytes());
        want.push(7);
        want.push(0);
        want.extend_from_slice(&1.0f32.to_le_bytes());
        want.extend_from_slice(&[0xfb, 0x00, 0x10]); // 4,096 buckets
        want.push(0); // fixed: no dynamic part
        assert_eq!(header_bytes(&spec), want);
        let hello = HelloRequest {
            magic: MAGIC,
            version: 3,
            auth: None,
            client: String::new(),
            client_id: None,
        };
        assert_eq!(header_bytes(&hello), [b'H', b'T', b'K', b'V', 3, 0, 0, 0]);
    }

    #[test]
    fn responses_carry_the_incarnation_in_their_head() {
        let mut out = Vec::new();
        let inc = 0x0123_4567_89ab_cdef;
        start_response(
            &mut out,
            Op::Stats as u8,
            Status::Ok,
            inc,
            &TableRequest { table: "x".into() },
        );
        put_u64s(&mut out, &[5]);
        finish_frame(&mut out, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(
            &out[PREFIX_BYTES + HEAD_BYTES..PREFIX_BYTES + RESPONSE_HEAD_BYTES],
            &inc.to_le_bytes()
        );
        let parts = split_response(&out[4..]).unwrap();
        assert_eq!((parts.op, parts.incarnation), (Op::Stats as u8, inc));
        assert_eq!(
            decode_header::<TableRequest>(parts.header).unwrap().table,
            "x"
        );
        assert_eq!(parts.payload, 5u64.to_le_bytes());
        // A response head is longer than a request's: one cut to a request's head is malformed.
        assert!(split_response(&out[4..4 + HEAD_BYTES + 2]).is_err());
    }

    #[test]
    fn span_round_trip() {
        let s = Span {
            region: 3,
            offset: 1 << 40,
            len: 272,
        };
        let mut b = Vec::new();
        s.encode(&mut b);
        assert_eq!(b.len(), SPAN_BYTES);
        assert_eq!(Span::decode(&b), s);
    }
}
