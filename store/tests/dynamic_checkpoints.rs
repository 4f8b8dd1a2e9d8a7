//! Checkpoints of dynamic tables, without sockets: a restore puts back every held key with its
//! value, version, optimizer state, Adam step and eviction score (one record per key, as of one
//! moment), in the slot it held, so a restored shard and the one that wrote the checkpoint go on
//! identically under the same pushes, evictions included; an incremental checkpoint holds the
//! slots written since its parent, and its chain restores, compacts and reshards as a full
//! checkpoint of the same moment; a table written empty comes back empty; a checkpoint of 2 shards, full and
//! evicting, moves onto 1, 3 and 2 shards with every key's record exactly as written, served by
//! daemons of those counts.

use std::io::BufReader;
use std::path::Path;

use hetkv_store::checkpoint::format::TableFileReader;
use hetkv_store::checkpoint::{reshard, CheckpointDir};
use hetkv_store::{Shard, ShardConfig};
use hetkv_transport::wire::le_array;
use hetkv_transport::{Admission, DynamicSpec, Eviction, Initializer, OptimizerSpec, TableSpec};

const DIM: usize = 3;

fn spec(name: &str, eviction: Eviction, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows: 256, // 8 buckets of 32 slots on one shard
        dim: DIM as u32,
        init: Initializer::Uniform {
            bound: 0.5,
            seed: 4,
        },
        optimizer,
        buckets: 8, // placement buckets: with 256 rows, one region bucket each
        dynamic: Some(DynamicSpec {
            admission: Admission::Always,
            eviction,
        }),
    }
}

fn shard(dir: &Path) -> Shard {
    let mut c = ShardConfig::new(0, 1);
    c.data_dir = Some(dir.to_path_buf());
    Shard::new(c).unwrap()
}

/// Pushes `rounds` batches of 16 keys from a space of 2,000 (8x the capacity: evictions), with
/// pseudo-random gradients, to every dynamic table of `s`. The same seed gives the same pushes.
fn train(s: &Shard, rounds: u64, seed: u64) {
    train_on(std::slice::from_ref(s), rounds, seed, (16, 2000));
}

/// Every record of every table file of checkpoint `name`, by table: the bytes of each.
fn records(dir: &Path, name: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    let m = CheckpointDir::at(dir).manifest(name).unwrap();
    m.tables
        .iter()
        .map(|t| {
            let path = dir.join("checkpoints").join(name).join(&t.file);
            let file = std::fs::File::open(&path).unwrap();
            let mut r = TableFileReader::open(BufReader::new(file), "t").unwrap();
            let mut all = Vec::new();
            while let Some(rec) = r.next_record().unwrap() {
                all.push(rec.bytes().to_vec());
            }
            (t.name.clone(), all)
        })
        .collect()
}

#[test]
fn a_restored_dynamic_table_holds_every_key_exactly_and_goes_on_as_the_original() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = shard(a_dir.path());
    for (name, eviction, optimizer) in [
        ("lru_adam", Eviction::Lru, OptimizerSpec::adam(0.01)),
        ("lfu_adagrad", Eviction::Lfu, OptimizerSpec::adagrad(0.1)),
    ] {
        a.create_dynamic(spec(name, eviction, optimizer)).unwrap();
    }
    // A fixed table beside them.
    a.create(TableSpec {
        dynamic: None,
        ..spec("fixed", Eviction::Lru, OptimizerSpec::sgd(0.1))
    })
    .unwrap();
    train(&a, 300, 1);
    // Full, and evicting: the checkpoint holds scores that decide what goes next.
    for t in a.dynamic_tables() {
        assert_eq!(t.rows().resident(), t.capacity(), "{}", t.spec().name);
        let evicted = t.rows().evictions(0, usize::MAX).unwrap().next;
        assert!(evicted > 500, "{}: {evicted} evictions", t.spec().name);
    }
    a.checkpoint("k", false).unwrap();
    let written = records(a_dir.path(), "k");
    assert_eq!(written.len(), 3);
    for (name, recs) in &written {
        if name != "fixed" {
            assert_eq!(recs.len(), 256, "{name}: every held key, one record each");
        }
    }

    // Restore into another directory's shard: copy the checkpoint over.
    let copy = |from: &Path, to: &Path| {
        let src = from.join("checkpoints");
        for entry in walk(&src) {
            let rel = entry.strip_prefix(from).unwrap();
            let dst = to.join(rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &dst).unwrap();
        }
    };
    copy(a_dir.path(), b_dir.path());
    let b = shard(b_dir.path());
    b.restore(Some("k")).unwrap();
    for t in b.dynamic_tables() {
        let original = a.dynamic_table(&t.spec().name).unwrap();
        assert_eq!(t.rows().resident(), original.rows().resident());
        assert_eq!(t.clock(), original.clock(), "{}: the clock", t.spec().name);
    }
    // Written again at once, the restored shard's records are the checkpoint's, byte for byte:
    // every key in its slot with its value, version, state, Adam step and score.
    b.checkpoint("again", false).unwrap();
    assert_eq!(records(b_dir.path(), "again"), written, "restored exactly");
    // Both go on under the same pushes (evictions by the restored scores, steps by the
    // restored state), then write the same records. Few rounds, so that most restored keys
    // are still held at the end.
    train(&a, 8, 2);
    train(&b, 8, 2);
    a.checkpoint("after", false).unwrap();
    b.checkpoint("after", false).unwrap();
    assert_eq!(
        records(b_dir.path(), "after"),
        records(a_dir.path(), "after"),
        "the restored shard and the original went on identically"
    );
}

#[test]
fn dynamic_tables_ride_incremental_checkpoints_with_the_slots_written_since_their_parent() {
    let dir = tempfile::tempdir().unwrap();
    let s = shard(dir.path());
    // LRU: a key evicted and admitted again takes its bucket's least recently updated slot,
    // seldom the one it left.
    s.create_dynamic(spec(
        "d",
        Eviction::Lru,
        OptimizerSpec::rowwise_adagrad(0.1),
    ))
    .unwrap();
    s.create_dynamic(spec("untouched", Eviction::Lfu, OptimizerSpec::sgd(0.1)))
        .unwrap();
    s.create(TableSpec {
        dynamic: None,
        ..spec("fixed", Eviction::Lru, OptimizerSpec::sgd(0.1))
    })
    .unwrap();
    // A dynamic spec is not made into a fixed table by the fixed tables' constructor.
    let err = s
        .create(spec("other", Eviction::Lfu, OptimizerSpec::sgd(0.1)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is dynamic"), "{err}");
    let d = s.dynamic_table("d").unwrap();
    // Keys from 500 ids into 256 slots: evictions, and keys admitted again after leaving.
    let mut x = 5u64;
    let mut push = |n: u64| {
        for _ in 0..n {
            x = hetkv_transport::hash::splitmix64(x);
            let key = x % 500;
            let k = key.to_le_bytes();
            let g: Vec<u8> = [0.1f32; DIM].iter().flat_map(|v| v.to_le_bytes()).collect();
            let p = d
                .validate_push(le_array(&k), le_array(&1u32.to_le_bytes()), le_array(&g))
                .unwrap();
            d.apply_push(&p, None).unwrap();
        }
    };
    push(400);
    s.checkpoint("a", false).unwrap();
    let held_at_a = d.rows().resident() as usize;
    push(100);
    s.checkpoint("b", true).unwrap();
    push(60);
    s.checkpoint("c", true).unwrap();
    // The same moment in full (no push between).
    s.checkpoint("c_full", false).unwrap();
    let resident = d.rows().resident() as usize;
    drop(s);
    let table = |all: Vec<(String, Vec<Vec<u8>>)>, name: &str| {
        all.into_iter().find(|(n, _)| n == name).unwrap().1
    };
    let key_slots = |recs: &[Vec<u8>]| -> std::collections::HashMap<u64, u64> {
        recs.iter()
            .map(|r| {
                let slot = u64::from_le_bytes(r[0..8].try_into().unwrap());
                let key = u64::from_le_bytes(r[r.len() - 16..r.len() - 8].try_into().unwrap());
                (key, slot)
            })
            .collect()
    };
    let full = records(dir.path(), "c_full");
    let at_a = table(records(dir.path(), "a"), "d");
    assert_eq!(at_a.len(), held_at_a, "full: every held slot");
    for name in ["b", "c"] {
        let m = CheckpointDir::at(dir.path()).manifest(name).unwrap();
        assert!(
            m.tables.iter().all(|t| t.kind.name() == "incremental"),
            "{name}"
        );
        let changed = table(records(dir.path(), name), "d");
        assert!(
            !changed.is_empty() && changed.len() < resident,
            "{name}: {} records of {resident} held: the slots written since the parent",
            changed.len()
        );
        assert!(table(records(dir.path(), name), "untouched").is_empty());
    }
    // Every record of c is the slot's record at c's moment; the slots c leaves out kept theirs.
    let (c, now) = (
        table(records(dir.path(), "c"), "d"),
        table(full.clone(), "d"),
    );
    for rec in &c {
        assert!(
            now.contains(rec),
            "a record of c that the full checkpoint lacks"
        );
    }
    // Some key left its slot and came back in another one of its bucket along the chain: what
    // a file-by-file restore could not apply (the newer file names a key an older one still
    // holds elsewhere).
    let (then, later) = (key_slots(&at_a), key_slots(&now));
    assert!(
        then.iter()
            .any(|(k, slot)| later.get(k).is_some_and(|s| s != slot)),
        "a key changed slots between a and c"
    );

    // Restored from the chain a, b, c: the state of c's moment, byte for byte once written.
    let r = shard(dir.path());
    assert_eq!(r.restore(Some("c")).unwrap().unwrap().name, "c");
    assert_eq!(
        r.dynamic_table("d").unwrap().rows().resident() as usize,
        resident
    );
    r.checkpoint("again", false).unwrap();
    assert_eq!(
        records(dir.path(), "again"),
        full,
        "restored from the chain"
    );
    drop(r);
    // Compacted, and moved onto two shards: as from the full checkpoint.
    let cd = CheckpointDir::at(dir.path());
    cd.compact("c", "compacted").unwrap();
    assert_eq!(
        table(records(dir.path(), "compacted"), "d"),
        table(full.clone(), "d")
    );
    let moved = moved_onto_two(dir.path(), "c", "d");
    assert_eq!(moved.len(), resident);
    assert_eq!(moved, moved_onto_two(dir.path(), "c_full", "d"));

    // A checkpoint whose only dynamic table is empty (its file holds no record) moves as an empty
    // table.
    let (empty, moved) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let e = shard(empty.path());
    e.create_dynamic(spec("bare", Eviction::Lru, OptimizerSpec::sgd(0.1)))
        .unwrap();
    e.checkpoint("k", false).unwrap();
    drop(e);
    // Compacted (a chain of one full file, no record) it is the same empty table.
    CheckpointDir::at(empty.path()).compact("k", "k2").unwrap();
    assert_eq!(records(empty.path(), "k2"), records(empty.path(), "k"));
    let made = reshard(
        &[CheckpointDir::at(empty.path())],
        "k",
        &[CheckpointDir::at(moved.path())],
        "m",
    )
    .unwrap();
    assert_eq!(made.len(), 1);
    assert_eq!(records(moved.path(), "m"), [("bare".to_string(), vec![])]);
}

#[test]
fn rows_a_time_to_live_expired_stay_gone_along_an_incremental_chain() {
    let dir = tempfile::tempdir().unwrap();
    let s = shard(dir.path());
    s.create_dynamic(spec(
        "ttl",
        Eviction::Ttl { steps: 3 },
        OptimizerSpec::adam(0.01),
    ))
    .unwrap();
    let d = s.dynamic_table("ttl").unwrap();
    let push = |keys: std::ops::Range<u64>| {
        let keys: Vec<u64> = keys.map(hetkv_transport::hash::splitmix64).collect();
        let k: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
        let c: Vec<u8> = keys.iter().flat_map(|_| 1u32.to_le_bytes()).collect();
        let g: Vec<u8> = (0..keys.len() * DIM)
            .flat_map(|i| (i as f32 / 100.0).to_le_bytes())
            .collect();
        let p = d
            .validate_push(le_array(&k), le_array(&c), le_array(&g))
            .unwrap();
        d.apply_push(&p, None).unwrap();
    };
    // Keys 0..60 at step 0, 60..120 at step 2: a full checkpoint holds all 120.
    push(0..60);
    d.rows().advance_step(2).unwrap();
    push(60..120);
    s.checkpoint("a", false).unwrap();
    let held_at_a = d.rows().resident();
    // Step 4 expires the keys of step 0; some come back at step 4; the incremental checkpoint
    // records the slots emptied (version 0) beside those written.
    assert_eq!(d.rows().advance_step(4).unwrap(), (4, 60));
    push(0..20);
    s.checkpoint("b", true).unwrap();
    s.checkpoint("b_full", false).unwrap();
    let resident = d.rows().resident();
    assert_eq!((held_at_a, resident), (120, 80));
    drop(s);
    let table = |all: Vec<(String, Vec<Vec<u8>>)>| all.into_iter().next().unwrap().1;
    let incremental = table(records(dir.path(), "b"));
    let emptied = incremental.iter().filter(|r| r[8..16] == [0; 8]).count();
    assert!(emptied > 0, "the incremental file records emptied slots");
    let full = table(records(dir.path(), "b_full"));
    assert_eq!(full.len() as u64, resident);
    // Restored from the chain a, b: the expired keys stay gone, the rest as in b_full.
    let r = shard(dir.path());
    r.restore(Some("b")).unwrap();
    let t = r.dynamic_table("ttl").unwrap();
    assert_eq!(t.rows().resident(), resident);
    assert_eq!(t.rows().step(), 4, "the step comes back from the scores");
    r.checkpoint("again", false).unwrap();
    assert_eq!(table(records(dir.path(), "again")), full);
    drop(r);
    // Compacted, and moved onto two shards: as from the full checkpoint.
    CheckpointDir::at(dir.path())
        .compact("b", "compacted")
        .unwrap();
    assert_eq!(table(records(dir.path(), "compacted")), full);
    let moved = moved_onto_two(dir.path(), "b", "ttl");
    assert_eq!(moved.len() as u64, resident);
    assert_eq!(moved, moved_onto_two(dir.path(), "b_full", "ttl"));
}

/// Checkpoint `checkpoint` of the shard in `dir` resharded onto two new shards: each key's record
/// of `table` there ([`keyed_records`]).
fn moved_onto_two(dir: &Path, checkpoint: &str, table: &str) -> Vec<(u64, u64, Vec<u8>)> {
    let into = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let targets: Vec<CheckpointDir> = into.iter().map(|t| CheckpointDir::at(t.path())).collect();
    reshard(&[CheckpointDir::at(dir)], checkpoint, &targets, "m").unwrap();
    keyed_records(&[into[0].path(), into[1].path()], "m", table)
}

/// Shard `i` of `n` with its data directory.
fn shard_of(dir: &Path, i: u32, n: u32) -> Shard {
    let mut c = ShardConfig::new(i, n);
    c.data_dir = Some(dir.to_path_buf());
    Shard::new(c).unwrap()
}

/// Pushes `rounds` batches of `per_batch` keys from a space of `space` ids, with pseudo-random
/// gradients, to every dynamic table of the cluster `shards`, each key to the shard its hashed
/// bucket names. The same seed gives the same pushes.
fn train_on(shards: &[Shard], rounds: u64, seed: u64, (per_batch, space): (usize, u64)) {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let n = shards.len() as u32;
    for t in 0..shards[0].dynamic_tables().len() {
        let routing = shards[0].dynamic_tables()[t].spec().routing(n);
        for _ in 0..rounds {
            let mut keys: Vec<u64> = (0..per_batch)
                .map(|_| hetkv_transport::hash::splitmix64(next() % space))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            for (i, s) in shards.iter().enumerate() {
                let mine: Vec<u64> = keys
                    .iter()
                    .copied()
                    .filter(|&k| routing.shard_of(k) == i)
                    .collect();
                let k: Vec<u8> = mine.iter().flat_map(|k| k.to_le_bytes()).collect();
                let c: Vec<u8> = mine
                    .iter()
                    .flat_map(|_| (1 + (next() % 3) as u32).to_le_bytes())
                    .collect();
                let g: Vec<u8> = (0..mine.len() * DIM)
                    .flat_map(|_| ((next() % 1000) as f32 / 1000.0 - 0.5).to_le_bytes())
                    .collect();
                let table = &s.dynamic_tables()[t];
                let push = table
                    .validate_push(le_array(&k), le_array(&c), le_array(&g))
                    .unwrap();
                table.apply_push(&push, None).unwrap();
            }
        }
    }
}

/// Each key's record of table `name` in checkpoint `name` of every directory, without its slot,
/// with its score.
fn keyed_records(dirs: &[&Path], checkpoint: &str, table: &str) -> Vec<(u64, u64, Vec<u8>)> {
    let mut all = Vec::new();
    for dir in dirs {
        let m = CheckpointDir::at(dir).manifest(checkpoint).unwrap();
        let t = m.tables.iter().find(|t| t.name == table).unwrap();
        let path = dir.join("checkpoints").join(checkpoint).join(&t.file);
        let file = std::fs::File::open(&path).unwrap();
        let mut r = TableFileReader::open(BufReader::new(file), "t").unwrap();
        while let Some(rec) = r.next_record().unwrap() {
            let (key, score) = rec.key_and_score().unwrap();
            all.push((key, score, rec.bytes()[8..].to_vec()));
        }
    }
    all.sort();
    all
}

#[test]
fn a_dynamic_table_moves_onto_another_shard_count_key_by_key() {
    let src: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let shards: Vec<Shard> = (0..2)
        .map(|i| shard_of(src[i].path(), i as u32, 2))
        .collect();
    let tables = [
        ("lru_adam", Eviction::Lru, OptimizerSpec::adam(0.01)),
        ("lfu_adagrad", Eviction::Lfu, OptimizerSpec::adagrad(0.1)),
    ];
    for s in &shards {
        for (name, eviction, optimizer) in tables {
            s.create_dynamic(TableSpec {
                rows: 512,
                ..spec(name, eviction, optimizer)
            })
            .unwrap();
        }
        s.create(TableSpec {
            dynamic: None,
            ..spec("fixed", Eviction::Lru, OptimizerSpec::sgd(0.1))
        })
        .unwrap();
    }
    train_on(&shards, 400, 9, (24, 3000));
    for s in &shards {
        for t in s.dynamic_tables() {
            assert_eq!(t.rows().resident(), t.capacity(), "full, and evicting");
        }
        s.checkpoint("k", false).unwrap();
    }
    // Each table's largest clock over the source shards.
    let clocks: Vec<u64> = (0..tables.len())
        .map(|t| {
            shards
                .iter()
                .map(|s| s.dynamic_tables()[t].clock())
                .max()
                .unwrap()
        })
        .collect();
    drop(shards);
    let sources: Vec<CheckpointDir> = src.iter().map(|d| CheckpointDir::at(d.path())).collect();
    let src_paths: Vec<&Path> = src.iter().map(|d| d.path()).collect();
    for n in [1u32, 3, 2] {
        let dst: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let targets: Vec<CheckpointDir> = dst.iter().map(|d| CheckpointDir::at(d.path())).collect();
        let made = reshard(&sources, "k", &targets, "m").unwrap();
        let dst_paths: Vec<&Path> = dst.iter().map(|d| d.path()).collect();
        let restored: Vec<Shard> = (0..n)
            .map(|i| {
                let s = shard_of(dst[i as usize].path(), i, n);
                assert_eq!(s.restore(Some("m")).unwrap().unwrap().name, "m");
                s
            })
            .collect();
        for (ti, (name, _, _)) in tables.into_iter().enumerate() {
            // Every key, with its record (version, values, state, step, key, score) exactly as
            // written: nothing is evicted, whatever the shard count.
            let before = keyed_records(&src_paths, "k", name);
            let after = keyed_records(&dst_paths, "m", name);
            assert_eq!(after.len(), before.len(), "{name} onto {n}");
            assert!(after == before, "{name} onto {n}: records differ");
            let routing = restored[0].dynamic_table(name).unwrap().spec().routing(n);
            // The restored shards serve every key as written, and their clocks are past every
            // moved score.
            let mut out = [0f32; DIM];
            for (key, _, bytes) in &after {
                let t = restored[routing.shard_of(*key)]
                    .dynamic_table(name)
                    .unwrap();
                let version = t.rows().read(*key, &mut out).unwrap();
                assert_eq!(version.to_le_bytes(), bytes[..8], "{name}: key {key}");
                let values: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                assert_eq!(values, bytes[8..8 + 4 * DIM], "{name}: key {key}");
            }
            for s in &restored {
                let clock = s.dynamic_table(name).unwrap().clock();
                assert!(
                    clock >= clocks[ti],
                    "{name}: clock {clock} of {}",
                    clocks[ti]
                );
                assert!(
                    after.iter().all(|a| a.1 <= clock),
                    "{name}: a score above the new clock"
                );
            }
        }
        assert_eq!(made.len(), n as usize);
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
