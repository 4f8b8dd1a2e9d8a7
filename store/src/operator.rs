//! The `hetkv` binary's operator commands on checkpoints and tables: `checkpoint` (on a running
//! cluster, or list/verify/compact on a data directory), `export` and `import`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_store::checkpoint::{CheckpointDir, Listing};
use hetkv_store::placement::Placement;
use hetkv_transport::{Routing, ShardTransport, TableSpec};

use crate::{
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

/// The table's spec as every shard lists it.
fn table_spec(shards: &[TcpShardClient], table: &str) -> Result<TableSpec> {
    let mut spec: Option<TableSpec> = None;
    for c in shards {
        let t = c
            .list_tables()?
            .into_iter()
            .find(|t| t.spec.name == table)
            .with_context(|| format!("{} holds no table {table}", c.addr()))?;
        match &spec {
            Some(s) if s != &t.spec => bail!("table {table} differs between shards"),
            _ => spec = Some(t.spec),
        }
    }
    spec.context("no shards")
}

/// Keys per request: about 16 MiB of rows, within any frame limit a daemon uses by default.
fn chunk_keys(dim: u32) -> usize {
    ((16usize << 20) / (8 + 4 * dim as usize)).max(1)
}

pub(crate) fn export(args: &ExportArgs) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let shards = connect_cluster(&args.cluster)?;
    let spec = table_spec(&shards, &args.table)?;
    let keys: Option<Vec<u64>> = match &args.keys {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading keys from {}", path.display()))?;
            let keys = text
                .split_whitespace()
                .map(|w| {
                    w.parse::<u64>()
                        .with_context(|| format!("{w:?} in {} is not a key", path.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(k) = keys.iter().find(|&&k| k >= spec.rows) {
                bail!(
                    "key {k} in {} is outside table {} of {} rows",
                    path.display(),
                    spec.name,
                    spec.rows
                );
            }
            Some(keys)
        }
    };
    let n = keys.as_ref().map_or(spec.rows, |k| k.len() as u64);
    let dim = spec.dim as usize;
    let bytes = n.checked_mul(4 * dim as u64).context("table too large")?;
    let mut values = vec![0u8; usize::try_from(bytes).context("table too large to export")?];
    let mut versions = vec![0u8; n as usize * 8];
    let routing = Routing::new(shards.len() as u32);
    let chunk = chunk_keys(spec.dim);
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    let mut shard_keys: Vec<Vec<u64>> = vec![Vec::new(); shards.len()];
    let mut shard_pos: Vec<Vec<usize>> = vec![Vec::new(); shards.len()];
    let mut start = 0u64;
    while start < n {
        let end = (start + chunk as u64).min(n);
        shard_keys.iter_mut().for_each(Vec::clear);
        shard_pos.iter_mut().for_each(Vec::clear);
        for pos in start..end {
            let key = keys.as_ref().map_or(pos, |k| k[pos as usize]);
            let s = routing.shard_of(key);
            shard_keys[s].push(key);
            shard_pos[s].push(pos as usize);
        }
        for (s, c) in shards.iter().enumerate() {
            if shard_keys[s].is_empty() {
                continue;
            }
            c.pull(&spec.name, &shard_keys[s], &mut v, &mut rows)
                .with_context(|| format!("pulling rows of {} from {}", spec.name, c.addr()))?;
            for (j, &pos) in shard_pos[s].iter().enumerate() {
                versions[pos * 8..pos * 8 + 8].copy_from_slice(&v[j].to_le_bytes());
                for (e, x) in rows[j * dim..(j + 1) * dim].iter().enumerate() {
                    let at = (pos * dim + e) * 4;
                    values[at..at + 4].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        start = end;
    }
    let key_bytes: Option<Vec<u8>> = keys
        .as_ref()
        .map(|k| k.iter().flat_map(|k| k.to_le_bytes()).collect());
    let mut tensors = vec![
        (
            "embeddings".to_string(),
            TensorView::new(Dtype::F32, vec![n as usize, dim], &values)?,
        ),
        (
            "versions".to_string(),
            TensorView::new(Dtype::U64, vec![n as usize], &versions)?,
        ),
    ];
    if let Some(k) = &key_bytes {
        tensors.push((
            "keys".to_string(),
            TensorView::new(Dtype::U64, vec![n as usize], k)?,
        ));
    }
    let metadata = std::collections::HashMap::from([
        ("table".to_string(), spec.name.clone()),
        ("rows".to_string(), spec.rows.to_string()),
        ("dim".to_string(), spec.dim.to_string()),
        ("optimizer".to_string(), spec.optimizer.name().to_string()),
    ]);
    safetensors::serialize_to_file(tensors, Some(metadata), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "exported {n} rows of table {} (dim {dim}) to {}",
        spec.name,
        args.out.display()
    );
    Ok(())
}

pub(crate) fn import(args: &ImportArgs) -> Result<()> {
    use safetensors::tensor::{Dtype, SafeTensors};
    let shards = connect_cluster(&args.cluster)?;
    let spec = table_spec(&shards, &args.table)?;
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", args.file.display()))?;
    let t = file
        .tensor(&args.tensor)
        .with_context(|| format!("{} holds no tensor {:?}", args.file.display(), args.tensor))?;
    let dim = spec.dim as usize;
    if t.dtype() != Dtype::F32 || t.shape().len() != 2 || t.shape()[1] != dim {
        bail!(
            "tensor {} is {:?} {:?}; table {} needs f32 [n, {dim}]",
            args.tensor,
            t.dtype(),
            t.shape(),
            spec.name
        );
    }
    let n = t.shape()[0];
    let keys: Vec<u64> = match file.tensor("keys") {
        Ok(k) => {
            if k.dtype() != Dtype::U64 || k.shape() != [n] {
                bail!(
                    "tensor keys is {:?} {:?}; it must be u64 [{n}]",
                    k.dtype(),
                    k.shape()
                );
            }
            k.data()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        }
        Err(_) => (0..n as u64).collect(),
    };
    if let Some(k) = keys.iter().find(|&&k| k >= spec.rows) {
        bail!(
            "key {k} is outside table {} of {} rows",
            spec.name,
            spec.rows
        );
    }
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let routing = Routing::new(shards.len() as u32);
    let chunk = chunk_keys(spec.dim);
    let mut assigned = 0u64;
    for (ci, ks) in keys.chunks(chunk).enumerate() {
        let base = ci * chunk;
        for (s, c) in shards.iter().enumerate() {
            let mine: Vec<usize> = (0..ks.len())
                .filter(|&j| routing.shard_of(ks[j]) == s)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let k: Vec<u64> = mine.iter().map(|&j| ks[j]).collect();
            let mut v = Vec::with_capacity(mine.len() * dim);
            for &j in &mine {
                v.extend_from_slice(&values[(base + j) * dim..(base + j + 1) * dim]);
            }
            assigned += c
                .assign(&spec.name, &k, &v)
                .with_context(|| format!("assigning rows of {} on {}", spec.name, c.addr()))?
                .rows as u64;
        }
    }
    println!(
        "imported {assigned} rows into table {} from {}",
        spec.name,
        args.file.display()
    );
    Ok(())
}
