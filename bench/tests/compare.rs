//! `hetkv-bench compare` end to end, against a real redis-server (Debian's `redis-server`, which
//! CI installs). Fails, rather than skipping, when redis-server is missing.

use std::process::Command;

#[test]
fn compare_runs_every_system_on_one_stream_and_reports_ratios() {
    assert!(
        Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok(),
        "redis-server is not installed (apt-get install redis-server): the comparison needs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("compare.json");
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv-bench"))
        .args([
            "compare",
            "--scale",
            "0.001",
            "--samples",
            "16",
            "--warmup",
            "10",
            "--measured",
            "40",
        ])
        .args(["--dim", "8", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
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
    let md = std::fs::read_to_string(json.with_extension("md")).unwrap();
    assert!(md.contains("| redis 7"), "{md}");
    let png = std::fs::read(json.with_extension("png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a drawn PNG"
    );
}
