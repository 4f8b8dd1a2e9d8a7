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

/// Scores `test` with the model on the shards: the dense parameters read once from `ctr_dense`,
/// the rows a thousand samples at a time from `ctr_emb`.
pub(super) fn evaluate(
    net: &Net,
    [emb, dense_table]: [&Table; 2],
    test: &[Sample],
    keys: &dyn Fn(&Sample) -> [u64; CATEGORICAL],
) -> Result<(f64, f64)> {
    let dense_rows = net.dense_rows() as u64;
    let mut params = vec![0f32; net.dense_rows() * net.dense_width()];
    dense_table.pull(&(0..dense_rows).collect::<Vec<_>>(), &mut params, None)?;
    let dim = net.dim();
    let mut p = Vec::with_capacity(test.len());
    let mut rows = vec![0f32; CATEGORICAL * dim * 1024];
    let mut scratch = Scratch::default();
    let mut z = Vec::new();
    for chunk in test.chunks(1024) {
        let k: Vec<u64> = chunk.iter().flat_map(keys).collect();
        let r = &mut rows[..k.len() * dim];
        emb.pull(&k, r, None)?;
        let dense: Vec<[f32; DENSE]> = chunk.iter().map(dense_inputs).collect();
        z.resize(chunk.len(), 0.0);
        net.logits(&params, r, &dense, &mut scratch, &mut z);
        p.extend(z.iter().map(|&z| sigmoid(z) as f64));
    }
    let labels: Vec<bool> = test.iter().map(|s| s.label).collect();
    Ok((auc(&p, &labels).unwrap_or(f64::NAN), logloss(&p, &labels)))
}
