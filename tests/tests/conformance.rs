//! One conformance suite for every shard transport that can run here: TCP and shared memory
//! always, RDMA when built with `--features rdma` (where a device exists: the soft-RoCE VM).
//!
//! Each case runs against a real two-shard cluster whose daemons expose their regions through
//! shared memory, so every backend reads the same bytes. Covered: reads of every row shape (direct
//! and as raw spans), version reads against the bounds, torn-read detection while the daemon
//! writes the same rows, pushes, reads after daemon-side updates, and the bad inputs of the
//! foundation that apply to a client (unknown table, key out of range or on another shard, wrong
//! dim, NaN gradients, spans past a region). Dynamic tables: raw ids found through their
//! buckets (held, absent, repeated; rows equal to the daemon's), and slots given to other keys
//! while a reader reads them never read as the key looked up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpShardClient};
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::{sgd_table, TestRng};
use hetkv_transport::codec::assign::Assignment;
use hetkv_transport::row::{self, RowLayout};
use hetkv_transport::wire::NOT_CACHED;
use hetkv_transport::wire::{PushResponse, Since};
use hetkv_transport::{
    Admission, Carried, DynamicSpec, ErrorCode, Eviction, Initializer, OptimizerSpec, PushOutcome,
    PushRef, ShardTransport, ShmTransport, Span, StaleQuery, StaleRows, TableSpec, TransportError,
};

/// A conditional pull of `keys` against `clocks`, with `push` applied first.
#[allow(clippy::too_many_arguments)]
fn stale(
    t: &dyn ShardTransport,
    table: &str,
    keys: &[u64],
    clocks: &[u64],
    bound: u64,
    since: Option<Since>,
    push: Option<PushRef<'_>>,
    out: &mut StaleRows,
) -> Carried {
    let query = StaleQuery {
        table,
        keys,
        clocks,
        births: None,
        bound,
        since,
        push,
        state_keys: 0,
    };
    t.pull_if_stale(&query, out)
}

/// A backend under test, with its one-sided read counters where it has them.
enum Backend {
    Tcp(Box<TcpShardClient>),
    Shm(Box<ShmTransport<TcpShardClient>>),
    #[cfg(feature = "rdma")]
    Rdma(Box<hetkv_transport::rdma::RdmaTransport<TcpShardClient>>),
}

#[cfg(feature = "rdma")]
fn rdma_device() -> std::sync::Arc<hetkv_transport::rdma::Device> {
    static DEVICE: std::sync::OnceLock<std::sync::Arc<hetkv_transport::rdma::Device>> =
        std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            std::sync::Arc::new(
                hetkv_transport::rdma::Device::open_first()
                    .expect("the rdma feature is on, so an RDMA device must work here"),
            )
        })
        .clone()
}

impl Backend {
    fn connect(kind: &str, addr: &str) -> Self {
        let control = TcpShardClient::connect(addr, ClientConfig::default()).unwrap();
        match kind {
            "tcp" => Self::Tcp(Box::new(control)),
            "shm" => Self::Shm(Box::new(
                ShmTransport::new(control)
                    .map_err(|(_, why)| why)
                    .expect("the daemon exposes shared memory on this host"),
            )),
            #[cfg(feature = "rdma")]
            "rdma" => Self::Rdma(Box::new(
                hetkv_transport::rdma::RdmaTransport::connect(rdma_device(), control)
                    .map_err(|(_, e)| e)
                    .expect("an RDMA queue pair to the daemon"),
            )),
            _ => panic!("no backend {kind}"),
        }
    }

    fn t(&self) -> &dyn ShardTransport {
        match self {
            Self::Tcp(t) => &**t,
            Self::Shm(t) => &**t,
            #[cfg(feature = "rdma")]
            Self::Rdma(t) => &**t,
        }
    }

    /// The one-sided read counters (one-sided backends only).
    fn read_stats(&self) -> Option<hetkv_transport::OneSidedStats> {
        match self {
            Self::Tcp(_) => None,
            Self::Shm(t) => Some(t.read_stats()),
            #[cfg(feature = "rdma")]
            Self::Rdma(t) => Some(t.read_stats()),
        }
    }

    /// Torn copies the client itself discarded (one-sided backends only).
    fn torn_retries(&self) -> Option<u64> {
        match self {
            Self::Tcp(_) => None,
            Self::Shm(t) => Some(t.read_stats().torn_retries),
            #[cfg(feature = "rdma")]
            Self::Rdma(t) => Some(t.read_stats().torn_retries),
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    cluster: EmbeddedCluster,
}

impl Fixture {
    fn new() -> Self {
        Self::with(ServerConfig::default())
    }

    fn with(server: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shm = dir.path().to_path_buf();
        let cluster = EmbeddedCluster::start_with(2, server, |i| ShardConfig {
            shm_dir: Some(shm.clone()),
            rdma: cfg!(feature = "rdma"),
            ..ShardConfig::new(i, 2)
        })
        .unwrap();
        Self { _dir: dir, cluster }
    }

    fn addr(&self, shard: usize) -> &str {
        &self.cluster.addrs()[shard]
    }

    /// A TCP client that plays "the daemon side" (another trainer's pushes).
    fn other(&self, shard: usize) -> TcpShardClient {
        TcpShardClient::connect(self.addr(shard), ClientConfig::default()).unwrap()
    }

    fn create(&self, spec: &TableSpec) {
        for s in 0..2 {
            self.other(s).create_table(spec).unwrap();
        }
    }
}

/// SGD at `lr` from zeros.
fn zero_table(name: &str, rows: u64, dim: u32, lr: f32) -> TableSpec {
    TableSpec {
        init: Initializer::Zeros,
        ..sgd_table(name, rows, dim, lr)
    }
}

fn normal_table(name: &str, rows: u64, dim: u32) -> TableSpec {
    TableSpec {
        init: Initializer::Normal {
            std: 0.5,
            seed: dim as u64,
        },
        ..sgd_table(name, rows, dim, 0.5)
    }
}

/// Keys of shard `s` of 2 in a table of `rows`.
fn keys_of(s: u64, rows: u64) -> Vec<u64> {
    (s..rows).step_by(2).collect()
}

fn reads_every_row_shape(kind: &str) {
    let f = Fixture::new();
    for dim in [1u32, 2, 3, 7, 16, 64, 128, 129, 512] {
        let rows = 37;
        // Odd dims take 5 placement buckets, which 2 shards do not divide: rows are then placed
        // by bucket, not by `r % 2`, and readers must find them through the descriptor.
        let spec = TableSpec {
            buckets: if dim % 2 == 1 {
                5
            } else {
                hetkv_transport::DEFAULT_BUCKETS
            },
            ..normal_table(&format!("shape{dim}"), rows, dim)
        };
        let routing = spec.routing(2);
        f.create(&spec);
        for s in 0..2u64 {
            let b = Backend::connect(kind, f.addr(s as usize));
            let keys: Vec<u64> = (0..rows)
                .filter(|&k| routing.shard_of(k) == s as usize)
                .collect();
            let (mut versions, mut values) = (Vec::new(), Vec::new());
            b.t()
                .pull(&spec.name, &keys, &mut versions, &mut values)
                .unwrap();
            assert_eq!(versions, vec![0; keys.len()], "dim {dim}");
            let mut expected = vec![0f32; dim as usize];
            for (n, &k) in keys.iter().enumerate() {
                spec.init.fill(k, &mut expected);
                assert_eq!(
                    &values[n * dim as usize..(n + 1) * dim as usize],
                    &expected[..],
                    "{kind}: dim {dim}, key {k}"
                );
            }
            // The same rows as raw spans of the region, verified by the codec.
            let desc = b.t().region_info(&spec.name).unwrap();
            let layout = RowLayout::new(dim);
            assert_eq!(desc.stride as usize, layout.stride());
            let spans: Vec<Span> = (0..desc.rows)
                .map(|i| Span {
                    region: desc.region,
                    offset: layout.row_offset(i),
                    len: layout.stride() as u32,
                })
                .collect();
            let mut bytes = Vec::new();
            b.t().read(&spans, &mut bytes).unwrap();
            assert_eq!(bytes.len(), spans.len() * layout.stride());
            let mut decoded = vec![0f32; dim as usize];
            for (i, image) in bytes.chunks_exact(layout.stride()).enumerate() {
                assert_eq!(row::verify_image(&layout, image), Ok(0));
                row::decode_payload(&layout, image, &mut decoded);
                spec.init
                    .fill(routing.global_key(s as u32, i as u64), &mut expected);
                assert_eq!(decoded, expected, "{kind}: span of row {i}, dim {dim}");
            }
            // An unaligned span inside a row: the bytes the row holds there.
            let inner = Span {
                region: desc.region,
                offset: layout.row_offset(1) + 3,
                len: 9,
            };
            b.t().read(&[inner], &mut bytes).unwrap();
            let whole = layout.stride();
            assert_eq!(bytes, {
                let mut all = Vec::new();
                b.t().read(&spans[1..2], &mut all).unwrap();
                all[3..12].to_vec()
            });
            assert!(whole >= 12);
        }
    }
}

fn version_reads_follow_the_bounds(kind: &str) {
    let f = Fixture::new();
    let spec = zero_table("versions", 40, 4, 0.1);
    f.create(&spec);
    let b = Backend::connect(kind, f.addr(0));
    let keys = keys_of(0, 40);
    // Row k gets k % 5 updates (in one entry of that count).
    let updated: Vec<u64> = keys.iter().copied().filter(|k| k % 5 != 0).collect();
    let counts: Vec<u32> = updated.iter().map(|k| (k % 5) as u32).collect();
    let grads = vec![0.5f32; updated.len() * 4];
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    let resp = f
        .other(0)
        .push(&spec.name, &updated, &counts, &grads)
        .unwrap();
    assert_eq!(resp.updates, total);
    let version = |k: u64| k % 5;
    // A cache that holds every row at version 0: with bound b, rows ahead by more than b return.
    for bound in [0u64, 1, 2, 3, 4, u64::MAX] {
        let clocks = vec![0u64; keys.len()];
        let mut out = StaleRows::default();
        stale(
            b.t(),
            &spec.name,
            &keys,
            &clocks,
            bound,
            None,
            None,
            &mut out,
        )
        .into_result()
        .unwrap();
        let expected: Vec<u32> = (0..keys.len() as u32)
            .filter(|&j| version(keys[j as usize]) > bound)
            .collect();
        assert_eq!(out.indices, expected, "{kind}: bound {bound}");
        let got: Vec<u64> = out
            .indices
            .iter()
            .map(|&j| version(keys[j as usize]))
            .collect();
        assert_eq!(out.versions, got);
        assert_eq!(out.table_clock, total);
        assert_eq!(out.rows.len(), out.indices.len() * 4);
    }
    // Missing rows always come back; clocks at the current version never do.
    let clocks: Vec<u64> = keys
        .iter()
        .map(|&k| {
            if k.is_multiple_of(4) {
                NOT_CACHED
            } else {
                version(k)
            }
        })
        .collect();
    let mut out = StaleRows::default();
    stale(b.t(), &spec.name, &keys, &clocks, 0, None, None, &mut out)
        .into_result()
        .unwrap();
    let missing: Vec<u32> = (0..keys.len() as u32)
        .filter(|&j| keys[j as usize].is_multiple_of(4))
        .collect();
    assert_eq!(out.indices, missing, "{kind}");
    // A clock claim holds while the foreign updates stay within its allowance.
    let claim = |max_foreign| Since {
        clock: total - 3,
        own: 0,
        max_foreign,
    };
    for (max_foreign, held) in [(3, true), (2, false)] {
        let mut out = StaleRows::default();
        stale(
            b.t(),
            &spec.name,
            &keys[..1],
            &[NOT_CACHED],
            0,
            Some(claim(max_foreign)),
            None,
            &mut out,
        )
        .into_result()
        .unwrap();
        assert_eq!(out.since_held, held, "{kind}: allowance {max_foreign}");
    }
}

fn pushes_apply_and_read_back(kind: &str) {
    let f = Fixture::new();
    let spec = zero_table("pushes", 20, 3, 0.5);
    f.create(&spec);
    let b = Backend::connect(kind, f.addr(1));
    let keys = [1u64, 3, 5, 3];
    let counts = [1u32, 2, 1, 3];
    let grads: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let resp = b.t().push(&spec.name, &keys, &counts, &grads).unwrap();
    assert_eq!((resp.rows, resp.updates), (4, 7));
    // SGD from zeros: each entry subtracts lr x its gradient sum; key 3's two entries add up.
    let (mut versions, mut values) = (Vec::new(), Vec::new());
    f.other(1)
        .pull(&spec.name, &[1, 3, 5], &mut versions, &mut values)
        .unwrap();
    assert_eq!(versions, vec![1, 5, 1]);
    let expect = |g: &[f32]| g.iter().map(|x| -0.5 * x).collect::<Vec<f32>>();
    assert_eq!(&values[0..3], &expect(&grads[0..3])[..]);
    let k3: Vec<f32> = (3..6).map(|i| grads[i] + grads[i + 6]).collect();
    assert_eq!(&values[3..6], &expect(&k3)[..]);
    assert_eq!(&values[6..9], &expect(&grads[6..9])[..]);
    // A push carried by a conditional pull is applied before its rows are read.
    let mut out = StaleRows::default();
    let push = PushRef::new(&[7], &[2], &[2.0, 2.0, 2.0]);
    let carried = stale(
        b.t(),
        &spec.name,
        &[7, 9],
        &[0, 0],
        0,
        None,
        Some(push),
        &mut out,
    );
    // The acknowledgement and the rows carry the incarnation of the daemon that answered.
    let incarnation = b.t().incarnation();
    assert_ne!(incarnation, 0);
    assert_eq!(
        carried.push,
        PushOutcome::Applied(PushResponse {
            rows: 1,
            updates: 2,
            incarnation,
            ..PushResponse::default()
        })
    );
    assert_eq!(out.incarnation, incarnation, "the rows' incarnation");
    carried.read.unwrap();
    assert_eq!(out.indices, vec![0]);
    assert_eq!(out.versions, vec![2]);
    assert_eq!(out.rows, vec![-1.0; 3]);
    assert_eq!(out.table_clock, 9);
}

fn reads_see_daemon_side_updates(kind: &str) {
    let f = Fixture::new();
    let spec = zero_table("fresh", 64, 8, 1.0);
    f.create(&spec);
    let b = Backend::connect(kind, f.addr(0));
    let other = f.other(0);
    let mut rng = TestRng(7);
    let keys = keys_of(0, 64);
    let mut model = vec![0f32; 64 * 8];
    let mut model_versions = vec![0u64; 64];
    for round in 0..50 {
        let k = keys[rng.below(keys.len() as u64) as usize];
        let g: Vec<f32> = (0..8).map(|_| rng.signed_unit()).collect();
        other.push(&spec.name, &[k], &[1], &g).unwrap();
        for (m, x) in model[k as usize * 8..][..8].iter_mut().zip(&g) {
            *m -= x;
        }
        model_versions[k as usize] += 1;
        let (mut versions, mut values) = (Vec::new(), Vec::new());
        b.t()
            .pull(&spec.name, &keys, &mut versions, &mut values)
            .unwrap();
        for (n, &key) in keys.iter().enumerate() {
            assert_eq!(
                versions[n], model_versions[key as usize],
                "{kind}: round {round}"
            );
            assert_eq!(
                &values[n * 8..(n + 1) * 8],
                &model[key as usize * 8..][..8],
                "{kind}: round {round}, key {key}"
            );
        }
    }
}

/// Reads go on one-sidedly when the daemon closes the client's idle connections (an RDMA queue
/// pair lives on a connection of its own, which is not idle while it is read through), and after
/// the queue pair failed (RDMA: the reader connects a new one and reads again, counted).
fn reads_go_on_across_an_idle_close_and_a_lost_queue_pair(kind: &str) {
    let f = Fixture::with(ServerConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    });
    let spec = zero_table("idle", 64, 8, 1.0);
    f.create(&spec);
    let b = Backend::connect(kind, f.addr(0));
    let keys = keys_of(0, 64);
    let read = |what: &str| {
        let (mut versions, mut values) = (Vec::new(), Vec::new());
        b.t()
            .pull(&spec.name, &keys, &mut versions, &mut values)
            .unwrap_or_else(|e| panic!("{kind}: {what}: {e}"));
        assert_eq!(versions.len(), keys.len());
    };
    read("before");
    let before = b.read_stats();
    std::thread::sleep(Duration::from_millis(900));
    read("after the daemon closed the idle connections");
    if let (Some(before), Some(after)) = (before, b.read_stats()) {
        assert!(
            after.rows_read >= before.rows_read + keys.len() as u64,
            "{kind}: {after:?}"
        );
        assert_eq!(after.fallback_rows, 0, "{kind}: read one-sidedly");
        assert_eq!(
            after.reconnects, 0,
            "{kind}: the link survived the idle close"
        );
    }
    #[cfg(feature = "rdma")]
    if let Backend::Rdma(t) = &b {
        // The queue pair fails: a READ the responder refuses (a wrong rkey) puts it in the
        // error state, and the reader retires it.
        let desc = t.region_info(&spec.name).unwrap();
        assert!(t
            .read_remote(desc.addr, desc.rkey ^ 0x5a5a_5a5a, 8)
            .is_err());
        let before = t.read_stats();
        read("after the queue pair failed");
        let after = t.read_stats();
        assert_eq!(after.reconnects, before.reconnects + 1, "{after:?}");
        assert!(
            after.rows_read >= before.rows_read + keys.len() as u64,
            "{after:?}"
        );
        assert_eq!(after.fallback_rows, 0);
        read("again, on the new queue pair");
        assert_eq!(t.read_stats().reconnects, after.reconnects);
    }
}

/// Every element of a row equals its version: the daemon adds 1 per update (SGD, lr 1, gradient
/// -1 everywhere), so an accepted row mixing two writes shows as a mismatch.
fn torn_reads_are_never_accepted(kind: &str) {
    let f = Fixture::new();
    let dim = 2048u32; // 8 KiB rows: long writes, so copies do tear
    let spec = TableSpec {
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
        ..sgd_table("torn", 4, dim, 1.0)
    };
    f.create(&spec);
    let keys = [0u64, 2];
    let stop = AtomicBool::new(false);
    let b = Backend::connect(kind, f.addr(0));
    // The writer runs until the reader is done; the reader stops once it has made 2,000 reads
    // and (on a one-sided backend) seen a torn copy, or at a bound generous enough that a machine
    // of any speed tears a copy long before it: then the assertions below report what it saw.
    const MAX_READS: u64 = 2_000_000;
    let safety = Instant::now() + Duration::from_secs(300);
    let (mut reads, mut last) = (0u64, [0u64; 2]);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let w = f.other(0);
            let g = vec![-1f32; keys.len() * dim as usize];
            let mut pushes = 0u64;
            // Bounded by itself too: a failed reader never sets `stop`.
            while !stop.load(Ordering::Relaxed) && Instant::now() < safety {
                w.push(&spec.name, &keys, &[1, 1], &g).unwrap();
                pushes += 1;
            }
            pushes
        });
        let (mut versions, mut values) = (Vec::new(), Vec::new());
        while reads < MAX_READS
            && Instant::now() < safety
            && (reads < 2_000 || b.torn_retries().is_some_and(|t| t == 0))
            && !writer.is_finished()
        {
            b.t()
                .pull(&spec.name, &keys, &mut versions, &mut values)
                .unwrap();
            for (n, &v) in versions.iter().enumerate() {
                let row = &values[n * dim as usize..(n + 1) * dim as usize];
                assert!(
                    row.iter().all(|&x| x == v as f32),
                    "{kind}: an accepted row mixes writes: version {v}, values {:?}..",
                    &row[..4]
                );
                assert!(
                    v >= last[n],
                    "{kind}: version went back from {} to {v}",
                    last[n]
                );
                last[n] = v;
            }
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let pushes = writer.join().unwrap();
        eprintln!(
            "{kind}: {reads} reads of 2 rows of {dim} f32 during {pushes} pushes; torn copies discarded by the client: {:?}",
            b.torn_retries()
        );
    });
    assert!(last[0] > 0, "{kind}: the reads never overlapped a write");
    if let Some(torn) = b.torn_retries() {
        assert!(
            torn > 0,
            "{kind}: {reads} reads (bound {MAX_READS}) during writes and no torn copy detected"
        );
    }
}

/// A dynamic table of `rows` (the cluster's capacity) of `dim`, SGD at 0.5 from a seeded normal.
fn dynamic_table(name: &str, rows: u64, dim: u32) -> TableSpec {
    TableSpec {
        // 8 placement buckets: `rows` is then the capacity to within 256 rows.
        buckets: 8,
        dynamic: Some(DynamicSpec {
            admission: Admission::Always,
            eviction: Eviction::Lru,
        }),
        ..normal_table(name, rows, dim)
    }
}

/// Raw ids of every shape (0, `u64::MAX`, the top bit set, hashed ids), split by home shard.
fn raw_ids_by_shard(spec: &TableSpec, n: u64, salt: u64) -> [Vec<u64>; 2] {
    let routing = spec.routing(2);
    let mut by_shard = [Vec::new(), Vec::new()];
    let ids = [0, u64::MAX, 1 << 63]
        .into_iter()
        .chain((0..n).map(|i| hetkv_transport::hash::splitmix64(salt << 32 | i)));
    for id in ids {
        by_shard[routing.shard_of(id)].push(id);
    }
    by_shard
}

fn dynamic_tables_are_read_through_their_buckets(kind: &str) {
    let f = Fixture::new();
    for dim in [1u32, 16, 129] {
        let spec = dynamic_table(&format!("dyn{dim}"), 1024, dim);
        f.create(&spec);
        let held = raw_ids_by_shard(&spec, 300, 1);
        let absent = raw_ids_by_shard(&spec, 50, 2);
        for s in 0..2 {
            let other = f.other(s);
            let keys = &held[s];
            let grads: Vec<f32> = (0..keys.len() * dim as usize)
                .map(|i| (i % 7) as f32 - 3.0)
                .collect();
            other
                .push(&spec.name, keys, &vec![1; keys.len()], &grads)
                .unwrap();
            // Held and absent keys, repeated and interleaved, in one batch.
            let absent: Vec<u64> = absent[s]
                .iter()
                .copied()
                .filter(|k| !keys.contains(k))
                .collect();
            assert!(absent.len() > 10, "{} absent keys", absent.len());
            let batch: Vec<u64> = keys
                .iter()
                .zip(absent.iter().cycle())
                .flat_map(|(&h, &a)| [h, a, h])
                .collect();
            let b = Backend::connect(kind, f.addr(s));
            let (mut v, mut r) = (Vec::new(), Vec::new());
            b.t().pull(&spec.name, &batch, &mut v, &mut r).unwrap();
            let (mut want_v, mut want_r) = (Vec::new(), Vec::new());
            other
                .pull(&spec.name, &batch, &mut want_v, &mut want_r)
                .unwrap();
            assert_eq!(v, want_v, "{kind} dim {dim} shard {s}: versions");
            assert_eq!(r, want_r, "{kind} dim {dim} shard {s}: rows");
            for (j, &version) in v.iter().enumerate() {
                assert_eq!(version, u64::from(j % 3 != 1), "{kind}: key {}", batch[j]);
            }
            if let Some(stats) = b.read_stats() {
                assert!(
                    stats.buckets_read > 0 && stats.rows_read >= 2 * keys.len() as u64,
                    "{kind} dim {dim}: not read one-sidedly: {stats:?}"
                );
                assert_eq!(stats.fallback_rows, 0, "{kind}: {stats:?}");
            }
            // A key of the other shard is the daemon's to refuse.
            let e = b
                .t()
                .pull(&spec.name, &held[1 - s][..1], &mut v, &mut r)
                .unwrap_err();
            assert_eq!(
                e.remote().map(|w| w.code),
                Some(ErrorCode::KeyOutOfRange),
                "{kind}"
            );
        }
    }
}

/// The row a key's writes always carry in `slots_given_to_other_keys_are_never_read_as_theirs`:
/// one no other key of the test has.
fn row_of(key: u64, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|i| (hetkv_transport::hash::splitmix64(key ^ i as u64) >> 40) as f32)
        .collect()
}

fn slots_given_to_other_keys_are_never_read_as_theirs(kind: &str) {
    let f = Fixture::new();
    let dim = 64usize;
    // 8 buckets of 32 slots a shard, and 8x as many keys: slots change keys all the time, by
    // eviction at the cap and by expiry (a time to live of 2 steps, the step moved every 4
    // batches: slots emptied, then given to other keys).
    let spec = TableSpec {
        dynamic: Some(DynamicSpec {
            admission: Admission::Always,
            eviction: Eviction::Ttl { steps: 2 },
        }),
        ..dynamic_table("churn", 512, dim as u32)
    };
    f.create(&spec);
    let keys = raw_ids_by_shard(&spec, 8 * 512, 3)[0].clone();
    let stop = AtomicBool::new(false);
    let b = Backend::connect(kind, f.addr(0));
    let (mut found, mut absent, mut reads) = (0u64, 0u64, 0u64);
    // A million keys read (15,625 batches) unless the link is slow (the soft-RoCE VM emulates
    // its CPU): then as many as 90 seconds allow, at least 300 batches.
    const KEY_READS: u64 = 1_000_000;
    let safety = Instant::now() + Duration::from_secs(90);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let w = f.other(0);
            let mut rng = TestRng(11);
            let (mut assigned, mut expired) = (0u64, 0u64);
            // Bounded by itself too: a failed reader never sets `stop`.
            while !stop.load(Ordering::Relaxed) && Instant::now() < safety + Duration::from_secs(60)
            {
                let batch: Vec<u64> = (0..32)
                    .map(|_| keys[rng.below(keys.len() as u64) as usize])
                    .collect();
                let values: Vec<f32> = batch.iter().flat_map(|&k| row_of(k, dim)).collect();
                w.assign(&spec.name, &Assignment::values(&batch, &values))
                    .unwrap();
                assigned += batch.len() as u64;
                if assigned % (4 * 32) == 0 {
                    expired += w.advance_step(&spec.name, assigned / 128).unwrap().expired;
                }
            }
            (assigned, expired)
        });
        let mut rng = TestRng(12);
        let (mut v, mut r) = (Vec::new(), Vec::new());
        while (reads < 300 || found < 2_000 || absent < 2_000 || found + absent < KEY_READS)
            && (reads < 300 || Instant::now() < safety)
            && !writer.is_finished()
        {
            let batch: Vec<u64> = (0..64)
                .map(|_| keys[rng.below(keys.len() as u64) as usize])
                .collect();
            b.t().pull(&spec.name, &batch, &mut v, &mut r).unwrap();
            for (j, &key) in batch.iter().enumerate() {
                let row = &r[j * dim..(j + 1) * dim];
                if v[j] == 0 {
                    assert!(row.iter().all(|&x| x == 0.0), "{kind}: absent key {key}");
                    absent += 1;
                } else {
                    assert_eq!(
                        row,
                        &row_of(key, dim)[..],
                        "{kind}: key {key} read with another key's row (version {})",
                        v[j]
                    );
                    found += 1;
                }
            }
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let (assigned, expired) = writer.join().unwrap();
        eprintln!(
            "{kind}: {reads} reads of 64 keys ({found} held, {absent} absent) during {assigned} \
             assignments and {expired} expiries; one-sided counters {:?}",
            b.read_stats()
        );
        assert!(expired > 0, "{kind}: rows expired");
    });
    assert!(
        found >= 2_000 && absent >= 2_000,
        "{kind}: the reads did not see both held and absent keys ({found}, {absent})"
    );
    if let Some(stats) = b.read_stats() {
        assert!(stats.buckets_read > 0, "{kind}: {stats:?}");
    }
}

fn bad_inputs_are_refused(kind: &str) {
    let f = Fixture::new();
    let spec = zero_table("bad", 10, 4, 0.1);
    f.create(&spec);
    let b = Backend::connect(kind, f.addr(0));
    let code = |e: TransportError| e.remote().map(|w| w.code);
    let (mut v, mut r) = (Vec::new(), Vec::new());
    let e = b.t().pull("nope", &[0], &mut v, &mut r).unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::UnknownTable), "{kind}");
    let e = b.t().pull(&spec.name, &[10], &mut v, &mut r).unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::KeyOutOfRange), "{kind}");
    let e = b.t().pull(&spec.name, &[1], &mut v, &mut r).unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::KeyOutOfRange), "{kind}");
    let mut out = StaleRows::default();
    let e = stale(
        b.t(),
        &spec.name,
        &[0, 12],
        &[0, 0],
        0,
        None,
        None,
        &mut out,
    )
    .into_result()
    .unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::KeyOutOfRange), "{kind}");
    let e = b.t().push(&spec.name, &[0], &[1], &[1.0; 3]).unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::WrongDim), "{kind}");
    let e = b
        .t()
        .push(
            &spec.name,
            &[0, 2],
            &[1, 1],
            &[0.0, 0.0, 0.0, 0.0, 1.0, f32::NAN, 0.0, 0.0],
        )
        .unwrap_err();
    assert_eq!(code(e), Some(ErrorCode::InvalidGradient), "{kind}");
    // A push that travels with a conditional pull is refused whole when a key is bad.
    let push = PushRef::new(&[0], &[1], &[1.0; 4]);
    let carried = stale(b.t(), &spec.name, &[3], &[0], 0, None, Some(push), &mut out);
    assert_eq!(
        carried.push,
        PushOutcome::Refused,
        "{kind}: nothing applied, and said so"
    );
    assert_eq!(
        code(carried.read.unwrap_err()),
        Some(ErrorCode::KeyOutOfRange),
        "{kind}"
    );
    // Spans past the region, or of a region that does not exist.
    let desc = b.t().region_info(&spec.name).unwrap();
    let mut bytes = Vec::new();
    for span in [
        Span {
            region: desc.region,
            offset: desc.len - 4,
            len: 8,
        },
        Span {
            region: desc.region + 100,
            offset: 0,
            len: 8,
        },
    ] {
        let e = b.t().read(&[span], &mut bytes).unwrap_err();
        assert!(e.remote().is_some(), "{kind}: {e}");
    }
    // Nothing changed, and the connection still serves.
    let keys = keys_of(0, 10);
    b.t().pull(&spec.name, &keys, &mut v, &mut r).unwrap();
    assert_eq!(v, vec![0; keys.len()], "{kind}");
    assert!(r.iter().all(|&x| x == 0.0));
    assert_eq!(b.t().stats().unwrap().shard, 0);
}

/// Reads that want optimizer state bring each row's state of the same moment (Adagrad's
/// accumulators, Adam's moments and step count) for the first `state_keys` keys, and none for
/// the others; pushes that carry base versions hand back the rows they produced where another
/// update came between, with version and state, and nothing where the base was the row's version.
fn states_come_with_rows_and_pushes_hand_back_what_they_produced(kind: &str) {
    let f = Fixture::new();
    let adagrad = OptimizerSpec::Adagrad {
        lr: 0.5,
        eps: 1e-6,
        initial_accumulator: 0.25,
    };
    for (name, optimizer) in [("ada", adagrad), ("adam", OptimizerSpec::adam(0.1))] {
        let spec = TableSpec {
            optimizer,
            ..zero_table(name, 16, 3, 1.0)
        };
        f.create(&spec);
        let b = Backend::connect(kind, f.addr(0));
        let other = f.other(0);
        // Another client's update of key 2: its accumulator (or moments) grow.
        other.push(name, &[2], &[1], &[1.0, 2.0, -1.0]).unwrap();
        let mut out = StaleRows::default();
        let query = StaleQuery {
            table: name,
            keys: &[2, 4, 6],
            clocks: &[NOT_CACHED; 3],
            births: None,
            bound: 0,
            since: None,
            push: None,
            state_keys: 2,
        };
        b.t().pull_if_stale(&query, &mut out).read.unwrap();
        assert_eq!(out.indices, [0, 1, 2], "{kind} {name}");
        assert_eq!(out.versions, [1, 0, 0], "{kind} {name}");
        let shard = f.cluster.shard(0);
        let table = shard.table(name).unwrap();
        let (state2, step2) = table.optimizer_state(1); // key 2 is local row 1
        let (state4, _) = table.optimizer_state(2);
        let len = state2.len();
        assert_eq!(
            out.states.values.len(),
            2 * len,
            "{kind} {name}: two rows wanted state"
        );
        assert_eq!(&out.states.values[..len], &state2[..], "{kind} {name}");
        assert_eq!(&out.states.values[len..], &state4[..], "{kind} {name}");
        if optimizer.name() == "adam" {
            assert_eq!(out.states.steps, [step2, 0], "{kind} {name}");
        } else {
            assert!(out.states.steps.is_empty(), "{kind} {name}");
        }
        // A push whose base is the row's version hands nothing back; one whose base is behind
        // (another update came between) hands back the row it produced.
        let mut produced = hetkv_transport::Produced::default();
        let push = PushRef {
            keys: &[2, 4],
            counts: &[1, 2],
            grads: &[0.5; 6],
            bases: Some(&[1, 0]),
        };
        let ack = b.t().push_rows(name, &push, &mut produced).unwrap();
        assert_eq!(
            (ack.rows, ack.updates, ack.produced),
            (2, 3, 0),
            "{kind} {name}"
        );
        assert!(produced.is_empty(), "{kind} {name}");
        other.push(name, &[4], &[1], &[1.0; 3]).unwrap();
        let push = PushRef {
            keys: &[2, 4],
            counts: &[1, 1],
            grads: &[0.5; 6],
            bases: Some(&[2, 2]),
        };
        let ack = b.t().push_rows(name, &push, &mut produced).unwrap();
        assert_eq!(ack.produced, 1, "{kind} {name}");
        assert_eq!(
            produced.indices,
            [1],
            "{kind} {name}: only key 4 had another update"
        );
        let (mut versions, mut rows) = (Vec::new(), Vec::new());
        other.pull(name, &[4], &mut versions, &mut rows).unwrap();
        assert_eq!(produced.versions, versions, "{kind} {name}");
        assert_eq!(produced.rows, rows, "{kind} {name}");
        let (state, step) = table.optimizer_state(2);
        assert_eq!(produced.states.values, state, "{kind} {name}");
        if optimizer.name() == "adam" {
            assert_eq!(produced.states.steps, [step], "{kind} {name}");
        }
        // The same, carried by a conditional pull.
        other.push(name, &[6], &[1], &[1.0; 3]).unwrap();
        let push = PushRef {
            keys: &[6],
            counts: &[1],
            grads: &[0.5; 3],
            bases: Some(&[0]),
        };
        let query = StaleQuery {
            push: Some(push),
            state_keys: 0,
            keys: &[],
            clocks: &[],
            births: None,
            ..query
        };
        let carried = b.t().pull_if_stale(&query, &mut out);
        carried.read.unwrap();
        assert!(
            matches!(carried.push, PushOutcome::Applied(a) if a.produced == 1),
            "{kind}"
        );
        assert_eq!(out.produced.versions, [2], "{kind} {name}");
    }
}

/// A reader attached to a table (one-sidedly, for shm and RDMA) that another client drops reads
/// nothing more of it: its reads fail with `UnknownTable`, never returning the dropped rows; and
/// once a table of that name is created again, it reads the new table's rows. For a fixed and a
/// dynamic table.
fn a_dropped_table_is_never_read_and_its_name_reads_the_new_one(kind: &str) {
    let f = Fixture::new();
    for dynamic in [false, true] {
        let name = if dynamic { "gone_dyn" } else { "gone" };
        let old = if dynamic {
            TableSpec {
                init: Initializer::Normal { std: 0.5, seed: 1 },
                ..dynamic_table(name, 256, 4)
            }
        } else {
            normal_table(name, 40, 4)
        };
        f.create(&old);
        let keys: Vec<u64> = if dynamic {
            let held = raw_ids_by_shard(&old, 20, 1);
            let other = f.other(0);
            let grads = vec![1.0; held[0].len() * 4];
            other
                .push(name, &held[0], &vec![1; held[0].len()], &grads)
                .unwrap();
            held[0].clone()
        } else {
            keys_of(0, 40)
        };
        let b = Backend::connect(kind, f.addr(0));
        let (mut v, mut r) = (Vec::new(), Vec::new());
        b.t().pull(name, &keys, &mut v, &mut r).unwrap();
        assert!(
            r.iter().any(|&x| x != 0.0),
            "{kind}: the old rows are not zeros"
        );
        for s in 0..2 {
            assert!(f.other(s).drop_table(name).unwrap(), "shard {s} held it");
            assert!(!f.other(s).drop_table(name).unwrap(), "dropped already");
        }
        let unknown = |e: hetkv_transport::TransportError| {
            assert_eq!(
                e.remote().map(|w| w.code),
                Some(hetkv_transport::ErrorCode::UnknownTable),
                "{kind}: {e}"
            );
        };
        unknown(b.t().pull(name, &keys, &mut v, &mut r).unwrap_err());
        let clocks = vec![0u64; keys.len()];
        let q = hetkv_transport::StaleQuery {
            table: name,
            keys: &keys,
            clocks: &clocks,
            births: dynamic.then_some(&clocks[..]),
            bound: 0,
            since: None,
            push: None,
            state_keys: 0,
        };
        let mut out = hetkv_transport::StaleRows::default();
        unknown(b.t().pull_if_stale(&q, &mut out).read.unwrap_err());
        // The name again, zeros this time: the reader attaches the new table.
        let new = TableSpec {
            init: Initializer::Zeros,
            ..old.clone()
        };
        f.create(&new);
        b.t().pull(name, &keys, &mut v, &mut r).unwrap();
        assert!(r.iter().all(|&x| x == 0.0), "{kind}: the new table's rows");
        assert!(
            v.iter().all(|&x| x == 0),
            "{kind}: nothing written to the new table"
        );
    }
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            #[test]
            fn a_dropped_table_is_never_read_and_its_name_reads_the_new_one() {
                super::a_dropped_table_is_never_read_and_its_name_reads_the_new_one(stringify!(
                    $backend
                ));
            }
            #[test]
            fn states_come_with_rows_and_pushes_hand_back_what_they_produced() {
                super::states_come_with_rows_and_pushes_hand_back_what_they_produced(stringify!(
                    $backend
                ));
            }
            #[test]
            fn reads_every_row_shape() {
                super::reads_every_row_shape(stringify!($backend));
            }
            #[test]
            fn version_reads_follow_the_bounds() {
                super::version_reads_follow_the_bounds(stringify!($backend));
            }
            #[test]
            fn pushes_apply_and_read_back() {
                super::pushes_apply_and_read_back(stringify!($backend));
            }
            #[test]
            fn reads_see_daemon_side_updates() {
                super::reads_see_daemon_side_updates(stringify!($backend));
            }
            #[test]
            fn torn_reads_are_never_accepted() {
                super::torn_reads_are_never_accepted(stringify!($backend));
            }
            #[test]
            fn reads_go_on_across_an_idle_close_and_a_lost_queue_pair() {
                super::reads_go_on_across_an_idle_close_and_a_lost_queue_pair(stringify!($backend));
            }
            #[test]
            fn dynamic_tables_are_read_through_their_buckets() {
                super::dynamic_tables_are_read_through_their_buckets(stringify!($backend));
            }
            #[test]
            fn slots_given_to_other_keys_are_never_read_as_theirs() {
                super::slots_given_to_other_keys_are_never_read_as_theirs(stringify!($backend));
            }
            #[test]
            fn bad_inputs_are_refused() {
                super::bad_inputs_are_refused(stringify!($backend));
            }
        }
    };
}

conformance!(tcp);
conformance!(shm);
#[cfg(feature = "rdma")]
conformance!(rdma);

#[test]
fn shm_is_refused_with_its_reason_when_the_daemon_does_not_offer_it() {
    let cluster = EmbeddedCluster::start(1).unwrap();
    let control = TcpShardClient::connect(&cluster.addrs()[0], ClientConfig::default()).unwrap();
    let (_, why) = ShmTransport::new(control).unwrap_err();
    assert!(why.to_string().contains("--shm-dir"), "{why}");
}

#[test]
fn the_shm_directory_disappears_with_the_daemon() {
    let f = Fixture::new();
    f.create(&sgd_table("gone", 4, 2, 0.1));
    let hello = f.other(0).hello().clone();
    let dir = std::path::PathBuf::from(hello.shm_dir.unwrap());
    assert!(dir.join("shard0-gone.region").exists());
    assert!(dir.join("shard0-gone.clock").exists());
    drop(f);
    assert!(!dir.exists(), "{} outlived its daemon", dir.display());
}

#[test]
fn auto_picks_shm_for_daemons_on_this_host_and_tcp_otherwise() {
    use hetkv_client::{Cluster, TransportKind};
    let f = Fixture::new();
    let spec = sgd_table("auto", 8, 2, 0.1);
    f.create(&spec);
    let addrs = f.cluster.addrs();
    for kind in [TransportKind::Auto, TransportKind::Shm, TransportKind::Tcp] {
        let c = Cluster::connect(addrs, kind, &ClientConfig::default()).unwrap();
        let t = c.open_table("auto").unwrap();
        let mut out = vec![0f32; 16];
        t.pull(&(0..8).collect::<Vec<_>>(), &mut out, None).unwrap();
        // Shared-memory reads cross no socket: only the control traffic is counted.
        let before = c.traffic().received;
        t.pull(&(0..8).collect::<Vec<_>>(), &mut out, None).unwrap();
        let pulled = c.traffic().received - before;
        // Auto prefers RDMA where it runs, whose READs are counted as received bytes.
        let expect_shm =
            kind == TransportKind::Shm || (kind == TransportKind::Auto && !cfg!(feature = "rdma"));
        assert_eq!(pulled == 0, expect_shm, "{kind}: {pulled} bytes received");
    }
    let plain = EmbeddedCluster::start(1).unwrap();
    let c = Cluster::connect(plain.addrs(), TransportKind::Auto, &ClientConfig::default());
    assert!(c.is_ok(), "auto falls back to tcp");
    let e =
        Cluster::connect(plain.addrs(), TransportKind::Shm, &ClientConfig::default()).unwrap_err();
    assert!(e.to_string().contains("shm"), "{e}");
    if !cfg!(feature = "rdma") {
        let e = Cluster::connect(plain.addrs(), TransportKind::Rdma, &ClientConfig::default())
            .unwrap_err();
        assert!(e.to_string().contains("rdma"), "{e}");
    }
}

/// The probe names why RDMA cannot work, or opens a device where one is up (`/dev/infiniband`).
#[cfg(feature = "rdma")]
#[test]
fn rdma_probe_opens_a_device_or_names_the_reason() {
    let up = std::path::Path::new("/dev/infiniband/uverbs0").exists();
    match hetkv_transport::rdma::Device::open_first() {
        Ok(d) => {
            assert!(up, "a device opened without /dev/infiniband/uverbs0");
            eprintln!("RDMA device {} is up", d.name());
        }
        Err(e) => {
            let why = e.to_string();
            eprintln!("no RDMA here: {why}");
            assert!(!up, "uverbs0 exists but the device did not open: {why}");
            assert!(
                [
                    "kernel has no RDMA support",
                    "no RDMA devices",
                    "is not active"
                ]
                .iter()
                .any(|r| why.contains(r)),
                "{why}"
            );
        }
    }
}

/// Queue pairs come and go with their transports and control connections, on both sides.
#[cfg(feature = "rdma")]
#[test]
fn rdma_queue_pairs_are_torn_down_with_their_transports() {
    let f = Fixture::new();
    let spec = zero_table("churn", 16, 8, 0.1);
    f.create(&spec);
    let keys = keys_of(0, 16);
    for round in 0..100 {
        let b = Backend::connect("rdma", f.addr(0));
        let (mut v, mut r) = (Vec::new(), Vec::new());
        b.t()
            .pull(&spec.name, &keys, &mut v, &mut r)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(v, vec![0; keys.len()]);
    }
}

/// A READ the responder refuses (a wrong rkey) completes with an error that comes back as an
/// error naming the status; the queue pair is then retired, and the next read connects a new one
/// and succeeds, one-sidedly.
#[cfg(feature = "rdma")]
#[test]
fn rdma_completion_errors_are_surfaced() {
    let f = Fixture::new();
    let spec = zero_table("wrongkey", 16, 4, 0.1);
    f.create(&spec);
    let control = TcpShardClient::connect(f.addr(0), ClientConfig::default()).unwrap();
    let t = hetkv_transport::rdma::RdmaTransport::connect(rdma_device(), control)
        .map_err(|(_, e)| e)
        .unwrap();
    let desc = t.region_info(&spec.name).unwrap();
    let good = t.read_remote(desc.addr, desc.rkey, 8).unwrap();
    assert_eq!(good, 0u64.to_le_bytes(), "row 0's seq word at version 0");
    let e = t
        .read_remote(desc.addr, desc.rkey ^ 0x5a5a_5a5a, 8)
        .unwrap_err()
        .to_string();
    eprintln!("wrong rkey: {e}");
    assert!(e.contains("completed with"), "{e}");
    let (mut v, mut r) = (Vec::new(), Vec::new());
    t.pull(&spec.name, &[0, 2], &mut v, &mut r).unwrap();
    assert_eq!(v, vec![0, 0]);
    let stats = t.read_stats();
    assert_eq!((stats.reconnects, stats.fallback_rows), (1, 0), "{stats:?}");
}

/// A daemon without RDMA answers an RDMA connect with `Unsupported`, naming why, and goes on
/// serving the connection.
#[test]
fn an_rdma_connect_to_a_daemon_without_rdma_is_refused_clearly() {
    let f = Fixture::new();
    let c = f.other(0);
    let ours = hetkv_transport::wire::Endpoint {
        qpn: 17,
        psn: 1,
        lid: 0,
        gid: [0; 16],
        mtu: 3,
    };
    match c.rdma_connect(&ours) {
        // In the VM the fixture's daemons have RDMA: a made-up peer may still get a queue pair
        // (held with this connection) or an error, but never `Unsupported`.
        Ok(_) => {
            if !cfg!(feature = "rdma") {
                panic!("a daemon without RDMA accepted");
            }
        }
        Err(e) => {
            let w = e.remote().expect("the daemon's own answer");
            if cfg!(feature = "rdma") {
                assert_ne!(w.code, ErrorCode::Unsupported, "{w:?}");
            } else {
                assert_eq!(w.code, ErrorCode::Unsupported, "{w:?}");
                assert!(w.message.contains("rdma"), "{}", w.message);
            }
        }
    }
    assert_eq!(c.stats().unwrap().shard, 0);
}

/// Which backend shard `i` of `c` reads through, told by what a pull of `key` (a key of that
/// shard) moves: TCP sends a request and receives rows; shared memory moves nothing over a link;
/// RDMA sends nothing and receives its READs.
fn backend_of(c: &hetkv_client::Cluster, table: &str, i: usize, key: u64) -> &'static str {
    let t = c.shard(i);
    let (mut v, mut r) = (Vec::new(), Vec::new());
    t.pull(table, &[key], &mut v, &mut r).unwrap();
    let before = t.traffic();
    t.pull(table, &[key], &mut v, &mut r).unwrap();
    let after = t.traffic();
    match (after.sent > before.sent, after.received > before.received) {
        (true, _) => "tcp",
        (false, false) => "shm",
        (false, true) => "rdma",
    }
}

/// A cluster where only shard 0 offers a one-sided path (shared memory, and RDMA where the build
/// has it): `auto` gives shard 0 its fastest backend and falls back to TCP for shard 1 alone, and
/// the cluster serves reads and pushes; asking for that path explicitly fails naming shard 1.
#[test]
fn auto_falls_back_shard_by_shard_when_only_shard_0_offers_one_sided_reads() {
    use hetkv_client::{Cluster, TransportKind};
    let dir = tempfile::tempdir().unwrap();
    let shm = dir.path().to_path_buf();
    let cluster = EmbeddedCluster::start_with(2, ServerConfig::default(), |i| ShardConfig {
        shm_dir: (i == 0).then(|| shm.clone()),
        rdma: cfg!(feature = "rdma") && i == 0,
        ..ShardConfig::new(i, 2)
    })
    .unwrap();
    let spec = zero_table("mixed", 16, 2, 1.0);
    let c = Cluster::connect(
        cluster.addrs(),
        TransportKind::Auto,
        &ClientConfig::default(),
    )
    .unwrap();
    let table = c.create_table(&spec).unwrap();
    let fast = if cfg!(feature = "rdma") {
        "rdma"
    } else {
        "shm"
    };
    assert_eq!(backend_of(&c, "mixed", 0, 0), fast);
    assert_eq!(backend_of(&c, "mixed", 1, 1), "tcp");
    let keys: Vec<u64> = (0..16).collect();
    table.push(&keys, &[1; 16], &[-1.0; 32]).unwrap();
    let (mut rows, mut versions) = (vec![0f32; 32], vec![0u64; 16]);
    table.pull(&keys, &mut rows, Some(&mut versions)).unwrap();
    assert_eq!(versions, vec![1; 16]);
    assert_eq!(rows, vec![1.0; 32]);
    let explicit = if cfg!(feature = "rdma") {
        TransportKind::Rdma
    } else {
        TransportKind::Shm
    };
    let e = Cluster::connect(cluster.addrs(), explicit, &ClientConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("shard 1") || e.to_string().contains(&cluster.addrs()[1]),
        "{e}"
    );
}

/// A cluster where no daemon serves RDMA: `auto` falls back for every shard (to shared memory,
/// as the daemons are on this host) and serves.
#[cfg(feature = "rdma")]
#[test]
fn auto_falls_back_for_every_shard_when_no_daemon_has_rdma() {
    use hetkv_client::{Cluster, TransportKind};
    let f = {
        let dir = tempfile::tempdir().unwrap();
        let shm = dir.path().to_path_buf();
        let cluster = EmbeddedCluster::start_with(2, ServerConfig::default(), |i| ShardConfig {
            shm_dir: Some(shm.clone()),
            ..ShardConfig::new(i, 2)
        })
        .unwrap();
        (dir, cluster)
    };
    let c = Cluster::connect(f.1.addrs(), TransportKind::Auto, &ClientConfig::default()).unwrap();
    let table = c.create_table(&zero_table("nordma", 8, 2, 1.0)).unwrap();
    assert_eq!(backend_of(&c, "nordma", 0, 0), "shm");
    assert_eq!(backend_of(&c, "nordma", 1, 1), "shm");
    let mut rows = vec![0f32; 16];
    table
        .pull(&(0..8).collect::<Vec<_>>(), &mut rows, None)
        .unwrap();
}
