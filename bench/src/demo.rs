//! `hetkv-bench demo`: the whole system on one machine with no setup. Two in-process shards,
//! several worker threads, a DeepFM trained on the Criteo-like data through the HET cache, and the
//! same run without a cache (the classic parameter server) for comparison: samples/s, cache hit
//! rate, bytes saved, and test AUC beside the planted model's ceiling. Then the reference
//! workload at HET's row width (128 floats), cache against no cache, over unlimited loopback and
//! over an emulated 1 Gbit/s link (a token bucket in the client's transport): what the cache saves,
//! and what it buys when the network binds.

use anyhow::Result;
use hetkv_client::Bound;
use serde::Serialize;

use crate::cache_bench::{Bench, RunResult, Workload};
use crate::train::{self, ModelKind, TrainArgs, TrainReport};
use hetkv_client::{CacheConfig, Capacity, PolicyKind};

/// Settings of the demo.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The model.
    #[arg(long, value_enum, default_value = "deepfm")]
    pub model: ModelKind,
    /// Worker threads, each with its own cache.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Training samples (one epoch).
    #[arg(long, default_value_t = 1_500_000)]
    pub train: usize,
    /// Held-out samples.
    #[arg(long, default_value_t = 200_000)]
    pub test: usize,
    /// Cache size as a fraction of the embedding table.
    #[arg(long, default_value_t = 0.10)]
    pub cache: f64,
    /// Read and write staleness bound of the caches.
    #[arg(long, default_value = "100")]
    pub bound: Bound,
    /// Cardinality scale of the Criteo-like data.
    #[arg(long, default_value_t = 0.01)]
    pub scale: f64,
    /// The emulated link of the row-width comparison, in Gbit/s each way.
    #[arg(long, default_value_t = 1.0)]
    pub emulated_link_gbps: f64,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// The reference workload at HET's row width over one link: cache against no cache.
#[derive(Debug, Serialize)]
pub struct LinkComparison {
    /// "loopback" or "emulated N Gbit/s".
    pub link: String,
    /// With the cache (10%, the demo's bound).
    pub cached: RunResult,
    /// Without.
    pub no_cache: RunResult,
    /// Batches/s with the cache over those without.
    pub speedup: f64,
    /// 1 - bytes per batch with the cache / without.
    pub bytes_reduction: f64,
}

/// What the demo measured.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// The run with the cache.
    pub cached: TrainReport,
    /// The same run without a cache.
    pub no_cache: TrainReport,
    /// Embedding bytes on the wire per sample with the cache over those without.
    pub bytes_ratio: f64,
    /// Samples/s with the cache over those without.
    pub speed_ratio: f64,
    /// The reference workload at rows of 128, over loopback and over the emulated link.
    pub row_width_128: Vec<LinkComparison>,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<DemoReport> {
    let base = TrainArgs {
        workers: args.workers,
        pull_bound: args.bound,
        push_bound: args.bound,
        cache: args.cache,
        train: args.train,
        test: args.test,
        scale: args.scale,
        ..TrainArgs::defaults(args.model)
    };
    eprintln!(
        "training {:?} on {} Criteo-like samples with {} workers, two in-process shards: with the HET cache, then without",
        args.model, args.train, args.workers
    );
    let cached = train::run(&base)?;
    let no_cache = train::run(&TrainArgs {
        cache: 0.0,
        ..base.clone()
    })?;
    eprintln!(
        "the reference workload at rows of 128: cache and no cache, over loopback and over an \
         emulated {} Gbit/s link",
        args.emulated_link_gbps
    );
    let mut row_width_128 = Vec::new();
    for link in [None, Some(args.emulated_link_gbps)] {
        let workload = Workload {
            rows: 200_000,
            dim: 128,
            zipf: 1.05,
            batch: 2048,
            warmup: 50,
            measured: 150,
            shards: 2,
            seed: 1,
            emulated_link_gbps: link,
        };
        let bench = Bench::start(&workload)?;
        let cached = bench.run(
            CacheConfig::new(Capacity::Fraction(args.cache), PolicyKind::Lfu, args.bound),
            1,
        )?;
        let no_cache_run = bench.run(CacheConfig::disabled(), 1)?;
        row_width_128.push(LinkComparison {
            link: link.map_or("loopback".into(), |g| format!("emulated {g} Gbit/s")),
            speedup: cached.batches_per_s / no_cache_run.batches_per_s,
            bytes_reduction: 1.0 - cached.bytes_per_batch / no_cache_run.bytes_per_batch,
            cached,
            no_cache: no_cache_run,
        });
    }
    Ok(DemoReport {
        row_width_128,
        bytes_ratio: cached.embedding_bytes_per_sample / no_cache.embedding_bytes_per_sample,
        speed_ratio: cached.samples_per_s / no_cache.samples_per_s,
        cached,
        no_cache,
    })
}

/// The report for people.
pub fn summary(r: &DemoReport) -> String {
    let line = |name: &str, x: &TrainReport| {
        format!(
            "  {name:<34} {:>7.0} samples/s  embeddings {:>4.0} B/sample, dense layers {:>4.0}  hit rate {:>5.1}%  test AUC {:.4}  logloss {:.4}\n",
            x.samples_per_s,
            x.embedding_bytes_per_sample,
            x.dense_bytes_per_sample,
            x.cache.hit_rate() * 100.0,
            x.auc,
            x.logloss
        )
    };
    let c = &r.cached;
    let mut links = String::new();
    for l in &r.row_width_128 {
        links += &format!(
            "  {:<22} cache {:>6.1} batches/s, no cache {:>6.1}: {:.2}x the speed, {:.1}% fewer bytes ({:.0} KB a batch without)\n",
            l.link,
            l.cached.batches_per_s,
            l.no_cache.batches_per_s,
            l.speedup,
            l.bytes_reduction * 100.0,
            l.no_cache.bytes_per_batch / 1e3
        );
    }
    format!(
        "\nhetkv demo: {:?}, {} workers, {} training samples, {} held out\n\n{}{}\n  the cache sent {:.1}% fewer embedding bytes at {:.2}x the speed; test AUC {:.4} with the cache, {:.4} without; the planted model scores {:.4}\n\nthe reference workload (Zipf keys, batches of 2048) at HET's row width, 128 floats, one client:\n{}",
        c.settings.model,
        c.settings.workers,
        c.settings.train,
        c.settings.test,
        line(&format!("HET cache {:.0}%, bounds {}", c.settings.cache * 100.0, c.settings.pull_bound), c),
        line("no cache (classic parameter server)", &r.no_cache),
        (1.0 - r.bytes_ratio) * 100.0,
        r.speed_ratio,
        c.auc,
        r.no_cache.auc,
        c.oracle_auc,
        links
    )
}
