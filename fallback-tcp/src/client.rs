//! The blocking TCP client of one shard.
//!
//! Trainers call the store from their own threads and wait for each answer, so the client is
//! blocking (`std::net`), with a pool of connections: a call takes a connection, uses it and puts
//! it back. No lock is held across network I/O, threads never queue behind one socket, and no
//! async runtime sits between a trainer thread and its socket.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hetkv_transport::client::{
    Carried, Exchange, Produced, Pulled, PushRef, Restarts, ShardTransport, StaleQuery, StaleRows,
    Traffic, TrafficCounters, TransportError,
};
use hetkv_transport::incarnation::Seen;
use hetkv_transport::spec::{TableInfo, TableSpec};
use hetkv_transport::wire::{
    self, decode_response_header, split_response, ChallengeResponse, CheckpointRequest,
    CheckpointResponse, CreateRequest, CreateResponse, Endpoint, F32s, FrameParts, HelloRequest,
    HelloResponse, Op, Origin, PushResponse, RegionDescriptor, ShardStats, Span, Status,
    TableRequest, TablesResponse, U64s, WireError, MAGIC, PREFIX_BYTES, PROTOCOL_VERSION,
};
use hetkv_transport::{auth, codec, interrupt};
use serde::{de::DeserializeOwned, Serialize};

use crate::ledger::PushLedger;
use crate::stream::PushStream;

mod batch;

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Largest frame body this client accepts (responses) and sends (capped by the server's).
    pub max_frame: u32,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read and write timeout on every call (`None` waits forever).
    pub io_timeout: Option<Duration>,
    /// The daemons' token: the hello answers each connection's challenge with it (the token
    /// itself never travels).
    pub auth: Option<String>,
    /// Name sent in the hello, for the daemon's logs.
    pub name: String,
    /// The protocol version sent in the hello (tests use another to check refusal).
    pub protocol_version: u32,
    /// How long one call may take, retries included: a request that fails on a broken or
    /// stalled connection is sent again on a new one (with exponential backoff from 10 ms to
    /// 1 s) until this much time has passed, then fails with an error naming the shard and the
    /// time waited. Pushes are numbered, so a push sent again is applied at most once.
    pub deadline: Duration,
    /// An emulated link ([`crate::link`]): every frame to and from the shard waits its transfer
    /// time at this bandwidth. For showing a slow network on one machine; `None` for a real one.
    pub emulated_link: Option<crate::link::LinkLimit>,
    /// How long [`TcpShardClient::connect`] waits for a daemon that refuses the connection (not
    /// listening yet). 0, the default, fails at once: an address where nothing listens is an
    /// error the caller hears about now, not at the deadline. Failures of another kind (a
    /// timeout, a reset) are retried within the deadline; so are refusals of a daemon the client
    /// has reached before (a restart).
    pub wait_for_daemon: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_frame: 256 << 20,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Some(Duration::from_secs(60)),
            auth: None,
            name: format!("hetkv-client pid {}", std::process::id()),
            protocol_version: PROTOCOL_VERSION,
            deadline: Duration::from_secs(60),
            emulated_link: None,
            wait_for_daemon: Duration::ZERO,
        }
    }
}

struct Conn {
    stream: TcpStream,
    recv: Vec<u8>,
    /// When it went back into the pool.
    idle_since: Instant,
}

/// A pooled connection idle longer than this is checked before it is used: a daemon's idle
/// timeout may have closed it, and a request that is not sent again (an assign, a checkpoint)
/// must not be lost to a connection known dead.
const CHECK_IDLE_AFTER: Duration = Duration::from_millis(100);

impl Conn {
    /// Whether the daemon has closed this connection (or sent what nobody asked for): a peek
    /// that does not wait.
    fn closed_by_peer(&self) -> bool {
        let mut b = [0u8; 1];
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let peeked = self.stream.peek(&mut b);
        let restored = self.stream.set_nonblocking(false).is_ok();
        !restored || !matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A connection pool to one shard, implementing [`ShardTransport`].
pub struct TcpShardClient {
    addr: String,
    sockaddr: SocketAddr,
    config: ClientConfig,
    hello: HelloResponse,
    pool: Mutex<Vec<Conn>>,
    traffic: TrafficCounters,
    /// Request buffers kept for reuse: a call encodes into one and keeps it across its retries.
    frames: Mutex<Vec<Vec<u8>>>,
    /// This process's stream of numbered pushes to the shard: its id (in every hello and push)
    /// and the numbers not yet settled.
    stream: PushStream,
    retries: AtomicU64,
    /// The incarnation in the latest answer.
    incarnation: AtomicU64,
    /// The pushes acknowledged by the current incarnation, and what restarts cost.
    ledger: Mutex<PushLedger>,
    /// Numbered pushes whose delivery was unknown at their deadline, sent again (the same
    /// bytes, so the same number) before the next request; `holding` says whether there are any.
    held: Mutex<Vec<HeldPush>>,
    holding: std::sync::atomic::AtomicBool,
    /// Serializes the re-sending of held pushes, so that a `settle` returns only once they are
    /// delivered (a recovery path: it holds the lock across the network).
    settling: Mutex<()>,
    link: Option<crate::link::EmulatedLink>,
    /// The connection holding this client's RDMA queue pair on the daemon (never pooled).
    rdma_conn: Mutex<Option<Conn>>,
}

/// A numbered push a request carries: its number, its rows, and its place among the requests
/// of its frame (0 for a request alone; its index in a batch).
#[derive(Clone, Copy, Debug)]
struct Numbered {
    seq: u64,
    rows: usize,
    at: usize,
}

/// A request carrying numbered pushes, held after its deadline.
struct HeldPush {
    op: Op,
    frame: Vec<u8>,
    /// Requests in the frame (1 unless it is a batch).
    requests: usize,
    pushes: Vec<Numbered>,
}

impl std::fmt::Debug for TcpShardClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpShardClient")
            .field("addr", &self.addr)
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

impl TcpShardClient {
    /// Connects to the shard at `addr` and shakes hands.
    pub fn connect(addr: &str, config: ClientConfig) -> Result<Self, TransportError> {
        let io_err = |source| TransportError::Io {
            addr: addr.to_string(),
            source,
        };
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(io_err)?
            .next()
            .ok_or_else(|| {
                io_err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "address resolves to nothing",
                ))
            })?;
        let mut client = Self {
            addr: addr.to_string(),
            sockaddr,
            config,
            hello: HelloResponse {
                version: PROTOCOL_VERSION,
                shard: 0,
                shards: 0,
                max_frame: wire::DEFAULT_MAX_FRAME,
                server: String::new(),
                shm_dir: None,
                incarnation: 0,
                pushes: None,
            },
            pool: Mutex::new(Vec::new()),
            traffic: TrafficCounters::default(),
            frames: Mutex::new(Vec::new()),
            stream: PushStream::new().map_err(io_err)?,
            retries: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
            ledger: Mutex::new(PushLedger::default()),
            held: Mutex::new(Vec::new()),
            holding: std::sync::atomic::AtomicBool::new(false),
            settling: Mutex::new(()),
            link: None,
            rdma_conn: Mutex::new(None),
        };
        client.link = client
            .config
            .emulated_link
            .map(crate::link::EmulatedLink::new);
        // A daemon unreachable for a moment: try again, within the deadline; one that refuses
        // (nothing listens) only within `wait_for_daemon`.
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let (conn, hello) = loop {
            let left = client.config.deadline.saturating_sub(start.elapsed());
            match client.open_within(left) {
                Ok(opened) => break opened,
                Err(TransportError::Io { source, addr })
                    if source.kind() == io::ErrorKind::ConnectionRefused =>
                {
                    let waited = start.elapsed();
                    let wait = client.config.wait_for_daemon.min(client.config.deadline);
                    if waited >= wait {
                        return Err(TransportError::Io {
                            addr,
                            source: io::Error::new(
                                io::ErrorKind::ConnectionRefused,
                                format!("connection refused (no daemon listens there): {source}"),
                            ),
                        });
                    }
                    interrupt::sleep(backoff.min(wait - waited)).map_err(io_err)?;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(TransportError::Io { source, .. })
                    if start.elapsed() + backoff < client.config.deadline =>
                {
                    tracing::debug!(shard = addr, error = %source, "connecting again");
                    interrupt::sleep(backoff).map_err(io_err)?;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        };
        client.hello = hello;
        client.put_back(conn);
        Ok(client)
    }

    /// This client's id in the origins of its pushes.
    pub fn client_id(&self) -> u64 {
        self.stream.client()
    }

    /// Numbered pushes sent and not yet settled (acknowledged, refused or given up).
    pub fn unsettled_pushes(&self) -> usize {
        self.stream.unsettled()
    }

    /// Requests sent again after a broken or stalled connection.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Numbers the next push (waiting, within the deadline, while the stream's oldest unsettled
    /// push is too far behind for the shard to remember both).
    fn origin(&self) -> Result<Origin, TransportError> {
        self.stream
            .number(Instant::now() + self.config.deadline)
            .map_err(|e| self.io_err(e))
    }

    /// Push `seq` of `rows` rows ended with `result`: it is settled, or given up with its fate
    /// unknown (reported at the next [`ShardTransport::settle`]) when the shard no longer knows
    /// whether it applied it or its answer could not be read. Not for a held push.
    fn settle_push<R>(&self, seq: u64, rows: usize, result: &Result<R, TransportError>) {
        let unknown = match result {
            Ok(_) => false,
            Err(TransportError::Remote { error, .. }) => {
                error.code == wire::ErrorCode::SequenceForgotten
            }
            Err(TransportError::Protocol { .. }) => true,
            Err(_) => false,
        };
        if unknown {
            tracing::error!(shard = %self.addr, seq, rows, "a push's fate is unknown: it is never sent again, and flush reports it");
            self.stream.give_up(seq, rows as u64);
        } else {
            self.stream.settle(seq);
        }
    }

    /// In a forked child: the parent's stream, pooled connections and held pushes are the
    /// parent's. Drops them (the child draws a stream of its own and connects anew).
    fn claim_for_this_process(&self) -> Result<(), TransportError> {
        if self
            .stream
            .claim_for_this_process()
            .map_err(|e| self.io_err(e))?
        {
            tracing::info!(shard = %self.addr, "a forked process: a push stream and connections of its own");
            self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.holding.store(false, Ordering::Release);
            *self.rdma_conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
            *self.ledger() = PushLedger::default();
        }
        Ok(())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, PushLedger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Push `seq` of `rows` rows was acknowledged in an answer of `incarnation`.
    fn acknowledged(&self, seq: Option<u64>, rows: usize, incarnation: u64) {
        if let Some(seq) = seq {
            self.ledger().acknowledged(seq, rows as u64, incarnation);
        }
    }

    fn io_err(&self, source: io::Error) -> TransportError {
        TransportError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    fn protocol(&self, message: impl Into<String>) -> TransportError {
        TransportError::Protocol {
            addr: self.addr.clone(),
            message: message.into(),
        }
    }

    /// Connects (within `limit`, and the connect timeout) and shakes hands.
    fn open_within(&self, limit: Duration) -> Result<(Conn, HelloResponse), TransportError> {
        let timeout = self
            .config
            .connect_timeout
            .min(limit)
            .max(Duration::from_millis(1));
        let stream =
            TcpStream::connect_timeout(&self.sockaddr, timeout).map_err(|e| self.io_err(e))?;
        stream.set_nodelay(true).map_err(|e| self.io_err(e))?;
        stream
            .set_read_timeout(self.config.io_timeout)
            .map_err(|e| self.io_err(e))?;
        stream
            .set_write_timeout(self.config.io_timeout)
            .map_err(|e| self.io_err(e))?;
        let mut conn = Conn {
            stream,
            recv: Vec::new(),
            idle_since: Instant::now(),
        };
        // With a token: ask for this connection's nonce and answer it; the token never travels.
        let auth = match &self.config.auth {
            None => None,
            Some(token) => {
                let challenge: ChallengeResponse = self.exchange(
                    &mut conn,
                    Op::Challenge,
                    &self.frame(header_only(Op::Challenge, &()))?,
                    |p| self.header(p),
                )?;
                Some(auth::respond(token, &challenge.nonce))
            }
        };
        let hello = HelloRequest {
            magic: MAGIC,
            version: self.config.protocol_version,
            auth,
            client: self.config.name.clone(),
            client_id: Some(self.stream.client()),
        };
        let frame = self.frame(header_only(Op::Hello, &hello))?;
        let reply: HelloResponse =
            self.exchange(&mut conn, Op::Hello, &frame, |p| self.header(p))?;
        if reply.version != PROTOCOL_VERSION {
            return Err(self.protocol(format!(
                "daemon speaks protocol {}, this client {PROTOCOL_VERSION}",
                reply.version
            )));
        }
        let mut ledger = self.ledger();
        let before = ledger.restarts();
        let seen = ledger.greeted(reply.incarnation, reply.pushes.clone());
        if let Seen::Replaced { previous } = seen {
            let now = ledger.restarts();
            tracing::warn!(
                shard = %self.addr,
                incarnation = format!("{:016x}", reply.incarnation),
                previous = format!("{previous:016x}"),
                pushes_rolled_back = now.pushes_rolled_back - before.pushes_rolled_back,
                rows_rolled_back = now.rows_rolled_back - before.rows_rolled_back,
                pushes_unknown = now.pushes_unknown - before.pushes_unknown,
                "the shard restarted"
            );
        }
        if seen == Seen::Retired {
            tracing::warn!(
                shard = %self.addr,
                incarnation = format!("{:016x}", reply.incarnation),
                "a daemon answered a hello as an incarnation already seen replaced"
            );
        }
        // Only through the ledger's incarnations, which never go back to a retired one.
        self.incarnation
            .store(ledger.incarnation(), Ordering::Release);
        drop(ledger);
        Ok((conn, reply))
    }

    fn put_back(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    fn header<T: DeserializeOwned>(&self, parts: FrameParts<'_>) -> Result<T, TransportError> {
        decode_response_header(parts.header).map_err(|e| self.protocol(e.to_string()))
    }

    /// A request frame, encoded by `encode` and checked against the frame limits.
    fn frame(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<u8>, TransportError> {
        let mut frame = self
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        encode(&mut frame);
        let send_max = self.hello.max_frame.min(self.config.max_frame);
        wire::finish_frame(&mut frame, send_max).map_err(|e| TransportError::InvalidRequest {
            addr: self.addr.clone(),
            message: format!("{e}: split the batch"),
        })?;
        Ok(frame)
    }

    /// Sends one request frame on `conn` and parses the response. The connection stays usable
    /// after an error response; any other failure leaves it in an unknown state.
    fn exchange<R>(
        &self,
        conn: &mut Conn,
        op: Op,
        frame: &[u8],
        parse: impl FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let parts = self.send_and_receive(conn, op, frame)?;
        parse(parts)
    }

    /// Sends one request frame on `conn` and reads its answer, which must be a success of `op`
    /// (an error answer is returned as [`TransportError::Remote`]).
    fn send_and_receive<'c>(
        &self,
        conn: &'c mut Conn,
        op: Op,
        frame: &[u8],
    ) -> Result<FrameParts<'c>, TransportError> {
        conn.stream.write_all(frame).map_err(|e| self.io_err(e))?;
        self.traffic.sent(frame.len());
        if let Some(link) = &self.link {
            crate::link::EmulatedLink::pass(&link.up, frame.len());
        }

        let mut prefix = [0u8; PREFIX_BYTES];
        read_full(&mut conn.stream, &mut prefix).map_err(|e| self.io_err(e))?;
        let len = wire::body_len(prefix, self.config.max_frame.max(self.hello.max_frame))
            .map_err(|e| self.protocol(e.to_string()))?;
        conn.recv.clear();
        conn.recv.resize(len as usize, 0);
        read_full(&mut conn.stream, &mut conn.recv).map_err(|e| {
            self.io_err(match e.kind() {
                io::ErrorKind::UnexpectedEof => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed inside a response of {len} bytes"),
                ),
                _ => e,
            })
        })?;
        let got = len as usize;
        self.traffic.received(PREFIX_BYTES + got);
        if let Some(link) = &self.link {
            crate::link::EmulatedLink::pass(&link.down, PREFIX_BYTES + got);
        }
        // The incarnation an answer carries travels with it (its payload's `incarnation`); the
        // client's current one changes only with a hello (open_within).
        let parts = split_response(&conn.recv).map_err(|e| self.protocol(e.to_string()))?;
        if parts.status == Status::Error as u8 {
            let error: WireError = self.header(parts)?;
            return Err(TransportError::Remote {
                addr: self.addr.clone(),
                error,
            });
        }
        if parts.op != op as u8 || parts.status != Status::Ok as u8 {
            return Err(self.protocol(format!(
                "response op {} status {} to a {op:?} request",
                parts.op, parts.status
            )));
        }
        Ok(parts)
    }

    /// One call on a pooled connection: `encode` starts the request frame (a codec's
    /// `encode_request`, or [`header_only`]), `parse` reads the answer.
    ///
    /// A request that may be sent again (every one but a checkpoint, an assignment and an RDMA
    /// connect; pushes carry their origin) is retried on a new connection after an I/O error
    /// until the deadline: the same bytes each time, so a push keeps its number.
    fn call<R>(
        &self,
        op: Op,
        encode: impl FnOnce(&mut Vec<u8>),
        parse: impl FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        self.deliver_held()?;
        let frame = self.frame(encode)?;
        let result = self.send_until_deadline(op, &frame, parse);
        self.recycle(frame);
        result
    }

    /// [`Self::call`] for a request that carries push `seq` of `rows` rows: when its delivery is
    /// still unknown at the deadline, the request is held (its bytes, so its number) and sent
    /// again before the next request, and the error is [`TransportError::Held`].
    fn call_push<R>(
        &self,
        op: Op,
        push: Option<(u64, usize)>,
        frame: Vec<u8>,
        parse: impl FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let result = self.send_until_deadline(op, &frame, parse);
        if let (Some((seq, rows)), false) = (push, matches!(result, Err(TransportError::Io { .. })))
        {
            self.settle_push(seq, rows, &result);
        }
        match (result, push) {
            (Err(TransportError::Io { source, .. }), Some((seq, rows))) => {
                let pushes = vec![Numbered { seq, rows, at: 0 }];
                Err(self.hold(op, frame, 1, pushes, source))
            }
            (result, _) => {
                self.recycle(frame);
                result
            }
        }
    }

    /// Holds a request whose numbered `pushes` were unanswered at the deadline (`source`), to
    /// be sent again, the same bytes, before the next request; returns the error that says so.
    fn hold(
        &self,
        op: Op,
        frame: Vec<u8>,
        requests: usize,
        pushes: Vec<Numbered>,
        source: io::Error,
    ) -> TransportError {
        for n in &pushes {
            tracing::warn!(shard = %self.addr, seq = n.seq, rows = n.rows, error = %source, "push unanswered at its deadline: held, to be sent again under its number");
        }
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(HeldPush {
                op,
                frame,
                requests,
                pushes,
            });
        self.holding.store(true, Ordering::Release);
        TransportError::Held {
            addr: self.addr.clone(),
            source,
        }
    }

    /// Settles the numbered `pushes` of an answered request: `answers[n.at]` is the incarnation
    /// that applied push `n`, or the error that refused it.
    fn settle_answered(&self, pushes: &[Numbered], answers: &[Result<u64, TransportError>]) {
        for n in pushes {
            match &answers[n.at] {
                Ok(incarnation) => {
                    self.acknowledged(Some(n.seq), n.rows, *incarnation);
                    self.stream.settle(n.seq);
                }
                Err(e) => self.settle_push(n.seq, n.rows, &Err::<(), _>(e.again())),
            }
        }
    }

    /// Sends every held push again, each until its deadline; fails (keeping what is left) while
    /// the shard cannot be reached.
    fn deliver_held(&self) -> Result<(), TransportError> {
        self.claim_for_this_process()?;
        if !self.holding.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.settling.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        while let Some(h) = pending.first() {
            let result = self.send_until_deadline(h.op, &h.frame, |p| {
                if h.op == Op::Batch {
                    batch::answered(self, &p, h.requests)
                } else {
                    Ok(vec![Ok(p.incarnation)])
                }
            });
            match result {
                Err(e @ TransportError::Io { .. }) => {
                    let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                    pending.append(&mut held);
                    *held = pending;
                    return Err(e);
                }
                Err(e) => {
                    // Refused (not applied), or its fate unknown: sending it again cannot help.
                    for n in &h.pushes {
                        tracing::error!(shard = %self.addr, seq = n.seq, rows = n.rows, error = %e, "a held push could not be delivered");
                        self.settle_push(n.seq, n.rows, &Err::<(), _>(e.again()));
                    }
                }
                Ok(answers) => self.settle_answered(&h.pushes, &answers),
            }
            let done = pending.remove(0);
            self.recycle(done.frame);
        }
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        self.holding.store(!held.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Keeps a request buffer for the next call (a few, of up to 4 MiB each).
    fn recycle(&self, frame: Vec<u8>) {
        let mut spare = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < 16 && frame.capacity() <= 4 << 20 {
            spare.push(frame);
        }
    }

    /// Sends `frame` and parses its answer, on new connections after I/O errors, until the
    /// deadline (see [`Self::call`]).
    fn send_until_deadline<R>(
        &self,
        op: Op,
        frame: &[u8],
        parse: impl FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let again = !matches!(op, Op::Checkpoint | Op::Assign | Op::RdmaConnect);
        let start = Instant::now();
        let deadline = self.config.deadline;
        let mut parse = Some(parse);
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_sub(start.elapsed());
            let mut sent = false;
            let result = self.attempt(op, frame, left, &mut parse, &mut sent);
            let error = match result {
                // An interrupted call is not sent again: the caller wants it to end.
                Err(TransportError::Io { source, .. })
                    if source.kind() == io::ErrorKind::Interrupted =>
                {
                    return Err(self.io_err(source))
                }
                Err(e @ TransportError::Io { .. }) => e,
                other => return other,
            };
            let waited = start.elapsed();
            if !again || waited + backoff >= deadline {
                let TransportError::Io { source, .. } = error else {
                    unreachable!("only I/O errors are retried")
                };
                let outcome = if !again && sent {
                    format!(
                        "; the connection failed after the {op:?} request was sent, so whether \
                         the shard carried it out is unknown (it is never sent twice)"
                    )
                } else {
                    String::new()
                };
                return Err(self.io_err(io::Error::new(
                    source.kind(),
                    format!(
                        "{source} ({attempts} attempt{} over {:.1} s; the deadline is {:.1} s){outcome}",
                        if attempts == 1 { "" } else { "s" },
                        waited.as_secs_f64(),
                        deadline.as_secs_f64()
                    ),
                )));
            }
            tracing::debug!(shard = %self.addr, ?op, attempts, error = %error, "sending the request again");
            self.retries.fetch_add(1, Ordering::Relaxed);
            interrupt::sleep(backoff).map_err(|e| self.io_err(e))?;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One try of a call: a pooled or new connection whose timeouts end within `left`.
    fn attempt<R, P>(
        &self,
        op: Op,
        frame: &[u8],
        left: Duration,
        parse: &mut Option<P>,
        sent: &mut bool,
    ) -> Result<R, TransportError>
    where
        P: FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    {
        let left = left.max(Duration::from_millis(1));
        let pooled = loop {
            let conn = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match conn {
                Some(c) if c.idle_since.elapsed() > CHECK_IDLE_AFTER && c.closed_by_peer() => {
                    tracing::debug!(shard = %self.addr, "a pooled connection was closed by the daemon");
                }
                c => break c,
            }
        };
        let mut conn = match pooled {
            Some(c) => c,
            None => self.open_within(left)?.0,
        };
        let limit = Some(self.config.io_timeout.map_or(left, |t| t.min(left)));
        conn.stream
            .set_read_timeout(limit)
            .and_then(|()| conn.stream.set_write_timeout(limit))
            .map_err(|e| self.io_err(e))?;
        *sent = true;
        let result = self
            .send_and_receive(&mut conn, op, frame)
            .and_then(|parts| (parse.take().expect("an answer is parsed once"))(parts));
        match &result {
            Ok(_)
            | Err(TransportError::Remote { .. })
            | Err(TransportError::InvalidRequest { .. }) => self.put_back(conn),
            Err(_) => {} // drop the connection: its stream may be mid-frame
        }
        result
    }

    /// A conditional pull, and the pushed rows it carries, in one request.
    fn pull_if_stale_request(
        &self,
        q: &StaleQuery<'_>,
        out: &mut StaleRows,
    ) -> Result<PushResponse, TransportError> {
        let (keys, clocks, push) = (q.keys, q.clocks, q.push);
        if keys.len() != clocks.len() || push.is_some_and(|p| !p.lengths_agree()) {
            return Err(TransportError::InvalidRequest {
                addr: self.addr.clone(),
                message: format!(
                    "{} keys but {} clocks, or push keys, counts and bases of unequal length",
                    keys.len(),
                    clocks.len()
                ),
            });
        }
        let push_rows = push.map_or(0, |p| p.keys.len() as u32);
        self.deliver_held()?;
        let origin = push.map(|_| self.origin()).transpose()?;
        let seq = origin.map(|o| o.seq);
        let frame = self
            .frame(|buf| codec::pull_if_stale::encode_request(buf, q, origin))
            .inspect_err(|_| seq.into_iter().for_each(|s| self.stream.settle(s)))?;
        self.call_push(
            Op::PullIfStale,
            seq.map(|s| (s, push_rows as usize)),
            frame,
            |p| {
                self.acknowledged(seq, push_rows as usize, p.incarnation);
                self.stale_answer(&p, q, out)
            },
        )
    }

    /// Decodes the answer to conditional pull `q` into `out`; returns its push's acknowledgement.
    fn stale_answer(
        &self,
        p: &FrameParts<'_>,
        q: &StaleQuery<'_>,
        out: &mut StaleRows,
    ) -> Result<PushResponse, TransportError> {
        let h = codec::pull_if_stale::decode_response(p, q, out).map_err(|e| self.malformed(e))?;
        out.incarnation = p.incarnation;
        Ok(PushResponse {
            rows: q.push.map_or(0, |p| p.keys.len() as u32),
            updates: h.pushed_updates,
            refused: h.push_refused,
            duplicate: h.push_duplicate,
            produced: h.produced,
            state_len: h.state_len,
            steps: h.steps,
            births: h.births,
            refused_rows: 0,
            incarnation: p.incarnation,
        })
    }

    /// Decodes the answer to a pull of `keys`, appending to `versions` and `rows`.
    fn pull_answer(
        &self,
        p: &FrameParts<'_>,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<Pulled, TransportError> {
        let r = codec::pull::decode_response(p, keys.len()).map_err(|e| self.malformed(e))?;
        extend_u64s(versions, r.versions);
        extend_f32s(rows, r.rows);
        Ok(Pulled {
            clock: r.header.table_clock,
            incarnation: p.incarnation,
        })
    }

    /// Decodes the answer to a push of `rows` into its acknowledgement (`produced` replaced).
    fn push_answer(
        &self,
        p: &FrameParts<'_>,
        rows: &PushRef<'_>,
        produced: &mut Produced,
    ) -> Result<PushResponse, TransportError> {
        let n = rows.keys.len();
        let dim = rows.grads.len().checked_div(n).unwrap_or(0);
        let ack =
            codec::push::decode_response(p, n, dim, produced).map_err(|e| self.malformed(e))?;
        Ok(PushResponse {
            incarnation: p.incarnation,
            ..ack
        })
    }

    fn malformed(&self, e: wire::FrameError) -> TransportError {
        self.protocol(e.to_string())
    }
}

/// Reads exactly `buf.len()` bytes. While an interruptible call runs
/// ([`hetkv_transport::interrupt`]), the socket's read timeout is cut into slices with a check
/// between them; each read still waits at most the timeout the caller set, as without slices.
fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    if !interrupt::active() {
        return stream.read_exact(buf);
    }
    let timeout = stream.read_timeout()?;
    stream.set_read_timeout(Some(
        timeout.map_or(interrupt::SLICE, |t| t.min(interrupt::SLICE)),
    ))?;
    let mut until = timeout.map(|t| Instant::now() + t);
    let mut at = 0;
    let result = loop {
        if at == buf.len() {
            break Ok(());
        }
        match stream.read(&mut buf[at..]) {
            Ok(0) => break Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => {
                at += n;
                until = timeout.map(|t| Instant::now() + t);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if interrupt::interrupted() {
                    break Err(interrupt::error());
                }
                if until.is_some_and(|u| Instant::now() >= u) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let _ = stream.set_read_timeout(timeout);
    result
}

/// Starts a frame of op `op` whose request is its header alone.
fn header_only<H: Serialize>(op: Op, header: &H) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |out| wire::start_frame(out, op as u8, Status::Ok, header)
}

fn extend_u64s(out: &mut Vec<u64>, a: U64s<'_>) {
    out.clear();
    out.extend(a.iter());
}

fn extend_f32s(out: &mut Vec<f32>, a: F32s<'_>) {
    out.clear();
    out.extend(a.iter());
}

impl ShardTransport for TcpShardClient {
    fn addr(&self) -> &str {
        &self.addr
    }

    fn hello(&self) -> &HelloResponse {
        &self.hello
    }

    fn list_tables(&self) -> Result<Vec<TableInfo>, TransportError> {
        self.call(Op::ListTables, header_only(Op::ListTables, &()), |p| {
            Ok(self.header::<TablesResponse>(p)?.tables)
        })
    }

    fn create_table(&self, spec: &TableSpec) -> Result<CreateResponse, TransportError> {
        let req = CreateRequest { spec: spec.clone() };
        self.call(Op::CreateTable, header_only(Op::CreateTable, &req), |p| {
            self.header(p)
        })
    }

    fn drop_table(&self, table: &str) -> Result<bool, TransportError> {
        let req = TableRequest {
            table: table.to_string(),
        };
        self.call(Op::DropTable, header_only(Op::DropTable, &req), |p| {
            Ok(self.header::<wire::DropResponse>(p)?.dropped)
        })
    }

    fn region_info(&self, table: &str) -> Result<RegionDescriptor, TransportError> {
        let req = TableRequest {
            table: table.to_string(),
        };
        self.call(Op::RegionInfo, header_only(Op::RegionInfo, &req), |p| {
            let incarnation = p.incarnation;
            Ok(RegionDescriptor {
                incarnation,
                ..self.header(p)?
            })
        })
    }

    fn read(&self, spans: &[Span], out: &mut Vec<u8>) -> Result<(), TransportError> {
        let want: u64 = spans.iter().map(|s| s.len as u64).sum();
        self.call(
            Op::Read,
            |buf| codec::read::encode_request(buf, spans),
            |p| {
                let bytes =
                    codec::read::decode_response(&p, want).map_err(|e| self.malformed(e))?;
                out.clear();
                out.extend_from_slice(bytes);
                Ok(())
            },
        )
    }

    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<Pulled, TransportError> {
        self.call(
            Op::Pull,
            |buf| codec::pull::encode_request(buf, table, keys),
            |p| self.pull_answer(&p, keys, versions, rows),
        )
    }

    fn exchange_batch(&self, requests: &[Exchange<'_>], outs: &mut [StaleRows]) -> Vec<Carried> {
        batch::exchange(self, requests, outs)
    }

    fn pull_if_stale(&self, q: &StaleQuery<'_>, out: &mut StaleRows) -> Carried {
        Carried::one_request(q.push.is_some(), self.pull_if_stale_request(q, out))
    }

    fn push_rows(
        &self,
        table: &str,
        rows: &PushRef<'_>,
        produced: &mut Produced,
    ) -> Result<PushResponse, TransportError> {
        if !rows.lengths_agree() {
            return Err(TransportError::InvalidRequest {
                addr: self.addr.clone(),
                message: format!(
                    "{} keys but {} counts, or bases of another length",
                    rows.keys.len(),
                    rows.counts.len()
                ),
            });
        }
        produced.clear();
        self.deliver_held()?;
        let origin = self.origin()?;
        let seq = Some(origin.seq);
        let n = rows.keys.len();
        let frame = self
            .frame(|buf| codec::push::encode_request(buf, table, rows, origin))
            .inspect_err(|_| self.stream.settle(origin.seq))?;
        self.call_push(Op::Push, seq.map(|s| (s, n)), frame, |p| {
            self.acknowledged(seq, n, p.incarnation);
            self.push_answer(&p, rows, produced)
        })
    }

    fn assign(
        &self,
        table: &str,
        rows: &codec::assign::Assignment<'_>,
    ) -> Result<PushResponse, TransportError> {
        self.call(
            Op::Assign,
            |buf| codec::assign::encode_request(buf, table, rows),
            |p| {
                let incarnation = p.incarnation;
                Ok(PushResponse {
                    incarnation,
                    ..self.header(p)?
                })
            },
        )
    }

    fn scan(
        &self,
        table: &str,
        dim: u32,
        from: u64,
        slots: u32,
    ) -> Result<codec::scan::Scanned, TransportError> {
        self.call(
            Op::Scan,
            |buf| codec::scan::encode_request(buf, table, from, slots),
            |p| codec::scan::decode_response(&p, slots, dim).map_err(|e| self.malformed(e)),
        )
    }

    fn evictions(
        &self,
        table: &str,
        cursor: u64,
        max: u32,
    ) -> Result<hetkv_transport::wire::EvictionsResponse, TransportError> {
        let req = hetkv_transport::wire::EvictionsRequest {
            table: table.to_string(),
            cursor,
            max,
        };
        self.call(Op::Evictions, header_only(Op::Evictions, &req), |p| {
            self.header(p)
        })
    }

    fn advance_step(
        &self,
        table: &str,
        step: u64,
    ) -> Result<hetkv_transport::wire::AdvanceStepResponse, TransportError> {
        let req = hetkv_transport::wire::AdvanceStepRequest {
            table: table.to_string(),
            step,
        };
        self.call(Op::AdvanceStep, header_only(Op::AdvanceStep, &req), |p| {
            self.header(p)
        })
    }

    fn checkpoint(
        &self,
        name: &str,
        incremental: bool,
    ) -> Result<CheckpointResponse, TransportError> {
        let req = CheckpointRequest {
            name: name.to_string(),
            incremental,
        };
        self.call(Op::Checkpoint, header_only(Op::Checkpoint, &req), |p| {
            self.header(p)
        })
    }

    fn stats(&self) -> Result<ShardStats, TransportError> {
        self.call(Op::Stats, header_only(Op::Stats, &()), |p| self.header(p))
    }

    fn traffic(&self) -> Traffic {
        self.traffic.snapshot()
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    fn restarts(&self) -> Restarts {
        self.ledger().restarts()
    }

    fn settle(&self) -> Result<(), TransportError> {
        self.deliver_held()?;
        match self.stream.take_unknown() {
            (0, _) => Ok(()),
            (pushes, rows) => Err(TransportError::Unknown {
                addr: self.addr.clone(),
                pushes,
                rows,
            }),
        }
    }

    /// On a connection of its own, opened for it and never pooled: the daemon holds the queue
    /// pair for the life of the connection that asked, so it must not die with a pooled
    /// connection's error or idle close. A new queue pair's connection replaces the previous one
    /// (whose queue pair the daemon then drops).
    fn rdma_connect(&self, ours: &Endpoint) -> Result<Endpoint, TransportError> {
        self.claim_for_this_process()?;
        let frame = self.frame(header_only(Op::RdmaConnect, ours))?;
        let (mut conn, _) = self.open_within(self.config.deadline)?;
        let limit = self.config.io_timeout.unwrap_or(self.config.deadline);
        conn.stream
            .set_read_timeout(Some(limit))
            .and_then(|()| conn.stream.set_write_timeout(Some(limit)))
            .map_err(|e| self.io_err(e))?;
        let theirs = self.exchange(&mut conn, Op::RdmaConnect, &frame, |p| self.header(p));
        self.recycle(frame);
        let theirs = theirs?;
        *self.rdma_conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
        Ok(theirs)
    }
}
