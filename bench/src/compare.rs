//! `hetkv-bench compare`: hetkv with its cache, hetkv without it (the classic parameter server) and
//! Redis, side by side on the same key stream, in one run on one machine.
//!
//! The stream is the Criteo-like data set (`criteo.rs`): a batch of samples is 26 keys per sample
//! into one embedding table, duplicates kept. Per batch, every system serves a lookup of all keys
//! to the trainer, then takes an update of the unique keys (gradients summed per key, as a backward
//! pass produces them):
//! - hetkv: `CachedTable::lookup` and `update`, one embedded shard on loopback;
//! - Redis (Debian's `redis-server`, started and stopped here on a loopback port, no persistence):
//!   rows are binary values; a lookup is one MGET of the unique keys; an update applies SGD on the
//!   client and writes the updated rows back with one MSET, since Redis has no server-side
//!   gradient add. A key Redis does not hold yet reads as the table's initial row.
//!
//! Bytes on the wire: hetkv's as its transport counts them; Redis's from its own INFO counters
//! (`total_net_input_bytes`, `total_net_output_bytes`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

use crate::cache_bench::Unique;
use crate::criteo::{CriteoSynth, CATEGORICAL};

/// `compare` settings.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CompareArgs {
    /// Cardinality scale of the Criteo-like data (0.01: about 338k rows).
    #[arg(long, default_value_t = 0.01)]
    pub scale: f64,
    /// Samples per batch (26 keys each).
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Row dimension.
    #[arg(long, default_value_t = 64)]
    pub dim: u32,
    /// Warm-up batches.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Measured batches.
    #[arg(long, default_value_t = 500)]
    pub measured: usize,
    /// Cache size, as a fraction of the table.
    #[arg(long, default_value_t = 0.10)]
    pub cache: f64,
    /// Bounds of the cached runs.
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    pub bounds: Vec<Bound>,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    #[serde(skip)]
    pub seed: u64,
    /// Write the report here as JSON (and a markdown table beside it).
    #[arg(long)]
    #[serde(skip)]
    pub json: Option<std::path::PathBuf>,
}

/// One system's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    /// What ran.
    pub system: String,
    /// Keys delivered to the trainer per second (duplicates included).
    pub rows_per_s: f64,
    /// Rows written to the store per second.
    pub pushes_per_s: f64,
    /// Bytes on the wire per sample, both directions.
    pub bytes_per_sample: f64,
    /// Batch latency (lookup + update), median, microseconds.
    pub p50_us: f64,
    /// Batch latency, 99th percentile, microseconds.
    pub p99_us: f64,
    /// Hit rate over unique keys (0 for systems without a cache).
    pub hit_rate: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct CompareReport {
    /// Settings.
    pub settings: CompareArgs,
    /// Rows in the table.
    pub table_rows: u64,
    /// Unique keys per batch.
    pub unique_per_batch: f64,
    /// Results, in run order.
    pub systems: Vec<SystemResult>,
    /// `ratios[i][j]`: rows/s of system i over rows/s of system j.
    pub rows_per_s_ratios: Vec<Vec<f64>>,
    /// `bytes[i][j]`: bytes per sample of system i over those of system j.
    pub bytes_ratios: Vec<Vec<f64>>,
}

/// Runs the comparison.
pub fn run(args: &CompareArgs) -> Result<CompareReport> {
    let mut synth = CriteoSynth::new(args.scale, args.seed)?;
    let batch = args.samples * CATEGORICAL;
    let batches = args.warmup + args.measured;
    let mut stream = Vec::with_capacity(batches * batch);
    for _ in 0..batches * args.samples {
        let s = synth.sample();
        stream.extend((0..CATEGORICAL).map(|f| synth.key(f, Some(s.ids[f]))));
    }
    let unique_per_batch = stream
        .chunks_exact(batch)
        .map(|b| b.iter().collect::<std::collections::HashSet<_>>().len())
        .sum::<usize>() as f64
        / batches as f64;
    let spec = TableSpec {
        name: "criteo".into(),
        rows: synth.table_rows(),
        dim: args.dim,
        init: Initializer::Normal { std: 0.01, seed: 3 },
        optimizer: OptimizerSpec::Sgd { lr: 0.01 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let cluster = EmbeddedCluster::start(1).context("starting the embedded cluster")?;
    Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())?.create_table(&spec)?;

    let mut systems = Vec::new();
    let mut configs = vec![("hetkv, no cache".to_string(), CacheConfig::disabled())];
    for &b in &args.bounds {
        configs.push((
            format!("hetkv, cache {:.0}% lfu, bound {b}", args.cache * 100.0),
            CacheConfig::new(Capacity::Fraction(args.cache), PolicyKind::Lfu, b),
        ));
    }
    for (name, config) in configs {
        eprintln!("running {name}");
        let table = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())?
            .open_table(&spec.name)?;
        let mut cache = table.cached(config);
        let r = drive(args, &stream, batch, &mut cache, &name)?;
        systems.push(SystemResult { system: name, ..r });
    }
    eprintln!("running redis");
    let redis = RedisServer::start(&args.redis_server)?;
    let mut store = RedisTable::connect(&redis, &spec)?;
    let r = drive(args, &stream, batch, &mut store, "redis")?;
    systems.push(SystemResult {
        system: "redis 7 (MGET, client-side SGD, MSET)".into(),
        ..r
    });
    drop(store);
    redis.stop();

    let n = systems.len();
    let ratio = |f: &dyn Fn(&SystemResult) -> f64| {
        (0..n)
            .map(|i| (0..n).map(|j| f(&systems[i]) / f(&systems[j])).collect())
            .collect()
    };
    Ok(CompareReport {
        settings: args.clone(),
        table_rows: spec.rows,
        unique_per_batch,
        rows_per_s_ratios: ratio(&|s| s.rows_per_s),
        bytes_ratios: ratio(&|s| s.bytes_per_sample),
        systems,
    })
}

/// A store the comparison drives.
trait System {
    /// One batch: a lookup of `keys` into `rows`, then an update of the unique keys.
    fn step(
        &mut self,
        keys: &[u64],
        rows: &mut [f32],
        unique: &mut Unique,
        dim: usize,
    ) -> Result<()>;
    /// (wire bytes, rows pushed, hits, unique keys looked up) so far.
    fn counters(&mut self) -> Result<(u64, u64, u64, u64)>;
}

impl System for hetkv_client::CachedTable {
    fn step(
        &mut self,
        keys: &[u64],
        rows: &mut [f32],
        unique: &mut Unique,
        dim: usize,
    ) -> Result<()> {
        self.lookup(keys, rows)?;
        unique.gradients(keys, rows, dim, |w| 0.01 * w);
        self.update(&unique.keys, &unique.grads)?;
        Ok(())
    }

    fn counters(&mut self) -> Result<(u64, u64, u64, u64)> {
        let s = self.stats();
        Ok((
            s.bytes_sent + s.bytes_received,
            s.rows_pushed,
            s.hits,
            s.unique_keys,
        ))
    }
}

/// Runs warm-up and measured batches through `system`.
fn drive(
    args: &CompareArgs,
    stream: &[u64],
    batch: usize,
    system: &mut dyn System,
    name: &str,
) -> Result<SystemResult> {
    let bar = crate::progress::bar((stream.len() / batch) as u64, name);
    let dim = args.dim as usize;
    let mut rows = vec![0f32; batch * dim];
    let mut unique = Unique::default();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut before = (0, 0, 0, 0);
    let mut start = Instant::now();
    for (b, keys) in stream.chunks_exact(batch).enumerate() {
        bar.inc(1);
        if b == args.warmup {
            before = system.counters()?;
            start = Instant::now();
        }
        let t = Instant::now();
        system.step(keys, &mut rows, &mut unique, dim)?;
        if b >= args.warmup {
            latency.record(t.elapsed().as_micros().max(1) as u64)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let after = system.counters()?;
    let samples = (args.measured * args.samples) as f64;
    Ok(SystemResult {
        system: String::new(),
        rows_per_s: (args.measured * batch) as f64 / secs,
        pushes_per_s: (after.1 - before.1) as f64 / secs,
        bytes_per_sample: (after.0 - before.0) as f64 / samples,
        p50_us: latency.value_at_quantile(0.5) as f64,
        p99_us: latency.value_at_quantile(0.99) as f64,
        hit_rate: if after.3 > before.3 {
            (after.2 - before.2) as f64 / (after.3 - before.3) as f64
        } else {
            0.0
        },
    })
}

/// A redis-server child process on a free loopback port, without persistence.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(binary: &str) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary} (Debian package redis-server)"))?;
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An embedding table in Redis: key = the row id's 8 little-endian bytes, value = the row's f32s.
struct RedisTable {
    con: redis::Connection,
    spec: TableSpec,
    values: Vec<Option<Vec<u8>>>,
    rows_written: u64,
}

impl RedisTable {
    fn connect(server: &RedisServer, spec: &TableSpec) -> Result<Self> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", server.port))?;
        let con = client.get_connection()?;
        Ok(Self {
            con,
            spec: spec.clone(),
            values: Vec::new(),
            rows_written: 0,
        })
    }

    /// Bytes Redis has received and sent so far, by its own count.
    fn wire_bytes(&mut self) -> Result<u64> {
        let info: String = redis::cmd("INFO").arg("stats").query(&mut self.con)?;
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0)
        };
        Ok(field("total_net_input_bytes:") + field("total_net_output_bytes:"))
    }
}

impl System for RedisTable {
    fn counters(&mut self) -> Result<(u64, u64, u64, u64)> {
        Ok((self.wire_bytes()?, self.rows_written, 0, 0))
    }

    fn step(
        &mut self,
        keys: &[u64],
        rows: &mut [f32],
        unique: &mut Unique,
        dim: usize,
    ) -> Result<()> {
        // Lookup: one MGET of the unique keys.
        unique.collect(keys);
        let mut mget = redis::cmd("MGET");
        for k in &unique.keys {
            mget.arg(&k.to_le_bytes()[..]);
        }
        self.values = mget.query(&mut self.con)?;
        ensure!(
            self.values.len() == unique.keys.len(),
            "MGET answered {} values",
            self.values.len()
        );
        let mut table = vec![0f32; unique.keys.len() * dim];
        for (u, (k, v)) in unique.keys.iter().zip(&self.values).enumerate() {
            let row = &mut table[u * dim..(u + 1) * dim];
            match v {
                Some(bytes) if bytes.len() == 4 * dim => {
                    for (x, c) in row.iter_mut().zip(bytes.chunks_exact(4)) {
                        *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    }
                }
                Some(bytes) => bail!(
                    "redis holds {} bytes for key {k}, expected {}",
                    bytes.len(),
                    4 * dim
                ),
                None => self.spec.init.fill(*k, row),
            }
        }
        for (pos, &u) in unique.position.iter().enumerate() {
            let u = u as usize;
            rows[pos * dim..(pos + 1) * dim].copy_from_slice(&table[u * dim..(u + 1) * dim]);
        }
        // Update: the trainer's gradients, SGD on the client, one MSET of the updated rows.
        unique.gradients(keys, rows, dim, |w| 0.01 * w);
        let lr = self.spec.optimizer.lr();
        let mut mset = redis::cmd("MSET");
        let mut value = Vec::with_capacity(4 * dim);
        for (u, k) in unique.keys.iter().enumerate() {
            value.clear();
            for (w, g) in table[u * dim..(u + 1) * dim]
                .iter()
                .zip(&unique.grads[u * dim..(u + 1) * dim])
            {
                value.extend_from_slice(&(w - lr * g).to_le_bytes());
            }
            mset.arg(&k.to_le_bytes()[..]).arg(&value[..]);
        }
        let () = mset.query(&mut self.con)?;
        self.rows_written += unique.keys.len() as u64;
        Ok(())
    }
}

/// The report as a markdown table, with each system's ratios to the others.
pub fn markdown(r: &CompareReport) -> String {
    let mut s = String::from(
        "| system | rows/s to the trainer | pushes/s | bytes / sample | batch p50 (µs) | batch p99 (µs) | hit rate |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in &r.systems {
        s += &format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1}% |\n",
            x.system,
            x.rows_per_s,
            x.pushes_per_s,
            x.bytes_per_sample,
            x.p50_us,
            x.p99_us,
            x.hit_rate * 100.0
        );
    }
    s += "\nRows/s of the row's system over the column's (same run):\n\n|  |";
    for x in &r.systems {
        s += &format!(" {} |", x.system);
    }
    s += "\n|---|";
    s += &"---:|".repeat(r.systems.len());
    s += "\n";
    for (i, x) in r.systems.iter().enumerate() {
        s += &format!("| {} |", x.system);
        for v in &r.rows_per_s_ratios[i] {
            s += &format!(" {v:.2}x |");
        }
        s += "\n";
    }
    s
}
