//! A daemon SIGKILLed in the middle of a training run and restarted from its last checkpoint:
//! the worker's calls wait (within their deadline) and go on against the new incarnation, its
//! cache notices the restart and reads its lines of that shard again, the report says what went
//! back, and the run ends with the test AUC of a run never interrupted.

#[path = "../../store/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use hetkv_bench::train::{self, ModelKind, TrainArgs};
use hetkv_client::Bound;
use hetkv_store::checkpoint::CheckpointDir;
use hetkv_store::EmbeddedCluster;

use common::Daemon;

fn settings(servers: &[String]) -> TrainArgs {
    TrainArgs {
        workers: 1,
        cache: 0.1,
        pull_bound: Bound::updates(10),
        push_bound: Bound::updates(10),
        train: 120_000,
        test: 20_000,
        batch: 128,
        scale: 0.001,
        seed: 11,
        servers: servers.to_vec(),
        ..TrainArgs::defaults(ModelKind::Deepfm)
    }
}

fn daemon(addr: &str, shard: u32, dir: &Path) -> Daemon {
    let data = dir.join(format!("s{shard}"));
    Daemon::start(common::serve_on(
        addr,
        &[
            "--shard",
            &shard.to_string(),
            "--shards",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    ))
}

#[test]
fn a_daemon_killed_mid_run_and_restarted_from_its_checkpoint_costs_the_run_no_accuracy() {
    let whole = EmbeddedCluster::start(2).unwrap();
    let uninterrupted = train::run(&settings(whole.addrs())).unwrap();
    drop(whole);

    let dir = tempfile::tempdir().unwrap();
    let mut daemons: Vec<Daemon> = (0..2)
        .map(|i| daemon("127.0.0.1:0", i, dir.path()))
        .collect();
    let addrs: Vec<String> = daemons.iter().map(|d| d.addr.clone()).collect();
    let run = {
        let args = TrainArgs {
            checkpoint_every: Some(0.3),
            ..settings(&addrs)
        };
        std::thread::spawn(move || train::run(&args))
    };

    // Once shard 0 has committed a checkpoint and the run has gone on past it, kill it.
    let checkpoints = CheckpointDir::at(&dir.path().join("s0"));
    let started = Instant::now();
    while checkpoints.newest().ok().flatten().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint committed"
        );
        assert!(
            !run.is_finished(),
            "the run ended before its first checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        !run.is_finished(),
        "the run must still be training at the kill"
    );
    let restored = checkpoints.newest().unwrap().unwrap().name;
    drop(daemons.remove(0)); // SIGKILL, then reaped
    std::thread::sleep(Duration::from_millis(300));
    let back = daemon(&addrs[0], 0, dir.path());
    assert!(
        back.startup.iter().any(|l| l.contains("restored")),
        "the daemon restarted from a checkpoint: {:#?}",
        back.startup
    );
    daemons.insert(0, back);

    let report = run.join().unwrap().unwrap();
    eprintln!(
        "restored {restored}; restarts {:?}; cache: {} restarts noticed, {} lines read again, \
         {} went back, {} unpushed updates kept; failed checkpoints {:?}; AUC {:.4} vs {:.4} \
         uninterrupted",
        report.restarts,
        report.cache.restarts,
        report.cache.lines_revalidated,
        report.cache.rows_went_back,
        report.cache.updates_kept,
        report.failed_checkpoints,
        report.auc,
        uninterrupted.auc
    );
    assert!(
        report.restarts.seen >= 1,
        "the worker's connections saw the restart"
    );
    assert!(
        report.restarts.pushes_rolled_back > 0,
        "pushes acknowledged after the checkpoint are reported as rolled back"
    );
    assert!(report.cache.restarts >= 1, "the cache noticed the restart");
    assert!(report.cache.lines_revalidated > 0);
    assert_eq!(
        report.batches_trained, uninterrupted.batches_trained,
        "the worker trained every batch"
    );
    assert!(
        (report.auc - uninterrupted.auc).abs() <= 0.002,
        "AUC {:.4} after the restart against {:.4} uninterrupted",
        report.auc,
        uninterrupted.auc
    );
}
