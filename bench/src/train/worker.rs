//! One worker: its tables and caches, its share of the batches, and the process entry point of
//! `train --processes`.

use super::*;

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
    let mut tables = WorkerTables::connect(&args, w.index)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    anyhow::ensure!(go.trim() == "go", "expected \"go\" on stdin, got {go:?}");
    let bar = indicatif::ProgressBar::hidden();
    let gate = ProcessGate::start();
    let (batches, samples) = worker(
        &args,
        &args.batches_of(w.index)[args.resume_of(w.index).min(args.batches_of(w.index).len())..],
        &data,
        &mut tables,
        &bar,
        &gate,
    )?;
    let result = tables.finish(batches, samples)?;
    writeln!(stdout, "{}", serde_json::to_string(&result)?)?;
    stdout.flush()?;
    Ok(())
}

/// One worker's view of the model's tables: the embeddings through its cache, the dense
/// parameters through a cache of its own under `--dense-bound`. Two connections, so that the
/// embedding cache counts embedding traffic alone (as HET reports it) and the dense parameters are
/// counted apart.
pub(super) struct WorkerTables {
    dense_client: Cluster,
    emb: hetkv_client::CachedTable,
    dense: hetkv_client::CachedTable,
    /// Batches of this run after which the embedding cache leaves the warm-up's bounds 0
    /// (`--warmup-batches`); `None` once it has, or if it never had them.
    warmup_ends: Option<usize>,
}

impl WorkerTables {
    /// Worker `w`'s tables.
    pub(super) fn connect(args: &TrainArgs, w: usize) -> Result<Self> {
        let emb_client = Cluster::connect(&args.servers, args.transport, &ClientConfig::default())?;
        let client = Cluster::connect(&args.servers, args.transport, &ClientConfig::default())?;
        // A training run goes on through a daemon's restart from a checkpoint, and reports what
        // the restart took back (`restarts` in its report) instead of failing.
        emb_client.set_on_rollback(OnRollback::Continue);
        client.set_on_rollback(OnRollback::Continue);
        let config = args.initial_cache_config(w);
        Ok(Self {
            warmup_ends: (config != args.cache_config())
                .then(|| args.warmup_batches - args.resume_of(w)),
            emb: emb_client
                .open_table("ctr_emb")?
                .cached(config)
                .with_update_rule(args.update_rule),
            // Every worker updates every dense parameter: the shards' copy moves by the mean of
            // their progress (periodic model averaging, the period being the dense bound).
            dense: client
                .open_table("ctr_dense")?
                .cached(args.dense_cache_config())
                .with_update_rule(UpdateRuleKind::PushScaled {
                    factor: 1.0 / args.workers as f32,
                }),
            dense_client: client,
        })
    }

    /// Before the batch that follows `done` batches of this run: ends the warm-up when it is due.
    fn before_batch(&mut self, args: &TrainArgs, done: usize) -> Result<()> {
        if self.warmup_ends == Some(done) {
            self.emb.set_bounds(args.pull_bound, args.push_bound)?;
            self.warmup_ends = None;
        }
        Ok(())
    }

    /// Applies every update this worker has made.
    pub(super) fn flush(&mut self) -> Result<()> {
        self.emb.flush()?;
        self.dense.flush()?;
        Ok(())
    }

    /// Flushes the caches and counts what this worker did.
    pub(super) fn finish(mut self, batches: usize, samples: usize) -> Result<WorkerResult> {
        self.flush()?;
        let dense = self.dense_client.traffic();
        let restarts = self
            .emb
            .table()
            .cluster()
            .restarts()
            .plus(&self.dense_client.restarts());
        Ok(WorkerResult {
            cache: self.emb.stats(),
            restarts,
            dense_bytes: dense.sent + dense.received,
            batches,
            samples,
        })
    }
}

/// Trains the batches `mine`, consulting `gate` before each; returns the batches and samples
/// trained.
pub(super) fn worker(
    args: &TrainArgs,
    mine: &[usize],
    data: &Data,
    t: &mut WorkerTables,
    bar: &indicatif::ProgressBar,
    gate: &dyn Gate,
) -> Result<(usize, usize)> {
    let net = args.net()?;
    let (train, train_keys) = (&data.train, &data.train_keys);
    let dim = net.dim();
    let dense_keys: Vec<u64> = (0..net.dense_rows() as u64).collect();
    let mut params = vec![0f32; net.dense_rows() * net.dense_width()];
    let mut g_params = vec![0f32; params.len()];
    let mut scratch: Vec<Scratch> = (0..args.threads).map(|_| Scratch::default()).collect();
    let (mut keys, mut next_keys, mut rows, mut g_rows) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut dense, mut labels) = (Vec::new(), Vec::new());
    let mut unique = Unique::default();
    let (mut batches, mut samples) = (0, 0);
    let span = |b: usize| (b * args.batch, ((b + 1) * args.batch).min(train.len()));
    let batch_keys = |b: usize, keys: &mut Vec<u64>| {
        let (lo, hi) = span(b);
        keys.clear();
        for k in &train_keys[lo..hi] {
            keys.extend_from_slice(k);
        }
    };
    for (i, &b) in mine.iter().enumerate() {
        if gate.between(batches, t)? == Step::Stop {
            break;
        }
        t.before_batch(args, batches)?;
        let (lo, hi) = span(b);
        batches += 1;
        samples += hi - lo;
        batch_keys(b, &mut keys);
        rows.resize(keys.len() * dim, 0.0);
        g_rows.resize(keys.len() * dim, 0.0);
        t.emb.lookup(&keys, &mut rows)?;
        t.dense.lookup(&dense_keys, &mut params)?;
        if let Some(&next) = mine.get(i + 1).filter(|_| args.prefetch) {
            // The next batch's rows travel while this one computes; this batch's updates are
            // applied when they land, and pushed with the prefetch after that.
            batch_keys(next, &mut next_keys);
            t.emb.prefetch(&next_keys)?;
            t.dense.prefetch(&dense_keys)?;
        }
        dense.clear();
        dense.extend(train[lo..hi].iter().map(dense_inputs));
        labels.clear();
        labels.extend(
            train[lo..hi]
                .iter()
                .map(|s| if s.label { 1.0 } else { 0.0 }),
        );
        net.gradients(
            &params,
            &rows,
            &dense,
            &labels,
            &mut scratch,
            &mut g_rows,
            &mut g_params,
        );
        // One update per unique key: its gradients summed over occurrences.
        unique.gradients(&keys, &g_rows, dim, |g| g);
        t.emb.update(&unique.keys, &unique.grads)?;
        t.dense.update(&dense_keys, &g_params)?;
        bar.inc(1);
    }
    Ok((batches, samples))
}
