//! The cache driven without sockets: `CachedTable` (the sans-IO core and its thin driver) over
//! shards simulated in memory (`hetkv_tests::sim`). The model of `hetkv_tests::model` checks the
//! read bound, the write bound, read-your-writes and "flush equals sequential SGD" for every policy
//! and bound over several seeds, and the runs must have taken both paths of check elision: checks a
//! shard's table clock vouched for, and checks re-sent because a claim did not hold.

use std::sync::Arc;
use std::time::Instant;

use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind, Table};
use hetkv_tests::{model, sim::SimShard};
use hetkv_transport::ShardTransport;

const SHARDS: u32 = 3;

fn cluster(shards: &[Arc<SimShard>]) -> Cluster {
    Cluster::from_transports(
        shards
            .iter()
            .map(|s| s.clone() as Arc<dyn ShardTransport>)
            .collect(),
    )
    .unwrap()
}

fn sim_shards(name: &str) -> Vec<Arc<SimShard>> {
    let spec = model::spec(name);
    (0..SHARDS)
        .map(|i| Arc::new(SimShard::new(&spec, i, SHARDS)))
        .collect()
}

#[test]
fn bounds_hold_in_memory_for_every_policy_bound_and_seed_and_both_elision_paths_run() {
    let (mut skipped, mut retried) = (0, 0);
    for (policy, bound) in model::policies_and_bounds() {
        for seed in [1u64, 2, 3] {
            let started = Instant::now();
            let shards = sim_shards("model");
            let truth = cluster(&shards).open_table("model").unwrap();
            let mut connect = || cluster(&shards).open_table("model").unwrap();
            let o = model::run(&truth, &mut connect, policy, bound, seed, false);
            skipped += o.checks_skipped;
            retried += o.clock_retries;
            let claims_failed: u64 = shards
                .iter()
                .map(|s| s.claims_failed.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            assert_eq!(
                o.clock_retries, claims_failed,
                "{policy} {bound} seed {seed}: every failed claim, and only those, re-sent its checks"
            );
            eprintln!(
                "{policy} bound {bound} seed {seed}: {:?} in {:?}",
                o,
                started.elapsed()
            );
        }
    }
    assert!(skipped > 0, "no check was ever left to the table clock");
    assert!(
        retried > 0,
        "no claim ever failed, so the re-sent path never ran"
    );
}

/// The same model with prefetching: rows taken from a prefetch keep the read bound against the
/// server as it was when the prefetch was made, read-your-writes holds with updates made while
/// it was in flight, and no update is lost or applied twice (the final flush equals sequential
/// SGD). Prefetches must have been both used and landed unused.
#[test]
fn prefetched_rows_keep_their_bounds_in_memory_for_every_policy_bound_and_seed() {
    let (mut used, mut unused) = (0, 0);
    for (policy, bound) in model::policies_and_bounds() {
        for seed in [1u64, 2, 3] {
            let shards = sim_shards("prefetch");
            let truth = cluster(&shards).open_table("prefetch").unwrap();
            let mut connect = || cluster(&shards).open_table("prefetch").unwrap();
            let options = model::Options {
                prefetch: true,
                ..Default::default()
            };
            let o = model::run_with(&truth, &mut connect, policy, bound, seed, options, None);
            used += o.prefetched;
            unused += o.prefetches_unused;
        }
    }
    assert!(used > 200, "only {used} lookups were served by a prefetch");
    assert!(unused > 50, "only {unused} prefetches landed unused");
}

/// The same model with bounds changed between operations, up and down (`set_bounds`, as a
/// trainer's warm-up at bounds 0 does once), with and without prefetching: every claim holds
/// against the bounds in force, and a lowered write bound holds as soon as the call returns.
#[test]
fn bounds_changed_during_a_run_hold_from_the_change_on() {
    for prefetch in [false, true] {
        for (policy, bound) in model::policies_and_bounds() {
            for seed in [4u64, 5] {
                let shards = sim_shards("rebound");
                let truth = cluster(&shards).open_table("rebound").unwrap();
                let mut connect = || cluster(&shards).open_table("rebound").unwrap();
                let options = model::Options {
                    prefetch,
                    rebound: true,
                    ..Default::default()
                };
                model::run_with(&truth, &mut connect, policy, bound, seed, options, None);
            }
        }
    }
}

/// Prefetches whose reads fail after the pushes they carried were applied: the lookups that land
/// them fail, the updates made meanwhile are applied all the same, and nothing is pushed twice.
#[test]
fn a_prefetch_whose_read_fails_after_its_push_loses_and_repeats_nothing() {
    let mut failed = 0;
    for (policy, bound) in model::policies_and_bounds() {
        let shards = sim_shards("prefetch_faults");
        for s in &shards {
            s.fail_read_after_push_every(3);
        }
        let truth = cluster(&shards).open_table("prefetch_faults").unwrap();
        let mut connect = || cluster(&shards).open_table("prefetch_faults").unwrap();
        let options = model::Options {
            faults: true,
            prefetch: true,
            ..Default::default()
        };
        failed +=
            model::run_with(&truth, &mut connect, policy, bound, 8, options, None).failed_lookups;
    }
    assert!(failed > 10, "the faults must have been injected ({failed})");
}

/// A read that fails after the push it carried was applied (as a one-sided backend's may) must
/// not make the cache push those rows again: after the flush, every version equals the updates
/// issued, exactly, and the values equal sequential SGD.
#[test]
fn a_read_that_fails_after_its_push_was_applied_does_not_apply_the_push_twice() {
    let mut failed = 0;
    for (policy, bound) in model::policies_and_bounds() {
        let shards = sim_shards("faults");
        for s in &shards {
            s.fail_read_after_push_every(3);
        }
        let truth = cluster(&shards).open_table("faults").unwrap();
        let mut connect = || cluster(&shards).open_table("faults").unwrap();
        let o = model::run(&truth, &mut connect, policy, bound, 7, true);
        failed += o.failed_lookups;
        let injected: u64 = shards
            .iter()
            .map(|s| s.failed_reads.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        // A lookup fails once however many of its shards' reads failed. (With a push bound of 0
        // no evicted line is dirty, so no lookup carries a push to fail after.)
        assert!(
            o.failed_lookups <= injected && (o.failed_lookups == 0) == (injected == 0),
            "{policy} {bound}: {} lookups failed, {injected} reads were failed",
            o.failed_lookups
        );
    }
    assert!(failed > 10, "the faults must have been injected ({failed})");
}

/// Flush after updates through a small cache: the version of each key equals the updates sent,
/// with a failure injected after every push-carrying lookup.
#[test]
fn versions_equal_updates_sent_when_every_carried_read_fails() {
    let shards = sim_shards("t");
    for s in &shards {
        s.fail_read_after_push_every(1);
    }
    let table: Table = cluster(&shards).open_table("t").unwrap();
    let mut cache = table.cached(CacheConfig::new(
        Capacity::Rows(4),
        PolicyKind::Lru,
        Bound::INFINITE,
    ));
    let mut sent = vec![0u64; model::ROWS as usize];
    let mut out = vec![0f32; 3 * model::DIM];
    let mut failures = 0;
    for i in 0..200u64 {
        let keys = [i % 48, (i * 7) % 48, (i * 13 + 5) % 48];
        if cache.lookup(&keys, &mut out).is_err() {
            failures += 1;
        }
        cache.update(&keys, &[0.5; 3 * model::DIM]).unwrap();
        for k in keys {
            sent[k as usize] += 1;
        }
    }
    cache.flush().unwrap();
    assert!(
        failures > 50,
        "lookups carrying evicted rows failed ({failures})"
    );
    let keys: Vec<u64> = (0..model::ROWS).collect();
    let mut versions = vec![0; keys.len()];
    let mut rows = vec![0f32; keys.len() * model::DIM];
    table.pull(&keys, &mut rows, Some(&mut versions)).unwrap();
    assert_eq!(
        versions, sent,
        "every row's version equals the updates sent"
    );
}

/// Shards restarted from earlier snapshots (as from checkpoints) between operations: the caches
/// notice the new incarnation on the shard's next answer, read their lines of that shard again,
/// keep their unpushed updates, and every claim of the model holds against the restored state.
/// (With an infinite read bound a hit never asks its shard, so restarts are tested with finite
/// bounds.) Without the re-reading, the model finds rows ahead of the restored server.
#[test]
fn caches_follow_shards_restarted_from_earlier_states() {
    let mut noticed = 0;
    let mut went_back = 0;
    for (policy, bound) in model::policies_and_bounds() {
        if bound.is_infinite() {
            continue;
        }
        for seed in [4u64, 5] {
            let shards = sim_shards("restarts");
            let truth = cluster(&shards).open_table("restarts").unwrap();
            let mut connect = || cluster(&shards).open_table("restarts").unwrap();
            let mut snapshots: Vec<_> = shards.iter().map(|s| s.snapshot()).collect();
            let mut restart = |rng: &mut hetkv_tests::TestRng| {
                let s = rng.below(SHARDS as u64) as usize;
                match rng.below(30) {
                    0..=1 => {
                        snapshots[s] = shards[s].snapshot();
                        false
                    }
                    2 => {
                        shards[s].restart_from(&snapshots[s]);
                        true
                    }
                    _ => false,
                }
            };
            let o = model::run_with_restarts(
                &truth,
                &mut connect,
                policy,
                bound,
                seed,
                false,
                Some(&mut restart),
            );
            assert!(o.restarts > 0, "{policy} {bound} seed {seed}: no restart");
            noticed += o.restarts_noticed;
            went_back += o.rows_went_back;
        }
    }
    assert!(noticed > 20, "caches noticed {noticed} restarts");
    assert!(went_back > 0, "no cached line ever saw its row go back");
}
