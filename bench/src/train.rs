//! Training CTR models through hetkv on the Criteo-like data, their embeddings served by worker
//! caches under the staleness bounds.
//!
//! Models (`ModelKind`), with d_i = ln(1 + x_i) of the dense features and, per categorical key, one
//! embedding row `[w, v_1..v_K]` in the table `ctr_emb`:
//! - LR: logit = b + sum_i a_i d_i + sum_f w_f;
//! - FM: LR + sum_{f<g} <v_f, v_g>;
//! - DeepFM: FM + an MLP (`MLP_IN` -> `HIDDEN` ReLU -> 1) over the concatenated v_f;
//! - Wide&Deep: LR + the MLP;
//! - DCN: LR + the MLP + two cross layers over the concatenated v_f with a linear readout.
//!
//! The dense weights and the bias are the 14 rows of dim 1 of `ctr_dense`, the MLP the rows of
//! `ctr_mlp` and the cross network those of `ctr_cross`; every worker reads and writes them with
//! no cache and bounds 0, so they are consistent across workers.
//! Loss: binary cross-entropy; a batch pushes the mean gradient, applied by the server's SGD.
//!
//! Workers are threads, or processes (`--processes`; each generates the same data from the seed,
//! connects, and starts when the coordinator says so), each with its own cluster connection and
//! cache. The coordinator starts two in-process shards or joins a running cluster (`--servers`).
//! Evaluation reads the trained rows straight from the shards and scores a held-out split beside
//! the planted model; with `--eval-every` it also does so during training, for the time to a
//! target AUC.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetkv_client::{
    Bound, CacheConfig, CacheStats, Capacity, Cluster, PolicyKind, Table, TransportKind,
};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use serde::{Deserialize, Serialize};

use crate::cache_bench::Unique;
use crate::criteo::{CriteoSynth, Sample, CATEGORICAL, DENSE};
use crate::metrics::{auc, logloss};

/// Factor dimension K of the FM.
pub const FACTORS: usize = 8;
/// Embedding row: the linear weight then the K factors.
pub const ROW: usize = 1 + FACTORS;

/// The FM's forward pass and gradients for one sample, given its rows.
pub struct Fm;

impl Fm {
    /// Dense inputs of a sample.
    pub fn dense(s: &Sample) -> [f32; DENSE] {
        std::array::from_fn(|i| (1.0 + s.dense[i] as f32).ln())
    }

    /// The logit; `rows` is the sample's 26 embedding rows (26 x ROW), `dense_w` the 13 dense
    /// weights then the bias.
    pub fn logit(rows: &[f32], dense: &[f32; DENSE], dense_w: &[f32]) -> f32 {
        let mut z = dense_w[DENSE];
        for (a, d) in dense_w[..DENSE].iter().zip(dense) {
            z += a * d;
        }
        let mut sum = [0f32; FACTORS];
        let mut squares = 0f32;
        for r in rows.chunks_exact(ROW) {
            z += r[0];
            for (s, v) in sum.iter_mut().zip(&r[1..]) {
                *s += v;
                squares += v * v;
            }
        }
        z + (sum.iter().map(|s| s * s).sum::<f32>() - squares) / 2.0
    }

    /// Adds d(loss)/d(parameters) scaled by `scale` to `g_rows` (26 x ROW) and `g_dense`
    /// (14), for error `e = p - y` (the gradient of cross-entropy with respect to the logit).
    pub fn gradient(
        rows: &[f32],
        dense: &[f32; DENSE],
        e: f32,
        scale: f32,
        g_rows: &mut [f32],
        g_dense: &mut [f32],
    ) {
        let mut sum = [0f32; FACTORS];
        for r in rows.chunks_exact(ROW) {
            for (s, v) in sum.iter_mut().zip(&r[1..]) {
                *s += v;
            }
        }
        let k = e * scale;
        for (r, g) in rows.chunks_exact(ROW).zip(g_rows.chunks_exact_mut(ROW)) {
            g[0] += k;
            for j in 0..FACTORS {
                g[1 + j] += k * (sum[j] - r[1 + j]);
            }
        }
        for (g, d) in g_dense[..DENSE].iter_mut().zip(dense) {
            *g += k * d;
        }
        g_dense[DENSE] += k;
    }
}

/// Hidden units of DeepFM's MLP.
pub const HIDDEN: usize = 32;
/// Inputs of the MLP: the factor vectors of the 26 fields, concatenated.
pub const MLP_IN: usize = CATEGORICAL * FACTORS;
/// Rows (of `HIDDEN` values) of the MLP's table: `W1` (one row per input), `b1`, `W2`, and a row
/// whose first value is `b2`.
pub const MLP_ROWS: usize = MLP_IN + 3;

/// The models `hetkv-bench train` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Logistic regression: bias, dense weights, one weight per key.
    Lr,
    /// Factorization machine: LR plus pairwise factor interactions.
    Fm,
    /// DeepFM: the FM plus an MLP over the concatenated factors.
    Deepfm,
    /// Wide&Deep: LR (wide) plus the MLP over the concatenated factors (deep).
    Wdl,
    /// Deep&Cross: LR, plus two cross layers over the concatenated factors with a linear
    /// readout, plus the MLP.
    Dcn,
}

/// Cross layers of DCN.
pub const CROSS_LAYERS: usize = 2;
/// Rows (of `MLP_IN` values) of the cross table: `w_l` and `b_l` per layer, then the readout.
pub const CROSS_ROWS: usize = 2 * CROSS_LAYERS + 1;

/// DCN's cross network: `x_{l+1} = x0 (x_l . w_l) + b_l + x_l`, output `p . x_L`.
pub struct Cross;

impl Cross {
    fn layer(c: &[f32], l: usize) -> (&[f32], &[f32]) {
        (
            &c[2 * l * MLP_IN..(2 * l + 1) * MLP_IN],
            &c[(2 * l + 1) * MLP_IN..(2 * l + 2) * MLP_IN],
        )
    }

    /// The layers' inputs x_0..x_L and the scalars s_l = x_l . w_l.
    fn forward(c: &[f32], x0: &[f32; MLP_IN]) -> (Vec<[f32; MLP_IN]>, [f32; CROSS_LAYERS]) {
        let mut xs = vec![*x0];
        let mut s = [0f32; CROSS_LAYERS];
        for (l, sl) in s.iter_mut().enumerate() {
            let (w, b) = Self::layer(c, l);
            let x = xs[l];
            *sl = x.iter().zip(w).map(|(a, b)| a * b).sum();
            xs.push(std::array::from_fn(|i| x0[i] * *sl + b[i] + x[i]));
        }
        (xs, s)
    }

    /// The output.
    pub fn output(c: &[f32], x0: &[f32; MLP_IN]) -> f32 {
        let (xs, _) = Self::forward(c, x0);
        let p = &c[2 * CROSS_LAYERS * MLP_IN..];
        xs[CROSS_LAYERS].iter().zip(p).map(|(a, b)| a * b).sum()
    }

    /// Adds `k` times the gradient of the output to `g_c` and `g_x0`.
    pub fn backward(
        c: &[f32],
        x0: &[f32; MLP_IN],
        k: f32,
        g_c: &mut [f32],
        g_x0: &mut [f32; MLP_IN],
    ) {
        let (xs, s) = Self::forward(c, x0);
        let p = &c[2 * CROSS_LAYERS * MLP_IN..];
        let mut dx: [f32; MLP_IN] = std::array::from_fn(|i| k * p[i]);
        for (i, g) in g_c[2 * CROSS_LAYERS * MLP_IN..].iter_mut().enumerate() {
            *g += k * xs[CROSS_LAYERS][i];
        }
        for l in (0..CROSS_LAYERS).rev() {
            let (w, _) = Self::layer(c, l);
            let x = &xs[l];
            // x_{l+1} = x0 s_l + b_l + x_l, s_l = x_l . w_l
            let ds: f32 = dx.iter().zip(x0).map(|(a, b)| a * b).sum();
            for i in 0..MLP_IN {
                g_c[2 * l * MLP_IN + i] += ds * x[i];
                g_c[(2 * l + 1) * MLP_IN + i] += dx[i];
                g_x0[i] += dx[i] * s[l];
            }
            dx = std::array::from_fn(|i| dx[i] + ds * w[i]);
        }
        for i in 0..MLP_IN {
            g_x0[i] += dx[i];
        }
    }
}

/// DeepFM's MLP: `y = W2 . relu(W1^T x + b1) + b2`, parameters as `MLP_ROWS x HIDDEN` values.
pub struct Mlp;

impl Mlp {
    /// The factor vectors of a sample's rows, concatenated.
    pub fn input(rows: &[f32]) -> [f32; MLP_IN] {
        std::array::from_fn(|i| rows[(i / FACTORS) * ROW + 1 + i % FACTORS])
    }

    /// The output and the hidden activations.
    pub fn forward(p: &[f32], x: &[f32; MLP_IN]) -> (f32, [f32; HIDDEN]) {
        let mut h: [f32; HIDDEN] = p[MLP_IN * HIDDEN..(MLP_IN + 1) * HIDDEN]
            .try_into()
            .expect("b1");
        for (i, &xi) in x.iter().enumerate() {
            for (hj, w) in h.iter_mut().zip(&p[i * HIDDEN..(i + 1) * HIDDEN]) {
                *hj += xi * w;
            }
        }
        h.iter_mut().for_each(|v| *v = v.max(0.0));
        let w2 = &p[(MLP_IN + 1) * HIDDEN..(MLP_IN + 2) * HIDDEN];
        let b2 = p[(MLP_IN + 2) * HIDDEN];
        (h.iter().zip(w2).map(|(a, b)| a * b).sum::<f32>() + b2, h)
    }

    /// Adds `k` times the gradient of the output to `g_p` (parameters) and `g_x` (inputs).
    pub fn backward(
        p: &[f32],
        x: &[f32; MLP_IN],
        h: &[f32; HIDDEN],
        k: f32,
        g_p: &mut [f32],
        g_x: &mut [f32; MLP_IN],
    ) {
        let w2 = &p[(MLP_IN + 1) * HIDDEN..(MLP_IN + 2) * HIDDEN];
        let mut dh = [0f32; HIDDEN];
        for j in 0..HIDDEN {
            g_p[(MLP_IN + 1) * HIDDEN + j] += k * h[j];
            dh[j] = if h[j] > 0.0 { k * w2[j] } else { 0.0 };
            g_p[MLP_IN * HIDDEN + j] += dh[j];
        }
        g_p[(MLP_IN + 2) * HIDDEN] += k;
        for (i, &xi) in x.iter().enumerate() {
            let w1 = &p[i * HIDDEN..(i + 1) * HIDDEN];
            let g1 = &mut g_p[i * HIDDEN..(i + 1) * HIDDEN];
            let mut gx = 0.0;
            for j in 0..HIDDEN {
                g1[j] += xi * dh[j];
                gx += w1[j] * dh[j];
            }
            g_x[i] += gx;
        }
    }
}

/// A model's logit and gradients over one sample.
pub struct Model;

impl Model {
    /// The LR part: bias, dense weights, one weight per key.
    fn linear(rows: &[f32], dense: &[f32; DENSE], dense_w: &[f32]) -> f32 {
        let mut z = dense_w[DENSE];
        for (a, d) in dense_w[..DENSE].iter().zip(dense) {
            z += a * d;
        }
        z + rows.chunks_exact(ROW).map(|r| r[0]).sum::<f32>()
    }

    /// The logit of `kind` (`mlp` and `cross` may be empty when the model has none); also returns
    /// the MLP's activations.
    pub fn logit(
        kind: ModelKind,
        rows: &[f32],
        dense: &[f32; DENSE],
        dense_w: &[f32],
        mlp: &[f32],
        cross: &[f32],
    ) -> (f32, [f32; HIDDEN]) {
        match kind {
            ModelKind::Lr => (Self::linear(rows, dense, dense_w), [0.0; HIDDEN]),
            ModelKind::Fm => (Fm::logit(rows, dense, dense_w), [0.0; HIDDEN]),
            ModelKind::Deepfm => {
                let (y, h) = Mlp::forward(mlp, &Mlp::input(rows));
                (Fm::logit(rows, dense, dense_w) + y, h)
            }
            ModelKind::Wdl => {
                let (y, h) = Mlp::forward(mlp, &Mlp::input(rows));
                (Self::linear(rows, dense, dense_w) + y, h)
            }
            ModelKind::Dcn => {
                let x0 = Mlp::input(rows);
                let (y, h) = Mlp::forward(mlp, &x0);
                (
                    Self::linear(rows, dense, dense_w) + y + Cross::output(cross, &x0),
                    h,
                )
            }
        }
    }

    /// Adds `e * scale` times the gradient of the logit to the gradient buffers; `params` and
    /// `g_params` are the MLP's and the cross network's.
    #[allow(clippy::too_many_arguments)]
    pub fn gradient(
        kind: ModelKind,
        rows: &[f32],
        dense: &[f32; DENSE],
        params: (&[f32], &[f32]),
        h: &[f32; HIDDEN],
        e: f32,
        scale: f32,
        g_rows: &mut [f32],
        g_dense: &mut [f32],
        g_params: (&mut [f32], &mut [f32]),
    ) {
        let (mlp, cross) = params;
        let (g_mlp, g_cross) = g_params;
        let k = e * scale;
        let linear = |g_rows: &mut [f32], g_dense: &mut [f32]| {
            for g in g_rows.chunks_exact_mut(ROW) {
                g[0] += k;
            }
            for (g, d) in g_dense[..DENSE].iter_mut().zip(dense) {
                *g += k * d;
            }
            g_dense[DENSE] += k;
        };
        match kind {
            ModelKind::Lr => linear(g_rows, g_dense),
            ModelKind::Fm => Fm::gradient(rows, dense, e, scale, g_rows, g_dense),
            ModelKind::Deepfm | ModelKind::Wdl | ModelKind::Dcn => {
                if kind == ModelKind::Deepfm {
                    Fm::gradient(rows, dense, e, scale, g_rows, g_dense);
                } else {
                    linear(g_rows, g_dense);
                }
                let x = Mlp::input(rows);
                let mut g_x = [0f32; MLP_IN];
                Mlp::backward(mlp, &x, h, k, g_mlp, &mut g_x);
                if kind == ModelKind::Dcn {
                    Cross::backward(cross, &x, k, g_cross, &mut g_x);
                }
                for (i, g) in g_x.iter().enumerate() {
                    g_rows[(i / FACTORS) * ROW + 1 + i % FACTORS] += g;
                }
            }
        }
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// `hetkv-bench train` settings.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    /// The model.
    #[arg(long, value_enum, default_value = "fm")]
    pub model: ModelKind,
    /// Data-parallel workers, each with its own client and cache.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Read staleness bound of the embedding caches.
    #[arg(long, default_value = "100")]
    pub pull_bound: Bound,
    /// Write staleness bound of the embedding caches.
    #[arg(long, default_value = "100")]
    pub push_bound: Bound,
    /// Cache size as a fraction of the table (0 = no cache).
    #[arg(long, default_value_t = 0.10)]
    pub cache: f64,
    /// Training samples.
    #[arg(long, default_value_t = 400_000)]
    pub train: usize,
    /// Passes over the training samples.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Held-out samples.
    #[arg(long, default_value_t = 100_000)]
    pub test: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Learning rate of the server's SGD (on mean batch gradients). At 0.2, four workers at
    /// bound 0 diverged (the store refused the NaN gradients); 0.1 is stable at every bound.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// Cardinality scale of the Criteo-like data.
    #[arg(long, default_value_t = 0.01)]
    pub scale: f64,
    /// Seed of the data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Shard addresses of a running cluster, in shard order (comma-separated). Without them the
    /// run starts two in-process shards.
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// How the workers reach the shards: tcp, shm (same host; the in-process shards then expose
    /// shared memory, and embedding reads cross no socket, so the byte counts cover pushes and
    /// control only), rdma, or auto.
    #[arg(long, default_value = "tcp")]
    pub transport: TransportKind,
    /// Run each worker as a separate process (this binary's hidden `train-worker` command)
    /// instead of a thread.
    #[arg(long)]
    pub processes: bool,
    /// Words put before each worker process's command line, `{i}` replaced by the worker's
    /// index: `--spawn-prefix "ip netns exec hetkv-w{i}"` starts worker i in that namespace.
    /// Implies `--processes`.
    #[arg(long)]
    pub spawn_prefix: Option<String>,
    /// Evaluate on the first `--eval-samples` held-out samples every this many seconds while
    /// training, for the AUC-over-time curve and the time to `--target-auc`.
    #[arg(long)]
    pub eval_every: Option<f64>,
    /// Held-out samples scored by each evaluation during training.
    #[arg(long, default_value_t = 20_000)]
    pub eval_samples: usize,
    /// The AUC whose first crossing during training is reported as the time to accuracy.
    #[arg(long)]
    pub target_auc: Option<f64>,
    /// Write the report here as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: Option<std::path::PathBuf>,
}

impl TrainArgs {
    /// The defaults of the command line, for callers that build settings in code.
    pub fn defaults(model: ModelKind) -> Self {
        Self {
            model,
            workers: 4,
            pull_bound: Bound::updates(100),
            push_bound: Bound::updates(100),
            cache: 0.1,
            train: 400_000,
            epochs: 1,
            test: 100_000,
            batch: 256,
            lr: 0.1,
            scale: 0.01,
            seed: 1,
            servers: Vec::new(),
            transport: TransportKind::Tcp,
            processes: false,
            spawn_prefix: None,
            eval_every: None,
            eval_samples: 20_000,
            target_auc: None,
            json: None,
        }
    }

    fn cache_config(&self) -> CacheConfig {
        if self.cache <= 0.0 {
            CacheConfig::disabled()
        } else {
            CacheConfig {
                capacity: Capacity::Fraction(self.cache),
                policy: PolicyKind::Lfu,
                pull_bound: self.pull_bound,
                push_bound: self.push_bound,
            }
        }
    }

    /// The batches of worker `w`: batch `b` of the epoch-long sequence goes to worker
    /// `b % workers`.
    fn batches_of(&self, w: usize) -> Vec<usize> {
        let per_epoch = self.train.div_ceil(self.batch);
        (0..per_epoch * self.epochs)
            .filter(|b| b % self.workers == w)
            .map(|b| b % per_epoch)
            .collect()
    }
}

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
    /// Evaluations during training (with `--eval-every`).
    pub timeline: Vec<EvalPoint>,
    /// Seconds until an evaluation first reached `--target-auc` (absent when none did).
    pub time_to_target: Option<f64>,
}

/// What one worker hands back: its cache's counters and its dense-layer bytes. A worker process
/// prints it as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerResult {
    cache: CacheStats,
    dense_bytes: u64,
}

fn tables(rows: u64, lr: f32) -> [TableSpec; 4] {
    let spec = |name: &str, rows: u64, dim: usize, init| TableSpec {
        name: name.into(),
        rows,
        dim: dim as u32,
        init,
        optimizer: OptimizerSpec::Sgd { lr },
    };
    [
        spec(
            "ctr_emb",
            rows,
            ROW,
            Initializer::Normal {
                std: 0.01,
                seed: 17,
            },
        ),
        spec("ctr_dense", DENSE as u64 + 1, 1, Initializer::Zeros),
        spec(
            "ctr_mlp",
            MLP_ROWS as u64,
            HIDDEN,
            Initializer::Normal {
                std: 0.05,
                seed: 23,
            },
        ),
        spec(
            "ctr_cross",
            CROSS_ROWS as u64,
            MLP_IN,
            Initializer::Normal {
                std: 0.01,
                seed: 29,
            },
        ),
    ]
}

/// The samples of a run: the same for every process given the same settings.
struct Data {
    synth: CriteoSynth,
    train: Vec<Sample>,
    test: Vec<Sample>,
    train_keys: Vec<[u64; CATEGORICAL]>,
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
        };
        data.train_keys = data.train.iter().map(|s| data.keys(s)).collect();
        Ok(data)
    }

    fn keys(&self, s: &Sample) -> [u64; CATEGORICAL] {
        std::array::from_fn(|f| self.synth.key(f, Some(s.ids[f])))
    }
}

/// Trains and evaluates: starts (or joins) the cluster, creates the tables, runs the workers as
/// threads or processes while evaluating at intervals, then scores the held-out split.
pub fn run(args: &TrainArgs) -> Result<TrainReport> {
    anyhow::ensure!(
        args.workers > 0 && args.batch > 0 && args.epochs > 0,
        "workers, batch and epochs must be positive"
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
    let admin = Cluster::connect_tcp(&settings.servers, &ClientConfig::default())
        .with_context(|| format!("connecting to {}", settings.servers.join(",")))?;
    let specs = tables(data.synth.table_rows(), args.lr);
    let handles: Vec<Table> = specs
        .iter()
        .map(|s| admin.create_table(s))
        .collect::<Result<_, _>>()
        .context("creating the model's tables")?;
    let [emb, dense, mlp, cross] = [&handles[0], &handles[1], &handles[2], &handles[3]];
    let eval_n = args.eval_samples.clamp(1, data.test.len());
    let mut timeline = Vec::new();
    let mut probe = |start: Instant, say: &dyn Fn(String)| -> Result<()> {
        let (auc, logloss) = evaluate(
            args.model,
            [emb, dense, mlp, cross],
            &data.test[..eval_n],
            &|s| data.keys(s),
        )?;
        let secs = start.elapsed().as_secs_f64();
        say(format!(
            "{secs:7.2} s: test AUC {auc:.4}, logloss {logloss:.4}"
        ));
        timeline.push(EvalPoint { secs, auc, logloss });
        Ok(())
    };
    let (results, train_secs) = if settings.processes || settings.spawn_prefix.is_some() {
        run_processes(&settings, &mut probe)?
    } else {
        run_threads(&settings, &data, &mut probe)?
    };
    let mut total = CacheStats::default();
    let mut dense_bytes = 0;
    for r in results {
        total = total.plus(&r.cache);
        dense_bytes += r.dense_bytes;
    }
    let (auc_model, logloss_model) =
        evaluate(args.model, [emb, dense, mlp, cross], &data.test, &|s| {
            data.keys(s)
        })?;
    let labels: Vec<bool> = data.test.iter().map(|s| s.label).collect();
    let oracle: Vec<f64> = data.test.iter().map(|s| s.p).collect();
    let samples = (args.train * args.epochs) as f64;
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
        timeline,
        time_to_target,
    })
}

/// An evaluation callback: given the start instant and a way to print, scores the model now.
type Probe<'a> = dyn FnMut(Instant, &dyn Fn(String)) -> Result<()> + 'a;

/// Evaluates every `eval_every` seconds until `done` says the workers have finished.
fn evaluate_while(
    args: &TrainArgs,
    start: Instant,
    probe: &mut Probe<'_>,
    say: &dyn Fn(String),
    done: &mut dyn FnMut() -> Result<bool>,
) -> Result<()> {
    let tick = Duration::from_millis(20);
    let mut next = args.eval_every.map(|e| start + Duration::from_secs_f64(e));
    while !done()? {
        match next {
            Some(at) if Instant::now() >= at => {
                probe(start, say)?;
                next = args.eval_every.map(|e| at + Duration::from_secs_f64(e));
            }
            _ => std::thread::sleep(tick),
        }
    }
    Ok(())
}

fn run_threads(
    args: &TrainArgs,
    data: &Data,
    probe: &mut Probe<'_>,
) -> Result<(Vec<WorkerResult>, f64)> {
    let batches = args.train.div_ceil(args.batch) * args.epochs;
    let bar = crate::progress::bar(batches as u64, "training batches");
    let start = Instant::now();
    let say = |line: String| bar.println(line);
    let results = std::thread::scope(|s| -> Result<Vec<WorkerResult>> {
        let handles: Vec<_> = (0..args.workers)
            .map(|w| {
                let bar = &bar;
                s.spawn(move || -> Result<WorkerResult> {
                    let mut tables = WorkerTables::connect(args)?;
                    worker(args, &args.batches_of(w), data, &mut tables, bar)?;
                    tables.finish()
                })
            })
            .collect();
        evaluate_while(args, start, probe, &say, &mut || {
            Ok(handles.iter().all(|h| h.is_finished()))
        })?;
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })?;
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((results, secs))
}

/// Starts one `train-worker` process per worker, waits until each has generated its data and
/// connected, starts them together, evaluates while they run and reads their results.
fn run_processes(args: &TrainArgs, probe: &mut Probe<'_>) -> Result<(Vec<WorkerResult>, f64)> {
    let exe = std::env::current_exe().context("finding this program to start workers")?;
    let settings = serde_json::to_string(args)?;
    let mut children = Vec::with_capacity(args.workers);
    for w in 0..args.workers {
        let mut words: Vec<String> = args
            .spawn_prefix
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(|word| word.replace("{i}", &w.to_string()))
            .collect();
        words.push(exe.display().to_string());
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..])
            .args(["train-worker", "--index", &w.to_string(), "--settings"])
            .arg(&settings)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting worker {w}: {}", words.join(" ")))?;
        children.push(WorkerProcess::new(w, child));
    }
    for c in &mut children {
        let line = c.read_line()?;
        anyhow::ensure!(
            line.trim() == "ready",
            "worker {} said {line:?} instead of \"ready\"",
            c.index
        );
    }
    let start = Instant::now();
    for c in &mut children {
        c.send("go")?;
    }
    let say = |line: String| eprintln!("{line}");
    evaluate_while(args, start, probe, &say, &mut || {
        let mut all = true;
        for c in &mut children {
            all &= c.exited()?;
        }
        Ok(all)
    })?;
    let secs = start.elapsed().as_secs_f64();
    let results = children
        .iter_mut()
        .map(|c| {
            let line = c.read_line()?;
            serde_json::from_str(&line)
                .with_context(|| format!("worker {}'s result {line:?}", c.index))
        })
        .collect::<Result<_>>()?;
    Ok((results, secs))
}

/// A worker process and the pipes to it.
struct WorkerProcess {
    index: usize,
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    status: Option<std::process::ExitStatus>,
}

impl WorkerProcess {
    fn new(index: usize, mut child: Child) -> Self {
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Self {
            index,
            child,
            stdout,
            status: None,
        }
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .with_context(|| format!("reading from worker {}", self.index))?;
        if line.is_empty() {
            let status = self.child.wait()?;
            anyhow::bail!("worker {} ended ({status}) without answering", self.index);
        }
        Ok(line)
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").with_context(|| format!("starting worker {}", self.index))
    }

    /// Whether it has exited; an error if it failed.
    fn exited(&mut self) -> Result<bool> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        match self.status {
            Some(s) if !s.success() => anyhow::bail!("worker {} failed: {s}", self.index),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `hetkv-bench train-worker`: one worker of a `train --processes` run.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// This worker's index.
    #[arg(long)]
    pub index: usize,
    /// The run's settings as JSON, servers included.
    #[arg(long)]
    pub settings: String,
}

/// Runs one worker process: generates the data, connects, says `ready` on stdout, waits for a line
/// on stdin, trains its batches, flushes its cache and prints its result as one JSON line.
pub fn worker_process(w: &WorkerArgs) -> Result<()> {
    let args: TrainArgs = serde_json::from_str(&w.settings).context("parsing --settings")?;
    anyhow::ensure!(
        w.index < args.workers,
        "worker index {} of {} workers",
        w.index,
        args.workers
    );
    anyhow::ensure!(!args.servers.is_empty(), "the settings name no servers");
    let data = Data::generate(&args)?;
    let mut tables = WorkerTables::connect(&args)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    anyhow::ensure!(go.trim() == "go", "expected \"go\" on stdin, got {go:?}");
    let bar = indicatif::ProgressBar::hidden();
    worker(&args, &args.batches_of(w.index), &data, &mut tables, &bar)?;
    let result = tables.finish()?;
    writeln!(stdout, "{}", serde_json::to_string(&result)?)?;
    stdout.flush()?;
    Ok(())
}

/// One worker's view of the model's tables: the embeddings through its cache; the dense weights,
/// the MLP and the cross network with no cache and bounds 0. Two connections, so that the
/// embedding cache counts embedding traffic alone (as HET reports it) and the dense parameters are
/// counted apart.
struct WorkerTables {
    dense_client: Cluster,
    emb: hetkv_client::CachedTable,
    dense: hetkv_client::CachedTable,
    mlp: hetkv_client::CachedTable,
    cross: hetkv_client::CachedTable,
}

impl WorkerTables {
    fn connect(args: &TrainArgs) -> Result<Self> {
        let emb_client = Cluster::connect(&args.servers, args.transport, &ClientConfig::default())?;
        let client = Cluster::connect(&args.servers, args.transport, &ClientConfig::default())?;
        let direct = |name: &str| -> Result<hetkv_client::CachedTable> {
            Ok(client.open_table(name)?.cached(CacheConfig::disabled()))
        };
        Ok(Self {
            emb: emb_client
                .open_table("ctr_emb")?
                .cached(args.cache_config()),
            dense: direct("ctr_dense")?,
            mlp: direct("ctr_mlp")?,
            cross: direct("ctr_cross")?,
            dense_client: client,
        })
    }

    /// Flushes the embedding cache and counts what this worker did.
    fn finish(mut self) -> Result<WorkerResult> {
        self.emb.flush()?;
        let dense = self.dense_client.traffic();
        Ok(WorkerResult {
            cache: self.emb.stats(),
            dense_bytes: dense.sent + dense.received,
        })
    }
}

fn worker(
    args: &TrainArgs,
    mine: &[usize],
    data: &Data,
    t: &mut WorkerTables,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let (train, train_keys) = (&data.train, &data.train_keys);
    let deep = matches!(
        args.model,
        ModelKind::Deepfm | ModelKind::Wdl | ModelKind::Dcn
    );
    let crossing = args.model == ModelKind::Dcn;
    let dense_keys: Vec<u64> = (0..=DENSE as u64).collect();
    let mlp_keys: Vec<u64> = (0..MLP_ROWS as u64).collect();
    let cross_keys: Vec<u64> = (0..CROSS_ROWS as u64).collect();
    let mut dense_w = vec![0f32; DENSE + 1];
    let mut mlp = vec![0f32; if deep { MLP_ROWS * HIDDEN } else { 0 }];
    let mut g_mlp = vec![0f32; mlp.len()];
    let mut cross = vec![0f32; if crossing { CROSS_ROWS * MLP_IN } else { 0 }];
    let mut g_cross = vec![0f32; cross.len()];
    let mut keys = Vec::new();
    let mut rows = Vec::new();
    let mut g_rows = Vec::new();
    let mut g_dense = vec![0f32; DENSE + 1];
    let mut unique = Unique::default();
    let per_sample = CATEGORICAL * ROW;
    for &b in mine {
        let lo = b * args.batch;
        let hi = (lo + args.batch).min(train.len());
        keys.clear();
        for k in &train_keys[lo..hi] {
            keys.extend_from_slice(k);
        }
        rows.resize(keys.len() * ROW, 0.0);
        t.emb.lookup(&keys, &mut rows)?;
        t.dense.lookup(&dense_keys, &mut dense_w)?;
        if deep {
            t.mlp.lookup(&mlp_keys, &mut mlp)?;
            g_mlp.iter_mut().for_each(|g| *g = 0.0);
        }
        if crossing {
            t.cross.lookup(&cross_keys, &mut cross)?;
            g_cross.iter_mut().for_each(|g| *g = 0.0);
        }
        g_rows.clear();
        g_rows.resize(keys.len() * ROW, 0.0);
        g_dense.iter_mut().for_each(|g| *g = 0.0);
        let scale = 1.0 / (hi - lo) as f32;
        for (i, s) in train[lo..hi].iter().enumerate() {
            let r = &rows[i * per_sample..(i + 1) * per_sample];
            let d = Fm::dense(s);
            let (z, h) = Model::logit(args.model, r, &d, &dense_w, &mlp, &cross);
            let e = sigmoid(z) - if s.label { 1.0 } else { 0.0 };
            let g = &mut g_rows[i * per_sample..(i + 1) * per_sample];
            Model::gradient(
                args.model,
                r,
                &d,
                (&mlp, &cross),
                &h,
                e,
                scale,
                g,
                &mut g_dense,
                (&mut g_mlp, &mut g_cross),
            );
        }
        // One update per unique key: its gradients summed over occurrences.
        unique.gradients(&keys, &g_rows, ROW, |g| g);
        t.emb.update(&unique.keys, &unique.grads)?;
        t.dense.update(&dense_keys, &g_dense)?;
        if deep {
            t.mlp.update(&mlp_keys, &g_mlp)?;
        }
        if crossing {
            t.cross.update(&cross_keys, &g_cross)?;
        }
        bar.inc(1);
    }
    Ok(())
}

fn evaluate(
    kind: ModelKind,
    [emb, dense_table, mlp_table, cross_table]: [&Table; 4],
    test: &[Sample],
    keys: &dyn Fn(&Sample) -> [u64; CATEGORICAL],
) -> Result<(f64, f64)> {
    let mut dense_w = vec![0f32; DENSE + 1];
    dense_table.pull(&(0..=DENSE as u64).collect::<Vec<_>>(), &mut dense_w, None)?;
    let mut mlp = vec![0f32; MLP_ROWS * HIDDEN];
    mlp_table.pull(&(0..MLP_ROWS as u64).collect::<Vec<_>>(), &mut mlp, None)?;
    let mut cross = vec![0f32; CROSS_ROWS * MLP_IN];
    cross_table.pull(
        &(0..CROSS_ROWS as u64).collect::<Vec<_>>(),
        &mut cross,
        None,
    )?;
    let mut p = Vec::with_capacity(test.len());
    let mut rows = vec![0f32; CATEGORICAL * ROW * 1024];
    for chunk in test.chunks(1024) {
        let k: Vec<u64> = chunk.iter().flat_map(keys).collect();
        let r = &mut rows[..k.len() * ROW];
        emb.pull(&k, r, None)?;
        for (i, s) in chunk.iter().enumerate() {
            let sample = &r[i * CATEGORICAL * ROW..(i + 1) * CATEGORICAL * ROW];
            let (z, _) = Model::logit(kind, sample, &Fm::dense(s), &dense_w, &mlp, &cross);
            p.push(sigmoid(z) as f64);
        }
    }
    let labels: Vec<bool> = test.iter().map(|s| s.label).collect();
    Ok((auc(&p, &labels).unwrap_or(f64::NAN), logloss(&p, &labels)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_s_gradients_match_finite_differences() {
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
        };
        let rows: Vec<f32> = (0..CATEGORICAL * ROW).map(|_| next()).collect();
        let dense: [f32; DENSE] = std::array::from_fn(|_| next() + 0.5);
        let dense_w: Vec<f32> = (0..=DENSE).map(|_| next()).collect();
        let mlp: Vec<f32> = (0..MLP_ROWS * HIDDEN).map(|_| next()).collect();
        let cross: Vec<f32> = (0..CROSS_ROWS * MLP_IN).map(|_| next() * 0.1).collect();
        let kinds = [
            ModelKind::Lr,
            ModelKind::Fm,
            ModelKind::Deepfm,
            ModelKind::Wdl,
            ModelKind::Dcn,
        ];
        for kind in kinds {
            // Loss for label 1: -ln sigmoid(logit), as a function of each parameter group.
            let loss = |rows: &[f32], dense_w: &[f32], mlp: &[f32], cross: &[f32]| -> f64 {
                let (z, _) = Model::logit(kind, rows, &dense, dense_w, mlp, cross);
                -(sigmoid(z) as f64).ln()
            };
            let (z, hid) = Model::logit(kind, &rows, &dense, &dense_w, &mlp, &cross);
            let e = sigmoid(z) - 1.0;
            let mut g_rows = vec![0f32; rows.len()];
            let mut g_dense = vec![0f32; DENSE + 1];
            let (mut g_mlp, mut g_cross) = (vec![0f32; mlp.len()], vec![0f32; cross.len()]);
            Model::gradient(
                kind,
                &rows,
                &dense,
                (&mlp, &cross),
                &hid,
                e,
                1.0,
                &mut g_rows,
                &mut g_dense,
                (&mut g_mlp, &mut g_cross),
            );
            let h = 1e-3f32;
            // Central differences of one parameter group, at the given indices.
            let check = |what: &str,
                         base: &[f32],
                         analytic: &[f32],
                         idx: Vec<usize>,
                         f: &dyn Fn(&[f32]) -> f64| {
                for i in idx {
                    let (mut up, mut down) = (base.to_vec(), base.to_vec());
                    up[i] += h;
                    down[i] -= h;
                    let numeric = (f(&up) - f(&down)) / (2.0 * h as f64);
                    assert!(
                        (numeric - analytic[i] as f64).abs() < 2e-3,
                        "{kind:?} {what} {i}: numeric {numeric} vs analytic {}",
                        analytic[i]
                    );
                }
            };
            check(
                "row parameter",
                &rows,
                &g_rows,
                (0..rows.len()).step_by(5).collect(),
                &|r| loss(r, &dense_w, &mlp, &cross),
            );
            check(
                "dense parameter",
                &dense_w,
                &g_dense,
                (0..=DENSE).collect(),
                &|d| loss(&rows, d, &mlp, &cross),
            );
            if kind != ModelKind::Lr && kind != ModelKind::Fm {
                let idx = (0..mlp.len())
                    .step_by(37)
                    .chain([
                        MLP_IN * HIDDEN,
                        (MLP_IN + 1) * HIDDEN,
                        (MLP_IN + 2) * HIDDEN,
                    ])
                    .collect();
                check("mlp parameter", &mlp, &g_mlp, idx, &|m| {
                    loss(&rows, &dense_w, m, &cross)
                });
            }
            if kind == ModelKind::Dcn {
                check(
                    "cross parameter",
                    &cross,
                    &g_cross,
                    (0..cross.len()).step_by(11).collect(),
                    &|c| loss(&rows, &dense_w, &mlp, c),
                );
            }
        }
    }

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
