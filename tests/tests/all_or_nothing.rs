//! Writes that span shards are all or nothing, or say exactly what was applied: a push or an
//! assignment with one bad value changes no shard (the client checks every row before it sends
//! any), an import with one bad row or a repeated key sets nothing, and a write that one shard
//! applies and another refuses for a reason only it can see names both.

use std::sync::Arc;

use hetkv_client::{ClientError, Cluster};
use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_store::EmbeddedCluster;
use hetkv_tests::sim::SimShard;
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

const DIM: usize = 3;

fn spec() -> TableSpec {
    TableSpec {
        name: "t".into(),
        rows: 10,
        dim: DIM as u32,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::sgd(1.0),
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

fn versions(table: &hetkv_client::Table) -> Vec<u64> {
    let keys: Vec<u64> = (0..10).collect();
    let mut rows = vec![0f32; 10 * DIM];
    let mut v = vec![0u64; 10];
    table.pull(&keys, &mut rows, Some(&mut v)).unwrap();
    v
}

#[test]
fn a_push_or_an_assignment_with_one_bad_value_changes_no_shard() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let c = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = c.create_table(&spec()).unwrap();
    // Keys 2 (shard 0) and 3 (shard 1); the bad value is in shard 1's row.
    for bad in [f32::NAN, f32::INFINITY] {
        let mut grads = vec![0.5f32; 2 * DIM];
        grads[DIM + 1] = bad;
        let e = table.push(&[2, 3], &[1, 1], &grads).unwrap_err();
        assert!(
            matches!(&e, ClientError::InvalidValue { key: 3, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("nothing was applied"), "{e}");
        let e = table.assign(&[2, 3], &grads).unwrap_err();
        assert!(
            matches!(&e, ClientError::InvalidValue { key: 3, .. }),
            "{e}"
        );
    }
    let e = table.push(&[2, 3], &[1, 0], &[0.5; 2 * DIM]).unwrap_err();
    assert!(e.to_string().contains("update count of 0"), "{e}");
    assert_eq!(versions(&table), vec![0; 10], "no shard applied anything");
    // The same writes without the bad value apply on both.
    table.push(&[2, 3], &[1, 1], &[0.5; 2 * DIM]).unwrap();
    assert_eq!(versions(&table)[2..4], [1, 1]);
}

#[test]
fn a_write_one_shard_applies_and_another_refuses_names_both() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    // Shard 0 is a daemon; shard 1 a simulated shard, which refuses assignments.
    let daemon = TcpShardClient::connect(&cluster.addrs()[0], ClientConfig::default()).unwrap();
    daemon.create_table(&spec()).unwrap();
    let c = Cluster::from_transports(vec![
        Arc::new(daemon) as Arc<dyn ShardTransport>,
        Arc::new(SimShard::new(&spec(), 1, 2)),
    ])
    .unwrap();
    let table = c.open_table("t").unwrap();
    let e = table.assign(&[2, 4, 3], &[1.0; 3 * DIM]).unwrap_err();
    let ClientError::PartlyApplied {
        applied, failed, ..
    } = &e
    else {
        panic!("{e}");
    };
    assert!(
        applied.contains("shard 0") && applied.contains("assigned its 2 rows"),
        "{e}"
    );
    assert!(
        failed.contains("shard 1") && failed.contains("no assign"),
        "{e}"
    );
    // One shard refusing alone is that shard's error, nothing partial about it.
    let e = table.assign(&[3], &[1.0; DIM]).unwrap_err();
    assert!(matches!(e, ClientError::Transport(_)), "{e}");
}

#[test]
fn an_import_with_one_bad_row_or_a_repeated_key_sets_nothing() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let c = Cluster::connect_tcp(cluster.addrs(), &ClientConfig::default()).unwrap();
    let table = c.create_table(&spec()).unwrap();
    let shards: Vec<TcpShardClient> = cluster
        .addrs()
        .iter()
        .map(|a| TcpShardClient::connect(a, ClientConfig::default()).unwrap())
        .collect();
    let views: Vec<&dyn ShardTransport> = shards.iter().map(|s| s as &dyn ShardTransport).collect();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, keys: &[u64], values: &[f32]| {
        let path = dir.path().join(name);
        let k: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
        let v: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            (
                "embeddings",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![keys.len(), DIM],
                    &v,
                )
                .unwrap(),
            ),
            (
                "keys",
                safetensors::tensor::TensorView::new(safetensors::Dtype::U64, vec![keys.len()], &k)
                    .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(tensors, None, &path).unwrap();
        path
    };
    // Ten rows, the last of which holds a NaN: not even the first nine are set.
    let mut values = vec![1.0f32; 10 * DIM];
    values[9 * DIM] = f32::NAN;
    let keys: Vec<u64> = (0..10).collect();
    let e = hetkv_store::tensors::import_table(
        &views,
        "t",
        &write("nan", &keys, &values),
        "embeddings",
    )
    .unwrap_err();
    assert!(e.to_string().contains("nothing was imported"), "{e}");
    let e = hetkv_store::tensors::import_table(
        &views,
        "t",
        &write("twice", &[1, 2, 1], &[1.0; 3 * DIM]),
        "embeddings",
    )
    .unwrap_err();
    assert!(e.to_string().contains("key 1 comes twice"), "{e}");
    assert_eq!(versions(&table), vec![0; 10], "nothing was set");
}
