//! `hetkv-bench`: the embedded demo and hetkv's benchmarks.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

mod cache_bench;
mod demo;
mod throughput;
mod workload;

#[derive(Parser, Debug)]
#[command(name = "hetkv-bench", version, about = "hetkv demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole system in-process: shards, a client, an embedding workload, a report.
    Demo(demo::DemoArgs),
    /// Pull and push throughput over loopback TCP (rows/s), against an embedded cluster.
    Tcp(throughput::TcpArgs),
    /// Hit rate against cache size and policy on the reference workload.
    CacheSweep(cache_bench::SweepArgs),
    /// Bytes on the wire and batches/s against the bounds and the no-cache baseline.
    Comm(cache_bench::CommArgs),
}

fn write_json<T: Serialize>(path: &Option<std::path::PathBuf>, report: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    match path {
        Some(p) => {
            std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
            eprintln!("report written to {}", p.display());
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Demo(args) => {
            let r = demo::run(&args)?;
            eprintln!(
                "\nhetkv demo: {} shards, {} rows x {} f32, {} batches of {} keys ({:.0} unique)\n  \
                 {:.1} batches/s, {:.0} keys/s to the trainer, {:.0} KB on the wire per batch\n  \
                 server versions match the updates sent: {}\n  \
                 (no worker cache yet: every lookup reaches the shards, the classic parameter server)",
                r.shards,
                r.rows,
                r.dim,
                r.batches,
                r.batch,
                r.unique_per_batch,
                r.batches_per_s,
                r.keys_per_s,
                r.wire_bytes_per_batch / 1e3,
                if r.versions_consistent { "yes" } else { "NO" },
            );
            write_json(&args.json, &r)
        }
        Command::CacheSweep(args) => {
            let r = cache_bench::sweep(&args)?;
            write_json(&args.json, &r)
        }
        Command::Comm(args) => {
            let r = cache_bench::comm(&args)?;
            write_json(&args.json, &r)
        }
        Command::Tcp(args) => {
            let r = throughput::run(&args)?;
            write_json(&args.json, &r)
        }
    }
}
