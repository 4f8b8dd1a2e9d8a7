//! Moving a cluster's checkpoint onto another shard count (`checkpoint::reshard`): restores 2 -> 3
//! and 3 -> 2 equal, row for row (value, version, optimizer state and Adam step), the state of the
//! cluster that wrote the checkpoint, for tables whose bucket counts the shard counts divide and
//! tables whose counts they do not; training the same pushes on both afterwards stays equal; and
//! what cannot be moved is refused with the figures named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[path = "common/rows.rs"]
mod rows;

use hetkv_store::checkpoint::{reshard, CheckpointDir};
use hetkv_store::{Shard, ShardConfig};
use hetkv_transport::row::RowLayout;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

fn spec(name: &str, rows: u64, dim: u32, optimizer: OptimizerSpec, buckets: u32) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows,
        dim,
        init: Initializer::Uniform {
            bound: 0.5,
            seed: 9,
        },
        optimizer,
        buckets,
        dynamic: None,
    }
}

/// Tables of every optimizer with state, and bucket counts that 2 and 3 shards divide or not.
fn specs() -> Vec<TableSpec> {
    vec![
        spec("adam", 3000, 8, OptimizerSpec::adam(0.01), 4096),
        spec("adagrad", 301, 3, OptimizerSpec::adagrad(0.1), 7),
        spec("rowwise", 1000, 4, OptimizerSpec::rowwise_adagrad(0.1), 12),
        spec("sgd", 50, 2, OptimizerSpec::sgd(0.5), 5),
    ]
}

fn cluster(dirs: &[PathBuf]) -> Vec<Shard> {
    let shards = dirs.len() as u32;
    dirs.iter()
        .enumerate()
        .map(|(i, d)| {
            let mut c = ShardConfig::new(i as u32, shards);
            c.data_dir = Some(d.clone());
            Shard::new(c).unwrap()
        })
        .collect()
}

fn dirs(root: &Path, prefix: &str, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| root.join(format!("{prefix}{i}"))).collect()
}

/// Pushes `rounds` batches of pseudo-random gradients to random keys of every table, each key
/// sent to the shard the table's routing names. The same seed gives the same pushes whatever the
/// shard count.
fn train(shards: &[Shard], rounds: u64, seed: u64) {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for spec in specs() {
        let routing = spec.routing(shards.len() as u32);
        let dim = spec.dim as usize;
        for _ in 0..rounds {
            let mut keys: Vec<u64> = (0..12).map(|_| next() % spec.rows).collect();
            keys.sort_unstable();
            keys.dedup();
            let grads: Vec<f32> = (0..keys.len() * dim)
                .map(|_| (next() % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let count = 1 + (next() % 3) as u32;
            for (s, shard) in shards.iter().enumerate() {
                let mine: Vec<usize> = (0..keys.len())
                    .filter(|&j| routing.shard_of(keys[j]) == s)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let k: Vec<u64> = mine.iter().map(|&j| keys[j]).collect();
                let g: Vec<f32> = mine
                    .iter()
                    .flat_map(|&j| grads[j * dim..(j + 1) * dim].iter().copied())
                    .collect();
                let t = shard.table(&spec.name).unwrap();
                rows::push(&t, &k, &vec![count; k.len()], &g);
            }
        }
    }
}

/// One row as a cluster holds it: its stored image (version, values, checksum), its optimizer
/// state's bits and its Adam step.
type Row = (Vec<u8>, Vec<u32>, u64);

/// Every row of every table, by (table, global key); and each table's clock summed over shards.
fn state(shards: &[Shard]) -> (BTreeMap<(String, u64), Row>, BTreeMap<String, u64>) {
    let (mut rows, mut clocks) = (BTreeMap::new(), BTreeMap::new());
    let n = shards.len() as u32;
    for (s, shard) in shards.iter().enumerate() {
        for t in shard.tables() {
            let routing = t.spec().routing(n);
            let mut image = vec![0u8; RowLayout::new(t.spec().dim).stride()];
            for i in 0..t.local_rows() {
                t.read_local(i, &mut image);
                let (st, step) = t.optimizer_state(i);
                let key = routing.global_key(s as u32, i);
                let old = rows.insert(
                    (t.spec().name.clone(), key),
                    (
                        image.clone(),
                        st.iter().map(|v| v.to_bits()).collect(),
                        step,
                    ),
                );
                assert!(old.is_none(), "key {key} of {} twice", t.spec().name);
            }
            *clocks.entry(t.spec().name.clone()).or_insert(0) += t.clock();
        }
    }
    (rows, clocks)
}

fn restored(dirs: &[PathBuf]) -> Vec<Shard> {
    let shards = cluster(dirs);
    for s in &shards {
        s.restore(None).unwrap().expect("a checkpoint to restore");
    }
    shards
}

#[test]
fn restores_onto_three_and_back_onto_two_shards_equal_the_cluster_that_wrote_them() {
    let root = tempfile::tempdir().unwrap();
    let two = dirs(root.path(), "two", 2);
    let a = cluster(&two);
    for s in &a {
        for spec in specs() {
            s.create(spec).unwrap();
        }
    }
    train(&a, 40, 1);
    for s in &a {
        s.checkpoint("full", false).unwrap();
    }
    train(&a, 10, 2);
    for s in &a {
        s.checkpoint("inc", true).unwrap();
    }
    let written = state(&a);
    assert_eq!(written.0.len(), 3000 + 301 + 1000 + 50);
    drop(a);

    // 2 -> 3, sources given out of order; the incremental chain is followed.
    let three = dirs(root.path(), "three", 3);
    let sources = [CheckpointDir::at(&two[1]), CheckpointDir::at(&two[0])];
    let targets: Vec<CheckpointDir> = three.iter().map(|d| CheckpointDir::at(d)).collect();
    let made = reshard(&sources, "inc", &targets, "moved").unwrap();
    assert_eq!(made.len(), 3);
    for (i, m) in made.iter().enumerate() {
        assert_eq!((m.shard, m.shards, m.name.as_str()), (i as u32, 3, "moved"));
        assert!(m.sessions.is_empty());
    }
    let b = restored(&three);
    assert_eq!(state(&b), written, "2 -> 3 shards, row for row");
    let a = restored(&two);
    assert_eq!(state(&a), written, "the same checkpoint onto 2 shards");

    // The optimizer state moved with the rows: the same pushes keep both clusters equal.
    train(&a, 15, 3);
    train(&b, 15, 3);
    let trained = state(&a);
    assert_eq!(state(&b), trained, "after training both the same way");
    for s in &b {
        s.checkpoint("three", false).unwrap();
    }
    drop(b);
    drop(a);

    // 3 -> 2, back into the first cluster's own directories.
    let sources: Vec<CheckpointDir> = three.iter().map(|d| CheckpointDir::at(d)).collect();
    let targets = [CheckpointDir::at(&two[0]), CheckpointDir::at(&two[1])];
    reshard(&sources, "three", &targets, "back").unwrap();
    let c = restored(&two);
    assert_eq!(
        CheckpointDir::at(&two[0]).newest().unwrap().unwrap().name,
        "back"
    );
    assert_eq!(state(&c), trained, "3 -> 2 shards, row for row");
}

#[test]
fn what_cannot_be_moved_is_refused_with_the_figures_named() {
    let root = tempfile::tempdir().unwrap();
    let two = dirs(root.path(), "two", 2);
    let a = cluster(&two);
    for s in &a {
        s.create(spec("narrow", 100, 2, OptimizerSpec::sgd(0.1), 2))
            .unwrap();
        s.checkpoint("k", false).unwrap();
    }
    drop(a);
    let sources: Vec<CheckpointDir> = two.iter().map(|d| CheckpointDir::at(d)).collect();
    let three = dirs(root.path(), "three", 3);
    let targets: Vec<CheckpointDir> = three.iter().map(|d| CheckpointDir::at(d)).collect();

    let err = reshard(&sources, "k", &targets, "m")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 placement buckets") && err.contains("3 shards"),
        "{err}"
    );
    for d in &three {
        assert!(CheckpointDir::at(d).newest().unwrap().is_none(), "{err}");
    }

    // One shard's directory missing, or given twice.
    let err = reshard(&sources[..1], "k", &targets[..1], "m")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard 0 of 2") && err.contains("1 source"),
        "{err}"
    );
    let twice = [sources[1].clone(), sources[1].clone()];
    let err = reshard(&twice, "k", &targets[..2], "m")
        .unwrap_err()
        .to_string();
    assert!(err.contains("both hold shard 1"), "{err}");

    // A restore onto another shard count names the tool that moves it.
    let mixed = [three[0].clone(), three[1].clone(), two[1].clone()];
    let err = cluster(&mixed)[2]
        .restore(Some("k"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint reshard"), "{err}");

    // A cluster of more shards than a table's buckets refuses the table.
    let err = cluster(&three)[0]
        .create(spec("narrow", 100, 2, OptimizerSpec::sgd(0.1), 2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 placement buckets") && err.contains("3 shards"),
        "{err}"
    );
}
