//! The blocking TCP client of one shard.
//!
//! Trainers call the store from their own threads and wait for each answer, so the client is
//! blocking (`std::net`), with a pool of connections: a call takes a connection, uses it and puts
//! it back. No lock is held across network I/O, threads never queue behind one socket, and no
//! async runtime sits between a trainer thread and its socket.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use hetkv_transport::client::{
    Carried, ShardTransport, StaleQuery, StaleRows, Traffic, TrafficCounters, TransportError,
};
use hetkv_transport::spec::{TableInfo, TableSpec};
use hetkv_transport::wire::{
    self, decode_response_header, split_response, ChallengeResponse, CheckpointRequest,
    CheckpointResponse, CreateRequest, CreateResponse, Endpoint, F32s, FrameParts, HelloRequest,
    HelloResponse, Op, PushResponse, RegionDescriptor, ShardStats, Span, Status, TableRequest,
    TablesResponse, U64s, WireError, MAGIC, PREFIX_BYTES, PROTOCOL_VERSION,
};
use hetkv_transport::{auth, codec};
use serde::{de::DeserializeOwned, Serialize};

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
        }
    }
}

struct Conn {
    stream: TcpStream,
    send: Vec<u8>,
    recv: Vec<u8>,
}

/// A connection pool to one shard, implementing [`ShardTransport`].
pub struct TcpShardClient {
    addr: String,
    sockaddr: SocketAddr,
    config: ClientConfig,
    hello: HelloResponse,
    pool: Mutex<Vec<Conn>>,
    traffic: TrafficCounters,
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
            },
            pool: Mutex::new(Vec::new()),
            traffic: TrafficCounters::default(),
        };
        let (conn, hello) = client.open()?;
        client.hello = hello;
        client.put_back(conn);
        Ok(client)
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

    fn open(&self) -> Result<(Conn, HelloResponse), TransportError> {
        let stream = TcpStream::connect_timeout(&self.sockaddr, self.config.connect_timeout)
            .map_err(|e| self.io_err(e))?;
        stream.set_nodelay(true).map_err(|e| self.io_err(e))?;
        stream
            .set_read_timeout(self.config.io_timeout)
            .map_err(|e| self.io_err(e))?;
        stream
            .set_write_timeout(self.config.io_timeout)
            .map_err(|e| self.io_err(e))?;
        let mut conn = Conn {
            stream,
            send: Vec::new(),
            recv: Vec::new(),
        };
        // With a token: ask for this connection's nonce and answer it; the token never travels.
        let auth = match &self.config.auth {
            None => None,
            Some(token) => {
                let challenge: ChallengeResponse = self.exchange(
                    &mut conn,
                    Op::Challenge,
                    header_only(Op::Challenge, &()),
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
        };
        let reply: HelloResponse =
            self.exchange(&mut conn, Op::Hello, header_only(Op::Hello, &hello), |p| {
                self.header(p)
            })?;
        if reply.version != PROTOCOL_VERSION {
            return Err(self.protocol(format!(
                "daemon speaks protocol {}, this client {PROTOCOL_VERSION}",
                reply.version
            )));
        }
        Ok((conn, reply))
    }

    fn take(&self) -> Result<Conn, TransportError> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => Ok(self.open()?.0),
        }
    }

    fn put_back(&self, conn: Conn) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    fn header<T: DeserializeOwned>(&self, parts: FrameParts<'_>) -> Result<T, TransportError> {
        decode_response_header(parts.header).map_err(|e| self.protocol(e.to_string()))
    }

    /// Sends one request on `conn` and parses the response. The connection stays usable after
    /// an error response; any other failure leaves it in an unknown state.
    fn exchange<R>(
        &self,
        conn: &mut Conn,
        op: Op,
        encode: impl FnOnce(&mut Vec<u8>),
        parse: impl FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        encode(&mut conn.send);
        let send_max = self.hello.max_frame.min(self.config.max_frame);
        wire::finish_frame(&mut conn.send, send_max).map_err(|e| {
            TransportError::InvalidRequest {
                addr: self.addr.clone(),
                message: format!("{e}: split the batch"),
            }
        })?;
        conn.stream
            .write_all(&conn.send)
            .map_err(|e| self.io_err(e))?;
        self.traffic.sent(conn.send.len());

        let mut prefix = [0u8; PREFIX_BYTES];
        conn.stream
            .read_exact(&mut prefix)
            .map_err(|e| self.io_err(e))?;
        let len = wire::body_len(prefix, self.config.max_frame.max(self.hello.max_frame))
            .map_err(|e| self.protocol(e.to_string()))?;
        conn.recv.clear();
        let got = (&mut conn.stream)
            .take(len as u64)
            .read_to_end(&mut conn.recv)
            .map_err(|e| self.io_err(e))?;
        if got != len as usize {
            return Err(self.io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {got} of {len} response bytes"),
            )));
        }
        self.traffic.received(PREFIX_BYTES + got);
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
        parse(parts)
    }

    /// One call on a pooled connection: `encode` starts the request frame (a codec's
    /// `encode_request`, or [`header_only`]), `parse` reads the answer.
    fn call<R>(
        &self,
        op: Op,
        encode: impl FnOnce(&mut Vec<u8>),
        parse: impl FnOnce(FrameParts<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let mut conn = self.take()?;
        let result = self.exchange(&mut conn, op, encode, parse);
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
        if keys.len() != clocks.len() || push.is_some_and(|p| p.keys.len() != p.counts.len()) {
            return Err(TransportError::InvalidRequest {
                addr: self.addr.clone(),
                message: format!(
                    "{} keys but {} clocks, or push keys and counts of unequal length",
                    keys.len(),
                    clocks.len()
                ),
            });
        }
        let push_rows = push.map_or(0, |p| p.keys.len() as u32);
        self.call(
            Op::PullIfStale,
            |buf| codec::pull_if_stale::encode_request(buf, q),
            |p| {
                let r = codec::pull_if_stale::decode_response(&p, keys.len())
                    .map_err(|e| self.malformed(e))?;
                out.indices.clear();
                out.indices
                    .extend((0..r.indices.len()).map(|i| r.indices.get_u32(i)));
                extend_u64s(&mut out.versions, r.versions);
                extend_f32s(&mut out.rows, r.rows);
                out.table_clock = r.header.table_clock;
                out.since_held = r.header.since_held;
                Ok(PushResponse {
                    rows: push_rows,
                    updates: r.header.pushed_updates,
                })
            },
        )
    }

    fn malformed(&self, e: wire::FrameError) -> TransportError {
        self.protocol(e.to_string())
    }
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
    out.extend(a.iter_f32());
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

    fn region_info(&self, table: &str) -> Result<RegionDescriptor, TransportError> {
        let req = TableRequest {
            table: table.to_string(),
        };
        self.call(Op::RegionInfo, header_only(Op::RegionInfo, &req), |p| {
            self.header(p)
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
    ) -> Result<u64, TransportError> {
        self.call(
            Op::Pull,
            |buf| codec::pull::encode_request(buf, table, keys),
            |p| {
                let r =
                    codec::pull::decode_response(&p, keys.len()).map_err(|e| self.malformed(e))?;
                extend_u64s(versions, r.versions);
                extend_f32s(rows, r.rows);
                Ok(r.header.table_clock)
            },
        )
    }

    fn pull_if_stale(&self, q: &StaleQuery<'_>, out: &mut StaleRows) -> Carried {
        Carried::one_request(q.push.is_some(), self.pull_if_stale_request(q, out))
    }

    fn push(
        &self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, TransportError> {
        if keys.len() != counts.len() {
            return Err(TransportError::InvalidRequest {
                addr: self.addr.clone(),
                message: format!("{} keys but {} counts", keys.len(), counts.len()),
            });
        }
        self.call(
            Op::Push,
            |buf| codec::push::encode_request(buf, table, keys, counts, grads),
            |p| self.header(p),
        )
    }

    fn assign(
        &self,
        table: &str,
        keys: &[u64],
        values: &[f32],
    ) -> Result<PushResponse, TransportError> {
        self.call(
            Op::Assign,
            |buf| codec::assign::encode_request(buf, table, keys, values),
            |p| self.header(p),
        )
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

    fn rdma_connect(&self, ours: &Endpoint) -> Result<Endpoint, TransportError> {
        self.call(Op::RdmaConnect, header_only(Op::RdmaConnect, ours), |p| {
            self.header(p)
        })
    }
}
