//! Helpers shared by the training tests.

#![allow(dead_code)] // each test file uses its own part of these

use hetkv_bench::train::{self, TrainArgs};
use hetkv_client::Cluster;
use hetkv_fallback_tcp::ClientConfig;
use hetkv_store::EmbeddedCluster;

/// The model's tables.
pub const TABLES: [&str; 2] = ["ctr_emb", "ctr_dense"];

/// A table's values and versions.
pub type Rows = (Vec<f32>, Vec<u64>);

/// Every row and version of the model's tables.
pub fn rows(addrs: &[String]) -> Vec<Rows> {
    let c = Cluster::connect_tcp(addrs, &ClientConfig::default()).unwrap();
    TABLES
        .iter()
        .map(|name| {
            let t = c.open_table(name).unwrap();
            let keys: Vec<u64> = (0..t.spec().rows).collect();
            let mut values = vec![0f32; keys.len() * t.spec().dim as usize];
            let mut versions = vec![0u64; keys.len()];
            t.pull(&keys, &mut values, Some(&mut versions)).unwrap();
            (values, versions)
        })
        .collect()
}

/// Trains `args` on a fresh embedded cluster of two shards; returns the report and the rows the
/// shards hold at the end.
pub fn train_fresh(args: TrainArgs) -> (train::TrainReport, Vec<Rows>) {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let report = train::run(&TrainArgs {
        servers: cluster.addrs().to_vec(),
        ..args
    })
    .unwrap();
    let got = rows(cluster.addrs());
    (report, got)
}

/// Asserts that two runs' tables hold the same versions and bit for bit the same values.
pub fn assert_same_rows(want: &[Rows], got: &[Rows], what: &str) {
    for ((name, w), g) in TABLES.iter().zip(want).zip(got) {
        assert_eq!(w.1, g.1, "{name}: versions differ {what}");
        assert!(
            w.0.iter()
                .zip(&g.0)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: values differ {what}"
        );
    }
}
