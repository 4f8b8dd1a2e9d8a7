//! The cache core alone on the reference workload: no sockets, no transport, no shard. A
//! `CacheCore` plans each batch's lookup, an in-memory answerer (rows in one array) answers its
//! requests as a shard would, and only the core's own calls are timed: planning (de-duplication,
//! index probes, the policy and its frequency sketch, slots for the misses), taking the answers,
//! placing the rows (refreshes, inserts, the caller's buffer, duplicates), and the update (the
//! pending sums and the lines' optimizer steps, pushes past the bound). The answerer's work, and
//! the gradients the workload computes, are outside the timed spans.
//!
//! Reported: nanoseconds of core work per looked-up key (duplicates included) and per unique key,
//! split by phase, beside the hit rate, so that the hit path's cost is what is measured.

use std::time::Instant;

use anyhow::Result;
use hetkv_client::cache::{CacheCore, RequestKind};
use hetkv_client::{Bound, CacheConfig, Capacity, PolicyKind};
use hetkv_transport::wire::{is_stale, PushResponse};
use hetkv_transport::{Initializer, Optimizer, OptimizerSpec, PushOutcome, StaleRows, TableSpec};
use serde::Serialize;

use crate::cache_bench::{Unique, Workload};
use crate::workload::ZipfKeys;

/// `hetkv-bench core`.
#[derive(clap::Args, Debug, Clone)]
pub struct CoreArgs {
    /// The workload.
    #[command(flatten)]
    pub workload: Workload,
    /// Cache size, as a fraction of the table.
    #[arg(long, default_value_t = 0.10)]
    pub cache: f64,
    /// Policy.
    #[arg(long, default_value = "lfu")]
    pub policy: PolicyKind,
    /// Bound (read and write alike).
    #[arg(long, default_value = "100")]
    pub bound: Bound,
    /// The table's optimizer: sgd, adagrad, rowwise_adagrad or adam (lr 0.01, defaults).
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What `core` measured.
#[derive(Debug, Serialize)]
pub struct CoreReport {
    /// Settings.
    pub rows: u64,
    /// Row width.
    pub dim: u32,
    /// Keys per batch.
    pub batch: usize,
    /// Cache fraction.
    pub cache: f64,
    /// Policy.
    pub policy: String,
    /// Bound.
    pub bound: String,
    /// Optimizer.
    pub optimizer: String,
    /// Unique keys per measured batch.
    pub unique_per_batch: f64,
    /// Hits over unique keys.
    pub hit_rate: f64,
    /// Core nanoseconds per looked-up key (duplicates included), all phases.
    pub ns_per_key: f64,
    /// Core nanoseconds per unique key, all phases.
    pub ns_per_unique_key: f64,
    /// Per looked-up key: planning the lookup (start_lookup, requests).
    pub plan_ns_per_key: f64,
    /// Per looked-up key: taking the answers and placing the rows.
    pub place_ns_per_key: f64,
    /// Per looked-up key: the update and the push it leaves.
    pub update_ns_per_key: f64,
}

/// The in-memory shard: every row's version and values, the table's optimizer.
struct Answerer {
    dim: usize,
    optimizer: Optimizer,
    state_len: usize,
    versions: Vec<u64>,
    values: Vec<f32>,
    states: Vec<f32>,
    clock: u64,
}

impl Answerer {
    fn new(spec: &TableSpec) -> Self {
        let dim = spec.dim as usize;
        let optimizer = Optimizer::new(spec.optimizer);
        let state_len = optimizer.state_len(dim);
        let n = spec.rows as usize;
        // Rows start at zero: their values do not change what the core does.
        let values = vec![0f32; n * dim];
        let mut states = vec![0f32; n * state_len];
        for s in states.chunks_exact_mut(state_len.max(1)) {
            optimizer.init_state(s);
        }
        Self {
            dim,
            optimizer,
            state_len,
            versions: vec![0; n],
            values,
            states,
            clock: 0,
        }
    }

    fn answer(&mut self, r: &hetkv_client::cache::ShardRequest<'_>) -> (PushOutcome, StaleRows) {
        let (dim, len) = (self.dim, self.state_len);
        let mut out = StaleRows::default();
        let push = match r.push {
            Some(p) => {
                let mut step = 0;
                for (i, &k) in p.keys.iter().enumerate() {
                    let k = k as usize;
                    self.versions[k] += u64::from(p.counts[i]);
                    self.clock += u64::from(p.counts[i]);
                    self.optimizer.apply(
                        &mut self.values[k * dim..(k + 1) * dim],
                        &p.grads[i * dim..(i + 1) * dim],
                        &mut self.states[k * len..(k + 1) * len],
                        &mut step,
                    );
                }
                PushOutcome::Applied(PushResponse {
                    rows: p.keys.len() as u32,
                    updates: p.counts.iter().map(|&c| u64::from(c)).sum(),
                    incarnation: 1,
                    ..PushResponse::default()
                })
            }
            None => PushOutcome::NotSent,
        };
        if r.kind != RequestKind::Push {
            for (j, (&k, &c)) in r.keys.iter().zip(r.clocks).enumerate() {
                let k = k as usize;
                if is_stale(self.versions[k], c, r.bound) {
                    out.indices.push(j as u32);
                    out.versions.push(self.versions[k]);
                    out.rows
                        .extend_from_slice(&self.values[k * dim..(k + 1) * dim]);
                    if (j as u32) < r.state_keys {
                        out.states
                            .values
                            .extend_from_slice(&self.states[k * len..(k + 1) * len]);
                        if self.optimizer.has_steps() {
                            out.states.steps.push(0);
                        }
                    }
                }
            }
        }
        out.table_clock = self.clock;
        out.since_held = true;
        out.incarnation = 1;
        (push, out)
    }
}

/// Drives the core through one call's rounds; returns the nanoseconds spent in the core.
fn exchange(core: &mut CacheCore, shard: &mut Answerer) -> u64 {
    let mut core_ns = 0;
    loop {
        let t = Instant::now();
        let requests = core.requests();
        let listed = t.elapsed().as_nanos() as u64;
        if requests.is_empty() {
            return core_ns + listed;
        }
        let answers: Vec<_> = requests
            .iter()
            .map(|r| (r.shard, shard.answer(r)))
            .collect();
        let t = Instant::now();
        for (s, (push, rows)) in answers {
            core.on_reply(s, push, &rows, true)
                .expect("the answerer follows the protocol");
        }
        core_ns += listed + t.elapsed().as_nanos() as u64;
    }
}

/// Runs the reference workload through the core alone.
pub fn run(args: &CoreArgs) -> Result<CoreReport> {
    let w = &args.workload;
    let optimizer = match args.optimizer.as_str() {
        "sgd" => OptimizerSpec::sgd(0.01),
        "adagrad" => OptimizerSpec::adagrad(0.01),
        "rowwise_adagrad" => OptimizerSpec::rowwise_adagrad(0.01),
        "adam" => OptimizerSpec::adam(0.01),
        other => anyhow::bail!("unknown optimizer {other:?}"),
    };
    let spec = TableSpec {
        name: "reference".into(),
        rows: w.rows,
        dim: w.dim,
        init: Initializer::Zeros,
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let config = CacheConfig::new(Capacity::Fraction(args.cache), args.policy, args.bound);
    let mut core = CacheCore::new(&spec, &config, 1);
    let mut shard = Answerer::new(&spec);
    let dim = w.dim as usize;
    let permutation = ZipfKeys::permutation(w.rows, w.seed);
    let mut gen = ZipfKeys::with_permutation(w.zipf, permutation, w.seed)?;
    let mut stream = vec![0u64; (w.warmup + w.measured) * w.batch];
    gen.fill(&mut stream);
    let mut rows = vec![0f32; w.batch * dim];
    let mut unique = Unique::default();
    let (mut plan, mut place, mut update) = (0u64, 0u64, 0u64);
    let mut before = *core.stats();
    for (b, keys) in stream.chunks_exact(w.batch).enumerate() {
        if b == w.warmup {
            (plan, place, update) = (0, 0, 0);
            before = *core.stats();
        }
        let t = Instant::now();
        core.start_lookup(keys)?;
        plan += t.elapsed().as_nanos() as u64;
        place += exchange(&mut core, &mut shard);
        let t = Instant::now();
        core.complete_lookup(&mut rows, None)?;
        place += t.elapsed().as_nanos() as u64;
        unique.gradients(keys, &rows, dim, |x| 0.01 * x);
        let t = Instant::now();
        core.update(&unique.keys, &unique.grads)?;
        core.start_push();
        update += t.elapsed().as_nanos() as u64;
        update += exchange(&mut core, &mut shard);
    }
    let s = core.stats().since(&before);
    let keys = (w.measured * w.batch) as f64;
    let total = (plan + place + update) as f64;
    Ok(CoreReport {
        rows: w.rows,
        dim: w.dim,
        batch: w.batch,
        cache: args.cache,
        policy: args.policy.to_string(),
        bound: args.bound.to_string(),
        optimizer: optimizer.name().into(),
        unique_per_batch: s.unique_keys as f64 / w.measured as f64,
        hit_rate: s.hit_rate(),
        ns_per_key: total / keys,
        ns_per_unique_key: total / s.unique_keys.max(1) as f64,
        plan_ns_per_key: plan as f64 / keys,
        place_ns_per_key: place as f64 / keys,
        update_ns_per_key: update as f64 / keys,
    })
}
