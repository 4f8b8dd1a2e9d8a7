//! Helpers shared by hetkv's integration tests: raw protocol frames over real sockets, for the
//! tests that must send what no well-behaved client would.
#![forbid(unsafe_code)]

pub mod model;
pub mod proxy;
pub mod sim;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hetkv_transport::wire::{
    self, decode_header, split_response, HelloRequest, Op, Status, WireError, MAGIC,
    PROTOCOL_VERSION,
};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

/// A raw connection to a shard.
pub struct RawConn {
    /// The socket.
    pub stream: TcpStream,
}

/// A response frame as received.
#[derive(Debug)]
pub struct RawResponse {
    /// Op byte.
    pub op: u8,
    /// Status byte.
    pub status: u8,
    /// Header bytes.
    pub header: Vec<u8>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl RawResponse {
    /// The error carried, if the status says error.
    pub fn error(&self) -> Option<WireError> {
        (self.status == Status::Error as u8)
            .then(|| decode_header(&self.header).expect("error header"))
    }
}

impl RawConn {
    /// Connects with a 10 s read timeout.
    pub fn connect(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self { stream }
    }

    /// Connects and completes a hello.
    pub fn greeted(addr: &str) -> Self {
        let mut c = Self::connect(addr);
        let hello = HelloRequest {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            auth: None,
            client: "raw test".into(),
            client_id: None,
        };
        c.send(Op::Hello as u8, &hello, &[]);
        let r = c.recv().expect("hello response");
        assert!(r.error().is_none(), "hello refused: {:?}", r.error());
        c
    }

    /// Sends one well-formed frame.
    pub fn send<H: Serialize>(&mut self, op: u8, header: &H, payload: &[u8]) {
        let mut frame = Vec::new();
        wire::start_frame(&mut frame, op, Status::Ok, header);
        frame.extend_from_slice(payload);
        wire::finish_frame(&mut frame, u32::MAX).expect("finish");
        self.stream.write_all(&frame).expect("send");
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Receives one response frame, or `None` when the daemon closed the connection. Panics
    /// when nothing came within the read timeout: silence is not a close.
    pub fn recv(&mut self) -> Option<RawResponse> {
        let mut prefix = [0u8; 4];
        if let Err(e) = self.stream.read_exact(&mut prefix) {
            assert!(
                closed_by_peer(&e),
                "neither an answer nor a close within the read timeout: {e}"
            );
            return None;
        }
        let len = u32::from_le_bytes(prefix) as usize;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).expect("body");
        let parts = split_response(&body).expect("well-formed response");
        Some(RawResponse {
            op: parts.op,
            status: parts.status,
            header: parts.header.to_vec(),
            payload: parts.payload.to_vec(),
        })
    }

    /// Whether the daemon closed the connection (reads EOF or a reset).
    /// A connection still open when the read timeout (10 s) passes is not closed: a daemon that
    /// never closes it fails the caller's assertion rather than passing it.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => closed_by_peer(&e),
        }
    }
}

/// Whether a read error means the peer closed (reset, aborted) rather than a timeout.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut | Interrupted => false,
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => true,
        _ => true,
    }
}

/// The versions and rows of `keys` in table `table` of cluster `c` (a direct pull).
pub fn versions_and_rows(
    c: &hetkv_client::Cluster,
    table: &str,
    keys: &[u64],
) -> (Vec<u64>, Vec<f32>) {
    let t = c.open_table(table).unwrap();
    let mut values = vec![0f32; keys.len() * t.spec().dim as usize];
    let mut versions = vec![0u64; keys.len()];
    t.pull(keys, &mut values, Some(&mut versions)).unwrap();
    (versions, values)
}

/// Every optimizer the shards offer, at the learning rates the exactness tests train with.
pub fn every_optimizer() -> [OptimizerSpec; 4] {
    [
        OptimizerSpec::sgd(0.1),
        OptimizerSpec::adagrad(0.1),
        OptimizerSpec::rowwise_adagrad(0.1),
        OptimizerSpec::adam(0.01),
    ]
}

/// A table spec for tests: uniform init, SGD.
pub fn sgd_table(name: &str, rows: u64, dim: u32, lr: f32) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows,
        dim,
        init: Initializer::Uniform {
            bound: 0.1,
            seed: 11,
        },
        optimizer: OptimizerSpec::Sgd { lr },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

/// A small deterministic generator (SplitMix64) so tests need no RNG crate.
#[derive(Clone, Debug)]
pub struct TestRng(pub u64);

impl TestRng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[-1, 1)`.
    pub fn signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
