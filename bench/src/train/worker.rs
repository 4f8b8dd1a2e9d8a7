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
    let mut tables = WorkerTables::connect(&args)?;
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

/// One worker's view of the model's tables: the embeddings through its cache; the dense weights,
/// the MLP and the cross network with no cache and bounds 0. Two connections, so that the
/// embedding cache counts embedding traffic alone (as HET reports it) and the dense parameters are
/// counted apart.
pub(super) struct WorkerTables {
    dense_client: Cluster,
    emb: hetkv_client::CachedTable,
    dense: hetkv_client::CachedTable,
    mlp: hetkv_client::CachedTable,
    cross: hetkv_client::CachedTable,
}

impl WorkerTables {
    pub(super) fn connect(args: &TrainArgs) -> Result<Self> {
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

    /// Applies every update this worker has made (the dense tables write through).
    pub(super) fn flush(&mut self) -> Result<()> {
        self.emb.flush()?;
        Ok(())
    }

    /// Flushes the embedding cache and counts what this worker did.
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
    let (mut batches, mut samples) = (0, 0);
    for &b in mine {
        if gate.between(batches, t)? == Step::Stop {
            break;
        }
        let lo = b * args.batch;
        let hi = (lo + args.batch).min(train.len());
        batches += 1;
        samples += hi - lo;
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
    Ok((batches, samples))
}
