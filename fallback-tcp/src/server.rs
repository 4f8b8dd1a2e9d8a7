//! The tokio TCP server: accepts connections and moves frames between sockets and a
//! [`Session`]. Every protocol rule lives in the session; this module only enforces the frame
//! limit before reading a body, times out stalled peers, and stops gracefully.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hetkv_transport::service::{ServerCounters, Session, ShardService};
use hetkv_transport::wire::{self, ErrorCode, FrameError, Status, WireError, PREFIX_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_frame: wire::DEFAULT_MAX_FRAME,
            frame_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_connections: 4096,
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
                        connections.spawn(async move {
                            connection(stream, peer, service, config, stop).await;
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
) {
    let _ = stream.set_nodelay(true);
    let end = serve_connection(stream, peer, &*service, &config, stop).await;
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
) -> End {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut session = Session::new(config.max_frame);
    let mut body = Vec::new();
    let mut out = Vec::new();
    let counters = service.counters();
    loop {
        // Wait for the next frame, or for shutdown, between frames only.
        tokio::select! {
            ready = rd.fill_buf() => match ready {
                Ok([]) => return End::Clean,
                Ok(_) => {}
                Err(e) => return End::Error(format!("read failed: {e}")),
            },
            _ = stop.changed() => return End::Stopping,
        }
        let mut prefix = [0u8; PREFIX_BYTES];
        match tokio::time::timeout(config.frame_timeout, rd.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return End::Error(format!("peer disconnected inside a frame prefix: {e}"))
            }
            Err(_) => return End::Error("peer stalled inside a frame prefix".into()),
        }
        let len = match wire::body_len(prefix, config.max_frame) {
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
                wire::start_frame(&mut out, 0, Status::Error, &err);
                let _ = wire::finish_frame(&mut out, u32::MAX);
                let _ = wr.write_all(&out).await;
                return End::Error(format!("refused frame: {e}"));
            }
        };
        // The body buffer grows with the bytes that actually arrive, never to the declared length
        // up front, and the declared length is already within the limit.
        body.clear();
        let read = tokio::time::timeout(
            config.frame_timeout,
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
        let outcome = session.on_frame(service, &body, &mut out);
        if let Some(e) = &outcome.error {
            tracing::warn!(%peer, client = session.peer(), code = ?e.code, "request refused: {}", e.message);
        }
        if let Err(e) = wr.write_all(&out).await {
            return End::Error(format!("write failed: {e}"));
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
