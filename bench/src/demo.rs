//! `hetkv-bench demo`: the whole system on one machine with no setup. Starts an embedded cluster,
//! runs an embedding workload (Zipf(1.05) keys, lookups then gradient pushes) through the client,
//! checks the servers' versions against the updates sent, and reports.
//!
//! The client has no cache yet: every lookup goes to the shards (the classic parameter server).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use hetkv_client::Cluster;
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

use crate::workload::{dedup, ZipfKeys};

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
    /// Batches to run.
    #[arg(long, default_value_t = 500)]
    pub batches: usize,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What the demo measured.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// Shards.
    pub shards: u32,
    /// Table rows and dim.
    pub rows: u64,
    /// Row dimension.
    pub dim: u32,
    /// Batches run.
    pub batches: usize,
    /// Keys per batch.
    pub batch: usize,
    /// Mean unique keys per batch.
    pub unique_per_batch: f64,
    /// Batches per second (lookup + update).
    pub batches_per_s: f64,
    /// Keys (with duplicates) served to the trainer per second.
    pub keys_per_s: f64,
    /// Bytes on the wire per batch, both directions.
    pub wire_bytes_per_batch: f64,
    /// Whether every touched row's server version equals the updates sent to it.
    pub versions_consistent: bool,
    /// Rows read and pushed per shard.
    pub shard_rows: Vec<(u64, u64)>,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<DemoReport> {
    eprintln!(
        "starting {} in-process shards on loopback; table of {} rows x {} f32",
        args.shards, args.rows, args.dim
    );
    let cluster = EmbeddedCluster::start(args.shards).context("starting the embedded cluster")?;
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())?;
    let spec = TableSpec {
        name: "demo".into(),
        rows: args.rows,
        dim: args.dim,
        init: Initializer::Normal {
            std: 0.01,
            seed: 42,
        },
        optimizer: OptimizerSpec::Sgd { lr: 0.05 },
    };
    let table = client.create_table(&spec)?;
    let dim = args.dim as usize;
    let mut gen = ZipfKeys::new(args.rows, args.zipf, 7)?;
    let mut raw = vec![0u64; args.batch];
    let mut keys = Vec::with_capacity(args.batch);
    let mut rows = Vec::new();
    let mut grads = Vec::new();
    let mut counts = Vec::new();
    let mut sent: HashMap<u64, u64> = HashMap::new();
    let mut unique_total = 0usize;
    let before = client.traffic();
    let start = Instant::now();
    for b in 0..args.batches {
        gen.fill(&mut raw);
        keys.clear();
        keys.extend_from_slice(&raw);
        let unique = dedup(&mut keys);
        unique_total += unique;
        rows.resize(unique * dim, 0.0);
        table.pull(&keys, &mut rows, None)?;
        // The gradient of a weight decay toward zero: deterministic, and it keeps values bounded.
        grads.clear();
        grads.extend(rows.iter().map(|w| 0.1 * w));
        counts.clear();
        counts.resize(unique, 1u32);
        table.push(&keys, &counts, &grads)?;
        for &k in &keys {
            *sent.entry(k).or_default() += 1;
        }
        if (b + 1) % 100 == 0 {
            eprintln!("  {} / {} batches", b + 1, args.batches);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = client.traffic();

    // Check the servers' versions of a sample of touched rows against the updates sent.
    let mut sample: Vec<u64> = sent.keys().copied().take(4096).collect();
    sample.sort_unstable();
    let mut versions = vec![0u64; sample.len()];
    let mut values = vec![0f32; sample.len() * dim];
    table.pull(&sample, &mut values, Some(&mut versions))?;
    let consistent = sample.iter().zip(&versions).all(|(k, v)| sent[k] == *v);
    ensure!(consistent, "a server version differs from the updates sent");

    let stats = client.stats()?;
    Ok(DemoReport {
        shards: args.shards,
        rows: args.rows,
        dim: args.dim,
        batches: args.batches,
        batch: args.batch,
        unique_per_batch: unique_total as f64 / args.batches as f64,
        batches_per_s: args.batches as f64 / elapsed,
        keys_per_s: (args.batches * args.batch) as f64 / elapsed,
        wire_bytes_per_batch: (after.sent - before.sent + after.received - before.received) as f64
            / args.batches as f64,
        versions_consistent: consistent,
        shard_rows: stats.iter().map(|s| (s.rows_read, s.rows_pushed)).collect(),
    })
}
