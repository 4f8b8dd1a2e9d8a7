//! Rows read with their optimizer state and set back (`Table::read_state`, `Table::assign_rows`,
//! op 13 with a state): through real daemons, under every optimizer the shards offer, for fixed
//! and dynamic tables, a cluster that takes another's rows and state trains on exactly as the
//! first goes on training, bit for bit; without the state it does not. Values kept with a state
//! kept or set, and states no step could take, refused with nothing changed.

use hetkv_client::{ClientError, Cluster, RowsWithState, Table, TransportKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_tests::{every_optimizer, RawConn, TestRng};
use hetkv_transport::codec::assign::{Assignment, StateChange};
use hetkv_transport::wire::{AssignRequest, AssignState, ErrorCode, Op};
use hetkv_transport::{
    Admission, DynamicSpec, Eviction, Initializer, Optimizer, OptimizerSpec, TableSpec,
};

const ROWS: u64 = 48;
const DIM: usize = 4;

fn spec(name: &str, optimizer: OptimizerSpec, dynamic: bool) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows: ROWS * if dynamic { 4 } else { 1 },
        dim: DIM as u32,
        init: Initializer::Normal { std: 0.1, seed: 5 },
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: dynamic.then_some(DynamicSpec {
            admission: Admission::Always,
            eviction: Eviction::Lru,
        }),
    }
}

fn connect(cluster: &EmbeddedCluster) -> Cluster {
    Cluster::connect(
        cluster.addrs(),
        TransportKind::Tcp,
        &ClientConfig::default(),
    )
    .unwrap()
}

/// The keys a table's rows are trained under: `0..ROWS`, or for a dynamic table raw ids far
/// apart (0 and `u64::MAX` among them).
fn keys(dynamic: bool) -> Vec<u64> {
    (0..ROWS)
        .map(|k| {
            if dynamic {
                k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_sub(u64::from(k == 1))
            } else {
                k
            }
        })
        .collect()
}

/// `steps` pushes of random gradients to random keys of `keys` (a key repeated in a push is
/// one entry with a count of 1).
fn train(table: &Table, keys: &[u64], rng: &mut TestRng, steps: usize) {
    for _ in 0..steps {
        let mut batch: Vec<u64> = (0..10)
            .map(|_| keys[rng.below(keys.len() as u64) as usize])
            .collect();
        batch.sort_unstable();
        batch.dedup();
        let grads: Vec<f32> = (0..batch.len() * DIM)
            .map(|_| rng.signed_unit() * 0.1)
            .collect();
        table.push(&batch, &vec![1; batch.len()], &grads).unwrap();
    }
}

fn bits(read: &RowsWithState) -> (Vec<u32>, Vec<u32>, Vec<u64>) {
    (
        read.values.iter().map(|v| v.to_bits()).collect(),
        read.state.iter().map(|v| v.to_bits()).collect(),
        read.steps.clone(),
    )
}

#[test]
fn a_cluster_given_another_s_rows_and_state_trains_on_exactly_as_the_first() {
    let a = EmbeddedCluster::start(2).unwrap();
    let b = EmbeddedCluster::start(3).unwrap();
    let fresh = EmbeddedCluster::start(2).unwrap();
    let (ca, cb, cf) = (connect(&a), connect(&b), connect(&fresh));
    for optimizer in every_optimizer() {
        for dynamic in [false, true] {
            let name = format!("{}-{dynamic}", optimizer.name());
            let s = spec(&name, optimizer, dynamic);
            let ks = keys(dynamic);
            let ta = ca.create_table(&s).unwrap();
            train(&ta, &ks, &mut TestRng(1), 30);
            let saved = ta.read_state(&ks).unwrap();
            let shape = Optimizer::new(optimizer).state_shape(DIM);
            assert_eq!(saved.state.len(), ks.len() * shape.len, "{name}");
            assert_eq!(saved.steps.len(), if shape.steps { ks.len() } else { 0 });
            if shape.len > 0 {
                assert!(
                    saved.state.iter().any(|&v| v != 0.0),
                    "{name}: trained state"
                );
            }
            // Another cluster, of another shard count, takes rows and state...
            let tb = cb.create_table(&s).unwrap();
            let restored = Assignment {
                keys: &ks,
                values: Some(&saved.values),
                state: StateChange::Set {
                    values: &saved.state,
                    steps: &saved.steps,
                },
            };
            assert_eq!(tb.assign_rows(&restored).unwrap(), ks.len() as u64);
            assert_eq!(bits(&tb.read_state(&ks).unwrap()), bits(&saved), "{name}");
            // ... and one the rows only (their state started again).
            let tf = cf.create_table(&s).unwrap();
            tf.assign(&ks, &saved.values).unwrap();
            // The same pushes to all three.
            for t in [&ta, &tb, &tf] {
                train(t, &ks, &mut TestRng(2), 20);
            }
            let (went_on, resumed, rows_only) = (
                ta.read_state(&ks).unwrap(),
                tb.read_state(&ks).unwrap(),
                tf.read_state(&ks).unwrap(),
            );
            assert_eq!(
                bits(&resumed),
                bits(&went_on),
                "{name}: resumed with its state"
            );
            if shape.len > 0 {
                assert_ne!(
                    rows_only.values, went_on.values,
                    "{name}: without the state the rows differ (the test can tell)"
                );
            } else {
                assert_eq!(rows_only.values, went_on.values, "{name}: SGD has no state");
            }
        }
    }
}

#[test]
fn values_set_with_the_state_kept_and_a_state_set_with_the_values_kept() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let c = connect(&cluster);
    for dynamic in [false, true] {
        let s = spec(
            &format!("adam-{dynamic}"),
            OptimizerSpec::adam(0.01),
            dynamic,
        );
        let ks = keys(dynamic);
        let t = c.create_table(&s).unwrap();
        train(&t, &ks, &mut TestRng(3), 10);
        let before = t.read_state(&ks).unwrap();
        let values: Vec<f32> = (0..ks.len() * DIM).map(|i| i as f32 * 0.01).collect();
        let keep = Assignment {
            keys: &ks,
            values: Some(&values),
            state: StateChange::Keep,
        };
        t.assign_rows(&keep).unwrap();
        let after = t.read_state(&ks).unwrap();
        assert_eq!(after.values, values);
        assert_eq!((&after.state, &after.steps), (&before.state, &before.steps));
        // Versions grow by one: caches see the change.
        for (a, b) in after.versions.iter().zip(&before.versions) {
            assert_eq!(*a, b + 1);
        }
        let state: Vec<f32> = (0..ks.len() * 2 * DIM).map(|i| (i % 7) as f32).collect();
        let steps: Vec<u64> = (0..ks.len() as u64).collect();
        let set = Assignment {
            keys: &ks,
            values: None,
            state: StateChange::Set {
                values: &state,
                steps: &steps,
            },
        };
        t.assign_rows(&set).unwrap();
        let after = t.read_state(&ks).unwrap();
        assert_eq!(after.values, values, "values kept");
        assert_eq!((after.state, after.steps), (state, steps));
    }
}

#[test]
fn a_state_no_step_could_take_is_refused_and_changes_nothing() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let c = connect(&cluster);
    let s = spec("adagrad", OptimizerSpec::adagrad(0.1), false);
    let ks = keys(false);
    let t = c.create_table(&s).unwrap();
    train(&t, &ks, &mut TestRng(4), 5);
    let before = t.read_state(&ks).unwrap();
    let mut state = before.state.clone();
    let check = |state: &[f32], steps: &[u64]| {
        let a = Assignment {
            keys: &ks,
            values: None,
            state: StateChange::Set {
                values: state,
                steps,
            },
        };
        t.assign_rows(&a).unwrap_err()
    };
    state[DIM * 7 + 2] = -1.0;
    let e = check(&state, &[]);
    assert!(
        matches!(&e, ClientError::InvalidValue { key: 7, what, .. } if what.contains("element 2")),
        "{e}"
    );
    state[DIM * 7 + 2] = f32::NAN;
    assert!(matches!(
        check(&state, &[]),
        ClientError::InvalidValue { key: 7, .. }
    ));
    let e = check(&state[DIM..], &[]);
    assert!(matches!(e, ClientError::InvalidAssignment { .. }), "{e}");
    // Step counts where Adagrad counts none.
    let e = check(&before.state, &[1; ROWS as usize]);
    assert!(matches!(e, ClientError::InvalidAssignment { .. }), "{e}");
    assert_eq!(t.read_state(&ks).unwrap(), before, "nothing changed");

    // The same refused by the daemon itself, from a raw connection, which stays open.
    let mut raw = RawConn::greeted(&cluster.addrs()[0]);
    let shard_keys: Vec<u64> = ks.iter().copied().filter(|k| k % 2 == 0).collect();
    let header = |rows: usize, state| AssignRequest {
        table: "adagrad".into(),
        rows: rows as u32,
        values: false,
        state,
    };
    let mut payload: Vec<u8> = shard_keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let negative: Vec<u8> = (0..shard_keys.len() * DIM)
        .flat_map(|i| if i == 5 { -2f32 } else { 1f32 }.to_le_bytes())
        .collect();
    payload.extend_from_slice(&negative);
    raw.send(
        Op::Assign as u8,
        &header(shard_keys.len(), AssignState::Set),
        &payload,
    );
    let r = raw.recv().expect("an answer");
    assert_eq!(r.error().map(|e| e.code), Some(ErrorCode::InvalidGradient));
    // A state one value short: malformed.
    raw.send(
        Op::Assign as u8,
        &header(shard_keys.len(), AssignState::Set),
        &payload[..payload.len() - 4],
    );
    let r = raw.recv().expect("an answer");
    assert_eq!(r.error().map(|e| e.code), Some(ErrorCode::MalformedFrame));
    // Neither values nor a state change: malformed.
    raw.send(Op::Assign as u8, &header(0, AssignState::Keep), &[]);
    let r = raw.recv().expect("an answer");
    assert_eq!(r.error().map(|e| e.code), Some(ErrorCode::MalformedFrame));
    assert_eq!(t.read_state(&ks).unwrap(), before, "nothing changed");
}
