//! `hetkv-bench train` with workers as separate processes, against a cluster it did not start:
//! the shards run in this test's process, the coordinator and its workers are the real binary.

use std::process::Command;

use hetkv_store::EmbeddedCluster;

fn train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hetkv-bench"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn worker_processes_train_against_a_running_cluster() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let servers = cluster.addrs().join(",");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("train.json");
    let out = train(&[
        "--model",
        "wdl",
        "--workers",
        "3",
        "--train",
        "30000",
        "--test",
        "8000",
        "--scale",
        "0.001",
        "--epochs",
        "2",
        "--servers",
        &servers,
        // Each worker under `env`, with its index substituted: the prefix path of the netns
        // cluster script, without namespaces.
        "--spawn-prefix",
        "env HETKV_WORKER_INDEX={i}",
        "--eval-every",
        "0.05",
        "--eval-samples",
        "2000",
        "--target-auc",
        "0.6",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let auc = r["auc"].as_f64().unwrap();
    assert!(auc > 0.65, "AUC {auc} after two short epochs");
    // Every worker's cache counters arrive: 3 workers x 2 epochs of 30,000 samples x 26 keys.
    let cache = &r["cache"];
    assert_eq!(cache["lookups"].as_u64().unwrap(), 2 * 30_000 * 26);
    assert!(cache["hits"].as_u64().unwrap() > 0);
    assert!(cache["rows_pushed"].as_u64().unwrap() > 0);
    assert!(r["dense_bytes_per_sample"].as_f64().unwrap() > 0.0);
    let timeline = r["timeline"].as_array().unwrap();
    assert!(!timeline.is_empty(), "no evaluation during training");
    let secs: Vec<f64> = timeline
        .iter()
        .map(|p| p["secs"].as_f64().unwrap())
        .collect();
    assert!(secs.windows(2).all(|w| w[0] < w[1]), "{secs:?}");
    let reached = r["time_to_target"].as_f64();
    let first = timeline
        .iter()
        .find(|p| p["auc"].as_f64().unwrap() >= 0.6)
        .map(|p| p["secs"].as_f64().unwrap());
    assert_eq!(reached, first);
    assert_eq!(r["settings"]["servers"].as_array().unwrap().len(), 2);
}

#[test]
fn a_worker_that_cannot_start_fails_the_run_with_its_reason() {
    let out = train(&[
        "--train",
        "2000",
        "--test",
        "1000",
        "--scale",
        "0.001",
        "--workers",
        "2",
        "--spawn-prefix",
        "false",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker 0 ended"), "{err}");
}
