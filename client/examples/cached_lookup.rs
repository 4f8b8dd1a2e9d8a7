//! A worker's cached view of a table on a running cluster: lookups, updates, a flush, and the
//! cache's counters.
//!
//! ```sh
//! cargo run -p hetkv-client --example cached_lookup -- 127.0.0.1:7070,127.0.0.1:7071 ads
//! ```

use hetkv_client::{Bound, CacheConfig, Capacity, Cluster, PolicyKind, TransportKind};
use hetkv_fallback_tcp::ClientConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: cached_lookup ADDR[,ADDR...] TABLE";
    let addrs: Vec<String> = args
        .next()
        .ok_or(usage)?
        .split(',')
        .map(str::to_string)
        .collect();
    let name = args.next().ok_or(usage)?;

    // One cluster connection and one cache per worker thread; here, one worker.
    let table = Cluster::connect(&addrs, TransportKind::Auto, &ClientConfig::default())?
        .open_table(&name)?;
    let dim = table.spec().dim as usize;
    let config = CacheConfig::new(
        Capacity::Fraction(0.10),
        PolicyKind::Lfu,
        Bound::updates(100),
    );
    let mut cache = table.cached(config);

    let rows = table.spec().rows;
    let mut out = vec![0f32; 256 * dim];
    for step in 0..50u64 {
        // A skewed batch: a few hot keys and a spread of others, duplicates kept.
        let keys: Vec<u64> = (0..256u64)
            .map(|i| (i * i * (step + 1)) % rows.min(1000))
            .collect();
        cache.lookup(&keys, &mut out)?;
        let grads: Vec<f32> = out.iter().map(|w| 0.01 * w).collect();
        cache.update(&keys, &grads)?;
    }
    cache.flush()?;
    let s = cache.stats();
    println!(
        "{} lookups, hit rate {:.1}%, {} rows pulled, {} rows pushed, {} evictions, {} B sent, {} B received",
        s.lookups,
        s.hit_rate() * 100.0,
        s.rows_pulled,
        s.rows_pushed,
        s.evictions,
        s.bytes_sent,
        s.bytes_received
    );
    Ok(())
}
