//! Scoring the trained model on the held-out split, during training and after it.

use super::*;

pub(super) type Probe<'a> = dyn FnMut(Instant, &dyn Fn(String)) -> Result<()> + 'a;

/// Evaluates every `eval_every` seconds until `done` says the workers have finished.
pub(super) fn evaluate_while(
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

pub(super) fn evaluate(
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
