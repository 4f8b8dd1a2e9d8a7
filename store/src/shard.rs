//! A shard: its registry of tables and the protocol operations on them. No I/O happens here; the
//! TCP server (or any other carrier) hands frames to a [`hetkv_transport::Session`], which calls
//! this [`ShardService`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use hetkv_transport::codec;
use hetkv_transport::row::copy_span;
use hetkv_transport::service::{Response, ServerCounters, ShardService};
use hetkv_transport::wire::{
    is_stale, CheckpointRequest, CheckpointResponse, CreateResponse, ErrorCode,
    PullIfStaleResponse, PullResponse, PushResponse, RegionDescriptor, ShardStats, TablesResponse,
    WireError,
};
use hetkv_transport::{Produced, TableSpec};

use crate::checkpoint::{self, table_file_name, CheckpointDir, CheckpointError, Kind, Manifest};
use crate::metrics::{ShardMetrics, Totals};
use crate::placement::Placement;
use crate::sessions::{self, Claim, Sessions};
use crate::table::Table;
use crate::StoreError;

/// How a shard is set up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard's index.
    pub shard: u32,
    /// Shards in the cluster.
    pub shards: u32,
    /// The data directory: checkpoints, and the lock that keeps a second daemon out. Regions
    /// are never placed there (see [`Placement`]).
    pub data_dir: Option<PathBuf>,
    /// Directory (normally under `/dev/shm`) in which the shard makes a directory of its own,
    /// named with a random instance id, for its regions and clock words, and exposes them to
    /// clients on this host. Removed when the shard is dropped. Anonymous memory without it.
    pub shm_dir: Option<PathBuf>,
    /// Register every table's region and clock word with the first RDMA device (remote read
    /// only) and accept queue pairs from clients. Needs the `rdma` feature and a device.
    pub rdma: bool,
    /// Largest footprint (region plus optimizer state) one table may have on this shard.
    pub max_table_bytes: u64,
    /// Most tables this shard holds; creating one more is refused.
    pub max_tables: usize,
    /// Most bytes all tables together may take on this shard (regions and optimizer state),
    /// checked before a table is mapped.
    pub max_memory: u64,
    /// Token a hello must carry, when set.
    pub auth_token: Option<String>,
    /// How long a client may be silent before the shard forgets its push numbers (a repeat of
    /// one of its pushes after that would be applied again).
    pub session_idle: std::time::Duration,
    /// Tables with metrics series of their own; the others are summed under one label.
    pub metrics_tables: usize,
}

impl ShardConfig {
    /// Shard `shard` of `shards`, in anonymous memory, with default limits.
    pub fn new(shard: u32, shards: u32) -> Self {
        Self {
            shard,
            shards,
            data_dir: None,
            shm_dir: None,
            rdma: false,
            max_table_bytes: DEFAULT_MAX_TABLE_BYTES,
            max_tables: DEFAULT_MAX_TABLES,
            max_memory: default_max_memory(),
            auth_token: None,
            session_idle: crate::sessions::DEFAULT_IDLE,
            metrics_tables: crate::metrics::DEFAULT_METRICS_TABLES,
        }
    }
}

/// Default bound on the number of tables of a shard. Listing them all (names of up to 128 bytes)
/// takes under 8 MiB, within the default frame.
pub const DEFAULT_MAX_TABLES: usize = 16_384;

/// Default bound on all tables' memory: three quarters of the memory this process may use: the
/// machine's (`MemTotal` of `/proc/meminfo`), or its memory cgroup's limit where that is lower (a
/// container's, a systemd unit's: cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`, the
/// lowest along the cgroup's path). Unbounded where neither can be read.
pub fn default_max_memory() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_memory_limit(&c, Path::new("/sys/fs/cgroup")));
    let usable = match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (m, c) => m.or(c).unwrap_or(u64::MAX),
    };
    if usable == u64::MAX {
        u64::MAX
    } else {
        usable / 4 * 3
    }
}

/// The lowest memory limit along this process's cgroup path (`proc_self_cgroup` is the text of
/// `/proc/self/cgroup`; `root` where the hierarchies are mounted), or `None` where there is none.
/// The v2 hierarchy (`0::/path`, `root/path/memory.max`) and the v1 memory controller
/// (`N:memory:/path`, `root/memory/path/memory.limit_in_bytes`) are both read. Each ancestor's
/// file is read too (a parent's limit binds its children), and a path the mount does not have
/// (a container mounting its own cgroup as the root) falls back to the mount's root.
pub fn cgroup_memory_limit(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (mount, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = Path::new(path.trim_start_matches('/'));
        loop {
            let limit = std::fs::read_to_string(mount.join(dir).join(file))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok()); // "max" is no limit
            if let Some(l) = limit {
                lowest = Some(lowest.map_or(l, |m| m.min(l)));
            }
            match dir.parent() {
                Some(p) => dir = p,
                None => break,
            }
        }
    }
    // v1 writes "no limit" as the largest page-aligned i64.
    lowest.filter(|&l| l < (i64::MAX as u64) / 2)
}

/// Default per-table limit: 32 GiB.
pub const DEFAULT_MAX_TABLE_BYTES: u64 = 32 << 30;

#[derive(Debug, Default)]
struct Registry {
    by_name: HashMap<String, Arc<Table>>,
    by_id: Vec<Arc<Table>>,
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

/// The last checkpoint this shard committed or restored, with the tables it held: the parent of
/// the next incremental checkpoint. Cleared when a checkpoint fails after its copy began (dirty
/// bits were cleared for rows that no committed checkpoint holds).
#[derive(Debug, Default)]
struct CheckpointBase {
    base: Option<(String, Vec<String>)>,
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

    /// The table named `name`.
    pub fn table(&self, name: &str) -> Result<Arc<Table>, StoreError> {
        self.registry()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::UnknownTable(name.to_string()))
    }

    /// Creates a table, or returns the existing one when its spec is identical.
    /// Returns the table and whether it was created.
    pub fn create(&self, spec: TableSpec) -> Result<(Arc<Table>, bool), StoreError> {
        self.create_with(spec, true)
    }

    /// [`Shard::create`]; with `fill` false a new table's rows are left for a restore to write.
    fn create_with(&self, spec: TableSpec, fill: bool) -> Result<(Arc<Table>, bool), StoreError> {
        spec.validate().map_err(|e| StoreError::InvalidSpec(e.0))?;
        let check = |existing: &Arc<Table>| {
            if existing.spec() == &spec {
                Ok((existing.clone(), false))
            } else {
                Err(StoreError::ConflictingTable(format!(
                    "table {} exists as {:?}; asked for {:?}",
                    spec.name,
                    existing.spec(),
                    spec
                )))
            }
        };
        if let Some(t) = self.registry().by_name.get(&spec.name) {
            return check(t);
        }
        let mut allocated = self.create_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = self.registry().by_name.get(&spec.name) {
            return check(t);
        }
        let (shard, shards) = (self.config.shard, self.config.shards);
        let footprint = Table::footprint(&spec, shard, shards);
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
                "table {} needs {footprint} bytes on this shard; its tables already take {} and \
                 the memory for push numbers {reserved} of its {} (--max-memory)",
                spec.name, *allocated, self.config.max_memory
            )));
        }
        let id = self.registry().by_id.len();
        if id >= self.config.max_tables {
            return Err(StoreError::InvalidSpec(format!(
                "this shard holds {id} tables, its limit (--max-tables): table {} is refused",
                spec.name
            )));
        }
        let id = id as u32;
        let name = spec.name.clone();
        let table = Arc::new(match fill {
            true => Table::create(spec, shard, shards, id, &self.placement)?,
            false => Table::create_unfilled(spec, shard, shards, id, &self.placement)?,
        });
        #[cfg(feature = "rdma")]
        if let Some(device) = &self.device {
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
                .insert(table.region_id(), registration);
        }
        *allocated += footprint;
        let mut reg = self.tables.write().unwrap_or_else(|p| p.into_inner());
        reg.by_name.insert(name.clone(), table.clone());
        reg.by_id.push(table.clone());
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
                .map(|t| {
                    let s = t.stats();
                    (s.name, s.rows_read, s.rows_pushed, s.updates)
                })
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

    /// Tables in creation order.
    pub fn tables(&self) -> Vec<Arc<Table>> {
        self.registry().by_id.clone()
    }

    fn data_dir(&self) -> Result<&std::path::Path, StoreError> {
        self.placement.data_dir().ok_or_else(|| {
            CheckpointError::Refused(
                "this daemon has no data directory to write checkpoints into (--data-dir)".into(),
            )
            .into()
        })
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
        for (index, t) in tables.iter().enumerate() {
            let table = &t.spec().name;
            let kind = match &parent {
                Some((_, held)) if held.contains(table) => Kind::Incremental,
                _ => Kind::Full,
            };
            let mut w = pending.table_writer(index, &t.checkpoint_header(kind))?;
            t.snapshot_into(kind, &mut w)
                .map_err(|e| CheckpointError::Io {
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
            tables.iter().map(|t| t.spec().name.clone()).collect(),
        ));
        Ok(CheckpointResponse {
            name: name.to_string(),
            seq: manifest.seq,
            parent,
            tables: tables.len() as u32,
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
        if !self.tables().is_empty() {
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
                "checkpoint {} is of shard {} of {}; this daemon is shard {} of {} (restoring \
                 onto another shard count is not supported)",
                manifest.name, manifest.shard, manifest.shards, identity.0, identity.1
            ))
            .into());
        }
        let chain = dir.chain(&manifest.name)?;
        let mut base = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut image = Vec::new();
        for t in &manifest.tables {
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

    fn assign_rows(&self, req: &codec::assign::Request<'_>) -> Result<PushResponse, StoreError> {
        let t = self.table(&req.table)?;
        let locals = t.validate_assign(req.keys, req.values)?;
        t.apply_assign(&locals, req.values);
        Ok(PushResponse {
            rows: locals.len() as u32,
            updates: locals.len() as u64,
            ..PushResponse::default()
        })
    }

    fn pull_rows(
        &self,
        req: &codec::pull::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let t = self.table(&req.table)?;
        let locals = req
            .keys
            .iter()
            .map(|k| t.local_index(k))
            .collect::<Result<Vec<_>, _>>()?;
        let header = PullResponse {
            rows: locals.len() as u32,
            dim: t.spec().dim,
            table_clock: t.clock(),
        };
        let mut rows = codec::pull::respond(resp, header)?;
        t.read_rows_into(&locals, &mut rows);
        Ok(())
    }

    fn pull_stale(
        &self,
        req: &codec::pull_if_stale::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let t = self.table(&req.header.table)?;
        // Everything is validated before anything changes: the pushed rows and the keys.
        let pushed = req
            .push
            .map(|p| {
                t.validate_push(p.keys, p.counts, p.grads)
                    .map(|locals| (p, locals))
            })
            .transpose()?;
        let locals_all = req
            .keys
            .iter()
            .map(|k| t.local_index(k))
            .collect::<Result<Vec<_>, _>>()?;
        let dim = t.spec().dim as usize;
        let shape = t.state_shape();
        if let Some((p, _)) = &pushed {
            codec::pull_if_stale::check_room(resp, locals_all.len(), p.keys.len(), dim, shape)?;
        }
        let mut produced = Produced::default();
        let (pushed_updates, push_duplicate) = match pushed {
            Some((p, locals)) => {
                let origin = req.header.origin.ok_or_else(|| {
                    StoreError::Malformed("a carried push must be numbered (its origin)".into())
                })?;
                self.apply_once(&t, origin, &locals, p, &mut produced)?
            }
            None => (0, false),
        };
        // The clock after the push and before any row: every update it does not count happened
        // after this moment.
        let table_clock = t.clock();
        let since_held = req.header.since.is_none_or(|s| s.holds(table_clock));
        let mut stale = Vec::new();
        let mut locals = Vec::new();
        for (j, &i) in locals_all.iter().enumerate() {
            if is_stale(t.version_local(i), req.clocks.get(j), req.header.bound) {
                stale.push(j as u32);
                locals.push(i);
            }
        }
        let n_state = stale
            .iter()
            .take_while(|&&j| j < req.header.state_keys)
            .count();
        let header = PullIfStaleResponse {
            stale: stale.len() as u32,
            dim: t.spec().dim,
            table_clock,
            since_held,
            pushed_updates,
            push_duplicate,
            state_len: shape.len as u32,
            steps: shape.steps,
            produced: produced.len() as u32,
        };
        t.read_rows_into(
            &locals,
            &mut codec::pull_if_stale::respond(resp, header, &stale, n_state)?,
        );
        codec::pull_if_stale::finish(resp, &header, &produced)?;
        Ok(())
    }

    fn read_spans(
        &self,
        req: codec::read::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let tables = self.tables();
        let mut total: u64 = 0;
        for span in req.spans() {
            let t = tables.get(span.region as usize).ok_or_else(|| {
                StoreError::InvalidSpan(format!("no region {} on this shard", span.region))
            })?;
            let end = span.offset.checked_add(span.len as u64);
            if end.is_none_or(|end| end > t.region().len()) {
                return Err(StoreError::InvalidSpan(format!(
                    "span {}+{} outside region {} of {} bytes",
                    span.offset,
                    span.len,
                    span.region,
                    t.region().len()
                )));
            }
            total += span.len as u64;
        }
        let out = codec::read::respond(resp, total)?;
        for span in req.spans() {
            let t = &tables[span.region as usize];
            copy_span(t.region().words(), span.offset, span.len as usize, out);
            t.count_read((span.len as u64).div_ceil(t.layout().stride() as u64));
        }
        Ok(())
    }

    fn push_rows(
        &self,
        req: &codec::push::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), StoreError> {
        let t = self.table(&req.table)?;
        let r = &req.rows;
        let locals = t.validate_push(r.keys, r.counts, r.grads)?;
        let shape = t.state_shape();
        if r.bases.is_some() {
            codec::push::check_room(resp, locals.len(), t.spec().dim as usize, shape)?;
        }
        let mut produced = Produced::default();
        let (updates, duplicate) = self.apply_once(&t, req.origin, &locals, *r, &mut produced)?;
        let header = PushResponse {
            rows: locals.len() as u32,
            updates,
            duplicate,
            produced: produced.len() as u32,
            state_len: shape.len as u32,
            steps: shape.steps,
            incarnation: self.incarnation(),
        };
        codec::push::respond(resp, header, &produced)?;
        Ok(())
    }

    /// Applies validated push rows once per origin: a numbered push applied before is
    /// acknowledged (its updates counted, `true`) without being applied again, and hands back
    /// the rows as they are now where its bases ask ([`Table::hand_back_current`]).
    fn apply_once(
        &self,
        t: &Table,
        origin: hetkv_transport::wire::Origin,
        locals: &[u64],
        rows: hetkv_transport::wire::PushRows<'_>,
        produced: &mut Produced,
    ) -> Result<(u64, bool), StoreError> {
        match self.sessions.claim(origin)? {
            Claim::Fresh(ticket) => {
                let updates = t.apply_push(locals, &rows, produced);
                ticket.applied();
                Ok((updates, false))
            }
            Claim::Repeat => {
                let updates = (0..rows.counts.len())
                    .map(|i| rows.counts.get_u32(i) as u64)
                    .sum();
                t.hand_back_current(locals, &rows, produced);
                Ok((updates, true))
            }
        }
    }
}

impl Shard {
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

impl ShardService for Shard {
    fn identity(&self) -> (u32, u32) {
        (self.config.shard, self.config.shards)
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn applied_pushes(&self, client: u64) -> Option<hetkv_transport::wire::AppliedPushes> {
        self.sessions.applied_of(client)
    }

    #[cfg(feature = "rdma")]
    fn rdma_connect(
        &self,
        client: &hetkv_transport::wire::Endpoint,
    ) -> Result<(hetkv_transport::wire::Endpoint, Box<dyn Send>), WireError> {
        let Some(device) = &self.device else {
            return Err(WireError::new(
                ErrorCode::Unsupported,
                "this daemon was started without --rdma",
            ));
        };
        let (ours, qp) = hetkv_transport::rdma::accept(device, client)
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("RDMA accept: {e}")))?;
        tracing::info!(
            qpn = ours.qpn,
            peer_qpn = client.qpn,
            "RDMA queue pair connected"
        );
        Ok((ours, Box::new(qp)))
    }

    fn authorize(&self, nonce: Option<&[u8; 32]>, response: Option<&[u8; 32]>) -> bool {
        match (&self.config.auth_token, nonce, response) {
            (None, _, _) => true,
            (Some(token), Some(nonce), Some(response)) => {
                hetkv_transport::auth::verify(token, nonce, response)
            }
            (Some(_), _, _) => false,
        }
    }

    fn list_tables(&self) -> TablesResponse {
        TablesResponse {
            tables: self.tables().iter().map(|t| t.info()).collect(),
        }
    }

    fn create_table(&self, spec: TableSpec) -> Result<CreateResponse, WireError> {
        let name = spec.name.clone();
        self.measured("create_table", &name, || {
            let (table, created) = self.create(spec)?;
            Ok(CreateResponse {
                info: table.info(),
                created,
            })
        })
    }

    fn shm_dir(&self) -> Option<String> {
        self.placement
            .shm_instance()
            .map(|d| d.display().to_string())
    }

    fn region_info(&self, table: &str) -> Result<RegionDescriptor, WireError> {
        let t = self.table(table)?;
        let shm = |r: &hetkv_transport::region::Region| {
            self.placement
                .shm_instance()
                .and(r.path())
                .map(|p| p.display().to_string())
        };
        Ok(RegionDescriptor {
            region: t.region_id(),
            table: table.to_string(),
            dim: t.spec().dim,
            stride: t.layout().stride() as u32,
            rows: t.local_rows(),
            len: t.region().len(),
            addr: t.region().addr(),
            rkey: self.rkeys(t.region_id()).0,
            shm_path: shm(t.region()),
            clock_addr: t.clock_region().addr(),
            clock_rkey: self.rkeys(t.region_id()).1,
            clock_shm_path: shm(t.clock_region()),
            incarnation: self.incarnation(),
        })
    }

    fn read(
        &self,
        req: codec::read::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("read", "", || Ok(self.read_spans(req, resp)?))
    }

    fn pull(
        &self,
        req: &codec::pull::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("pull", &req.table, || Ok(self.pull_rows(req, resp)?))
    }

    fn pull_if_stale(
        &self,
        req: &codec::pull_if_stale::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("pull_if_stale", &req.header.table, || {
            Ok(self.pull_stale(req, resp)?)
        })
    }

    fn push(
        &self,
        req: &codec::push::Request<'_>,
        resp: &mut Response<'_>,
    ) -> Result<(), WireError> {
        self.measured("push", &req.table, || Ok(self.push_rows(req, resp)?))
    }

    fn assign(&self, req: &codec::assign::Request<'_>) -> Result<PushResponse, WireError> {
        self.measured("assign", &req.table, || Ok(self.assign_rows(req)?))
    }

    fn checkpoint(&self, req: &CheckpointRequest) -> Result<CheckpointResponse, WireError> {
        self.measured("checkpoint", "", || {
            Ok(Shard::checkpoint(self, &req.name, req.incremental)?)
        })
    }

    fn stats(&self) -> ShardStats {
        let tables: Vec<_> = self.tables().iter().map(|t| t.stats()).collect();
        ShardStats {
            shard: self.config.shard,
            shards: self.config.shards,
            rows_read: tables.iter().map(|t| t.rows_read).sum(),
            rows_pushed: tables.iter().map(|t| t.rows_pushed).sum(),
            tables,
            ..ShardStats::default()
        }
    }

    fn counters(&self) -> &ServerCounters {
        &self.counters
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::UnknownTable(_) => ErrorCode::UnknownTable,
            StoreError::ConflictingTable(_) => ErrorCode::ConflictingTable,
            StoreError::InvalidSpec(_) => ErrorCode::InvalidSpec,
            StoreError::WrongDim(_) => ErrorCode::WrongDim,
            StoreError::KeyOutOfRange(_) => ErrorCode::KeyOutOfRange,
            StoreError::InvalidGradient(_) => ErrorCode::InvalidGradient,
            StoreError::InvalidSpan(_) => ErrorCode::InvalidSpan,
            StoreError::Malformed(_) => ErrorCode::MalformedFrame,
            StoreError::Frame(w) => return w.clone(),
            StoreError::Io(_) | StoreError::Config(_) => ErrorCode::Internal,
            StoreError::Checkpoint(_) => ErrorCode::CheckpointFailed,
            StoreError::Session(sessions::SessionError::Forgotten { .. }) => {
                ErrorCode::SequenceForgotten
            }
            StoreError::Session(sessions::SessionError::Full(_)) => ErrorCode::SessionsFull,
            StoreError::Session(sessions::SessionError::Malformed { .. }) => {
                ErrorCode::MalformedFrame
            }
        };
        WireError::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::cgroup_memory_limit;

    fn write(root: &std::path::Path, file: &str, text: &str) {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_lowest_limit_along_the_cgroup_path_binds() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v2: the unit's own limit is "max", its parent's is 1 GiB.
        write(r, "system.slice/memory.max", "1073741824\n");
        write(r, "system.slice/hetkv.service/memory.max", "max\n");
        assert_eq!(
            cgroup_memory_limit("0::/system.slice/hetkv.service\n", r),
            Some(1 << 30)
        );
        // v1 beside v2 (a hybrid host): the memory controller's lower limit wins.
        write(r, "memory/job/memory.limit_in_bytes", "536870912\n");
        assert_eq!(
            cgroup_memory_limit(
                "4:memory:/job\n3:cpu,cpuacct:/job\n0::/system.slice/hetkv.service\n",
                r
            ),
            Some(512 << 20)
        );
        // v1's "no limit" and a hierarchy without files are no limit.
        let free = tempfile::tempdir().unwrap();
        write(
            free.path(),
            "memory/job/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(
            cgroup_memory_limit("4:memory:/job\n0::/\n", free.path()),
            None
        );
        // A container that mounts its own cgroup as the root: the path is not under the mount,
        // the root's file is read.
        let container = tempfile::tempdir().unwrap();
        write(container.path(), "memory.max", "268435456\n");
        assert_eq!(
            cgroup_memory_limit("0::/kubepods/pod1/abc\n", container.path()),
            Some(256 << 20)
        );
    }
}
