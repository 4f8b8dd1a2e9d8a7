//! `hetkv-bench tcp`: pull and push throughput over loopback TCP against an embedded cluster.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetkv_client::Cluster;
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

use crate::workload::UniformKeys;

/// Settings of a throughput run.
#[derive(clap::Args, Debug, Clone)]
pub struct TcpArgs {
    /// Rows per table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Row dimensions to measure.
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    pub dims: Vec<u32>,
    /// Keys per batch.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Client thread counts to measure (each thread has its own connections).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Shards in the embedded cluster.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One measurement.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// `pull` or `push`.
    pub op: &'static str,
    /// Row dimension.
    pub dim: u32,
    /// Client threads.
    pub threads: usize,
    /// Batches completed.
    pub batches: u64,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Payload (f32 values) per second, in GB/s.
    pub payload_gb_per_s: f64,
    /// Bytes on the wire per row (both directions, framing included).
    pub wire_bytes_per_row: f64,
    /// Mean batch latency, in microseconds.
    pub mean_batch_us: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Settings.
    pub rows: u64,
    /// Keys per batch.
    pub batch: usize,
    /// Shards.
    pub shards: u32,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Logical CPUs of the machine (client and server share them).
    pub cpus: usize,
    /// Measurements.
    pub entries: Vec<Entry>,
}

/// Runs the benchmark.
pub fn run(args: &TcpArgs) -> Result<Report> {
    let cluster = EmbeddedCluster::start(args.shards).context("starting the embedded cluster")?;
    let config = ClientConfig::default();
    let mut entries = Vec::new();
    let bar = crate::progress::bar(
        (args.dims.len() * args.threads.len() * 2) as u64,
        "measurements",
    );
    for &dim in &args.dims {
        let spec = TableSpec {
            name: format!("bench_d{dim}"),
            rows: args.rows,
            dim,
            init: Initializer::Uniform {
                bound: 0.01,
                seed: 1,
            },
            optimizer: OptimizerSpec::Sgd { lr: 0.01 },
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        };
        Cluster::connect_tcp(cluster.addrs(), &config)?.create_table(&spec)?;
        for &threads in &args.threads {
            for op in ["pull", "push"] {
                bar.inc(1);
                let e = measure(&cluster, &spec, op, threads, args)?;
                bar.suspend(|| {
                    eprintln!(
                        "{op:>4} dim {dim:>4} threads {threads}: {:>10.0} rows/s  {:>6.2} GB/s payload  {:>6.1} wire B/row  {:>7.0} us/batch",
                        e.rows_per_s, e.payload_gb_per_s, e.wire_bytes_per_row, e.mean_batch_us
                    );
                });
                entries.push(e);
            }
        }
    }
    bar.finish_and_clear();
    Ok(Report {
        rows: args.rows,
        batch: args.batch,
        shards: args.shards,
        seconds: args.seconds,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        entries,
    })
}

fn measure(
    cluster: &EmbeddedCluster,
    spec: &TableSpec,
    op: &'static str,
    threads: usize,
    args: &TcpArgs,
) -> Result<Entry> {
    let dim = spec.dim as usize;
    let deadline = Duration::from_secs_f64(args.seconds);
    let results: Vec<Result<(u64, u64, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(u64, u64, Duration)> {
                    let table = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())?
                        .open_table(&spec.name)?;
                    let mut keys = vec![0u64; args.batch];
                    let mut rows = vec![0f32; args.batch * dim];
                    let grads = vec![1e-3f32; args.batch * dim];
                    let counts = vec![1u32; args.batch];
                    let mut gen = UniformKeys::new(spec.rows, 17 + t as u64);
                    let mut step = |keys: &mut [u64]| -> Result<()> {
                        gen.fill(keys);
                        match op {
                            "pull" => table.pull(keys, &mut rows, None)?,
                            _ => {
                                table.push(keys, &counts, &grads)?;
                            }
                        }
                        Ok(())
                    };
                    for _ in 0..3 {
                        step(&mut keys)?; // warm-up: connections, page faults
                    }
                    let before = table.cluster().traffic();
                    let start = Instant::now();
                    let mut batches = 0u64;
                    while start.elapsed() < deadline {
                        step(&mut keys)?;
                        batches += 1;
                    }
                    let elapsed = start.elapsed();
                    let after = table.cluster().traffic();
                    let wire = after.sent - before.sent + after.received - before.received;
                    Ok((batches, wire, elapsed))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut batches = 0u64;
    let mut wire = 0u64;
    let mut secs = 0f64;
    for r in results {
        let (b, w, e) = r?;
        batches += b;
        wire += w;
        secs = secs.max(e.as_secs_f64());
    }
    let rows = batches as f64 * args.batch as f64;
    Ok(Entry {
        op,
        dim: spec.dim,
        threads,
        batches,
        rows_per_s: rows / secs,
        payload_gb_per_s: rows * 4.0 * dim as f64 / secs / 1e9,
        wire_bytes_per_row: wire as f64 / rows,
        mean_batch_us: secs * 1e6 * threads as f64 / batches as f64,
    })
}
