//! The tokio TCP server: accepts connections and moves frames between sockets and a
//! [`Session`]. Every protocol rule lives in the session; this module only enforces the frame
//! limit before reading a body, times out stalled and silent peers, admits a bounded number of
//! peers that have not completed their hello, and stops gracefully.
//!
//! Admission before authentication: a new connection must complete its hello within
//! `hello_timeout`, may send no frame larger than `hello_max_frame` until then, and is one of at
//! most `max_pending_hellos` such connections: a newer one displaces the oldest. So connections
//! that never speak cannot fill the connection slots or hold memory, and a client that completes
//! its hello at once gets in however many silent peers are arriving.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hetkv_transport::service::{ServerCounters, Session, ShardService};
use hetkv_transport::wire::{self, ErrorCode, FrameError, Op, Status, WireError, PREFIX_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest frame body accepted or sent.
    pub max_frame: u32,
    /// How long a peer may take to deliver the rest of a frame it started.
    pub frame_timeout: Duration,
    /// How long in-flight requests get to finish at shutdown before their connections are cut.
    pub shutdown_grace: Duration,
    /// Most connections served at once; further ones are closed on arrival, with a log line.
    pub max_connections: usize,
    /// How long a new connection has to complete its hello.
    pub hello_timeout: Duration,
    /// Largest frame body accepted before the hello succeeded (a hello is a few hundred bytes).
    pub hello_max_frame: u32,
    /// Connections that have not completed their hello, at most; a newer one displaces the
    /// oldest.
    pub max_pending_hellos: usize,
    /// How long writing one answer may take: a peer that stops reading is dropped then, and its
    /// buffers freed.
    pub write_timeout: Duration,
    /// How long a greeted connection may stay silent between requests (`None`, the default:
    /// forever). A trainer's pooled connections can be idle for long stretches, and a client
    /// sees a connection the daemon closed as an I/O error on its next call, so this is for
    /// operators who prefer freeing idle connections to that.
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_frame: wire::DEFAULT_MAX_FRAME,
            frame_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_connections: 4096,
            hello_timeout: Duration::from_secs(5),
            hello_max_frame: 16 << 10,
            max_pending_hellos: 64,
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// A bound TCP server for one shard.
pub struct TcpServer {
    listener: TcpListener,
    service: Arc<dyn ShardService>,
    config: ServerConfig,
}

impl TcpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(
        addr: SocketAddr,
        service: Arc<dyn ShardService>,
        config: ServerConfig,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            service,
            config,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
    /// (within the grace period) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let pending = Arc::new(Pending::new(self.config.max_pending_hellos));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) if connections.len() >= self.config.max_connections => {
                        tracing::warn!(%peer, limit = self.config.max_connections, "too many connections: closing the new one");
                        drop(stream);
                    }
                    Ok((stream, peer)) => {
                        ServerCounters::add(&self.service.counters().connections, 1);
                        let service = self.service.clone();
                        let config = self.config.clone();
                        let stop = stop_rx.clone();
                        let admitted = Pending::admit(&pending);
                        connections.spawn(async move {
                            connection(stream, peer, service, config, stop, admitted).await;
                        });
                    }
                    Err(e) => {
                        // Out of descriptors and the like: log, back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = joined {
                        tracing::error!(error = %e, "connection task failed");
                    }
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!(open = connections.len(), "stopping: no new connections");
        let _ = stop_tx.send(true);
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.shutdown_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                open = connections.len(),
                "grace period over: closing connections"
            );
            connections.shutdown().await;
        }
        Ok(())
    }
}

/// The connections that have not completed their hello, oldest first.
#[derive(Debug)]
struct Pending {
    max: usize,
    next: AtomicU64,
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

/// One connection's place among the pending ones, given up when it is greeted or ends.
#[derive(Debug)]
struct Admitted {
    pending: Arc<Pending>,
    id: u64,
    displaced: Arc<Notify>,
}

impl Pending {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            next: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    /// Admits a new connection, displacing the oldest pending one when the budget is full.
    fn admit(this: &Arc<Self>) -> Admitted {
        let id = this.next.fetch_add(1, Ordering::Relaxed);
        let displaced = Arc::new(Notify::new());
        let mut queue = this.queue.lock().unwrap_or_else(|p| p.into_inner());
        while queue.len() >= this.max {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.notify_one();
            }
        }
        queue.push_back((id, displaced.clone()));
        Admitted {
            pending: this.clone(),
            id,
            displaced,
        }
    }

    fn leave(&self, id: u64) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = queue.iter().position(|(i, _)| *i == id) {
            queue.remove(at);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.pending.leave(self.id);
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Clean,
    Stopping,
    Error(String),
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<dyn ShardService>,
    config: ServerConfig,
    stop: watch::Receiver<bool>,
    admitted: Admitted,
) {
    let _ = stream.set_nodelay(true);
    let end = serve_connection(stream, peer, &*service, &config, stop, admitted).await;
    match end {
        End::Clean => tracing::debug!(%peer, "connection closed by peer"),
        End::Stopping => tracing::debug!(%peer, "connection closed for shutdown"),
        End::Error(why) => tracing::warn!(%peer, "connection dropped: {why}"),
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: &dyn ShardService,
    config: &ServerConfig,
    mut stop: watch::Receiver<bool>,
    admitted: Admitted,
) -> End {
    let hello_by = Instant::now() + config.hello_timeout;
    let mut admitted = Some(admitted);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut session = Session::new(config.max_frame);
    let mut body = Vec::new();
    let mut out = Vec::new();
    let counters = service.counters();
    loop {
        let greeted = session.greeted();
        if greeted {
            // Greeted: no longer one of the connections that have not said hello.
            admitted = None;
        }
        // Before the hello, everything is bounded by the hello's deadline; after it, waiting for
        // the next frame by the idle timeout and reading one by the frame timeout.
        let (wait_until, frame_timeout, max_frame) = if greeted {
            // A connection holding an RDMA queue pair carries no frames while its peer reads
            // one-sidedly: it is not idle.
            let idle = config
                .idle_timeout
                .filter(|_| !session.holds_resources())
                .map(|t| Instant::now() + t);
            (idle, config.frame_timeout, config.max_frame)
        } else {
            let left = hello_by.saturating_duration_since(Instant::now());
            let limit = config.hello_max_frame.min(config.max_frame);
            (Some(hello_by), left.min(config.frame_timeout), limit)
        };
        let displaced = async {
            match &admitted {
                Some(a) => a.displaced.notified().await,
                None => std::future::pending::<()>().await,
            }
        };
        let expired = async {
            match wait_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending::<()>().await,
            }
        };
        // Wait for the next frame, or for shutdown, between frames only.
        tokio::select! {
            ready = rd.fill_buf() => match ready {
                Ok([]) => return End::Clean,
                Ok(_) => {}
                Err(e) => return End::Error(format!("read failed: {e}")),
            },
            _ = stop.changed() => return End::Stopping,
            () = displaced => {
                return End::Error("displaced by newer connections that have not said hello".into())
            }
            () = expired => {
                return End::Error(if greeted {
                    "idle for longer than the idle timeout".into()
                } else {
                    format!("no hello within {:?}", config.hello_timeout)
                })
            }
        }
        let mut prefix = [0u8; PREFIX_BYTES];
        match tokio::time::timeout(frame_timeout, rd.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return End::Error(format!("peer disconnected inside a frame prefix: {e}"))
            }
            Err(_) => return End::Error("peer stalled inside a frame prefix".into()),
        }
        let len = match wire::body_len(prefix, max_frame) {
            Ok(len) => len,
            Err(e) => {
                // The stream cannot be resynchronised: answer, then close.
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    FrameError::Malformed(_) => ErrorCode::MalformedFrame,
                };
                ServerCounters::add(&counters.requests, 1);
                ServerCounters::add(&counters.errors, 1);
                let err = WireError::new(code, e.to_string());
                wire::start_response(&mut out, 0, Status::Error, service.incarnation(), &err);
                let _ = wire::finish_frame(&mut out, u32::MAX);
                let _ = tokio::time::timeout(config.write_timeout, wr.write_all(&out)).await;
                return End::Error(format!("refused frame: {e}"));
            }
        };
        // The body buffer grows with the bytes that actually arrive, never to the declared length
        // up front, and the declared length is already within the limit.
        body.clear();
        let read = tokio::time::timeout(
            frame_timeout,
            (&mut rd).take(len as u64).read_to_end(&mut body),
        )
        .await;
        match read {
            Ok(Ok(n)) if n == len as usize => {}
            Ok(Ok(n)) => {
                return End::Error(format!(
                    "peer disconnected after {n} of {len} body bytes; the partial frame was dropped"
                ))
            }
            Ok(Err(e)) => return End::Error(format!("read failed inside a frame: {e}")),
            Err(_) => return End::Error(format!("peer stalled inside a frame of {len} bytes")),
        }
        ServerCounters::add(&counters.bytes_in, (PREFIX_BYTES + body.len()) as u64);
        // Creating a table initializes all of its rows, and a checkpoint writes them all: those run
        // with this worker handed over to blocking work, so the runtime's other connections keep
        // their latency.
        let outcome = if matches!(
            body.first().copied().and_then(Op::from_u8),
            Some(Op::CreateTable | Op::Checkpoint)
        ) {
            tokio::task::block_in_place(|| session.on_frame(service, &body, &mut out))
        } else {
            session.on_frame(service, &body, &mut out)
        };
        if let Some(e) = &outcome.error {
            tracing::warn!(%peer, client = session.peer(), code = ?e.code, "request refused: {}", e.message);
        }
        match tokio::time::timeout(config.write_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return End::Error(format!("write failed: {e}")),
            Err(_) => {
                return End::Error(format!(
                    "the peer stopped reading: an answer of {} bytes was not taken within {:?}",
                    out.len(),
                    config.write_timeout
                ))
            }
        }
        ServerCounters::add(&counters.bytes_out, out.len() as u64);
        if outcome.close {
            return End::Error("closed after a failed handshake".into());
        }
        // Do not keep a huge buffer around for a connection that sent one huge frame.
        for buf in [&mut body, &mut out] {
            if buf.capacity() > 16 << 20 && buf.len() < 1 << 20 {
                buf.shrink_to(1 << 20);
            }
        }
    }
}
