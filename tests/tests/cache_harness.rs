//! The cache driven without sockets: `CachedTable` (the sans-IO core and its thin driver) over
//! shards simulated in memory (`hetkv_tests::sim`). The model of `hetkv_tests::model` checks the
//! read bound, the write bound, read-your-writes and "flush equals sequential SGD" for every policy
//! and bound over several seeds, and the runs must have taken both paths of check elision: checks a
//! shard's table clock vouched for, and checks re-sent because a claim did not hold.

use std::sync::Arc;
use std::time::Instant;

use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind, Table, UpdateRuleKind};
use hetkv_tests::model::{self, History};
use hetkv_tests::sim::{RowAt, SimShard};
use hetkv_transport::{OptimizerSpec, ShardTransport};

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
    sim_shards_with(name, OptimizerSpec::Sgd { lr: 1.0 })
}

fn sim_shards_with(name: &str, optimizer: OptimizerSpec) -> Vec<Arc<SimShard>> {
    let spec = model::spec_with(name, optimizer);
    (0..SHARDS)
        .map(|i| Arc::new(SimShard::new(&spec, i, SHARDS)))
        .collect()
}

/// Every version of every row the simulated shards held.
struct Versions<'a>(&'a [Arc<SimShard>]);

impl History for Versions<'_> {
    fn row_at(&self, key: u64, version: u64) -> Option<RowAt> {
        let routing = model::spec("history").routing(SHARDS);
        self.0[routing.shard_of(key)].history(key, version)
    }
}

/// One model run over fresh simulated shards of `optimizer`, lines checked against their
/// history.
fn run_in_memory(
    name: &str,
    optimizer: OptimizerSpec,
    policy: PolicyKind,
    bound: Bound,
    seed: u64,
    options: model::Options,
) -> (model::Outcome, Vec<Arc<SimShard>>) {
    let shards = sim_shards_with(name, optimizer);
    let truth = cluster(&shards).open_table(name).unwrap();
    let mut connect = || cluster(&shards).open_table(name).unwrap();
    let history = Versions(&shards);
    let o = model::run_with(
        &truth,
        &mut connect,
        policy,
        bound,
        seed,
        options,
        None,
        Some(&history),
    );
    (o, shards)
}

#[test]
fn bounds_hold_in_memory_for_every_policy_bound_and_seed_and_both_elision_paths_run() {
    let (mut skipped, mut retried) = (0, 0);
    for (policy, bound) in model::policies_and_bounds() {
        for seed in [1u64, 2, 3] {
            let started = Instant::now();
            let sgd = OptimizerSpec::Sgd { lr: 1.0 };
            let (o, shards) = run_in_memory("model", sgd, policy, bound, seed, Default::default());
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

/// Every optimizer the shards offer (SGD, Adagrad, row-wise Adagrad, Adam) under every policy
/// and bound: after every operation every line is exactly the shards' row at its version with
/// its pending updates taken by the table's optimizer; at bounds 0 every looked-up row is the
/// shards' row; after a flush the lines it pushed hold the rows their pushes produced; versions
/// keep both bounds. Pushes must have handed rows back (another client's update came between a
/// line's base and its push), and the lines must have taken them.
#[test]
fn every_optimizer_keeps_every_line_exactly_the_shards_row_plus_its_own_updates() {
    for optimizer in model::optimizers() {
        let (mut checked, mut handed_back) = (0, 0);
        for (policy, bound) in model::policies_and_bounds() {
            for seed in [1u64, 2] {
                let (o, shards) =
                    run_in_memory("opt", optimizer, policy, bound, seed, Default::default());
                checked += o.lines_checked;
                handed_back += o.rows_handed_back;
                let sent_back: u64 = shards
                    .iter()
                    .map(|s| s.handed_back.load(std::sync::atomic::Ordering::Relaxed))
                    .sum();
                assert!(
                    o.rows_handed_back <= sent_back,
                    "{optimizer:?} {policy} {bound}: took {} rows, {sent_back} handed back",
                    o.rows_handed_back
                );
            }
        }
        let name = optimizer.name();
        assert!(checked > 20_000, "{name}: {checked} lines checked");
        assert!(handed_back > 100, "{name}: {handed_back} rows handed back");
    }
}

/// The same under the share-weighted update rule, which weighs pushes: every line is still the
/// shards' row at its version plus its own updates, and the versions keep both bounds.
#[test]
fn a_rule_that_weighs_pushes_keeps_the_lines_exact_and_the_bounds() {
    for optimizer in [OptimizerSpec::Sgd { lr: 1.0 }, model::optimizers()[1]] {
        for (policy, bound) in model::policies_and_bounds() {
            let options = model::Options {
                rule: UpdateRuleKind::ShareWeighted,
                ..Default::default()
            };
            let (o, _) = run_in_memory("rule", optimizer, policy, bound, 3, options);
            assert!(o.lines_checked > 500, "{} lines checked", o.lines_checked);
        }
    }
}

/// The same model with prefetching, under every optimizer: rows taken from a prefetch keep the
/// read bound against the server as it was when the prefetch was made, read-your-writes holds
/// with updates made while it was in flight, no update is lost or applied twice (the final flush
/// equals sequential SGD), and every line is exact whenever no prefetch is in flight. Prefetches
/// must have been both used and landed unused.
#[test]
fn prefetched_rows_keep_their_bounds_in_memory_for_every_policy_bound_and_seed() {
    let (mut used, mut unused) = (0, 0);
    for optimizer in model::optimizers() {
        for (policy, bound) in model::policies_and_bounds() {
            for seed in [1u64, 2] {
                let options = model::Options {
                    prefetch: true,
                    ..Default::default()
                };
                let (o, _) = run_in_memory("prefetch", optimizer, policy, bound, seed, options);
                used += o.prefetched;
                unused += o.prefetches_unused;
            }
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
    for optimizer in [OptimizerSpec::Sgd { lr: 1.0 }, model::optimizers()[3]] {
        for prefetch in [false, true] {
            for (policy, bound) in model::policies_and_bounds() {
                for seed in [4u64, 5] {
                    let options = model::Options {
                        prefetch,
                        rebound: true,
                        ..Default::default()
                    };
                    run_in_memory("rebound", optimizer, policy, bound, seed, options);
                }
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
        let history = Versions(&shards);
        failed += model::run_with(
            &truth,
            &mut connect,
            policy,
            bound,
            8,
            options,
            None,
            Some(&history),
        )
        .failed_lookups;
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

/// A restart inside one call, where a one-sided reader meets it (its push goes to the daemon, its
/// read to memory): the daemon restarted before the push arrived and the read saw the dead one's
/// frozen memory, or it restarted between the push and the read, or the call was answered by the
/// new daemon and a later read (with no push to reveal anything) by the dead one's memory, of an
/// incarnation the cache saw replaced. Afterwards foreign updates land on the restored shard, and
/// every lookup's rows must stay within the read bound of it, and never ahead of it by more than
/// the cache's own unpushed updates. A cache that took the frozen memory's clock (far ahead of
/// the restored shard's) would let that clock vouch for checks it left out, and serve rows
/// lagging without limit; one that took the frozen rows would serve rows ahead of the shard.
#[test]
fn a_restart_inside_a_call_never_leaves_the_cache_trusting_another_incarnation() {
    use hetkv_tests::sim::InsideCall;
    let bound = Bound::updates(2);
    let dim = model::DIM;
    for (case, policy) in [
        (1, PolicyKind::Lru),
        (0, PolicyKind::Lru),
        (0, PolicyKind::Lfu),
        (2, PolicyKind::Lru),
        (2, PolicyKind::Lfu),
    ] {
        let shards = sim_shards("inside");
        let writer = cluster(&shards).open_table("inside").unwrap();
        // Room for 8 lines: a lookup of 8 other keys evicts them all.
        let config = CacheConfig::new(Capacity::Rows(8), policy, bound);
        let mut cache = cluster(&shards)
            .open_table("inside")
            .unwrap()
            .cached(config);
        // The state the shard is restored to: nothing applied.
        let snapshot = shards[0].snapshot();
        // Shard 0's keys, and 8 more of it.
        let keys: Vec<u64> = (0..8).map(|i| i * SHARDS as u64).collect();
        let others: Vec<u64> = (8..16).map(|i| i * SHARDS as u64).collect();
        let ones = |n: usize| vec![1f32; n * dim];
        let mut out = vec![0f32; keys.len() * dim];
        let mut clocks = vec![0u64; keys.len()];
        // Foreign updates take shard 0's clock to 800, far past what the restored shard reaches.
        for _ in 0..100 {
            writer.push(&keys, &[1; 8], &ones(8)).unwrap();
        }
        // Lines holding one unpushed update each (within the push bound): evicting them pushes
        // them, carried by the lookup that evicts them.
        cache.lookup(&others, &mut out).unwrap();
        cache.update(&others, &ones(8)).unwrap();
        let fault = match case {
            0 => InsideCall::RestartBeforePushReadFrozen(snapshot),
            1 => InsideCall::RestartBetweenPushAndRead(snapshot),
            _ => InsideCall::RestartThenReadFrozenLater(snapshot),
        };
        shards[0].restart_inside_next_push(fault);
        // The lookup the fault strikes may fail (its rows were of no incarnation it could take);
        // the next one must not.
        if cache.lookup(&keys, &mut out).is_err() {
            cache.lookup(&keys, &mut out).unwrap();
        }
        assert!(
            !shards[0].inside_call_armed(),
            "case {case}: the fault never struck"
        );
        // On the restored shard: three foreign updates per round to every key, more than the
        // bound each time, and the lookups in between must see them.
        let mut versions = vec![0u64; keys.len()];
        let mut rows = vec![0f32; keys.len() * dim];
        for round in 0..20 {
            writer.push(&keys, &[3; 8], &ones(8)).unwrap();
            cache
                .lookup_with_clocks(&keys, &mut out, &mut clocks)
                .unwrap_or_else(|e| panic!("case {case} {policy}, round {round}: {e}"));
            writer.pull(&keys, &mut rows, Some(&mut versions)).unwrap();
            for (i, &k) in keys.iter().enumerate() {
                assert!(
                    clocks[i] <= versions[i] + bound.get(),
                    "case {case} {policy}, round {round}: key {k} is ahead of the restored shard \
                     (its version {}, the line's clock {}): a dead incarnation's row",
                    versions[i],
                    clocks[i]
                );
                let lag = versions[i].saturating_sub(clocks[i]);
                assert!(
                    lag <= bound.get(),
                    "case {case} {policy}, round {round}: key {k} lags the restored shard by \
                     {lag} updates (its version {}, the line's clock {})",
                    versions[i],
                    clocks[i]
                );
            }
        }
    }
}
