//! One-sided reads (DESIGN sections 4 and 6), written once for every kind of memory a client can
//! read without the daemon's CPU.
//!
//! A [`RemoteMemory`] only moves bytes: it makes a table's region and clock word readable
//! ([`RemoteMemory::attach`]) and reads batches of spans ([`RemoteMemory::read`]). Two implement
//! it: the shared-memory mapping of a same-host daemon's files ([`crate::shm::ShmMemory`]) and
//! batched RDMA READ (`crate::rdma::RdmaMemory`, feature `rdma`). [`OneSidedTransport`] is the
//! one [`ShardTransport`] on top of either: the verifying reader (copy the whole row, accept it only
//! when its seq is even and its checksum matches, re-read torn copies a bounded number of times,
//! then fall back to the `pull` RPC), the conditional pull (the clock, then the version word of each
//! cached key against [`is_stale`], then the stale rows), and the forwarding of everything it cannot
//! answer (pushes, control, keys of another shard) to its control transport.
//!
//! A conditional pull that carries a push sends the push over the control transport first and
//! reports its outcome apart from the read's ([`Carried`]): a read that fails after the shard
//! acknowledged the push never makes the caller push the rows again.
//!
//! Reads that never touch the daemon cannot see it restart (a killed daemon's shared-memory files
//! stay mapped, frozen). So at most once per liveness interval (one second by default, measured
//! on this host's monotonic clock) a call first asks the daemon, over the control transport, for
//! its tables: an answer from a new incarnation detaches every table (they are attached again
//! from the new daemon's descriptors), and no answer within the control transport's deadline is
//! the call's error. Within the interval, the answer to a push a conditional pull carries may be
//! the first to reveal a restart: the reader then attaches again before reading, so the rows it
//! answers with ([`StaleRows::incarnation`]) are of the incarnation that applied the push.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::client::{
    pull_into, Carried, Produced, Pulled, PushOutcome, PushRef, ShardTransport, StaleQuery,
    StaleRows, Traffic, TransportError,
};
use crate::keyed::{Found, KeyedLayout, SpanFind};
use crate::row::{self, RowLayout, DEFAULT_READ_ATTEMPTS};
use crate::spec::{TableInfo, TableSpec};
use crate::wire::{
    is_stale, CheckpointResponse, CreateResponse, Endpoint, HelloResponse, PushResponse,
    RegionDescriptor, ShardStats, Span, NOT_CACHED,
};

/// A table's rows and clock word, made readable by a [`RemoteMemory`].
#[derive(Debug)]
pub struct Attachment<R> {
    /// The region of rows (`RegionDescriptor::len` bytes).
    pub rows: R,
    /// The table's clock word (8 bytes: updates applied on the shard).
    pub clock: R,
}

/// `len` bytes at `offset` of one attached region.
#[derive(Debug)]
pub struct RemoteSpan<'a, R> {
    /// The region.
    pub region: &'a R,
    /// Byte offset in it.
    pub offset: u64,
    /// Bytes to read.
    pub len: u32,
}

/// Memory of a shard that a client reads without the daemon's CPU.
pub trait RemoteMemory: Send + Sync {
    /// A region made readable by [`RemoteMemory::attach`].
    type Region: Send + Sync;
    /// Makes the region and the clock word that `desc` describes readable, or says why not.
    /// `desc` comes from the daemon; an implementation checks what it relies on.
    fn attach(&self, desc: &RegionDescriptor) -> Result<Attachment<Self::Region>, String>;
    /// Reads every span, and hands each one's bytes (exactly `len` of them), in order, to
    /// `each(index, bytes)`. A failure is a failure of the link to the shard.
    fn read(
        &self,
        spans: &[RemoteSpan<'_, Self::Region>],
        each: &mut dyn FnMut(usize, &[u8]),
    ) -> io::Result<()>;
    /// Bytes read so far that crossed a link (0 for shared memory).
    fn bytes_read(&self) -> u64 {
        0
    }
    /// Whether a failed read may succeed after [`RemoteMemory::reconnect`] (RDMA: a queue pair
    /// that broke, or whose peer is gone).
    fn can_reconnect(&self) -> bool {
        false
    }
    /// Connects the link again through `control` (a new queue pair); later reads use it.
    fn reconnect(&self, control: &dyn ShardTransport) -> Result<(), TransportError> {
        let _ = control;
        Ok(())
    }
}

/// Counters of one one-sided transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OneSidedStats {
    /// Rows read and verified one-sidedly.
    pub rows_read: u64,
    /// Version words read one-sidedly.
    pub versions_read: u64,
    /// Buckets of dynamic tables' regions read one-sidedly (a key's first read).
    pub buckets_read: u64,
    /// Torn copies discarded (odd seq or a checksum mismatch).
    pub torn_retries: u64,
    /// Rows whose copies all failed verification, then read with the `pull` RPC.
    pub fallback_rows: u64,
    /// Times the link was connected again (RDMA: a new queue pair, after a failed read or a
    /// restart of the daemon).
    pub reconnects: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rows_read: AtomicU64,
    versions_read: AtomicU64,
    buckets_read: AtomicU64,
    torn_retries: AtomicU64,
    fallback_rows: AtomicU64,
    reconnects: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One table as the transport reads it.
#[derive(Debug)]
struct Attached<R> {
    desc: RegionDescriptor,
    layout: RowLayout,
    /// A dynamic table's region: buckets of key digests, then keyed rows.
    keyed: Option<KeyedLayout>,
    at: Attachment<R>,
    /// The daemon's incarnation when it described the region.
    incarnation: u64,
}

impl<R> Attached<R> {
    fn row(&self, local: u64) -> RemoteSpan<'_, R> {
        RemoteSpan {
            region: &self.at.rows,
            offset: self.layout.row_offset(local),
            len: self.layout.stride() as u32,
        }
    }

    fn version_word(&self, local: u64) -> RemoteSpan<'_, R> {
        RemoteSpan {
            region: &self.at.rows,
            offset: self.layout.row_offset(local),
            len: 8,
        }
    }

    fn clock(&self) -> RemoteSpan<'_, R> {
        RemoteSpan {
            region: &self.at.clock,
            offset: 0,
            len: 8,
        }
    }
}

struct Tables<R> {
    by_name: HashMap<String, Arc<Attached<R>>>,
    by_region: HashMap<u32, Arc<Attached<R>>>,
}

/// A shard read one-sidedly through `M`, controlled (and pushed to) through `C`.
pub struct OneSidedTransport<M: RemoteMemory, C> {
    control: C,
    memory: M,
    tables: RwLock<Tables<M::Region>>,
    attempts: u32,
    counters: Counters,
    liveness: Duration,
    /// When this transport was made, and how long after that the daemon last answered.
    epoch: Instant,
    checked_at_ns: AtomicU64,
}

/// How often, at most, one-sided reads confirm that the daemon is the one they attached to.
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

impl<M: RemoteMemory, C> std::fmt::Debug for OneSidedTransport<M, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneSidedTransport")
            .field("memory", &std::any::type_name::<M>())
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Why a read of attached memory did not complete.
#[derive(Debug)]
enum Failed {
    /// The transport's error.
    Transport(TransportError),
    /// An answer came from this incarnation of the daemon, not the one whose memory is attached:
    /// attach again and read again.
    Restarted(u64),
    /// The table's clock word says it was dropped ([`crate::wire::DROPPED_CLOCK`]): the memory
    /// attached is no longer the table's. Detach it, and attach the table of that name again
    /// (created anew, or unknown).
    Dropped,
}

impl From<TransportError> for Failed {
    fn from(e: TransportError) -> Self {
        Failed::Transport(e)
    }
}

impl Failed {
    /// The error a caller sees when it does not (or no longer) attach again.
    fn into_error(self, addr: &str) -> TransportError {
        match self {
            Failed::Transport(e) => e,
            Failed::Restarted(incarnation) => TransportError::Io {
                addr: addr.to_string(),
                source: io::Error::other(format!(
                    "the shard restarted (incarnation {incarnation:016x}) while its memory was \
                     being read, twice in one call"
                )),
            },
            Failed::Dropped => TransportError::Remote {
                addr: addr.to_string(),
                error: crate::wire::WireError::new(
                    crate::wire::ErrorCode::UnknownTable,
                    "the table was dropped (and created again) while this call read it",
                ),
            },
        }
    }
}

/// A table clock word as read: its count, or [`Failed::Dropped`] when the dropped bit is set.
fn clock_word(bytes: &[u8]) -> Result<u64, Failed> {
    let w = word(bytes);
    if w & crate::wire::DROPPED_CLOCK != 0 {
        return Err(Failed::Dropped);
    }
    Ok(w)
}

fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("an 8-byte span"))
}

/// Accepts a row copy into slot `n` of `versions` and `rows` when it verifies.
fn accept(
    layout: &RowLayout,
    image: &[u8],
    n: usize,
    versions: &mut [u64],
    rows: &mut [f32],
) -> bool {
    let dim = layout.dim();
    match row::verify_image(layout, image) {
        Ok(v) => {
            versions[n] = v;
            row::decode_payload(layout, image, &mut rows[n * dim..(n + 1) * dim]);
            true
        }
        Err(_) => false,
    }
}

impl<M: RemoteMemory, C: ShardTransport> OneSidedTransport<M, C> {
    /// Reads the shard behind `control` through `memory`.
    pub fn with_memory(memory: M, control: C) -> Self {
        Self {
            control,
            memory,
            tables: RwLock::new(Tables {
                by_name: HashMap::new(),
                by_region: HashMap::new(),
            }),
            attempts: DEFAULT_READ_ATTEMPTS,
            counters: Counters::default(),
            liveness: DEFAULT_LIVENESS_INTERVAL,
            epoch: Instant::now(),
            checked_at_ns: AtomicU64::new(0),
        }
    }

    /// Sets how often, at most, a call confirms the daemon's incarnation before reading.
    pub fn with_liveness_interval(mut self, interval: Duration) -> Self {
        self.liveness = interval;
        self
    }

    /// Asks the daemon for its tables when the last answer is older than the liveness interval,
    /// and detaches every table when the daemon is a new incarnation.
    fn confirm_incarnation(&self) -> Result<(), TransportError> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.checked_at_ns.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.liveness.as_nanos() as u64 {
            self.control.list_tables()?;
            self.checked_at_ns.store(now, Ordering::Relaxed);
        }
        let current = self.control.incarnation();
        if self.detach_other_than(current) {
            self.reconnect_for_restart()?;
        }
        Ok(())
    }

    /// Detaches every table attached in an incarnation other than `incarnation` (the daemon's
    /// now, as an answer revealed it); true when there was one. The one place attachments are
    /// dropped for a restart: they are attached again on their next use.
    fn detach_other_than(&self, incarnation: u64) -> bool {
        let stale = |t: &Tables<M::Region>| {
            incarnation != 0 && t.by_name.values().any(|a| a.incarnation != incarnation)
        };
        if !stale(&self.tables.read().unwrap_or_else(|p| p.into_inner())) {
            return false;
        }
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        if !stale(&tables) {
            return false; // another thread detached them
        }
        tracing::warn!(
            shard = self.control.addr(),
            incarnation = format!("{incarnation:016x}"),
            "the shard restarted: attaching its tables again before reading"
        );
        tables.by_name.retain(|_, a| a.incarnation == incarnation);
        tables.by_region.retain(|_, a| a.incarnation == incarnation);
        true
    }

    /// The daemon is a new incarnation: a queue pair to the old one is dead, so the link is
    /// connected again before anything is read.
    fn reconnect_for_restart(&self) -> Result<(), TransportError> {
        if self.memory.can_reconnect() {
            self.memory.reconnect(&self.control)?;
            Counters::add(&self.counters.reconnects, 1);
        }
        Ok(())
    }

    /// Sets how many copies of a row a read makes before asking the control transport.
    pub fn with_read_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The control transport.
    pub fn control(&self) -> &C {
        &self.control
    }

    /// The memory the rows are read from.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Detaches everything and hands the control transport back.
    pub fn into_control(self) -> C {
        self.control
    }

    /// The one-sided read counters.
    pub fn read_stats(&self) -> OneSidedStats {
        let c = &self.counters;
        OneSidedStats {
            rows_read: c.rows_read.load(Ordering::Relaxed),
            versions_read: c.versions_read.load(Ordering::Relaxed),
            buckets_read: c.buckets_read.load(Ordering::Relaxed),
            torn_retries: c.torn_retries.load(Ordering::Relaxed),
            fallback_rows: c.fallback_rows.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    /// After a failed read of memory attached in `incarnation`: connects the link again and
    /// returns Ok (read again) the first time (`again` false) when the memory can reconnect;
    /// [`Failed::Restarted`] when the daemon that answered the reconnection is another
    /// incarnation (the attachment is then of dead memory); otherwise the read's error.
    fn reconnect_after(
        &self,
        e: io::Error,
        again: &mut bool,
        incarnation: u64,
    ) -> Result<(), Failed> {
        if *again || !self.memory.can_reconnect() {
            return Err(self.link(e).into());
        }
        *again = true;
        tracing::warn!(shard = self.control.addr(), error = %e, "a one-sided read failed: connecting the link again");
        self.memory.reconnect(&self.control).map_err(|r| {
            self.link(io::Error::other(format!(
                "{e}; connecting the link again failed: {r}"
            )))
        })?;
        Counters::add(&self.counters.reconnects, 1);
        match self.control.incarnation() {
            now if now != 0 && now != incarnation => {
                // The new link is to the new daemon already: detach without connecting again.
                self.detach_other_than(now);
                Err(Failed::Restarted(now))
            }
            _ => Ok(()),
        }
    }

    /// [`Self::reconnect_after`] for a read of table `a`: when the read fails for good, the
    /// daemon is asked whether `a` is still its table. A dropped table's memory is no longer
    /// registered, so its reads fail (where its clock word could not be read to say so), and
    /// [`Failed::Dropped`] is returned then.
    fn reconnect_after_reading(
        &self,
        e: io::Error,
        again: &mut bool,
        a: &Attached<M::Region>,
    ) -> Result<(), Failed> {
        match self.reconnect_after(e, again, a.incarnation) {
            Err(Failed::Transport(t)) => Err(match self.control.region_info(&a.desc.table) {
                Ok(d) if d.region != a.desc.region => Failed::Dropped,
                Err(e)
                    if e.remote()
                        .is_some_and(|w| w.code == crate::wire::ErrorCode::UnknownTable) =>
                {
                    Failed::Dropped
                }
                _ => Failed::Transport(t),
            }),
            other => other,
        }
    }

    fn link(&self, source: io::Error) -> TransportError {
        TransportError::Io {
            addr: self.control.addr().to_string(),
            source,
        }
    }

    /// The table's attachment, made on first use from its region descriptor.
    fn attached(&self, table: &str) -> Result<Arc<Attached<M::Region>>, TransportError> {
        self.confirm_incarnation()?;
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = tables.by_name.get(table) {
            return Ok(a.clone());
        }
        drop(tables);
        let desc = self.control.region_info(table)?;
        // The incarnation of the answer that described the region, not what the control
        // transport heard last (another thread's answer may be of another incarnation).
        let incarnation = match desc.incarnation {
            0 => self.control.incarnation(),
            i => i,
        };
        let protocol = |message: String| TransportError::Protocol {
            addr: self.control.addr().to_string(),
            message: format!("table {table}: {message}"),
        };
        let layout = desc
            .check_layout()
            .map_err(|e| protocol(format!("region descriptor: {e}")))?;
        let hello = self.control.hello();
        let keyed = desc
            .check_keyed_layout(hello.shard, hello.shards)
            .map_err(|e| protocol(format!("region descriptor: {e}")))?;
        let at = self.memory.attach(&desc).map_err(protocol)?;
        let attached = Arc::new(Attached {
            desc,
            layout,
            keyed,
            at,
            incarnation,
        });
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        tables
            .by_region
            .insert(attached.desc.region, attached.clone());
        Ok(tables
            .by_name
            .entry(table.to_string())
            .or_insert(attached)
            .clone())
    }

    /// [`Self::reattach`], and the local rows of `keys` on the restarted shard.
    #[allow(clippy::type_complexity)]
    fn reattach_holding(
        &self,
        table: &str,
        incarnation: u64,
        keys: &[u64],
    ) -> Result<(Arc<Attached<M::Region>>, Vec<u64>), TransportError> {
        let a = self.reattach(table, incarnation)?;
        let locals = self
            .locals(&a, keys)
            .ok_or_else(|| TransportError::Protocol {
                addr: self.control.addr().to_string(),
                message: format!("table {table}: the restarted shard no longer holds the keys"),
            })?;
        Ok((a, locals))
    }

    /// Detaches `table` (found dropped: its memory is no longer the table's).
    fn detach(&self, table: &str) {
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = tables.by_name.remove(table) {
            tables.by_region.remove(&a.desc.region);
        }
    }

    /// Detaches every table attached in an incarnation other than `incarnation` (which an
    /// answer just revealed) and attaches `table` again.
    fn reattach(
        &self,
        table: &str,
        incarnation: u64,
    ) -> Result<Arc<Attached<M::Region>>, TransportError> {
        if self.detach_other_than(incarnation) {
            self.reconnect_for_restart()?;
        }
        self.attached(table)
    }

    /// The local rows of `keys`, when every key lives on this shard.
    fn locals(&self, a: &Attached<M::Region>, keys: &[u64]) -> Option<Vec<u64>> {
        let hello = self.control.hello();
        let routing = a.desc.routing(hello.shards);
        keys.iter()
            .map(|&k| routing.local_on(k, hello.shard, a.desc.rows))
            .collect()
    }

    /// Whether every key of a dynamic table lives on this shard.
    fn holds_keys(&self, a: &Attached<M::Region>, keys: &[u64]) -> bool {
        let hello = self.control.hello();
        let routing = a.desc.routing(hello.shards);
        keys.iter()
            .all(|&k| routing.shard_of(k) == hello.shard as usize)
    }

    /// The verifying reader over a batch of a dynamic table's keys (all of this shard), as
    /// [`SpanFind`] plans it: the table clock and each distinct bucket in one batch, then every
    /// candidate row in a second; copies that do not verify are read again up to the attempt
    /// limit, and keys still undecided are read with the `pull` RPC. A key absent reads as
    /// version 0 with zeros, as the daemon answers it (`TableSpec::complete_pulled` makes that
    /// its initial value). Returns the clock.
    #[allow(clippy::too_many_arguments)]
    fn read_keyed(
        &self,
        table: &str,
        a: &Attached<M::Region>,
        layout: &KeyedLayout,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<u64, Failed> {
        let (n, dim) = (keys.len(), layout.row().dim());
        versions.clear();
        versions.resize(n, 0);
        rows.clear();
        rows.resize(n * dim, 0.0);
        let span = |(offset, len): (u64, u32)| RemoteSpan {
            region: &a.at.rows,
            offset,
            len,
        };
        let mut find = SpanFind::new(*layout, keys);
        let mut discarded = 0;
        // Round one: the clock and the buckets.
        let mut spans = vec![a.clock()];
        spans.extend(find.bucket_reads().map(span));
        let mut clock = 0;
        let mut again = false;
        while let Err(e) = self.memory.read(&spans, &mut |i, bytes| match i {
            0 => clock = word(bytes),
            _ => discarded += usize::from(!find.take_bucket(i - 1, bytes)),
        }) {
            self.reconnect_after_reading(e, &mut again, a)?;
            discarded = 0;
        }
        let clock = clock_word(&clock.to_le_bytes())?;
        Counters::add(&self.counters.buckets_read, spans.len() - 1);
        for _ in 1..self.attempts {
            let torn = find.torn_buckets();
            if torn.is_empty() {
                break;
            }
            let reads: Vec<_> = find.bucket_reads().collect();
            let again: Vec<_> = torn.iter().map(|&i| span(reads[i])).collect();
            self.memory
                .read(&again, &mut |t, bytes| {
                    discarded += usize::from(!find.take_bucket(torn[t], bytes));
                })
                .map_err(|e| self.link(e))?;
        }
        // Round two: the candidate rows of every key whose bucket verified.
        find.plan_rows();
        let mut take = |find: &mut SpanFind<'_>, r: usize, bytes: &[u8]| {
            if !find.take_row(r, bytes) {
                discarded += 1;
                return;
            }
            let j = find.key_of_read(r);
            if let Found::Row { read, version } = find.found()[j] {
                if read == r {
                    versions[j] = version;
                    row::decode_payload(layout.row(), bytes, &mut rows[j * dim..(j + 1) * dim]);
                }
            }
        };
        let reads: Vec<_> = find.row_reads().collect();
        let spans: Vec<_> = reads.iter().map(|&r| span(r)).collect();
        while let Err(e) = self
            .memory
            .read(&spans, &mut |r, bytes| take(&mut find, r, bytes))
        {
            self.reconnect_after_reading(e, &mut again, a)?;
            find.plan_rows();
        }
        for _ in 1..self.attempts {
            let torn = find.torn_rows();
            if torn.is_empty() {
                break;
            }
            let again: Vec<_> = torn.iter().map(|&r| span(reads[r])).collect();
            self.memory
                .read(&again, &mut |t, bytes| take(&mut find, torn[t], bytes))
                .map_err(|e| self.link(e))?;
        }
        find.settle_rows();
        let pending: Vec<usize> = (0..n)
            .filter(|&j| find.found()[j] == Found::Pending)
            .collect();
        let found = find
            .found()
            .iter()
            .filter(|f| matches!(f, Found::Row { .. }))
            .count();
        Counters::add(&self.counters.torn_retries, discarded);
        Counters::add(&self.counters.rows_read, found);
        Counters::add(&self.counters.fallback_rows, pending.len());
        let pending_keys: Vec<u64> = pending.iter().map(|&j| keys[j]).collect();
        match pull_into(
            &self.control,
            table,
            &pending_keys,
            &pending,
            dim,
            versions,
            rows,
        )? {
            Some(p) if p.incarnation != 0 && p.incarnation != a.incarnation => {
                Err(Failed::Restarted(p.incarnation))
            }
            _ => Ok(clock),
        }
    }

    /// The verifying reader over a batch: reads the rows at `locals` (whose keys are `keys`) into
    /// `versions` and `rows` (`locals.len()` x dim); copies that fail verification are read again,
    /// up to the attempt limit, then with the `pull` RPC. With `with_clock`, the table clock is read
    /// first, in the same batch, and returned.
    #[allow(clippy::too_many_arguments)]
    fn read_rows(
        &self,
        table: &str,
        a: &Attached<M::Region>,
        keys: &[u64],
        locals: &[u64],
        with_clock: bool,
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<Option<u64>, Failed> {
        let (n, dim) = (locals.len(), a.layout.dim());
        versions.clear();
        versions.resize(n, 0);
        rows.clear();
        rows.resize(n * dim, 0.0);
        let mut spans = Vec::with_capacity(n + 1);
        spans.extend(with_clock.then(|| a.clock()));
        let skip = spans.len();
        spans.extend(locals.iter().map(|&l| a.row(l)));
        let mut clock = None;
        let mut torn = Vec::new();
        let mut again = false;
        while let Err(e) = self.memory.read(&spans, &mut |i, bytes| {
            if i < skip {
                clock = Some(word(bytes));
            } else if !accept(&a.layout, bytes, i - skip, versions, rows) {
                torn.push(i - skip);
            }
        }) {
            self.reconnect_after_reading(e, &mut again, a)?;
            torn.clear();
        }
        let clock = clock.map(|c| clock_word(&c.to_le_bytes())).transpose()?;
        let mut discarded = torn.len();
        for _ in 1..self.attempts {
            if torn.is_empty() {
                break;
            }
            let again: Vec<_> = torn.iter().map(|&t| a.row(locals[t])).collect();
            let mut still = Vec::new();
            self.memory
                .read(&again, &mut |i, bytes| {
                    if !accept(&a.layout, bytes, torn[i], versions, rows) {
                        still.push(torn[i]);
                    }
                })
                .map_err(|e| self.link(e))?;
            discarded += still.len();
            torn = still;
        }
        Counters::add(&self.counters.torn_retries, discarded);
        Counters::add(&self.counters.rows_read, n - torn.len());
        Counters::add(&self.counters.fallback_rows, torn.len());
        let torn_keys: Vec<u64> = torn.iter().map(|&t| keys[t]).collect();
        match pull_into(&self.control, table, &torn_keys, &torn, dim, versions, rows)? {
            // The daemon that answered the fallback is not the one whose memory the other rows
            // came from: the batch would mix incarnations.
            Some(p) if p.incarnation != 0 && p.incarnation != a.incarnation => {
                Err(Failed::Restarted(p.incarnation))
            }
            _ => Ok(clock),
        }
    }

    /// The read half of a conditional pull whose keys all live here: the table clock and the
    /// version word of every key a finite bound checks in one batch, then the stale rows.
    fn stale_rows(
        &self,
        q: &StaleQuery<'_>,
        a: &Attached<M::Region>,
        locals: &[u64],
        out: &mut StaleRows,
    ) -> Result<(), Failed> {
        let checked: Vec<usize> = (0..q.keys.len())
            .filter(|&j| q.clocks[j] != NOT_CACHED && q.bound != u64::MAX)
            .collect();
        let mut spans = Vec::with_capacity(checked.len() + 1);
        spans.push(a.clock());
        spans.extend(checked.iter().map(|&j| a.version_word(locals[j])));
        let mut stale: Vec<bool> = q.clocks.iter().map(|&c| c == NOT_CACHED).collect();
        let mut table_clock = 0;
        let mut again = false;
        while let Err(e) = self.memory.read(&spans, &mut |i, bytes| match i {
            0 => table_clock = word(bytes),
            _ => {
                let j = checked[i - 1];
                stale[j] = is_stale(row::version_of(word(bytes)), q.clocks[j], q.bound);
            }
        }) {
            // Every span is read again, so every entry is written again.
            self.reconnect_after_reading(e, &mut again, a)?;
        }
        let table_clock = clock_word(&table_clock.to_le_bytes())?;
        Counters::add(&self.counters.versions_read, checked.len());
        out.table_clock = table_clock;
        out.since_held = q.since.is_none_or(|s| s.holds(table_clock));
        out.indices.clear();
        out.states.clear();
        out.indices
            .extend((0..q.keys.len() as u32).filter(|&j| stale[j as usize]));
        let keys: Vec<u64> = out.indices.iter().map(|&j| q.keys[j as usize]).collect();
        let locals: Vec<u64> = out.indices.iter().map(|&j| locals[j as usize]).collect();
        self.read_rows(
            q.table,
            a,
            &keys,
            &locals,
            false,
            &mut out.versions,
            &mut out.rows,
        )?;
        Ok(())
    }
}

impl<M: RemoteMemory, C: ShardTransport> ShardTransport for OneSidedTransport<M, C> {
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

    /// Drops the table on the daemon and detaches it here.
    fn drop_table(&self, table: &str) -> Result<bool, TransportError> {
        let dropped = self.control.drop_table(table)?;
        self.detach(table);
        Ok(dropped)
    }

    /// Attaches the table (if not yet attached), so that reads of its spans are served here.
    fn region_info(&self, table: &str) -> Result<RegionDescriptor, TransportError> {
        Ok(self.attached(table)?.desc.clone())
    }

    /// Spans of attached regions are read here; a request naming any other region, or reaching
    /// past one, goes to the daemon whole (which reads or refuses it).
    fn read(&self, spans: &[Span], out: &mut Vec<u8>) -> Result<(), TransportError> {
        self.confirm_incarnation()?;
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let attached: Option<Vec<Arc<Attached<M::Region>>>> = spans
            .iter()
            .map(|s| {
                let a = tables.by_region.get(&s.region)?;
                let end = s.offset.checked_add(u64::from(s.len))?;
                (end <= a.desc.len).then(|| a.clone())
            })
            .collect();
        drop(tables);
        let Some(attached) = attached else {
            return self.control.read(spans, out);
        };
        let remote: Vec<_> = spans
            .iter()
            .zip(&attached)
            .map(|(s, a)| RemoteSpan {
                region: &a.at.rows,
                offset: s.offset,
                len: s.len,
            })
            .collect();
        out.clear();
        let mut again = false;
        while let Err(e) = self
            .memory
            .read(&remote, &mut |_, bytes| out.extend_from_slice(bytes))
        {
            // Spans name regions of one incarnation: after a restart they mean nothing.
            let incarnation = attached.first().map_or(0, |a| a.incarnation);
            self.reconnect_after(e, &mut again, incarnation)
                .map_err(|f| f.into_error(self.control.addr()))?;
            out.clear();
        }
        Ok(())
    }

    fn pull(
        &self,
        table: &str,
        keys: &[u64],
        versions: &mut Vec<u64>,
        rows: &mut Vec<f32>,
    ) -> Result<Pulled, TransportError> {
        let mut a = self.attached(table)?;
        let mut reattached = false;
        loop {
            // A key that is not this shard's goes to the daemon, which names the problem.
            let read = match &a.keyed {
                Some(layout) if self.holds_keys(&a, keys) => {
                    self.read_keyed(table, &a, layout, keys, versions, rows)
                }
                Some(_) => return self.control.pull(table, keys, versions, rows),
                None => {
                    let Some(locals) = self.locals(&a, keys) else {
                        return self.control.pull(table, keys, versions, rows);
                    };
                    self.read_rows(table, &a, keys, &locals, true, versions, rows)
                        .map(|clock| clock.unwrap_or(0))
                }
            };
            match read {
                Ok(clock) => {
                    return Ok(Pulled {
                        clock,
                        incarnation: a.incarnation,
                    })
                }
                Err(Failed::Restarted(incarnation)) if !reattached => {
                    reattached = true;
                    a = self.reattach(table, incarnation)?;
                }
                Err(Failed::Dropped) if !reattached => {
                    reattached = true;
                    self.detach(table);
                    a = self.attached(table)?;
                }
                Err(f) => return Err(f.into_error(self.control.addr())),
            }
        }
    }

    fn pull_if_stale(&self, q: &StaleQuery<'_>, out: &mut StaleRows) -> Carried {
        let not_sent = |e: TransportError| Carried {
            push: match q.push {
                Some(_) => PushOutcome::failed(&e),
                None => PushOutcome::NotSent,
            },
            read: Err(e),
        };
        let a = match self.attached(q.table) {
            Ok(a) => a,
            Err(e) => return not_sent(e),
        };
        let (Some(locals), true) = (self.locals(&a, q.keys), q.clocks.len() == q.keys.len()) else {
            // The daemon validates (and refuses) the whole request, push included.
            return self.control.pull_if_stale(q, out);
        };
        if q.state_keys > 0 {
            // Optimizer state lives in the daemon's memory, not in the regions it exposes: a
            // read that wants it is the daemon's (docs/ARCHITECTURE.md, "Optimizer state").
            return self.control.pull_if_stale(q, out);
        }
        // Pushed rows first, as the daemon would apply them: the reads below see them.
        out.produced.clear();
        let push = match q.push {
            None => PushOutcome::NotSent,
            Some(p) => match self.control.push_rows(q.table, &p, &mut out.produced) {
                Ok(ack) => PushOutcome::Applied(ack),
                Err(e) => return not_sent(e),
            },
        };
        // The push's answer may be the first to reveal a restart: the attached memory is then
        // the dead daemon's, frozen. Attach again before reading, so the rows and the clock are
        // of the incarnation that applied the push.
        let mut revealed = match push {
            PushOutcome::Applied(ack)
                if ack.incarnation != 0 && ack.incarnation != a.incarnation =>
            {
                Some(ack.incarnation)
            }
            _ => None,
        };
        let (mut a, mut locals, mut reattached) = (a, locals, false);
        loop {
            if let Some(incarnation) = revealed.take() {
                reattached = true;
                match self.reattach_holding(q.table, incarnation, q.keys) {
                    Ok(r) => (a, locals) = r,
                    Err(e) => return Carried { push, read: Err(e) },
                }
            }
            match self.stale_rows(q, &a, &locals, out) {
                Ok(()) => {
                    out.incarnation = a.incarnation;
                    return Carried { push, read: Ok(()) };
                }
                Err(Failed::Restarted(incarnation)) if !reattached => revealed = Some(incarnation),
                Err(Failed::Dropped) if !reattached => {
                    reattached = true;
                    self.detach(q.table);
                    match self.attached(q.table).map(|a| {
                        let locals = self.locals(&a, q.keys);
                        (a, locals)
                    }) {
                        Ok((fresh, Some(l))) => (a, locals) = (fresh, l),
                        // A table of that name created anew, whose keys live elsewhere.
                        Ok((_, None)) => {
                            return Carried {
                                push,
                                read: Err(Failed::Dropped.into_error(self.control.addr())),
                            }
                        }
                        Err(e) => return Carried { push, read: Err(e) },
                    }
                }
                Err(f) => {
                    return Carried {
                        push,
                        read: Err(f.into_error(self.control.addr())),
                    }
                }
            }
        }
    }

    fn push_rows(
        &self,
        table: &str,
        rows: &PushRef<'_>,
        produced: &mut Produced,
    ) -> Result<PushResponse, TransportError> {
        self.control.push_rows(table, rows, produced)
    }

    fn assign(
        &self,
        table: &str,
        rows: &crate::codec::assign::Assignment<'_>,
    ) -> Result<PushResponse, TransportError> {
        self.control.assign(table, rows)
    }

    fn checkpoint(
        &self,
        name: &str,
        incremental: bool,
    ) -> Result<CheckpointResponse, TransportError> {
        self.control.checkpoint(name, incremental)
    }

    fn stats(&self) -> Result<ShardStats, TransportError> {
        self.control.stats()
    }

    fn evictions(
        &self,
        table: &str,
        cursor: u64,
        max: u32,
    ) -> Result<crate::wire::EvictionsResponse, TransportError> {
        self.control.evictions(table, cursor, max)
    }

    fn advance_step(
        &self,
        table: &str,
        step: u64,
    ) -> Result<crate::wire::AdvanceStepResponse, TransportError> {
        self.control.advance_step(table, step)
    }

    fn scan(
        &self,
        table: &str,
        dim: u32,
        from: u64,
        slots: u32,
    ) -> Result<crate::codec::scan::Scanned, TransportError> {
        self.control.scan(table, dim, from, slots)
    }

    /// The control transport's bytes, plus the bytes one-sided reads brought over a link (as
    /// received; none for shared memory).
    fn traffic(&self) -> Traffic {
        let mut t = self.control.traffic();
        t.received += self.memory.bytes_read();
        t
    }

    fn incarnation(&self) -> u64 {
        self.control.incarnation()
    }

    fn restarts(&self) -> crate::client::Restarts {
        self.control.restarts()
    }

    fn settle(&self) -> Result<(), TransportError> {
        self.control.settle()
    }

    fn rdma_connect(&self, _ours: &Endpoint) -> Result<Endpoint, TransportError> {
        Err(TransportError::InvalidRequest {
            addr: self.control.addr().to_string(),
            message: "already a one-sided transport: set up RDMA on its control transport".into(),
        })
    }
}
