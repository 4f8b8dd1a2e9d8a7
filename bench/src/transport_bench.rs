//! `hetkv-bench transport`: reads of random rows over each transport that runs here, beside a
//! plain memcpy gather of the same rows from the same mapped region (no verification: the
//! physical limit of a same-host read), all in one run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetkv_fallback_tcp::{ClientConfig, ServerConfig, TcpShardClient};
use hetkv_store::{EmbeddedCluster, ShardConfig};
use hetkv_transport::row::RowLayout;
use hetkv_transport::{
    Initializer, OptimizerSpec, ShardTransport, SharedRegion, ShmTransport, TableSpec,
};
use serde::Serialize;

use crate::workload::UniformKeys;

/// Settings of the transport benchmark.
#[derive(clap::Args, Debug, Clone)]
pub struct TransportArgs {
    /// Row dimensions (f32 values per row).
    #[arg(long, value_delimiter = ',', default_value = "64,128,512")]
    pub dims: Vec<u32>,
    /// Bytes of each table's region: rows = this / row stride (larger than the CPU caches).
    #[arg(long, default_value_t = 256 << 20)]
    pub table_bytes: u64,
    /// Random keys per batch.
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Directory for the daemon's shared-memory files [default: /dev/shm when it exists].
    #[arg(long)]
    pub shm_dir: Option<std::path::PathBuf>,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One measurement.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// `memcpy`, `shm`, `tcp`, or `rdma` (soft-RoCE in the VM: emulation, a correctness run).
    pub path: &'static str,
    /// Row dimension.
    pub dim: u32,
    /// Batches read.
    pub batches: u64,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Payload (f32 values) per second, in GB/s.
    pub payload_gb_per_s: f64,
    /// This path's rows/s over memcpy's at the same dim.
    pub vs_memcpy: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Keys per batch.
    pub batch: usize,
    /// Bytes of each region.
    pub table_bytes: u64,
    /// Logical CPUs (the daemon and the client share them).
    pub cpus: usize,
    /// Measurements.
    pub entries: Vec<Entry>,
}

/// Runs each path for `seconds`, then reports rows/s.
fn measure(
    seconds: f64,
    batch: usize,
    keys: &mut UniformKeys,
    mut read: impl FnMut(&[u64]) -> Result<()>,
) -> Result<(u64, f64)> {
    let mut k = vec![0u64; batch];
    // Warm-up: fault the pages in and fill the connection pools.
    for _ in 0..3 {
        keys.fill(&mut k);
        read(&k)?;
    }
    let (start, budget) = (Instant::now(), Duration::from_secs_f64(seconds));
    let mut batches = 0u64;
    while start.elapsed() < budget || batches < 3 {
        keys.fill(&mut k);
        read(&k)?;
        batches += 1;
    }
    Ok((
        batches,
        (batches * batch as u64) as f64 / start.elapsed().as_secs_f64(),
    ))
}

/// The RDMA device, when this build has RDMA and one works here (said once, with the reason).
#[cfg(feature = "rdma")]
fn rdma_device() -> Option<std::sync::Arc<hetkv_transport::rdma::Device>> {
    match hetkv_transport::rdma::Device::open_first() {
        Ok(d) => Some(std::sync::Arc::new(d)),
        Err(e) => {
            eprintln!("no RDMA path: {e}");
            None
        }
    }
}

#[cfg(not(feature = "rdma"))]
fn rdma_device() -> Option<std::convert::Infallible> {
    None
}

#[cfg(feature = "rdma")]
fn rdma_transport(
    device: Option<std::sync::Arc<hetkv_transport::rdma::Device>>,
    addr: &str,
) -> Result<Option<Box<dyn ShardTransport>>> {
    let Some(device) = device else {
        return Ok(None);
    };
    let control = TcpShardClient::connect(addr, ClientConfig::default())?;
    let t = hetkv_transport::rdma::RdmaTransport::connect(device, control)
        .map_err(|(_, e)| e)
        .context("connecting an RDMA queue pair")?;
    Ok(Some(Box::new(t)))
}

#[cfg(not(feature = "rdma"))]
fn rdma_transport(
    device: Option<std::convert::Infallible>,
    _addr: &str,
) -> Result<Option<Box<dyn ShardTransport>>> {
    Ok(device.map(|d| match d {}))
}

/// Runs the benchmark.
pub fn run(args: &TransportArgs) -> Result<Report> {
    anyhow::ensure!(args.batch > 0, "the batch must not be empty");
    let shm_root = args.shm_dir.clone().unwrap_or_else(|| {
        let dev_shm = std::path::Path::new("/dev/shm");
        if dev_shm.is_dir() {
            dev_shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    });
    let rdma_device = rdma_device();
    let cluster = EmbeddedCluster::start_with(1, ServerConfig::default(), |i| ShardConfig {
        shm_dir: Some(shm_root.clone()),
        rdma: rdma_device.is_some(),
        ..ShardConfig::new(i, 1)
    })
    .context("starting a shard that exposes shared memory")?;
    let addr = &cluster.addrs()[0];
    let tcp = TcpShardClient::connect(addr, ClientConfig::default())?;
    let rdma = rdma_transport(rdma_device, addr)?;
    let shm = ShmTransport::new(TcpShardClient::connect(addr, ClientConfig::default())?)
        .map_err(|(_, why)| why)
        .context("mapping the shard's regions")?;
    let mut entries = Vec::new();
    for &dim in &args.dims {
        let layout = RowLayout::new(dim);
        let rows = (args.table_bytes / layout.stride() as u64).max(1);
        let spec = TableSpec {
            name: format!("read{dim}"),
            rows,
            dim,
            init: Initializer::Normal { std: 0.01, seed: 5 },
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        };
        tcp.create_table(&spec)?;
        let desc = shm.region_info(&spec.name)?;
        let path = desc
            .shm_path
            .as_deref()
            .context("the shard did not expose the region")?;
        let region = SharedRegion::open(std::path::Path::new(path))?;
        let bar = crate::progress::bar(3, &format!("dim {dim}: memcpy, shm, tcp"));
        let mut keys = UniformKeys::new(rows, u64::from(dim));
        let payload = 4 * dim as usize;
        let mut gathered = Vec::with_capacity(args.batch * payload);
        let memcpy = measure(args.seconds, args.batch, &mut keys, |k| {
            gathered.clear();
            for &key in k {
                region.copy_unverified(layout.row_offset(key) + 8, payload, &mut gathered);
            }
            std::hint::black_box(&gathered);
            Ok(())
        })?;
        bar.inc(1);
        let (mut versions, mut values) = (Vec::new(), Vec::new());
        let one_sided = measure(args.seconds, args.batch, &mut keys, |k| {
            shm.pull(&spec.name, k, &mut versions, &mut values)?;
            Ok(())
        })?;
        bar.inc(1);
        let over_tcp = measure(args.seconds, args.batch, &mut keys, |k| {
            tcp.pull(&spec.name, k, &mut versions, &mut values)?;
            Ok(())
        })?;
        let mut paths = vec![("memcpy", memcpy), ("shm", one_sided), ("tcp", over_tcp)];
        if let Some(rdma) = &rdma {
            let over_rdma = measure(args.seconds, args.batch, &mut keys, |k| {
                rdma.pull(&spec.name, k, &mut versions, &mut values)?;
                Ok(())
            })?;
            paths.push(("rdma", over_rdma));
        }
        bar.finish_and_clear();
        for (path, (batches, rows_per_s)) in paths {
            entries.push(Entry {
                path,
                dim,
                batches,
                rows_per_s,
                payload_gb_per_s: rows_per_s * payload as f64 / 1e9,
                vs_memcpy: rows_per_s / memcpy.1,
            });
        }
        if let Some((_, r)) = entries
            .iter()
            .rev()
            .find(|e| e.path == "rdma")
            .map(|e| (e, e.rows_per_s))
        {
            eprintln!(
                "dim {dim}: rdma (soft-RoCE, emulated: a correctness run) {:.2} GB/s",
                r * payload as f64 / 1e9
            );
        }
        eprintln!(
            "dim {dim}: memcpy {:.2} GB/s, shm {:.2} GB/s ({:.2}x memcpy), tcp {:.2} GB/s; shm/tcp {:.1}x",
            memcpy.1 * payload as f64 / 1e9,
            one_sided.1 * payload as f64 / 1e9,
            one_sided.1 / memcpy.1,
            over_tcp.1 * payload as f64 / 1e9,
            one_sided.1 / over_tcp.1
        );
    }
    let stats = shm.read_stats();
    tracing::info!(?stats, "shared-memory reads");
    Ok(Report {
        batch: args.batch,
        table_bytes: args.table_bytes,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        entries,
    })
}
