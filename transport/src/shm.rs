//! The shared-memory backend (DESIGN section 6): a client on the daemon's host maps each table's
//! region and clock word read-only and reads rows and version words itself, with no daemon CPU.
//! Pushes and control travel over a second transport (TCP), which also serves the rare row whose
//! verified read keeps failing (bounded retries, then the RPC read: DESIGN section 4).
//!
//! The daemon announces its shared-memory directory in the hello; the directory's name carries a
//! random instance id, so finding it on this host shows the daemon is on this host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::client::{pull_into, PushRef, ShardTransport, StaleRows, Traffic, TransportError};
use crate::region::SharedRegion;
use crate::row::{self, RowLayout, DEFAULT_READ_ATTEMPTS};
use crate::spec::{TableInfo, TableSpec};
use crate::wire::{
    CreateResponse, HelloResponse, PushResponse, RegionDescriptor, ShardStats, Since, Span,
    NOT_CACHED,
};

/// Rows a gather prefetches ahead of the one it reads.
const PREFETCH_ROWS: usize = 8;

/// Why a shard cannot be read through shared memory.
#[derive(Debug, thiserror::Error)]
pub enum ShmUnavailable {
    /// The daemon does not expose its regions.
    #[error("shard {addr} does not expose shared memory (start it with --shm-dir)")]
    NotOffered {
        /// The shard's address.
        addr: String,
    },
    /// The daemon's directory is not visible here: another host, or another mount namespace.
    #[error(
        "shard {addr} exposes {dir}, which this host does not have: the daemon runs elsewhere"
    )]
    NotOnThisHost {
        /// The shard's address.
        addr: String,
        /// The directory it announced.
        dir: String,
    },
}

/// Counters of the one-sided reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShmStats {
    /// Rows read and verified through the mapping.
    pub rows_read: u64,
    /// Version words read through the mapping.
    pub versions_read: u64,
    /// Torn copies discarded (odd seq or a checksum mismatch) before a copy verified.
    pub torn_retries: u64,
    /// Rows whose reads all failed verification, then read over the control transport.
    pub fallback_rows: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rows_read: AtomicU64,
    versions_read: AtomicU64,
    torn_retries: AtomicU64,
    fallback_rows: AtomicU64,
}

/// One table's mapped region and clock word.
#[derive(Debug)]
struct Mapped {
    desc: RegionDescriptor,
    layout: RowLayout,
    rows: SharedRegion,
    clock: SharedRegion,
}

impl Mapped {
    fn clock(&self) -> u64 {
        self.clock.words()[0].load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_table: HashMap<String, Arc<Mapped>>,
    by_region: HashMap<u32, Arc<Mapped>>,
}

/// A shard read through shared memory, controlled (and pushed to) through `C`.
#[derive(Debug)]
pub struct ShmTransport<C> {
    control: C,
    dir: PathBuf,
    maps: RwLock<Maps>,
    attempts: u32,
    counters: Counters,
}

impl<C: ShardTransport> ShmTransport<C> {
    /// Wraps a connected control transport. When the shard cannot be read through shared memory
    /// from here, hands the control transport back with the reason.
    pub fn new(control: C) -> Result<Self, (C, ShmUnavailable)> {
        let dir = match &control.hello().shm_dir {
            None => {
                let addr = control.addr().to_string();
                return Err((control, ShmUnavailable::NotOffered { addr }));
            }
            Some(d) => PathBuf::from(d),
        };
        if !dir.is_dir() {
            let (addr, dir) = (control.addr().to_string(), dir.display().to_string());
            return Err((control, ShmUnavailable::NotOnThisHost { addr, dir }));
        }
        Ok(Self {
            control,
            dir,
            maps: RwLock::new(Maps::default()),
            attempts: DEFAULT_READ_ATTEMPTS,
            counters: Counters::default(),
        })
    }

    /// Sets how many torn copies a read discards before asking the control transport.
    pub fn with_read_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The control transport.
    pub fn control(&self) -> &C {
        &self.control
    }

    /// Unmaps everything and hands the control transport back.
    pub fn into_control(self) -> C {
        self.control
    }

    /// The one-sided read counters.
    pub fn shm_stats(&self) -> ShmStats {
        let c = &self.counters;
        ShmStats {
            rows_read: c.rows_read.load(Ordering::Relaxed),
            versions_read: c.versions_read.load(Ordering::Relaxed),
            torn_retries: c.torn_retries.load(Ordering::Relaxed),
            fallback_rows: c.fallback_rows.load(Ordering::Relaxed),
        }
    }

    fn protocol(&self, message: String) -> TransportError {
        TransportError::Protocol {
            addr: self.control.addr().to_string(),
            message,
        }
    }

    /// The table's mapping, made on first use from its region descriptor.
    fn mapped(&self, table: &str) -> Result<Arc<Mapped>, TransportError> {
        let maps = self.maps.read().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = maps.by_table.get(table) {
            return Ok(m.clone());
        }
        drop(maps);
        let desc = self.control.region_info(table)?;
        let open = |path: &Option<String>, what: &str, len: u64| {
            let path = path
                .as_deref()
                .map(Path::new)
                .filter(|p| p.starts_with(&self.dir));
            let Some(path) = path else {
                return Err(self.protocol(format!(
                    "table {table}: no {what} file under {}",
                    self.dir.display()
                )));
            };
            let region = SharedRegion::open(path)
                .map_err(|e| self.protocol(format!("mapping {}: {e}", path.display())))?;
            if region.len() < len {
                return Err(self.protocol(format!(
                    "{} holds {} bytes, the descriptor says {len}",
                    path.display(),
                    region.len()
                )));
            }
            Ok(region)
        };
        let layout = RowLayout::new(desc.dim);
        if layout.stride() as u32 != desc.stride || layout.region_bytes(desc.rows) > desc.len {
            return Err(self.protocol(format!(
                "table {table}: descriptor stride {} and length {} do not fit dim {} and {} rows",
                desc.stride, desc.len, desc.dim, desc.rows
            )));
        }
        let rows = open(&desc.shm_path, "region", desc.len)?;
        let clock = open(&desc.clock_shm_path, "clock", 8)?;
        let mapped = Arc::new(Mapped {
            desc,
            layout,
            rows,
            clock,
        });
        let mut maps = self.maps.write().unwrap_or_else(|p| p.into_inner());
        maps.by_region.insert(mapped.desc.region, mapped.clone());
        Ok(maps
            .by_table
            .entry(table.to_string())
            .or_insert(mapped)
            .clone())
    }

    /// The local row index of `key`, when it lives on this shard.
    fn local(&self, m: &Mapped, key: u64) -> Option<u64> {
        let hello = self.control.hello();
        m.desc.local_row(key, hello.shard, hello.shards)
    }

    fn locals(&self, m: &Mapped, keys: &[u64]) -> Option<Vec<u64>> {
        keys.iter().map(|&k| self.local(m, k)).collect()
    }

    /// Reads local row `i` into `out` (dim values); returns its version, or `None` when every
    /// attempt was torn.
    fn read_row(&self, m: &Mapped, i: u64, image: &mut [u8], out: &mut [f32]) -> Option<u64> {
        match row::read_row(m.rows.words(), &m.layout, i, image, self.attempts) {
            Ok(r) => {
                self.counters
                    .torn_retries
                    .fetch_add(r.retries as u64, Ordering::Relaxed);
                self.counters.rows_read.fetch_add(1, Ordering::Relaxed);
                row::decode_payload(&m.layout, image, out);
                Some(r.version)
            }
            Err(_) => {
                self.counters
                    .torn_retries
                    .fetch_add(self.attempts as u64, Ordering::Relaxed);
                None
            }
        }
    }

    /// Reads the rows at `which` (indices into `keys`/`locals`) into `versions` and `rows`
    /// (`which.len()` x dim), falling back to the control transport for torn ones.
    #[allow(clippy::too_many_arguments)]
    fn read_rows(
        &self,
        table: &str,
        m: &Mapped,
        keys: &[u64],
        locals: &[u64],
        which: impl Iterator<Item = usize>,
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<(), TransportError> {
        let dim = m.layout.dim();
        let mut image = vec![0u8; m.layout.stride()];
        let mut torn: Vec<usize> = Vec::new();
        let mut torn_keys = Vec::new();
        let which: Vec<usize> = which.collect();
        versions.clear();
        rows.clear();
        rows.resize(which.len() * dim, 0.0);
        let words = m.rows.words();
        for &j in which.iter().take(PREFETCH_ROWS) {
            row::prefetch_row(words, &m.layout, locals[j]);
        }
        for (n, &j) in which.iter().enumerate() {
            if let Some(&ahead) = which.get(n + PREFETCH_ROWS) {
                row::prefetch_row(words, &m.layout, locals[ahead]);
            }
            match self.read_row(m, locals[j], &mut image, &mut rows[n * dim..(n + 1) * dim]) {
                Some(v) => versions.push(v),
                None => {
                    versions.push(0);
                    torn.push(n);
                    torn_keys.push(keys[j]);
                }
            }
        }
        pull_into(&self.control, table, &torn_keys, &torn, dim, versions, rows)?;
        self.counters
            .fallback_rows
            .fetch_add(torn.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl<C: ShardTransport> ShardTransport for ShmTransport<C> {
    fn addr(&self) -> &str {
        self.control.addr()
    }

    fn hello(&self) -> &HelloResponse {
        self.control.hello()
    }

    fn list_tables(&self) -> Result<Vec<TableInfo>, TransportError> {
        self.control.list_tables()
    }

    fn create_table(&self, spec: &TableSpec) -> Result<CreateResponse, TransportError> {
        self.control.create_table(spec)
    }

    /// Maps the table (if not yet mapped), so that reads of its spans are served here.
    fn region_info(&self, table: &str) -> Result<RegionDescriptor, TransportError> {
        Ok(self.mapped(table)?.desc.clone())
    }

    /// Spans of mapped regions are copied here; a request naming any other region, or reaching
    /// past one, goes to the daemon whole (which reads or refuses it).
    fn read(&self, spans: &[Span], out: &mut Vec<u8>) -> Result<(), TransportError> {
        let maps = self.maps.read().unwrap_or_else(|p| p.into_inner());
        let local: Option<Vec<&Mapped>> = spans
            .iter()
            .map(|s| {
                maps.by_region.get(&s.region).map(|m| &**m).filter(|m| {
                    s.offset
                        .checked_add(s.len as u64)
                        .is_some_and(|end| end <= m.rows.len())
                })
            })
            .collect();
        let Some(local) = local else {
            drop(maps);
            return self.control.read(spans, out);
        };
        out.clear();
        for (s, m) in spans.iter().zip(local) {
            row::copy_span(m.rows.words(), s.offset, s.len as usize, out);
        }
        Ok(())
    }

    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<u64, TransportError> {
        let m = self.mapped(table)?;
        // A key that is not this shard's goes to the daemon, which names the problem.
        let Some(locals) = self.locals(&m, keys) else {
            return self.control.pull(table, keys, versions, rows);
        };
        let clock = m.clock();
        self.read_rows(table, &m, keys, &locals, 0..keys.len(), versions, rows)?;
        Ok(clock)
    }

    fn pull_if_stale(
        &self,
        table: &str,
        keys: &[u64],
        clocks: &[u64],
        bound: u64,
        since: Option<Since>,
        push: Option<PushRef<'_>>,
        out: &mut StaleRows,
    ) -> Result<(), TransportError> {
        let m = self.mapped(table)?;
        let locals = self.locals(&m, keys);
        let (Some(locals), true) = (locals, clocks.len() == keys.len()) else {
            // The daemon validates (and refuses) the whole request, push included.
            return self
                .control
                .pull_if_stale(table, keys, clocks, bound, since, push, out);
        };
        // Pushed rows first, as the daemon would apply them: the reads below see them.
        out.pushed_updates = match push {
            Some(p) => self.control.push(table, p.keys, p.counts, p.grads)?.updates,
            None => 0,
        };
        // The clock after the push and before any row, as in the daemon's answer.
        let table_clock = m.clock();
        out.table_clock = table_clock;
        out.since_held = since.is_none_or(|s| s.holds(table_clock));
        let words = m.rows.words();
        let mut checked = 0u64;
        out.indices.clear();
        for (j, (&i, &clock)) in locals.iter().zip(clocks).enumerate() {
            let stale = clock == NOT_CACHED || {
                checked += 1;
                (row::read_seq(words, &m.layout, i) >> 1) > clock.saturating_add(bound)
            };
            if stale {
                out.indices.push(j as u32);
            }
        }
        self.counters
            .versions_read
            .fetch_add(checked, Ordering::Relaxed);
        let which = out.indices.iter().map(|&j| j as usize);
        self.read_rows(
            table,
            &m,
            keys,
            &locals,
            which,
            &mut out.versions,
            &mut out.rows,
        )
    }

    fn push(
        &self,
        table: &str,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushResponse, TransportError> {
        self.control.push(table, keys, counts, grads)
    }

    fn stats(&self) -> Result<ShardStats, TransportError> {
        self.control.stats()
    }

    /// Bytes of the control transport: shared-memory reads cross no network.
    fn traffic(&self) -> Traffic {
        self.control.traffic()
    }
}
