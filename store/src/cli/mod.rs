//! `hetkv`'s command line: the store daemon (`serve`) and the operator commands, one home for
//! their flags, run by the `hetkv` binary and by the Python wheel's `hetkv` console script
//! alike ([`run`]).
#![forbid(unsafe_code)]

mod operator;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::shard::DEFAULT_MAX_TABLE_BYTES;
use crate::{DaemonConfig, Shard, ShardConfig};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpServer, TcpShardClient};
use hetkv_transport::wire::DEFAULT_MAX_FRAME;
use hetkv_transport::ShardService as _;
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
    /// Print each shard's tables and counters, one shard per line; a shard that cannot be asked
    /// gets a line with its error, and the exit status is then non-zero.
    Stats(StatsArgs),
    /// Write a checkpoint on every shard of a running cluster (`--cluster ... --name NAME`), or
    /// list, verify or compact the checkpoints of a data directory.
    Checkpoint(CheckpointArgs),
    /// Write a table of a running cluster to a safetensors file: `embeddings` (f32, rows x dim) in
    /// global key order, `versions` (u64, one per row), and `keys` (u64) with --keys.
    Export(ExportArgs),
    /// Set a table's rows from a safetensors file (`embeddings`, f32, n x dim; and `keys`, u64, n,
    /// if present, else keys 0 to n-1): a warm start from pretrained embeddings.
    Import(ImportArgs),
}

/// How operator commands reach a cluster.
#[derive(clap::Args, Debug, Clone)]
struct ClusterArgs {
    /// Comma-separated shard addresses, in shard order.
    #[arg(long, value_delimiter = ',', required = true)]
    cluster: Vec<String>,
    /// Seconds each shard gets to connect and answer each request.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// File holding the token the daemons require.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct CheckpointArgs {
    #[command(subcommand)]
    action: Option<CheckpointAction>,
    /// Comma-separated shard addresses, in shard order: each shard writes the checkpoint into its
    /// own data directory.
    #[arg(long, value_delimiter = ',', required = true)]
    cluster: Vec<String>,
    /// The checkpoint's name: 1 to 128 bytes of [A-Za-z0-9_.-].
    #[arg(long, required = true)]
    name: Option<String>,
    /// Only the rows changed since each shard's previous checkpoint.
    #[arg(long)]
    incremental: bool,
    /// Seconds each shard gets to write it.
    #[arg(long, default_value_t = 3600.0)]
    timeout: f64,
    /// File holding the token the daemons require.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum CheckpointAction {
    /// The checkpoints of a data directory, oldest first, and any incomplete ones.
    List {
        /// The data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read a checkpoint's whole chain, every file and block, and report what is wrong.
    Verify {
        /// The data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The checkpoint [default: the newest].
        #[arg(long)]
        name: Option<String>,
    },
    /// Move a cluster's checkpoint onto another number of shards, bucket by bucket (every
    /// daemon using these data directories must be stopped). Each target directory gets a full
    /// checkpoint `--out` of the rows its shard owns; start the new cluster's daemons on them.
    Reshard {
        /// The data directory of every shard of the old cluster (comma-separated, any order).
        #[arg(long = "from", value_delimiter = ',', required = true)]
        from: Vec<PathBuf>,
        /// The checkpoint to move (every source holds one of this name).
        #[arg(long)]
        name: String,
        /// The data directories of the new cluster's shards, in shard order (comma-separated; a
        /// source directory may be one of them).
        #[arg(long = "to", value_delimiter = ',', required = true)]
        to: Vec<PathBuf>,
        /// The new checkpoints' name.
        #[arg(long)]
        out: String,
    },
    /// Merge an incremental checkpoint's chain into one full checkpoint (the daemon using the
    /// data directory must be stopped).
    Compact {
        /// The data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The checkpoint to compact [default: the newest].
        #[arg(long)]
        name: Option<String>,
        /// The new checkpoint's name.
        #[arg(long)]
        out: String,
    },
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The table.
    #[arg(long)]
    table: String,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
    /// A text file of keys (whitespace-separated): export only these rows, in this order.
    #[arg(long)]
    keys: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The table (it must exist, with the file's dim).
    #[arg(long)]
    table: String,
    /// The safetensors file.
    #[arg(long)]
    file: PathBuf,
    /// The tensor of values in the file.
    #[arg(long, default_value = "embeddings")]
    tensor: String,
}

#[derive(clap::Args, Debug)]
struct StatsArgs {
    /// Comma-separated shard addresses, in shard order.
    #[arg(long, value_delimiter = ',', required = true)]
    cluster: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds each shard gets to connect and answer (shards are asked in parallel).
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// File holding the token the daemons require.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This shard's index (0 when left out, unless --identity gives it).
    #[arg(long)]
    shard: Option<u32>,
    /// Shards in the cluster (1 when left out, unless --identity gives it).
    #[arg(long)]
    shards: Option<u32>,
    /// Where the shard's index (and count) come from: `flags` (--shard, --shards),
    /// `statefulset` (the pod ordinal ending the hostname; --shards the replicas),
    /// `indexed-job` (JOB_COMPLETION_INDEX; --shards the completions) or `slurm`
    /// (SLURM_PROCID and SLURM_NTASKS). A --shard given beside them must agree.
    #[arg(long, default_value = "flags")]
    identity: crate::identity::IdentitySource,
    /// The shard's data directory: `checkpoints/` (what `hetkv checkpoint` writes, and what
    /// this daemon restores at start: the newest committed checkpoint, or --restore's) and
    /// `hetkv.lock`. The running tables live in memory, never in files here. Without it nothing
    /// can be checkpointed.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Restore this checkpoint instead of the newest (needs --data-dir). A checkpoint that is
    /// incomplete or fails a check stops the daemon; it never starts from the initializers
    /// instead.
    #[arg(long, requires = "data_dir")]
    restore: Option<String>,
    /// Expose the tables to clients on this host through shared memory: regions and clock words
    /// become files in a directory of this daemon's own under DIR (normally /dev/shm), removed
    /// when it stops. Works with --data-dir (which then holds the checkpoints).
    #[arg(long)]
    shm_dir: Option<PathBuf>,
    /// Register the tables with the first RDMA device and accept queue pairs (needs a build with
    /// the `rdma` feature and a device; fails with the reason otherwise).
    #[arg(long)]
    rdma: bool,
    /// TOML configuration: server limits and tables to create at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Most bytes all tables together may take on this shard (regions and optimizer state),
    /// checked before a table is mapped [default: three quarters of the machine's memory, or of
    /// the memory cgroup's limit where that is lower].
    #[arg(long)]
    max_memory: Option<u64>,
    /// Most tables this shard holds; creating one more is refused.
    #[arg(long, default_value_t = crate::shard::DEFAULT_MAX_TABLES)]
    max_tables: usize,
    /// Largest frame body accepted or sent [default: 64 MiB, or the config's].
    #[arg(long)]
    max_frame_bytes: Option<u32>,
    /// Seconds a new connection has to complete its hello; until then it may send only small
    /// frames, and at most a few dozen such connections are held (a newer one displaces the
    /// oldest).
    #[arg(long, default_value_t = 5.0)]
    hello_timeout: f64,
    /// Seconds a greeted connection may stay silent between requests before it is closed (0:
    /// never). [default: 600 for a daemon without --auth-token-file, whose slots anyone who can
    /// connect could otherwise hold forever; never with one]. A client checks a pooled connection
    /// idle for a while before it uses it, so a closed one costs a new connection, not an error;
    /// a connection holding an RDMA queue pair is never idle.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// Largest table footprint on this shard [default: 32 GiB, or the config's].
    #[arg(long)]
    max_table_bytes: Option<u64>,
    /// File holding a token that every client's hello must prove it knows: the file's text
    /// without leading and trailing whitespace (a final newline is not part of it; inner
    /// whitespace is); an empty token is refused.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Serve the shard's metrics (Prometheus text format) at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Tables with metrics series of their own (the first created); the others are summed under
    /// the table label "(other)", so the page stays bounded however many tables there are.
    #[arg(long, default_value_t = crate::metrics::DEFAULT_METRICS_TABLES)]
    metrics_tables: usize,
    /// On SIGTERM or SIGINT, after the last connection ended, write a checkpoint (incremental
    /// when this daemon has a parent for one) named `exit-SECONDS-INCARNATION` into --data-dir,
    /// which the next start restores: a rolling restart keeps every push acknowledged.
    #[arg(long, requires = "data_dir")]
    checkpoint_on_exit: bool,
    /// Seconds a client may be silent before this daemon forgets the numbers of its pushes (a
    /// push it sends again after that is applied again).
    #[arg(long, default_value_t = 3600.0)]
    session_idle: f64,
}

/// Runs the command line `args` (the program's name first, as `std::env::args_os` gives it):
/// parses it (printing help or a usage error and exiting as a command line does), logs to
/// stderr (`RUST_LOG`, `info` by default; unless the process has a logger already), and runs
/// the command to its end.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    // A process that set up its logging already (the Python package forwards to `logging`)
    // keeps it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Stats(args) => stats(&args),
        Command::Checkpoint(args) => operator::checkpoint(&args),
        Command::Export(args) => operator::export(&args),
        Command::Import(args) => operator::import(&args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => DaemonConfig::load(path)?,
        None => DaemonConfig::default(),
    };
    let auth_token = read_token(args.auth_token_file.as_deref())?;
    let authenticated = auth_token.is_some();
    let identity = crate::identity::resolve(
        args.identity,
        args.shard,
        args.shards,
        &|name| std::env::var(name).ok(),
        hostname().as_deref(),
    )
    .context("working out which shard this daemon is")?;
    tracing::info!(
        shard = identity.shard,
        shards = identity.shards,
        from = %identity.from,
        "shard identity"
    );
    let shard_config = ShardConfig {
        shard: identity.shard,
        shards: identity.shards,
        data_dir: args.data_dir.clone(),
        shm_dir: args.shm_dir.clone(),
        rdma: args.rdma,
        max_table_bytes: args
            .max_table_bytes
            .or(file.server.max_table_bytes)
            .unwrap_or(DEFAULT_MAX_TABLE_BYTES),
        auth_token,
        max_tables: args.max_tables,
        max_memory: args
            .max_memory
            .unwrap_or_else(crate::shard::default_max_memory),
        session_idle: seconds("--session-idle", args.session_idle)?,
        metrics_tables: args.metrics_tables,
    };
    let server_config = ServerConfig {
        max_frame: args
            .max_frame_bytes
            .or(file.server.max_frame_bytes)
            .unwrap_or(DEFAULT_MAX_FRAME),
        hello_timeout: seconds("--hello-timeout", args.hello_timeout)?,
        idle_timeout: match args.idle_timeout {
            Some(0.0) => None,
            Some(t) => Some(seconds("--idle-timeout", t)?),
            // An authenticated daemon's slots are held only by token holders. (A connection
            // holding an RDMA queue pair is exempt from the timeout.)
            None if authenticated => None,
            None => Some(DEFAULT_IDLE_TIMEOUT),
        },
        ..ServerConfig::default()
    };
    tracing::info!(
        max_memory = shard_config.max_memory,
        from = if args.max_memory.is_some() {
            "--max-memory"
        } else {
            "3/4 of the machine's or the cgroup's memory"
        },
        "bound on all tables' memory"
    );
    match server_config.idle_timeout {
        Some(t) => tracing::info!(
            seconds = t.as_secs_f64(),
            "closing connections idle this long"
        ),
        None => tracing::info!("idle connections are never closed"),
    }
    let shard = Arc::new(Shard::new(shard_config).context("setting up the shard")?);
    if let Some(dir) = &args.data_dir {
        let started = std::time::Instant::now();
        match shard.restore(args.restore.as_deref()).with_context(|| {
            format!(
                "restoring from {}; the daemon does not start",
                dir.display()
            )
        })? {
            Some(m) => tracing::info!(
                checkpoint = %m.name,
                seq = m.seq,
                tables = m.tables.len(),
                millis = started.elapsed().as_millis() as u64,
                "restored"
            ),
            None => {
                tracing::info!(dir = %dir.display(), "no checkpoint to restore: starting empty")
            }
        }
    }
    for spec in file.tables {
        let name = spec.name.clone();
        shard
            .create_spec(spec)
            .with_context(|| format!("creating table {name} from the config"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hetkv-serve")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        if let Some(at) = args.metrics_listen {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("binding the metrics listener {at}"))?;
            let metrics_addr = listener.local_addr()?;
            tracing::info!(addr = %metrics_addr, "serving metrics");
            tokio::spawn(crate::metrics::serve_http(
                listener,
                shard.clone(),
                shutdown_signal(),
            ));
        }
        let incarnation = format!("{:016x}", shard.incarnation());
        let at_exit = shard.clone();
        let server = TcpServer::bind(args.listen, shard, server_config)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = server.local_addr()?;
        tracing::info!(%addr, shard = identity.shard, shards = identity.shards, %incarnation, "listening");
        if !addr.ip().is_loopback() && !authenticated {
            tracing::warn!(
                %addr,
                "listening beyond loopback WITHOUT AUTHENTICATION: any host that reaches this \
                 address can read and change every table; give --auth-token-file"
            );
            eprintln!(
                "hetkv: WARNING: {addr} accepts clients from other hosts without authentication \
                 (--auth-token-file)"
            );
        }
        server.run(shutdown_signal()).await?;
        if args.checkpoint_on_exit {
            checkpoint_on_exit(&at_exit)?;
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// The checkpoint of `--checkpoint-on-exit`, once no connection is left to change a row:
/// incremental from the last checkpoint this daemon committed or restored, else full.
fn checkpoint_on_exit(shard: &Shard) -> Result<()> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = format!("exit-{seconds}-{:016x}", shard.incarnation());
    let done = shard
        .checkpoint(&name, shard.has_checkpoint_parent())
        .with_context(|| format!("writing the exit checkpoint {name}"))?;
    tracing::info!(
        checkpoint = %done.name,
        parent = done.parent.as_deref(),
        rows = done.rows,
        "checkpointed on exit"
    );
    Ok(())
}

/// This host's name: `HOSTNAME` (which Kubernetes sets to the pod's name), else the kernel's.
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
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

/// Idle timeout of a daemon that does not authenticate, unless one is given.
const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The token in `path` (see [`hetkv_transport::auth::token_of`] for what whitespace counts); an
/// empty one is an error (it would admit an empty token).
pub(crate) fn read_token(path: Option<&std::path::Path>) -> Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading auth token from {}", path.display()))?;
    let token = hetkv_transport::auth::token_of(&text).to_string();
    if token.is_empty() {
        bail!("the auth token file {} is empty", path.display());
    }
    Ok(Some(token))
}

fn stats(args: &StatsArgs) -> Result<()> {
    let timeout = seconds("--timeout", args.timeout)?;
    let config = ClientConfig {
        connect_timeout: timeout,
        io_timeout: Some(timeout),
        deadline: timeout,
        auth: read_token(args.auth_token_file.as_deref())?,
        ..ClientConfig::default()
    };
    let n = args.cluster.len();
    // Every shard at once, so that a dead or hung one costs the timeout once, not once per shard.
    let results: Vec<Result<ShardStats>> = std::thread::scope(|scope| {
        let asks: Vec<_> = args
            .cluster
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let config = config.clone();
                scope.spawn(move || -> Result<ShardStats> {
                    let client = TcpShardClient::connect(addr, config)
                        .with_context(|| format!("connecting to {addr}"))?;
                    let s = client
                        .stats()
                        .with_context(|| format!("asking {addr} for stats"))?;
                    if s.shard as usize != i || s.shards as usize != n {
                        bail!(
                            "{addr} is shard {} of {}, but is listed as shard {i} of {n}",
                            s.shard,
                            s.shards
                        );
                    }
                    Ok(s)
                })
            })
            .collect();
        asks.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the stats thread panicked")))
            })
            .collect()
    });
    let failed = results.iter().filter(|r| r.is_err()).count();
    if args.json {
        let shards: Vec<_> = args
            .cluster
            .iter()
            .zip(&results)
            .map(|(addr, r)| match r {
                Ok(s) => serde_json::json!({ "addr": addr, "stats": s }),
                Err(e) => serde_json::json!({ "addr": addr, "error": format!("{e:#}") }),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "shards": shards }))?
        );
    }
    for (i, (addr, r)) in args.cluster.iter().zip(&results).enumerate() {
        match r {
            Err(e) => eprintln!("shard {i}/{n} at {addr}: error: {e:#}"),
            Ok(_) if args.json => {}
            Ok(s) => {
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
        }
    }
    if failed > 0 {
        bail!("{failed} of {n} shards did not answer");
    }
    Ok(())
}

/// A positive number of seconds from the command line.
pub(crate) fn seconds(flag: &str, secs: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, got {secs}"))
}
