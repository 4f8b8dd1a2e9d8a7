//! An in-process cluster: shards served over loopback TCP from a private tokio runtime, so one
//! command (or one test) shows the whole system with no setup.

use std::net::SocketAddr;
use std::sync::Arc;

use hetkv_fallback_tcp::{ServerConfig, TcpServer};
use tokio::sync::watch;

use crate::shard::{Shard, ShardConfig};
use crate::StoreError;

/// Shards running in this process, each behind its own TCP listener on 127.0.0.1.
pub struct EmbeddedCluster {
    addrs: Vec<String>,
    shards: Vec<Arc<Shard>>,
    stop: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EmbeddedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCluster")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl EmbeddedCluster {
    /// Starts `shards` shards in anonymous memory with default limits.
    pub fn start(shards: u32) -> Result<Self, StoreError> {
        Self::start_with(shards, ServerConfig::default(), |i| {
            ShardConfig::new(i, shards)
        })
    }

    /// Starts `shards` shards with the given server settings and per-shard configuration. A shard
    /// with a data directory first restores its newest checkpoint there, as `hetkv serve` does.
    pub fn start_with(
        shards: u32,
        server: ServerConfig,
        shard_config: impl Fn(u32) -> ShardConfig,
    ) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hetkv-embedded")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("starting the embedded runtime: {e}")))?;
        let (stop, stop_rx) = watch::channel(false);
        let mut addrs = Vec::new();
        let mut all = Vec::new();
        let mut servers = Vec::new();
        for i in 0..shards {
            let config = shard_config(i);
            let restore = config.data_dir.is_some();
            let shard = Arc::new(Shard::new(config)?);
            if restore {
                shard.restore(None)?;
            }
            let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
            let server = runtime
                .block_on(TcpServer::bind(loopback, shard.clone(), server.clone()))
                .map_err(|e| StoreError::Io(format!("binding shard {i}: {e}")))?;
            let addr = server
                .local_addr()
                .map_err(|e| StoreError::Io(format!("shard {i} address: {e}")))?;
            let mut rx = stop_rx.clone();
            servers.push(runtime.spawn(server.run(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })));
            addrs.push(addr.to_string());
            all.push(shard);
        }
        Ok(Self {
            addrs,
            shards: all,
            stop,
            servers,
            runtime: Some(runtime),
        })
    }

    /// The shards' addresses, in shard order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Shard `i`, for in-process inspection.
    pub fn shard(&self, i: usize) -> &Arc<Shard> {
        &self.shards[i]
    }

    /// Stops every shard and waits for them.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            for s in self.servers.drain(..) {
                if let Ok(Err(e)) = rt.block_on(s) {
                    tracing::warn!(error = %e, "embedded shard stopped with an error");
                }
            }
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
