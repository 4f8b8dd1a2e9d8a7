//! `CheckpointBarrier`: worker threads with caches (bounds 50, so most updates sit unpushed in
//! the caches) meet at the barrier between steps; the checkpoint then holds every update of every
//! step before it and none after, and the workers go on.

use std::sync::Arc;

use hetkv_client::{Bound, CacheConfig, Capacity, CheckpointBarrier, Cluster, PolicyKind};
use hetkv_fallback_tcp::{ClientConfig, ServerConfig};
use hetkv_store::checkpoint::CheckpointDir;
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::{sgd_table, TestRng};

#[test]
fn a_barrier_checkpoint_holds_every_update_before_it_and_none_after() {
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = |i: u32| dir.path().join(format!("s{i}"));
    let cluster = EmbeddedCluster::start_with(2, ServerConfig::default(), |i| ShardConfig {
        data_dir: Some(shard_dir(i)),
        ..ShardConfig::new(i, 2)
    })
    .unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = client
        .create_table(&sgd_table("emb", 2000, 4, 0.01))
        .unwrap();
    let (workers, steps, keys_per_step) = (6usize, 40usize, 32usize);
    let barrier = Arc::new(CheckpointBarrier::new(client.clone(), workers));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (table, barrier) = (table.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut cache = table.cached(CacheConfig {
                    capacity: Capacity::Fraction(0.5),
                    policy: PolicyKind::Lfu,
                    pull_bound: Bound::updates(50),
                    push_bound: Bound::updates(50),
                });
                let mut rng = TestRng(w as u64 + 1);
                let mut rows = vec![0f32; keys_per_step * 4];
                for step in 0..steps {
                    if step == steps / 2 {
                        let done = barrier
                            .checkpoint(&mut [&mut cache], "half", false)
                            .unwrap();
                        assert_eq!(done.len(), 2, "every shard committed");
                    }
                    let mut keys: Vec<u64> = (0..keys_per_step).map(|_| rng.below(2000)).collect();
                    keys.sort_unstable();
                    keys.dedup();
                    cache.lookup(&keys, &mut rows[..keys.len() * 4]).unwrap();
                    cache.update(&keys, &vec![0.1; keys.len() * 4]).unwrap();
                }
                cache.flush().unwrap();
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    // Each worker updates each of its step's distinct keys once: the checkpoint's versions sum to
    // exactly the updates of the first half of the steps, on both shards together.
    let mut expected_half = 0u64;
    let mut expected_all = 0u64;
    for w in 0..workers {
        let mut rng = TestRng(w as u64 + 1);
        for step in 0..steps {
            let mut keys: Vec<u64> = (0..keys_per_step).map(|_| rng.below(2000)).collect();
            keys.sort_unstable();
            keys.dedup();
            expected_all += keys.len() as u64;
            if step < steps / 2 {
                expected_half += keys.len() as u64;
            }
        }
    }
    let mut in_checkpoint = 0u64;
    for i in 0..2 {
        let ck = CheckpointDir::at(&shard_dir(i));
        let chain = ck.chain("half").unwrap();
        ck.read_table(&chain, "emb", (i, 2), |_, rec| {
            in_checkpoint += rec.version();
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(in_checkpoint, expected_half);
    let live: u64 = client
        .stats()
        .unwrap()
        .iter()
        .flat_map(|s| &s.tables)
        .map(|t| t.updates)
        .sum();
    assert_eq!(live, expected_all, "the workers went on after the barrier");
}
