//! Model-based test of the cache's consistency bounds against real daemons over sockets.
//!
//! Several clients, each with its own cache, issue random interleavings of lookups, updates and
//! flushes on one table spread over three shards. The table uses SGD with lr 1 from zeros, and
//! client c's gradients are -1 in element c (plus small random values in two shared elements), so
//! element c of any row counts exactly the updates of client c it includes and the count elements
//! of a row sum to its version. That makes every claim checkable exactly:
//! - read bound: at every lookup, the server's version minus the returned row's clock is at most
//!   `pull_bound`, and the returned values are exactly those of that clock;
//! - read-your-writes: element c of a row returned to client c equals the updates c issued;
//! - write bound: after every update by client c, at most `push_bound` of its updates to any key
//!   are missing from the server;
//! - after flushes, versions equal the updates issued and values equal sequential SGD.

use hetkv_client::{
    Bound, CacheConfig, CachedTable, Capacity, Cluster, PolicyKind, Table, TransportKind,
};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::TestRng;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

const CLIENTS: usize = 3;
const ROWS: u64 = 48;
const DIM: usize = CLIENTS + 2;
const CAPACITY: usize = 6;
const OPS: usize = 300;

struct Truth {
    table: Table,
}

impl Truth {
    /// Versions and rows of every key, read directly from the shards.
    fn read(&self) -> (Vec<u64>, Vec<f32>) {
        let keys: Vec<u64> = (0..ROWS).collect();
        let mut rows = vec![0f32; ROWS as usize * DIM];
        let mut versions = vec![0u64; ROWS as usize];
        self.table
            .pull(&keys, &mut rows, Some(&mut versions))
            .unwrap();
        (versions, rows)
    }
}

/// Returns (checks skipped on the table clock's word, lookups where that word failed).
fn run(
    cluster: &EmbeddedCluster,
    transport: TransportKind,
    policy: PolicyKind,
    bound: Bound,
) -> (u64, u64) {
    let name = format!("model_{policy}_{bound}").replace('-', "_");
    let spec = TableSpec {
        name: name.clone(),
        rows: ROWS,
        dim: DIM as u32,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
    };
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let truth = Truth {
        table: admin.create_table(&spec).unwrap(),
    };
    let config = CacheConfig::new(Capacity::Rows(CAPACITY), policy, bound);
    let mut clients: Vec<CachedTable> = (0..CLIENTS)
        .map(|_| {
            Cluster::connect(cluster.addrs(), transport, &ClientConfig::default())
                .unwrap()
                .open_table(&name)
                .unwrap()
                .cached(config)
        })
        .collect();
    let mut issued = vec![vec![0u64; ROWS as usize]; CLIENTS];
    let mut shared_ref = vec![[0f64; 2]; ROWS as usize];
    let mut rng = TestRng(0x5EED ^ bound.get().wrapping_mul(31) ^ policy.to_string().len() as u64);
    let ctx = |op: usize, c: usize| format!("{name}: op {op}, client {c}");

    for op in 0..OPS {
        let c = rng.below(CLIENTS as u64) as usize;
        // Keys concentrate on a hot third of the table so caches both hit and evict.
        let n = 1 + rng.below(8) as usize;
        let keys: Vec<u64> = (0..n)
            .map(|_| {
                if rng.below(3) > 0 {
                    rng.below(ROWS / 3)
                } else {
                    rng.below(ROWS)
                }
            })
            .collect();
        match rng.below(10) {
            0..=4 => {
                let mut out = vec![0f32; n * DIM];
                let mut clocks = vec![0u64; n];
                // The bound holds at validation, before the lookup pushes its own dirty victims;
                // operations are sequential, so the server at validation is the server now.
                let (versions, server) = truth.read();
                clients[c]
                    .lookup_with_clocks(&keys, &mut out, &mut clocks)
                    .unwrap();
                for (i, &k) in keys.iter().enumerate() {
                    let k = k as usize;
                    let row = &out[i * DIM..(i + 1) * DIM];
                    assert_eq!(
                        row[c] as u64,
                        issued[c][k],
                        "{}: read-your-writes on key {k}",
                        ctx(op, c)
                    );
                    let counted: f32 = row[..CLIENTS].iter().sum();
                    assert_eq!(
                        counted as u64,
                        clocks[i],
                        "{}: key {k} values do not match their clock",
                        ctx(op, c)
                    );
                    for other in (0..CLIENTS).filter(|&o| o != c) {
                        assert!(
                            row[other] <= server[k * DIM + other],
                            "{}: key {k} ahead of the server",
                            ctx(op, c)
                        );
                    }
                    if !bound.is_infinite() {
                        let lag = versions[k].saturating_sub(clocks[i]);
                        assert!(
                            lag <= bound.get(),
                            "{}: key {k} lags the server by {lag} > {bound}",
                            ctx(op, c)
                        );
                    }
                }
            }
            5..=8 => {
                let mut grads = vec![0f32; n * DIM];
                for (i, &k) in keys.iter().enumerate() {
                    let g = &mut grads[i * DIM..(i + 1) * DIM];
                    g[c] = -1.0;
                    for (e, r) in shared_ref[k as usize].iter_mut().enumerate() {
                        g[CLIENTS + e] = rng.signed_unit() * 0.01;
                        *r -= g[CLIENTS + e] as f64;
                    }
                    issued[c][k as usize] += 1;
                }
                clients[c].update(&keys, &grads).unwrap();
                let (_, server) = truth.read();
                for k in 0..ROWS as usize {
                    let on_server = server[k * DIM + c] as u64;
                    let missing = issued[c][k] - on_server;
                    assert!(
                        bound.is_infinite() || missing <= bound.get(),
                        "{}: key {k} has {missing} unpushed updates > {bound}",
                        ctx(op, c)
                    );
                    assert_eq!(
                        missing,
                        clients[c].core().unpushed(k as u64) as u64,
                        "{}: key {k}",
                        ctx(op, c)
                    );
                }
            }
            _ => {
                clients[c].flush().unwrap();
                let (_, server) = truth.read();
                for k in 0..ROWS as usize {
                    assert_eq!(
                        server[k * DIM + c] as u64,
                        issued[c][k],
                        "{}: flush of key {k}",
                        ctx(op, c)
                    );
                }
            }
        }
    }
    for client in &mut clients {
        client.flush().unwrap();
    }
    let (versions, server) = truth.read();
    for k in 0..ROWS as usize {
        let total: u64 = (0..CLIENTS).map(|c| issued[c][k]).sum();
        assert_eq!(
            versions[k], total,
            "{name}: version of key {k} after flushes"
        );
        for c in 0..CLIENTS {
            assert_eq!(
                server[k * DIM + c] as u64,
                issued[c][k],
                "{name}: key {k} client {c}"
            );
        }
        for e in 0..2 {
            let (got, want) = (server[k * DIM + CLIENTS + e] as f64, shared_ref[k][e]);
            assert!(
                (got - want).abs() < 1e-4,
                "{name}: key {k}: {got} vs sequential SGD {want}"
            );
        }
    }
    let stats: Vec<_> = clients.iter().map(|c| c.stats()).collect();
    let evictions: u64 = stats.iter().map(|s| s.evictions).sum();
    let hits: u64 = stats.iter().map(|s| s.hits).sum();
    assert!(
        evictions > 20,
        "{name}: the cache must be small enough to evict constantly ({evictions})"
    );
    assert!(hits > 20, "{name}: and large enough to hit ({hits})");
    if !bound.is_infinite() && bound.get() <= 1 {
        let stale: u64 = stats.iter().map(|s| s.stale_refreshes).sum();
        assert!(stale > 0, "{name}: tight bounds must refresh stale lines");
    }
    (
        stats.iter().map(|s| s.checks_skipped).sum(),
        stats.iter().map(|s| s.clock_retries).sum(),
    )
}

#[test]
fn bounds_hold_for_every_policy_under_constant_eviction() {
    every_policy_and_bound(&EmbeddedCluster::start(3).unwrap(), TransportKind::Tcp);
}

/// The same model over one-sided reads: the caches read rows, versions and the clock word through
/// shared memory and push over TCP.
#[test]
fn bounds_hold_over_shared_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EmbeddedCluster::start_with(3, Default::default(), |i| ShardConfig {
        shm_dir: Some(dir.path().to_path_buf()),
        ..ShardConfig::new(i, 3)
    })
    .unwrap();
    every_policy_and_bound(&cluster, TransportKind::Shm);
}

/// The same model over RDMA: rows, versions and the clock word by RDMA READ, pushes over TCP
/// (runs in the soft-RoCE VM, `tests/rdma-vm/run.sh`).
#[cfg(feature = "rdma")]
#[test]
fn bounds_hold_over_rdma() {
    let cluster = EmbeddedCluster::start_with(3, Default::default(), |i| ShardConfig {
        rdma: true,
        ..ShardConfig::new(i, 3)
    })
    .unwrap();
    every_policy_and_bound(&cluster, TransportKind::Rdma);
}

fn every_policy_and_bound(cluster: &EmbeddedCluster, transport: TransportKind) {
    for policy in [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::LightLfu { pin_after: 2 },
    ] {
        for bound in [
            Bound::STRICT,
            Bound::updates(1),
            Bound::updates(10),
            Bound::INFINITE,
        ] {
            run(cluster, transport, policy, bound);
        }
    }
}
