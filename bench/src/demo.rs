//! `hetkv-bench demo`: the whole system on one machine with no setup. Two in-process shards,
//! several worker threads, a DeepFM trained on the Criteo-like data through the HET cache, and the
//! same run without a cache (the classic parameter server) for comparison: samples/s, cache hit
//! rate, bytes saved, and test AUC beside the planted model's ceiling.

use anyhow::Result;
use hetkv_client::Bound;
use serde::Serialize;

use crate::train::{self, ModelKind, TrainArgs, TrainReport};

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
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
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
    Ok(DemoReport {
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
    format!(
        "\nhetkv demo: {:?}, {} workers, {} training samples, {} held out\n\n{}{}\n  the cache sent {:.1}% fewer embedding bytes at {:.2}x the speed; test AUC {:.4} with the cache, {:.4} without; the planted model scores {:.4}\n",
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
        c.oracle_auc
    )
}
