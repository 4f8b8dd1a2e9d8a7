//! One table on one shard: rows in a mapped region, optimizer state beside it.
//!
//! Writers (pushes) take the lock of the row's stripe, so there is one writer per row at a time as
//! the row codec requires; readers never lock: they use the verifying reader and fall back to the
//! stripe lock only after a bounded number of torn copies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hetkv_transport::codec::assign::{Assignment, Refused, StateChange};
use hetkv_transport::codec::RowsWriter;
use hetkv_transport::row::{self, RowLayout, DEFAULT_READ_ATTEMPTS};
use hetkv_transport::wire::{F32s, PushRows, U32s, U64s, NO_BASE};
use hetkv_transport::{Produced, Region, Routing, StateShape, TableInfo, TableSpec, TableStats};

use crate::checkpoint::format::{RecordView, TableFileWriter};
use crate::checkpoint::{FileHeader, Kind, RecordShape};
use crate::placement::Placement;
use crate::StoreError;
use hetkv_transport::optimizer::Optimizer;

/// Stripes of row locks per table. Rows go to stripes in groups of [`GROUP`] consecutive rows,
/// round robin: group `g = i / GROUP` is in stripe `g % STRIPES`. Random pushes spread over all
/// stripes, while a checkpoint copies a whole group under one lock, with its optimizer state
/// contiguous in memory and its dirty bits in one word.
const STRIPES: usize = 1024;
/// Consecutive rows per group: the rows of one dirty-bit word.
const GROUP: u64 = 64;

/// The stripe of local row `i` and its slot in that stripe's state.
fn locate(i: u64) -> (usize, usize) {
    let g = i / GROUP;
    let stripe = (g % STRIPES as u64) as usize;
    let slot = (g / STRIPES as u64) * GROUP + i % GROUP;
    (stripe, slot as usize)
}

/// Optimizer state of the rows of one stripe, indexed by slot ([`locate`]).
#[derive(Debug, Default)]
struct StripeState {
    floats: Vec<f32>,
    steps: Vec<u64>,
}

/// A table's rows on one shard.
#[derive(Debug)]
pub struct Table {
    spec: TableSpec,
    layout: RowLayout,
    shard: u32,
    shards: u32,
    /// Where the table's rows live over the cluster (from the spec and `shards`, once).
    routing: Routing,
    local_rows: u64,
    region_id: u32,
    region: Arc<Region>,
    optimizer: Optimizer,
    state_len: usize,
    stripes: Box<[Mutex<StripeState>]>,
    rows_read: AtomicU64,
    rows_pushed: AtomicU64,
    clock: Arc<Region>,
    /// One bit per local row: set by every write under the row's lock, cleared by a checkpoint's
    /// copy under the same lock (docs/CHECKPOINTS.md section 5).
    dirty: Box<[AtomicU64]>,
}

impl Table {
    /// Bytes a table of `spec` needs on shard `shard` of `shards`: its region and its optimizer
    /// state.
    pub fn footprint(spec: &TableSpec, shard: u32, shards: u32) -> u64 {
        let local = spec.local_rows(shard, shards);
        let layout = RowLayout::new(spec.dim);
        let opt = Optimizer::new(spec.optimizer);
        let state =
            (opt.state_len(spec.dim as usize) * 4 + if opt.has_steps() { 8 } else { 0 }) as u64;
        layout
            .region_bytes(local)
            .saturating_add(local.saturating_mul(state))
    }

    /// Creates the table's region where `placement` puts regions and writes every row's initial
    /// value at version 0. `spec` must be valid.
    pub fn create(
        spec: TableSpec,
        shard: u32,
        shards: u32,
        region_id: u32,
        placement: &Placement,
    ) -> Result<Self, StoreError> {
        let table = Self::create_unfilled(spec, shard, shards, region_id, placement)?;
        let mut values = vec![0f32; table.layout.dim()];
        let mut image = vec![0u8; table.layout.stride()];
        for i in 0..table.local_rows {
            table.spec.init.fill(table.global_key(i), &mut values);
            row::encode_image(&table.layout, 0, &values, &mut image);
            row::write_row(table.region.words(), &table.layout, i, &image);
        }
        Ok(table)
    }

    /// Maps the table's region without writing its rows, for a restore that writes every one
    /// (a full checkpoint file holds them all). Every row is dirty until then.
    pub fn create_unfilled(
        spec: TableSpec,
        shard: u32,
        shards: u32,
        region_id: u32,
        placement: &Placement,
    ) -> Result<Self, StoreError> {
        let layout = RowLayout::new(spec.dim);
        let local_rows = spec.local_rows(shard, shards);
        let region = placement.map(shard, &spec.name, "region", layout.region_bytes(local_rows))?;
        // The clock is one word in a region of its own, so that one-sided readers (shared memory,
        // RDMA) can read it beside the rows.
        let clock = placement.map(shard, &spec.name, "clock", 8)?;

        let optimizer = Optimizer::new(spec.optimizer);
        let state_len = optimizer.state_len(spec.dim as usize);
        let stripes: Box<[Mutex<StripeState>]> = (0..STRIPES)
            .map(|s| {
                let rows = stripe_rows(local_rows, s);
                let mut floats = vec![0f32; rows * state_len];
                for chunk in floats.chunks_exact_mut(state_len.max(1)) {
                    optimizer.init_state(chunk);
                }
                let steps = if optimizer.has_steps() {
                    vec![0; rows]
                } else {
                    Vec::new()
                };
                Mutex::new(StripeState { floats, steps })
            })
            .collect();

        let dirty = (0..local_rows.div_ceil(GROUP))
            .map(|_| AtomicU64::new(u64::MAX))
            .collect();
        Ok(Self {
            routing: spec.routing(shards),
            spec,
            layout,
            shard,
            shards,
            local_rows,
            region_id,
            region,
            optimizer,
            state_len,
            stripes,
            rows_read: AtomicU64::new(0),
            rows_pushed: AtomicU64::new(0),
            clock,
            dirty,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// The row layout.
    pub fn layout(&self) -> &RowLayout {
        &self.layout
    }

    /// The region holding the rows.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// This table's region id on its shard.
    pub fn region_id(&self) -> u32 {
        self.region_id
    }

    /// Rows held on this shard.
    pub fn local_rows(&self) -> u64 {
        self.local_rows
    }

    /// The table as listed to clients.
    pub fn info(&self) -> TableInfo {
        TableInfo {
            spec: self.spec.clone(),
            local_rows: self.local_rows,
            stride: self.layout.stride() as u32,
        }
    }

    /// Counters.
    pub fn stats(&self) -> TableStats {
        TableStats {
            name: self.spec.name.clone(),
            rows: self.spec.rows,
            local_rows: self.local_rows,
            dim: self.spec.dim,
            optimizer: self.spec.optimizer.name().to_string(),
            rows_read: self.rows_read.load(Ordering::Relaxed),
            rows_pushed: self.rows_pushed.load(Ordering::Relaxed),
            updates: self.clock(),
        }
    }

    /// The global key of local row `i`.
    pub fn global_key(&self, i: u64) -> u64 {
        self.routing.global_key(self.shard, i)
    }

    /// The local index of global `key`, or why it is not on this shard.
    pub fn local_index(&self, key: u64) -> Result<u64, StoreError> {
        if key >= self.spec.rows {
            return Err(StoreError::KeyOutOfRange(format!(
                "key {key} is outside table {} of {} rows",
                self.spec.name, self.spec.rows
            )));
        }
        let routing = self.routing;
        routing
            .local_on(key, self.shard, self.local_rows)
            .ok_or_else(|| {
                StoreError::KeyOutOfRange(format!(
                    "key {key} lives on shard {}, not on shard {} of {}",
                    routing.shard_of(key),
                    self.shard,
                    self.shards
                ))
            })
    }

    fn stripe(&self, i: u64) -> MutexGuard<'_, StripeState> {
        // A panic while holding a stripe lock can only come from a bug in this module; the row
        // data itself is guarded by its checksum, so carrying on with the inner value is sound.
        self.stripes[locate(i).0]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The shape of a row's optimizer state.
    pub fn state_shape(&self) -> StateShape {
        self.optimizer.state_shape(self.layout.dim())
    }

    /// Reads the local rows `locals`, verified, into an answer's rows (row `j` of `out` is
    /// `locals[j]`), prefetching a few ahead, and counts them as read. The rows whose state the
    /// answer carries (the writer's first [`RowsWriter::state_rows`]) are read with their
    /// optimizer state under their writer's lock, so that value, version and state are of one
    /// moment; the others lock-free.
    pub fn read_rows_into(&self, locals: &[u64], out: &mut RowsWriter<'_>) {
        let mut image = vec![0u8; self.layout.stride()];
        let with_state = out.state_rows();
        for (j, &i) in locals.iter().enumerate() {
            if let Some(&ahead) = locals.get(j + PREFETCH_ROWS) {
                self.prefetch_local(ahead);
            }
            if j < with_state {
                let stripe = self.stripe(i);
                let version = self.read_stable(i, &mut image);
                let (state, step) = self.state_of(&stripe, i);
                out.put(j, version, self.layout.payload(&image));
                out.put_state(j, state, step);
                continue;
            }
            let version = self.read_local(i, &mut image);
            out.put(j, version, self.layout.payload(&image));
        }
        self.count_read(locals.len() as u64);
    }

    /// Reads local row `i` into `image` while holding its writer's lock (so the copy is stable).
    fn read_stable(&self, i: u64, image: &mut [u8]) -> u64 {
        row::read_row(self.region.words(), &self.layout, i, image, 1)
            .expect("a row read under its writer lock is stable")
            .version
    }

    /// Local row `i`'s optimizer state and step count, read under its stripe's lock.
    fn state_of<'s>(&self, stripe: &'s StripeState, i: u64) -> (&'s [f32], u64) {
        let slot = locate(i).1;
        (
            &stripe.floats[slot * self.state_len..(slot + 1) * self.state_len],
            stripe.steps.get(slot).copied().unwrap_or(0),
        )
    }

    /// Hands back local row `i` (entry `n` of a push) at `version` with `w` and its state.
    fn hand_back(
        &self,
        produced: &mut Produced,
        n: usize,
        version: u64,
        w: &[f32],
        state: &[f32],
        step: u64,
    ) {
        produced.indices.push(n as u32);
        produced.versions.push(version);
        produced.rows.extend_from_slice(w);
        produced.states.values.extend_from_slice(state);
        if self.optimizer.has_steps() {
            produced.states.steps.push(step);
        }
    }

    /// For a push that was applied before (a repeat): hands back, for every entry with a base,
    /// the row as it is now wherever its version is not the base plus the entry's count (another
    /// update came since, or it was never this push's to produce).
    pub fn hand_back_current(&self, locals: &[u64], rows: &PushRows<'_>, produced: &mut Produced) {
        let mut image = vec![0u8; self.layout.stride()];
        let mut w = vec![0f32; self.layout.dim()];
        for (n, &i) in locals.iter().enumerate() {
            let base = rows.base(n);
            if base == NO_BASE {
                continue;
            }
            let stripe = self.stripe(i);
            let version = self.read_stable(i, &mut image);
            if version == base.saturating_add(rows.counts.get(n) as u64) {
                continue;
            }
            row::decode_payload(&self.layout, &image, &mut w);
            let (state, step) = self.state_of(&stripe, i);
            self.hand_back(produced, n, version, &w, state, step);
        }
    }

    /// Reads local row `i` into `image` (one stride), verified; returns its version. Falls back to
    /// the row's lock when copies keep tearing (a writer hammering the row).
    pub fn read_local(&self, i: u64, image: &mut [u8]) -> u64 {
        match row::read_row(
            self.region.words(),
            &self.layout,
            i,
            image,
            DEFAULT_READ_ATTEMPTS,
        ) {
            Ok(r) => r.version,
            Err(_) => {
                let _guard = self.stripe(i);
                row::read_row(self.region.words(), &self.layout, i, image, 1)
                    .expect("a row read under its writer lock is stable")
                    .version
            }
        }
    }

    /// Asks the CPU to start loading local row `i` (a gather of random rows overlaps their misses).
    pub fn prefetch_local(&self, i: u64) {
        row::prefetch_row(self.region.words(), &self.layout, i);
    }

    /// The version of local row `i` (a lower bound while a write is under way).
    pub fn version_local(&self, i: u64) -> u64 {
        row::version_of(row::read_seq(self.region.words(), &self.layout, i))
    }

    /// The table's clock on this shard: updates applied so far. Every push counts its updates here
    /// before it changes any row, so a row version seen after reading the clock is never ahead of
    /// what the clock accounts for.
    pub fn clock(&self) -> u64 {
        self.clock_word().load(Ordering::Acquire)
    }

    fn clock_word(&self) -> &AtomicU64 {
        &self.clock.words()[0]
    }

    /// The region holding the clock word (file-backed beside the rows when they are).
    pub fn clock_region(&self) -> &Arc<Region> {
        &self.clock
    }

    /// Counts rows served to readers.
    pub fn count_read(&self, rows: u64) {
        self.rows_read.fetch_add(rows, Ordering::Relaxed);
    }

    /// Validates a whole push without changing anything: returns the local indices.
    pub fn validate_push(
        &self,
        keys: U64s<'_>,
        counts: U32s<'_>,
        grads: F32s<'_>,
    ) -> Result<Vec<u64>, StoreError> {
        let dim = self.layout.dim();
        if counts.len() != keys.len() {
            return Err(StoreError::Malformed(format!(
                "{} keys but {} counts",
                keys.len(),
                counts.len()
            )));
        }
        if grads.len() != keys.len() * dim {
            return Err(StoreError::WrongDim(format!(
                "table {} has dim {dim}: {} gradient values do not make {} rows",
                self.spec.name,
                grads.len(),
                keys.len()
            )));
        }
        let locals = keys
            .iter()
            .map(|k| self.local_index(k))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(i) = (0..counts.len()).find(|&i| counts.get(i) == 0) {
            return Err(StoreError::InvalidGradient(format!(
                "row {i} (key {}) has an update count of 0",
                keys.get(i)
            )));
        }
        if let Some(pos) = grads.iter().position(|g| !g.is_finite()) {
            return Err(StoreError::InvalidGradient(format!(
                "gradient for key {} holds {} at element {}; nothing was applied",
                keys.get(pos / dim),
                grads.get(pos),
                pos % dim
            )));
        }
        Ok(locals)
    }

    /// Applies a validated push (`locals` from [`Table::validate_push`]); returns the updates
    /// applied. Entries for the same row apply in message order. Where an entry carries a base
    /// version and the row's version before it is applied is another, the row it produces is
    /// handed back in `produced` (value, version, optimizer state).
    pub fn apply_push(&self, locals: &[u64], rows: &PushRows<'_>, produced: &mut Produced) -> u64 {
        let (counts, grads) = (rows.counts, rows.grads);
        let dim = self.layout.dim();
        // The clock moves before any row does (see `clock`).
        let total: u64 = (0..locals.len()).map(|n| counts.get(n) as u64).sum();
        self.clock_word().fetch_add(total, Ordering::AcqRel);
        let mut w = vec![0f32; dim];
        let mut g = vec![0f32; dim];
        let mut image = vec![0u8; self.layout.stride()];
        let mut updates = 0u64;
        for (n, &i) in locals.iter().enumerate() {
            if let Some(&ahead) = locals.get(n + PREFETCH_ROWS) {
                self.prefetch_local(ahead);
            }
            let count = counts.get(n) as u64;
            grads.copy_to(n * dim, &mut g);
            let mut stripe = self.stripe(i);
            // Under the stripe lock this thread is the row's only writer, so the copy is stable.
            let version = self.read_stable(i, &mut image);
            row::decode_payload(&self.layout, &image, &mut w);
            let slot = locate(i).1;
            let StripeState { floats, steps } = &mut *stripe;
            let state = &mut floats[slot * self.state_len..(slot + 1) * self.state_len];
            let mut scratch_step = 0;
            let step = steps.get_mut(slot).unwrap_or(&mut scratch_step);
            self.optimizer.apply(&mut w, &g, state, step);
            let new_version = version.saturating_add(count);
            row::encode_image(&self.layout, new_version, &w, &mut image);
            row::write_row(self.region.words(), &self.layout, i, &image);
            self.mark_dirty(i);
            let base = rows.base(n);
            if base != NO_BASE && base != version {
                self.hand_back(produced, n, new_version, &w, state, *step);
            }
            drop(stripe);
            updates += count;
        }
        self.rows_pushed
            .fetch_add(locals.len() as u64, Ordering::Relaxed);
        debug_assert_eq!(updates, total);
        updates
    }

    /// Marks local row `i` changed; called under the row's stripe lock (the lock of its whole
    /// dirty word's group).
    fn mark_dirty(&self, i: u64) {
        self.dirty[(i / GROUP) as usize].fetch_or(1 << (i % GROUP), Ordering::Release);
    }

    /// Whether local row `i` changed since a checkpoint copied it (lock-free: a write sets the
    /// bit before it releases the row's lock).
    fn is_dirty(&self, i: u64) -> bool {
        self.dirty[(i / GROUP) as usize].load(Ordering::Acquire) & (1 << (i % GROUP)) != 0
    }

    /// Validates an assignment without changing anything ([`Assignment::check`]): returns the
    /// local indices.
    pub fn validate_assign(&self, rows: &Assignment<'_>) -> Result<Vec<u64>, StoreError> {
        check_assignment(rows, self.layout.dim(), &self.optimizer)?;
        rows.keys.iter().map(|&k| self.local_index(k)).collect()
    }

    /// Sets validated rows (`locals`, from [`Table::validate_assign`] of `rows`): each row's value
    /// (or kept) and its optimizer state as `rows` says, under its writer lock; each is one
    /// update (its version and the clock grow by one, so caches see the change).
    pub fn apply_assign(&self, locals: &[u64], rows: &Assignment<'_>) {
        let dim = self.layout.dim();
        let len = self.state_len;
        self.clock_word()
            .fetch_add(locals.len() as u64, Ordering::AcqRel);
        let mut w = vec![0f32; dim];
        let mut image = vec![0u8; self.layout.stride()];
        for (n, &i) in locals.iter().enumerate() {
            let mut stripe = self.stripe(i);
            let version = row::read_row(self.region.words(), &self.layout, i, &mut image, 1)
                .expect("a row read under its writer lock is stable")
                .version;
            match rows.values {
                Some(values) => w.copy_from_slice(&values[n * dim..(n + 1) * dim]),
                None => row::decode_payload(&self.layout, &image, &mut w),
            }
            let slot = locate(i).1;
            let StripeState { floats, steps } = &mut *stripe;
            let row_state = &mut floats[slot * len..(slot + 1) * len];
            match rows.state {
                StateChange::Keep => {}
                StateChange::Reset => {
                    self.optimizer.init_state(row_state);
                    if let Some(step) = steps.get_mut(slot) {
                        *step = 0;
                    }
                }
                StateChange::Set {
                    values: set,
                    steps: set_steps,
                } => {
                    row_state.copy_from_slice(&set[n * len..(n + 1) * len]);
                    if let Some(step) = steps.get_mut(slot) {
                        *step = set_steps[n];
                    }
                }
            }
            row::encode_image(&self.layout, version.saturating_add(1), &w, &mut image);
            row::write_row(self.region.words(), &self.layout, i, &image);
            self.mark_dirty(i);
        }
    }

    /// The header of this table's file in a checkpoint of `kind`, the clock read now.
    pub fn checkpoint_header(&self, kind: Kind) -> FileHeader {
        FileHeader {
            kind,
            shard: self.shard,
            shards: self.shards,
            local_rows: self.local_rows,
            clock_start: self.clock(),
            spec: self.spec.clone(),
            shape: RecordShape::of(&self.spec),
        }
    }

    /// Copies rows into a checkpoint file, in local-index order, clearing their dirty bits:
    /// every row for a full file, the dirty ones for an incremental one. Each group of
    /// 64 rows is copied under its stripe's lock (so every record is value, version and
    /// optimizer state of one moment) into scratch memory, and encoded after the lock is
    /// released, so a writer that waits for the disk never holds a row. Pushes go on meanwhile.
    pub fn snapshot_into<W: std::io::Write>(
        &self,
        kind: Kind,
        out: &mut TableFileWriter<W>,
    ) -> std::io::Result<()> {
        let shape = RecordShape::of(&self.spec);
        let stride = self.layout.stride();
        let n_max = GROUP as usize;
        let mut images = vec![0u8; n_max * stride];
        let mut states = vec![0f32; n_max * self.state_len];
        let mut versions = [0u64; GROUP as usize];
        let mut steps = [0u64; GROUP as usize];
        for g in 0..self.local_rows.div_ceil(GROUP) {
            let word = &self.dirty[g as usize];
            if kind == Kind::Incremental && word.load(Ordering::Acquire) == 0 {
                continue;
            }
            let first = g * GROUP;
            let n = (self.local_rows - first).min(GROUP) as usize;
            let copied = {
                let stripe = self.stripe(first);
                // Every write to these rows sets its bit under this lock: the bits are exact.
                let bits = word.swap(0, Ordering::AcqRel);
                let take = if kind == Kind::Full { u64::MAX } else { bits };
                for k in (0..n).filter(|k| take & (1 << k) != 0) {
                    let i = first + k as u64;
                    let image = &mut images[k * stride..(k + 1) * stride];
                    versions[k] = row::read_row(self.region.words(), &self.layout, i, image, 1)
                        .expect("a row read under its writer lock is stable")
                        .version;
                    let slot = locate(i).1;
                    states[k * self.state_len..(k + 1) * self.state_len].copy_from_slice(
                        &stripe.floats[slot * self.state_len..(slot + 1) * self.state_len],
                    );
                    steps[k] = stripe.steps.get(slot).copied().unwrap_or(0);
                }
                take
            };
            for k in (0..n).filter(|k| copied & (1 << k) != 0) {
                let room = out.next_record(first + k as u64)?;
                shape.encode(
                    first + k as u64,
                    versions[k],
                    self.layout.payload(&images[k * stride..(k + 1) * stride]),
                    &states[k * self.state_len..(k + 1) * self.state_len],
                    steps[k],
                    room,
                );
            }
        }
        Ok(())
    }

    /// Writes one record of a checkpoint into local row `rec.index()`: its value, version and
    /// optimizer state, clearing its dirty bit. For a table not yet served; `image` is scratch.
    pub fn restore_record(&self, rec: &RecordView<'_>, image: &mut Vec<u8>) {
        let i = rec.index();
        image.resize(self.layout.stride(), 0);
        image[..row::SEQ_BYTES].copy_from_slice(&row::seq_of(rec.version()).to_le_bytes());
        image[row::SEQ_BYTES..row::SEQ_BYTES + 4 * self.layout.dim()]
            .copy_from_slice(rec.value_bytes());
        row::seal_image(&self.layout, image);
        let mut stripe = self.stripe(i);
        let slot = locate(i).1;
        let StripeState { floats, steps } = &mut *stripe;
        rec.state_into(&mut floats[slot * self.state_len..(slot + 1) * self.state_len]);
        if let Some(step) = steps.get_mut(slot) {
            *step = rec.step();
        }
        row::write_row(self.region.words(), &self.layout, i, image);
        drop(stripe);
        self.dirty[(i / GROUP) as usize].fetch_and(!(1 << (i % GROUP)), Ordering::AcqRel);
    }

    /// After a restore: sets the clock to the sum of the rows' versions; fails if a row was not
    /// restored (a chain that did not cover the table).
    pub fn finish_restore(&self) -> Result<u64, StoreError> {
        if let Some(i) = (0..self.local_rows).find(|&i| self.is_dirty(i)) {
            return Err(StoreError::Io(format!(
                "table {}: local row {i} is in no checkpoint file of the chain",
                self.spec.name
            )));
        }
        let clock = (0..self.local_rows)
            .try_fold(0u64, |sum, i| sum.checked_add(self.version_local(i)))
            .filter(|&c| c <= row::MAX_VERSION)
            .ok_or_else(|| {
                StoreError::Io(format!(
                    "table {}: the restored rows' versions sum above the largest clock ({})",
                    self.spec.name,
                    row::MAX_VERSION
                ))
            })?;
        self.clock_word().store(clock, Ordering::Release);
        Ok(clock)
    }

    /// The optimizer state of local row `i` (floats, step), for tests and inspection.
    pub fn optimizer_state(&self, i: u64) -> (Vec<f32>, u64) {
        let stripe = self.stripe(i);
        let slot = locate(i).1;
        let floats = stripe.floats[slot * self.state_len..(slot + 1) * self.state_len].to_vec();
        (floats, stripe.steps.get(slot).copied().unwrap_or(0))
    }
}

/// Rows a push or a gather prefetches ahead of the one it works on.
pub(crate) const PREFETCH_ROWS: usize = 8;

/// Slots of stripe `s` in a table of `local_rows` rows (one per row of the stripe).
fn stripe_rows(local_rows: u64, s: usize) -> usize {
    let groups = local_rows.div_ceil(GROUP);
    let s = s as u64;
    if s >= groups {
        return 0;
    }
    let mine = (groups - s).div_ceil(STRIPES as u64);
    let last = s + (mine - 1) * STRIPES as u64;
    ((mine - 1) * GROUP + (local_rows - last * GROUP).min(GROUP)) as usize
}

/// [`Assignment::check`] for a table of `dim` under `optimizer`, as the store's error.
pub(crate) fn check_assignment(
    rows: &Assignment<'_>,
    dim: usize,
    optimizer: &Optimizer,
) -> Result<(), StoreError> {
    rows.check(dim, optimizer).map_err(|e| match e {
        Refused::Shape(m) => StoreError::WrongDim(m),
        Refused::Value { key, what } => {
            StoreError::InvalidGradient(format!("key {key}: {what}; nothing was assigned"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_has_its_own_slot_within_its_stripe() {
        for rows in [0u64, 1, 63, 64, 65, 1000, 64 * 1024, 64 * 1024 + 1, 200_001] {
            let sizes: Vec<usize> = (0..STRIPES).map(|s| stripe_rows(rows, s)).collect();
            assert_eq!(sizes.iter().sum::<usize>() as u64, rows, "{rows} rows");
            let mut seen = std::collections::HashSet::new();
            for i in 0..rows {
                let (stripe, slot) = locate(i);
                assert!(
                    slot < sizes[stripe],
                    "row {i} of {rows}: slot {slot} of {}",
                    sizes[stripe]
                );
                assert!(seen.insert((stripe, slot)), "row {i} shares a slot");
            }
        }
    }
}
