//! The caches' counters in a registry the trainer owns: worker threads look up and update
//! through their caches while another thread scrapes the registry, and what the Prometheus text
//! parser reads equals each cache's own statistics once the workers are done.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hetkv_client::{Bound, CacheConfig, CacheStats, Capacity, Cluster, PolicyKind};
use hetkv_store::EmbeddedCluster;
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};
use prometheus_client::registry::Registry;

const WORKERS: usize = 4;

fn scrape(registry: &Mutex<Registry>) -> prometheus_parse::Scrape {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry.lock().unwrap()).unwrap();
    prometheus_parse::Scrape::parse(text.as_bytes().lines()).expect("the Prometheus text format")
}

fn value(s: &prometheus_parse::Scrape, metric: &str, worker: usize) -> Option<f64> {
    let worker = worker.to_string();
    s.samples
        .iter()
        .find(|x| {
            x.metric == metric
                && x.labels.get("worker") == Some(worker.as_str())
                && x.labels.get("table") == Some("ads")
        })
        .and_then(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn cache_counters_scraped_from_the_trainers_registry_equal_the_caches_statistics() {
    let cluster = EmbeddedCluster::start(2).unwrap();
    let client = Cluster::connect_tcp(cluster.addrs(), &Default::default()).unwrap();
    let table = client
        .create_table(&TableSpec {
            name: "ads".into(),
            rows: 2_000,
            dim: 8,
            init: Initializer::Zeros,
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        })
        .unwrap();
    let registry = Arc::new(Mutex::new(Registry::with_prefix("trainer")));
    let done = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (registry, done) = (registry.clone(), done.clone());
        std::thread::spawn(move || {
            let mut scrapes = 0;
            let mut last = 0.0;
            while !done.load(Ordering::Relaxed) {
                let s = scrape(&registry);
                // Counters never go back between scrapes.
                let now = value(&s, "trainer_hetkv_cache_lookups_total", 0).unwrap_or(0.0);
                assert!(now >= last, "lookups went from {last} to {now}");
                last = now;
                scrapes += 1;
            }
            scrapes
        })
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut cache = table.cached(CacheConfig::new(
                Capacity::Rows(200),
                PolicyKind::Lfu,
                Bound::updates(5),
            ));
            let sub_registry = &mut *registry.lock().unwrap();
            let worker =
                sub_registry.sub_registry_with_label(("worker".into(), w.to_string().into()));
            hetkv_client::metrics::register(worker, &cache);
            std::thread::spawn(move || -> CacheStats {
                let mut out = vec![0f32; 32 * 8];
                for i in 0..300u64 {
                    let keys: Vec<u64> =
                        (0..32).map(|j| (i * 7 + j * j + w as u64) % 400).collect();
                    cache.lookup(&keys, &mut out).unwrap();
                    cache.update(&keys, &vec![0.01; keys.len() * 8]).unwrap();
                }
                cache.flush().unwrap();
                cache.stats()
            })
        })
        .collect();
    let stats: Vec<CacheStats> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    assert!(scraper.join().unwrap() > 0, "scraped while the workers ran");

    let s = scrape(&registry);
    for (w, st) in stats.iter().enumerate() {
        for (metric, want) in [
            ("trainer_hetkv_cache_lookups_total", st.lookups),
            ("trainer_hetkv_cache_hits_total", st.hits),
            ("trainer_hetkv_cache_misses_total", st.misses),
            ("trainer_hetkv_cache_rows_pushed_total", st.rows_pushed),
            ("trainer_hetkv_cache_evictions_total", st.evictions),
            ("trainer_hetkv_cache_updates_total", st.updates),
        ] {
            assert_eq!(
                value(&s, metric, w),
                Some(want as f64),
                "worker {w}: {metric}"
            );
        }
        assert!(st.hits > 0 && st.evictions > 0, "worker {w}: {st:?}");
        assert_eq!(
            value(&s, "trainer_hetkv_cache_capacity_rows", w),
            Some(200.0)
        );
    }
}
