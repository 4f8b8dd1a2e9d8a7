//! The server side of the protocol, without I/O.
//!
//! A [`Session`] takes one frame body at a time and writes one response frame; it holds the
//! handshake state of one connection and dispatches to a [`ShardService`]. Transports (the tokio
//! TCP server, later the RDMA control channel) only move bytes: every protocol rule lives here, so
//! it is tested deterministically, without sockets.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::codec;
use crate::spec::TableSpec;
use crate::wire::{
    self, decode_header, split_body, CreateRequest, CreateResponse, Endpoint, ErrorCode,
    FrameError, HelloRequest, HelloResponse, Op, PushResponse, RegionDescriptor, ShardStats,
    Status, TableRequest, TablesResponse, WireError, MAGIC, PREFIX_BYTES, PROTOCOL_VERSION,
    RESPONSE_HEAD_BYTES,
};

/// Counters every server keeps, whatever carries its frames.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Frames handled.
    pub requests: AtomicU64,
    /// Frames answered with an error.
    pub errors: AtomicU64,
    /// Bytes received, prefixes included.
    pub bytes_in: AtomicU64,
    /// Bytes sent, prefixes included.
    pub bytes_out: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl ServerCounters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies the counters into a stats record (tables and rows are the service's).
    pub fn fill(&self, stats: &mut ShardStats) {
        stats.requests = self.requests.load(Ordering::Relaxed);
        stats.errors = self.errors.load(Ordering::Relaxed);
        stats.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        stats.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        stats.connections = self.connections.load(Ordering::Relaxed);
    }
}

/// The response frame under construction, with the limit it must respect.
#[derive(Debug)]
pub struct Response<'a> {
    out: &'a mut Vec<u8>,
    op: u8,
    max_frame: u32,
    incarnation: u64,
}

impl<'a> Response<'a> {
    /// A response to op `op` from the daemon of incarnation `incarnation`, written into `out`,
    /// which must stay within `max_frame` bytes.
    pub fn new(out: &'a mut Vec<u8>, op: u8, max_frame: u32, incarnation: u64) -> Self {
        Self {
            out,
            op,
            max_frame,
            incarnation,
        }
    }

    /// Starts a successful response with `header`; the caller appends the payload to the returned
    /// buffer after checking its size with [`Response::reserve_payload`].
    pub fn begin<T: Serialize>(&mut self, header: &T) -> &mut Vec<u8> {
        wire::start_response(self.out, self.op, Status::Ok, self.incarnation, header);
        self.out
    }

    /// The frame started by [`Response::begin`], to append the payload to.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Fails unless a frame of `bytes` after the head (header and payload together) stays within
    /// the maximum. For answers whose size is known only after something has changed: checked
    /// first, with the largest size the answer can have, so that nothing changes under a
    /// refusal.
    pub fn check_fits(&self, bytes: u64) -> Result<(), WireError> {
        let total = ((PREFIX_BYTES + RESPONSE_HEAD_BYTES) as u64).saturating_add(bytes);
        if total > self.max_frame as u64 {
            return Err(WireError::new(
                ErrorCode::FrameTooLarge,
                format!(
                    "the answer could be {total} bytes, above the maximum frame of {}: split the \
                     batch (nothing was applied)",
                    self.max_frame
                ),
            ));
        }
        Ok(())
    }

    /// Checks that `bytes` more payload keep the frame within the maximum, then reserves them.
    /// Call it before producing a payload whose size the peer chose.
    pub fn reserve_payload(&mut self, bytes: u64) -> Result<(), WireError> {
        let total = (self.out.len() as u64).saturating_add(bytes);
        if total > self.max_frame as u64 {
            return Err(WireError::new(
                ErrorCode::FrameTooLarge,
                format!(
                    "response would be {total} bytes, above the maximum frame of {}: split the batch",
                    self.max_frame
                ),
            ));
        }
        self.out.reserve(bytes as usize);
        Ok(())
    }
}

/// What a shard offers to the protocol. The store implements it; transports never see tables.
pub trait ShardService: Send + Sync + 'static {
    /// This shard's index and the cluster's size.
    fn identity(&self) -> (u32, u32);
    /// This daemon's incarnation: random, drawn at every start (every restore is a start), and
    /// carried in the hello and in the head of every response.
    fn incarnation(&self) -> u64;
    /// What the shard remembers of the numbered pushes of client `client` (for its hello).
    fn applied_pushes(&self, client: u64) -> Option<wire::AppliedPushes> {
        let _ = client;
        None
    }
    /// Creates a queue pair connected to `client`'s and returns this side's endpoint and the
    /// queue pair, which the session keeps until the connection closes.
    fn rdma_connect(&self, client: &Endpoint) -> Result<(Endpoint, Box<dyn Send>), WireError> {
        let _ = client;
        Err(WireError::new(
            ErrorCode::Unsupported,
            "this daemon serves no RDMA (built without the rdma feature, or started without --rdma)",
        ))
    }
    /// The directory of this shard's shared-memory region files, when it exposes them.
    fn shm_dir(&self) -> Option<String> {
        None
    }
    /// Checks a hello's response to this connection's challenge (true when the daemon needs no
    /// token): `nonce` is the challenge's, `None` when none was asked for.
    fn authorize(&self, nonce: Option<&[u8; 32]>, response: Option<&[u8; 32]>) -> bool;
    /// A fresh nonce for a challenge (from the kernel's random source unless overridden).
    fn nonce(&self) -> Result<[u8; 32], WireError> {
        crate::auth::nonce()
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("no random nonce: {e}")))
    }
    /// Tables in creation order.
    fn list_tables(&self) -> TablesResponse;
    /// Creates a table, or confirms an identical one.
    fn create_table(&self, spec: TableSpec) -> Result<CreateResponse, WireError>;
    /// Describes a table's region.
    fn region_info(&self, table: &str) -> Result<RegionDescriptor, WireError>;
    /// Drops a table; whether this shard held it.
    fn drop_table(&self, table: &str) -> Result<bool, WireError> {
        Err(WireError::new(
            ErrorCode::Unsupported,
            format!("this shard drops no table (table {table})"),
        ))
    }
    /// Emulated one-sided read of `req`'s spans, answered through [`codec::read::respond`].
    fn read(&self, req: codec::read::Request<'_>, resp: &mut Response<'_>)
        -> Result<(), WireError>;
    /// Consistent read of `req`'s keys, answered through [`codec::pull::respond`].
    fn pull(
        &self,
        req: &codec::pull::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError>;
    /// Conditional read, answered through [`codec::pull_if_stale::respond`]; the request's push,
    /// when given, is validated with the keys and applied, all or nothing, before the table clock
    /// is read.
    fn pull_if_stale(
        &self,
        req: &codec::pull_if_stale::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError>;
    /// Applies a push, all or nothing, answered through [`codec::push::respond`] (with the rows
    /// it produced where the request's base versions ask for them).
    fn push(
        &self,
        req: &codec::push::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError>;
    /// Sets rows to the given values, all or nothing; returns the rows set.
    fn assign(&self, req: &codec::assign::Request<'_>) -> Result<PushResponse, WireError>;
    /// Writes a checkpoint of every table (may take long: carriers run it off their event loop).
    fn checkpoint(
        &self,
        req: &wire::CheckpointRequest,
    ) -> Result<wire::CheckpointResponse, WireError>;
    /// A page of a dynamic table's eviction stream ([`wire::EvictionsRequest`]).
    fn evictions(
        &self,
        req: &wire::EvictionsRequest,
    ) -> Result<wire::EvictionsResponse, WireError> {
        Err(WireError::new(
            ErrorCode::Unsupported,
            format!("this shard keeps no eviction stream (table {})", req.table),
        ))
    }
    /// Moves a dynamic table's training step, expiring what its time to live no longer covers
    /// ([`wire::AdvanceStepRequest`]).
    fn advance_step(
        &self,
        req: &wire::AdvanceStepRequest,
    ) -> Result<wire::AdvanceStepResponse, WireError> {
        Err(WireError::new(
            ErrorCode::Unsupported,
            format!("this shard keeps no training step (table {})", req.table),
        ))
    }
    /// A dynamic table's held rows in a range of slots ([`wire::ScanRequest`]), answered
    /// through [`codec::scan::respond`].
    fn scan(&self, req: &wire::ScanRequest, resp: &mut Response<'_>) -> Result<(), WireError> {
        let _ = resp;
        Err(WireError::new(
            ErrorCode::Unsupported,
            format!("this shard scans no table (table {})", req.table),
        ))
    }
    /// Tables and row counters (the session fills in the frame counters).
    fn stats(&self) -> ShardStats;
    /// The frame counters.
    fn counters(&self) -> &ServerCounters;
}

/// What a transport does after sending the response.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Close the connection (handshake failures: nothing after them can be trusted).
    pub close: bool,
    /// The error sent, for the transport's log.
    pub error: Option<WireError>,
}

/// Queue pairs one connection may hold (a client needs one per connection).
const MAX_HELD: usize = 4;

/// One connection's protocol state.
pub struct Session {
    greeted: bool,
    max_frame: u32,
    peer: String,
    /// The nonce of the last challenge, spent by the next hello.
    nonce: Option<[u8; 32]>,
    /// Resources that live as long as the connection (the daemon's RDMA queue pairs).
    held: Vec<Box<dyn Send>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("greeted", &self.greeted)
            .field("peer", &self.peer)
            .field("held", &self.held.len())
            .finish()
    }
}

impl Session {
    /// Whether the connection holds resources of its peer's (an RDMA queue pair): its frames
    /// stop while the peer reads one-sidedly, so it is not closed for idleness.
    pub fn holds_resources(&self) -> bool {
        !self.held.is_empty()
    }

    /// A new connection; `max_frame` is the largest body this server sends or accepts.
    pub fn new(max_frame: u32) -> Self {
        Self {
            greeted: false,
            max_frame,
            peer: String::new(),
            nonce: None,
            held: Vec::new(),
        }
    }

    /// Whether the connection completed its hello.
    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// The client's self-description from its hello.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Handles one frame body (the bytes after the length prefix) and writes the whole response
    /// frame, prefix included, into `out`.
    pub fn on_frame<S: ShardService + ?Sized>(
        &mut self,
        service: &S,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        ServerCounters::add(&service.counters().requests, 1);
        let mut close = false;
        let result = self.dispatch(service, body, out, &mut close);
        let error = finish(service, body, result, out, self.max_frame, usize::MAX);
        Outcome { close, error }
    }

    /// Answers each request of a batch (`bodies`, without their prefixes) on its own, appending
    /// its answer frame, prefix included, to `out` (the batch's answer). Each request may use the
    /// room the batch's frame has left less an [`codec::batch::ANSWER_RESERVE`] for each request
    /// after it, so every one is answered (at worst with an error whose message is cut), and the
    /// batch's answer never fails after a request in it was carried out.
    fn answer_batch<S: ShardService + ?Sized>(
        &mut self,
        service: &S,
        bodies: &[&[u8]],
        out: &mut Vec<u8>,
    ) {
        let max = self.max_frame;
        let mut answer = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let reserved = (bodies.len() - i - 1) as u64 * codec::batch::ANSWER_RESERVE;
            let used = (out.len() - PREFIX_BYTES) as u64;
            let room = (max as u64).saturating_sub(used + reserved + PREFIX_BYTES as u64);
            let op = split_body(body).ok().and_then(|p| Op::from_u8(p.op));
            let result = match op {
                Some(op) if codec::batch::carries(op) => {
                    self.max_frame = room as u32;
                    let mut close = false;
                    let r = self.dispatch(service, body, &mut answer, &mut close);
                    self.max_frame = max;
                    r
                }
                _ => Err(WireError::new(
                    ErrorCode::UnknownOp,
                    format!(
                        "request {i} of the batch has op byte {}: a batch carries only pull, \
                         pull_if_stale and push requests",
                        body.first().copied().unwrap_or(0)
                    ),
                )),
            };
            let room = room as u32;
            finish(
                service,
                body,
                result,
                &mut answer,
                room,
                codec::batch::ERROR_MESSAGE_BYTES,
            );
            out.extend_from_slice(&answer);
        }
    }

    fn dispatch<S: ShardService + ?Sized>(
        &mut self,
        service: &S,
        body: &[u8],
        out: &mut Vec<u8>,
        close: &mut bool,
    ) -> Result<(), WireError> {
        let parts = split_body(body).map_err(malformed)?;
        let Some(op) = Op::from_u8(parts.op) else {
            if !self.greeted {
                *close = true;
                return Err(WireError::new(
                    ErrorCode::HandshakeRequired,
                    format!("first frame has op byte {} instead of hello", parts.op),
                ));
            }
            return Err(WireError::new(
                ErrorCode::UnknownOp,
                format!("unknown operation {}", parts.op),
            ));
        };
        if !self.greeted && op != Op::Hello && op != Op::Challenge {
            *close = true;
            return Err(WireError::new(
                ErrorCode::HandshakeRequired,
                format!("first frame is {op:?}; a connection starts with hello"),
            ));
        }
        let mut resp = Response::new(out, op as u8, self.max_frame, service.incarnation());
        let payload = parts.payload;
        match op {
            Op::Hello => {
                *close = true; // until the hello succeeds
                let h: HelloRequest = decode_header(parts.header).map_err(malformed)?;
                if h.magic != MAGIC {
                    return Err(WireError::new(
                        ErrorCode::HandshakeRequired,
                        format!("hello magic {:?} is not {:?}", h.magic, MAGIC),
                    ));
                }
                if h.version != PROTOCOL_VERSION {
                    return Err(WireError::new(
                        ErrorCode::ProtocolVersion,
                        format!(
                            "client speaks protocol {}, this daemon speaks {PROTOCOL_VERSION}",
                            h.version
                        ),
                    ));
                }
                let nonce = self.nonce.take();
                if !service.authorize(nonce.as_ref(), h.auth.as_ref()) {
                    return Err(WireError::new(
                        ErrorCode::Unauthorized,
                        "the hello does not answer this connection's challenge with the token",
                    ));
                }
                let (shard, shards) = service.identity();
                self.greeted = true;
                self.peer = h.client.chars().take(128).collect();
                *close = false;
                resp.begin(&HelloResponse {
                    version: PROTOCOL_VERSION,
                    shard,
                    shards,
                    max_frame: self.max_frame,
                    server: concat!("hetkv ", env!("CARGO_PKG_VERSION")).to_string(),
                    shm_dir: service.shm_dir(),
                    incarnation: service.incarnation(),
                    pushes: h.client_id.and_then(|c| service.applied_pushes(c)),
                });
            }
            Op::Challenge => {
                no_payload(payload)?;
                if self.greeted {
                    return Err(WireError::new(
                        ErrorCode::MalformedFrame,
                        "a challenge comes before the hello",
                    ));
                }
                let nonce = service.nonce()?;
                self.nonce = Some(nonce);
                resp.begin(&wire::ChallengeResponse { nonce });
            }
            Op::ListTables => {
                no_payload(payload)?;
                let tables = service.list_tables();
                resp.begin(&tables);
            }
            Op::CreateTable => {
                no_payload(payload)?;
                let r: CreateRequest = decode_header(parts.header).map_err(malformed)?;
                let created = service.create_table(r.spec)?;
                resp.begin(&created);
            }
            Op::DropTable => {
                no_payload(payload)?;
                let r: TableRequest = decode_header(parts.header).map_err(malformed)?;
                let dropped = service.drop_table(&r.table)?;
                resp.begin(&wire::DropResponse { dropped });
            }
            Op::RegionInfo => {
                no_payload(payload)?;
                let r: TableRequest = decode_header(parts.header).map_err(malformed)?;
                let region = service.region_info(&r.table)?;
                resp.begin(&region);
            }
            Op::Read => {
                let r = codec::read::decode_request(&parts).map_err(malformed)?;
                service.read(r, &mut resp)?;
            }
            Op::Pull => {
                let r = codec::pull::decode_request(&parts).map_err(malformed)?;
                service.pull(&r, &mut resp)?;
            }
            Op::PullIfStale => {
                let r = codec::pull_if_stale::decode_request(&parts).map_err(malformed)?;
                service.pull_if_stale(&r, &mut resp)?;
            }
            Op::Push => {
                let r = codec::push::decode_request(&parts).map_err(malformed)?;
                service.push(&r, &mut resp)?;
            }
            Op::Batch => {
                let bodies =
                    codec::batch::decode_request(&parts, self.max_frame).map_err(malformed)?;
                codec::batch::respond(&mut resp, bodies.len() as u32);
                self.answer_batch(service, &bodies, resp.payload());
            }
            Op::Assign => {
                let r = codec::assign::decode_request(&parts).map_err(malformed)?;
                let ack = service.assign(&r)?;
                resp.begin(&ack);
            }
            Op::Scan => {
                let r = codec::scan::decode_request(&parts).map_err(malformed)?;
                service.scan(&r, &mut resp)?;
            }
            Op::Evictions => {
                no_payload(payload)?;
                let r: wire::EvictionsRequest = decode_header(parts.header).map_err(malformed)?;
                let page = service.evictions(&r)?;
                resp.begin(&page);
            }
            Op::AdvanceStep => {
                no_payload(payload)?;
                let r: wire::AdvanceStepRequest = decode_header(parts.header).map_err(malformed)?;
                let done = service.advance_step(&r)?;
                resp.begin(&done);
            }
            Op::Checkpoint => {
                no_payload(payload)?;
                let r: wire::CheckpointRequest = decode_header(parts.header).map_err(malformed)?;
                let done = service.checkpoint(&r)?;
                resp.begin(&done);
            }
            Op::Stats => {
                no_payload(payload)?;
                let mut stats = service.stats();
                service.counters().fill(&mut stats);
                resp.begin(&stats);
            }
            Op::RdmaConnect => {
                no_payload(payload)?;
                let client: Endpoint = decode_header(parts.header).map_err(malformed)?;
                if self.held.len() >= MAX_HELD {
                    return Err(WireError::new(
                        ErrorCode::Unsupported,
                        format!("a connection may hold at most {MAX_HELD} queue pairs"),
                    ));
                }
                let (ours, qp) = service.rdma_connect(&client)?;
                self.held.push(qp);
                resp.begin(&ours);
            }
        }
        Ok(())
    }
}

/// Finishes the answer to request `body` in `out` (within `max_frame`), or replaces it with an
/// error frame when `result` failed or the answer is too large (its message cut to
/// `message_bytes`). Returns the error sent.
fn finish<S: ShardService + ?Sized>(
    service: &S,
    body: &[u8],
    result: Result<(), WireError>,
    out: &mut Vec<u8>,
    max_frame: u32,
    message_bytes: usize,
) -> Option<WireError> {
    let error = match result {
        Ok(()) => match wire::finish_frame(out, max_frame) {
            Ok(()) => None,
            Err(e) => Some(WireError::new(ErrorCode::FrameTooLarge, e.to_string())),
        },
        Err(e) => Some(e),
    };
    if let Some(e) = &error {
        ServerCounters::add(&service.counters().errors, 1);
        let mut sent = e.clone();
        if sent.message.len() > message_bytes {
            let mut end = message_bytes;
            while !sent.message.is_char_boundary(end) {
                end -= 1;
            }
            sent.message.truncate(end);
        }
        let op_byte = body.first().copied().unwrap_or(0);
        wire::start_response(out, op_byte, Status::Error, service.incarnation(), &sent);
        wire::finish_frame(out, u32::MAX).expect("an error frame is small");
    }
    error
}

fn malformed(e: FrameError) -> WireError {
    WireError::new(ErrorCode::MalformedFrame, e.to_string())
}

fn no_payload(payload: &[u8]) -> Result<(), WireError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::MalformedFrame,
            format!("unexpected payload of {} bytes", payload.len()),
        ))
    }
}
