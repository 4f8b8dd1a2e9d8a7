//! `hetkv-bench dynamic`: a dynamic table on raw hashed ids beside the fixed table on the same
//! data, against a `hetkv serve` child process (so its resident memory is the daemon's alone).
//!
//! Three phases, one daemon:
//! 1. **Raw Criteo ids**: the Criteo-like stream (`criteo.rs`, Kaggle's per-field cardinalities
//!    times `--scale`) with each id replaced by the raw 64-bit id a log carries
//!    ([`CriteoSynth::raw_id`]); a dynamic table capped at `--cap-fraction` of the distinct ids
//!    takes every batch's pull and push. The daemon's resident memory before and after, beside
//!    the documented bytes a row times the capacity.
//! 2. **Pulls, dynamic beside fixed**: the same batches pulled from the dynamic table (raw ids)
//!    and from a fixed table holding every id (dense keys), alternating batch by batch: rows/s of
//!    each and their ratio; with `--one-sided`, the same again read one-sidedly through shared
//!    memory (the daemon's CPU out of the reads: a dynamic table's key costs its bucket and its
//!    row, a fixed table's its row).
//! 3. **A flood** (`--flood N`): N ids never seen before pushed into a dynamic table capped at
//!    `--flood-cap` rows, while another client pulls the fixed table: the daemon's memory after,
//!    the rows held, and the other client's pulls served and their slowest batch.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hetkv_client::{Cluster, Table};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_transport::{Admission, DynamicSpec, Eviction, Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

use crate::criteo::{CriteoSynth, CATEGORICAL};

/// Settings of a run.
#[derive(clap::Args, Debug, Clone)]
pub struct DynamicArgs {
    /// Criteo's cardinalities times this (1.0: about 33.8M distinct ids).
    #[arg(long, default_value_t = 0.1)]
    pub scale: f64,
    /// Samples streamed through the dynamic table in phase 1.
    #[arg(long, default_value_t = 400_000)]
    pub samples: u64,
    /// Samples per batch (26 ids each).
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// The dynamic table's capacity as a fraction of the distinct ids.
    #[arg(long, default_value_t = 0.1)]
    pub cap_fraction: f64,
    /// Row dimension of every table.
    #[arg(long, default_value_t = 16)]
    pub dim: u32,
    /// Every table's initializer: `normal` (std 0.01) or `zeros`. A dynamic table computes a
    /// key's initial value at every read until the key is admitted; a fixed table, once at
    /// creation.
    #[arg(long, default_value = "normal", value_parser = ["normal", "zeros"])]
    pub init: String,
    /// Batches of phase 2 (each pulled from both tables).
    #[arg(long, default_value_t = 300)]
    pub pull_batches: u64,
    /// Never-seen ids pushed in phase 3 (0 skips it).
    #[arg(long, default_value_t = 10_000_000)]
    pub flood: u64,
    /// The flooded table's capacity in rows.
    #[arg(long, default_value_t = 1_000_000)]
    pub flood_cap: u64,
    /// Phase 2 also reads both tables one-sidedly, through shared memory (the daemon then
    /// exposes its regions in a temporary directory).
    #[arg(long)]
    pub one_sided: bool,
    /// The `hetkv` binary [default: beside this one].
    #[arg(long)]
    pub hetkv: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Memory of one dynamic table: measured beside documented.
#[derive(Debug, Serialize)]
pub struct Memory {
    /// The table's capacity on the daemon (whole buckets).
    pub capacity: u64,
    /// Rows held at the end.
    pub held: u64,
    /// Documented bytes a row of capacity (region, optimizer state, score).
    pub bytes_per_row: f64,
    /// The daemon's footprint of the table (rows, state, scores, sketch, eviction log).
    pub documented_bytes: u64,
    /// Resident memory the daemon grew by while the table was created and filled.
    pub rss_growth_bytes: u64,
    /// `rss_growth_bytes / documented_bytes`.
    pub ratio: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct DynamicReport {
    /// Distinct ids of the data set (its fixed table's rows).
    pub distinct_ids: u64,
    /// Phase 1: the raw-id stream's table.
    pub criteo: Memory,
    /// Phase 1: updates refused admission (0 under `always`).
    pub refused_updates: u64,
    /// Phase 2: rows/s of pulls from the dynamic table.
    pub dynamic_pull_rows_per_s: f64,
    /// Phase 2: rows/s of pulls from the fixed table, same batches.
    pub fixed_pull_rows_per_s: f64,
    /// Phase 2: dynamic over fixed.
    pub pull_ratio: f64,
    /// Phase 2: rows/s of the fixed table's pulls with its keys in the raw ids' order.
    pub fixed_scattered_pull_rows_per_s: f64,
    /// Phase 2: dynamic over the fixed table in the same order of memory.
    pub pull_ratio_same_order: f64,
    /// Phase 2 with `--one-sided`: rows/s of one-sided reads of the dynamic table, of the fixed
    /// table, and their ratio.
    pub one_sided: Option<[f64; 3]>,
    /// Phase 3: the flooded table (absent when skipped).
    pub flood: Option<Flood>,
}

/// Phase 3's outcome.
#[derive(Debug, Serialize)]
pub struct Flood {
    /// Ids pushed, every one new.
    pub ids: u64,
    /// Seconds the pushes took.
    pub seconds: f64,
    /// Memory of the flooded table.
    pub memory: Memory,
    /// The other client's pulls of the fixed table completed meanwhile.
    pub other_pulls: u64,
    /// The other client's slowest pull, in milliseconds.
    pub other_max_ms: f64,
}

/// A `hetkv serve` child on a free loopback port; killed when dropped.
struct Daemon {
    child: Child,
    addr: String,
    /// Where it exposes its regions, when it does.
    _shm: Option<tempfile::TempDir>,
}

impl Daemon {
    fn start(binary: &PathBuf, one_sided: bool) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let shm = one_sided.then(tempfile::tempdir).transpose()?;
        let mut command = Command::new(binary);
        command.args(["serve", "--listen", &addr, "--shard", "0", "--shards", "1"]);
        if let Some(dir) = &shm {
            command.arg("--shm-dir").arg(dir.path());
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                bail!("{} did not listen on {addr} within 30 s", binary.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            addr,
            _shm: shm,
        })
    }

    /// Resident bytes (`VmRSS`).
    fn rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")?;
        Ok(kb * 1024)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(name: &str, rows: u64, dim: u32, init: Initializer, dynamic: bool) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows,
        dim,
        init,
        optimizer: OptimizerSpec::rowwise_adagrad(0.05),
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: dynamic.then_some(DynamicSpec {
            admission: Admission::Always,
            eviction: Eviction::Lfu,
        }),
    }
}

/// A batch's unique keys: dense (for the fixed table) and raw (for the dynamic one), each sorted
/// as `torch.unique` hands them out.
fn batch_keys(synth: &mut CriteoSynth, samples: usize) -> (Vec<u64>, Vec<u64>) {
    let mut dense = Vec::with_capacity(samples * CATEGORICAL);
    for _ in 0..samples {
        let s = synth.sample();
        for (f, &id) in s.ids.iter().enumerate() {
            dense.push(synth.key(f, Some(id)));
        }
    }
    dense.sort_unstable();
    dense.dedup();
    let mut raw: Vec<u64> = dense.iter().map(|&k| synth.raw_id(k)).collect();
    raw.sort_unstable();
    (dense, raw)
}

/// The table's capacity and rows held on the one shard.
fn held(cluster: &Cluster, table: &str) -> Result<(u64, u64)> {
    let shard = cluster.shard(0);
    let capacity = shard
        .list_tables()?
        .into_iter()
        .find(|t| t.spec.name == table)
        .context("the table is listed")?
        .local_rows;
    let stats = shard.stats()?;
    let held = stats
        .tables
        .iter()
        .find(|t| t.name == table)
        .context("the table has stats")?
        .local_rows;
    Ok((capacity, held))
}

fn memory(cluster: &Cluster, spec: &TableSpec, rss_before: u64, rss_after: u64) -> Result<Memory> {
    let (capacity, held) = held(cluster, &spec.name)?;
    // One shard: its region is the whole table's.
    let documented = hetkv_store::dynamic::DynamicTable::footprint(spec, 0, 1);
    let growth = rss_after.saturating_sub(rss_before);
    Ok(Memory {
        capacity,
        held,
        bytes_per_row: hetkv_store::dynamic::bytes_per_row(spec),
        documented_bytes: documented,
        rss_growth_bytes: growth,
        ratio: growth as f64 / documented as f64,
    })
}

/// Pushes a constant small gradient for `keys`; returns the updates refused.
fn push_all(table: &Table, keys: &[u64], dim: usize) -> Result<u64> {
    let counts = vec![1u32; keys.len()];
    let grads = vec![1e-3f32; keys.len() * dim];
    let applied = table.push(keys, &counts, &grads)?;
    Ok(keys.len() as u64 - applied)
}

/// Runs the three phases.
pub fn run(args: &DynamicArgs) -> Result<DynamicReport> {
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(
        args.cap_fraction > 0.0 && args.cap_fraction <= 1.0,
        "--cap-fraction must be in (0, 1]"
    );
    let binary = match &args.hetkv {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary's directory")?
            .join("hetkv"),
    };
    let daemon = Daemon::start(&binary, args.one_sided)?;
    let cluster = Cluster::connect_tcp(&[daemon.addr.as_str()], &ClientConfig::default())?;
    let dim = args.dim as usize;
    let init = match args.init.as_str() {
        "zeros" => Initializer::Zeros,
        _ => Initializer::Normal { std: 0.01, seed: 5 },
    };
    let mut synth = CriteoSynth::new(args.scale, args.seed)?;
    let distinct = synth.table_rows();
    let cap = ((distinct as f64 * args.cap_fraction).round() as u64).max(1);

    // Phase 1: the raw-id stream into the capped dynamic table.
    let raw_spec = spec("raw", cap, args.dim, init, true);
    let rss0 = daemon.rss()?;
    let raw = cluster.create_table(&raw_spec)?;
    let mut refused = 0;
    let batches = args.samples.div_ceil(args.batch as u64);
    let mut out = Vec::new();
    for _ in 0..batches {
        let (_, ids) = batch_keys(&mut synth, args.batch);
        out.resize(ids.len() * dim, 0.0);
        raw.pull(&ids, &mut out, None)?;
        refused += push_all(&raw, &ids, dim)?;
    }
    let criteo = memory(&cluster, &raw_spec, rss0, daemon.rss()?)?;
    eprintln!(
        "raw ids: {} of capacity {} held; daemon grew {:.1} MB, documented {:.1} MB ({:.3}x)",
        criteo.held,
        criteo.capacity,
        criteo.rss_growth_bytes as f64 / 1e6,
        criteo.documented_bytes as f64 / 1e6,
        criteo.ratio
    );

    // Phase 2: the same batches from both tables, in turn (the order rotating batch by batch):
    // the dynamic table's raw ids sorted, the fixed table's dense keys sorted, and the fixed
    // table's keys in the order of their raw ids (the same scattered order of memory).
    let fixed = cluster.create_table(&spec("fixed", distinct, args.dim, init, false))?;
    let mut t = [Duration::ZERO; 3];
    let mut rows = 0u64;
    for b in 0..args.pull_batches {
        let (dense, ids) = batch_keys(&mut synth, args.batch);
        let mut by_raw: Vec<(u64, u64)> = dense.iter().map(|&k| (synth.raw_id(k), k)).collect();
        by_raw.sort_unstable();
        let scattered: Vec<u64> = by_raw.iter().map(|p| p.1).collect();
        out.resize(ids.len() * dim, 0.0);
        let pulls: [(&Table, &[u64]); 3] = [(&raw, &ids), (&fixed, &dense), (&fixed, &scattered)];
        for i in 0..3 {
            let which = (i + b as usize) % 3;
            let (table, keys) = pulls[which];
            let start = Instant::now();
            table.pull(keys, &mut out, None)?;
            t[which] += start.elapsed();
        }
        rows += ids.len() as u64;
    }
    let [dynamic_rate, fixed_rate, fixed_scattered_rate] = t.map(|d| rows as f64 / d.as_secs_f64());
    eprintln!(
        "pulls: dynamic {dynamic_rate:.0} rows/s, fixed {fixed_rate:.0} rows/s ({:.3}x), fixed in \
         the raw ids' order {fixed_scattered_rate:.0} rows/s ({:.3}x)",
        dynamic_rate / fixed_rate,
        dynamic_rate / fixed_scattered_rate
    );
    let one_sided = if args.one_sided {
        let shm = Cluster::connect(
            &[daemon.addr.as_str()],
            hetkv_client::TransportKind::Shm,
            &ClientConfig::default(),
        )?;
        let (raw, fixed) = (shm.open_table("raw")?, shm.open_table("fixed")?);
        let mut t = [Duration::ZERO; 2];
        let mut rows = 0u64;
        for b in 0..args.pull_batches {
            let (dense, ids) = batch_keys(&mut synth, args.batch);
            out.resize(ids.len() * dim, 0.0);
            let pulls: [(&Table, &[u64]); 2] = [(&raw, &ids), (&fixed, &dense)];
            for i in 0..2 {
                let which = (i + b as usize) % 2;
                let (table, keys) = pulls[which];
                let start = Instant::now();
                table.pull(keys, &mut out, None)?;
                t[which] += start.elapsed();
            }
            rows += ids.len() as u64;
        }
        let [d, f] = t.map(|d| rows as f64 / d.as_secs_f64());
        eprintln!(
            "one-sided reads (shared memory): dynamic {d:.0} rows/s, fixed {f:.0} rows/s ({:.3}x)",
            d / f
        );
        Some([d, f, d / f])
    } else {
        None
    };

    // Phase 3: a flood of new ids while another client pulls the fixed table.
    let flood = if args.flood == 0 {
        None
    } else {
        let flood_spec = spec("flood", args.flood_cap, args.dim, init, true);
        let rss0 = daemon.rss()?;
        let table = cluster.create_table(&flood_spec)?;
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (fixed, stop) = (fixed.clone(), stop.clone());
            let keys: Vec<u64> = (0..distinct)
                .step_by((distinct / 4096).max(1) as usize)
                .collect();
            std::thread::spawn(move || -> Result<(u64, Duration)> {
                let mut out = vec![0f32; keys.len() * dim];
                let (mut n, mut worst) = (0u64, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    fixed.pull(&keys, &mut out, None)?;
                    worst = worst.max(start.elapsed());
                    n += 1;
                }
                Ok((n, worst))
            })
        };
        let start = Instant::now();
        let chunk = 8192u64;
        let mut next = 0u64;
        while next < args.flood {
            let ids: Vec<u64> = (next..(next + chunk).min(args.flood))
                .map(|i| hetkv_transport::hash::splitmix64(i ^ 0xF100D))
                .collect();
            push_all(&table, &ids, dim)?;
            next += ids.len() as u64;
        }
        let seconds = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (other_pulls, worst) = other
            .join()
            .map_err(|_| anyhow::anyhow!("the other client panicked"))??;
        let memory = memory(&cluster, &flood_spec, rss0, daemon.rss()?)?;
        eprintln!(
            "flood: {} new ids in {seconds:.1} s; {} of capacity {} held; daemon grew {:.1} MB, \
             documented {:.1} MB ({:.3}x); the other client pulled {other_pulls} times, slowest \
             {:.1} ms",
            args.flood,
            memory.held,
            memory.capacity,
            memory.rss_growth_bytes as f64 / 1e6,
            memory.documented_bytes as f64 / 1e6,
            memory.ratio,
            worst.as_secs_f64() * 1e3
        );
        Some(Flood {
            ids: args.flood,
            seconds,
            memory,
            other_pulls,
            other_max_ms: worst.as_secs_f64() * 1e3,
        })
    };
    Ok(DynamicReport {
        distinct_ids: distinct,
        criteo,
        refused_updates: refused,
        dynamic_pull_rows_per_s: dynamic_rate,
        fixed_pull_rows_per_s: fixed_rate,
        pull_ratio: dynamic_rate / fixed_rate,
        fixed_scattered_pull_rows_per_s: fixed_scattered_rate,
        pull_ratio_same_order: dynamic_rate / fixed_scattered_rate,
        one_sided,
        flood,
    })
}
