//! The settings of `hetkv-bench train` and how they split the batches over the workers.

use super::*;

/// `hetkv-bench train` settings.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    /// The model.
    #[arg(long, value_enum, default_value = "fm")]
    pub model: ModelKind,
    /// Values per embedding row: the key's linear weight, then `dim - 1` factors. HET's regime is
    /// 128 (with `--hidden 256,256,256 --batch 128`).
    #[arg(long, default_value_t = DEFAULT_DIM)]
    pub dim: usize,
    /// Widths of the MLP's hidden layers (DeepFM, Wide&Deep, DCN), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub hidden: Vec<usize>,
    /// Threads of each worker's forward and backward passes (a batch is split between them).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Read and write staleness bounds of each worker's copy of the dense parameters (the MLP,
    /// the cross network, the dense weights), the same in every configuration: 0 reads and writes
    /// them whole every batch; N lets a worker train on its own copy, pushing its accumulated
    /// gradient after N batches and re-reading a row once N foreign updates have reached it.
    #[arg(long, default_value = "0")]
    pub dense_bound: Bound,
    /// Prefetch: each worker starts the next batch's lookups (embeddings and dense parameters)
    /// before computing the current one, and its pushes ride with them
    /// (`CachedTable::prefetch`): one request a batch and shard, overlapped with compute.
    #[arg(long)]
    pub prefetch: bool,
    /// The embedding caches' update rule (`hetkv_client::UpdateRuleKind`): how a worker's
    /// updates of a key count in its line and in its pushes. `push-whole` is HET's semantics
    /// (the library's default); `share-weighted` weighs pushes by the worker's share of the
    /// key's updates (docs/BENCHMARKS.md, "Update rules", measures both).
    #[arg(long, default_value = "push-whole")]
    #[serde(with = "rule_text")]
    pub update_rule: UpdateRuleKind,
    /// Data-parallel workers, each with its own client and cache.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Read staleness bound of the embedding caches.
    #[arg(long, default_value = "100")]
    pub pull_bound: Bound,
    /// Write staleness bound of the embedding caches.
    #[arg(long, default_value = "100")]
    pub push_bound: Bound,
    /// Each worker trains its first N batches with its embedding cache at bounds 0, then at
    /// `--pull-bound` and `--push-bound` (post-local SGD: synchronous while the model moves
    /// fastest, stale after). Counted from the start of the run, a resumed run included; no
    /// effect without a cache.
    #[arg(long, default_value_t = 0)]
    pub warmup_batches: usize,
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
    /// Train on raw 64-bit feature ids (those a log carries: `CriteoSynth::raw_id`) in a dynamic
    /// embedding table (admission always, LFU eviction) instead of dense keys in a fixed one.
    #[arg(long)]
    pub raw_ids: bool,
    /// With `--raw-ids`: the dynamic table's capacity in rows. Default: the rows the fixed
    /// table's memory holds as dynamic rows (its footprint over `dynamic::bytes_per_row`), so
    /// the two runs compare at the same memory.
    #[arg(long)]
    pub raw_capacity: Option<u64>,
    /// Seed of the data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Shard addresses of a running cluster, in shard order (comma-separated). Without them the
    /// run starts two in-process shards.
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// The coordinator's own addresses of the same daemons, in shard order (comma-separated):
    /// it creates the tables, sets the dense parameters and evaluates through these, the workers
    /// train through `--servers`. A measurement network apart from the training links keeps the
    /// evaluations' reads off them (as `netns-cluster.sh` does). Default: `--servers`.
    #[arg(long, value_delimiter = ',')]
    pub eval_servers: Vec<String>,
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
    /// The server-side optimizer of the embedding table (with `--lr`), and of the dense
    /// parameters unless `--dense-optimizer` says otherwise.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: TrainOptimizer,
    /// The server-side optimizer of the dense parameters (the `ctr_dense` table), when it is not
    /// `--optimizer` (as in PyTorch, where the embeddings' optimizer is not the dense model's).
    #[arg(long, value_enum)]
    pub dense_optimizer: Option<TrainOptimizer>,
    /// The dense parameters' learning rate, when it is not `--lr`.
    #[arg(long)]
    pub dense_lr: Option<f32>,
    /// Take a checkpoint of the cluster every this many seconds: every worker flushes at its
    /// next batch boundary and waits, each daemon writes one into its data directory
    /// (`--servers` started with `--data-dir`), then the workers go on.
    #[arg(long)]
    pub checkpoint_every: Option<f64>,
    /// Names of those checkpoints: PREFIX-1, PREFIX-2, ...
    #[arg(long, default_value = "train")]
    pub checkpoint_prefix: String,
    /// Make every checkpoint after the first incremental.
    #[arg(long)]
    pub incremental_checkpoints: bool,
    /// End the run after this many checkpoints (the workers stop at the barrier).
    #[arg(long)]
    pub stop_after_checkpoints: Option<usize>,
    /// Skip this many of each worker's batches (comma-separated, one per worker): resume a run
    /// from a checkpoint its report lists, after restarting the daemons from it.
    #[arg(long, value_delimiter = ',')]
    pub resume_batches: Vec<usize>,
    /// Write the report here as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: Option<std::path::PathBuf>,
}

/// The update rule as its name (`push-whole`, ...), in the settings' JSON.
mod rule_text {
    use hetkv_client::UpdateRuleKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(rule: &UpdateRuleKind, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(rule)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UpdateRuleKind, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The server-side optimizer of a training run's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainOptimizer {
    /// SGD with `--lr`.
    Sgd,
    /// Adagrad with `--lr` and the defaults of `OptimizerSpec::adagrad`.
    Adagrad,
    /// Row-wise Adagrad with `--lr` and the defaults of `OptimizerSpec::rowwise_adagrad`.
    #[value(name = "rowwise-adagrad")]
    #[serde(rename = "rowwise-adagrad")]
    RowwiseAdagrad,
    /// Lazy Adam with `--lr` and the defaults of `OptimizerSpec::adam`.
    Adam,
}

impl TrainOptimizer {
    /// The spec at learning rate `lr`.
    pub fn spec(self, lr: f32) -> OptimizerSpec {
        match self {
            Self::Sgd => OptimizerSpec::sgd(lr),
            Self::Adagrad => OptimizerSpec::adagrad(lr),
            Self::RowwiseAdagrad => OptimizerSpec::rowwise_adagrad(lr),
            Self::Adam => OptimizerSpec::adam(lr),
        }
    }
}

impl TrainArgs {
    /// The defaults of the command line, for callers that build settings in code.
    pub fn defaults(model: ModelKind) -> Self {
        Self {
            model,
            dim: DEFAULT_DIM,
            hidden: vec![32],
            threads: 1,
            dense_bound: Bound::updates(0),
            prefetch: false,
            update_rule: UpdateRuleKind::PushWhole,
            workers: 4,
            pull_bound: Bound::updates(100),
            push_bound: Bound::updates(100),
            warmup_batches: 0,
            cache: 0.1,
            train: 400_000,
            epochs: 1,
            test: 100_000,
            batch: 256,
            lr: 0.1,
            scale: 0.01,
            raw_ids: false,
            raw_capacity: None,
            seed: 1,
            servers: Vec::new(),
            eval_servers: Vec::new(),
            transport: TransportKind::Tcp,
            processes: false,
            spawn_prefix: None,
            eval_every: None,
            eval_samples: 20_000,
            target_auc: None,
            optimizer: TrainOptimizer::Sgd,
            dense_optimizer: None,
            dense_lr: None,
            checkpoint_every: None,
            checkpoint_prefix: "train".into(),
            incremental_checkpoints: false,
            stop_after_checkpoints: None,
            resume_batches: Vec::new(),
            json: None,
        }
    }

    /// The model these settings describe.
    pub fn net(&self) -> Result<Net> {
        Net::new(self.model, self.dim, &self.hidden)
    }

    /// The cache of a worker's dense parameters: all of them, under `--dense-bound`; at bound 0
    /// none (every batch reads the shards' copy and writes through), so that the worker never
    /// trains on a local copy the shards' optimizer (Adam, say) would not have produced.
    pub(super) fn dense_cache_config(&self) -> CacheConfig {
        if self.dense_bound.get() == 0 {
            return CacheConfig::disabled();
        }
        CacheConfig {
            capacity: Capacity::Fraction(1.0),
            policy: PolicyKind::Lfu,
            pull_bound: self.dense_bound,
            push_bound: self.dense_bound,
        }
    }

    /// The optimizers of the embedding table and of the dense parameters.
    pub(super) fn optimizers(&self) -> (OptimizerSpec, OptimizerSpec) {
        let dense = self.dense_optimizer.unwrap_or(self.optimizer);
        (
            self.optimizer.spec(self.lr),
            dense.spec(self.dense_lr.unwrap_or(self.lr)),
        )
    }

    /// Batches worker `w` skips (`--resume-batches`).
    pub(super) fn resume_of(&self, w: usize) -> usize {
        self.resume_batches.get(w).copied().unwrap_or(0)
    }

    /// The embedding cache's settings for worker `w` at the start of its part of the run: bounds
    /// 0 while it is within `--warmup-batches`.
    pub(super) fn initial_cache_config(&self, w: usize) -> CacheConfig {
        let mut config = self.cache_config();
        if self.resume_of(w) < self.warmup_batches {
            config.pull_bound = Bound::STRICT;
            config.push_bound = Bound::STRICT;
        }
        config
    }

    pub(super) fn cache_config(&self) -> CacheConfig {
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
    pub(super) fn batches_of(&self, w: usize) -> Vec<usize> {
        let per_epoch = self.train.div_ceil(self.batch);
        (0..per_epoch * self.epochs)
            .filter(|b| b % self.workers == w)
            .map(|b| b % per_epoch)
            .collect()
    }
}
