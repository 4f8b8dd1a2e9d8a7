//! Checkpoints of a shard, without sockets: exact restores (values, versions, optimizer state),
//! incremental chains against full checkpoints, compaction, refusals of damaged files, and copies
//! taken while pushes run. (The full disk is `full_disk.rs`: it runs `mount`, and a process
//! forked while a shard of these tests holds its data directory's lock would hold it too.)

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[path = "common/rows.rs"]
mod rows;

use hetkv_store::checkpoint::CheckpointDir;
use hetkv_store::{Shard, ShardConfig, Table};
use hetkv_transport::row::RowLayout;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

fn spec(name: &str, rows: u64, dim: u32, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows,
        dim,
        init: Initializer::Uniform {
            bound: 0.5,
            seed: 3,
        },
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

const ADAM: OptimizerSpec = OptimizerSpec::Adam {
    lr: 0.01,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
};
const ADAGRAD: OptimizerSpec = OptimizerSpec::Adagrad {
    lr: 0.1,
    eps: 1e-6,
    initial_accumulator: 0.1,
};

fn shard(dir: &Path, index: u32, shards: u32) -> Shard {
    let mut c = ShardConfig::new(index, shards);
    c.data_dir = Some(dir.to_path_buf());
    Shard::new(c).unwrap()
}

/// Pushes one update of `grads` (keys x dim) for `keys`, each with `count`.
fn push(t: &Table, keys: &[u64], count: u32, grads: &[f32]) {
    rows::push(t, keys, &vec![count; keys.len()], grads);
}

/// Pushes `rounds` batches of pseudo-random gradients to keys of shard `index` of `shards`.
fn train(t: &Table, index: u32, shards: u32, rounds: u64, seed: u64) {
    let dim = t.spec().dim as usize;
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for _ in 0..rounds {
        let keys: Vec<u64> = (0..16)
            .map(|_| (next() % t.local_rows()) * shards as u64 + index as u64)
            .collect();
        let grads: Vec<f32> = (0..keys.len() * dim)
            .map(|_| (next() % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        push(t, &keys, 1 + (next() % 3) as u32, &grads);
    }
}

/// Every table's every row: its stored image (version, values, crc), optimizer state and step;
/// and the table clocks.
/// One row: its stored image, optimizer state and step.
type RowState = (Vec<u8>, Vec<f32>, u64);

fn state(s: &Shard) -> Vec<(String, Vec<RowState>, u64)> {
    s.tables()
        .iter()
        .map(|t| {
            let layout = RowLayout::new(t.spec().dim);
            let mut image = vec![0u8; layout.stride()];
            let rows = (0..t.local_rows())
                .map(|i| {
                    t.read_local(i, &mut image);
                    let (state, step) = t.optimizer_state(i);
                    (image.clone(), state, step)
                })
                .collect();
            (t.spec().name.clone(), rows, t.clock())
        })
        .collect()
}

fn table_files(dir: &Path, name: &str) -> Vec<(String, Vec<u8>)> {
    let m = CheckpointDir::at(dir).manifest(name).unwrap();
    m.tables
        .iter()
        .map(|t| {
            let path = dir.join("checkpoints").join(name).join(&t.file);
            (t.file.clone(), std::fs::read(path).unwrap())
        })
        .collect()
}

#[test]
fn a_restore_is_exact_and_an_incremental_chain_restores_to_the_bytes_of_a_full_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (index, shards) = (1, 2);
    let s = shard(dir.path(), index, shards);
    let (emb, _) = s.create(spec("emb", 5000, 8, ADAM)).unwrap();
    let (acc, _) = s.create(spec("acc", 301, 3, ADAGRAD)).unwrap();
    train(&emb, index, shards, 200, 1);
    train(&acc, index, shards, 50, 2);
    let a = s.checkpoint("a", false).unwrap();
    assert_eq!(a.rows, emb.local_rows() + acc.local_rows());
    train(&emb, index, shards, 20, 3);
    let b = s.checkpoint("b", true).unwrap();
    assert_eq!(b.parent.as_deref(), Some("a"));
    assert!(
        b.rows > 0 && b.rows < a.rows / 4,
        "{} changed rows of {}",
        b.rows,
        a.rows
    );
    // A table created after the parent is written in full in the incremental checkpoint.
    let (late, _) = s.create(spec("late", 40, 2, ADAM)).unwrap();
    train(&late, index, shards, 3, 4);
    let c = s.checkpoint("c", true).unwrap();
    assert_eq!(c.parent.as_deref(), Some("b"));
    let at_c = state(&s);
    let full = s.checkpoint("c-full", false).unwrap();
    assert!(full.parent.is_none());
    train(&emb, index, shards, 5, 5);
    drop(s);

    for name in ["c", "c-full"] {
        let r = shard(dir.path(), index, shards);
        let m = r.restore(Some(name)).unwrap().unwrap();
        assert_eq!(m.name, name);
        assert_eq!(state(&r), at_c, "restoring {name}");
    }
    CheckpointDir::at(dir.path())
        .compact("c", "c-compacted")
        .unwrap();
    assert_eq!(
        table_files(dir.path(), "c-compacted"),
        table_files(dir.path(), "c-full"),
        "a compacted chain is a full checkpoint, byte for byte"
    );
    // With no name, the newest (the compacted one) is restored.
    let r = shard(dir.path(), index, shards);
    assert_eq!(r.restore(None).unwrap().unwrap().name, "c-compacted");
    assert_eq!(state(&r), at_c);
    // The restored checkpoint is the parent of the next incremental one.
    assert_eq!(
        r.checkpoint("d", true).unwrap().parent.as_deref(),
        Some("c-compacted")
    );
}

#[test]
fn an_empty_data_dir_starts_empty_and_refusals_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let s = shard(dir.path(), 0, 1);
    assert!(s.restore(None).unwrap().is_none());
    let err = s.checkpoint("x", true).unwrap_err().to_string();
    assert!(err.contains("needs a parent"), "{err}");
    for bad in ["", ".hidden", "a/b", "..", &"n".repeat(129)] {
        assert!(s.checkpoint(bad, false).is_err(), "name {bad:?}");
    }
    s.create(spec("emb", 100, 4, ADAM)).unwrap();
    s.checkpoint("one", false).unwrap();
    let err = s.checkpoint("one", false).unwrap_err().to_string();
    assert!(err.contains("never overwritten"), "{err}");
    drop(s);
    // Another shard count, another shard index.
    let err = shard(dir.path(), 0, 2)
        .restore(None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shard 0 of 1"), "{err}");
    let err = shard(dir.path(), 0, 1)
        .restore(Some("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    // Without a data dir there is nothing to write into.
    let anon = Shard::new(ShardConfig::new(0, 1)).unwrap();
    let err = anon.checkpoint("x", false).unwrap_err().to_string();
    assert!(err.contains("--data-dir"), "{err}");
}

#[test]
fn a_flipped_byte_anywhere_in_a_checkpoint_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = shard(dir.path(), 0, 1);
    let (t, _) = s.create(spec("emb", 3000, 4, ADAGRAD)).unwrap();
    train(&t, 0, 1, 50, 9);
    s.checkpoint("k", false).unwrap();
    drop(s);
    let ck = dir.path().join("checkpoints").join("k");
    for file in ["MANIFEST", "t00000.hkc"] {
        let path = ck.join(file);
        let good = std::fs::read(&path).unwrap();
        let positions: Vec<usize> = (0..good.len())
            .step_by((good.len() / 97).max(1))
            .chain([good.len() - 1])
            .collect();
        for pos in positions {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = shard(dir.path(), 0, 1)
                .restore(None)
                .expect_err("a flipped byte was restored");
            assert!(err.to_string().contains(file), "byte {pos}: {err}");
        }
        // Truncated, and missing.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(shard(dir.path(), 0, 1).restore(None).is_err());
        std::fs::remove_file(&path).unwrap();
        let r = shard(dir.path(), 0, 1).restore(Some("k"));
        assert!(r.is_err(), "{file} missing");
        std::fs::write(&path, &good).unwrap();
    }
    shard(dir.path(), 0, 1).restore(None).unwrap().unwrap();
}

#[test]
fn a_checkpoint_taken_while_pushes_run_holds_rows_each_of_one_moment() {
    // SGD with lr 1 and gradient -1 adds 1 per update: a row's every value equals its version.
    // Adam counts one step per push of count 1: a row's step equals its version.
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(shard(dir.path(), 0, 1));
    let zeros = |name: &str, optimizer| TableSpec {
        init: Initializer::Zeros,
        ..spec(name, 4096, 16, optimizer)
    };
    let (sgd, _) = s
        .create(zeros("sgd", OptimizerSpec::Sgd { lr: 1.0 }))
        .unwrap();
    let (adam, _) = s.create(zeros("adam", ADAM)).unwrap();
    s.checkpoint("base", false).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (sgd, adam, stop) = (sgd.clone(), adam.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 200_000 {
                    let keys: Vec<u64> = (0..8).map(|j| (n * 8 + j + w * 977) % 4096).collect();
                    push(&sgd, &keys, 1, &vec![-1.0; keys.len() * 16]);
                    push(&adam, &keys, 1, &vec![0.25; keys.len() * 16]);
                    n += 1;
                }
            })
        })
        .collect();
    let mut names = Vec::new();
    for k in 0..8 {
        let name = format!("live-{k}");
        s.checkpoint(&name, k % 2 == 1).unwrap();
        names.push(name);
    }
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|h| h.join().unwrap());
    let ck = CheckpointDir::at(dir.path());
    let mut checked = 0;
    let mut moved = 0;
    for name in &names {
        let chain = ck.chain(name).unwrap();
        for table in ["sgd", "adam"] {
            ck.read_table(&chain, table, (0, 1), |_, rec| {
                let v = rec.version();
                moved += (v > 0) as usize;
                if table == "sgd" {
                    for c in rec.value_bytes().chunks_exact(4) {
                        let x = f32::from_le_bytes(c.try_into().unwrap());
                        assert_eq!(x, v as f32, "{name}: row {} torn", rec.index());
                    }
                } else {
                    assert_eq!(rec.step(), v, "{name}: row {} torn", rec.index());
                }
                checked += 1;
                Ok(())
            })
            .unwrap();
        }
    }
    assert!(checked > 8 * 4096, "{checked} records checked");
    assert!(
        moved > 4096,
        "the pushes ran while the checkpoints were written"
    );
}

#[test]
fn two_checkpoints_at_once_under_one_name_commit_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(shard(dir.path(), 0, 1));
    s.create(spec("emb", 400_000, 16, OptimizerSpec::Sgd { lr: 0.1 }))
        .unwrap();
    let go = Arc::new(std::sync::Barrier::new(2));
    let tries: Vec<_> = (0..2)
        .map(|_| {
            let (s, go) = (s.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                s.checkpoint("same", false).map_err(|e| e.to_string())
            })
        })
        .collect();
    let results: Vec<_> = tries.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let err = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        err.contains("being written") || err.contains("never overwritten"),
        "{err}"
    );
    CheckpointDir::at(dir.path()).verify("same").unwrap();
}

/// A dropped table leaves the checkpoints after it, and one created again under its name (with
/// another spec) is a new table: the next incremental checkpoint writes it whole, and restoring
/// that checkpoint gives the new table, never rows of the dropped one; a table dropped and not
/// created again is not restored.
#[test]
fn a_dropped_table_leaves_later_checkpoints_and_its_name_created_again_is_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = shard(dir.path(), 0, 1);
    let (a, _) = s.create(spec("a", 64, 4, ADAGRAD)).unwrap();
    let (b, _) = s.create(spec("b", 48, 3, ADAM)).unwrap();
    train(&a, 0, 1, 20, 1);
    train(&b, 0, 1, 20, 2);
    s.checkpoint("c1", false).unwrap();
    assert!(s.drop_table("a").unwrap());
    assert!(!s.drop_table("a").unwrap(), "nothing left to drop");
    assert!(s.table("a").is_err());
    assert!(
        a.clock() & hetkv_transport::wire::DROPPED_CLOCK != 0,
        "its clock word says so"
    );
    let (a2, created) = s
        .create(spec("a", 32, 2, OptimizerSpec::Sgd { lr: 0.5 }))
        .unwrap();
    assert!(created);
    train(&a2, 0, 1, 5, 3);
    train(&b, 0, 1, 3, 4);
    let at_c2 = state(&s);
    s.checkpoint("c2", true).unwrap();
    let m = CheckpointDir::at(dir.path()).manifest("c2").unwrap();
    let kind = |name: &str| m.tables.iter().find(|t| t.name == name).unwrap().kind;
    assert_eq!(kind("a"), hetkv_store::checkpoint::Kind::Full);
    assert_eq!(kind("b"), hetkv_store::checkpoint::Kind::Incremental);
    assert!(s.drop_table("b").unwrap());
    let at_c3 = state(&s);
    s.checkpoint("c3", true).unwrap();
    drop(s);
    for (name, want) in [("c2", at_c2), ("c3", at_c3)] {
        let r = shard(dir.path(), 0, 1);
        r.restore(Some(name)).unwrap();
        assert_eq!(state(&r), want, "restore of {name}");
        assert_eq!(
            r.table("a").unwrap().spec().dim,
            2,
            "{name}: the new table a"
        );
    }
}
