//! Training CTR models through hetkv on the Criteo-like data, their embeddings served by worker
//! caches under the staleness bounds.
//!
//! Models (`ModelKind`), with d_i = ln(1 + x_i) of the dense features and, per categorical key, one
//! embedding row `[w, v_1..v_K]` of `--dim` = K + 1 values in the table `ctr_emb`:
//! - LR: logit = b + sum_i a_i d_i + sum_f w_f;
//! - FM: LR + sum_{f<g} <v_f, v_g>;
//! - DeepFM: FM + an MLP (26 K inputs -> the `--hidden` ReLU layers -> 1) over the concatenated
//!   v_f;
//! - Wide&Deep: LR + the MLP;
//! - DCN: LR + the MLP + two cross layers over the concatenated v_f with a linear readout.
//!
//! The dense parameters (dense weights, bias, MLP, cross network; laid out by [`Net`]) are one
//! flat vector, stored end to end in the rows of `ctr_dense`. Each worker reads and writes them
//! through a cache of its own that holds them all, under `--dense-bound` (0: read and written
//! whole every batch, consistent across workers); the embedding cache's settings do not touch
//! them, so a run with no embedding cache uses the same dense scheme.
//! Loss: binary cross-entropy; a batch pushes the mean gradient, applied by the server's SGD.
//!
//! Workers are threads, or processes (`--processes`; each generates the same data from the seed,
//! connects, and starts when the coordinator says so), each with its own cluster connection and
//! cache. The coordinator starts two in-process shards or joins a running cluster (`--servers`).
//! Evaluation reads the trained rows straight from the shards and scores a held-out split beside
//! the planted model; with `--eval-every` it also does so during training, for the time to a
//! target AUC.

//!
//! Files: `model.rs` (the models' maths and gradients), `args.rs` (settings), `coordinator.rs`
//! (threads or processes, started and joined), `worker.rs` (one worker's loop), `eval.rs`
//! (scoring); this file runs the whole and reports.

mod args;
mod coordinator;
mod eval;
mod gate;
mod model;
mod worker;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetkv_client::{
    Bound, CacheConfig, CacheStats, Capacity, Cluster, OnRollback, PolicyKind, Table,
    TransportKind, UpdateRuleKind,
};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, Restarts, TableSpec};
use serde::{Deserialize, Serialize};

use crate::cache_bench::Unique;
use crate::criteo::{CriteoSynth, Sample, CATEGORICAL, DENSE};
use crate::metrics::{auc, logloss};

pub use args::{TrainArgs, TrainOptimizer};
pub use gate::CheckpointRecord;
pub use model::*;
pub use worker::{worker_process, WorkerArgs};

use coordinator::*;
use eval::*;
use gate::*;
use worker::*;

/// One evaluation during training.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalPoint {
    /// Seconds since the workers started.
    pub secs: f64,
    /// Test AUC on the evaluation subset.
    pub auc: f64,
    /// Test logloss on the evaluation subset.
    pub logloss: f64,
}

/// What a training run reached.
#[derive(Debug, Serialize)]
pub struct TrainReport {
    /// Settings.
    pub settings: TrainArgs,
    /// Test AUC of the trained model.
    pub auc: f64,
    /// Test logloss of the trained model.
    pub logloss: f64,
    /// The planted model's test AUC (the ceiling).
    pub oracle_auc: f64,
    /// The planted model's test logloss.
    pub oracle_logloss: f64,
    /// Wall-clock seconds from the workers' start to the last one's end (data generation and
    /// connection set-up excluded).
    pub train_secs: f64,
    /// Training samples per second, all workers together.
    pub samples_per_s: f64,
    /// Bytes on the wire per training sample for the embedding table (what HET reports).
    pub embedding_bytes_per_sample: f64,
    /// Bytes on the wire per training sample for the dense weights, MLP and cross network (read and
    /// written whole every batch, bounds 0).
    pub dense_bytes_per_sample: f64,
    /// The embedding caches' counters, all workers summed.
    pub cache: CacheStats,
    /// Shard restarts the workers' connections saw (each worker counts each restart once per
    /// connection), and the acknowledged pushes the restarted shards no longer held: what went
    /// back to the last checkpoint.
    pub restarts: Restarts,
    /// Checkpoints that failed during the run (training went on): each name and error.
    pub failed_checkpoints: Vec<(String, String)>,
    /// Evaluations during training (with `--eval-every`).
    pub timeline: Vec<EvalPoint>,
    /// Seconds until an evaluation first reached `--target-auc` (absent when none did).
    pub time_to_target: Option<f64>,
    /// Checkpoints taken during the run (`--checkpoint-every`).
    pub checkpoints: Vec<CheckpointRecord>,
    /// Batches each worker trained in this run (after the ones `--resume-batches` skipped).
    pub batches_trained: Vec<usize>,
}

/// What one worker hands back: its cache's counters and its dense-layer bytes. A worker process
/// prints it as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WorkerResult {
    cache: CacheStats,
    /// Shard restarts this worker's connections saw, and the pushes they rolled back.
    restarts: Restarts,
    dense_bytes: u64,
    /// Batches and samples trained in this run.
    batches: usize,
    samples: usize,
}

/// The model's tables: `ctr_emb` (one row per key; with `raw` a dynamic table of that capacity
/// instead, see [`raw_capacity`]) and `ctr_dense` (the dense parameters end to end, in rows of
/// [`Net::dense_width`]; zeros until the coordinator assigns [`Net::init`]).
pub(super) fn tables(
    net: &Net,
    rows: u64,
    (emb, dense): (OptimizerSpec, OptimizerSpec),
    raw: Option<u64>,
) -> [TableSpec; 2] {
    let spec = |name: &str, rows: u64, dim: usize, init, optimizer| TableSpec {
        name: name.into(),
        rows,
        dim: dim as u32,
        init,
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let mut embeddings = spec(
        "ctr_emb",
        rows,
        net.dim(),
        Initializer::Normal {
            std: 0.01,
            seed: 17,
        },
        emb,
    );
    if let Some(capacity) = raw {
        embeddings.rows = capacity;
        embeddings.dynamic = Some(hetkv_transport::DynamicSpec {
            admission: hetkv_transport::Admission::Always,
            eviction: hetkv_transport::Eviction::Lfu,
        });
    }
    [
        embeddings,
        spec(
            "ctr_dense",
            net.dense_rows() as u64,
            net.dense_width(),
            Initializer::Zeros,
            dense,
        ),
    ]
}

/// The samples of a run: the same for every process given the same settings.
pub(super) struct Data {
    synth: CriteoSynth,
    train: Vec<Sample>,
    test: Vec<Sample>,
    train_keys: Vec<[u64; CATEGORICAL]>,
    /// Keys are raw ids (`--raw-ids`).
    raw: bool,
}

impl Data {
    fn generate(args: &TrainArgs) -> Result<Self> {
        let mut synth = CriteoSynth::new(args.scale, args.seed)?;
        let train: Vec<Sample> = (0..args.train).map(|_| synth.sample()).collect();
        let test: Vec<Sample> = (0..args.test).map(|_| synth.sample()).collect();
        let mut data = Self {
            synth,
            train,
            test,
            train_keys: Vec::new(),
            raw: args.raw_ids,
        };
        data.train_keys = data.train.iter().map(|s| data.keys(s)).collect();
        Ok(data)
    }

    fn keys(&self, s: &Sample) -> [u64; CATEGORICAL] {
        std::array::from_fn(|f| {
            let key = self.synth.key(f, Some(s.ids[f]));
            match self.raw {
                true => self.synth.raw_id(key),
                false => key,
            }
        })
    }
}

/// The capacity of the dynamic embedding table of a `--raw-ids` run: `--raw-capacity`, or the
/// rows that the fixed table of every id (`fixed`) holds in its memory as dynamic rows.
pub(super) fn raw_capacity(args: &TrainArgs, fixed: &TableSpec) -> u64 {
    args.raw_capacity.unwrap_or_else(|| {
        let dynamic = TableSpec {
            dynamic: Some(hetkv_transport::DynamicSpec {
                admission: hetkv_transport::Admission::Always,
                eviction: hetkv_transport::Eviction::Lfu,
            }),
            ..fixed.clone()
        };
        let bytes = hetkv_store::Table::footprint(fixed, 0, 1) as f64;
        (bytes / hetkv_store::dynamic::bytes_per_row(&dynamic)) as u64
    })
}

/// Trains and evaluates: starts (or joins) the cluster, creates the tables, runs the workers as
/// threads or processes while evaluating at intervals, then scores the held-out split.
pub fn run(args: &TrainArgs) -> Result<TrainReport> {
    anyhow::ensure!(
        args.workers > 0 && args.batch > 0 && args.epochs > 0 && args.threads > 0,
        "workers, threads, batch and epochs must be positive"
    );
    anyhow::ensure!(args.test > 0, "the held-out split must not be empty");
    let data = Data::generate(args)?;
    let embedded = match (args.servers.is_empty(), args.transport) {
        (false, _) => None,
        (true, TransportKind::Tcp) => Some(EmbeddedCluster::start(2)?),
        (true, _) => {
            let shm = std::env::temp_dir();
            Some(EmbeddedCluster::start_with(2, Default::default(), |i| {
                hetkv_store::ShardConfig {
                    shm_dir: Some(shm.clone()),
                    ..hetkv_store::ShardConfig::new(i, 2)
                }
            })?)
        }
    };
    let mut settings = args.clone();
    if let Some(cluster) = &embedded {
        settings.servers = cluster.addrs().to_vec();
    }
    let coordinator_servers = if args.eval_servers.is_empty() {
        &settings.servers
    } else {
        anyhow::ensure!(
            args.eval_servers.len() == settings.servers.len(),
            "--eval-servers names {} daemons, --servers {}",
            args.eval_servers.len(),
            settings.servers.len()
        );
        &args.eval_servers
    };
    let admin = Cluster::connect_tcp(coordinator_servers, &ClientConfig::default())
        .with_context(|| format!("connecting to {}", coordinator_servers.join(",")))?;
    // The coordinator's evaluations go on through a restart too (the workers report it).
    admin.set_on_rollback(OnRollback::Continue);
    let net = args.net()?;
    let rows = data.synth.table_rows();
    let [fixed, _] = tables(&net, rows, args.optimizers(), None);
    let raw = args.raw_ids.then(|| raw_capacity(args, &fixed));
    if let Some(capacity) = raw {
        // The report names the capacity the run had.
        settings.raw_capacity = Some(capacity);
        tracing::info!(
            capacity,
            ids = rows,
            "raw ids: a dynamic embedding table (the fixed one would hold every id)"
        );
    }
    let specs = tables(&net, rows, args.optimizers(), raw);
    let handles: Vec<Table> = specs
        .iter()
        .map(|s| admin.create_table(s))
        .collect::<Result<_, _>>()
        .context("creating the model's tables")?;
    let [emb, dense] = [&handles[0], &handles[1]];
    if args.resume_batches.is_empty() {
        // A fresh run starts from the model's initial dense parameters; a resumed one from the
        // checkpoint the daemons restarted from.
        let keys: Vec<u64> = (0..net.dense_rows() as u64).collect();
        dense
            .assign(&keys, &net.init(args.seed))
            .context("setting the initial dense parameters")?;
    }
    let eval_n = args.eval_samples.clamp(1, data.test.len());
    let mut timeline = Vec::new();
    let mut probe = |start: Instant, say: &dyn Fn(String)| -> Result<()> {
        let (auc, logloss) = evaluate(&net, [emb, dense], &data.test[..eval_n], &|s| data.keys(s))?;
        let secs = start.elapsed().as_secs_f64();
        say(format!(
            "{secs:7.2} s: test AUC {auc:.4}, logloss {logloss:.4}"
        ));
        timeline.push(EvalPoint { secs, auc, logloss });
        Ok(())
    };
    let mut checkpoints = Checkpoints::new(&settings, &admin);
    let (results, train_secs) = if settings.processes || settings.spawn_prefix.is_some() {
        run_processes(&settings, &mut probe, &mut checkpoints)?
    } else {
        run_threads(&settings, &data, &mut probe, &mut checkpoints)?
    };
    let mut total = CacheStats::default();
    let mut restarts = Restarts::default();
    let mut dense_bytes = 0;
    let mut samples = 0;
    let batches_trained = results.iter().map(|r| r.batches).collect();
    for r in results {
        total = total.plus(&r.cache);
        restarts = restarts.plus(&r.restarts);
        dense_bytes += r.dense_bytes;
        samples += r.samples;
    }
    let (auc_model, logloss_model) = evaluate(&net, [emb, dense], &data.test, &|s| data.keys(s))?;
    let labels: Vec<bool> = data.test.iter().map(|s| s.label).collect();
    let oracle: Vec<f64> = data.test.iter().map(|s| s.p).collect();
    let samples = samples.max(1) as f64;
    let failed_checkpoints = std::mem::take(&mut checkpoints.failed);
    let checkpoints = std::mem::take(&mut checkpoints.records);
    let time_to_target = args
        .target_auc
        .and_then(|t| timeline.iter().find(|p| p.auc >= t).map(|p| p.secs));
    Ok(TrainReport {
        settings,
        auc: auc_model,
        logloss: logloss_model,
        oracle_auc: auc(&oracle, &labels).unwrap_or(f64::NAN),
        oracle_logloss: logloss(&oracle, &labels),
        train_secs,
        samples_per_s: samples / train_secs,
        embedding_bytes_per_sample: (total.bytes_sent + total.bytes_received) as f64 / samples,
        dense_bytes_per_sample: dense_bytes as f64 / samples,
        cache: total,
        restarts,
        failed_checkpoints,
        timeline,
        time_to_target,
        checkpoints,
        batches_trained,
    })
}

/// The checkpoint schedule of a run and what it took.
pub(super) struct Checkpoints<'a> {
    every: Option<Duration>,
    next: Option<Instant>,
    settings: &'a TrainArgs,
    cluster: &'a Cluster,
    start: Option<Instant>,
    records: Vec<CheckpointRecord>,
    /// Checkpoints asked for so far (each attempt gets a name of its own).
    attempts: usize,
    failed: Vec<(String, String)>,
}

impl<'a> Checkpoints<'a> {
    fn new(settings: &'a TrainArgs, cluster: &'a Cluster) -> Self {
        Self {
            every: settings.checkpoint_every.map(Duration::from_secs_f64),
            next: None,
            settings,
            cluster,
            start: None,
            records: Vec::new(),
            attempts: 0,
            failed: Vec::new(),
        }
    }

    /// The workers started now.
    pub(super) fn started(&mut self, at: Instant) {
        self.start = Some(at);
        self.next = self.every.map(|e| at + e);
    }

    /// Whether a checkpoint is due.
    pub(super) fn due(&self) -> bool {
        self.next.is_some_and(|n| Instant::now() >= n) && !self.ended()
    }

    /// Whether the run ends after the checkpoint being taken.
    pub(super) fn ends_after_this(&self) -> bool {
        self.settings
            .stop_after_checkpoints
            .is_some_and(|k| self.records.len() + 1 >= k)
    }

    fn ended(&self) -> bool {
        self.settings
            .stop_after_checkpoints
            .is_some_and(|k| self.records.len() >= k)
    }

    /// Writes the next checkpoint on every shard (the workers are quiet), paused since `since`.
    /// A checkpoint that fails (a shard down, a full disk) is reported and training goes on; the
    /// next one is full, and has a name of its own.
    pub(super) fn take(&mut self, batches_done: &[usize], since: Instant) -> Result<()> {
        self.attempts += 1;
        let name = format!("{}-{}", self.settings.checkpoint_prefix, self.attempts);
        let after_failure = self.failed.last().is_some_and(|(n, _)| {
            *n == format!("{}-{}", self.settings.checkpoint_prefix, self.attempts - 1)
        });
        let incremental =
            self.settings.incremental_checkpoints && !self.records.is_empty() && !after_failure;
        let done = match self.cluster.checkpoint(&name, incremental) {
            Ok(done) => done,
            Err(e) => {
                eprintln!("checkpoint {name} failed; training goes on: {e}");
                self.failed.push((name, e.to_string()));
                self.next = self.every.map(|e| Instant::now() + e);
                return Ok(());
            }
        };
        let start = self.start.unwrap_or(since);
        // Counted from the start of the data, so that `--resume-batches` takes them as they are.
        let batches_done: Vec<usize> = batches_done
            .iter()
            .enumerate()
            .map(|(w, &n)| n + self.settings.resume_of(w))
            .collect();
        self.records.push(CheckpointRecord {
            name: name.clone(),
            secs: start.elapsed().as_secs_f64(),
            batches_done: batches_done.clone(),
            pause_ms: since.elapsed().as_secs_f64() * 1e3,
            bytes: done.iter().map(|d| d.bytes).sum(),
        });
        eprintln!(
            "checkpoint {name} committed on {} shards after batches {batches_done:?}",
            done.len()
        );
        self.next = self.every.map(|e| Instant::now() + e);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_learn_the_planted_model() {
        for model in [
            ModelKind::Lr,
            ModelKind::Fm,
            ModelKind::Deepfm,
            ModelKind::Wdl,
            ModelKind::Dcn,
        ] {
            short_run(model);
        }
    }

    fn short_run(model: ModelKind) {
        let args = TrainArgs {
            workers: 2,
            pull_bound: Bound::updates(10),
            push_bound: Bound::updates(10),
            train: 30_000,
            test: 10_000,
            scale: 0.001,
            seed: 3,
            ..TrainArgs::defaults(model)
        };
        let r = run(&args).unwrap();
        println!(
            "{model:?}: AUC {:.4} (planted {:.4}), logloss {:.4}",
            r.auc, r.oracle_auc, r.logloss
        );
        assert!(
            r.auc > 0.65,
            "{model:?}: AUC {} after one short epoch",
            r.auc
        );
        assert!(r.cache.hits > 0 && r.cache.rows_pushed > 0);
    }
}
