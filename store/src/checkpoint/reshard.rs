//! Moving a cluster's checkpoint onto another shard count, bucket by bucket: a fixed table's rows
//! by their placement bucket, a dynamic table's keys by their hashed bucket into the new shards'
//! regions.

use super::format::{FileHeader, Kind, Manifest};
use super::{check_name, CheckpointDir, CheckpointError, PendingCheckpoint};
use hetkv_transport::keyed::{KeyedLayout, BUCKET_SLOTS};

/// A checkpoint written by one cluster of `S` shards, moved onto `S'` shards bucket by bucket
/// (offline: the caller holds every data directory's lock). `sources` are the `S` data directories
/// holding checkpoint `name` (one per shard, in any order); `targets` are the `S'` data directories
/// of the new cluster, in shard order, each of which gets a full checkpoint `out` holding the rows
/// its buckets own under the tables' [`Routing`](hetkv_transport::Routing) over `S'` shards. Every
/// row keeps its value, version and optimizer state; a table's clock on a new shard is the sum of
/// its rows' versions (as [`CheckpointDir::compact`] makes it). The new checkpoints carry no
/// client sessions: the push numbers of the old cluster's clients mean nothing to the new shards.
///
/// A dynamic table's keys go to the shard their placement bucket has over `S'` shards, each into
/// the same entry of the same region bucket of its placement bucket's group (every placement
/// bucket owns as many region buckets on any shard count), with its value, version, optimizer
/// state, Adam step and eviction score: nothing is evicted and every key is found where the new
/// daemon looks. Its clock on a new shard is the largest of the source shards' clocks, so later
/// LRU scores stay above every moved one.
///
/// Work: every source file is read once per target; a target's rows of one table are gathered in
/// memory (that table's share of the new shard, as a daemon of it would hold).
pub fn reshard(
    sources: &[CheckpointDir],
    name: &str,
    targets: &[CheckpointDir],
    out: &str,
) -> Result<Vec<Manifest>, CheckpointError> {
    check_name(name)?;
    check_name(out)?;
    let refuse = |m: String| Err(CheckpointError::Refused(m));
    if sources.is_empty() || targets.is_empty() {
        return refuse("resharding needs at least one source and one target data directory".into());
    }
    let new_shards = u32::try_from(targets.len()).map_err(|_| {
        CheckpointError::Refused(format!("{} target shards is too many", targets.len()))
    })?;
    // Each source's chain, put in shard order; they must be the shards of one cluster.
    let mut chains: Vec<Option<(&CheckpointDir, Vec<Manifest>)>> = vec![None; sources.len()];
    for dir in sources {
        let chain = dir.chain(name)?;
        let last = chain.last().expect("a chain has its checkpoint");
        let (shard, shards) = (last.shard as usize, last.shards as usize);
        if shards != sources.len() {
            return refuse(format!(
                "{} holds checkpoint {name} of shard {shard} of {shards}; {} source directories \
                 were given (give every shard's, one each)",
                dir.root().display(),
                sources.len()
            ));
        }
        if let Some((other, _)) = &chains[shard] {
            return refuse(format!(
                "{} and {} both hold shard {shard} of checkpoint {name}",
                other.root().display(),
                dir.root().display()
            ));
        }
        chains[shard] = Some((dir, chain));
    }
    let chains: Vec<(&CheckpointDir, Vec<Manifest>)> = chains
        .into_iter()
        .map(|c| c.expect("every shard once"))
        .collect();
    let old_shards = sources.len() as u32;
    let tables: Vec<String> = chains[0]
        .1
        .last()
        .expect("a chain")
        .tables
        .iter()
        .map(|t| t.name.clone())
        .collect();
    for (shard, (dir, chain)) in chains.iter().enumerate() {
        let here: Vec<&str> = chain
            .last()
            .expect("a chain")
            .tables
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        if here != tables.iter().map(String::as_str).collect::<Vec<_>>() {
            return refuse(format!(
                "shard {shard} ({}) holds tables {here:?} in checkpoint {name}; shard 0 holds \
                 {tables:?}",
                dir.root().display()
            ));
        }
    }
    // Which tables are dynamic, from their headers (a dynamic table's file may hold no record).
    let (dir, chain) = &chains[0];
    // Before anything is written: which tables are dynamic, and that each can be spread over
    // the new shards (from their headers; a dynamic table's file may hold no record).
    let mut dynamic = Vec::with_capacity(tables.len());
    for table in &tables {
        let header = dir.header_of(chain, table)?;
        if let Some(h) = header.as_ref().filter(|h| h.spec.buckets < new_shards) {
            return refuse(format!(
                "table {table} has {} placement buckets; it cannot be spread over {new_shards} \
                 shards (a bucket is the least a shard holds)",
                h.spec.buckets
            ));
        }
        dynamic.push(header.is_some_and(|h| h.spec.is_dynamic()));
    }

    let mut pending: Vec<PendingCheckpoint> = targets
        .iter()
        .map(|t| t.begin(out))
        .collect::<Result<_, _>>()?;
    for (index, table) in tables.iter().enumerate() {
        for (target, p) in pending.iter_mut().enumerate() {
            let to = (target as u32, new_shards);
            match dynamic[index] {
                false => reshard_table(&chains, table, old_shards, to, index, p)?,
                true => reshard_keys(&chains, table, old_shards, to, index, p)?,
            }
        }
    }
    let mut manifests = Vec::with_capacity(targets.len());
    for (target, (p, dir)) in pending.into_iter().zip(targets).enumerate() {
        manifests.push(p.commit(
            dir.next_seq()?,
            None,
            (target as u32, new_shards),
            Vec::new(),
        )?);
    }
    Ok(manifests)
}

/// Writes table `table`'s file for shard `target` of `new_shards` into `pending`: the rows of the
/// buckets it owns, gathered from every source shard's chain.
fn reshard_table(
    chains: &[(&CheckpointDir, Vec<Manifest>)],
    table: &str,
    old_shards: u32,
    (target, new_shards): (u32, u32),
    index: usize,
    pending: &mut PendingCheckpoint,
) -> Result<(), CheckpointError> {
    // Rows of the target's share, by new local index; filled as records come (newest last).
    let mut rows: Vec<u8> = Vec::new();
    let mut seen: Vec<bool> = Vec::new();
    let mut header: Option<FileHeader> = None;
    // The table's routing over the old and the new shard counts, once its spec is read.
    let mut routes: Option<(hetkv_transport::Routing, hetkv_transport::Routing)> = None;
    for (shard, (dir, chain)) in chains.iter().enumerate() {
        let spec = dir.read_table(chain, table, (shard as u32, old_shards), |h, rec| {
            if header.is_none() {
                let local_rows = h.spec.local_rows(target, new_shards);
                // The source's full file was checked to be at least its local rows' records long
                // before any record came, so this is bounded by the bytes on disk.
                let len = usize::try_from(local_rows)
                    .ok()
                    .and_then(|n| n.checked_mul(h.shape.len()))
                    .ok_or_else(|| {
                        CheckpointError::Refused(format!(
                            "table {table}: {local_rows} rows on shard {target} do not fit in \
                             memory"
                        ))
                    })?;
                rows.try_reserve_exact(len).map_err(|e| {
                    CheckpointError::Refused(format!(
                        "table {table}: {len} bytes for shard {target}'s rows: {e}"
                    ))
                })?;
                rows.resize(len, 0);
                seen = vec![false; local_rows as usize];
                routes = Some((h.spec.routing(old_shards), h.spec.routing(new_shards)));
                header = Some(FileHeader {
                    kind: Kind::Full,
                    shard: target,
                    shards: new_shards,
                    local_rows,
                    clock_start: 0,
                    spec: h.spec.clone(),
                    shape: h.shape,
                });
            }
            let to = header.as_ref().expect("set above");
            let (old, new) = routes.expect("set with the header");
            if to.spec != h.spec {
                return Err(CheckpointError::Refused(format!(
                    "table {table} is {:?} on shard {} and {:?} on another shard",
                    h.spec, h.shard, to.spec
                )));
            }
            let key = old.global_key(h.shard, rec.index());
            if new.shard_of(key) != target as usize {
                return Ok(());
            }
            let local = new.local_index(key) as usize;
            let len = to.shape.len();
            let room = &mut rows[local * len..(local + 1) * len];
            room.copy_from_slice(rec.bytes());
            room[0..8].copy_from_slice(&(local as u64).to_le_bytes());
            seen[local] = true;
            Ok(())
        })?;
        debug_assert_eq!(spec.name, table);
    }
    let mut header = header.ok_or_else(|| {
        CheckpointError::Refused(format!(
            "table {table} has no row in any source's checkpoint: there is nothing to move"
        ))
    })?;
    if let Some(missing) = seen.iter().position(|&s| !s) {
        return Err(CheckpointError::Refused(format!(
            "table {table}: no source holds local row {missing} of shard {target} of \
             {new_shards}"
        )));
    }
    let len = header.shape.len();
    let clock: u64 = rows
        .chunks_exact(len)
        .map(|r| u64::from_le_bytes(r[8..16].try_into().expect("8 bytes")))
        .fold(0u64, u64::saturating_add);
    header.clock_start = clock;
    let mut w = pending.table_writer(index, &header)?;
    let path = pending.dir.clone();
    for (i, rec) in rows.chunks_exact(len).enumerate() {
        w.next_record(i as u64)
            .map_err(|e| CheckpointError::io(&path, e))?
            .copy_from_slice(rec);
    }
    pending.finish_table(table, Kind::Full, w, clock)?;
    Ok(())
}

/// Writes dynamic table `table`'s file for shard `target` of `new_shards` into `pending`: the
/// keys whose placement bucket that shard owns, gathered from every source shard's chain, each in
/// the same entry of the same region bucket of its placement bucket's group as on its source
/// shard (a group moves whole: every placement bucket owns as many region buckets on any shard).
fn reshard_keys(
    chains: &[(&CheckpointDir, Vec<Manifest>)],
    table: &str,
    old_shards: u32,
    (target, new_shards): (u32, u32),
    index: usize,
    pending: &mut PendingCheckpoint,
) -> Result<(), CheckpointError> {
    const SLOTS: u64 = BUCKET_SLOTS as u64;
    let (dir, chain) = &chains[0];
    let first = dir
        .header_of(chain, table)?
        .ok_or_else(|| CheckpointError::Refused(format!("table {table} has no file")))?;
    let spec = first.spec.clone();
    let layouts = |shards: u32| -> Result<Vec<KeyedLayout>, CheckpointError> {
        (0..shards)
            .map(|s| {
                spec.keyed_layout(s, shards)
                    .map_err(|e| CheckpointError::Refused(format!("table {table}: {e}")))
            })
            .collect()
    };
    let old = layouts(old_shards)?;
    let new = spec
        .keyed_layout(target, new_shards)
        .map_err(|e| CheckpointError::Refused(format!("table {table}: {e}")))?;
    let routing = spec.routing(new_shards);
    let len = first.shape.len();
    // Slot `s` of the new region holds record bytes `[s * len, (s + 1) * len)` when `taken[s]`.
    let slots = usize::try_from(new.capacity()).ok();
    let bytes = slots.and_then(|n| n.checked_mul(len)).ok_or_else(|| {
        CheckpointError::Refused(format!(
            "table {table}: {} slots on shard {target} do not fit in memory",
            new.capacity()
        ))
    })?;
    let mut records: Vec<u8> = Vec::new();
    records.try_reserve_exact(bytes).map_err(|e| {
        CheckpointError::Refused(format!(
            "table {table}: {bytes} bytes for shard {target}'s rows: {e}"
        ))
    })?;
    records.resize(bytes, 0);
    let mut taken = vec![false; slots.expect("checked above")];
    let mut clock = 0u64;
    for (shard, (dir, chain)) in chains.iter().enumerate() {
        let from = &old[shard];
        // Each slot's newest record along the chain: a key may have changed slots.
        dir.read_table_merged(chain, table, (shard as u32, old_shards), |h, rec| {
            clock = clock.max(h.clock_start);
            if h.spec != spec {
                return Err(CheckpointError::Refused(format!(
                    "table {table} is {:?} on shard {} and {spec:?} on shard 0",
                    h.spec, h.shard
                )));
            }
            let Some((key, _)) = rec.key_and_score() else {
                return Err(CheckpointError::Refused(format!(
                    "table {table}: a record without its key on shard {}",
                    h.shard
                )));
            };
            if routing.shard_of(key) != target as usize {
                return Ok(());
            }
            // The key's entry in its region bucket, as written: the slot a daemon restores it to
            // must be in the key's bucket (checked again there).
            let (bucket, slot) = (from.bucket_of(key), rec.index());
            if slot / SLOTS != bucket {
                return Err(CheckpointError::Refused(format!(
                    "table {table}: key {key} in slot {slot} of shard {}, outside its bucket \
                     {bucket}",
                    h.shard
                )));
            }
            let to = (new.bucket_of(key) * SLOTS + slot % SLOTS) as usize;
            if std::mem::replace(&mut taken[to], true) {
                return Err(CheckpointError::Refused(format!(
                    "table {table}: two keys for slot {to} of shard {target} (key {key} from \
                     shard {})",
                    h.shard
                )));
            }
            let room = &mut records[to * len..(to + 1) * len];
            room.copy_from_slice(rec.bytes());
            room[0..8].copy_from_slice(&(to as u64).to_le_bytes());
            Ok(())
        })?;
    }
    let header = FileHeader {
        kind: Kind::Full,
        shard: target,
        shards: new_shards,
        local_rows: new.capacity(),
        clock_start: clock,
        spec: spec.clone(),
        shape: first.shape,
    };
    let mut w = pending.table_writer(index, &header)?;
    let path = pending.dir.clone();
    for slot in (0..taken.len()).filter(|&s| taken[s]) {
        w.next_record(slot as u64)
            .map_err(|e| CheckpointError::io(&path, e))?
            .copy_from_slice(&records[slot * len..(slot + 1) * len]);
    }
    pending.finish_table(table, Kind::Full, w, clock)?;
    Ok(())
}
