//! A cache's statistics in a Prometheus registry the trainer owns (`prometheus-client`).
//!
//! A [`CachedTable`] belongs to its worker thread; a scrape runs on another. So each cache
//! publishes a copy of its counters at the end of every call (one uncontended lock per call,
//! not per key) into a [`CacheStatsHandle`], and a [`CacheCollector`] reads that copy at each
//! scrape:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = hetkv_store::EmbeddedCluster::start(1)?;
//! # let client = hetkv_client::Cluster::connect_tcp(cluster.addrs(), &Default::default())?;
//! # let table = client.create_table(&hetkv_transport::TableSpec {
//! #     name: "ads".into(), rows: 100, dim: 4,
//! #     init: hetkv_transport::Initializer::Zeros,
//! #     optimizer: hetkv_transport::OptimizerSpec::Sgd { lr: 0.1 },
//! #     buckets: hetkv_transport::DEFAULT_BUCKETS, dynamic: None,
//! # })?;
//! use hetkv_client::{Bound, CacheConfig, Capacity, PolicyKind};
//! use prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::with_prefix("trainer");
//! let cache = table.cached(CacheConfig::new(Capacity::Rows(10), PolicyKind::Lfu, Bound::updates(100)));
//! // One worker's cache, labelled with its table and the worker.
//! let worker = registry.sub_registry_with_label(("worker".into(), "0".into()));
//! hetkv_client::metrics::register(worker, &cache);
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.contains(r#"trainer_hetkv_cache_lookups_total{worker="0",table="ads"} 0"#));
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::stats::CacheStats;
use crate::CachedTable;

/// What a cache publishes after each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishedStats {
    /// Its counters.
    pub stats: CacheStats,
    /// Rows it holds.
    pub resident: usize,
    /// Rows it can hold.
    pub capacity: usize,
    /// Its read and write bounds.
    pub bounds: (crate::Bound, crate::Bound),
}

/// The counters a cache last published, shared with whoever reads them (a scrape).
#[derive(Clone, Debug, Default)]
pub struct CacheStatsHandle(Arc<Mutex<PublishedStats>>);

impl CacheStatsHandle {
    /// The counters as last published.
    pub fn get(&self) -> PublishedStats {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn publish(&self, published: PublishedStats) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = published;
    }
}

/// A [`Collector`] of one cache's published counters: every [`CacheStats`] counter as
/// `hetkv_cache_{name}_total`, and the gauges `hetkv_cache_resident_rows` and
/// `hetkv_cache_capacity_rows`.
#[derive(Debug)]
pub struct CacheCollector {
    handle: CacheStatsHandle,
}

impl CacheCollector {
    /// A collector of what `handle` holds ([`CachedTable::stats_handle`]).
    pub fn new(handle: CacheStatsHandle) -> Self {
        Self { handle }
    }
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = self.handle.get();
        for (name, help, value) in p.stats.counters() {
            let counter = ConstCounter::new(value);
            let name = format!("hetkv_cache_{name}");
            let metric = encoder.encode_descriptor(&name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        for (name, help, value) in [
            (
                "hetkv_cache_resident_rows",
                "Rows the cache holds",
                p.resident,
            ),
            (
                "hetkv_cache_capacity_rows",
                "Rows the cache can hold",
                p.capacity,
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Registers `cache`'s counters in `registry`, labelled `table="<its table>"` (add labels of
/// your own, a worker's, with [`Registry::sub_registry_with_label`] first).
pub fn register(registry: &mut Registry, cache: &CachedTable) {
    let table = cache.table().spec().name.clone();
    registry
        .sub_registry_with_label(("table".into(), table.into()))
        .register_collector(Box::new(CacheCollector::new(cache.stats_handle())));
}
