//! Caches of several tables driven together (`lookup_many`, `update_many`): one request a shard
//! a round for all of them, and every row and push exactly what each cache gives alone.

use hetkv_client::{
    lookup_many, prefetch_many, update_many, Bound, CacheConfig, CachedTable, Capacity,
    ClientError, Cluster, PolicyKind,
};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_tests::{sgd_table, TestRng};
use hetkv_transport::{OptimizerSpec, TableSpec};

const ROWS: u64 = 400;

/// Three tables of their own dims and optimizers (Adagrad and Adam carry state in their lines).
fn specs(suffix: &str) -> Vec<TableSpec> {
    let mut adagrad = sgd_table(&format!("adagrad{suffix}"), ROWS, 8, 0.0);
    adagrad.optimizer = OptimizerSpec::adagrad(0.05);
    let mut adam = sgd_table(&format!("adam{suffix}"), ROWS, 4, 0.0);
    adam.optimizer = OptimizerSpec::adam(0.01);
    let sgd = sgd_table(&format!("sgd{suffix}"), ROWS, 16, 0.1);
    vec![adagrad, adam, sgd]
}

fn caches(cluster: &Cluster, specs: &[TableSpec]) -> Vec<CachedTable> {
    specs
        .iter()
        .map(|s| {
            cluster.create_table(s).unwrap().cached(CacheConfig {
                capacity: Capacity::Rows(60),
                policy: PolicyKind::Lfu,
                pull_bound: Bound::updates(3),
                push_bound: Bound::updates(3),
            })
        })
        .collect()
}

/// Every row and version of `table`.
fn contents(cluster: &Cluster, spec: &TableSpec) -> (Vec<f32>, Vec<u64>) {
    let keys: Vec<u64> = (0..ROWS).collect();
    let mut values = vec![0f32; keys.len() * spec.dim as usize];
    let mut versions = vec![0u64; keys.len()];
    cluster
        .open_table(&spec.name)
        .unwrap()
        .pull(&keys, &mut values, Some(&mut versions))
        .unwrap();
    (values, versions)
}

/// One worker drives three caches together, another the same three (on copies of the tables)
/// one by one, through the same calls: skewed keys with repeats, updates that push and evict,
/// prefetches of all three together (against one by one) and of one table alone, now and then. Every lookup returns the same bits, and after the
/// flush the shards hold the same rows, versions and all.
#[test]
fn caches_driven_together_give_what_each_gives_alone() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let together = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let alone = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let (specs_g, specs_a) = (specs("_g"), specs("_a"));
    let mut group = caches(&together, &specs_g);
    let mut single = caches(&alone, &specs_a);
    let dims: Vec<usize> = specs_g.iter().map(|s| s.dim as usize).collect();
    let mut rng = TestRng(0x9e0);
    let draw = |rng: &mut TestRng| -> Vec<Vec<u64>> {
        (0..3)
            .map(|_| {
                let n = rng.below(24) as usize; // an empty table's batch now and then
                (0..n)
                    .map(|_| {
                        // Skewed: a third of the draws among 20 keys.
                        if rng.below(3) == 0 {
                            rng.below(20)
                        } else {
                            rng.below(ROWS)
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let mut next = draw(&mut rng);
    for step in 0..300 {
        let keys = std::mem::replace(&mut next, draw(&mut rng));
        let key_refs: Vec<&[u64]> = keys.iter().map(Vec::as_slice).collect();
        let mut rows_g: Vec<Vec<f32>> = keys
            .iter()
            .zip(&dims)
            .map(|(k, d)| vec![0f32; k.len() * d])
            .collect();
        let mut rows_a = rows_g.clone();
        {
            let mut refs: Vec<&mut [f32]> = rows_g.iter_mut().map(Vec::as_mut_slice).collect();
            let mut g: Vec<&mut CachedTable> = group.iter_mut().collect();
            lookup_many(&mut g, &key_refs, &mut refs).unwrap();
        }
        for t in 0..3 {
            single[t].lookup(&keys[t], &mut rows_a[t]).unwrap();
        }
        for t in 0..3 {
            let same = rows_g[t]
                .iter()
                .zip(&rows_a[t])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "step {step}, table {t}: the rows differ");
        }
        let grads: Vec<Vec<f32>> = keys
            .iter()
            .zip(&dims)
            .map(|(k, &d)| (0..k.len() * d).map(|_| rng.signed_unit()).collect())
            .collect();
        let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        {
            let mut g: Vec<&mut CachedTable> = group.iter_mut().collect();
            update_many(&mut g, &key_refs, &grad_refs).unwrap();
        }
        for t in 0..3 {
            single[t].update(&keys[t], &grads[t]).unwrap();
        }
        if step % 5 == 2 {
            // Every table's next keys prefetched together (one batch a shard) against each
            // alone; the lookups complete them.
            let next_refs: Vec<&[u64]> = next.iter().map(Vec::as_slice).collect();
            let mut g: Vec<&mut CachedTable> = group.iter_mut().collect();
            prefetch_many(&mut g, &next_refs).unwrap();
            for t in 0..3 {
                single[t].prefetch(&next[t]).unwrap();
            }
        }
        if step % 7 == 3 {
            // Table 1's next keys prefetched alone: the group's lookup completes that prefetch.
            group[1].prefetch(&next[1]).unwrap();
            single[1].prefetch(&next[1]).unwrap();
        }
    }
    for t in 0..3 {
        let (g, a) = (group[t].stats(), single[t].stats());
        assert!(g.prefetched > 0);
        assert_eq!(
            (g.prefetched, g.prefetches_unused),
            (a.prefetched, a.prefetches_unused)
        );
    }
    for t in 0..3 {
        group[t].flush().unwrap();
        single[t].flush().unwrap();
        let (g, a) = (group[t].stats(), single[t].stats());
        assert!(
            g.rows_pushed > 0 && g.evictions > 0,
            "table {t} pushed and evicted"
        );
        assert_eq!(
            (g.hits, g.misses, g.rows_pushed),
            (a.hits, a.misses, a.rows_pushed)
        );
        let (values_g, versions_g) = contents(&together, &specs_g[t]);
        let (values_a, versions_a) = contents(&together, &specs_a[t]);
        assert_eq!(versions_g, versions_a, "table {t}: versions");
        assert!(
            values_g
                .iter()
                .zip(&values_a)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "table {t}: rows on the shards"
        );
    }
}

/// Requests each shard counted between `before` and `after`.
fn sent(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// A lookup of three tables sends each shard one request (a batch), and so does a prefetch of
/// the three completed by their lookup; one by one, three.
#[test]
fn a_lookup_of_several_tables_is_one_request_a_shard() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let mut group = caches(&client, &specs(""));
    // Keys of both shards in every table.
    let keys: Vec<Vec<u64>> = (0..3).map(|t| (t..t + 40).collect()).collect();
    let key_refs: Vec<&[u64]> = keys.iter().map(Vec::as_slice).collect();
    let dims = [8usize, 4, 16];
    let requests = || -> Vec<u64> { client.stats().unwrap().iter().map(|s| s.requests).collect() };
    let mut rows: Vec<Vec<f32>> = (0..3).map(|t| vec![0f32; 40 * dims[t]]).collect();
    let before = requests();
    {
        let mut refs: Vec<&mut [f32]> = rows.iter_mut().map(Vec::as_mut_slice).collect();
        let mut g: Vec<&mut CachedTable> = group.iter_mut().collect();
        lookup_many(&mut g, &key_refs, &mut refs).unwrap();
    }
    let after = requests();
    // The batch, and the stats request that counted it.
    assert_eq!(sent(&before, &after), vec![2, 2]);
    // A prefetch of the three and their lookup: one batch a shard, sent by the prefetch.
    let keys: Vec<Vec<u64>> = (0..3).map(|t| (t + 200..t + 240).collect()).collect();
    let key_refs: Vec<&[u64]> = keys.iter().map(Vec::as_slice).collect();
    let before = requests();
    {
        let mut g: Vec<&mut CachedTable> = group.iter_mut().collect();
        prefetch_many(&mut g, &key_refs).unwrap();
        let mut refs: Vec<&mut [f32]> = rows.iter_mut().map(Vec::as_mut_slice).collect();
        lookup_many(&mut g, &key_refs, &mut refs).unwrap();
    }
    let after = requests();
    assert_eq!(sent(&before, &after), vec![2, 2]);
    assert!(group.iter().all(|c| c.stats().prefetched == 1));
    let keys: Vec<Vec<u64>> = (0..3).map(|t| (t + 100..t + 140).collect()).collect();
    let before = requests();
    for t in 0..3 {
        group[t].lookup(&keys[t], &mut rows[t]).unwrap();
    }
    let after = requests();
    assert_eq!(sent(&before, &after), vec![4, 4]);
}

/// Caches that cannot go together, and bad input: a clear error, and nothing changes.
#[test]
fn bad_groups_and_bad_input_change_nothing() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let one = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let other = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let mut a = caches(&one, &specs("_x"));
    let mut b = caches(&other, &specs("_y"));
    let keys: [&[u64]; 2] = [&[1, 2], &[3]];
    let mut r0 = [0f32; 16];
    let mut r1 = [0f32; 4];
    let mut mixed: Vec<&mut CachedTable> = vec![&mut a[0], &mut b[1]];
    let err = lookup_many(&mut mixed, &keys, &mut [&mut r0[..], &mut r1[..]]).unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidGroup(m) if m.contains("another cluster")),
        "{err}"
    );
    let mut pair: Vec<&mut CachedTable> = a.iter_mut().take(2).collect();
    let err = lookup_many(&mut pair, &keys[..1], &mut [&mut r0[..]]).unwrap_err();
    assert!(matches!(err, ClientError::InvalidGroup(_)), "{err}");
    // A gradient of the wrong length for the second table, and a NaN: nothing applied anywhere.
    let grads: [&[f32]; 2] = [&[0.5; 16], &[0.5; 3]];
    let err = update_many(&mut pair, &keys, &grads).unwrap_err();
    assert!(err.to_string().contains("has dim 4"), "{err}");
    let nan = [f32::NAN; 4];
    let grads: [&[f32]; 2] = [&[0.5; 16], &nan];
    assert!(update_many(&mut pair, &keys, &grads).is_err());
    drop(pair);
    for c in &mut a {
        c.flush().unwrap();
        assert_eq!(c.stats().rows_pushed, 0);
        assert_eq!(c.core().pending_updates(), 0);
    }
}

/// A cache told its table's rows were replaced forgets its lines and reads the new rows (its
/// updates made since are pushed first, onto them).
#[test]
fn an_invalidated_cache_reads_the_rows_set_behind_its_back() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let spec = sgd_table("replaced", ROWS, 2, 0.5);
    let table = client.create_table(&spec).unwrap();
    let mut cache = table.cached(CacheConfig {
        capacity: Capacity::Rows(50),
        policy: PolicyKind::Lru,
        pull_bound: Bound::updates(10),
        push_bound: Bound::updates(10),
    });
    let keys = [1u64, 2, 3];
    let mut rows = [0f32; 6];
    cache.lookup(&keys, &mut rows).unwrap();
    cache.update(&keys, &[1.0; 6]).unwrap();
    cache.flush().unwrap();
    // Set behind the cache's back: each row's version moves by one, within the bound.
    table.assign(&keys, &[7.0; 6]).unwrap();
    cache.lookup(&keys, &mut rows).unwrap();
    assert!(
        rows.iter().all(|&x| x != 7.0),
        "a line within its bound is served as it is"
    );
    cache.update(&keys[..1], &[1.0; 2]).unwrap();
    cache.invalidate().unwrap();
    assert_eq!(cache.core().pending_updates(), 0, "flushed first");
    assert!(cache.peek(1).is_none());
    cache.lookup(&keys, &mut rows).unwrap();
    assert_eq!(
        rows,
        [6.5, 6.5, 7.0, 7.0, 7.0, 7.0],
        "the rows set, and the update since"
    );
}

/// A shard that lost a table (a restart on an empty volume) while the others hold it trained: a
/// create is refused, naming the shards, unless fresh; a creation that failed part way, with
/// nothing trained yet, is completed.
#[test]
fn creating_a_table_some_shards_hold_trained_is_refused_unless_fresh() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let spec = sgd_table("lost", ROWS, 2, 0.5);
    // Created on shard 0 only, untrained: completed.
    client.shard(0).create_table(&spec).unwrap();
    let table = client.create_table(&spec).unwrap();
    table.push(&[0, 1], &[1, 1], &[1.0; 4]).unwrap();
    // Shard 1 loses it.
    assert!(client.shard(1).drop_table("lost").unwrap());
    let err = client.create_table(&spec).unwrap_err().to_string();
    assert!(
        err.contains("missing on shard(s) 1") && err.contains("create_table_fresh"),
        "{err}"
    );
    client.create_table_fresh(&spec).unwrap();
    assert!(client.open_table("lost").is_ok());
}
