//! The reference workload of the cache issue, and the two reports built on it:
//! `cache-sweep` (hit rate against cache size and policy) and `comm` (bytes and batches/s against
//! the bounds and the no-cache baseline).
//!
//! Workload: a table of `rows` x `dim` f32 (SGD); ranks drawn Zipf(s) over the rows and mapped to
//! ids by a random permutation; batches of `batch` keys with duplicates kept; per batch a lookup
//! of all of them, then an update of the same keys as a backward pass produces it (one gradient row
//! per unique key, summed over its occurrences: one optimizer step per row per batch); `warmup`
//! batches, then `measured` batches. Each client's key stream is drawn before timing. Hit rate is counted over the unique keys of each batch. Every cache, and the
//! baseline, runs through the same `CachedTable` code: the baseline is `CacheConfig::disabled()`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use hetkv_client::{Bound, CacheConfig, CacheStats, Capacity, Cluster, PolicyKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::Serialize;

use crate::workload::ZipfKeys;

/// The reference workload's parameters.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Workload {
    /// Rows in the table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Row dimension.
    #[arg(long, default_value_t = 64)]
    pub dim: u32,
    /// Zipf exponent.
    #[arg(long, default_value_t = 1.05)]
    pub zipf: f64,
    /// Keys per batch (duplicates kept).
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Warm-up batches per client.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Measured batches per client.
    #[arg(long, default_value_t = 500)]
    pub measured: usize,
    /// Shards in the embedded cluster.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Seed of the permutation and the draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// An emulated link of this many Gbit/s each way between every client and every shard (a
    /// token bucket in the client's transport: transfer time only, no latency; labelled
    /// "emulated" in the report). Unlimited loopback when absent.
    #[arg(long)]
    pub emulated_link_gbps: Option<f64>,
}

impl Workload {
    /// The clients' transport settings: the emulated link, if any.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            emulated_link: self
                .emulated_link_gbps
                .map(hetkv_fallback_tcp::LinkLimit::gbit),
            ..ClientConfig::default()
        }
    }
}

/// What one run measured (sums over its clients, per client batch where it says so).
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// `no-cache` or the policy.
    pub policy: String,
    /// Cache size as a fraction of the table (0 for no cache).
    pub cache_fraction: f64,
    /// Read bound.
    pub pull_bound: String,
    /// Write bound.
    pub push_bound: String,
    /// Clients (threads, each with its own connections and cache).
    pub clients: usize,
    /// Hits over unique keys, measured batches.
    pub hit_rate: f64,
    /// Unique keys per batch.
    pub unique_per_batch: f64,
    /// Rows received per batch.
    pub rows_pulled_per_batch: f64,
    /// Rows pushed per batch.
    pub rows_pushed_per_batch: f64,
    /// Bytes received per batch.
    pub bytes_received_per_batch: f64,
    /// Bytes sent per batch.
    pub bytes_sent_per_batch: f64,
    /// Bytes on the wire per batch, both directions.
    pub bytes_per_batch: f64,
    /// Batches per second, all clients together.
    pub batches_per_s: f64,
    /// Stale refreshes per batch.
    pub stale_refreshes_per_batch: f64,
    /// Whether each batch's lookup was prefetched during the previous batch's gradients and
    /// update (`CachedTable::prefetch`).
    pub prefetch: bool,
    /// Rows pushed by the final flush after the measured batches (not in the per-batch figures).
    pub flush_rows: u64,
    /// Counters of the measured batches, all clients summed.
    pub stats: CacheStats,
}

/// A table of the workload's shape on a fresh embedded cluster.
pub struct Bench {
    cluster: EmbeddedCluster,
    spec: TableSpec,
    permutation: Arc<Vec<u64>>,
    /// The workload.
    pub workload: Workload,
}

impl Bench {
    /// Starts the cluster and creates the table.
    pub fn start(workload: &Workload) -> Result<Self> {
        let cluster =
            EmbeddedCluster::start(workload.shards).context("starting the embedded cluster")?;
        let spec = TableSpec {
            name: "reference".into(),
            rows: workload.rows,
            dim: workload.dim,
            init: Initializer::Normal { std: 0.01, seed: 3 },
            optimizer: OptimizerSpec::Sgd { lr: 0.01 },
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        };
        Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())?.create_table(&spec)?;
        let permutation = ZipfKeys::permutation(workload.rows, workload.seed);
        Ok(Self {
            cluster,
            spec,
            permutation,
            workload: workload.clone(),
        })
    }

    /// Hit rate, over the unique keys of the measured batches, of a static cache holding exactly
    /// the `rows` most probable ids (the bound no online policy can beat on this stream).
    pub fn static_top_hit_rate(&self, rows: u64) -> Result<f64> {
        let w = &self.workload;
        let mut gen = ZipfKeys::with_permutation(w.zipf, self.permutation.clone(), w.seed)?;
        let (mut keys, mut ranks) = (vec![0u64; w.batch], vec![0u64; w.batch]);
        let (mut hits, mut unique) = (0u64, 0u64);
        let mut seen = HashSet::new();
        for b in 0..w.warmup + w.measured {
            gen.fill_ranked(&mut keys, Some(&mut ranks));
            if b < w.warmup {
                continue;
            }
            seen.clear();
            for (&k, &r) in keys.iter().zip(&ranks) {
                if seen.insert(k) {
                    unique += 1;
                    hits += (r < rows) as u64;
                }
            }
        }
        Ok(hits as f64 / unique.max(1) as f64)
    }

    /// Hit rate, over the unique keys of the measured batches, of the best any policy can do that
    /// learns popularity from the stream: before each batch it holds the `rows` keys seen in the
    /// most earlier batches (exact counts, never aged; ties split evenly). No cache policy that
    /// does not know the distribution in advance can expect more on this stream.
    pub fn online_lfu_ceiling(&self, rows: u64) -> Result<f64> {
        let w = &self.workload;
        let mut gen = ZipfKeys::with_permutation(w.zipf, self.permutation.clone(), w.seed)?;
        let mut keys = vec![0u64; w.batch];
        let mut count = vec![0u32; w.rows as usize];
        // histogram[c] = number of keys seen in exactly c batches (c >= 1).
        let mut histogram = vec![0u64; w.warmup + w.measured + 2];
        let mut seen = HashSet::new();
        let mut expected_hits = 0f64;
        let mut unique = 0u64;
        for b in 0..w.warmup + w.measured {
            gen.fill(&mut keys);
            seen.clear();
            seen.extend(keys.iter().copied());
            if b >= w.warmup {
                // Threshold: the cache holds every key with count > t and a share of those at t.
                let (mut above, mut t) = (0u64, histogram.len() - 1);
                while t > 0 && above + histogram[t] <= rows {
                    above += histogram[t];
                    t -= 1;
                }
                let share = if t == 0 || histogram[t] == 0 {
                    0.0
                } else {
                    (rows - above) as f64 / histogram[t] as f64
                };
                for &k in &seen {
                    let c = count[k as usize] as usize;
                    expected_hits += if c > t {
                        1.0
                    } else if c == t && c > 0 {
                        share
                    } else {
                        0.0
                    };
                }
                unique += seen.len() as u64;
            }
            for &k in &seen {
                let c = &mut count[k as usize];
                if *c > 0 {
                    histogram[*c as usize] -= 1;
                }
                *c += 1;
                histogram[*c as usize] += 1;
            }
        }
        Ok(expected_hits / unique.max(1) as f64)
    }

    /// Runs the workload with `clients` clients under `config`.
    pub fn run(&self, config: CacheConfig, clients: usize) -> Result<RunResult> {
        self.run_with(config, clients, false)
    }

    /// Runs the workload with `clients` clients under `config`; with `prefetch`, each client
    /// prefetches batch t+1's lookup right after batch t's, so that the round trip overlaps
    /// batch t's gradients and update (whose pushes ride with the prefetch after it).
    pub fn run_with(
        &self,
        config: CacheConfig,
        clients: usize,
        prefetch: bool,
    ) -> Result<RunResult> {
        let w = &self.workload;
        let ahead = if prefetch { ", prefetch" } else { "" };
        let label = match config.capacity {
            Capacity::Disabled => format!("no cache{ahead}, {clients} client(s)"),
            _ => format!(
                "{} bound {}{ahead}, {clients} client(s)",
                config.policy, config.pull_bound
            ),
        };
        let label = &label;
        let dim = w.dim as usize;
        let outcomes: Vec<Result<(CacheStats, f64, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    s.spawn(move || -> Result<(CacheStats, f64, u64)> {
                        let table = Cluster::connect_tcp(self.cluster.addrs(), &w.client_config())?
                            .open_table(&self.spec.name)?;
                        let mut cache = table.cached(config);
                        // The key stream is drawn before timing: sampling Zipf costs more than a
                        // cache lookup and is not what is measured.
                        let seed = w.seed.wrapping_add(c as u64 * 7919);
                        let mut gen =
                            ZipfKeys::with_permutation(w.zipf, self.permutation.clone(), seed)?;
                        let mut stream = vec![0u64; (w.warmup + w.measured) * w.batch];
                        gen.fill(&mut stream);
                        let mut rows = vec![0f32; w.batch * dim];
                        let mut unique = Unique::default();
                        let mut before = CacheStats::default();
                        let mut start = Instant::now();
                        let bar = if c == 0 {
                            crate::progress::bar(stream.len() as u64 / w.batch as u64, label)
                        } else {
                            indicatif::ProgressBar::hidden()
                        };
                        let batches: Vec<&[u64]> = stream.chunks_exact(w.batch).collect();
                        for (b, &keys) in batches.iter().enumerate() {
                            bar.inc(1);
                            if b == w.warmup {
                                before = cache.stats();
                                start = Instant::now();
                            }
                            cache.lookup(keys, &mut rows)?;
                            if let Some(next) = batches.get(b + 1).filter(|_| prefetch) {
                                cache.prefetch(next)?;
                            }
                            // The backward pass: one gradient row per unique key, summed over its
                            // occurrences (a weight-decay gradient: cheap and bounded).
                            unique.gradients(keys, &rows, dim, |w| 0.01 * w);
                            cache.update(&unique.keys, &unique.grads)?;
                        }
                        let elapsed = start.elapsed().as_secs_f64();
                        bar.finish_and_clear();
                        // The final flush is a one-off (amortised over a whole training run), so it
                        // is reported apart from the per-batch figures.
                        let measured = cache.stats().since(&before);
                        let before_flush = cache.stats();
                        cache.flush()?;
                        let flush = cache.stats().since(&before_flush);
                        Ok((measured, elapsed, flush.rows_pushed))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut total = CacheStats::default();
        let mut secs: f64 = 0.0;
        let mut flush_rows = 0;
        for o in outcomes {
            let (s, e, f) = o?;
            total = total.plus(&s);
            secs = secs.max(e);
            flush_rows += f;
        }
        let batches = (w.measured * clients) as f64;
        let disabled = matches!(config.capacity, Capacity::Disabled);
        Ok(RunResult {
            policy: if disabled {
                "no-cache".into()
            } else {
                config.policy.to_string()
            },
            cache_fraction: match config.capacity {
                Capacity::Fraction(f) => f,
                _ => 0.0,
            },
            pull_bound: config.pull_bound.to_string(),
            push_bound: config.push_bound.to_string(),
            clients,
            hit_rate: total.hit_rate(),
            unique_per_batch: total.unique_keys as f64 / batches,
            rows_pulled_per_batch: total.rows_pulled as f64 / batches,
            rows_pushed_per_batch: total.rows_pushed as f64 / batches,
            bytes_received_per_batch: total.bytes_received as f64 / batches,
            bytes_sent_per_batch: total.bytes_sent as f64 / batches,
            bytes_per_batch: (total.bytes_received + total.bytes_sent) as f64 / batches,
            batches_per_s: batches / secs,
            stale_refreshes_per_batch: total.stale_refreshes as f64 / batches,
            prefetch,
            flush_rows,
            stats: total,
        })
    }
}

/// The unique keys of a batch and their summed gradients, as a trainer's backward pass hands them
/// to the optimizer.
#[derive(Default)]
pub(crate) struct Unique {
    index: rustc_hash::FxHashMap<u64, u32>,
    /// The unique keys, in first-seen order.
    pub keys: Vec<u64>,
    /// Their summed gradients, keys x dim.
    pub grads: Vec<f32>,
    /// For each position of the batch, the index of its key in `keys`.
    pub position: Vec<u32>,
}

impl Unique {
    /// Collects the unique keys of `keys` and where each position's key is.
    pub fn collect(&mut self, keys: &[u64]) {
        self.index.clear();
        self.keys.clear();
        self.position.clear();
        for &k in keys {
            let next = self.keys.len() as u32;
            let u = *self.index.entry(k).or_insert(next);
            if u == next {
                self.keys.push(k);
            }
            self.position.push(u);
        }
    }

    /// Collects the unique keys of `keys` and, into `grads`, sums `grad(x)` over each key's
    /// occurrences, `rows` holding one row of `dim` values per position.
    pub fn gradients(&mut self, keys: &[u64], rows: &[f32], dim: usize, grad: impl Fn(f32) -> f32) {
        self.collect(keys);
        self.grads.clear();
        self.grads.resize(self.keys.len() * dim, 0.0);
        for (pos, &u) in self.position.iter().enumerate() {
            let u = u as usize;
            for (g, x) in self.grads[u * dim..(u + 1) * dim]
                .iter_mut()
                .zip(&rows[pos * dim..(pos + 1) * dim])
            {
                *g += grad(*x);
            }
        }
    }
}

/// `cache-sweep` settings.
#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// The workload.
    #[command(flatten)]
    pub workload: Workload,
    /// Cache sizes, as fractions of the table.
    #[arg(long, value_delimiter = ',', default_value = "0.03,0.05,0.10,0.15")]
    pub sizes: Vec<f64>,
    /// Policies.
    #[arg(long, value_delimiter = ',', default_value = "lru,lfu,light-lfu")]
    pub policies: Vec<PolicyKind>,
    /// Read and write bound of every run.
    #[arg(long, default_value = "100")]
    pub bound: Bound,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One size of the sweep: the static top-k reference and each policy.
#[derive(Debug, Serialize)]
pub struct SweepSize {
    /// Cache size as a fraction of the table.
    pub cache_fraction: f64,
    /// Hit rate of a cache holding exactly the most probable ids (knows the distribution).
    pub static_top_hit_rate: f64,
    /// Hit rate of an LFU with exact, never-aged counts of the stream (the online ceiling).
    pub online_lfu_ceiling: f64,
    /// One run per policy.
    pub runs: Vec<RunResult>,
}

/// The `cache-sweep` report.
#[derive(Debug, Serialize)]
pub struct SweepReport {
    /// The workload.
    pub workload: Workload,
    /// Results by size.
    pub sizes: Vec<SweepSize>,
}

/// Runs the sweep.
pub fn sweep(args: &SweepArgs) -> Result<SweepReport> {
    let bench = Bench::start(&args.workload)?;
    let mut sizes = Vec::new();
    for &f in &args.sizes {
        let rows = (args.workload.rows as f64 * f).round() as u64;
        let oracle = bench.static_top_hit_rate(rows)?;
        let ceiling = bench.online_lfu_ceiling(rows)?;
        let mut runs = Vec::new();
        for &policy in &args.policies {
            let r = bench.run(
                CacheConfig::new(Capacity::Fraction(f), policy, args.bound),
                1,
            )?;
            let t = &r.stats.time;
            let us = |ns: u64| ns as f64 / 1e3 / (args.workload.measured as f64);
            eprintln!(
                "    us/batch: plan {:.0}, request {:.0}, place {:.0}, push {:.0}, update {:.0}",
                us(t.plan_ns),
                us(t.request_ns),
                us(t.place_ns),
                us(t.push_ns),
                us(t.update_ns)
            );
            eprintln!(
                "cache {:>4.0}% {:<12} hit {:>5.1}% (online ceiling {:>5.1}%, static top-k {:>5.1}%)  pulled {:>6.0} rows/batch  received {:>7.1} KB/batch  {:>6.1} batches/s",
                f * 100.0,
                r.policy,
                r.hit_rate * 100.0,
                ceiling * 100.0,
                oracle * 100.0,
                r.rows_pulled_per_batch,
                r.bytes_received_per_batch / 1e3,
                r.batches_per_s
            );
            runs.push(r);
        }
        sizes.push(SweepSize {
            cache_fraction: f,
            static_top_hit_rate: oracle,
            online_lfu_ceiling: ceiling,
            runs,
        });
    }
    Ok(SweepReport {
        workload: args.workload.clone(),
        sizes,
    })
}

/// `comm` settings.
#[derive(clap::Args, Debug, Clone)]
pub struct CommArgs {
    /// The workload.
    #[command(flatten)]
    pub workload: Workload,
    /// Cache size, as a fraction of the table.
    #[arg(long, default_value_t = 0.10)]
    pub cache: f64,
    /// Policy.
    #[arg(long, default_value = "lfu")]
    pub policy: PolicyKind,
    /// Bounds (read and write alike).
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    pub bounds: Vec<Bound>,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub clients: Vec<usize>,
    /// Rounds of (baseline, then each bound), run one after the other so that machine noise hits
    /// all alike; reported figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also run every configuration, the baseline included, with each batch's lookup prefetched
    /// during the previous batch's gradients and update (`CachedTable::prefetch`, as the trainer's
    /// `--prefetch`); ratios stay against the baseline without prefetch.
    #[arg(long)]
    pub prefetch: bool,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One configuration of `comm`, with its ratios to the no-cache baseline of the same round.
#[derive(Debug, Serialize)]
pub struct CommEntry {
    /// The round with the median speedup.
    #[serde(flatten)]
    pub run: RunResult,
    /// 1 - bytes per batch / baseline bytes per batch (same round).
    pub bytes_reduction: f64,
    /// Median over rounds of batches/s over the same round's baseline batches/s.
    pub speedup: f64,
    /// Batches/s of every round.
    pub batches_per_s_rounds: Vec<f64>,
    /// Speedup of every round.
    pub speedup_rounds: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `comm` report.
#[derive(Debug, Serialize)]
pub struct CommReport {
    /// The workload.
    pub workload: Workload,
    /// Entries, baseline first for each client count.
    pub entries: Vec<CommEntry>,
}

/// Runs `comm`.
pub fn comm(args: &CommArgs) -> Result<CommReport> {
    let bench = Bench::start(&args.workload)?;
    let mut entries = Vec::new();
    let plain: Vec<CacheConfig> = std::iter::once(CacheConfig::disabled())
        .chain(
            args.bounds
                .iter()
                .map(|&b| CacheConfig::new(Capacity::Fraction(args.cache), args.policy, b)),
        )
        .collect();
    // (configuration, prefetch); the first is the baseline every ratio is taken against.
    let mut configs: Vec<(CacheConfig, bool)> = plain.iter().map(|&c| (c, false)).collect();
    if args.prefetch {
        configs.extend(plain.iter().map(|&c| (c, true)));
    }
    for &clients in &args.clients {
        // rounds[r][c]: round r, configuration c (0 = baseline).
        let mut rounds: Vec<Vec<RunResult>> = Vec::new();
        for round in 0..args.repeats.max(1) {
            eprintln!(
                "{clients} client(s), round {} of {}",
                round + 1,
                args.repeats.max(1)
            );
            rounds.push(
                configs
                    .iter()
                    .map(|&(c, prefetch)| bench.run_with(c, clients, prefetch))
                    .collect::<Result<_>>()?,
            );
        }
        for c in 0..configs.len() {
            let mut speedups: Vec<f64> = rounds
                .iter()
                .map(|r| r[c].batches_per_s / r[0].batches_per_s)
                .collect();
            let speedup_rounds = speedups.clone();
            let speedup = median(&mut speedups);
            let pick = speedup_rounds
                .iter()
                .position(|&s| s == speedup)
                .unwrap_or(0);
            let run = rounds[pick][c].clone();
            let e = CommEntry {
                bytes_reduction: 1.0 - run.bytes_per_batch / rounds[pick][0].bytes_per_batch,
                speedup,
                batches_per_s_rounds: rounds.iter().map(|r| r[c].batches_per_s).collect(),
                speedup_rounds,
                run,
            };
            eprintln!(
                "{} client(s) {:<10} bound {:>4}{}: {:>7.1} batches/s (median {:>4.2}x of no cache)  {:>7.1} KB/batch ({:>5.1}% {})  hit {:>5.1}%  stale {:>6.1}/batch",
                clients,
                e.run.policy,
                e.run.pull_bound,
                if e.run.prefetch { " prefetch" } else { "" },
                e.run.batches_per_s,
                e.speedup,
                e.run.bytes_per_batch / 1e3,
                e.bytes_reduction.abs() * 100.0,
                if e.bytes_reduction < 0.0 { "more" } else { "less" },
                e.run.hit_rate * 100.0,
                e.run.stale_refreshes_per_batch
            );
            entries.push(e);
        }
    }
    Ok(CommReport {
        workload: args.workload.clone(),
        entries,
    })
}
