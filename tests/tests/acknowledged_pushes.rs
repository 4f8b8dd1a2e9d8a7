//! A one-sided read that fails after the push it carried was acknowledged, over real daemons:
//! the shared-memory backend pushes over TCP, then reads version words and rows through memory
//! that fails when told to (a `RemoteMemory` wrapped around the real mapping). The cache must
//! count the push as applied and never send it again: after the flush, every row's version equals
//! the updates sent.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind};
use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpShardClient};
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::{sgd_table, TestRng};
use hetkv_transport::onesided::{Attachment, RemoteSpan};
use hetkv_transport::{
    OneSidedTransport, RegionDescriptor, RemoteMemory, ShardTransport, ShmMemory,
};

/// Shared memory whose every `every`-th read fails.
struct Failing {
    inner: ShmMemory,
    every: u64,
    reads: AtomicU64,
    failed: Arc<AtomicU64>,
}

impl RemoteMemory for Failing {
    type Region = <ShmMemory as RemoteMemory>::Region;

    fn attach(&self, desc: &RegionDescriptor) -> Result<Attachment<Self::Region>, String> {
        self.inner.attach(desc)
    }

    fn read(
        &self,
        spans: &[RemoteSpan<'_, Self::Region>],
        each: &mut dyn FnMut(usize, &[u8]),
    ) -> io::Result<()> {
        if self.reads.fetch_add(1, Ordering::Relaxed) % self.every == self.every - 1 {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::other("injected: the one-sided read failed"));
        }
        self.inner.read(spans, each)
    }
}

#[test]
fn a_one_sided_read_failing_after_its_push_was_acknowledged_applies_the_push_once() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = EmbeddedCluster::start_with(2, ServerConfig::default(), |i| ShardConfig {
        shm_dir: Some(dir.path().to_path_buf()),
        ..ShardConfig::new(i, 2)
    })
    .unwrap();
    let (rows, dim) = (64u64, 4usize);
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = admin
        .create_table(&sgd_table("acked", rows, dim as u32, 0.1))
        .unwrap();
    let failed = Arc::new(AtomicU64::new(0));
    let shards: Vec<Arc<dyn ShardTransport>> = cluster
        .addrs()
        .iter()
        .map(|a| {
            let control = TcpShardClient::connect(a, ClientConfig::default()).unwrap();
            let memory = Failing {
                inner: ShmMemory::of(&control).unwrap(),
                every: 5,
                reads: AtomicU64::new(0),
                failed: failed.clone(),
            };
            Arc::new(OneSidedTransport::with_memory(memory, control)) as Arc<dyn ShardTransport>
        })
        .collect();
    let mut cache = Cluster::from_transports(shards)
        .unwrap()
        .open_table("acked")
        .unwrap()
        .cached(CacheConfig {
            capacity: Capacity::Rows(8),
            policy: PolicyKind::Lru,
            pull_bound: Bound::STRICT,
            push_bound: Bound::INFINITE,
        });
    let mut rng = TestRng(11);
    let mut sent = vec![0u64; rows as usize];
    let (mut lookups_failed, mut out) = (0, vec![0f32; 6 * dim]);
    for _ in 0..400 {
        let keys: Vec<u64> = (0..6).map(|_| rng.below(rows)).collect();
        if cache.lookup(&keys, &mut out).is_err() {
            lookups_failed += 1;
        }
        cache.update(&keys, &vec![1.0; keys.len() * dim]).unwrap();
        for &k in &keys {
            sent[k as usize] += 1;
        }
    }
    cache.flush().unwrap();
    assert!(failed.load(Ordering::Relaxed) > 20, "reads were failed");
    assert!(
        lookups_failed > 20,
        "and failed their lookups ({lookups_failed})"
    );
    assert!(
        cache.stats().rows_pushed > 100,
        "evicted rows travelled with the lookups"
    );
    let keys: Vec<u64> = (0..rows).collect();
    let (mut versions, mut values) = (vec![0; rows as usize], vec![0f32; rows as usize * dim]);
    table.pull(&keys, &mut values, Some(&mut versions)).unwrap();
    assert_eq!(
        versions, sent,
        "each row's version equals the updates sent to it"
    );
}
