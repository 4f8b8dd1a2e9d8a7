//! A shard: its registry of tables and the protocol operations on them. No I/O happens here; the
//! TCP server (or any other carrier) hands frames to a [`hetkv_transport::Session`], which calls
//! this [`ShardService`].
//!
//! One concern a file: `config` (how a shard is set up and its limits), `operations` (the data
//! operations on its tables), `checkpoints` (writing and restoring checkpoints), `service` (the
//! protocol's entry points); this file holds the shard itself and its registry of tables.

mod checkpoints;
mod config;
mod operations;
mod service;

pub use config::{
    cgroup_memory_limit, default_max_memory, ShardConfig, DEFAULT_MAX_TABLES,
    DEFAULT_MAX_TABLE_BYTES,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use hetkv_transport::service::{ServerCounters, ShardService};
use hetkv_transport::wire::WireError;
use hetkv_transport::TableSpec;

use crate::dynamic::DynamicTable;
use crate::metrics::{ShardMetrics, Totals};
use crate::placement::Placement;
use crate::sessions::{self, Sessions};
use crate::table::Table;
use crate::StoreError;

use checkpoints::CheckpointBase;

/// A table of either kind, by its region: what read spans and region descriptors name.
#[derive(Clone, Debug)]
pub(crate) enum Served {
    /// A fixed table: rows at their local index.
    Fixed(Arc<Table>),
    /// A dynamic table: buckets of key digests, then keyed rows.
    Dynamic(Arc<DynamicTable>),
}

impl Served {
    /// The region a span of this table reads.
    pub(crate) fn region(&self) -> &Arc<hetkv_transport::Region> {
        match self {
            Self::Fixed(t) => t.region(),
            Self::Dynamic(t) => t.rows().region(),
        }
    }

    /// The region of its clock word.
    fn clock_region(&self) -> &Arc<hetkv_transport::Region> {
        match self {
            Self::Fixed(t) => t.clock_region(),
            Self::Dynamic(t) => t.rows().clock_region(),
        }
    }

    /// Counts a span read of `bytes` bytes as rows read (rounded up to whole strides).
    pub(crate) fn count_read(&self, bytes: u64) {
        match self {
            Self::Fixed(t) => t.count_read(bytes.div_ceil(t.layout().stride() as u64)),
            Self::Dynamic(t) => {
                t.count_read(bytes.div_ceil(t.rows().layout().row().stride() as u64))
            }
        }
    }
}

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<String, Arc<Table>>,
    /// Fixed tables in creation order.
    fixed: Vec<Arc<Table>>,
    /// Dynamic tables, in creation order.
    dynamic: Vec<Arc<DynamicTable>>,
    /// Every table by region id (its index here); `None` where the table was dropped (a region
    /// id is never given twice).
    regions: Vec<Option<Served>>,
}

impl Registry {
    fn dynamic(&self, name: &str) -> Option<&Arc<DynamicTable>> {
        self.dynamic.iter().find(|t| t.spec().name == name)
    }

    /// Whether a table of `spec`'s name exists with that very spec (true), or not at all
    /// (false); one of that name and another spec, of either kind, is a conflict.
    fn holds(&self, spec: &TableSpec) -> Result<bool, StoreError> {
        let existing = match self.by_name.get(&spec.name) {
            Some(t) => t.spec(),
            None => match self.dynamic(&spec.name) {
                Some(t) => t.spec(),
                None => return Ok(false),
            },
        };
        if existing == spec {
            return Ok(true);
        }
        Err(StoreError::ConflictingTable(format!(
            "table {} exists as {existing:?}; asked for {spec:?}",
            spec.name
        )))
    }

    /// Tables held (dropped ones not counted).
    fn len(&self) -> usize {
        self.by_name.len() + self.dynamic.len()
    }

    /// The id the next table's region takes.
    fn next_region(&self) -> u32 {
        self.regions.len() as u32
    }
}

/// One shard of a cluster.
#[derive(Debug)]
pub struct Shard {
    /// Registrations of each table's region and clock word, by region id; each holds the memory
    /// it registered.
    #[cfg(feature = "rdma")]
    registered: Mutex<HashMap<u32, RdmaRegistration>>,
    #[cfg(feature = "rdma")]
    device: Option<Arc<hetkv_transport::rdma::Device>>,
    config: ShardConfig,
    /// Where the regions live.
    placement: Placement,
    // Read once per request (not per key), so a reader-writer lock costs nothing measurable;
    // writers (table creation) hold it only to insert a table already built.
    tables: RwLock<Registry>,
    /// Serializes table creation; holds the bytes all tables take.
    create_lock: Mutex<u64>,
    counters: ServerCounters,
    /// Serializes checkpoints; holds the parent of the next incremental one.
    checkpoints: Mutex<CheckpointBase>,
    /// The checkpoint being written, for the message that refuses a second one.
    writing: Mutex<Option<String>>,
    /// The push numbers of each client, for exactly-once pushes.
    sessions: Sessions,
    metrics: ShardMetrics,
    /// Random, drawn when the shard is built (at every daemon start) and again by a restore.
    incarnation: std::sync::atomic::AtomicU64,
}

impl Shard {
    /// A shard with no tables. Fails if `shard >= shards` or the data dir cannot be created.
    pub fn new(config: ShardConfig) -> Result<Self, StoreError> {
        if config.shards == 0 || config.shard >= config.shards {
            return Err(StoreError::Config(format!(
                "shard index {} is not below the shard count {}",
                config.shard, config.shards
            )));
        }
        let placement = Placement::new(
            config.shard,
            config.data_dir.as_deref(),
            config.shm_dir.as_deref(),
        )?;
        #[cfg(feature = "rdma")]
        let device = match config.rdma {
            true => Some(Arc::new(
                hetkv_transport::rdma::Device::open_first()
                    .map_err(|e| StoreError::Config(format!("RDMA was asked for: {e}")))?,
            )),
            false => None,
        };
        #[cfg(not(feature = "rdma"))]
        if config.rdma {
            return Err(StoreError::Config(
                "RDMA was asked for, but this build has no RDMA support (cargo feature `rdma`)"
                    .into(),
            ));
        }
        let idle = config.session_idle;
        let metrics_tables = config.metrics_tables;
        let shard_index = config.shard;
        Ok(Self {
            #[cfg(feature = "rdma")]
            registered: Mutex::new(HashMap::new()),
            #[cfg(feature = "rdma")]
            device,
            placement,
            config,
            tables: RwLock::new(Registry::default()),
            create_lock: Mutex::new(0),
            counters: ServerCounters::default(),
            checkpoints: Mutex::new(CheckpointBase::default()),
            writing: Mutex::new(None),
            sessions: Sessions::new(idle),
            metrics: ShardMetrics::new(shard_index, metrics_tables),
            incarnation: std::sync::atomic::AtomicU64::new(fresh_incarnation()?),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ShardConfig {
        &self.config
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        // The registry is only written by `create`, which cannot panic while holding the lock.
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The fixed table named `name` (a dynamic one is refused, naming what it does not offer).
    pub fn table(&self, name: &str) -> Result<Arc<Table>, StoreError> {
        let reg = self.registry();
        if let Some(t) = reg.by_name.get(name) {
            return Ok(t.clone());
        }
        match reg.dynamic(name) {
            Some(_) => Err(StoreError::Unsupported(format!(
                "table {name} is dynamic: this operation is a fixed table's (rows at computed \
                 indices)"
            ))),
            None => Err(StoreError::UnknownTable(name.to_string())),
        }
    }

    /// The dynamic table named `name`, if there is one.
    pub fn dynamic_table(&self, name: &str) -> Option<Arc<DynamicTable>> {
        self.registry().dynamic(name).cloned()
    }

    /// The dynamic table named `name` for an operation only dynamic tables have: a fixed table
    /// of that name is `Unsupported`, saying `why` ("table t is fixed: {why}"), no table at all
    /// `UnknownTable`.
    pub(crate) fn dynamic_only(
        &self,
        name: &str,
        why: &str,
    ) -> Result<Arc<DynamicTable>, StoreError> {
        self.dynamic_table(name)
            .ok_or_else(|| match self.table(name) {
                Ok(_) => StoreError::Unsupported(format!("table {name} is fixed: {why}")),
                Err(e) => e,
            })
    }

    /// Dynamic tables in creation order.
    pub fn dynamic_tables(&self) -> Vec<Arc<DynamicTable>> {
        self.registry().dynamic.clone()
    }

    /// Creates a table of either kind from its spec, or confirms an identical one; returns what
    /// `list_tables` says of it and whether it was created.
    pub fn create_spec(
        &self,
        spec: TableSpec,
    ) -> Result<(hetkv_transport::TableInfo, bool), StoreError> {
        if spec.is_dynamic() {
            let (t, created) = self.create_dynamic(spec)?;
            Ok((t.info(), created))
        } else {
            let (t, created) = self.create(spec)?;
            Ok((t.info(), created))
        }
    }

    /// Creates a dynamic table, or returns the existing one when its spec is identical.
    pub fn create_dynamic(&self, spec: TableSpec) -> Result<(Arc<DynamicTable>, bool), StoreError> {
        spec.validate().map_err(|e| StoreError::InvalidSpec(e.0))?;
        if !spec.is_dynamic() {
            return Err(StoreError::InvalidSpec(format!(
                "table {} is fixed, not dynamic",
                spec.name
            )));
        }
        let mut allocated = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        {
            let reg = self.registry();
            if reg.holds(&spec)? {
                let t = reg
                    .dynamic(&spec.name)
                    .expect("held with this dynamic spec");
                return Ok((t.clone(), false));
            }
        }
        let (shard, shards) = (self.config.shard, self.config.shards);
        let footprint = self.admit_footprint(&spec, *allocated, || {
            DynamicTable::footprint(&spec, shard, shards)
        })?;
        let id = self.registry().next_region();
        let table = Arc::new(DynamicTable::create(
            spec,
            shard,
            shards,
            id,
            &self.placement,
        )?);
        self.register(&Served::Dynamic(table.clone()))?;
        *allocated += footprint;
        let mut reg = self.tables.write().unwrap_or_else(|p| p.into_inner());
        reg.dynamic.push(table.clone());
        reg.regions.push(Some(Served::Dynamic(table.clone())));
        drop(reg);
        tracing::info!(
            table = %table.spec().name,
            rows = table.spec().rows,
            capacity = table.capacity(),
            dim = table.spec().dim,
            optimizer = table.spec().optimizer.name(),
            bytes = footprint,
            "created dynamic table"
        );
        Ok((table, true))
    }

    /// The bytes a new table takes on this shard, after checking them against the limits (one
    /// table's, all tables' with the memory for push numbers, the table count) and that the
    /// cluster has no more shards than the table has buckets; `allocated` is what the shard's
    /// tables take already.
    fn admit_footprint(
        &self,
        spec: &TableSpec,
        allocated: u64,
        footprint: impl FnOnce() -> u64,
    ) -> Result<u64, StoreError> {
        let shards = self.config.shards;
        if spec.buckets < shards {
            return Err(StoreError::InvalidSpec(format!(
                "table {} has {} placement buckets; a cluster of {shards} shards needs at least \
                 {shards} (a bucket is the least a shard holds)",
                spec.name, spec.buckets
            )));
        }
        let footprint = footprint();
        if footprint > self.config.max_table_bytes {
            return Err(StoreError::InvalidSpec(format!(
                "table {} needs {footprint} bytes on this shard, above its limit of {}",
                spec.name, self.config.max_table_bytes
            )));
        }
        // The memory for push numbers is reserved out of the same bound.
        let reserved = sessions::RESERVED_BYTES;
        if allocated.saturating_add(footprint).saturating_add(reserved) > self.config.max_memory {
            return Err(StoreError::InvalidSpec(format!(
                "table {} needs {footprint} bytes on this shard; its tables already take \
                 {allocated} and the memory for push numbers {reserved} of its {} (--max-memory)",
                spec.name, self.config.max_memory
            )));
        }
        let held = self.registry().len();
        if held >= self.config.max_tables {
            return Err(StoreError::InvalidSpec(format!(
                "this shard holds {held} tables, its limit (--max-tables): table {} is refused",
                spec.name
            )));
        }
        Ok(footprint)
    }

    /// Creates a table, or returns the existing one when its spec is identical.
    /// Returns the table and whether it was created.
    pub fn create(&self, spec: TableSpec) -> Result<(Arc<Table>, bool), StoreError> {
        self.create_with(spec, true)
    }

    /// [`Shard::create`]; with `fill` false a new table's rows are left for a restore to write.
    fn create_with(&self, spec: TableSpec, fill: bool) -> Result<(Arc<Table>, bool), StoreError> {
        spec.validate().map_err(|e| StoreError::InvalidSpec(e.0))?;
        if spec.is_dynamic() {
            return Err(StoreError::InvalidSpec(format!(
                "table {} is dynamic: create it with create_dynamic (or create_spec)",
                spec.name
            )));
        }
        let existing = |reg: &Registry| -> Result<Option<(Arc<Table>, bool)>, StoreError> {
            Ok(reg
                .holds(&spec)?
                .then(|| (reg.by_name[&spec.name].clone(), false)))
        };
        if let Some(t) = existing(&self.registry())? {
            return Ok(t);
        }
        let mut allocated = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = existing(&self.registry())? {
            return Ok(t);
        }
        let (shard, shards) = (self.config.shard, self.config.shards);
        let footprint =
            self.admit_footprint(&spec, *allocated, || Table::footprint(&spec, shard, shards))?;
        let id = self.registry().next_region();
        let name = spec.name.clone();
        let table = Arc::new(match fill {
            true => Table::create(spec, shard, shards, id, &self.placement)?,
            false => Table::create_unfilled(spec, shard, shards, id, &self.placement)?,
        });
        self.register(&Served::Fixed(table.clone()))?;
        *allocated += footprint;
        let mut reg = self.tables.write().unwrap_or_else(|p| p.into_inner());
        reg.by_name.insert(name.clone(), table.clone());
        reg.fixed.push(table.clone());
        reg.regions.push(Some(Served::Fixed(table.clone())));
        drop(reg);
        tracing::info!(
            table = %name,
            rows = table.spec().rows,
            local_rows = table.local_rows(),
            dim = table.spec().dim,
            optimizer = table.spec().optimizer.name(),
            bytes = footprint,
            "created table"
        );
        Ok((table, true))
    }

    /// Drops table `name` (of either kind); false when this shard holds none of that name. Its
    /// name is free at once: a later create makes a new table, written whole by the next
    /// incremental checkpoint. Its memory goes when the last request using it ends; its region
    /// id is never given again; its shared-memory files are unlinked and its RDMA registrations
    /// dropped; its clock word gets [`hetkv_transport::wire::DROPPED_CLOCK`] first, so that a
    /// one-sided reader still mapping it stops reading it. Waits for a checkpoint being
    /// written (which keeps the table as of its start).
    pub fn drop_table(&self, name: &str) -> Result<bool, StoreError> {
        let mut base = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut allocated = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut reg = self.tables.write().unwrap_or_else(|p| p.into_inner());
        let (shard, shards) = (self.config.shard, self.config.shards);
        let (served, footprint, id) = if let Some(t) = reg.by_name.remove(name) {
            reg.fixed.retain(|f| !Arc::ptr_eq(f, &t));
            let footprint = Table::footprint(t.spec(), shard, shards);
            let id = t.region_id();
            (Served::Fixed(t), footprint, id)
        } else if let Some(at) = reg.dynamic.iter().position(|t| t.spec().name == name) {
            let t = reg.dynamic.remove(at);
            let footprint = DynamicTable::footprint(t.spec(), shard, shards);
            let id = t.region_id();
            (Served::Dynamic(t), footprint, id)
        } else {
            return Ok(false);
        };
        if let Some(slot) = reg.regions.get_mut(id as usize) {
            *slot = None;
        }
        drop(reg);
        served.clock_region().words()[0].fetch_or(
            hetkv_transport::wire::DROPPED_CLOCK,
            std::sync::atomic::Ordering::AcqRel,
        );
        *allocated = allocated.saturating_sub(footprint);
        drop(allocated);
        base.forget(name);
        drop(base);
        #[cfg(feature = "rdma")]
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        for region in [served.region(), served.clock_region()] {
            if let Some(path) = region.path() {
                if let Err(e) = std::fs::remove_file(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(table = name, path = %path.display(), error = %e, "could not unlink a dropped table's file");
                    }
                }
            }
        }
        tracing::info!(table = name, bytes = footprint, "dropped table");
        Ok(true)
    }

    /// The shard's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        let totals = Totals {
            frames: (c.requests.load(Relaxed), c.errors.load(Relaxed)),
            bytes: (c.bytes_in.load(Relaxed), c.bytes_out.load(Relaxed)),
            connections: c.connections.load(Relaxed),
            repeated_pushes: self.sessions.repeats(),
            tables: self
                .tables()
                .iter()
                .map(|t| t.stats())
                .chain(self.dynamic_tables().iter().map(|t| t.stats()))
                .map(|s| (s.name, s.rows_read, s.rows_pushed, s.updates))
                .collect(),
            incarnation: self.incarnation(),
        };
        self.metrics.encode(&totals)
    }

    /// Runs `f`, a request of `op` on `table`, and counts it in the metrics.
    fn measured<T>(
        &self,
        op: &str,
        table: &str,
        f: impl FnOnce() -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        let start = std::time::Instant::now();
        let r = f();
        let code = r.as_ref().err().map(|e| format!("{:?}", e.code));
        self.metrics
            .request(op, table, start.elapsed(), code.as_deref());
        r
    }

    /// Numbered pushes received again and acknowledged without being applied twice.
    pub fn repeated_pushes(&self) -> u64 {
        self.sessions.repeats()
    }

    /// Fixed tables in creation order.
    pub fn tables(&self) -> Vec<Arc<Table>> {
        self.registry().fixed.clone()
    }

    /// Every table by region id (`None`: dropped).
    pub(crate) fn regions(&self) -> Vec<Option<Served>> {
        self.registry().regions.clone()
    }
}

impl Shard {
    /// Registers the region and clock word of `table` with the RDMA device, when the shard has
    /// one, under the table's region id (nothing to do otherwise).
    fn register(&self, table: &Served) -> Result<(), StoreError> {
        #[cfg(feature = "rdma")]
        if let Some(device) = &self.device {
            let (id, name) = match table {
                Served::Fixed(t) => (t.region_id(), &t.spec().name),
                Served::Dynamic(t) => (t.region_id(), &t.spec().name),
            };
            let register = |r: &Arc<hetkv_transport::Region>| {
                hetkv_transport::rdma::MemoryRegion::remote_read(device, r.clone())
                    .map_err(|e| StoreError::Io(format!("registering table {name}: {e}")))
            };
            let registration = RdmaRegistration {
                rows: register(table.region())?,
                clock: register(table.clock_region())?,
            };
            self.registered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, registration);
        }
        let _ = table;
        Ok(())
    }

    /// The descriptor of `table`'s region and clock word, for one-sided readers.
    fn describe(&self, table: &Served) -> hetkv_transport::wire::RegionDescriptor {
        let shm = |r: &hetkv_transport::Region| {
            self.placement
                .shm_instance()
                .and(r.path())
                .map(|p| p.display().to_string())
        };
        let (id, spec, stride, rows) = match table {
            Served::Fixed(t) => (t.region_id(), t.spec(), t.layout().stride(), t.local_rows()),
            Served::Dynamic(t) => (
                t.region_id(),
                t.spec(),
                t.rows().layout().row().stride(),
                t.capacity(),
            ),
        };
        let (rkey, clock_rkey) = self.rkeys(id);
        hetkv_transport::wire::RegionDescriptor {
            region: id,
            table: spec.name.clone(),
            dim: spec.dim,
            stride: stride as u32,
            rows,
            buckets: spec.buckets,
            keyed: matches!(table, Served::Dynamic(_)),
            len: table.region().len(),
            addr: table.region().addr(),
            rkey,
            shm_path: shm(table.region()),
            clock_addr: table.clock_region().addr(),
            clock_rkey,
            clock_shm_path: shm(table.clock_region()),
            incarnation: self.incarnation(),
        }
    }

    /// The remote keys of a table's region and clock word (0 without RDMA).
    fn rkeys(&self, region: u32) -> (u32, u32) {
        #[cfg(feature = "rdma")]
        if let Some(r) = self
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&region)
        {
            return (r.rows.rkey(), r.clock.rkey());
        }
        let _ = region;
        (0, 0)
    }
}

/// A table's registrations with the RDMA device.
#[cfg(feature = "rdma")]
#[derive(Debug)]
struct RdmaRegistration {
    rows: hetkv_transport::rdma::MemoryRegion,
    clock: hetkv_transport::rdma::MemoryRegion,
}

/// A random incarnation, never 0 (which clients read as "none seen yet").
fn fresh_incarnation() -> Result<u64, StoreError> {
    let nonce = hetkv_transport::auth::nonce()
        .map_err(|e| StoreError::Config(format!("no random incarnation: {e}")))?;
    let value = u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes"));
    Ok(value.max(1))
}
