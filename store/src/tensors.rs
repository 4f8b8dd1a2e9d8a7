//! Tables as safetensors files (`hetkv export` and `hetkv import`, and the Python package's
//! `Table.export`): a table of a running cluster written in global key order, and rows set from
//! a file. The bytes: `embeddings` (f32, rows x dim), `versions` (u64, one per row) and, when only
//! some keys were asked for, `keys` (u64); metadata `table`, `rows`, `dim`, `optimizer`.

use std::path::Path;

use hetkv_transport::codec::assign::Assignment;
use hetkv_transport::{ShardTransport, TableSpec};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::StoreError;

/// What an export or an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transferred {
    /// The table.
    pub table: String,
    /// Rows written to the file, or set on the shards.
    pub rows: u64,
    /// Values per row.
    pub dim: usize,
}

fn io(what: String, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

/// The table's spec as every shard lists it.
pub fn table_spec(shards: &[&dyn ShardTransport], table: &str) -> Result<TableSpec, StoreError> {
    let mut spec: Option<TableSpec> = None;
    for c in shards {
        let t = c
            .list_tables()
            .map_err(|e| io(format!("listing the tables of {}", c.addr()), e))?
            .into_iter()
            .find(|t| t.spec.name == table)
            .ok_or_else(|| StoreError::UnknownTable(format!("{table} (on {})", c.addr())))?;
        match &spec {
            Some(s) if s != &t.spec => {
                return Err(StoreError::ConflictingTable(format!(
                    "table {table} differs between shards"
                )))
            }
            _ => spec = Some(t.spec),
        }
    }
    spec.ok_or_else(|| StoreError::Config("no shards".into()))
}

/// Keys per request: about 16 MiB of rows, within any frame limit a daemon uses by default.
fn chunk_keys(dim: u32) -> usize {
    ((16usize << 20) / (8 + 4 * dim as usize)).max(1)
}

/// A table's rows as read from its shards: the rows of `keys` in their order, or every row (a
/// dynamic table's every held row, with its key).
#[derive(Clone, Debug)]
pub struct TableRows {
    /// The table's spec, as its shards hold it.
    pub spec: TableSpec,
    /// The rows' keys, where they are not simply 0 to n-1 (keys given, or a dynamic table's).
    pub keys: Option<Vec<u64>>,
    /// Each row's version.
    pub versions: Vec<u64>,
    /// Each row's values, rows x dim.
    pub values: Vec<f32>,
}

/// Reads `table` (every row, or the rows of `keys` in their order) from the cluster whose shards
/// are `shards` (in shard order), each row as of one moment: in chunks of rows by `pull`, or a
/// dynamic table's held rows by `scan`. A key not held by a dynamic table reads as its initial
/// value at version 0.
pub fn read_table(
    shards: &[&dyn ShardTransport],
    table: &str,
    keys: Option<&[u64]>,
) -> Result<TableRows, StoreError> {
    let spec = table_spec(shards, table)?;
    if spec.is_dynamic() && keys.is_none() {
        return read_dynamic(shards, spec);
    }
    if let Some(k) = keys.and_then(|k| k.iter().find(|&&k| !spec.is_dynamic() && k >= spec.rows)) {
        return Err(StoreError::KeyOutOfRange(format!(
            "key {k} is outside table {} of {} rows",
            spec.name, spec.rows
        )));
    }
    let n = keys.map_or(spec.rows, |k| k.len() as u64);
    let dim = spec.dim as usize;
    let too_large = || StoreError::InvalidSpec(format!("table {table} is too large to read"));
    let elements = n.checked_mul(dim as u64).ok_or_else(too_large)?;
    let mut values = vec![0f32; usize::try_from(elements).map_err(|_| too_large())?];
    let mut versions = vec![0u64; n as usize];
    let routing = spec.routing(shards.len() as u32);
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
            let key = keys.map_or(pos, |k| k[pos as usize]);
            let s = routing.shard_of(key);
            shard_keys[s].push(key);
            shard_pos[s].push(pos as usize);
        }
        for (s, c) in shards.iter().enumerate() {
            if shard_keys[s].is_empty() {
                continue;
            }
            c.pull(&spec.name, &shard_keys[s], &mut v, &mut rows)
                .map_err(|e| {
                    io(
                        format!("pulling rows of {} from {}", spec.name, c.addr()),
                        e,
                    )
                })?;
            for (j, &pos) in shard_pos[s].iter().enumerate() {
                spec.complete_pulled(shard_keys[s][j], v[j], &mut rows[j * dim..(j + 1) * dim]);
                versions[pos] = v[j];
                values[pos * dim..(pos + 1) * dim].copy_from_slice(&rows[j * dim..(j + 1) * dim]);
            }
        }
        start = end;
    }
    Ok(TableRows {
        spec,
        keys: keys.map(<[u64]>::to_vec),
        versions,
        values,
    })
}

/// Slots a scan asks for at a time.
const SCAN_SLOTS: u32 = 16_384;

/// Every held row of dynamic table `spec`, with its key: shard by shard, slot by slot (each row
/// as of one moment, read by `scan`).
fn read_dynamic(shards: &[&dyn ShardTransport], spec: TableSpec) -> Result<TableRows, StoreError> {
    let (mut keys, mut versions, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for c in shards {
        let mut from = 0u64;
        loop {
            let page = c
                .scan(&spec.name, spec.dim, from, SCAN_SLOTS)
                .map_err(|e| io(format!("scanning {} on {}", spec.name, c.addr()), e))?;
            keys.extend_from_slice(&page.keys);
            versions.extend_from_slice(&page.versions);
            values.extend_from_slice(&page.values);
            if page.next >= page.end || page.next <= from {
                break;
            }
            from = page.next;
        }
    }
    Ok(TableRows {
        spec,
        keys: Some(keys),
        versions,
        values,
    })
}

/// Writes `table` (every row, or the rows of `keys` in their order) of the cluster whose shards
/// are `shards` (in shard order) to the safetensors file `out` ([`read_table`]): `embeddings`
/// (f32, n x dim), `versions` (u64) and, where the rows are not 0 to n-1, `keys` (u64).
pub fn export_table(
    shards: &[&dyn ShardTransport],
    table: &str,
    keys: Option<&[u64]>,
    out: &Path,
) -> Result<Transferred, StoreError> {
    let rows = read_table(shards, table, keys)?;
    let n = rows.versions.len();
    let dim = rows.spec.dim as usize;
    let bytes = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let values: Vec<u8> = rows.values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let versions = bytes(&rows.versions);
    let key_bytes = rows.keys.as_deref().map(bytes);
    let view = |dtype, shape, data| {
        TensorView::new(dtype, shape, data).map_err(|e| io("building a tensor".into(), e))
    };
    let mut tensors = Vec::with_capacity(3);
    if let Some(k) = &key_bytes {
        tensors.push(("keys".to_string(), view(Dtype::U64, vec![n], k)?));
    }
    tensors.push((
        "embeddings".to_string(),
        view(Dtype::F32, vec![n, dim], &values)?,
    ));
    tensors.push((
        "versions".to_string(),
        view(Dtype::U64, vec![n], &versions)?,
    ));
    safetensors::serialize_to_file(tensors, Some(metadata_of(&rows.spec, shards.len())), out)
        .map_err(|e| io(format!("writing {}", out.display()), e))?;
    Ok(Transferred {
        table: rows.spec.name,
        rows: n as u64,
        dim,
    })
}

/// An export's metadata: the table, its rows (a dynamic table's capacity), dim, optimizer,
/// placement buckets and the cluster's shard count (the bucket map), and whether it is dynamic.
fn metadata_of(spec: &TableSpec, shards: usize) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([
        ("table".to_string(), spec.name.clone()),
        ("rows".to_string(), spec.rows.to_string()),
        ("dim".to_string(), spec.dim.to_string()),
        ("optimizer".to_string(), spec.optimizer.name().to_string()),
        ("buckets".to_string(), spec.buckets.to_string()),
        ("shards".to_string(), shards.to_string()),
        ("dynamic".to_string(), spec.is_dynamic().to_string()),
    ])
}

/// Sets rows of `table` from the safetensors file `file`: its tensor `tensor` (f32, n x dim) and,
/// if present, `keys` (u64, n; else keys 0 to n-1). Each row becomes one update and its optimizer
/// state starts again.
pub fn import_table(
    shards: &[&dyn ShardTransport],
    table: &str,
    file: &Path,
    tensor: &str,
) -> Result<Transferred, StoreError> {
    let spec = table_spec(shards, table)?;
    let bytes = std::fs::read(file).map_err(|e| io(format!("reading {}", file.display()), e))?;
    let parsed = SafeTensors::deserialize(&bytes).map_err(|e| {
        StoreError::Malformed(format!("{} is not a safetensors file: {e}", file.display()))
    })?;
    let t = parsed.tensor(tensor).map_err(|_| {
        StoreError::Malformed(format!("{} holds no tensor {tensor:?}", file.display()))
    })?;
    let dim = spec.dim as usize;
    if t.dtype() != Dtype::F32 || t.shape().len() != 2 || t.shape()[1] != dim {
        return Err(StoreError::WrongDim(format!(
            "tensor {tensor} is {:?} {:?}; table {} needs f32 [n, {dim}]",
            t.dtype(),
            t.shape(),
            spec.name
        )));
    }
    let n = t.shape()[0];
    let keys: Vec<u64> = match parsed.tensor("keys") {
        Ok(k) => {
            if k.dtype() != Dtype::U64 || k.shape() != [n] {
                return Err(StoreError::Malformed(format!(
                    "tensor keys is {:?} {:?}; it must be u64 [{n}]",
                    k.dtype(),
                    k.shape()
                )));
            }
            k.data()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        }
        Err(_) => (0..n as u64).collect(),
    };
    // A dynamic table takes every u64 key.
    if let Some(k) = keys.iter().find(|&&k| !spec.is_dynamic() && k >= spec.rows) {
        return Err(StoreError::KeyOutOfRange(format!(
            "key {k} is outside table {} of {} rows",
            spec.name, spec.rows
        )));
    }
    let values: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    // The whole file is checked before any row is set: a refusal sets nothing.
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        return Err(StoreError::InvalidGradient(format!(
            "{}: the row of key {} holds {} at element {}; nothing was imported",
            file.display(),
            keys[at / dim],
            values[at],
            at % dim
        )));
    }
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(StoreError::Malformed(format!(
            "{}: key {} comes twice; nothing was imported",
            file.display(),
            w[0]
        )));
    }
    let routing = spec.routing(shards.len() as u32);
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
                .assign(&spec.name, &Assignment::values(&k, &v))
                .map_err(|e| {
                    io(
                        format!(
                            "assigning rows of {} on {} ({assigned} of the file's {n} rows were \
                             set before this failure)",
                            spec.name,
                            c.addr()
                        ),
                        e,
                    )
                })?
                .rows as u64;
        }
    }
    Ok(Transferred {
        table: spec.name,
        rows: assigned,
        dim,
    })
}
