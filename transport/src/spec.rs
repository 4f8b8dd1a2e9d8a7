//! Table specifications (DESIGN section 3): what a table is, as created by clients and configs.

use serde::{Deserialize, Serialize};

use rand::{Rng, SeedableRng};

use crate::hash::splitmix64;
use crate::row::MAX_DIM;

/// Longest table name, in bytes.
pub const MAX_TABLE_NAME: usize = 128;

/// A table's definition. Two specs are the same table only if every field is equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableSpec {
    /// Name: 1 to 128 bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Global capacity in rows. A fixed table's keys are row ids in `[0, rows)`; a dynamic
    /// table takes any u64 key and holds at most `rows` of them over the cluster (each shard its
    /// buckets' share, [`TableSpec::local_rows`]).
    pub rows: u64,
    /// f32 values per row, 1 to 65,536.
    pub dim: u32,
    /// How rows are initialised; a pure function of (seed, row).
    pub init: Initializer,
    /// The server-side optimizer applied to pushed gradients.
    pub optimizer: OptimizerSpec,
    /// Placement buckets, 1 to [`MAX_BUCKETS`], fixed for the table's life: row `r` is in bucket
    /// `r % buckets`, and the bucket is what a shard owns and what resharding moves
    /// ([`Routing`](crate::Routing)). A cluster has at most this many shards holding rows of the
    /// table. [`DEFAULT_BUCKETS`] where a config or a caller leaves it out.
    #[serde(default = "default_buckets")]
    pub buckets: u32,
    /// `Some` for a dynamic table (raw u64 feature ids, rows created on admission, evicted at
    /// the cap); `None` for a fixed one.
    #[serde(default)]
    pub dynamic: Option<DynamicSpec>,
}

/// The placement buckets of a table whose spec does not name them: enough for clusters of up to
/// 4,096 shards, and a multiple of every power of two up to it (so clusters of such sizes keep the
/// `r % S` layout).
pub const DEFAULT_BUCKETS: u32 = 4096;

/// The most placement buckets a table may have.
pub const MAX_BUCKETS: u32 = 1 << 20;

fn default_buckets() -> u32 {
    DEFAULT_BUCKETS
}

/// Deterministic row initialisers: the initial value of row r is a pure function of (seed, r), so
/// every shard initialises its rows the same way on every run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Initializer {
    /// All zeros.
    Zeros,
    /// Uniform in `[-bound, bound)`.
    Uniform {
        /// Half-width of the interval.
        bound: f32,
        /// Seed.
        seed: u64,
    },
    /// Normal with mean 0.
    Normal {
        /// Standard deviation.
        std: f32,
        /// Seed.
        seed: u64,
    },
}

/// Server-side optimizers. All are sparse: only pushed rows change.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerSpec {
    /// `w -= lr * g`.
    Sgd {
        /// Learning rate.
        lr: f32,
    },
    /// `acc += g^2; w -= lr * g / (sqrt(acc) + eps)`, one accumulator per element.
    Adagrad {
        /// Learning rate.
        lr: f32,
        /// Added to the denominator ([`OptimizerSpec::ADAGRAD_EPS`] when a config leaves it out).
        #[serde(default = "defaults::adagrad_eps")]
        eps: f32,
        /// Starting value of each accumulator element (0 when a config leaves it out).
        #[serde(default)]
        initial_accumulator: f32,
    },
    /// Lazy Adam with a per-row step count.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay ([`OptimizerSpec::ADAM_BETA1`] when left out).
        #[serde(default = "defaults::adam_beta1")]
        beta1: f32,
        /// Second-moment decay ([`OptimizerSpec::ADAM_BETA2`] when left out).
        #[serde(default = "defaults::adam_beta2")]
        beta2: f32,
        /// Added to the denominator ([`OptimizerSpec::ADAM_EPS`] when left out).
        #[serde(default = "defaults::adam_eps")]
        eps: f32,
    },
    /// Row-wise Adagrad (FBGEMM's default for embeddings): one accumulator per row,
    /// `acc += mean(g^2); w -= lr * g / (sqrt(acc) + eps)`. Its state is one value a row, so a
    /// cache that mirrors it reads 4 bytes more per row.
    ///
    /// Last, so that the earlier variants keep their index in encoded specs (wire, checkpoints).
    RowwiseAdagrad {
        /// Learning rate.
        lr: f32,
        /// Added to the denominator ([`OptimizerSpec::ROWWISE_ADAGRAD_EPS`] when left out).
        #[serde(default = "defaults::rowwise_adagrad_eps")]
        eps: f32,
        /// Starting value of each row's accumulator (0 when left out).
        #[serde(default)]
        initial_accumulator: f32,
    },
}

/// The one home of the optimizers' default parameters, used by the TOML config (a parameter left
/// out), the Rust constructors and the Python package alike.
mod defaults {
    use super::OptimizerSpec;

    pub(super) fn adagrad_eps() -> f32 {
        OptimizerSpec::ADAGRAD_EPS
    }
    pub(super) fn rowwise_adagrad_eps() -> f32 {
        OptimizerSpec::ROWWISE_ADAGRAD_EPS
    }
    pub(super) fn adam_beta1() -> f32 {
        OptimizerSpec::ADAM_BETA1
    }
    pub(super) fn adam_beta2() -> f32 {
        OptimizerSpec::ADAM_BETA2
    }
    pub(super) fn adam_eps() -> f32 {
        OptimizerSpec::ADAM_EPS
    }
}

impl OptimizerSpec {
    /// Adagrad's default `eps` (PyTorch's).
    pub const ADAGRAD_EPS: f32 = 1e-10;
    /// Row-wise Adagrad's default `eps` (FBGEMM's).
    pub const ROWWISE_ADAGRAD_EPS: f32 = 1e-8;
    /// Adam's default first-moment decay (PyTorch's).
    pub const ADAM_BETA1: f32 = 0.9;
    /// Adam's default second-moment decay (PyTorch's).
    pub const ADAM_BETA2: f32 = 0.999;
    /// Adam's default `eps` (PyTorch's).
    pub const ADAM_EPS: f32 = 1e-8;

    /// SGD at `lr`.
    pub fn sgd(lr: f32) -> Self {
        Self::Sgd { lr }
    }

    /// Adagrad at `lr` with the default `eps` and an initial accumulator of 0 (PyTorch's).
    pub fn adagrad(lr: f32) -> Self {
        Self::Adagrad {
            lr,
            eps: Self::ADAGRAD_EPS,
            initial_accumulator: 0.0,
        }
    }

    /// Row-wise Adagrad at `lr` with the default `eps` and an initial accumulator of 0
    /// (FBGEMM's).
    pub fn rowwise_adagrad(lr: f32) -> Self {
        Self::RowwiseAdagrad {
            lr,
            eps: Self::ROWWISE_ADAGRAD_EPS,
            initial_accumulator: 0.0,
        }
    }

    /// Lazy Adam at `lr` with the default betas and `eps` (PyTorch's).
    pub fn adam(lr: f32) -> Self {
        Self::Adam {
            lr,
            beta1: Self::ADAM_BETA1,
            beta2: Self::ADAM_BETA2,
            eps: Self::ADAM_EPS,
        }
    }

    /// Short name: `sgd`, `adagrad`, `rowwise_adagrad` or `adam`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adagrad { .. } => "adagrad",
            Self::RowwiseAdagrad { .. } => "rowwise_adagrad",
            Self::Adam { .. } => "adam",
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Self::Sgd { lr }
            | Self::Adagrad { lr, .. }
            | Self::RowwiseAdagrad { lr, .. }
            | Self::Adam { lr, .. } => lr,
        }
    }

    /// Checks every parameter, naming the optimizer and the parameter that is out of range:
    /// `lr` and `eps` finite and above 0, an initial accumulator finite and at least 0, betas in
    /// `[0, 1)`.
    pub fn validate(&self) -> Result<(), SpecError> {
        let name = self.name();
        let positive = |what: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(SpecError(format!(
                    "optimizer {name}: {what} must be finite and > 0, got {v}"
                )))
            }
        };
        match *self {
            Self::Sgd { lr } => positive("lr", lr),
            Self::Adagrad {
                lr,
                eps,
                initial_accumulator,
            }
            | Self::RowwiseAdagrad {
                lr,
                eps,
                initial_accumulator,
            } => {
                positive("lr", lr)?;
                positive("eps", eps)?;
                if !initial_accumulator.is_finite() || initial_accumulator < 0.0 {
                    return Err(SpecError(format!(
                        "optimizer {name}: initial_accumulator must be finite and >= 0, got \
                         {initial_accumulator}"
                    )));
                }
                Ok(())
            }
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                positive("lr", lr)?;
                positive("eps", eps)?;
                for (what, b) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(SpecError(format!(
                            "optimizer {name}: {what} must be in [0, 1), got {b}"
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

impl std::fmt::Display for OptimizerSpec {
    /// As the Python package and the TOML config spell it: `adagrad(lr=0.05, eps=1e-10,
    /// initial_accumulator=0)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Sgd { lr } => write!(f, "sgd(lr={lr})"),
            Self::Adagrad {
                lr,
                eps,
                initial_accumulator,
            }
            | Self::RowwiseAdagrad {
                lr,
                eps,
                initial_accumulator,
            } => write!(
                f,
                "{}(lr={lr}, eps={eps:e}, initial_accumulator={initial_accumulator})",
                self.name()
            ),
            Self::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => write!(
                f,
                "adam(lr={lr}, beta1={beta1}, beta2={beta2}, eps={eps:e})"
            ),
        }
    }
}

/// How a dynamic table admits a key it does not hold, on that key's update.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Every key, on its first update.
    Always,
    /// A key once its updates while not held, counted by a bounded count-min sketch, reach
    /// `count` (1 to 255; the sketch overestimates, never underestimates, and halves with age).
    Threshold {
        /// Updates a key needs.
        count: u8,
    },
    /// Each update of a key not held admits it with probability `p` (in `(0, 1]`), drawn from a
    /// stream seeded by `seed` (PERSIA's rule; deterministic for one order of updates).
    Probability {
        /// The chance of each update.
        p: f32,
        /// The stream's seed.
        seed: u64,
    },
}

/// Which of a full bucket's rows a dynamic table gives up for a new key: the lowest score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eviction {
    /// Least recently updated: the score is the table's update count at the row's last update.
    Lru,
    /// Least frequently updated: the score is the row's version (its updates since admission).
    Lfu,
    /// Time to live in training steps: the score is the table's training step at the row's last
    /// update (the step its clients last announced, op 18), a full bucket gives up its least
    /// recently updated row, and when the step reaches `s`, every row last updated before
    /// `s - steps` is evicted (a hard cap on a row's life without updates: reads refresh
    /// nothing).
    Ttl {
        /// Training steps a row lives without an update (at least 1).
        steps: u64,
    },
}

/// What makes a table dynamic: any u64 key, rows created on admission, at most the table's
/// `rows` over the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicSpec {
    /// How keys are admitted.
    pub admission: Admission,
    /// Which row a full bucket gives up.
    pub eviction: Eviction,
}

impl DynamicSpec {
    /// Checks every field, naming the one out of range.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self.admission {
            Admission::Always => Ok(()),
            Admission::Threshold { count: 0 } => Err(SpecError(
                "dynamic table: admission threshold must be 1 to 255 updates, got 0".into(),
            )),
            Admission::Threshold { .. } => Ok(()),
            Admission::Probability { p, .. } if !(p > 0.0 && p <= 1.0) => Err(SpecError(format!(
                "dynamic table: admission probability must be in (0, 1], got {p}"
            ))),
            Admission::Probability { .. } => Ok(()),
        }?;
        match self.eviction {
            Eviction::Ttl { steps: 0 } => Err(SpecError(
                "dynamic table: a time to live must be at least 1 training step, got 0".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Why a spec was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid table spec: {0}")]
pub struct SpecError(pub String);

impl TableSpec {
    /// Checks every field; a spec that passes can be created on any shard.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError(m));
        if self.name.is_empty() || self.name.len() > MAX_TABLE_NAME {
            return bad(format!("name must be 1 to {MAX_TABLE_NAME} bytes"));
        }
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return bad(format!("name {:?} may only hold [A-Za-z0-9_.-]", self.name));
        }
        if self.rows == 0 || self.rows > 1 << 48 {
            return bad(format!("rows {} outside 1..=2^48", self.rows));
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return bad(format!("dim {} outside 1..={MAX_DIM}", self.dim));
        }
        match self.init {
            Initializer::Zeros => {}
            Initializer::Uniform { bound: x, .. } | Initializer::Normal { std: x, .. } => {
                if !x.is_finite() || x < 0.0 {
                    return bad(format!(
                        "initializer scale must be finite and >= 0, got {x}"
                    ));
                }
            }
        }
        if self.buckets == 0 || self.buckets > MAX_BUCKETS {
            return bad(format!(
                "buckets {} outside 1..={MAX_BUCKETS}",
                self.buckets
            ));
        }
        self.optimizer.validate()?;
        if let Some(d) = &self.dynamic {
            d.validate()?;
        }
        Ok(())
    }

    /// Makes `row`, as a shard's `pull` answered it for `key` at `version`, the row the key has:
    /// a dynamic table's shard answers a key it does not hold as zeros at version 0 (a held row's
    /// version is at least 1), and the key's initial value goes in their place, computed by the
    /// reader (PROTOCOL.md, "Dynamic tables"). The one home of that rule.
    pub fn complete_pulled(&self, key: u64, version: u64, row: &mut [f32]) {
        if self.is_dynamic() && version == 0 {
            self.init.fill(key, row);
        }
    }

    /// Whether the table is dynamic (any u64 key).
    pub fn is_dynamic(&self) -> bool {
        self.dynamic.is_some()
    }

    /// Where this table's rows live in a cluster of `shards` shards: by the key for a fixed
    /// table, by the key's hash for a dynamic one.
    pub fn routing(&self, shards: u32) -> crate::Routing {
        match self.dynamic {
            None => crate::Routing::new(shards, self.buckets),
            Some(_) => crate::Routing::hashed(shards, self.buckets),
        }
    }

    /// The layout of shard `shard`'s region of this dynamic table in a cluster of `shards` (the
    /// one home of that rule: the daemon's table, its footprint, resharding and one-sided
    /// readers' descriptors agree through it).
    pub fn keyed_layout(
        &self,
        shard: u32,
        shards: u32,
    ) -> Result<crate::keyed::KeyedLayout, crate::keyed::KeyedError> {
        crate::keyed::KeyedLayout::for_shard(self.dim, self.routing(shards), shard, self.rows)
    }

    /// Rows of this table held by shard `shard` of `shards`: a fixed table's rows there, a
    /// dynamic table's capacity there.
    pub fn local_rows(&self, shard: u32, shards: u32) -> u64 {
        self.routing(shards).local_rows(self.rows, shard)
    }
}

/// A table as one shard holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableInfo {
    /// The table's spec.
    pub spec: TableSpec,
    /// Rows held on this shard.
    pub local_rows: u64,
    /// Bytes between rows in this shard's region.
    pub stride: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TableSpec {
        TableSpec {
            name: "emb".into(),
            rows: 10,
            dim: 4,
            init: Initializer::Zeros,
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            buckets: crate::DEFAULT_BUCKETS,
            dynamic: None,
        }
    }

    #[test]
    fn local_rows_partition_the_table() {
        for rows in 1..40u64 {
            for shards in 1..6u32 {
                let s = TableSpec { rows, ..spec() };
                let total: u64 = (0..shards).map(|i| s.local_rows(i, shards)).sum();
                assert_eq!(total, rows, "rows {rows} shards {shards}");
            }
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(spec().validate().is_ok());
        let cases = [
            TableSpec {
                name: "".into(),
                ..spec()
            },
            TableSpec {
                name: "a b".into(),
                ..spec()
            },
            TableSpec { rows: 0, ..spec() },
            TableSpec { dim: 0, ..spec() },
            TableSpec {
                dim: MAX_DIM + 1,
                ..spec()
            },
            TableSpec {
                optimizer: OptimizerSpec::Sgd { lr: f32::NAN },
                ..spec()
            },
            TableSpec {
                optimizer: OptimizerSpec::Adam {
                    lr: 0.1,
                    beta1: 1.0,
                    beta2: 0.9,
                    eps: 1e-8,
                },
                ..spec()
            },
            TableSpec {
                init: Initializer::Normal {
                    std: f32::INFINITY,
                    seed: 1,
                },
                ..spec()
            },
        ];
        for c in cases {
            assert!(c.validate().is_err(), "{c:?} accepted");
        }
    }
}

/// The hash of (seed, row) every element of the row's initial value derives from.
fn row_hash(seed: u64, row: u64) -> u64 {
    splitmix64(seed ^ splitmix64(row))
}

/// A uniform f64 in `[0, 1)` that is a pure function of (seed, row, element): element `j` of
/// the row whose [`row_hash`] is `hash`.
fn unit(hash: u64, j: u64) -> f64 {
    (splitmix64(hash ^ j) >> 11) as f64 / (1u64 << 53) as f64
}

impl Initializer {
    /// Fills `out` (one row) with the initial value of global row `row`.
    pub fn fill(&self, row: u64, out: &mut [f32]) {
        match *self {
            Self::Zeros => out.fill(0.0),
            Self::Uniform { bound, seed } => {
                let hash = row_hash(seed, row);
                for (j, v) in out.iter_mut().enumerate() {
                    *v = ((unit(hash, j as u64) * 2.0 - 1.0) * bound as f64) as f32;
                }
            }
            Self::Normal { std, seed } => {
                // The row's own generator (PCG's MCG variant, seeded from the row's hash) drawn
                // by the ziggurat method: a few nanoseconds a value, where Box-Muller took a
                // logarithm, a square root and a cosine (a dynamic table's readers compute the
                // initial value of every key not held, at every read).
                let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(row_hash(seed, row));
                for v in out.iter_mut() {
                    let z: f64 = rng.sample(rand_distr::StandardNormal);
                    *v = (z * std as f64) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod init_tests {
    use super::*;

    #[test]
    fn initialisers_are_pure_functions_of_seed_and_row() {
        let mut a = [0f32; 16];
        let mut b = [0f32; 16];
        for init in [
            Initializer::Uniform {
                bound: 0.5,
                seed: 9,
            },
            Initializer::Normal { std: 0.1, seed: 9 },
        ] {
            init.fill(42, &mut a);
            init.fill(42, &mut b);
            assert_eq!(a, b);
            init.fill(43, &mut b);
            assert_ne!(a, b, "rows differ");
        }
        Initializer::Zeros.fill(1, &mut a);
        assert_eq!(a, [0.0; 16]);
    }

    /// The initial values are a protocol (PROTOCOL.md, "Initial values"): a dynamic table's
    /// clients compute those of keys its shards do not hold, and must agree with the shards that
    /// create the rows. A change of these bits (of the crates that define them, say) must bump
    /// `PROTOCOL_VERSION`.
    #[test]
    fn initial_values_are_pinned_to_the_bit() {
        let mut row = [0f32; 4];
        Initializer::Normal { std: 1.0, seed: 7 }.fill(42, &mut row);
        assert_eq!(
            row.map(f32::to_bits),
            [3207866268, 1058700094, 3205917890, 1061030858],
            "normal: {row:?}"
        );
        Initializer::Uniform {
            bound: 1.0,
            seed: 7,
        }
        .fill(42, &mut row);
        assert_eq!(
            row.map(f32::to_bits),
            [3198748126, 3205465503, 3204755455, 1063959685],
            "uniform: {row:?}"
        );
    }

    #[test]
    fn initialisers_have_the_requested_distribution() {
        let n = 20_000;
        let mut row = [0f32; 8];
        let (mut sum, mut sq, mut max) = (0f64, 0f64, 0f32);
        for r in 0..n {
            Initializer::Uniform {
                bound: 0.5,
                seed: 1,
            }
            .fill(r, &mut row);
            for v in row {
                max = max.max(v.abs());
            }
            Initializer::Normal { std: 0.2, seed: 1 }.fill(r, &mut row);
            for v in row {
                sum += v as f64;
                sq += (v as f64) * (v as f64);
            }
        }
        assert!(max < 0.5 && max > 0.49, "uniform bound: {max}");
        let count = (n * 8) as f64;
        let mean = sum / count;
        let std = (sq / count - mean * mean).sqrt();
        assert!(mean.abs() < 0.005, "normal mean {mean}");
        assert!((std - 0.2).abs() < 0.005, "normal std {std}");
    }
}
