//! The comparison (`hetkv_bench::compare`) against a real redis-server (Debian's `redis-server`,
//! which the test script installs), called as a library; its table and its plot too. Fails,
//! rather than skipping, when redis-server is missing.

use hetkv_bench::compare::{self, CompareArgs};
use hetkv_bench::plots;
use hetkv_client::Bound;

#[test]
fn compare_runs_every_system_on_one_stream_and_reports_ratios() {
    assert!(
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok(),
        "redis-server is not installed (apt-get install redis-server): the comparison needs it"
    );
    let args = CompareArgs {
        scale: 0.001,
        samples: 16,
        dim: 8,
        warmup: 10,
        measured: 40,
        cache: 0.10,
        bounds: vec![Bound::STRICT, Bound::updates(10), Bound::updates(100)],
        redis_server: "redis-server".into(),
        seed: 1,
        json: None,
    };
    let report = compare::run(&args).unwrap();
    let r = serde_json::to_value(&report).unwrap();
    let systems = r["systems"].as_array().unwrap();
    assert_eq!(systems.len(), 5, "no cache, three bounds, redis");
    for s in systems {
        assert!(s["rows_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["bytes_per_sample"].as_f64().unwrap() > 0.0, "{s}");
        assert!(
            s["p99_us"].as_f64().unwrap() >= s["p50_us"].as_f64().unwrap(),
            "{s}"
        );
    }
    let bytes = |i: usize| systems[i]["bytes_per_sample"].as_f64().unwrap();
    assert!(
        bytes(3) < bytes(0) / 2.0,
        "the cache at bound 100 halves the bytes at least"
    );
    assert!(systems[3]["hit_rate"].as_f64().unwrap() > 0.5);
    assert_eq!(r["rows_per_s_ratios"][0][0].as_f64(), Some(1.0));
    let md = compare::markdown(&report);
    assert!(md.contains("| redis 7"), "{md}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compare.png");
    plots::compare(&report, &path).unwrap();
    let png = std::fs::read(&path).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a drawn PNG"
    );
}
