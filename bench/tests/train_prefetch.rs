//! Training with `--prefetch`: each worker's next batch is looked up while it computes the
//! current one, and its updates are applied when that lookup lands. With one worker there is no
//! foreign update to miss, so the run must apply every update exactly once and end with the rows
//! of the same run without prefetching (up to the rounding of pushes split differently).

use hetkv_bench::train::{self, ModelKind, TrainArgs};
use hetkv_client::Bound;

mod common;
use common::{train_fresh, Rows, TABLES};

fn run(prefetch: bool) -> (train::TrainReport, Vec<Rows>) {
    train_fresh(TrainArgs {
        workers: 1,
        cache: 0.1,
        pull_bound: Bound::updates(100),
        push_bound: Bound::updates(100),
        dense_bound: Bound::updates(10),
        prefetch,
        train: 40_000,
        test: 2_000,
        batch: 128,
        scale: 0.001,
        seed: 9,
        ..TrainArgs::defaults(ModelKind::Deepfm)
    })
}

#[test]
fn one_prefetching_worker_applies_every_update_once_and_ends_where_one_without_does() {
    let (plain, want) = run(false);
    let (fetched, got) = run(true);
    let batches = fetched.batches_trained[0] as u64;
    assert_eq!(plain.cache.prefetched, 0);
    assert_eq!(
        fetched.cache.prefetched,
        batches - 1,
        "every lookup but the first was prefetched"
    );
    assert_eq!(fetched.cache.prefetches_unused, 0);
    assert!(
        fetched.cache.evictions > 100,
        "the cache must evict ({})",
        fetched.cache.evictions
    );
    for ((name, w), g) in TABLES.iter().zip(&want).zip(&got) {
        assert_eq!(w.1, g.1, "{name}: versions (updates applied) differ");
        let worst =
            w.0.iter()
                .zip(&g.0)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
                .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{name}: values differ by {worst} (relative)");
    }
    assert!(
        (plain.logloss - fetched.logloss).abs() < 1e-4,
        "logloss {} without prefetching, {} with",
        plain.logloss,
        fetched.logloss
    );
}
