//! The model-based test of the cache's consistency bounds (`hetkv_tests::model`) against real
//! daemons over sockets, over every transport. The same model runs without sockets, against
//! simulated shards, in `cache_harness.rs`. Each transport runs it without and with prefetching,
//! with bounds changed on the way, and under the share-weighted update rule; and under every
//! optimizer (whose values the model checks only against itself over sockets: versions, both
//! bounds, and the caches' lines at bounds 0).

use hetkv_client::{Cluster, TransportKind, UpdateRuleKind};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_tests::model;
use hetkv_transport::OptimizerSpec;

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
    let (mut prefetched, mut handed_back) = (0, 0);
    let sgd = OptimizerSpec::Sgd { lr: 1.0 };
    // Without prefetching, then with it (the prefetches' requests go from their caches' helper
    // threads), then under a rule that weighs pushes, then prefetching with bounds changed on
    // the way; and every other optimizer.
    let mut runs = vec![
        ("model", sgd, false, UpdateRuleKind::PushWhole, false),
        ("prefetch", sgd, true, UpdateRuleKind::PushWhole, false),
        ("weighted", sgd, false, UpdateRuleKind::ShareWeighted, false),
        ("rebound", sgd, true, UpdateRuleKind::PushWhole, true),
    ];
    for optimizer in &model::optimizers()[1..] {
        runs.push((
            optimizer.name(),
            *optimizer,
            true,
            UpdateRuleKind::PushWhole,
            false,
        ));
    }
    for (prefix, optimizer, prefetch, rule, rebound) in runs {
        for (policy, bound) in model::policies_and_bounds() {
            let name = format!("{prefix}_{policy}_{bound}").replace('-', "_");
            let truth = admin
                .create_table(&model::spec_with(&name, optimizer))
                .unwrap();
            let mut connect = || {
                Cluster::connect(cluster.addrs(), transport, &ClientConfig::default())
                    .unwrap()
                    .open_table(&name)
                    .unwrap()
            };
            let options = model::Options {
                prefetch,
                rule,
                rebound,
                ..Default::default()
            };
            let outcome = model::run_with(
                &truth,
                &mut connect,
                policy,
                bound,
                0x5EED,
                options,
                None,
                None,
            );
            prefetched += outcome.prefetched;
            handed_back += outcome.rows_handed_back;
        }
    }
    assert!(
        prefetched > 100,
        "{prefetched} lookups served by a prefetch"
    );
    assert!(
        handed_back > 100,
        "{handed_back} rows handed back by pushes and taken by lines"
    );
}
