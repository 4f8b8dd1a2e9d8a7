//! Helpers shared by the training tests.

use hetkv_client::Cluster;
use hetkv_fallback_tcp::ClientConfig;

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
