//! The `hetkv` binary's operator commands on checkpoints and tables: `checkpoint` (on a running
//! cluster, or list/verify/compact on a data directory, reshard across data directories),
//! `export` and `import`.

use std::path::Path;

use crate::checkpoint::{CheckpointDir, Listing};
use crate::placement::Placement;
use crate::tensors;
use anyhow::{bail, Context, Result};
use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::ShardTransport;

use super::{
    read_token, seconds, CheckpointAction, CheckpointArgs, ClusterArgs, ExportArgs, ImportArgs,
};

/// Connects to every shard of `cluster` in parallel, checking each is the shard it is listed as.
fn connect(
    addrs: &[String],
    timeout: std::time::Duration,
    token: Option<&Path>,
) -> Result<Vec<TcpShardClient>> {
    let config = ClientConfig {
        connect_timeout: timeout.min(std::time::Duration::from_secs(30)),
        io_timeout: Some(timeout),
        deadline: timeout,
        auth: read_token(token)?,
        ..ClientConfig::default()
    };
    let n = addrs.len();
    std::thread::scope(|s| {
        let handles: Vec<_> = addrs
            .iter()
            .map(|addr| {
                let config = config.clone();
                s.spawn(move || {
                    TcpShardClient::connect(addr, config)
                        .with_context(|| format!("connecting to {addr}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let c = h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the connecting thread panicked")))?;
                let hello = c.hello();
                if hello.shard as usize != i || hello.shards as usize != n {
                    bail!(
                        "{} is shard {} of {}, but is listed as shard {i} of {n}",
                        addrs[i],
                        hello.shard,
                        hello.shards
                    );
                }
                Ok(c)
            })
            .collect()
    })
}

fn connect_cluster(c: &ClusterArgs) -> Result<Vec<TcpShardClient>> {
    connect(
        &c.cluster,
        seconds("--timeout", c.timeout)?,
        c.auth_token_file.as_deref(),
    )
}

pub(crate) fn checkpoint(args: &CheckpointArgs) -> Result<()> {
    match &args.action {
        Some(CheckpointAction::List { data_dir, json }) => list(data_dir, *json),
        Some(CheckpointAction::Verify { data_dir, name }) => verify(data_dir, name.as_deref()),
        Some(CheckpointAction::Compact {
            data_dir,
            name,
            out,
        }) => compact(data_dir, name.as_deref(), out),
        Some(CheckpointAction::Reshard {
            from,
            name,
            to,
            out,
        }) => reshard(from, name, to, out),
        None => {
            let name = args.name.as_deref().context("--name is required")?;
            let shards = connect(
                &args.cluster,
                seconds("--timeout", args.timeout)?,
                args.auth_token_file.as_deref(),
            )?;
            let results: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = shards
                    .iter()
                    .map(|c| s.spawn(move || c.checkpoint(name, args.incremental)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("the checkpoint thread does not panic"))
                    .collect()
            });
            let mut failed = 0;
            for (i, (addr, r)) in args.cluster.iter().zip(&results).enumerate() {
                match r {
                    Ok(r) if args.json => println!("{}", serde_json::to_string(r)?),
                    Ok(r) => println!(
                        "shard {i} at {addr}: checkpoint {} (seq {}{}) committed: {} tables, {} rows, {} bytes in {:.3} s",
                        r.name,
                        r.seq,
                        r.parent.as_ref().map(|p| format!(", incremental on {p}")).unwrap_or_default(),
                        r.tables,
                        r.rows,
                        r.bytes,
                        r.micros as f64 / 1e6
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("shard {i} at {addr}: error: {e}");
                    }
                }
            }
            if failed > 0 {
                bail!(
                    "{failed} of {} shards did not commit checkpoint {name}",
                    results.len()
                );
            }
            Ok(())
        }
    }
}

fn list(data_dir: &Path, json: bool) -> Result<()> {
    let listed = CheckpointDir::at(data_dir).list()?;
    if json {
        let items: Vec<_> = listed
            .iter()
            .map(|l| match l {
                Listing::Committed(m) => serde_json::json!({ "committed": m }),
                Listing::Incomplete { name } => serde_json::json!({ "incomplete": name }),
                Listing::Unreadable { name, error } => {
                    serde_json::json!({ "unreadable": name, "error": error.to_string() })
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    for l in &listed {
        match l {
            Listing::Committed(m) => println!(
                "{:<32} seq {:>6}  {:<11} {:<20} shard {}/{}  {} tables, {} rows, {} bytes",
                m.name,
                m.seq,
                m.kind.name(),
                m.parent
                    .as_deref()
                    .map(|p| format!("on {p}"))
                    .unwrap_or_default(),
                m.shard,
                m.shards,
                m.tables.len(),
                m.tables.iter().map(|t| t.rows).sum::<u64>(),
                m.tables.iter().map(|t| t.bytes).sum::<u64>()
            ),
            Listing::Incomplete { name } => {
                println!("{name:<32} incomplete (no manifest: not a checkpoint)")
            }
            Listing::Unreadable { name, error } => println!("{name:<32} UNREADABLE: {error}"),
        }
    }
    Ok(())
}

fn newest_or(dir: &CheckpointDir, name: Option<&str>) -> Result<String> {
    match name {
        Some(n) => Ok(n.to_string()),
        None => Ok(dir
            .newest()?
            .with_context(|| format!("no committed checkpoint in {}", dir.root().display()))?
            .name),
    }
}

fn verify(data_dir: &Path, name: Option<&str>) -> Result<()> {
    let dir = CheckpointDir::at(data_dir);
    let name = newest_or(&dir, name)?;
    let (chain, rows) = dir
        .verify(&name)
        .with_context(|| format!("checkpoint {name} fails verification"))?;
    let last = chain.last().expect("a chain has its checkpoint");
    println!(
        "checkpoint {name}: ok ({} checkpoints in its chain; shard {} of {})",
        chain.len(),
        last.shard,
        last.shards
    );
    for (t, n) in last.tables.iter().zip(rows) {
        println!("  {:<24} {n} row records read", t.name);
    }
    Ok(())
}

fn compact(data_dir: &Path, name: Option<&str>, out: &str) -> Result<()> {
    // The lock keeps a daemon from writing checkpoints (and seq numbers) meanwhile.
    let _lock = Placement::new(0, Some(data_dir), None)
        .context("compacting needs the data directory to itself: stop its daemon first")?;
    let dir = CheckpointDir::at(data_dir);
    let name = newest_or(&dir, name)?;
    let m = dir
        .compact(&name, out)
        .with_context(|| format!("compacting checkpoint {name} into {out}"))?;
    println!(
        "checkpoint {out} (seq {}): the state of {name}'s chain as one full checkpoint, {} tables",
        m.seq,
        m.tables.len()
    );
    Ok(())
}

fn reshard(
    from: &[std::path::PathBuf],
    name: &str,
    to: &[std::path::PathBuf],
    out: &str,
) -> Result<()> {
    // Every directory locked once (a source may also be a target), so that no daemon writes into
    // them meanwhile.
    let mut locked: Vec<std::path::PathBuf> = Vec::new();
    let mut locks = Vec::new();
    for dir in from.iter().chain(to) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
        let real = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        if locked.contains(&real) {
            continue;
        }
        locks.push(Placement::new(0, Some(dir), None).with_context(|| {
            format!(
                "resharding needs {} to itself: stop its daemon first",
                dir.display()
            )
        })?);
        locked.push(real);
    }
    let sources: Vec<CheckpointDir> = from.iter().map(|d| CheckpointDir::at(d)).collect();
    let targets: Vec<CheckpointDir> = to.iter().map(|d| CheckpointDir::at(d)).collect();
    let made = crate::checkpoint::reshard(&sources, name, &targets, out).with_context(|| {
        format!(
            "moving checkpoint {name} of {} shards onto {} shards",
            from.len(),
            to.len()
        )
    })?;
    for (dir, m) in to.iter().zip(&made) {
        println!(
            "{}: checkpoint {out} (seq {}), shard {} of {}, {} tables, {} rows",
            dir.display(),
            m.seq,
            m.shard,
            m.shards,
            m.tables.len(),
            m.tables.iter().map(|t| t.rows).sum::<u64>()
        );
    }
    drop(locks);
    Ok(())
}

pub(crate) fn export(args: &ExportArgs) -> Result<()> {
    let shards = connect_cluster(&args.cluster)?;
    let keys: Option<Vec<u64>> = match &args.keys {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading keys from {}", path.display()))?;
            Some(
                text.split_whitespace()
                    .map(|w| {
                        w.parse::<u64>()
                            .with_context(|| format!("{w:?} in {} is not a key", path.display()))
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        }
    };
    let shards: Vec<&dyn ShardTransport> =
        shards.iter().map(|c| c as &dyn ShardTransport).collect();
    let done = tensors::export_table(&shards, &args.table, keys.as_deref(), &args.out)?;
    println!(
        "exported {} rows of table {} (dim {}) to {}",
        done.rows,
        done.table,
        done.dim,
        args.out.display()
    );
    Ok(())
}

pub(crate) fn import(args: &ImportArgs) -> Result<()> {
    let shards = connect_cluster(&args.cluster)?;
    let shards: Vec<&dyn ShardTransport> =
        shards.iter().map(|c| c as &dyn ShardTransport).collect();
    let done = tensors::import_table(&shards, &args.table, &args.file, &args.tensor)?;
    println!(
        "imported {} rows into table {} from {}",
        done.rows,
        done.table,
        args.file.display()
    );
    Ok(())
}
