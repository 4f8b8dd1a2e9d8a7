//! Pulls a few rows from a running cluster, pushes a gradient to them, and pulls them again.
//!
//! ```sh
//! cargo run -p hetkv-client --example pull_push -- 127.0.0.1:7070,127.0.0.1:7071 ads
//! ```

use hetkv_client::{Cluster, TransportKind};
use hetkv_fallback_tcp::ClientConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addrs: Vec<String> = args
        .next()
        .ok_or("usage: pull_push ADDR[,ADDR...] TABLE")?
        .split(',')
        .map(str::to_string)
        .collect();
    let name = args.next().ok_or("usage: pull_push ADDR[,ADDR...] TABLE")?;

    let cluster = Cluster::connect(&addrs, TransportKind::Auto, &ClientConfig::default())?;
    let table = cluster.open_table(&name)?;
    let dim = table.spec().dim as usize;
    let keys = [0u64, 1, 2, 3, 4];
    let mut rows = vec![0f32; keys.len() * dim];
    let mut versions = vec![0u64; keys.len()];
    table.pull(&keys, &mut rows, Some(&mut versions))?;
    println!(
        "before: versions {versions:?}, row 0 starts {:?}",
        &rows[..dim.min(4)]
    );

    let grads = vec![0.5f32; keys.len() * dim];
    let applied = table.push(&keys, &[1; 5], &grads)?;
    table.pull(&keys, &mut rows, Some(&mut versions))?;
    println!(
        "pushed {applied} updates; after: versions {versions:?}, row 0 starts {:?}",
        &rows[..dim.min(4)]
    );
    Ok(())
}
