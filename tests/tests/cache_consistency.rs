//! The model-based test of the cache's consistency bounds (`hetkv_tests::model`) against real
//! daemons over sockets, over every transport. The same model runs without sockets, against
//! simulated shards, in `cache_harness.rs`. Each transport runs it without and with prefetching,
//! and with extrapolated local steps.

use hetkv_client::{Cluster, SharedKeys, TransportKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::model;

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
    let admin = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let (mut prefetched, mut extrapolated_rows) = (0, 0);
    // Without prefetching, then with it (the prefetches' requests go from their caches' helper
    // threads), then with extrapolated local steps, then prefetching with bounds changed on
    // the way.
    let extrapolated = SharedKeys::Extrapolated { max_scale: 3.0 };
    for (prefix, prefetch, shared_keys, rebound) in [
        ("model", false, SharedKeys::Summed, false),
        ("prefetch", true, SharedKeys::Summed, false),
        ("extrapolated", false, extrapolated, false),
        ("rebound", true, SharedKeys::Summed, true),
    ] {
        for (policy, bound) in model::policies_and_bounds() {
            let name = format!("{prefix}_{policy}_{bound}").replace('-', "_");
            let truth = admin.create_table(&model::spec(&name)).unwrap();
            let mut connect = || {
                Cluster::connect(cluster.addrs(), transport, &ClientConfig::default())
                    .unwrap()
                    .open_table(&name)
                    .unwrap()
            };
            let options = model::Options {
                prefetch,
                shared_keys,
                rebound,
                ..Default::default()
            };
            let outcome =
                model::run_with(&truth, &mut connect, policy, bound, 0x5EED, options, None);
            prefetched += outcome.prefetched;
            extrapolated_rows += outcome.extrapolated_rows;
        }
    }
    assert!(
        prefetched > 100,
        "{prefetched} lookups served by a prefetch"
    );
    assert!(
        extrapolated_rows > 20,
        "{extrapolated_rows} rows read ahead of their own updates by extrapolation"
    );
}
