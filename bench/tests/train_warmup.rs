//! Training with `--warmup-batches`: each worker's embedding cache starts at bounds 0 and takes
//! the run's bounds after its first N batches. With one worker the result is deterministic, so a
//! warm-up as long as the run must end with exactly the rows of a run at bounds 0, and a short one
//! must push far fewer rows than bounds 0 do, as the run's bound of 100 lets it.

use hetkv_bench::train::{self, ModelKind, TrainArgs};
use hetkv_client::Bound;

mod common;
use common::{assert_same_rows, train_fresh, Rows};

fn run(bound: u64, warmup_batches: usize) -> (train::TrainReport, Vec<Rows>) {
    train_fresh(TrainArgs {
        workers: 1,
        cache: 0.1,
        pull_bound: Bound::updates(bound),
        push_bound: Bound::updates(bound),
        warmup_batches,
        train: 20_000,
        test: 1_000,
        batch: 128,
        scale: 0.001,
        seed: 11,
        prefetch: true,
        ..TrainArgs::defaults(ModelKind::Deepfm)
    })
}

#[test]
fn a_warm_up_runs_at_bounds_0_and_then_lets_the_run_s_bounds_in() {
    let (strict, want) = run(0, 0);
    let batches = strict.batches_trained[0];
    let (whole, got) = run(100, batches + 1);
    assert_same_rows(
        &want,
        &got,
        "after a warm-up over the whole run (bounds 0 throughout)",
    );
    assert_eq!(whole.cache.rows_pushed, strict.cache.rows_pushed);

    let (short, _) = run(100, batches / 10);
    let (stale, _) = run(100, 0);
    assert!(
        short.cache.rows_pushed < strict.cache.rows_pushed / 2,
        "after the warm-up the bound of 100 holds rows back: {} pushed, {} at bounds 0",
        short.cache.rows_pushed,
        strict.cache.rows_pushed
    );
    assert!(
        short.cache.rows_pushed > stale.cache.rows_pushed,
        "the warm-up pushes every update of its batches: {} pushed, {} without it",
        short.cache.rows_pushed,
        stale.cache.rows_pushed
    );
    assert_eq!(
        short.cache.prefetches_unused, 1,
        "the prefetch in flight when the bounds change lands unused"
    );
}
