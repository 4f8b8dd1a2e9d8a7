//! MovieLens ml-100k, fetched at test time from the recbole wheel on PyPI (never committed), read
//! whole. Fails, rather than skipping, when it cannot be fetched.

use std::process::Command;

#[test]
fn movielens_100k_is_fetched_read_and_mildly_skewed() {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("movielens");
    let json = cache.join("summary.json");
    std::fs::create_dir_all(&cache).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv-bench"))
        .args(["movielens", "--cache-dir"])
        .arg(&cache)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(s["ratings"], 100_000);
    assert_eq!(s["users"], 943);
    assert_eq!(s["items"], 1682);
    assert_eq!(s["malformed"], 0);
    // The notes: the top 10% of items take 43% of ratings.
    let share = s["top10_item_share"].as_f64().unwrap();
    assert!((share - 0.43).abs() < 0.02, "top 10% share {share}");
}
