//! `hetkv-bench checkpoint`: what checkpoints cost, measured on one in-process shard writing into a
//! data directory (no network: the shard's own work). Side by side in one run:
//!
//! - checkpoint write bandwidth against a plain sequential write of the same bytes to the same
//!   directory (1 MiB buffered writes, then fsync);
//! - push throughput (threads applying batches of random rows) while checkpoints are written back
//!   to back, against the same threads with no checkpoint;
//! - restore time per GiB (a new shard restoring the newest checkpoint);
//! - the size of an incremental checkpoint after N batches of the Criteo-like key stream, as a
//!   fraction of a full one: of a fixed table of every id, and of a dynamic table of the raw ids
//!   capped at 10% of them (filled first, so evicting throughout).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetkv_store::{Shard, ShardConfig, Table};
use hetkv_transport::wire::{le_array, PushRows};
use hetkv_transport::{Initializer, OptimizerSpec, Produced, TableSpec};
use serde::Serialize;

use crate::criteo::{CriteoSynth, CATEGORICAL};
use crate::workload::UniformKeys;

/// Settings.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Directory to write into (a temporary one under it is removed afterwards).
    #[arg(long, default_value = "target/checkpoint-bench")]
    pub dir: PathBuf,
    /// Rows of the table.
    #[arg(long, default_value_t = 2_000_000)]
    pub rows: u64,
    /// Row width.
    #[arg(long, default_value_t = 64)]
    pub dim: u32,
    /// Pushing threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Rows per push.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Seconds of each push measurement.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Repetitions of the bandwidth comparison.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Batches of the Criteo-like stream (128 samples x 26 fields) before each incremental size
    /// measurement.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub criteo_batches: Vec<usize>,
    /// Cardinality scale of the Criteo-like table for the incremental sizes (1.0: the Kaggle
    /// cardinalities, 33.8M rows).
    #[arg(long, default_value_t = 0.05)]
    pub criteo_scale: f64,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct CheckpointReport {
    /// Rows, dim and optimizer of the table.
    pub table: String,
    /// Bytes of one full checkpoint.
    pub checkpoint_bytes: u64,
    /// Each round: (checkpoint GB/s, plain write GB/s).
    pub bandwidth_rounds: Vec<(f64, f64)>,
    /// Median checkpoint bandwidth over median plain bandwidth.
    pub bandwidth_ratio: f64,
    /// Rows pushed per second with no checkpoint.
    pub push_rows_per_s_alone: f64,
    /// Rows pushed per second while checkpoints were written back to back.
    pub push_rows_per_s_during: f64,
    /// Checkpoints written during that measurement.
    pub checkpoints_during: u64,
    /// The ratio of the two.
    pub push_ratio: f64,
    /// Seconds to restore the newest full checkpoint, per GiB of checkpoint.
    pub restore_s_per_gib: f64,
    /// Rows of the Criteo-like table.
    pub criteo_rows: u64,
    /// On the Criteo-like stream.
    pub incremental: Vec<IncrementalSize>,
    /// Capacity of the dynamic table of the Criteo-like raw ids (10% of the distinct ids).
    pub dynamic_capacity: u64,
    /// The same for that dynamic table, full when its full checkpoint is taken.
    pub dynamic_incremental: Vec<IncrementalSize>,
}

/// (batches, incremental bytes, full bytes, fraction): an incremental checkpoint's size after
/// that many batches, against the full one before them.
pub type IncrementalSize = (usize, u64, u64, f64);

fn shard(dir: &Path) -> Result<Shard> {
    let mut c = ShardConfig::new(0, 1);
    c.data_dir = Some(dir.to_path_buf());
    Ok(Shard::new(c)?)
}

fn push(t: &Table, keys: &[u64], grads: &[u8]) {
    let k: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let c: Vec<u8> = keys.iter().flat_map(|_| 1u32.to_le_bytes()).collect();
    let g = &grads[..keys.len() * t.spec().dim as usize * 4];
    let locals = t
        .validate_push(le_array(&k), le_array(&c), le_array(g))
        .expect("valid push");
    let rows = PushRows {
        keys: le_array(&k),
        counts: le_array(&c),
        bases: None,
        grads: le_array(g),
    };
    t.apply_push(&locals, &rows, &mut Produced::default());
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Rows/s of `threads` pushing for `secs`, while `during` runs on this thread (until `stop`).
fn push_rate(
    t: &Arc<Table>,
    args: &CheckpointArgs,
    mut during: impl FnMut(&AtomicBool) -> u64,
) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..args.threads)
        .map(|w| {
            let (t, stop, rows) = (t.clone(), stop.clone(), rows.clone());
            let batch = args.batch;
            std::thread::spawn(move || {
                let mut keys = vec![0u64; batch];
                let mut gen = UniformKeys::new(t.spec().rows, 17 + w as u64);
                let grads: Vec<u8> = (0..batch * t.spec().dim as usize)
                    .flat_map(|i| ((i % 7) as f32 * 0.01 - 0.03).to_le_bytes())
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    gen.fill(&mut keys);
                    push(&t, &keys, &grads);
                    rows.fetch_add(batch as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let n = during(&stop);
    stopper.join().expect("stopper");
    handles.into_iter().for_each(|h| h.join().expect("pusher"));
    let secs = start.elapsed().as_secs_f64();
    (rows.load(Ordering::Relaxed) as f64 / secs, n)
}

/// Runs the measurements.
pub fn run(args: &CheckpointArgs) -> Result<CheckpointReport> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let root = tempfile::tempdir_in(&args.dir)?;
    let data = root.path().join("data");
    let spec = TableSpec {
        name: "emb".into(),
        rows: args.rows,
        dim: args.dim,
        init: Initializer::Uniform {
            bound: 0.01,
            seed: 1,
        },
        optimizer: OptimizerSpec::Adam {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let s = shard(&data)?;
    let (t, _) = s.create(spec.clone())?;
    let mut rounds = Vec::new();
    let mut bytes = 0;
    for r in 0..args.rounds {
        let start = Instant::now();
        let done = s.checkpoint(&format!("bw-{r}"), false)?;
        let ck = done.bytes as f64 / start.elapsed().as_secs_f64() / 1e9;
        bytes = done.bytes;
        let plain = root.path().join("data").join("plain.bin");
        let start = Instant::now();
        {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&plain)?);
            let block = vec![0x5au8; 1 << 20];
            let mut left = done.bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                f.write_all(&block[..n])?;
                left -= n as u64;
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        let pl = done.bytes as f64 / start.elapsed().as_secs_f64() / 1e9;
        std::fs::remove_file(&plain)?;
        rounds.push((ck, pl));
        eprintln!("round {r}: checkpoint {ck:.3} GB/s, plain write {pl:.3} GB/s");
    }
    let bandwidth_ratio =
        median(rounds.iter().map(|r| r.0).collect()) / median(rounds.iter().map(|r| r.1).collect());

    let (alone, _) = push_rate(&t, args, |_| 0);
    let mut k = 0;
    let (during, n) = push_rate(&t, args, |stop| {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            s.checkpoint(&format!("during-{k}"), false)
                .expect("checkpoint");
            k += 1;
            n += 1;
        }
        n
    });
    eprintln!("pushes: {alone:.0} rows/s alone, {during:.0} rows/s during {n} checkpoints");
    let last = s.checkpoint("restore-me", false)?;
    drop(t);
    drop(s);
    let start = Instant::now();
    let r = shard(&data)?;
    r.restore(Some("restore-me"))?;
    let restore_s_per_gib =
        start.elapsed().as_secs_f64() / (last.bytes as f64 / (1u64 << 30) as f64);
    drop(r);

    // Incremental size on the Criteo-like stream (a table of its rows).
    let mut incremental = Vec::new();
    let criteo_rows = CriteoSynth::new(args.criteo_scale, 5)?.table_rows();
    for &batches in &args.criteo_batches {
        let dir = root.path().join(format!("criteo-{batches}"));
        let mut synth = CriteoSynth::new(args.criteo_scale, 5)?;
        let s = shard(&dir)?;
        let (t, _) = s.create(TableSpec {
            rows: synth.table_rows(),
            ..spec.clone()
        })?;
        let full = s.checkpoint("full", false)?;
        let grads: Vec<u8> = (0..128 * CATEGORICAL * args.dim as usize)
            .flat_map(|_| 0.01f32.to_le_bytes())
            .collect();
        for _ in 0..batches {
            let mut keys: Vec<u64> = (0..128)
                .flat_map(|_| {
                    let smp = synth.sample();
                    (0..CATEGORICAL)
                        .map(|f| synth.key(f, Some(smp.ids[f])))
                        .collect::<Vec<_>>()
                })
                .collect();
            keys.sort_unstable();
            keys.dedup();
            push(&t, &keys, &grads);
        }
        let inc = s.checkpoint("inc", true)?;
        let frac = inc.bytes as f64 / full.bytes as f64;
        eprintln!(
            "criteo-like: after {batches} batches of 128, an incremental checkpoint is {frac:.4} of a full one"
        );
        incremental.push((batches, inc.bytes, full.bytes, frac));
    }
    let (dynamic_capacity, dynamic_incremental) = dynamic_incremental(args, &root, &spec)?;
    Ok(CheckpointReport {
        table: format!("{} rows x dim {} (adam)", args.rows, args.dim),
        checkpoint_bytes: bytes,
        bandwidth_rounds: rounds,
        bandwidth_ratio,
        push_rows_per_s_alone: alone,
        push_rows_per_s_during: during,
        checkpoints_during: n,
        push_ratio: during / alone,
        restore_s_per_gib,
        criteo_rows,
        incremental,
        dynamic_capacity,
        dynamic_incremental,
    })
}

/// Batches of 128 Criteo-like samples as raw ids, each batch's distinct ids sorted.
fn raw_batch(synth: &mut CriteoSynth) -> Vec<u64> {
    let mut keys: Vec<u64> = (0..128)
        .flat_map(|_| {
            let smp = synth.sample();
            (0..CATEGORICAL)
                .map(|f| synth.raw_id(synth.key(f, Some(smp.ids[f]))))
                .collect::<Vec<_>>()
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The incremental sizes of a dynamic table of the Criteo-like raw ids, capped at 10% of the
/// distinct ids (LRU, admission `always`): filled by the stream until it holds 99% of its
/// capacity (or 20,000 batches), then a full checkpoint, `batches` more batches and an
/// incremental one. Returns the capacity and (batches, incremental bytes, full bytes, fraction).
fn dynamic_incremental(
    args: &CheckpointArgs,
    root: &tempfile::TempDir,
    spec: &TableSpec,
) -> Result<(u64, Vec<IncrementalSize>)> {
    let mut out = Vec::new();
    let capacity = CriteoSynth::new(args.criteo_scale, 5)?.table_rows() / 10;
    let dynamic = TableSpec {
        name: "raw".into(),
        rows: capacity,
        dynamic: Some(hetkv_transport::DynamicSpec {
            admission: hetkv_transport::Admission::Always,
            eviction: hetkv_transport::Eviction::Lru,
        }),
        ..spec.clone()
    };
    let grads: Vec<u8> = (0..128 * CATEGORICAL * args.dim as usize)
        .flat_map(|_| 0.01f32.to_le_bytes())
        .collect();
    for &batches in &args.criteo_batches {
        let dir = root.path().join(format!("criteo-raw-{batches}"));
        let mut synth = CriteoSynth::new(args.criteo_scale, 5)?;
        let s = shard(&dir)?;
        let (t, _) = s.create_dynamic(dynamic.clone())?;
        let push = |keys: &[u64]| -> Result<()> {
            let k: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
            let c: Vec<u8> = keys.iter().flat_map(|_| 1u32.to_le_bytes()).collect();
            let g = &grads[..keys.len() * args.dim as usize * 4];
            let p = t.validate_push(le_array(&k), le_array(&c), le_array(g))?;
            t.apply_push(&p, None)?;
            Ok(())
        };
        let mut filled = 0;
        while t.rows().resident() < t.capacity() * 99 / 100 && filled < 20_000 {
            push(&raw_batch(&mut synth))?;
            filled += 1;
        }
        let full = s.checkpoint("full", false)?;
        for _ in 0..batches {
            push(&raw_batch(&mut synth))?;
        }
        let inc = s.checkpoint("inc", true)?;
        let frac = inc.bytes as f64 / full.bytes as f64;
        eprintln!(
            "criteo-like raw ids, dynamic table of {} slots ({} held after {filled} batches): after \
             {batches} batches of 128, an incremental checkpoint is {frac:.4} of a full one",
            t.capacity(),
            t.rows().resident()
        );
        out.push((batches, inc.bytes, full.bytes, frac));
    }
    Ok((capacity, out))
}
