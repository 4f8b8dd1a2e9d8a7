//! Many clients over real sockets at once: versions count every update, values match a
//! sequential SGD reference, and readers racing writers only ever see whole rows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hetkv_client::Cluster;
use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_store::EmbeddedCluster;
use hetkv_tests::{sgd_table, TestRng};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

const THREADS: u64 = 8;
const ROWS: u64 = 300;
const DIM: usize = 16;
const BATCHES: usize = 150;
const BATCH: usize = 48;
const LR: f32 = 0.01;

/// Gradient element `j` of push `(thread, batch, slot)`.
fn grad(thread: u64, batch: usize, slot: usize, j: usize) -> f32 {
    let mut r = TestRng((thread << 40) ^ ((batch as u64) << 20) ^ ((slot as u64) << 8) ^ j as u64);
    r.signed_unit()
}

#[test]
fn eight_clients_pushing_overlapping_rows_match_sequential_sgd() {
    let cluster = EmbeddedCluster::start(3).unwrap();
    let spec = sgd_table("emb", ROWS, DIM as u32, LR);
    Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())
        .unwrap()
        .create_table(&spec)
        .unwrap();

    // Each thread has its own client (its own connections); keys overlap across threads and
    // repeat inside batches.
    let plans: Vec<Vec<(Vec<u64>, Vec<u32>)>> = (0..THREADS)
        .map(|t| {
            let mut rng = TestRng(t * 977 + 1);
            (0..BATCHES)
                .map(|_| {
                    let keys = (0..BATCH)
                        .map(|_| rng.below(ROWS / 2) * 2 + t % 2)
                        .collect();
                    let counts = (0..BATCH).map(|_| 1 + rng.below(3) as u32).collect();
                    (keys, counts)
                })
                .collect()
        })
        .collect();
    std::thread::scope(|s| {
        for (t, plan) in plans.iter().enumerate() {
            let addrs = cluster.addrs();
            s.spawn(move || {
                let table = Cluster::connect_tcp(addrs, &ClientConfig::default())
                    .unwrap()
                    .open_table("emb")
                    .unwrap();
                for (b, (keys, counts)) in plan.iter().enumerate() {
                    let grads: Vec<f32> = (0..BATCH)
                        .flat_map(|slot| (0..DIM).map(move |j| grad(t as u64, b, slot, j)))
                        .collect();
                    let applied = table.push(keys, counts, &grads).unwrap();
                    assert_eq!(applied, counts.iter().map(|&c| c as u64).sum::<u64>());
                }
            });
        }
    });

    // The sequential reference, in f64.
    let mut versions = vec![0u64; ROWS as usize];
    let mut values: Vec<Vec<f64>> = (0..ROWS)
        .map(|k| {
            let mut v = vec![0f32; DIM];
            spec.init.fill(k, &mut v);
            v.into_iter().map(f64::from).collect()
        })
        .collect();
    for (t, plan) in plans.iter().enumerate() {
        for (b, (keys, counts)) in plan.iter().enumerate() {
            for (slot, (&k, &c)) in keys.iter().zip(counts).enumerate() {
                versions[k as usize] += c as u64;
                for (j, w) in values[k as usize].iter_mut().enumerate() {
                    *w -= LR as f64 * grad(t as u64, b, slot, j) as f64;
                }
            }
        }
    }
    let table = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())
        .unwrap()
        .open_table("emb")
        .unwrap();
    let keys: Vec<u64> = (0..ROWS).collect();
    let mut got = vec![0f32; ROWS as usize * DIM];
    let mut got_versions = vec![0u64; ROWS as usize];
    table
        .pull(&keys, &mut got, Some(&mut got_versions))
        .unwrap();
    assert_eq!(got_versions, versions, "every update counted exactly once");
    for k in 0..ROWS as usize {
        for j in 0..DIM {
            let (g, w) = (got[k * DIM + j] as f64, values[k][j]);
            assert!(
                (g - w).abs() < 1e-4,
                "row {k}[{j}]: got {g}, sequential SGD {w}"
            );
        }
    }
    let pushed: u64 = table
        .cluster()
        .stats()
        .unwrap()
        .iter()
        .map(|s| s.rows_pushed)
        .sum();
    assert_eq!(pushed, THREADS * (BATCHES * BATCH) as u64);
}

#[test]
fn pulls_racing_pushes_over_sockets_see_only_whole_rows() {
    // SGD with lr 1 from zeros and gradient -1 per update: a row at version v holds v everywhere,
    // so any torn or lost update is visible in what a reader gets.
    let cluster = EmbeddedCluster::start(1).unwrap();
    let spec = TableSpec {
        name: "ctr".into(),
        rows: 4,
        dim: 64,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let addr = cluster.addrs()[0].clone();
    let shard = Arc::new(TcpShardClient::connect(&addr, ClientConfig::default()).unwrap());
    shard.create_table(&spec).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pulls = Arc::new(AtomicU64::new(0));
    const PUSHES: u64 = 400;
    std::thread::scope(|s| {
        for _ in 0..3 {
            let shard = shard.clone();
            s.spawn(move || {
                for _ in 0..PUSHES {
                    shard
                        .push("ctr", &[0, 1, 2, 3, 0], &[1; 5], &vec![-1.0; 5 * 64])
                        .unwrap();
                }
            });
        }
        for _ in 0..3 {
            let (shard, stop, pulls) = (shard.clone(), stop.clone(), pulls.clone());
            s.spawn(move || {
                let (mut v, mut rows) = (Vec::new(), Vec::new());
                let mut last = [0u64; 4];
                while !stop.load(Ordering::Relaxed) {
                    shard.pull("ctr", &[0, 1, 2, 3], &mut v, &mut rows).unwrap();
                    for k in 0..4 {
                        let row = &rows[k * 64..(k + 1) * 64];
                        assert!(
                            row.iter().all(|&x| x == v[k] as f32),
                            "row {k} at version {}: {row:?}",
                            v[k]
                        );
                        assert!(v[k] >= last[k], "version went backwards");
                        last[k] = v[k];
                    }
                    pulls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        s.spawn(|| {
            while shard.stats().unwrap().rows_pushed < 3 * PUSHES * 5 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    shard.pull("ctr", &[0, 1, 2, 3], &mut v, &mut rows).unwrap();
    assert_eq!(v, vec![6 * PUSHES, 3 * PUSHES, 3 * PUSHES, 3 * PUSHES]);
    assert!(pulls.load(Ordering::Relaxed) > 0);
}
