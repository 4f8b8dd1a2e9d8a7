//! What a trainer is told, at once and in words: an address where no daemon listens fails within
//! the connect timeout; a closed cluster fails every call at once; a restart from a checkpoint
//! that took back acknowledged pushes is an error (once, then the calls go on), unless the
//! cluster is told to go on.

use std::time::{Duration, Instant};

use hetkv_client::{
    Bound, CacheConfig, Capacity, ClientError, Cluster, OnRollback, PolicyKind, TransportKind,
};
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

#[path = "../../store/tests/common/mod.rs"]
mod common;

fn spec() -> TableSpec {
    TableSpec {
        name: "t".into(),
        rows: 16,
        dim: 2,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::sgd(1.0),
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

#[test]
fn an_address_where_nothing_listens_fails_at_once() {
    // A port that was just free, and is closed again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let e = Cluster::connect(
        &[format!("127.0.0.1:{port}")],
        TransportKind::Tcp,
        &ClientConfig::default(),
    )
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("connection refused"), "{e}");
    // Told to wait for a daemon, it waits (and still fails when none comes).
    let config = ClientConfig {
        wait_for_daemon: Duration::from_millis(300),
        ..ClientConfig::default()
    };
    let started = Instant::now();
    assert!(Cluster::connect_tcp(&[format!("127.0.0.1:{port}")], &config).is_err());
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[test]
fn a_closed_cluster_fails_every_call_at_once() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let c = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = c.create_table(&spec()).unwrap();
    let mut cache = table.cached(CacheConfig::new(
        Capacity::Rows(4),
        PolicyKind::Lru,
        Bound::STRICT,
    ));
    let mut out = [0f32; 2];
    cache.lookup(&[1], &mut out).unwrap();
    c.close();
    cluster.shutdown();
    let started = Instant::now();
    for result in [
        cache.lookup(&[1], &mut out),
        cache.update(&[1], &[1.0, 1.0]),
        cache.flush(),
        table.pull(&[1], &mut out, None),
        table.push(&[1], &[1], &[1.0, 1.0]).map(|_| ()),
        c.open_table("t").map(|_| ()),
    ] {
        assert!(matches!(result, Err(ClientError::Closed)), "{result:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_restart_that_took_back_acknowledged_pushes_is_an_error_once_then_the_calls_go_on() {
    for on in [OnRollback::Error, OnRollback::Continue] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let start = |addr: &str| {
            let mut cmd = common::serve_on(addr, &[]);
            cmd.arg("--data-dir").arg(&data);
            common::Daemon::start(cmd)
        };
        let first = start("127.0.0.1:0");
        let addr = first.addr.clone();
        let c =
            Cluster::connect_tcp(std::slice::from_ref(&addr), &ClientConfig::default()).unwrap();
        c.set_on_rollback(on);
        let table = c.create_table(&spec()).unwrap();
        let mut cache = table.cached(CacheConfig::new(
            Capacity::Rows(4),
            PolicyKind::Lru,
            Bound::STRICT,
        ));
        cache.update(&[1], &[1.0, 1.0]).unwrap();
        c.checkpoint("before", false).unwrap();
        for _ in 0..5 {
            cache.update(&[1, 2], &[1.0; 4]).unwrap();
        }
        // SIGKILL, then a restart from the checkpoint: the five pushes after it are gone.
        drop(first);
        let _second = start(&addr);
        let mut out = [0f32; 4];
        let result = cache.lookup(&[1, 2], &mut out);
        if on == OnRollback::Error {
            let Err(ClientError::RolledBack { pushes, .. }) = result else {
                panic!("{result:?}");
            };
            assert_eq!(pushes, 5, "the acknowledged pushes the restore took back");
        } else {
            result.unwrap();
        }
        // Once reported, the calls go on, and read the restored rows.
        cache.lookup(&[1, 2], &mut out).unwrap();
        assert_eq!(out, [-1.0, -1.0, 0.0, 0.0], "{on:?}: the restored rows");
        assert_eq!(c.restarts().pushes_rolled_back, 5);
    }
}
