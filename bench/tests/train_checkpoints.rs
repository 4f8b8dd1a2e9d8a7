//! Checkpoints during training (`hetkv-bench train --checkpoint-every`): the barrier makes each a
//! consistent cut, and a run resumed from one ends with exactly the rows of a run never stopped.

use std::path::Path;
use std::process::Command;

use hetkv_bench::train::{self, ModelKind, TrainArgs, TrainOptimizer};
use hetkv_client::Bound;
use hetkv_fallback_tcp::ServerConfig;
use hetkv_store::{EmbeddedCluster, ShardConfig};

mod common;
use common::{assert_same_rows, rows};

/// Two shards, each with a data directory under `dir` (restoring what is there).
fn cluster_on(dir: &Path) -> EmbeddedCluster {
    EmbeddedCluster::start_with(2, ServerConfig::default(), |i| ShardConfig {
        data_dir: Some(dir.join(format!("s{i}"))),
        ..ShardConfig::new(i, 2)
    })
    .unwrap()
}

fn settings(servers: &[String]) -> TrainArgs {
    TrainArgs {
        workers: 1,
        cache: 0.0,
        pull_bound: Bound::updates(0),
        push_bound: Bound::updates(0),
        train: 40_000,
        test: 2_000,
        batch: 128,
        scale: 0.001,
        seed: 5,
        lr: 0.01,
        optimizer: TrainOptimizer::Adam,
        servers: servers.to_vec(),
        ..TrainArgs::defaults(ModelKind::Deepfm)
    }
}

#[test]
fn a_run_stopped_at_a_checkpoint_and_resumed_from_it_ends_with_the_rows_of_one_never_stopped() {
    // Uninterrupted.
    let whole = EmbeddedCluster::start(2).unwrap();
    let r = train::run(&settings(whole.addrs())).unwrap();
    let total = r.batches_trained[0];
    let want = rows(whole.addrs());
    drop(whole);

    // Stopped after its first checkpoint, then the shards restart from it and the run resumes.
    let dir = tempfile::tempdir().unwrap();
    let first = cluster_on(dir.path());
    let stopped = train::run(&TrainArgs {
        checkpoint_every: Some(0.05),
        stop_after_checkpoints: Some(1),
        ..settings(first.addrs())
    })
    .unwrap();
    assert_eq!(stopped.checkpoints.len(), 1, "{:?}", stopped.checkpoints);
    let at = stopped.checkpoints[0].batches_done.clone();
    assert_eq!(
        stopped.batches_trained, at,
        "the run stopped at the barrier"
    );
    assert!(
        at[0] > 0 && at[0] < total,
        "stopped after {at:?} of {total} batches: the test needs a checkpoint inside the run"
    );
    first.shutdown();
    let second = cluster_on(dir.path());
    let resumed = train::run(&TrainArgs {
        resume_batches: at.clone(),
        ..settings(second.addrs())
    })
    .unwrap();
    assert_eq!(resumed.batches_trained[0], total - at[0]);
    let got = rows(second.addrs());
    assert_same_rows(&want, &got, &format!("after resuming from batch {at:?}"));
}

#[test]
fn worker_processes_with_caches_stop_at_a_checkpoint_that_holds_everything_they_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let live = cluster_on(dir.path());
    let servers = live.addrs().join(",");
    let json = dir.path().join("train.json");
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv-bench"))
        .args([
            "train",
            "--model",
            "fm",
            "--workers",
            "3",
            "--train",
            "200000",
        ])
        .args(["--test", "2000", "--scale", "0.001", "--servers", &servers])
        .args([
            "--processes",
            "--checkpoint-every",
            "0.3",
            "--incremental-checkpoints",
        ])
        .args(["--stop-after-checkpoints", "2", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let ck = r["checkpoints"].as_array().unwrap();
    assert_eq!(ck.len(), 2, "{ck:?}");
    assert_eq!(ck[1]["name"], "train-2");
    assert_eq!(r["batches_trained"], ck[1]["batches_done"]);
    // The workers flushed and stopped at the barrier: what the shards hold now is the
    // checkpoint, which a restart restores.
    let now = rows(live.addrs());
    live.shutdown();
    let restored = cluster_on(dir.path());
    assert_eq!(rows(restored.addrs()), now);
    // Every lookup's updates reached the shards: one update per (sample, field) key, summed.
    let samples: u64 = ck[1]["batches_done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() * 256)
        .sum();
    let emb_updates: u64 = now[0].1.iter().sum();
    assert!(
        emb_updates > 0 && emb_updates <= samples * 26,
        "{emb_updates} of {samples} samples"
    );
}
