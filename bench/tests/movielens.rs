//! MovieLens ml-100k, fetched at test time from the recbole wheel on PyPI (never committed), read
//! whole. Fails, rather than skipping, when it cannot be fetched.

use hetkv_bench::movielens::{self, MovieLensArgs};

#[test]
fn movielens_100k_is_fetched_read_and_mildly_skewed() {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("movielens");
    std::fs::create_dir_all(&cache).unwrap();
    let summary = movielens::run(&MovieLensArgs {
        cache_dir: cache,
        json: None,
    })
    .unwrap();
    let s = serde_json::to_value(&summary).unwrap();
    assert_eq!(s["ratings"], 100_000);
    assert_eq!(s["users"], 943);
    assert_eq!(s["items"], 1682);
    assert_eq!(s["malformed"], 0);
    // The notes: the top 10% of items take 43% of ratings.
    let share = s["top10_item_share"].as_f64().unwrap();
    assert!((share - 0.43).abs() < 0.02, "top 10% share {share}");
}
