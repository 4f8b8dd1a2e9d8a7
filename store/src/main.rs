//! `hetkv`: the store daemon and its operator commands.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpServer, TcpShardClient};
use hetkv_store::shard::DEFAULT_MAX_TABLE_BYTES;
use hetkv_store::{DaemonConfig, Shard, ShardConfig};
use hetkv_transport::wire::DEFAULT_MAX_FRAME;
use hetkv_transport::{ShardStats, ShardTransport};

#[derive(Parser, Debug)]
#[command(
    name = "hetkv",
    version,
    about = "hetkv store daemon and operator commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one shard of a cluster in the foreground until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Print each shard's tables and counters.
    Stats {
        /// Comma-separated shard addresses, in shard order.
        #[arg(long, value_delimiter = ',', required = true)]
        cluster: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This shard's index.
    #[arg(long, default_value_t = 0)]
    shard: u32,
    /// Shards in the cluster.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Directory for file-backed table regions (anonymous memory when absent).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Expose the tables to clients on this host through shared memory: regions and clock words
    /// become files in a directory of this daemon's own under DIR (normally /dev/shm), removed
    /// when it stops. Excludes --data-dir.
    #[arg(long, conflicts_with = "data_dir")]
    shm_dir: Option<PathBuf>,
    /// Register the tables with the first RDMA device and accept queue pairs (needs a build with
    /// the `rdma` feature and a device; fails with the reason otherwise).
    #[arg(long)]
    rdma: bool,
    /// TOML configuration: server limits and tables to create at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Largest frame body accepted or sent [default: 64 MiB, or the config's].
    #[arg(long)]
    max_frame_bytes: Option<u32>,
    /// Seconds a new connection has to complete its hello; until then it may send only small
    /// frames, and at most a few dozen such connections are held (a newer one displaces the
    /// oldest).
    #[arg(long, default_value_t = 5.0)]
    hello_timeout: f64,
    /// Seconds a greeted connection may stay silent between requests before it is closed
    /// (0, the default: never; a client sees a closed pooled connection as an I/O error on its
    /// next call).
    #[arg(long, default_value_t = 0.0)]
    idle_timeout: f64,
    /// Largest table footprint on this shard [default: 32 GiB, or the config's].
    #[arg(long)]
    max_table_bytes: Option<u64>,
    /// File holding a token that every client's hello must carry.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Stats { cluster, json } => stats(&cluster, json),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => DaemonConfig::load(path)?,
        None => DaemonConfig::default(),
    };
    let auth_token = match &args.auth_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading auth token from {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let shard_config = ShardConfig {
        shard: args.shard,
        shards: args.shards,
        data_dir: args.data_dir.clone(),
        shm_dir: args.shm_dir.clone(),
        rdma: args.rdma,
        max_table_bytes: args
            .max_table_bytes
            .or(file.server.max_table_bytes)
            .unwrap_or(DEFAULT_MAX_TABLE_BYTES),
        auth_token,
    };
    let server_config = ServerConfig {
        max_frame: args
            .max_frame_bytes
            .or(file.server.max_frame_bytes)
            .unwrap_or(DEFAULT_MAX_FRAME),
        hello_timeout: seconds("--hello-timeout", args.hello_timeout)?,
        idle_timeout: match args.idle_timeout {
            0.0 => None,
            t => Some(seconds("--idle-timeout", t)?),
        },
        ..ServerConfig::default()
    };
    let shard = Arc::new(Shard::new(shard_config).context("setting up the shard")?);
    for spec in file.tables {
        let name = spec.name.clone();
        shard
            .create(spec)
            .with_context(|| format!("creating table {name} from the config"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hetkv-serve")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let server = TcpServer::bind(args.listen, shard, server_config)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = server.local_addr()?;
        tracing::info!(%addr, shard = args.shard, shards = args.shards, "listening");
        server.run(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn stats(cluster: &[String], json: bool) -> Result<()> {
    let mut all: Vec<(String, ShardStats)> = Vec::new();
    for addr in cluster {
        let client = TcpShardClient::connect(addr, ClientConfig::default())
            .with_context(|| format!("connecting to {addr}"))?;
        let stats = client
            .stats()
            .with_context(|| format!("stats from {addr}"))?;
        all.push((addr.clone(), stats));
    }
    for (i, (addr, s)) in all.iter().enumerate() {
        if s.shard as usize != i || s.shards as usize != cluster.len() {
            bail!(
                "{addr} is shard {} of {}, but is listed as shard {i} of {}",
                s.shard,
                s.shards,
                cluster.len()
            );
        }
    }
    if json {
        let shards: Vec<_> = all
            .iter()
            .map(|(addr, s)| serde_json::json!({ "addr": addr, "stats": s }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "shards": shards }))?
        );
        return Ok(());
    }
    for (addr, s) in &all {
        println!(
            "shard {}/{} at {addr}: {} requests, {} errors, {} rows read, {} rows pushed, {} B in, {} B out, {} connections",
            s.shard, s.shards, s.requests, s.errors, s.rows_read, s.rows_pushed, s.bytes_in, s.bytes_out, s.connections
        );
        for t in &s.tables {
            println!(
                "  {:<24} rows {:>12} (here {:>12})  dim {:>5}  {:<8} read {:>12} pushed {:>12} updates {:>12}",
                t.name, t.rows, t.local_rows, t.dim, t.optimizer, t.rows_read, t.rows_pushed, t.updates
            );
        }
    }
    Ok(())
}

/// A positive number of seconds from the command line.
fn seconds(flag: &str, secs: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, got {secs}"))
}
