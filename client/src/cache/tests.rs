//! Unit tests of the core's lines: optimizer steps, commits, rules and bounds.

use super::core::*;
use super::rule::UpdateRuleKind;
use super::{Bound, CacheConfig};
use crate::cache::batch::Replies;
use crate::cache::{Capacity, PolicyKind};
use hetkv_transport::TableSpec;
use hetkv_transport::{Initializer, OptimizerSpec};

fn table(optimizer: OptimizerSpec, rows: u64, dim: u32) -> TableSpec {
    TableSpec {
        name: "t".into(),
        rows,
        dim,
        init: Initializer::Zeros,
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

fn core_of(spec: &TableSpec, capacity: Capacity, pull: Bound, push: Bound) -> CacheCore {
    let mut config = CacheConfig::new(capacity, PolicyKind::Lru, pull);
    config.push_bound = push;
    CacheCore::new(spec, &config, 1)
}

/// Looks `keys` up, the shard answering every request with `version`, rows of `value` and
/// optimizer state `state` (one row's worth).
fn look_up(core: &mut CacheCore, keys: &[u64], version: u64, value: f32, state: &[f32]) {
    core.plan_lookup(keys, false).unwrap();
    let asked = core.batch.req_keys.len();
    let replies = Replies {
        requests: (0..asked as u32).collect(),
        versions: vec![version; asked],
        rows: vec![value; asked * core.dim],
        state_at: (0..asked as u32).collect(),
        states: hetkv_transport::RowStates {
            values: state.repeat(asked),
            steps: vec![0; asked],
        },
        births: Vec::new(),
    };
    let mut out = vec![0f32; keys.len() * core.dim];
    core.finish_lookup(&replies, &mut out, None).unwrap();
}

#[test]
fn an_adagrad_line_takes_adagrad_steps_and_commits_to_the_shard_s_row() {
    let spec = OptimizerSpec::Adagrad {
        lr: 1.0,
        eps: 0.0,
        initial_accumulator: 0.0,
    };
    let mut core = core_of(
        &table(spec, 4, 1),
        Capacity::Rows(4),
        Bound::INFINITE,
        Bound::updates(1),
    );
    // The shard's row 1 is 1.0 at version 5 with an accumulator of 3.
    look_up(&mut core, &[1], 5, 1.0, &[3.0]);
    core.update(&[1], &[1.0]).unwrap();
    // One pending update: the line shows Adagrad's step (acc 3 + 1 = 4: 1 - 1/2), not SGD's.
    assert_eq!(core.peek(1).unwrap().value, [0.5]);
    assert!(core.queue.take().is_empty(), "within the push bound");
    core.update(&[1], &[1.0]).unwrap();
    // Two: one step with the sum 2 (acc 3 + 4 = 7), pushed with its base version, and the
    // line committed to what the shard computes from it.
    let pushed = core.queue.take();
    assert_eq!(
        (pushed.keys, pushed.counts, pushed.bases, pushed.grads),
        (vec![1], vec![2], vec![5], vec![2.0])
    );
    let want = 1.0 - 2.0 / 7f32.sqrt();
    let line = core.peek(1).unwrap();
    assert_eq!(
        (line.value, line.version, line.unpushed),
        (vec![want], 7, 0)
    );
    let slot = core.lines.slot_of(1).unwrap();
    assert_eq!(core.lines.parts_mut(slot).state, [7.0]);
}

#[test]
fn a_scaled_push_commits_the_line_to_what_the_shard_will_produce() {
    let mut core = core_of(
        &table(OptimizerSpec::Sgd { lr: 0.5 }, 4, 2),
        Capacity::Fraction(1.0),
        Bound::STRICT,
        Bound::updates(1),
    );
    core.set_update_rule(UpdateRuleKind::PushScaled { factor: 0.25 }.build());
    look_up(&mut core, &[1], 0, 1.0, &[]);
    core.update(&[1], &[4.0, 8.0]).unwrap();
    // The local copy takes the update whole.
    assert_eq!(core.peek(1).unwrap().value, [-1.0, -3.0]);
    core.update(&[1], &[4.0, 8.0]).unwrap();
    let pushed = core.queue.take();
    assert_eq!(pushed.counts, [2]);
    assert_eq!(pushed.grads, [2.0, 4.0], "the sum (8, 16) times 0.25");
    // After the push the line is what the shard makes of it: 1 - 0.5 x (2, 4).
    assert_eq!(core.peek(1).unwrap().value, [0.0, -1.0]);
    // A key without a line is written through, scaled too.
    let mut none = core_of(
        &table(OptimizerSpec::Sgd { lr: 0.5 }, 4, 2),
        Capacity::Disabled,
        Bound::STRICT,
        Bound::STRICT,
    );
    none.set_update_rule(UpdateRuleKind::PushScaled { factor: 0.25 }.build());
    none.update(&[2], &[4.0, 8.0]).unwrap();
    assert_eq!(none.queue.take().grads, [1.0, 2.0]);
}

#[test]
fn lowering_the_write_bound_pushes_the_lines_above_it() {
    let mut core = core_of(
        &table(OptimizerSpec::Sgd { lr: 0.5 }, 4, 1),
        Capacity::Fraction(1.0),
        Bound::STRICT,
        Bound::updates(3),
    );
    look_up(&mut core, &[1], 0, 0.0, &[]);
    for _ in 0..3 {
        core.update(&[1], &[1.0]).unwrap();
    }
    assert!(core.queue.take().is_empty());
    core.set_bounds(Bound::STRICT, Bound::updates(1));
    assert_eq!(core.bounds(), (Bound::STRICT, Bound::updates(1)));
    assert_eq!(core.queue.take().counts, [3], "the line held 3 > 1");
    assert_eq!(core.unpushed(1), 0);
    // A line within the new bound stays.
    core.update(&[1], &[1.0]).unwrap();
    core.set_bounds(Bound::STRICT, Bound::updates(1));
    assert!(core.queue.take().is_empty());
    assert_eq!(core.unpushed(1), 1);
}

#[test]
fn the_update_of_the_keys_a_lookup_placed_equals_one_that_resolves_them_again() {
    // Keys 1, 2, 3, 5 are admitted into the four lines; 7 and 9 are not (LRU evicts only
    // lines this lookup did not reserve), so the update touches lines and writes through.
    let keys = [1, 2, 1, 3, 5, 7, 9, 2, 3];
    let unique = [1u64, 2, 3, 5, 7, 9];
    let grads: Vec<f32> = (0..unique.len() * 2)
        .map(|i| 0.25 * i as f32 + 1.0)
        .collect();
    let mut outcomes = Vec::new();
    for resolve_again in [false, true] {
        let spec = table(OptimizerSpec::Sgd { lr: 0.5 }, 16, 2);
        let mut core = core_of(&spec, Capacity::Rows(4), Bound::INFINITE, Bound::updates(1));
        look_up(&mut core, &keys, 7, 1.0, &[]);
        if resolve_again {
            // Any other call in between: the update's keys are resolved anew.
            core.update(&[], &[]).unwrap();
        }
        let mut rounds = Vec::new();
        for _ in 0..3 {
            core.update(&unique, &grads).unwrap();
            let pushes = core.queue.take();
            let lines: Vec<_> = unique.iter().map(|&k| core.peek(k)).collect();
            rounds.push((pushes, lines));
        }
        outcomes.push(rounds);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    let (first, lines) = &outcomes[0][0];
    assert_eq!(
        first.keys,
        [7, 9],
        "the keys not admitted are written through"
    );
    let unpushed: Vec<u32> = lines
        .iter()
        .map(|l| l.as_ref().map_or(0, |l| l.unpushed))
        .collect();
    assert_eq!(unpushed, [1, 1, 1, 1, 0, 0], "one unpushed update per line");
}

#[test]
fn every_nan_and_infinity_is_refused_wherever_it_is() {
    let spec = table(OptimizerSpec::Sgd { lr: 0.5 }, 64, 5);
    let core = core_of(&spec, Capacity::Rows(4), Bound::STRICT, Bound::STRICT);
    let keys: Vec<u64> = (0..40).collect();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
        for at in [0, 7, 8, 99, 199] {
            let mut grads = vec![1.0f32; 200];
            grads[at] = bad;
            match core.check_update(&keys, &grads) {
                Err(CacheError::NonFinite { key, value }) => {
                    assert_eq!(key, at as u64 / 5, "{bad} at {at}");
                    assert_eq!(value.to_bits(), bad.to_bits(), "{bad} at {at}");
                }
                other => panic!("{bad} at {at}: {other:?}"),
            }
        }
    }
    // The largest finite values, the smallest subnormals and zeros of both signs pass.
    let fine = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45, 0.0, -0.0, 1.0];
    let grads: Vec<f32> = (0..200).map(|i| fine[i % fine.len()]).collect();
    assert!(core.check_update(&keys, &grads).is_ok());
}
