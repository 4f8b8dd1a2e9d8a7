//! With the cache off and bounds 0, a cached table behaves exactly like direct pulls and pushes:
//! the same rows come back and the shards end in the same state, bit for bit.

use hetkv_client::{CacheConfig, Cluster};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_tests::TestRng;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

#[test]
fn cache_off_with_bounds_zero_is_the_classic_parameter_server() {
    let cluster = EmbeddedCluster::start(3).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let spec = |name: &str| TableSpec {
        name: name.into(),
        rows: 200,
        dim: 8,
        init: Initializer::Normal { std: 0.1, seed: 5 },
        optimizer: OptimizerSpec::Sgd { lr: 0.05 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    let direct = client.create_table(&spec("direct")).unwrap();
    let mut cached = client
        .create_table(&spec("cached"))
        .unwrap()
        .cached(CacheConfig::disabled());
    let mut rng = TestRng(99);
    for _ in 0..400 {
        let n = 1 + rng.below(32) as usize;
        let keys: Vec<u64> = (0..n).map(|_| rng.below(200)).collect();
        if rng.below(2) == 0 {
            let (mut a, mut b) = (vec![0f32; n * 8], vec![0f32; n * 8]);
            cached.lookup(&keys, &mut a).unwrap();
            direct.pull(&keys, &mut b, None).unwrap();
            assert_eq!(a, b);
        } else {
            let grads: Vec<f32> = (0..n * 8).map(|_| rng.signed_unit()).collect();
            cached.update(&keys, &grads).unwrap();
            // What a classic parameter-server worker sends: each key once, its gradients summed in
            // order, counted once per occurrence.
            let mut uniq: Vec<u64> = Vec::new();
            let mut sums: Vec<f32> = Vec::new();
            let mut counts: Vec<u32> = Vec::new();
            for (i, &k) in keys.iter().enumerate() {
                let u = uniq.iter().position(|&x| x == k).unwrap_or_else(|| {
                    uniq.push(k);
                    sums.extend_from_slice(&[0.0; 8]);
                    counts.push(0);
                    uniq.len() - 1
                });
                counts[u] += 1;
                for (s, g) in sums[u * 8..(u + 1) * 8]
                    .iter_mut()
                    .zip(&grads[i * 8..(i + 1) * 8])
                {
                    *s += g;
                }
            }
            direct.push(&uniq, &counts, &sums).unwrap();
        }
    }
    let keys: Vec<u64> = (0..200).collect();
    let (mut a, mut b) = (vec![0f32; 200 * 8], vec![0f32; 200 * 8]);
    let (mut va, mut vb) = (vec![0u64; 200], vec![0u64; 200]);
    cached.table().pull(&keys, &mut a, Some(&mut va)).unwrap();
    direct.pull(&keys, &mut b, Some(&mut vb)).unwrap();
    assert_eq!(va, vb, "versions");
    assert_eq!(a, b, "values, bit for bit");
    let s = cached.stats();
    assert_eq!((s.hits, s.evictions, s.version_checks), (0, 0, 0));
    assert!(s.write_throughs > 0 && s.misses > 0);
    assert!(vb.iter().sum::<u64>() > 0);
}
