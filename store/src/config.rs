//! The daemon's TOML configuration: server limits and tables to create at start.
//!
//! ```toml
//! [server]
//! max_frame_bytes = 67108864      # largest frame body accepted or sent
//! max_table_bytes = 34359738368   # largest table footprint on one shard
//!
//! [[tables]]
//! name = "ads"
//! rows = 1000000
//! dim = 64
//! init = { normal = { std = 0.01, seed = 7 } }      # or "zeros", or { uniform = { bound, seed } }
//! optimizer = { adagrad = { lr = 0.05, eps = 1e-8, initial_accumulator = 0.1 } }
//! ```

use std::path::Path;

use hetkv_transport::TableSpec;
use serde::Deserialize;

use crate::StoreError;

/// `[server]` settings; each is optional and the command line overrides it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Largest frame body.
    pub max_frame_bytes: Option<u32>,
    /// Largest table footprint on one shard.
    pub max_table_bytes: Option<u64>,
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Server settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Tables created at start (idempotently).
    #[serde(default)]
    pub tables: Vec<TableSpec>,
}

impl DaemonConfig {
    /// Parses and validates a configuration.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let config: Self = toml::from_str(text).map_err(|e| StoreError::Config(e.to_string()))?;
        for t in &config.tables {
            t.validate()
                .map_err(|e| StoreError::Config(format!("table {:?}: {e}", t.name)))?;
        }
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StoreError::Config(format!("reading {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| StoreError::Config(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetkv_transport::{Initializer, OptimizerSpec};

    #[test]
    fn parses_the_documented_example() {
        let c = DaemonConfig::parse(
            r#"
            [server]
            max_frame_bytes = 1048576
            [[tables]]
            name = "ads"
            rows = 1000
            dim = 8
            init = { normal = { std = 0.01, seed = 7 } }
            optimizer = { adagrad = { lr = 0.05, eps = 1e-8, initial_accumulator = 0.1 } }
            [[tables]]
            name = "zeros"
            rows = 10
            dim = 2
            init = "zeros"
            optimizer = { sgd = { lr = 0.5 } }
            [[tables]]
            name = "raw_ids"
            rows = 1000000
            dim = 16
            init = { normal = { std = 0.01, seed = 3 } }
            optimizer = { rowwise_adagrad = { lr = 0.05 } }
            buckets = 1024
            dynamic = { admission = { threshold = { count = 2 } }, eviction = "lfu" }
            [[tables]]
            name = "fresh_ids"
            rows = 1000
            dim = 4
            init = "zeros"
            optimizer = { sgd = { lr = 0.5 } }
            dynamic = { admission = "always", eviction = { ttl = { steps = 500 } } }
            "#,
        )
        .unwrap();
        assert_eq!(c.server.max_frame_bytes, Some(1 << 20));
        assert_eq!(c.tables.len(), 4);
        assert_eq!(
            c.tables[3].dynamic.map(|d| d.eviction),
            Some(hetkv_transport::Eviction::Ttl { steps: 500 })
        );
        assert_eq!(c.tables[0].init, Initializer::Normal { std: 0.01, seed: 7 });
        assert_eq!(c.tables[0].buckets, hetkv_transport::DEFAULT_BUCKETS);
        assert_eq!(c.tables[0].dynamic, None);
        assert_eq!(c.tables[1].optimizer, OptimizerSpec::Sgd { lr: 0.5 });
        assert_eq!(c.tables[2].buckets, 1024);
        assert_eq!(
            c.tables[2].dynamic,
            Some(hetkv_transport::DynamicSpec {
                admission: hetkv_transport::Admission::Threshold { count: 2 },
                eviction: hetkv_transport::Eviction::Lfu,
            })
        );
    }

    #[test]
    fn refuses_unknown_keys_and_invalid_tables() {
        assert!(DaemonConfig::parse("[server]\nmax_frames = 3\n").is_err());
        let bad_dim = r#"
            [[tables]]
            name = "t"
            rows = 10
            dim = 0
            init = "zeros"
            optimizer = { sgd = { lr = 0.5 } }
        "#;
        let e = DaemonConfig::parse(bad_dim).unwrap_err().to_string();
        assert!(e.contains("dim 0"), "{e}");
    }
}
