//! `hetkv-bench demo`: the whole system on one machine with no setup. Starts an embedded cluster,
//! runs an embedding workload (Zipf(1.05) keys, lookups then gradient pushes) through the client
//! twice on the same key stream, without a cache (the classic parameter server) and with the HET
//! cache, checks after each that every row's server version equals the updates issued for it, and
//! reports hit rate, bytes saved and speed.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use hetkv_client::{Bound, CacheConfig, CacheStats, Capacity, Cluster, PolicyKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

use crate::cache_bench::Unique;
use crate::workload::ZipfKeys;

/// Settings of the demo.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Shards in the embedded cluster.
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// Rows in the embedding table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Row dimension.
    #[arg(long, default_value_t = 64)]
    pub dim: u32,
    /// Keys per batch (duplicates kept, as a trainer sees them).
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Zipf exponent of key popularity.
    #[arg(long, default_value_t = 1.05)]
    pub zipf: f64,
    /// Batches to run, per configuration.
    #[arg(long, default_value_t = 600)]
    pub batches: usize,
    /// Cache size, as a fraction of the table.
    #[arg(long, default_value_t = 0.10)]
    pub cache: f64,
    /// Read and write staleness bound of the cache.
    #[arg(long, default_value = "100")]
    pub bound: Bound,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One configuration's run.
#[derive(Debug, Serialize)]
pub struct DemoRun {
    /// What ran.
    pub name: String,
    /// Batches per second (lookup + update).
    pub batches_per_s: f64,
    /// Keys (with duplicates) served to the trainer per second.
    pub keys_per_s: f64,
    /// Bytes on the wire per batch, both directions, final flush included.
    pub wire_bytes_per_batch: f64,
    /// Cache counters.
    pub stats: CacheStats,
    /// Whether every touched row's server version equals the updates issued for it.
    pub versions_consistent: bool,
}

/// What the demo measured.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// Shards.
    pub shards: u32,
    /// Table rows.
    pub rows: u64,
    /// Row dimension.
    pub dim: u32,
    /// Batches per configuration.
    pub batches: usize,
    /// Keys per batch.
    pub batch: usize,
    /// The no-cache baseline, then the cache.
    pub runs: Vec<DemoRun>,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<DemoReport> {
    eprintln!(
        "starting {} in-process shards on loopback; tables of {} rows x {} f32",
        args.shards, args.rows, args.dim
    );
    let cluster = EmbeddedCluster::start(args.shards).context("starting the embedded cluster")?;
    let mut stream = vec![0u64; args.batches * args.batch];
    ZipfKeys::new(args.rows, args.zipf, 7)?.fill(&mut stream);
    let configs = [
        (
            "no cache (classic parameter server)".to_string(),
            CacheConfig::disabled(),
        ),
        (
            format!(
                "HET cache: lfu {:.0}%, bounds {}",
                args.cache * 100.0,
                args.bound
            ),
            CacheConfig::new(Capacity::Fraction(args.cache), PolicyKind::Lfu, args.bound),
        ),
    ];
    let mut runs = Vec::new();
    for (i, (name, config)) in configs.into_iter().enumerate() {
        let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())?;
        let spec = TableSpec {
            name: format!("demo{i}"),
            rows: args.rows,
            dim: args.dim,
            init: Initializer::Normal {
                std: 0.01,
                seed: 42,
            },
            optimizer: OptimizerSpec::Sgd { lr: 0.05 },
        };
        let mut cache = client.create_table(&spec)?.cached(config);
        eprintln!("running {} batches: {name}", args.batches);
        runs.push(run_one(args, name, &mut cache, &stream)?);
    }
    Ok(DemoReport {
        shards: args.shards,
        rows: args.rows,
        dim: args.dim,
        batches: args.batches,
        batch: args.batch,
        runs,
    })
}

fn run_one(
    args: &DemoArgs,
    name: String,
    cache: &mut hetkv_client::CachedTable,
    stream: &[u64],
) -> Result<DemoRun> {
    let dim = args.dim as usize;
    let mut rows = vec![0f32; args.batch * dim];
    let mut unique = Unique::default();
    let mut issued: HashMap<u64, u64> = HashMap::new();
    let start = Instant::now();
    let bar = crate::progress::bar(args.batches as u64, &name);
    for keys in stream.chunks_exact(args.batch) {
        bar.inc(1);
        cache.lookup(keys, &mut rows)?;
        // A weight decay toward zero: deterministic, and it keeps values bounded.
        unique.gradients(keys, &rows, dim, |w| 0.1 * w);
        cache.update(&unique.keys, &unique.grads)?;
        for &k in &unique.keys {
            *issued.entry(k).or_default() += 1;
        }
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    cache.flush()?;
    let stats = cache.stats();

    // Every touched row's server version must equal the updates issued for it.
    let mut touched: Vec<u64> = issued.keys().copied().collect();
    touched.sort_unstable();
    let mut consistent = true;
    for chunk in touched.chunks(16_384) {
        let mut versions = vec![0u64; chunk.len()];
        let mut values = vec![0f32; chunk.len() * dim];
        cache
            .table()
            .pull(chunk, &mut values, Some(&mut versions))?;
        consistent &= chunk.iter().zip(&versions).all(|(k, v)| issued[k] == *v);
    }
    ensure!(
        consistent,
        "{name}: a server version differs from the updates issued"
    );
    Ok(DemoRun {
        name,
        batches_per_s: args.batches as f64 / elapsed,
        keys_per_s: (args.batches * args.batch) as f64 / elapsed,
        wire_bytes_per_batch: (stats.bytes_sent + stats.bytes_received) as f64
            / args.batches as f64,
        stats,
        versions_consistent: consistent,
    })
}
