//! Through real daemons, under every optimizer the shards offer and over TCP and shared memory: a
//! cache at bounds 0 trains the rows no cache trains, bit for bit; a lone worker's lines after a
//! flush are the shards' rows, bit for bit, at any write bound; and a line between pushes is the
//! shards' row with its own pending updates taken by the table's optimizer.

use hetkv_client::{Bound, CacheConfig, CachedTable, Capacity, Cluster, PolicyKind, TransportKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::{every_optimizer, versions_and_rows, TestRng};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

const ROWS: u64 = 64;
const DIM: usize = 8;

fn spec(name: &str, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: name.into(),
        rows: ROWS,
        dim: DIM as u32,
        init: Initializer::Normal { std: 0.1, seed: 5 },
        optimizer,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

fn cluster(dir: &tempfile::TempDir) -> EmbeddedCluster {
    EmbeddedCluster::start_with(2, Default::default(), |i| ShardConfig {
        shm_dir: Some(dir.path().to_path_buf()),
        ..ShardConfig::new(i, 2)
    })
    .unwrap()
}

fn connect(cluster: &EmbeddedCluster, kind: TransportKind) -> Cluster {
    Cluster::connect(cluster.addrs(), kind, &ClientConfig::default()).unwrap()
}

fn rows(c: &Cluster, table: &str) -> (Vec<u64>, Vec<f32>) {
    versions_and_rows(c, table, &(0..ROWS).collect::<Vec<_>>())
}

/// A batch of keys with repeats, and gradients for them.
fn batch(rng: &mut TestRng) -> (Vec<u64>, Vec<f32>) {
    let keys: Vec<u64> = (0..12)
        .map(|_| {
            if rng.below(2) == 0 {
                rng.below(8)
            } else {
                rng.below(ROWS)
            }
        })
        .collect();
    let grads = (0..keys.len() * DIM)
        .map(|_| rng.signed_unit() * 0.05)
        .collect();
    (keys, grads)
}

#[test]
fn ten_updates_of_1e_3_through_an_adagrad_cache_at_bounds_0_are_the_shards_steps() {
    // The probe: ten updates of 1e-3 to one row through an Adagrad table.
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(&dir);
    let c = connect(&cluster, TransportKind::Tcp);
    let adagrad = OptimizerSpec::adagrad(0.05);
    let s = TableSpec {
        init: Initializer::Zeros,
        ..spec("probe", adagrad)
    };
    let table = c.create_table(&s).unwrap();
    let mut cache = table.cached(CacheConfig::new(
        Capacity::Fraction(0.5),
        PolicyKind::Lfu,
        Bound::STRICT,
    ));
    let mut row = vec![0f32; DIM];
    for _ in 0..10 {
        cache.lookup(&[3], &mut row).unwrap();
        cache.update(&[3], &[1e-3; DIM]).unwrap();
    }
    cache.lookup(&[3], &mut row).unwrap();
    // What Adagrad makes of ten steps of 1e-3 from zeros.
    let (mut want, mut acc) = (0f32, 0f32);
    for _ in 0..10 {
        acc += 1e-6;
        want -= 0.05 * 1e-3 / (acc.sqrt() + OptimizerSpec::ADAGRAD_EPS);
    }
    assert!(
        (row[0] - want).abs() < 1e-5,
        "the cache holds {}, Adagrad {want}",
        row[0]
    );
    let (_, shard) = rows(&c, "probe");
    assert_eq!(
        &row[..],
        &shard[3 * DIM..4 * DIM],
        "the cached row is the shard's"
    );
}

#[test]
fn a_cache_at_bounds_0_trains_the_rows_no_cache_trains_under_every_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(&dir);
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        for optimizer in every_optimizer() {
            let name = format!("{}_{kind:?}", optimizer.name()).to_lowercase();
            let admin = connect(&cluster, TransportKind::Tcp);
            admin
                .create_table(&spec(&format!("c_{name}"), optimizer))
                .unwrap();
            admin
                .create_table(&spec(&format!("p_{name}"), optimizer))
                .unwrap();
            let c = connect(&cluster, kind);
            let config = CacheConfig::new(Capacity::Rows(16), PolicyKind::Lfu, Bound::STRICT);
            let mut cached = c.open_table(&format!("c_{name}")).unwrap().cached(config);
            let mut plain = c
                .open_table(&format!("p_{name}"))
                .unwrap()
                .cached(CacheConfig::disabled());
            let mut rng = TestRng(11);
            for step in 0..30 {
                let (keys, grads) = batch(&mut rng);
                let mut a = vec![0f32; keys.len() * DIM];
                let mut b = a.clone();
                cached.lookup(&keys, &mut a).unwrap();
                plain.lookup(&keys, &mut b).unwrap();
                assert_eq!(a, b, "{name}: step {step}: looked-up rows differ");
                cached.update(&keys, &grads).unwrap();
                plain.update(&keys, &grads).unwrap();
            }
            let (va, ra) = rows(&admin, &format!("c_{name}"));
            let (vb, rb) = rows(&admin, &format!("p_{name}"));
            assert_eq!(va, vb, "{name}: versions");
            assert_eq!(
                ra, rb,
                "{name}: the cached run's rows are the uncached run's"
            );
            assert!(cached.stats().hits > 100, "{name}: the cache served hits");
        }
    }
}

#[test]
fn a_lone_worker_s_lines_are_the_shards_rows_after_a_flush_at_any_write_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(&dir);
    for kind in [TransportKind::Tcp, TransportKind::Shm] {
        for optimizer in every_optimizer() {
            for bound in [1u64, 7, 100] {
                let name = format!("l_{}_{kind:?}_{bound}", optimizer.name()).to_lowercase();
                connect(&cluster, TransportKind::Tcp)
                    .create_table(&spec(&name, optimizer))
                    .unwrap();
                let c = connect(&cluster, kind);
                let config = CacheConfig::new(
                    Capacity::Rows(ROWS as usize),
                    PolicyKind::Lru,
                    Bound::updates(bound),
                );
                let mut cache = c.open_table(&name).unwrap().cached(config);
                let mut rng = TestRng(bound);
                for _ in 0..40 {
                    let (keys, grads) = batch(&mut rng);
                    let mut out = vec![0f32; keys.len() * DIM];
                    cache.lookup(&keys, &mut out).unwrap();
                    cache.update(&keys, &grads).unwrap();
                    check_lines(&cache, &c, &name);
                }
                cache.flush().unwrap();
                let (versions, shard) = rows(&c, &name);
                for k in 0..ROWS {
                    if let Some(line) = cache.peek(k) {
                        let at = k as usize * DIM;
                        assert_eq!(
                            (line.version, &line.value[..]),
                            (versions[k as usize], &shard[at..at + DIM]),
                            "{name}: key {k} after the flush"
                        );
                    }
                }
            }
        }
    }
}

/// Every clean line is the shards' row bit for bit (a lone worker: nothing else changes them), and
/// every dirty one derives from the shards' row of its version (the model test checks its value,
/// `cache_harness.rs`).
fn check_lines(cache: &CachedTable, c: &Cluster, name: &str) {
    let (versions, shard) = rows(c, name);
    for k in 0..ROWS {
        let Some(line) = cache.peek(k) else { continue };
        let at = k as usize * DIM;
        if line.unpushed == 0 {
            assert_eq!(
                (line.version, &line.value[..]),
                (versions[k as usize], &shard[at..at + DIM]),
                "{name}: clean line of key {k}"
            );
        } else {
            assert_eq!(
                line.version, versions[k as usize],
                "{name}: base of key {k}"
            );
        }
    }
}
