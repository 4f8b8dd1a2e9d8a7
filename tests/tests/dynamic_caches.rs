//! Caches of dynamic tables, through real daemons: at bounds 0 a cache of a dynamic table trains
//! the rows no cache trains, bit for bit, under every optimizer and admission rule, while another
//! client floods the tables with new ids so that cached keys are evicted and admitted again on
//! the shards (a new incarnation of a key, whose version starts again: the line's birth stamp is
//! what tells the shard the line is of another incarnation); and at a read bound every hit stays
//! within the bound of the shard's row.

use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind, TransportKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::{every_optimizer, versions_and_rows, TestRng};
use hetkv_transport::hash::splitmix64;
use hetkv_transport::{Admission, DynamicSpec, Eviction, Initializer, OptimizerSpec, TableSpec};

const DIM: usize = 8;
/// Ids in play: four times the tables' capacity.
const IDS: u64 = 1024;

/// A dynamic table of 256 rows over the cluster (8 placement buckets of one region bucket each).
fn spec(name: &str, optimizer: OptimizerSpec, admission: Admission) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows: 256,
        dim: DIM as u32,
        init: Initializer::Normal { std: 0.1, seed: 5 },
        optimizer,
        buckets: 8,
        dynamic: Some(DynamicSpec {
            admission,
            eviction: Eviction::Lru,
        }),
    }
}

/// Raw id `i` of the ids in play (0 and the top bit among them).
fn id(i: u64) -> u64 {
    match i {
        0 => 0,
        1 => u64::MAX,
        _ => splitmix64(i) | (i & 1) << 63,
    }
}

/// A batch: half from 16 hot ids (cache hits), half from all the ids in play; with repeats.
fn batch(rng: &mut TestRng) -> (Vec<u64>, Vec<f32>) {
    let keys: Vec<u64> = (0..24)
        .map(|n| {
            id(if n % 2 == 0 {
                rng.below(16)
            } else {
                rng.below(IDS)
            })
        })
        .collect();
    let grads = (0..keys.len() * DIM)
        .map(|_| rng.signed_unit() * 0.05)
        .collect();
    (keys, grads)
}

fn all_rows(c: &Cluster, table: &str) -> (Vec<u64>, Vec<f32>) {
    versions_and_rows(c, table, &(0..IDS).map(id).collect::<Vec<_>>())
}

/// Evictions so far on both shards (the streams read to their ends).
fn evictions(c: &Cluster, table: &str) -> u64 {
    let t = c.open_table(table).unwrap();
    let mut total = 0;
    for s in 0..2 {
        let mut cursor = 0;
        loop {
            let page = t.evictions(s, cursor, 4096).unwrap();
            if page.events.is_empty() {
                break;
            }
            total += page.lost + page.events.len() as u64;
            cursor = page.next;
        }
    }
    total
}

#[test]
fn a_cache_of_a_dynamic_table_at_bounds_0_trains_the_rows_no_cache_trains_across_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EmbeddedCluster::start_with(2, Default::default(), |i| ShardConfig {
        shm_dir: Some(dir.path().to_path_buf()),
        ..ShardConfig::new(i, 2)
    })
    .unwrap();
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        for optimizer in every_optimizer() {
            for admission in [Admission::Always, Admission::Threshold { count: 2 }] {
                let name = format!(
                    "{}_{kind:?}_{}",
                    optimizer.name(),
                    matches!(admission, Admission::Always)
                )
                .to_lowercase();
                let (cached_name, plain_name) = (format!("c_{name}"), format!("p_{name}"));
                admin
                    .create_table(&spec(&cached_name, optimizer, admission))
                    .unwrap();
                admin
                    .create_table(&spec(&plain_name, optimizer, admission))
                    .unwrap();
                let c = Cluster::connect(cluster.addrs(), kind, &ClientConfig::default()).unwrap();
                let config = CacheConfig::new(Capacity::Rows(64), PolicyKind::Lfu, Bound::STRICT);
                let mut cached = c.open_table(&cached_name).unwrap().cached(config);
                let mut plain = c
                    .open_table(&plain_name)
                    .unwrap()
                    .cached(CacheConfig::disabled());
                let flood = [
                    admin.open_table(&cached_name).unwrap(),
                    admin.open_table(&plain_name).unwrap(),
                ];
                let mut rng = TestRng(17);
                for step in 0..60u64 {
                    let (keys, grads) = batch(&mut rng);
                    let mut a = vec![0f32; keys.len() * DIM];
                    let mut b = a.clone();
                    cached.lookup(&keys, &mut a).unwrap();
                    plain.lookup(&keys, &mut b).unwrap();
                    assert_eq!(a, b, "{name}: step {step}: looked-up rows differ");
                    cached.update(&keys, &grads).unwrap();
                    plain.update(&keys, &grads).unwrap();
                    // Another client's new ids, the same into both tables: the shards evict
                    // (cached keys among them) and admit keys again.
                    let new: Vec<u64> = (0..48).map(|n| id(IDS + step * 48 + n)).collect();
                    for t in &flood {
                        t.push(&new, &vec![2; new.len()], &vec![0.01; new.len() * DIM])
                            .unwrap();
                    }
                }
                cached.flush().unwrap();
                let (va, ra) = all_rows(&admin, &cached_name);
                let (vb, rb) = all_rows(&admin, &plain_name);
                assert_eq!(va, vb, "{name}: versions");
                assert_eq!(
                    ra, rb,
                    "{name}: the cached run's rows are the uncached run's"
                );
                let s = cached.stats();
                assert!(s.hits > 300, "{name}: the cache served hits ({})", s.hits);
                let evicted = evictions(&admin, &cached_name);
                assert!(evicted > 1000, "{name}: the shards evicted ({evicted})");
            }
        }
    }
}

#[test]
fn hits_of_a_dynamic_table_stay_within_the_read_bound() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let c = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let s = spec("bounded", OptimizerSpec::adagrad(0.1), Admission::Always);
    let table = c.create_table(&s).unwrap();
    let other = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default())
        .unwrap()
        .open_table("bounded")
        .unwrap();
    let bound = 3u64;
    let config = CacheConfig::new(Capacity::Rows(64), PolicyKind::Lru, Bound::updates(bound));
    let mut cache = table.cached(config);
    let mut rng = TestRng(5);
    let keys: Vec<u64> = (0..16).map(id).collect();
    let mut out = vec![0f32; keys.len() * DIM];
    let mut clocks = vec![0u64; keys.len()];
    for step in 0..200u64 {
        cache
            .lookup_with_clocks(&keys, &mut out, &mut clocks)
            .unwrap();
        let (mut versions, mut rows) = (vec![0u64; keys.len()], vec![0f32; keys.len() * DIM]);
        table.pull(&keys, &mut rows, Some(&mut versions)).unwrap();
        for j in 0..keys.len() {
            // The line's clock, not past the shard's version, lags it by at most the bound,
            // unless the key is another incarnation (which a check reads again).
            assert!(
                versions[j] <= clocks[j] + bound,
                "step {step}: key {} at version {} read at {}",
                keys[j],
                versions[j],
                clocks[j]
            );
        }
        // Foreign updates to some of them, and a flood that evicts some.
        let k = keys[rng.below(keys.len() as u64) as usize];
        other.push(&[k], &[1], &[0.01; DIM]).unwrap();
        if step % 10 == 0 {
            let new: Vec<u64> = (0..200).map(|n| id(IDS + step * 200 + n)).collect();
            other
                .push(&new, &vec![1; new.len()], &vec![0.0; new.len() * DIM])
                .unwrap();
        }
    }
    assert!(evictions(&c, "bounded") > 100);
}
