//! Checkpoint orchestration: writing every table of the shard into a checkpoint while requests
//! go on, and restoring a shard from one (the formats are `crate::checkpoint`'s).

use std::sync::Arc;

use hetkv_transport::wire::CheckpointResponse;

use super::{fresh_incarnation, Shard};
use crate::checkpoint::format::FileHeader;
use crate::checkpoint::{
    self, table_file_name, CheckpointDir, CheckpointError, Kind, Manifest, TableWriter,
};
use crate::dynamic::DynamicTable;
use crate::table::Table;
use crate::StoreError;

/// The last checkpoint this shard committed or restored, with the tables it held: the parent of
/// the next incremental checkpoint. Cleared when a checkpoint fails after its copy began (dirty
/// bits were cleared for rows that no committed checkpoint holds).
#[derive(Debug, Default)]
pub(super) struct CheckpointBase {
    base: Option<(String, Vec<String>)>,
}

impl CheckpointBase {
    /// Table `table` was dropped: the parent no longer holds a table of that name, so one
    /// created again is written whole by the next incremental checkpoint.
    pub(super) fn forget(&mut self, table: &str) {
        if let Some((_, tables)) = &mut self.base {
            tables.retain(|t| t != table);
        }
    }
}

impl Shard {
    fn data_dir(&self) -> Result<&std::path::Path, StoreError> {
        self.placement.data_dir().ok_or_else(|| {
            CheckpointError::Refused(
                "this daemon has no data directory to write checkpoints into (--data-dir)".into(),
            )
            .into()
        })
    }

    /// Whether an incremental checkpoint has a parent now: a checkpoint this daemon committed or
    /// restored, its last one not failed.
    pub fn has_checkpoint_parent(&self) -> bool {
        self.checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .base
            .is_some()
    }

    /// Writes checkpoint `name` of every table into the data directory while pushes and pulls go
    /// on (docs/CHECKPOINTS.md section 4): every row, or with `incremental` the rows changed
    /// since the last checkpoint this shard committed or restored. One at a time: a second one
    /// asked for meanwhile is refused.
    pub fn checkpoint(
        &self,
        name: &str,
        incremental: bool,
    ) -> Result<CheckpointResponse, StoreError> {
        let data_dir = self.data_dir()?;
        checkpoint::check_name(name)?;
        let mut base = match self.checkpoints.try_lock() {
            Ok(b) => b,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let busy = self
                    .writing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Err(CheckpointError::Refused(format!(
                    "checkpoint {} is being written on this shard; {name} is refused (one at a \
                     time)",
                    busy.unwrap_or_default()
                ))
                .into());
            }
        };
        *self.writing.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.to_string());
        tracing::info!(checkpoint = name, incremental, "writing checkpoint");
        let started = std::time::Instant::now();
        let result = self.write_checkpoint(&mut base, data_dir, name, incremental);
        *self.writing.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.metrics.checkpoint(
            result.is_ok(),
            started.elapsed(),
            result.as_ref().map_or(0, |r| r.bytes),
        );
        match &result {
            Ok(r) => tracing::info!(
                checkpoint = name,
                seq = r.seq,
                parent = r.parent.as_deref(),
                tables = r.tables,
                rows = r.rows,
                bytes = r.bytes,
                millis = r.micros / 1000,
                "checkpoint committed"
            ),
            Err(e) => tracing::error!(checkpoint = name, error = %e, "checkpoint failed"),
        }
        result
    }

    fn write_checkpoint(
        &self,
        base: &mut CheckpointBase,
        data_dir: &std::path::Path,
        name: &str,
        incremental: bool,
    ) -> Result<CheckpointResponse, StoreError> {
        let start = std::time::Instant::now();
        let dir = CheckpointDir::create(data_dir)?;
        let parent = match (incremental, &base.base) {
            (false, _) => None,
            (true, Some(b)) => Some(b.clone()),
            (true, None) => {
                return Err(CheckpointError::Refused(format!(
                    "an incremental checkpoint needs a parent: this daemon has committed or \
                     restored none since it started, or its last one failed; take a full one \
                     before {name}"
                ))
                .into())
            }
        };
        let mut pending = dir.begin(name)?;
        let tables = self.tables();
        // Every push claimed as applied here is in every row it touched.
        let sessions = self.sessions.records();
        // From here on dirty bits are cleared: if this fails, no chain may continue from the old
        // parent, which lacks rows whose bits are gone.
        base.base = None;
        let (mut rows, mut bytes) = (0, 0);
        // A table the parent holds is written incremental (the rows written since), a newer one
        // in full.
        let kind_of = |table: &str| match &parent {
            Some((_, held)) if held.iter().any(|h| h == table) => Kind::Incremental,
            _ => Kind::Full,
        };
        // Dynamic tables after the fixed ones: incremental ones hold the slots written since the
        // parent (a slot changes hands, never empties, so that is every change).
        let dynamic = self.dynamic_tables();
        let all = tables
            .iter()
            .map(|t| t.as_ref() as &dyn Copied)
            .chain(dynamic.iter().map(|t| t.as_ref() as &dyn Copied));
        for (index, t) in all.enumerate() {
            let table = t.name();
            let kind = kind_of(table);
            let mut w = pending.table_writer(index, &t.header(kind))?;
            t.copy_into(kind, &mut w).map_err(|e| CheckpointError::Io {
                path: format!("{}/{}", dir.path_of(name).display(), table_file_name(index)),
                source: e,
            })?;
            let summary = pending.finish_table(table, kind, w, t.clock())?;
            rows += summary.rows;
            bytes += summary.bytes;
        }
        let identity = (self.config.shard, self.config.shards);
        let parent = parent.map(|(p, _)| p);
        let manifest = pending.commit(dir.next_seq()?, parent.clone(), identity, sessions)?;
        base.base = Some((
            name.to_string(),
            tables
                .iter()
                .map(|t| t.spec().name.clone())
                .chain(dynamic.iter().map(|t| t.spec().name.clone()))
                .collect(),
        ));
        Ok(CheckpointResponse {
            name: name.to_string(),
            seq: manifest.seq,
            parent,
            tables: (tables.len() + dynamic.len()) as u32,
            rows,
            bytes,
            micros: start.elapsed().as_micros() as u64,
        })
    }

    /// Restores checkpoint `name`, or the newest committed one when `None`, into this shard,
    /// which must have no tables yet. Returns the restored manifest, or `None` when the data
    /// directory holds no checkpoint (and none was named). Every file of the chain is checked
    /// against its manifest while it is read; on any failure the error names the file (and the
    /// block) and the shard must not serve.
    pub fn restore(&self, name: Option<&str>) -> Result<Option<Manifest>, StoreError> {
        let data_dir = self.data_dir()?;
        if !self.tables().is_empty() || !self.dynamic_tables().is_empty() {
            return Err(CheckpointError::Refused(
                "a checkpoint is restored into a shard with no tables".into(),
            )
            .into());
        }
        let dir = CheckpointDir::at(data_dir);
        let manifest = match name {
            Some(n) => dir.manifest(n)?,
            None => match dir.newest()? {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let identity = (self.config.shard, self.config.shards);
        if (manifest.shard, manifest.shards) != identity {
            return Err(CheckpointError::Refused(format!(
                "checkpoint {} is of shard {} of {}; this daemon is shard {} of {} (move it onto \
                 {} shards first with `hetkv checkpoint reshard`)",
                manifest.name, manifest.shard, manifest.shards, identity.0, identity.1, identity.1
            ))
            .into());
        }
        let chain = dir.chain(&manifest.name)?;
        let mut base = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut image = Vec::new();
        for t in &manifest.tables {
            if self.restore_dynamic(&dir, &chain, &t.name, &manifest.name)? {
                continue;
            }
            let mut table: Option<Arc<Table>> = None;
            let mut failed = None;
            dir.read_table(&chain, &t.name, identity, |h, rec| {
                if table.is_none() {
                    match self.create_with(h.spec.clone(), false) {
                        Ok((created, _)) => table = Some(created),
                        Err(e) => {
                            failed = Some(e);
                            return Err(CheckpointError::Refused(format!(
                                "creating table {}",
                                h.spec.name
                            )));
                        }
                    }
                }
                table
                    .as_ref()
                    .expect("created")
                    .restore_record(&rec, &mut image);
                Ok(())
            })
            .map_err(|e| failed.take().unwrap_or(e.into()))?;
            let table = table.ok_or_else(|| {
                StoreError::from(CheckpointError::Refused(format!(
                    "table {} has no rows in checkpoint {}",
                    t.name, manifest.name
                )))
            })?;
            let clock = table.finish_restore()?;
            tracing::info!(table = %t.name, rows = table.local_rows(), clock, "restored table");
        }
        self.sessions
            .restore(&manifest.sessions)
            .map_err(|e| CheckpointError::Refused(format!("checkpoint {}: {e}", manifest.name)))?;
        self.incarnation
            .store(fresh_incarnation()?, std::sync::atomic::Ordering::Release);
        base.base = Some((
            manifest.name.clone(),
            manifest.tables.iter().map(|t| t.name.clone()).collect(),
        ));
        Ok(Some(manifest))
    }

    /// Restores table `table` of `chain` when it is dynamic (false when it is fixed, leaving it
    /// to the caller): created empty from the spec in its file, then every slot's newest record
    /// along the chain put back.
    fn restore_dynamic(
        &self,
        dir: &CheckpointDir,
        chain: &[Manifest],
        table: &str,
        checkpoint: &str,
    ) -> Result<bool, StoreError> {
        let identity = (self.config.shard, self.config.shards);
        let spec = match dir.header_of(chain, table)? {
            Some(h) if h.spec.is_dynamic() => h.spec,
            _ => return Ok(false),
        };
        let mut created: Option<Arc<DynamicTable>> = None;
        let mut failed = None;
        let mut values = Vec::new();
        dir.read_table_merged(chain, table, identity, |h, rec| {
            if created.is_none() {
                match self.create_dynamic(h.spec.clone()) {
                    Ok((t, _)) => created = Some(t),
                    Err(e) => {
                        failed = Some(e);
                        return Err(CheckpointError::Refused(format!("creating table {table}")));
                    }
                }
            }
            let t = created.as_ref().expect("created");
            t.restore_record(h, &rec, &mut values)
                .map_err(|what| CheckpointError::Corrupt {
                    file: format!("table {table} of checkpoint {checkpoint}"),
                    what,
                })
        })
        .map_err(|e| failed.take().unwrap_or(e.into()))?;
        // A table whose file holds no row was empty when it was written.
        let t = match created {
            Some(t) => t,
            None => self.create_dynamic(spec)?.0,
        };
        tracing::info!(
            table,
            rows = t.rows().resident(),
            clock = t.clock(),
            "restored dynamic table"
        );
        Ok(true)
    }
}

/// What a checkpoint copies of a table, fixed or dynamic: its header, its rows (all, or those
/// written since the parent) and its clock after the copy.
trait Copied {
    fn name(&self) -> &str;
    fn header(&self, kind: Kind) -> FileHeader;
    fn copy_into(&self, kind: Kind, out: &mut TableWriter) -> std::io::Result<()>;
    fn clock(&self) -> u64;
}

impl Copied for Table {
    fn name(&self) -> &str {
        &self.spec().name
    }
    fn header(&self, kind: Kind) -> FileHeader {
        self.checkpoint_header(kind)
    }
    fn copy_into(&self, kind: Kind, out: &mut TableWriter) -> std::io::Result<()> {
        self.snapshot_into(kind, out)
    }
    fn clock(&self) -> u64 {
        Table::clock(self)
    }
}

impl Copied for DynamicTable {
    fn name(&self) -> &str {
        &self.spec().name
    }
    fn header(&self, kind: Kind) -> FileHeader {
        self.checkpoint_header(kind)
    }
    fn copy_into(&self, kind: Kind, out: &mut TableWriter) -> std::io::Result<()> {
        self.snapshot_into(kind, out).map(|_| ())
    }
    fn clock(&self) -> u64 {
        DynamicTable::clock(self)
    }
}
