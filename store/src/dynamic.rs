//! A dynamic table's rows on one shard: any u64 key, a row created from the table's initializer
//! when a key is admitted, at most the capacity, and a full bucket giving up its lowest score.
//!
//! Built on the region layout of [`hetkv_transport::keyed`]: the region holds the buckets and the
//! keyed rows, so reads (the daemon's threads here, one-sided readers elsewhere) never take a
//! lock. Writers lock the key's bucket: a push applies, admits, evicts and publishes under it, so
//! a slot is given to another key only after every push that reached its old key was applied.
//! Optimizer state and scores live beside each bucket, outside the region.
//!
//! Evictions are a stream: each is logged once, under its bucket's lock, with a cursor (the count
//! of evictions before it), and [`DynamicRows::evictions`] reads the stream from a cursor. The log
//! keeps the last [`EVICTION_LOG`] entries; a reader that falls further behind is told by how
//! much, never given a gap silently.
//!
//! A [`DynamicTable`] is such rows as a shard serves them: keys checked against the table's
//! routing (by hashed bucket, `hetkv_transport::Routing`), pulls and pushes over the protocol,
//! statistics, and checkpoints (every held row, or in an incremental one the slots written since
//! its parent; one record per key with its state and score,
//! copied bucket by bucket under the bucket's lock). Its region and clock word are described to
//! one-sided readers (`keyed::SpanFind`), and each slot carries the birth stamp of its key's
//! incarnation, which caches check with versions ([`DynamicRows::held_row`]). A table with a
//! time to live expires rows not updated within it when its clients move its training step
//! ([`DynamicRows::advance_step`]): the only way a slot empties.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hetkv_transport::codec::assign::{Assignment, StateChange};
use hetkv_transport::keyed::{
    KeyedLayout, KeyedRegion, Placement as Slot, BUCKET_BYTES, BUCKET_SLOTS,
};
use hetkv_transport::row::RowLayout;
use hetkv_transport::row::{self, DEFAULT_READ_ATTEMPTS};
use hetkv_transport::sketch::FrequencySketch;
use hetkv_transport::wire::{U64s, NO_BASE};
use hetkv_transport::{
    hash, Admission, Eviction, Initializer, Optimizer, Produced, Region, TableInfo, TableSpec,
    TableStats,
};

use crate::checkpoint::format::{FileHeader, Kind, RecordShape, RecordView, TableFileWriter};
use crate::placement::Placement;
use crate::table::check_assignment;
use crate::StoreError;

/// Evictions the stream keeps for readers that lag.
pub const EVICTION_LOG: usize = 1 << 16;
/// Bytes one logged eviction takes.
const LOGGED_BYTES: u64 = 24;
/// The admission sketch halves every this many counted updates per row of capacity.
const AGING_PERIOD: u64 = 10;

/// One eviction: the key that left, its row's version then, and its score (the protocol's
/// record of it, op 14).
pub use hetkv_transport::wire::EvictedKey as Evicted;

/// A page of the eviction stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evictions {
    /// Evictions from the cursor asked for, oldest first.
    pub events: Vec<Evicted>,
    /// The cursor of the next eviction: where the next read starts.
    pub next: u64,
}

/// Why the eviction stream cannot be read from a cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// The log no longer holds the evictions from `cursor`: `lost` were dropped unread.
    #[error(
        "eviction cursor {cursor} fell behind: the log starts at {oldest}, so {lost} evictions \
         were dropped unread"
    )]
    Behind {
        /// The cursor asked for.
        cursor: u64,
        /// The oldest cursor the log holds.
        oldest: u64,
        /// Evictions between them.
        lost: u64,
    },
    /// No eviction has that cursor yet.
    #[error("eviction cursor {cursor} is past the stream's end ({next})")]
    Ahead {
        /// The cursor asked for.
        cursor: u64,
        /// The cursor of the next eviction.
        next: u64,
    },
}

/// What a push did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Updates applied (the sum of the applied rows' counts).
    pub applied: u64,
    /// Keys admitted by this push.
    pub admitted: u64,
    /// Rows evicted to make room.
    pub evicted: u64,
    /// Keys not admitted, with the update counts dropped for each, in push order.
    pub refused: Vec<(u64, u32)>,
    /// Their rows' indices in the push, ascending.
    pub refused_rows: Vec<u32>,
}

impl PushReport {
    /// The updates dropped with the refused keys.
    pub fn refused_updates(&self) -> u64 {
        self.refused.iter().map(|&(_, c)| u64::from(c)).sum()
    }
}

/// Scores and optimizer state of one bucket's slots.
#[derive(Debug)]
struct BucketState {
    scores: [u64; BUCKET_SLOTS],
    state: Vec<f32>,
    steps: [u64; BUCKET_SLOTS],
    /// Each slot's birth stamp: the incarnation of the key it holds, given when the key took the
    /// slot (never reused by this shard's daemon).
    born: [u64; BUCKET_SLOTS],
    /// Bit `e`: entry `e` was written since the last checkpoint copied this bucket (set by every
    /// write, cleared by the copy, both under the bucket's lock), so an incremental checkpoint
    /// holds exactly the slots written since its parent.
    dirty: u32,
}

/// Where and how a row is written ([`DynamicRows::store`]): its slot (and entry in its bucket),
/// whether its key already held it, its new version and the updates that made it.
#[derive(Clone, Copy, Debug)]
struct Stored {
    slot: u64,
    /// The slot's entry in its bucket.
    entry: usize,
    resident: bool,
    version: u64,
    count: u32,
}

/// A held row as read under its bucket's lock, for a cache: its version, the stamp of its key's
/// incarnation and its Adam step (its values and optimizer state go where the caller asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldRow {
    /// The row's version.
    pub version: u64,
    /// The birth stamp of its key's incarnation: a key evicted and admitted again has a new one.
    pub born: u64,
    /// Its Adam step (0 for other optimizers).
    pub step: u64,
}

/// The state of an admission rule that keeps one (`always` keeps none, so its pushes take no
/// lock to admit).
#[derive(Debug)]
enum Admitter {
    Threshold { sketch: FrequencySketch, count: u8 },
    Probability { p: f32, stream: u64 },
}

impl Admitter {
    fn new(admission: Admission, capacity: u64) -> Option<Self> {
        Some(match admission {
            Admission::Always => return None,
            Admission::Threshold { count } => Self::Threshold {
                sketch: FrequencySketch::new(
                    capacity as usize,
                    AGING_PERIOD.saturating_mul(capacity.max(64)),
                ),
                count,
            },
            Admission::Probability { p, seed } => Self::Probability { p, stream: seed },
        })
    }

    /// Counts `updates` of `key`, not held, and says whether it is admitted now.
    fn admit(&mut self, key: u64, updates: u32) -> bool {
        match self {
            Self::Threshold { sketch, count } => {
                let mut estimate = 0;
                for _ in 0..updates.min(u32::from(u8::MAX)) {
                    estimate = sketch.count(key).1;
                }
                estimate >= *count
            }
            Self::Probability { p, stream } => {
                // One draw per pushed row of a key not held: SplitMix64 of a counter.
                *stream = stream.wrapping_add(1);
                let draw = hash::splitmix64(*stream);
                ((draw >> 11) as f64 / (1u64 << 53) as f64) < f64::from(*p)
            }
        }
    }

    /// Bytes `admission`'s state takes for a table of `capacity` rows.
    fn bytes(admission: Admission, capacity: u64) -> u64 {
        match admission {
            Admission::Threshold { .. } => FrequencySketch::bytes_for(capacity as usize) as u64,
            _ => 0,
        }
    }
}

/// The log behind the eviction stream.
#[derive(Debug, Default)]
struct EvictionLog {
    entries: VecDeque<Evicted>,
    /// The cursor of `entries[0]`.
    first: u64,
}

/// A dynamic table's rows on one shard.
#[derive(Debug)]
pub struct DynamicRows {
    dim: usize,
    init: Initializer,
    optimizer: Optimizer,
    state_len: usize,
    eviction: Eviction,
    layout: KeyedLayout,
    region: Arc<Region>,
    buckets: Box<[Mutex<BucketState>]>,
    admission: Option<Mutex<Admitter>>,
    log: Mutex<EvictionLog>,
    /// Updates applied (the clock of LRU scores): one word in a region of its own, as a fixed
    /// table's, so that one-sided readers read it too.
    clock: Arc<Region>,
    /// The training step its clients last announced (`Eviction::Ttl`'s clock; op 18).
    step: AtomicU64,
    /// The horizon the last expiry sweep reached: every client of a table announces each step,
    /// and only the first announcement of a step sweeps (the others wait for that sweep).
    swept: Mutex<u64>,
    /// The next birth stamp (from 1: 0 means a key not held).
    births: AtomicU64,
    resident: AtomicU64,
    refused_updates: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under the lock cannot leave a bucket half-written for readers (the row and bucket
    // writes verify or are refused), so a poisoned lock is taken over.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DynamicRows {
    /// Bytes the rows of `table` (a dynamic table's spec) take in a region of `layout`:
    /// [`bytes_per_bucket`] for every bucket, the admission sketch and the eviction log.
    pub fn footprint(table: &TableSpec, layout: &KeyedLayout) -> u64 {
        let Some(spec) = table.dynamic else {
            return u64::MAX;
        };
        layout
            .buckets()
            .saturating_mul(bytes_per_bucket(table))
            .saturating_add(Admitter::bytes(spec.admission, layout.capacity()))
            .saturating_add(EVICTION_LOG as u64 * LOGGED_BYTES)
    }

    /// The rows of dynamic table `table` on shard `shard`, in a region of `layout` (of the
    /// table's dim) that `placement` maps: every bucket empty, nothing admitted.
    pub fn create(
        table: &TableSpec,
        shard: u32,
        layout: KeyedLayout,
        placement: &Placement,
    ) -> Result<Self, StoreError> {
        table.validate().map_err(|e| StoreError::InvalidSpec(e.0))?;
        let spec = table.dynamic.ok_or_else(|| {
            StoreError::InvalidSpec(format!("table {} is not dynamic", table.name))
        })?;
        let (dim, init, optimizer) = (table.dim, table.init, table.optimizer);
        if layout.row().dim() != dim as usize {
            return Err(StoreError::InvalidSpec(format!(
                "table {} has rows of {dim}, its layout rows of {}",
                table.name,
                layout.row().dim()
            )));
        }
        let region = placement.map(shard, &table.name, "region", layout.region_bytes())?;
        KeyedRegion::new(&layout, region.words()).format();
        let clock = placement.map(shard, &table.name, "clock", 8)?;
        let optimizer = Optimizer::new(optimizer);
        let state_len = optimizer.state_len(dim as usize);
        let buckets = (0..layout.buckets())
            .map(|_| {
                Mutex::new(BucketState {
                    scores: [0; BUCKET_SLOTS],
                    state: vec![0.0; BUCKET_SLOTS * state_len],
                    steps: [0; BUCKET_SLOTS],
                    born: [0; BUCKET_SLOTS],
                    dirty: 0,
                })
            })
            .collect();
        Ok(Self {
            dim: dim as usize,
            init,
            optimizer,
            state_len,
            eviction: spec.eviction,
            layout,
            region,
            buckets,
            admission: Admitter::new(spec.admission, layout.capacity()).map(Mutex::new),
            log: Mutex::new(EvictionLog::default()),
            clock,
            step: AtomicU64::new(0),
            swept: Mutex::new(0),
            births: AtomicU64::new(1),
            resident: AtomicU64::new(0),
            refused_updates: AtomicU64::new(0),
        })
    }

    /// The region's layout.
    pub fn layout(&self) -> &KeyedLayout {
        &self.layout
    }

    /// The region (buckets and keyed rows), as one-sided readers see it.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// The region holding the clock word (file-backed beside the rows when they are).
    pub fn clock_region(&self) -> &Arc<Region> {
        &self.clock
    }

    /// Updates applied so far. A push counts each row's updates here before it writes the row,
    /// so a version read after the clock is never ahead of what the clock accounts for.
    pub fn clock(&self) -> u64 {
        self.clock_word().load(Ordering::Acquire)
    }

    fn clock_word(&self) -> &AtomicU64 {
        &self.clock.words()[0]
    }

    /// Rows held now.
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// Updates dropped because their key was not admitted.
    pub fn refused_updates(&self) -> u64 {
        self.refused_updates.load(Ordering::Relaxed)
    }

    /// Writes `key`'s row into `out` (dim values) and returns its version; a key not held reads
    /// as its initial value at version 0. Never waits for a writer unless a row keeps changing
    /// under the reader for [`DEFAULT_READ_ATTEMPTS`] copies (then it reads under the bucket's
    /// lock).
    pub fn read(&self, key: u64, out: &mut [f32]) -> Result<u64, StoreError> {
        if out.len() != self.dim {
            return Err(StoreError::WrongDim(format!(
                "a row of this table has {} values, not {}",
                self.dim,
                out.len()
            )));
        }
        let mut image = vec![0u8; self.layout.row().stride()];
        match self.find(key, &mut image)? {
            Some(version) => {
                row::decode_payload(self.layout.row(), &image, out);
                Ok(version)
            }
            None => {
                self.init.fill(key, out);
                Ok(0)
            }
        }
    }

    /// The held rows of `keys` as stored bytes, each handed to `put(j, Some((version,
    /// payload)))` (dim f32, little-endian), a key not held as `put(j, None)`: a batch's lookups
    /// with their memory loaded ahead ([`KeyedRegion::find_batch`]). Should a row keep changing
    /// under the batch's reader, the batch is read again key by key, each under its bucket's
    /// lock at worst.
    pub fn read_batch(
        &self,
        keys: &[u64],
        mut put: impl FnMut(usize, Option<(u64, &[u8])>),
    ) -> Result<(), StoreError> {
        let layout = *self.layout.row();
        let mut image = vec![0u8; layout.stride()];
        let keyed = KeyedRegion::new(&self.layout, self.region.words());
        let batch = keyed.find_batch(
            keys,
            &mut image,
            DEFAULT_READ_ATTEMPTS,
            |j, found, image| put(j, found.map(|at| (at.version, layout.payload(image)))),
        );
        if batch.is_err() {
            for (j, &key) in keys.iter().enumerate() {
                let found = self.find(key, &mut image)?;
                put(j, found.map(|version| (version, layout.payload(&image))));
            }
        }
        Ok(())
    }

    /// `key`'s verified row image in `image` and its version, or `None` when the key is not
    /// held. Lock-free unless the row keeps changing for [`DEFAULT_READ_ATTEMPTS`] copies.
    fn find(&self, key: u64, image: &mut [u8]) -> Result<Option<u64>, StoreError> {
        let keyed = KeyedRegion::new(&self.layout, self.region.words());
        let found = match keyed.find(key, image, DEFAULT_READ_ATTEMPTS) {
            Ok(found) => found,
            Err(_) => {
                let _writer = lock(&self.buckets[self.layout.bucket_of(key) as usize]);
                keyed
                    .find(key, image, 1)
                    .map_err(|e| StoreError::Io(format!("row of key {key} under its lock: {e}")))?
            }
        };
        Ok(found.map(|at| at.version))
    }

    /// Applies a checked push's `(key, count, gradient)` rows: a held key takes the optimizer's
    /// step; a key not held is admitted or refused by the table's rule (its updates dropped and
    /// reported), and an admitted key's row starts from its initial value, taking the slot of its
    /// bucket's lowest score when the bucket is full. With `produced` and the rows' base versions
    /// (a cache's push; [`hetkv_transport::wire::NO_BASE`] for a row it holds no line of), the
    /// rows a line cannot work out itself are handed back as the push left them, with their birth
    /// stamps: a row whose version before the push was not its base, a key this push admitted
    /// (its line holds it as not held, stamp 0), and a key refused (as version 0, zeros, the
    /// initial optimizer state and stamp 0: what a pull of it answers, so the line drops the step
    /// it took). A line of another incarnation whose base happens to match is not told here: its
    /// stamp is checked at its next lookup, and a dynamic table's lookups check every hit.
    pub fn push(
        &self,
        push: &DecodedPush,
        mut produced: Option<(&mut Produced, U64s<'_>)>,
    ) -> Result<PushReport, StoreError> {
        if push.dim != self.dim {
            return Err(StoreError::WrongDim(format!(
                "rows of {} values pushed to rows of {}",
                push.dim, self.dim
            )));
        }
        let mut report = PushReport::default();
        let keyed = KeyedRegion::new(&self.layout, self.region.words());
        let layout = *self.layout.row();
        let mut image = vec![0u8; layout.stride()];
        let mut w = vec![0f32; self.dim];
        for (n, (&key, &count)) in push.keys.iter().zip(&push.counts).enumerate() {
            let g = &push.grads[n * self.dim..(n + 1) * self.dim];
            let (mut b, first, placed) = self.lock_placed(&keyed, key, &mut image)?;
            let (slot, version) = match placed {
                Slot::Resident { slot, version } => {
                    row::decode_payload(&layout, &image, &mut w);
                    (slot, version)
                }
                Slot::Free(slot) | Slot::Evict { slot, .. } => {
                    let admitted = match &self.admission {
                        None => true,
                        Some(rule) => lock(rule).admit(key, count),
                    };
                    if !admitted {
                        self.refused_updates
                            .fetch_add(u64::from(count), Ordering::Relaxed);
                        report.refused.push((key, count));
                        report.refused_rows.push(n as u32);
                        if let Some((p, bases)) = produced.as_mut() {
                            if bases.get(n) != NO_BASE {
                                self.hand_back_absent(p, n);
                            }
                        }
                        continue;
                    }
                    report.evicted += u64::from(self.take_slot(&mut b, placed, first));
                    report.admitted += 1;
                    self.init.fill(key, &mut w);
                    (slot, 0)
                }
            };
            let entry = (slot - first) as usize;
            let len = self.state_len;
            let BucketState { state, steps, .. } = &mut *b;
            self.optimizer.apply(
                &mut w,
                g,
                &mut state[entry * len..(entry + 1) * len],
                &mut steps[entry],
            );
            let before = version;
            let version = version.saturating_add(u64::from(count));
            let stored = Stored {
                slot,
                entry,
                resident: matches!(placed, Slot::Resident { .. }),
                version,
                count,
            };
            self.store(&keyed, &mut b, key, stored, &w, &mut image);
            if let Some((p, bases)) = produced.as_mut() {
                let admitted = !matches!(placed, Slot::Resident { .. });
                let base = bases.get(n);
                if base != NO_BASE && (admitted || base != before) {
                    let state = &b.state[entry * len..(entry + 1) * len];
                    let held = HeldRow {
                        version,
                        born: b.born[entry],
                        step: b.steps[entry],
                    };
                    self.hand_back(p, n, held, &w, state);
                }
            }
            report.applied += u64::from(count);
        }
        Ok(report)
    }

    /// Sets the rows of `keys` (an import, a warm start, a model's or an optimizer's state
    /// loaded): each key is admitted whatever the table's rule (an assignment names the rows it
    /// wants), taking the slot of its bucket's lowest score when the bucket is full; its value
    /// becomes its row of `rows.values` (or stays: a key admitted here takes its initial value)
    /// and its optimizer state follows `rows.state` (a key admitted here starts it again unless
    /// it is set).
    /// Each row becomes one update (its version and the clock grow by one). Nothing is set when
    /// [`Assignment::check`](hetkv_transport::codec::assign::Assignment::check) refuses. Returns the rows set.
    pub fn assign(&self, rows: &Assignment<'_>) -> Result<u64, StoreError> {
        check_assignment(rows, self.dim, &self.optimizer)?;
        let Assignment {
            keys,
            values,
            state,
        } = *rows;
        let keyed = KeyedRegion::new(&self.layout, self.region.words());
        let mut image = vec![0u8; self.layout.row().stride()];
        let mut w = vec![0f32; self.dim];
        let len = self.state_len;
        for (n, &key) in keys.iter().enumerate() {
            let (mut b, first, placed) = self.lock_placed(&keyed, key, &mut image)?;
            let (slot, version) = match placed {
                Slot::Resident { slot, version } => {
                    row::decode_payload(self.layout.row(), &image, &mut w);
                    (slot, version.saturating_add(1))
                }
                Slot::Free(slot) | Slot::Evict { slot, .. } => {
                    self.take_slot(&mut b, placed, first);
                    self.init.fill(key, &mut w);
                    (slot, 1)
                }
            };
            if let Some(values) = values {
                w.copy_from_slice(&values[n * self.dim..(n + 1) * self.dim]);
            }
            let entry = (slot - first) as usize;
            match state {
                StateChange::Keep => {}
                StateChange::Reset => self.restart_state(&mut b, entry),
                StateChange::Set { values: set, steps } => {
                    b.state[entry * len..(entry + 1) * len]
                        .copy_from_slice(&set[n * len..(n + 1) * len]);
                    b.steps[entry] = steps.get(n).copied().unwrap_or(0);
                }
            }
            let stored = Stored {
                slot,
                entry,
                resident: matches!(placed, Slot::Resident { .. }),
                version,
                count: 1,
            };
            self.store(&keyed, &mut b, key, stored, &w, &mut image);
        }
        Ok(keys.len() as u64)
    }

    /// Locks `key`'s bucket and says where the key goes in it ([`KeyedRegion::place`] by the
    /// bucket's scores; `image` is left holding a resident's or a victim's row): the bucket's
    /// guard, its first slot and the placement.
    fn lock_placed(
        &self,
        keyed: &KeyedRegion<'_>,
        key: u64,
        image: &mut [u8],
    ) -> Result<(MutexGuard<'_, BucketState>, u64, Slot), StoreError> {
        let bucket = self.layout.bucket_of(key);
        let first = self.layout.first_slot(bucket);
        let b = lock(&self.buckets[bucket as usize]);
        let placed = keyed
            .place(key, |s| b.scores[(s - first) as usize], image)
            .map_err(|e| StoreError::Io(format!("a row of key {key}'s bucket: {e}")))?;
        Ok((b, first, placed))
    }

    /// Writes `key`'s row `w` as `stored` says, in its locked bucket `b`: its updates are
    /// counted first (the clock moves before the row does, see `clock`, and the slot's score
    /// follows), then a resident's row is rewritten or a new key's published into its slot.
    fn store(
        &self,
        keyed: &KeyedRegion<'_>,
        b: &mut BucketState,
        key: u64,
        stored: Stored,
        w: &[f32],
        image: &mut [u8],
    ) {
        self.updated(b, stored.entry, stored.version, stored.count);
        if stored.resident {
            keyed.write(stored.slot, key, stored.version, w, image);
        } else {
            keyed.publish(stored.slot, key, stored.version, w, image);
        }
    }

    /// Gives the free or victim slot of `placed` (in the bucket of `b`, whose first slot is
    /// `first`) to a key being admitted: logs the victim it evicts (once: the caller holds the
    /// bucket's lock) or counts the slot as newly held, and starts the slot's optimizer state.
    /// Returns whether a row was evicted.
    fn take_slot(&self, b: &mut BucketState, placed: Slot, first: u64) -> bool {
        let (evicted, slot) = match placed {
            Slot::Evict { slot, key, version } => {
                self.log_eviction(Evicted {
                    key,
                    version,
                    score: b.scores[(slot - first) as usize],
                });
                (true, slot)
            }
            Slot::Free(slot) => {
                self.resident.fetch_add(1, Ordering::Relaxed);
                (false, slot)
            }
            Slot::Resident { .. } => unreachable!("a resident key takes no slot"),
        };
        let entry = (slot - first) as usize;
        self.restart_state(b, entry);
        b.born[entry] = self.births.fetch_add(1, Ordering::Relaxed);
        evicted
    }

    /// Hands back entry `n` of a push as `row` with values `w` and optimizer state `state`.
    fn hand_back(&self, p: &mut Produced, n: usize, row: HeldRow, w: &[f32], state: &[f32]) {
        self.hand_back_head(p, n, row);
        p.rows.extend_from_slice(w);
        p.states.values.extend_from_slice(state);
    }

    /// Hands back entry `n` of a push as a key not held: version 0, zeros, the initial
    /// optimizer state, stamp 0 (written in place: no buffer a row).
    fn hand_back_absent(&self, p: &mut Produced, n: usize) {
        self.hand_back_head(p, n, self.absent_row());
        p.rows.resize(p.rows.len() + self.dim, 0.0);
        let at = p.states.values.len();
        p.states.values.resize(at + self.state_len, 0.0);
        self.optimizer.init_state(&mut p.states.values[at..]);
    }

    /// What a handed-back row carries besides its values and state: its index in the push,
    /// version, Adam step and birth stamp.
    fn hand_back_head(&self, p: &mut Produced, n: usize, row: HeldRow) {
        p.indices.push(n as u32);
        p.versions.push(row.version);
        if self.optimizer.has_steps() {
            p.states.steps.push(row.step);
        }
        p.births.push(row.born);
    }

    /// `key`'s row as it is now, read under its bucket's lock (so its value, version, optimizer
    /// state and stamp are of one moment): its verified image into `image` (one stride; the
    /// values are [`RowLayout::payload`] of it), its state into `state` (the table's state
    /// length), or `None` (both untouched) when the key is not held.
    pub fn held_row(
        &self,
        key: u64,
        image: &mut [u8],
        state: &mut [f32],
    ) -> Result<Option<HeldRow>, StoreError> {
        let bucket = self.layout.bucket_of(key);
        let first = self.layout.first_slot(bucket);
        let b = lock(&self.buckets[bucket as usize]);
        let keyed = KeyedRegion::new(&self.layout, self.region.words());
        let Some(at) = keyed
            .find(key, image, 1)
            .map_err(|e| StoreError::Io(format!("row of key {key} under its lock: {e}")))?
        else {
            return Ok(None);
        };
        let entry = (at.slot - first) as usize;
        let len = self.state_len;
        state.copy_from_slice(&b.state[entry * len..(entry + 1) * len]);
        Ok(Some(HeldRow {
            version: at.version,
            born: b.born[entry],
            step: b.steps[entry],
        }))
    }

    /// Hands back every row of a push as it is now (a push sent again, applied before): what
    /// [`DynamicRows::push`] with `produced` hands back, read again.
    pub fn hand_back_current(&self, keys: &[u64], p: &mut Produced) -> Result<(), StoreError> {
        let mut image = vec![0u8; self.layout.row().stride()];
        let mut w = vec![0f32; self.dim];
        let mut state = vec![0f32; self.state_len];
        for (n, &key) in keys.iter().enumerate() {
            match self.held_row(key, &mut image, &mut state)? {
                Some(row) => {
                    row::decode_payload(self.layout.row(), &image, &mut w);
                    self.hand_back(p, n, row, &w, &state);
                }
                None => self.hand_back_absent(p, n),
            }
        }
        Ok(())
    }

    /// The optimizer-state values of one row.
    pub fn state_len(&self) -> usize {
        self.state_len
    }

    /// What a key not held reads as: version 0, stamp 0 (its values are zeros, which the reader
    /// replaces with the key's initial value, and its state [`DynamicRows::initial_state`]).
    pub fn absent_row(&self) -> HeldRow {
        HeldRow {
            version: 0,
            born: 0,
            step: 0,
        }
    }

    /// The optimizer state a row starts with.
    pub fn initial_state(&self) -> Vec<f32> {
        let mut state = vec![0f32; self.state_len];
        self.optimizer.init_state(&mut state);
        state
    }

    /// Starts entry `entry`'s optimizer state and step count again.
    fn restart_state(&self, b: &mut BucketState, entry: usize) {
        let len = self.state_len;
        self.optimizer
            .init_state(&mut b.state[entry * len..(entry + 1) * len]);
        b.steps[entry] = 0;
    }

    /// Counts `count` updates of entry `entry` (now at `version`): the clock advances, the
    /// entry's score follows the table's eviction rule, and the entry is marked for the next
    /// incremental checkpoint.
    fn updated(&self, b: &mut BucketState, entry: usize, version: u64, count: u32) {
        b.dirty |= 1 << entry;
        let now = self
            .clock_word()
            .fetch_add(u64::from(count), Ordering::AcqRel)
            + u64::from(count);
        b.scores[entry] = match self.eviction {
            Eviction::Lru => now,
            Eviction::Lfu => version,
            Eviction::Ttl { .. } => self.step.load(Ordering::Acquire),
        };
    }

    /// The training step its clients last announced (0 before any).
    pub fn step(&self) -> u64 {
        self.step.load(Ordering::Acquire)
    }

    /// Moves the table's training step to `step` (never back) and, for a table with a time to
    /// live of `ttl` steps, evicts every held row last updated before `step - ttl`: bucket by
    /// bucket under its lock (pushes to other buckets go on), each logged once in the eviction
    /// stream with its score (its last update's step), its slot emptied for one-sided readers
    /// (the bucket's digest first: a reader that read the digest before reads the row as it was,
    /// and a slot given again carries another key, which readers check) and marked for the next
    /// incremental checkpoint, which records it emptied. Returns the step now and the rows
    /// expired; a table without a time to live is refused.
    pub fn advance_step(&self, step: u64) -> Result<(u64, u64), StoreError> {
        let Eviction::Ttl { steps: ttl } = self.eviction else {
            return Err(StoreError::Unsupported(format!(
                "the table's eviction is {:?}: only a table with a time to live (ttl) keeps \
                 a training step",
                self.eviction
            )));
        };
        let now = self.step.fetch_max(step, Ordering::AcqRel).max(step);
        let Some(horizon) = now.checked_sub(ttl) else {
            return Ok((now, 0));
        };
        // A row's score is its table's step at its last update, and the step only grows: once
        // a sweep has reached a horizon, only an update racing that sweep can leave a row
        // under it, and the next step's sweep takes that one. So an announcement of a step
        // already swept (every client announces each step) waits for that sweep and ends.
        let mut swept = lock(&self.swept);
        if *swept >= horizon {
            return Ok((now, 0));
        }
        let keyed = KeyedRegion::new(&self.layout, self.region.words());
        let mut image = vec![0u8; self.layout.row().stride()];
        let mut gone: Vec<(u64, u64, u64)> = Vec::with_capacity(BUCKET_SLOTS);
        let mut expired = 0;
        for bucket in 0..self.layout.buckets() {
            let mut b = lock(&self.buckets[bucket as usize]);
            let old: u32 = (0..BUCKET_SLOTS)
                .filter(|&e| b.born[e] != 0 && b.scores[e] < horizon)
                .fold(0, |m, e| m | 1 << e);
            if old == 0 {
                continue;
            }
            gone.clear();
            keyed
                .held(bucket, old, &mut image, |slot, key, version, _| {
                    gone.push((slot, key, version))
                })
                .map_err(|e| StoreError::Io(format!("expiring bucket {bucket}: {e}")))?;
            let first = self.layout.first_slot(bucket);
            for &(slot, key, version) in &gone {
                let e = (slot - first) as usize;
                keyed.remove(bucket, slot);
                self.log_eviction(Evicted {
                    key,
                    version,
                    score: b.scores[e],
                });
                b.born[e] = 0;
                b.dirty |= 1 << e;
                self.resident.fetch_sub(1, Ordering::Relaxed);
                expired += 1;
            }
        }
        *swept = horizon;
        Ok((now, expired))
    }

    /// Logs one eviction (under the evicted row's bucket lock, so each is logged once).
    fn log_eviction(&self, evicted: Evicted) {
        let mut log = lock(&self.log);
        if log.entries.len() == EVICTION_LOG {
            log.entries.pop_front();
            log.first += 1;
        }
        log.entries.push_back(evicted);
    }

    /// Up to `max` evictions from `cursor` (0 is the table's first eviction), and the cursor to
    /// read from next.
    pub fn evictions(&self, cursor: u64, max: usize) -> Result<Evictions, CursorError> {
        let log = lock(&self.log);
        let next = log.first + log.entries.len() as u64;
        if cursor < log.first {
            return Err(CursorError::Behind {
                cursor,
                oldest: log.first,
                lost: log.first - cursor,
            });
        }
        if cursor > next {
            return Err(CursorError::Ahead { cursor, next });
        }
        let events: Vec<Evicted> = log
            .entries
            .iter()
            .skip((cursor - log.first) as usize)
            .take(max)
            .copied()
            .collect();
        let next = cursor + events.len() as u64;
        Ok(Evictions { events, next })
    }
}

/// Bytes one bucket of 32 slots of `table` (dynamic) takes on its shard: in the region, the
/// bucket's digests and its 32 keyed rows; beside it, the daemon's record of the bucket (scores,
/// Adam steps and its lock, inline) and the slots' optimizer state (on the heap, with the
/// allocator's header).
pub fn bytes_per_bucket(table: &TableSpec) -> u64 {
    let stride = RowLayout::keyed(table.dim).stride() as u64;
    let state = Optimizer::new(table.optimizer)
        .state_shape(table.dim as usize)
        .len as u64
        * 4;
    let heap = if state == 0 { 0 } else { 32 * state + 16 };
    BUCKET_BYTES as u64
        + BUCKET_SLOTS as u64 * stride
        + std::mem::size_of::<Mutex<BucketState>>() as u64
        + heap
}

/// Bytes a row of capacity of `table` (dynamic) takes: its bucket's bytes over the bucket's
/// slots ([`bytes_per_bucket`]). A shard of capacity `C` takes `C` times this, rounded up to
/// whole buckets, plus the admission sketch and the eviction log (`DynamicRows::footprint`).
pub fn bytes_per_row(table: &TableSpec) -> f64 {
    bytes_per_bucket(table) as f64 / BUCKET_SLOTS as f64
}

/// A dynamic table as a shard serves it: its spec, its rows (at most its share of the table's
/// capacity), and its counters.
#[derive(Debug)]
pub struct DynamicTable {
    spec: TableSpec,
    shard: u32,
    shards: u32,
    region_id: u32,
    rows: DynamicRows,
    rows_read: AtomicU64,
    rows_pushed: AtomicU64,
}

impl DynamicTable {
    /// Bytes the table takes on shard `shard` of `shards`.
    pub fn footprint(spec: &TableSpec, shard: u32, shards: u32) -> u64 {
        spec.keyed_layout(shard, shards)
            .map_or(u64::MAX, |layout| DynamicRows::footprint(spec, &layout))
    }

    /// The table `spec` (dynamic) on shard `shard` of `shards`, empty, its region numbered
    /// `region_id` in read spans and region descriptors.
    pub fn create(
        spec: TableSpec,
        shard: u32,
        shards: u32,
        region_id: u32,
        placement: &Placement,
    ) -> Result<Self, StoreError> {
        let layout = spec
            .keyed_layout(shard, shards)
            .map_err(|e| StoreError::InvalidSpec(e.to_string()))?;
        let rows = DynamicRows::create(&spec, shard, layout, placement)?;
        Ok(Self {
            spec,
            shard,
            shards,
            region_id,
            rows,
            rows_read: AtomicU64::new(0),
            rows_pushed: AtomicU64::new(0),
        })
    }

    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// Its rows on this shard.
    pub fn rows(&self) -> &DynamicRows {
        &self.rows
    }

    /// The id of its region (buckets and keyed rows) in read spans and region descriptors.
    pub fn region_id(&self) -> u32 {
        self.region_id
    }

    /// Counts `rows` rows read from its region by span reads (the `read` operation) or handed
    /// to a cache.
    pub fn count_read(&self, rows: u64) {
        self.rows_read.fetch_add(rows, Ordering::Relaxed);
    }

    /// Rows this shard holds at most (its share of the table's capacity, in whole buckets).
    pub fn capacity(&self) -> u64 {
        self.rows.layout.capacity()
    }

    /// Updates applied on this shard.
    pub fn clock(&self) -> u64 {
        self.rows.clock()
    }

    /// The shape of a row's optimizer state in answers.
    pub fn state_shape(&self) -> hetkv_transport::StateShape {
        Optimizer::new(self.spec.optimizer).state_shape(self.spec.dim as usize)
    }

    /// Refuses a key that lives on another shard (every u64 is a key of the table).
    pub fn check_keys(&self, keys: impl Iterator<Item = u64>) -> Result<(), StoreError> {
        let routing = self.spec.routing(self.shards);
        for key in keys {
            let home = routing.shard_of(key);
            if home != self.shard as usize {
                return Err(StoreError::KeyOutOfRange(format!(
                    "key {key} of dynamic table {} lives on shard {home}, not on shard {} of {}",
                    self.spec.name, self.shard, self.shards
                )));
            }
        }
        Ok(())
    }

    /// Writes the rows of `keys` (checked) into `out`: a key not held as version 0 with zeros,
    /// which the client replaces with the key's initial value (PROTOCOL.md, "Dynamic tables"):
    /// the initializer runs on the many clients, not on the one shard they share.
    pub fn read_rows_into(
        &self,
        keys: &[u64],
        out: &mut hetkv_transport::codec::RowsWriter<'_>,
    ) -> Result<(), StoreError> {
        let zeros = vec![0u8; 4 * self.spec.dim as usize];
        self.rows.read_batch(keys, |j, found| match found {
            Some((version, payload)) => out.put(j, version, payload),
            None => out.put(j, 0, &zeros),
        })?;
        self.rows_read
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Checks a push whole before anything is applied (keys on this shard, counts of at least
    /// one, the dim, every gradient finite) and hands back its rows decoded.
    pub fn validate_push(
        &self,
        keys: hetkv_transport::wire::U64s<'_>,
        counts: hetkv_transport::wire::U32s<'_>,
        grads: hetkv_transport::wire::F32s<'_>,
    ) -> Result<DecodedPush, StoreError> {
        let push = DecodedPush::new(
            self.spec.dim as usize,
            keys.iter().collect(),
            counts.iter().collect(),
            grads.iter().collect(),
        )?;
        self.check_keys(push.keys().iter().copied())?;
        Ok(push)
    }

    /// Applies a validated push; with `produced` and the rows' bases, hands back the rows a
    /// cache's lines cannot work out ([`DynamicRows::push`]).
    pub fn apply_push(
        &self,
        push: &DecodedPush,
        produced: Option<(&mut Produced, U64s<'_>)>,
    ) -> Result<PushReport, StoreError> {
        let report = self.rows.push(push, produced)?;
        self.rows_pushed
            .fetch_add(push.keys.len() as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// The held rows of slots `[from, from + slots)` (at most
    /// [`MAX_SCAN_SLOTS`](hetkv_transport::wire::MAX_SCAN_SLOTS) slots): their keys, versions and
    /// values (dim f32 little-endian each, concatenated), each row read under its bucket's lock
    /// (one moment a row); and the scan's header (`next`: the slot after the range).
    #[allow(clippy::type_complexity)]
    pub fn scan(
        &self,
        from: u64,
        slots: u32,
    ) -> Result<
        (
            hetkv_transport::wire::ScanResponse,
            Vec<u64>,
            Vec<u64>,
            Vec<u8>,
        ),
        StoreError,
    > {
        let rows = &self.rows;
        let end = self.capacity();
        let from = from.min(end);
        let to = from
            .saturating_add(u64::from(slots.min(hetkv_transport::wire::MAX_SCAN_SLOTS)))
            .min(end);
        let layout = *rows.layout.row();
        let keyed = KeyedRegion::new(&rows.layout, rows.region.words());
        let mut image = vec![0u8; layout.stride()];
        let (mut keys, mut versions, mut payloads) = (Vec::new(), Vec::new(), Vec::new());
        let first_bucket = from / BUCKET_SLOTS as u64;
        let last_bucket = to.div_ceil(BUCKET_SLOTS as u64);
        for b in first_bucket..last_bucket {
            let _writer = lock(&rows.buckets[b as usize]);
            let first = rows.layout.first_slot(b);
            let entries = (0..BUCKET_SLOTS as u64)
                .filter(|&e| (from..to).contains(&(first + e)))
                .fold(0u32, |m, e| m | 1 << e);
            keyed
                .held(b, entries, &mut image, |_, key, version, row| {
                    keys.push(key);
                    versions.push(version);
                    payloads.extend_from_slice(layout.payload(row));
                })
                .map_err(|e| StoreError::Io(format!("table {}: {e}", self.spec.name)))?;
        }
        let header = hetkv_transport::wire::ScanResponse {
            rows: keys.len() as u32,
            dim: self.spec.dim,
            next: to,
            end,
        };
        self.rows_read
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        Ok((header, keys, versions, payloads))
    }

    /// A page of the eviction stream for the protocol: up to `max` (at most
    /// [`MAX_EVICTIONS_PAGE`](hetkv_transport::wire::MAX_EVICTIONS_PAGE)) evictions from `cursor`;
    /// a reader that fell behind the log gets the oldest it holds and the count it lost.
    pub fn evictions(
        &self,
        cursor: u64,
        max: u32,
    ) -> Result<hetkv_transport::wire::EvictionsResponse, StoreError> {
        let max = max.min(hetkv_transport::wire::MAX_EVICTIONS_PAGE) as usize;
        // A reader behind the log starts at its oldest entry (which pushes meanwhile may move
        // on again: then from the new oldest).
        let mut first = cursor;
        let page = loop {
            match self.rows.evictions(first, max) {
                Ok(page) => break page,
                Err(CursorError::Behind { oldest, .. }) => first = oldest,
                Err(e @ CursorError::Ahead { .. }) => {
                    return Err(StoreError::KeyOutOfRange(format!(
                        "table {}: {e}",
                        self.spec.name
                    )))
                }
            }
        };
        let lost = first - cursor;
        Ok(hetkv_transport::wire::EvictionsResponse {
            first,
            lost,
            events: page
                .events
                .iter()
                .map(|e| hetkv_transport::wire::EvictedKey {
                    key: e.key,
                    version: e.version,
                    score: e.score,
                })
                .collect(),
            next: page.next,
        })
    }

    /// Sets rows (keys checked against the routing): [`DynamicRows::assign`].
    pub fn assign(&self, rows: &Assignment<'_>) -> Result<u64, StoreError> {
        self.check_keys(rows.keys.iter().copied())?;
        let rows = self.rows.assign(rows)?;
        self.rows_pushed.fetch_add(rows, Ordering::Relaxed);
        Ok(rows)
    }

    /// The header of this table's file in a checkpoint of `kind`, the clock read now.
    pub fn checkpoint_header(&self, kind: Kind) -> FileHeader {
        FileHeader {
            kind,
            shard: self.shard,
            shards: self.shards,
            local_rows: self.capacity(),
            clock_start: self.clock(),
            spec: self.spec.clone(),
            shape: RecordShape::of(&self.spec),
        }
    }

    /// Copies the held rows into a checkpoint file, slot by slot: every one (`Kind::Full`), or
    /// those written since the last copy (`Kind::Incremental`); one record per key with its
    /// value, version, optimizer state, Adam step and eviction score, copied together under its
    /// bucket's lock, which clears the bucket's dirty bits (pushes to other buckets go on; a
    /// bucket's records are encoded after its lock is released). A slot only ever changes
    /// hands (a key is evicted to admit another into its slot, never to leave it empty), so
    /// the newest record of each slot along a chain is the key that holds it. Returns the rows
    /// written.
    pub fn snapshot_into<W: std::io::Write>(
        &self,
        kind: Kind,
        out: &mut TableFileWriter<W>,
    ) -> std::io::Result<u64> {
        let shape = RecordShape::of(&self.spec);
        let rows = &self.rows;
        let layout = *rows.layout.row();
        let (stride, len) = (layout.stride(), rows.state_len);
        let keyed = KeyedRegion::new(&rows.layout, rows.region.words());
        let mut image = vec![0u8; stride];
        // One bucket's held rows: (slot, key, version, score, step), images and states.
        let mut held: Vec<(u64, u64, u64, u64, u64)> = Vec::with_capacity(BUCKET_SLOTS);
        let mut images = vec![0u8; BUCKET_SLOTS * stride];
        let mut states = vec![0f32; BUCKET_SLOTS * len];
        let mut written = 0;
        for b in 0..rows.layout.buckets() {
            held.clear();
            {
                let mut state = lock(&rows.buckets[b as usize]);
                let first = rows.layout.first_slot(b);
                let wanted = match kind {
                    Kind::Full => u32::MAX,
                    Kind::Incremental => state.dirty,
                };
                if wanted == 0 {
                    continue;
                }
                // An incremental copy reads only the slots written since the last one.
                keyed
                    .held(b, wanted, &mut image, |slot, key, version, row| {
                        let (n, e) = (held.len(), (slot - first) as usize);
                        images[n * stride..(n + 1) * stride].copy_from_slice(row);
                        states[n * len..(n + 1) * len]
                            .copy_from_slice(&state.state[e * len..(e + 1) * len]);
                        held.push((slot, key, version, state.scores[e], state.steps[e]));
                    })
                    .map_err(|e| std::io::Error::other(format!("table {}: {e}", self.spec.name)))?;
                // A written slot now empty (its row expired) is recorded emptied: version 0,
                // which no held row has, so that the chain's older record of it is not
                // restored.
                if kind == Kind::Incremental {
                    for e in (0..BUCKET_SLOTS).filter(|&e| wanted & (1 << e) != 0) {
                        if state.born[e] == 0 {
                            held.push((first + e as u64, 0, 0, 0, 0));
                        }
                    }
                    held.sort_unstable_by_key(|h| h.0);
                }
                state.dirty = 0;
            }
            let emptied = vec![0u8; layout.dim() * 4];
            let no_state = vec![0f32; len];
            let mut n = 0;
            for &(slot, key, version, score, step) in &held {
                let room = out.next_record(slot)?;
                if version == 0 {
                    shape.encode(slot, 0, &emptied, &no_state, 0, room);
                    shape.encode_key(0, 0, room);
                    continue;
                }
                shape.encode(
                    slot,
                    version,
                    layout.payload(&images[n * stride..(n + 1) * stride]),
                    &states[n * len..(n + 1) * len],
                    step,
                    room,
                );
                shape.encode_key(key, score, room);
                n += 1;
                written += 1;
            }
        }
        Ok(written)
    }

    /// Puts one record of a checkpoint back (for a table not yet served): the key into the
    /// record's slot, with its value, version, optimizer state, step and score; the table clock
    /// is raised to the file's `clock_start`, the score and the version, so a quiet shard's clock
    /// comes back exactly and later LRU scores stay above every restored one. Refuses a slot
    /// outside the key's bucket and a key held already, so a file that passed its checksums but
    /// names impossible places changes nothing it should not.
    pub fn restore_record(
        &self,
        header: &FileHeader,
        rec: &RecordView<'_>,
        values: &mut Vec<f32>,
    ) -> Result<(), String> {
        let rows = &self.rows;
        let (key, score) = rec
            .key_and_score()
            .ok_or_else(|| "a record without a key".to_string())?;
        let slot = rec.index();
        let bucket = rows.layout.bucket_of(key);
        let first = rows.layout.first_slot(bucket);
        if !(first..first + BUCKET_SLOTS as u64).contains(&slot) {
            return Err(format!(
                "key {key} in slot {slot}, outside its bucket's slots {first}..{}",
                first + BUCKET_SLOTS as u64
            ));
        }
        let keyed = KeyedRegion::new(&rows.layout, rows.region.words());
        let layout = *rows.layout.row();
        let mut image = vec![0u8; layout.stride()];
        if keyed.find(key, &mut image, 1).ok().flatten().is_some() {
            return Err(format!("key {key} comes twice"));
        }
        values.resize(rows.dim, 0.0);
        for (v, b) in values.iter_mut().zip(rec.value_bytes().chunks_exact(4)) {
            *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        let e = (slot - first) as usize;
        let mut state = lock(&rows.buckets[bucket as usize]);
        let len = rows.state_len;
        rec.state_into(&mut state.state[e * len..(e + 1) * len]);
        state.steps[e] = rec.step();
        // Stamps are not kept: a restored key is a new incarnation (caches read every line of a
        // restarted daemon again anyway).
        state.born[e] = rows.births.fetch_add(1, Ordering::Relaxed);
        state.scores[e] = score;
        keyed.publish(slot, key, rec.version(), values, &mut image);
        drop(state);
        rows.resident.fetch_add(1, Ordering::Relaxed);
        // LRU's scores are clock readings; a time to live's are training steps.
        let clock = match rows.eviction {
            Eviction::Ttl { .. } => {
                rows.step.fetch_max(score, Ordering::AcqRel);
                header.clock_start.max(rec.version())
            }
            _ => header.clock_start.max(score).max(rec.version()),
        };
        rows.clock_word().fetch_max(clock, Ordering::AcqRel);
        Ok(())
    }

    /// What `list_tables` says of it: the spec, the capacity on this shard, the row stride.
    pub fn info(&self) -> TableInfo {
        TableInfo {
            spec: self.spec.clone(),
            local_rows: self.capacity(),
            stride: self.rows.layout().row().stride() as u32,
        }
    }

    /// Statistics: `local_rows` counts the rows held now.
    pub fn stats(&self) -> TableStats {
        TableStats {
            name: self.spec.name.clone(),
            rows: self.spec.rows,
            local_rows: self.rows.resident(),
            dim: self.spec.dim,
            optimizer: self.spec.optimizer.name().to_string(),
            rows_read: self.rows_read.load(Ordering::Relaxed),
            rows_pushed: self.rows_pushed.load(Ordering::Relaxed),
            updates: self.clock(),
        }
    }
}

/// A push to a dynamic table, checked whole before anything is applied: as many counts as keys,
/// each at least one, `keys x dim` gradients, every one finite. The one home of those checks
/// ([`DynamicRows::push`] takes only this).
#[derive(Clone, Debug, Default)]
pub struct DecodedPush {
    dim: usize,
    keys: Vec<u64>,
    counts: Vec<u32>,
    grads: Vec<f32>,
}

impl DecodedPush {
    /// Checks and takes `(key, count, gradient)` rows of `dim` values.
    pub fn new(
        dim: usize,
        keys: Vec<u64>,
        counts: Vec<u32>,
        grads: Vec<f32>,
    ) -> Result<Self, StoreError> {
        if counts.len() != keys.len() || grads.len() != keys.len() * dim {
            return Err(StoreError::WrongDim(format!(
                "{} keys, {} counts and {} gradient values for rows of {dim}",
                keys.len(),
                counts.len(),
                grads.len()
            )));
        }
        if let Some(n) = counts.iter().position(|&c| c == 0) {
            return Err(StoreError::InvalidGradient(format!(
                "key {} has an update count of 0; nothing was applied",
                keys[n]
            )));
        }
        if let Some(n) = grads
            .chunks_exact(dim.max(1))
            .position(|g| g.iter().any(|v| !v.is_finite()))
        {
            return Err(StoreError::InvalidGradient(format!(
                "gradient for key {} holds NaN or infinity; nothing was applied",
                keys[n]
            )));
        }
        Ok(Self {
            dim,
            keys,
            counts,
            grads,
        })
    }

    /// The keys.
    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    /// The update counts, one a key.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetkv_transport::codec::assign::StateChange::{Keep, Reset};
    use hetkv_transport::{DynamicSpec, OptimizerSpec};

    /// Pushes rows to `t` through the checks every push goes through.
    fn push(
        t: &DynamicRows,
        keys: &[u64],
        counts: &[u32],
        grads: &[f32],
    ) -> Result<PushReport, StoreError> {
        t.push(
            &DecodedPush::new(t.dim, keys.to_vec(), counts.to_vec(), grads.to_vec())?,
            None,
        )
    }

    /// A dynamic table's spec: `rows` rows at most, dim `dim`.
    fn table(
        name: &str,
        dim: u32,
        init: Initializer,
        optimizer: OptimizerSpec,
        (admission, eviction): (Admission, Eviction),
    ) -> TableSpec {
        TableSpec {
            name: name.into(),
            rows: 1 << 20,
            dim,
            init,
            optimizer,
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: Some(DynamicSpec {
                admission,
                eviction,
            }),
        }
    }

    fn rows(capacity: u64, admission: Admission, eviction: Eviction) -> DynamicRows {
        let init = Initializer::Uniform {
            bound: 0.5,
            seed: 9,
        };
        let spec = table("t", 2, init, OptimizerSpec::sgd(1.0), (admission, eviction));
        let layout = KeyedLayout::with_capacity(2, capacity).unwrap();
        DynamicRows::create(&spec, 0, layout, &Placement::new(0, None, None).unwrap()).unwrap()
    }

    fn initial(key: u64) -> [f32; 2] {
        let mut v = [0f32; 2];
        Initializer::Uniform {
            bound: 0.5,
            seed: 9,
        }
        .fill(key, &mut v);
        v
    }

    #[test]
    fn a_key_not_held_reads_as_its_initial_value_and_is_created_by_its_first_update() {
        let t = rows(64, Admission::Always, Eviction::Lru);
        let mut out = [0f32; 2];
        for key in [0, u64::MAX, 1 << 63, 12_345] {
            assert_eq!(t.read(key, &mut out).unwrap(), 0);
            assert_eq!(out, initial(key));
            let r = push(&t, &[key], &[3], &[1.0, -2.0]).unwrap();
            assert_eq!((r.applied, r.admitted, r.evicted), (3, 1, 0));
            assert_eq!(t.read(key, &mut out).unwrap(), 3);
            let i = initial(key);
            assert_eq!(
                out,
                [i[0] - 1.0, i[1] + 2.0],
                "SGD lr 1 from the initial value"
            );
        }
        assert_eq!(t.resident(), 4);
        push(&t, &[0], &[1], &[1.0, 1.0]).unwrap();
        assert_eq!(t.read(0, &mut out).unwrap(), 4);
        assert_eq!(t.resident(), 4, "an update of a held key adds no row");
    }

    #[test]
    fn bad_pushes_change_nothing() {
        let t = rows(64, Admission::Always, Eviction::Lru);
        assert!(matches!(
            push(&t, &[1, 2], &[1, 1], &[0.0, 0.0, f32::NAN, 0.0]),
            Err(StoreError::InvalidGradient(_))
        ));
        assert!(matches!(
            push(&t, &[1], &[1], &[0.0]),
            Err(StoreError::WrongDim(_))
        ));
        assert!(matches!(
            push(&t, &[1], &[], &[0.0, 0.0]),
            Err(StoreError::WrongDim(_))
        ));
        assert!(matches!(
            push(&t, &[1, 2], &[1, 0], &[0.0; 4]),
            Err(StoreError::InvalidGradient(_))
        ));
        let mut out = [0f32; 2];
        assert_eq!(t.read(1, &mut out).unwrap(), 0);
        assert_eq!(t.resident(), 0);
        assert!(matches!(
            t.read(1, &mut [0f32; 3]),
            Err(StoreError::WrongDim(_))
        ));
    }

    /// One bucket (capacity 32): every key competes for its slots.
    #[test]
    fn a_full_bucket_gives_up_its_lowest_score_lru_lfu_or_ttl() {
        for eviction in [Eviction::Lru, Eviction::Lfu, Eviction::Ttl { steps: 1000 }] {
            let t = rows(32, Admission::Always, eviction);
            // Key k takes 32 - k updates, in key order (at training step k): key 0 is the least
            // recently updated, key 31 the least often.
            for k in 0..32u64 {
                if let Eviction::Ttl { .. } = eviction {
                    assert_eq!(t.advance_step(k).unwrap(), (k, 0), "nothing expires yet");
                }
                push(&t, &[k], &[32 - k as u32], &[0.0, 0.0]).unwrap();
            }
            let r = push(&t, &[100], &[1], &[0.0, 0.0]).unwrap();
            assert_eq!(r.evicted, 1);
            let gone = t.evictions(0, 10).unwrap();
            let want = match eviction {
                Eviction::Lru => Evicted {
                    key: 0,
                    version: 32,
                    score: 32, // the clock after key 0's push
                },
                Eviction::Lfu => Evicted {
                    key: 31,
                    version: 1,
                    score: 1,
                },
                Eviction::Ttl { .. } => Evicted {
                    key: 0,
                    version: 32,
                    score: 0, // the step of key 0's push
                },
            };
            assert_eq!(gone.events, vec![want], "{eviction:?}");
            let mut out = [0f32; 2];
            assert_eq!(
                t.read(want.key, &mut out).unwrap(),
                0,
                "evicted: initial again"
            );
            assert_eq!(out, initial(want.key));
            assert_eq!(t.resident(), 32);
        }
    }

    #[test]
    fn the_eviction_stream_pages_from_a_cursor_and_says_what_was_lost() {
        let t = rows(32, Admission::Always, Eviction::Lru);
        let total = EVICTION_LOG as u64 + 100;
        for k in 0..32 + total {
            push(&t, &[k], &[1], &[0.0, 0.0]).unwrap();
        }
        assert_eq!(t.resident(), 32);
        // The first 100 evictions fell out of the log.
        assert_eq!(
            t.evictions(5, 10),
            Err(CursorError::Behind {
                cursor: 5,
                oldest: 100,
                lost: 95
            })
        );
        let page = t.evictions(100, 3).unwrap();
        assert_eq!(page.next, 103);
        assert_eq!(page.events.len(), 3);
        let mut cursor = 100;
        let mut seen = 0;
        loop {
            let page = t.evictions(cursor, 1000).unwrap();
            if page.events.is_empty() {
                break;
            }
            seen += page.events.len() as u64;
            assert!(page.events.iter().all(|e| e.version == 1));
            cursor = page.next;
        }
        assert_eq!((seen, cursor), (total - 100, total));
        assert_eq!(
            t.evictions(total + 1, 1),
            Err(CursorError::Ahead {
                cursor: total + 1,
                next: total
            })
        );
    }

    #[test]
    fn a_threshold_admits_on_the_counted_update_and_reports_what_it_dropped() {
        let t = rows(64, Admission::Threshold { count: 3 }, Eviction::Lru);
        let mut out = [0f32; 2];
        let r = push(&t, &[7, 8], &[1, 1], &[1.0, 1.0, 1.0, 1.0]).unwrap();
        assert_eq!((r.applied, r.refused.clone()), (0, vec![(7, 1), (8, 1)]));
        let r = push(&t, &[7], &[1], &[1.0, 1.0]).unwrap();
        assert_eq!(r.refused, vec![(7, 1)]);
        assert_eq!(t.read(7, &mut out).unwrap(), 0);
        let r = push(&t, &[7], &[1], &[1.0, 1.0]).unwrap();
        assert_eq!((r.applied, r.admitted), (1, 1), "the third update admits");
        assert_eq!(
            t.read(7, &mut out).unwrap(),
            1,
            "earlier updates were dropped"
        );
        assert_eq!(t.refused_updates(), 3);
        // A push of count 3 admits at once.
        let r = push(&t, &[9], &[3], &[1.0, 1.0]).unwrap();
        assert_eq!((r.applied, r.admitted), (3, 1));
    }

    #[test]
    fn probability_admission_is_deterministic_under_its_seed() {
        let run = |seed| {
            let t = rows(
                4096,
                Admission::Probability { p: 0.25, seed },
                Eviction::Lru,
            );
            let keys: Vec<u64> = (0..2000).collect();
            let r = push(&t, &keys, &vec![1; 2000], &vec![0.0; 4000]).unwrap();
            r.refused.iter().map(|&(k, _)| k).collect::<Vec<_>>()
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a, b, "same seed, same pushes: same refusals");
        assert_ne!(a, c);
        let admitted = 2000 - a.len();
        assert!(
            (400..600).contains(&admitted),
            "about a quarter: {admitted}"
        );
    }

    /// Random pushes and reads against a model of the buckets: each bucket's 32 entries, the key,
    /// row, Adagrad state, version and LFU score of each, a free entry taken first, a full bucket
    /// giving up its lowest (score, slot). A re-admitted key starts again from its initial value
    /// and a fresh accumulator; every read equals the model's row bit for bit.
    #[test]
    fn pushes_and_evictions_follow_a_model_of_the_buckets() {
        #[derive(Clone)]
        struct Held {
            key: u64,
            row: [f32; 2],
            acc: Vec<f32>,
            version: u64,
        }
        let spec = table(
            "m",
            2,
            Initializer::Normal { std: 0.1, seed: 3 },
            OptimizerSpec::adagrad(0.5),
            (Admission::Always, Eviction::Lfu),
        );
        let layout = KeyedLayout::with_capacity(2, 64).unwrap();
        let t =
            DynamicRows::create(&spec, 0, layout, &Placement::new(0, None, None).unwrap()).unwrap();
        let opt = Optimizer::new(OptimizerSpec::adagrad(0.5));
        let layout = *t.layout();
        let mut model: Vec<Vec<Option<Held>>> =
            vec![vec![None; BUCKET_SLOTS]; layout.buckets() as usize];
        let mut evicted = Vec::new();
        let mut rng = 42u64;
        let mut next = || {
            rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            hash::splitmix64(rng)
        };
        for _ in 0..5_000 {
            let key = next() % 300;
            let count = 1 + (next() % 3) as u32;
            let g = [
                (next() % 200) as f32 / 100.0 - 1.0,
                (next() % 7) as f32 - 3.0,
            ];
            push(&t, &[key], &[count], &g).unwrap();
            let bucket = &mut model[layout.bucket_of(key) as usize];
            let entry = match bucket
                .iter()
                .position(|h| h.as_ref().is_some_and(|h| h.key == key))
            {
                Some(e) => e,
                None => {
                    let e = match bucket.iter().position(Option::is_none) {
                        Some(e) => e,
                        None => {
                            let e = (0..BUCKET_SLOTS)
                                .min_by_key(|&e| (bucket[e].as_ref().unwrap().version, e))
                                .unwrap();
                            let gone = bucket[e].take().unwrap();
                            evicted.push((gone.key, gone.version));
                            e
                        }
                    };
                    let mut row = [0f32; 2];
                    Initializer::Normal { std: 0.1, seed: 3 }.fill(key, &mut row);
                    let mut acc = vec![0f32; 2];
                    opt.init_state(&mut acc);
                    bucket[e] = Some(Held {
                        key,
                        row,
                        acc,
                        version: 0,
                    });
                    e
                }
            };
            let h = bucket[entry].as_mut().unwrap();
            opt.apply(&mut h.row, &g, &mut h.acc, &mut 0);
            h.version += u64::from(count);
            // A read of the pushed key and of a random one.
            for probe in [key, next() % 300] {
                let mut out = [0f32; 2];
                let version = t.read(probe, &mut out).unwrap();
                let held = model[layout.bucket_of(probe) as usize]
                    .iter()
                    .flatten()
                    .find(|h| h.key == probe);
                match held {
                    Some(h) => assert_eq!((out, version), (h.row, h.version), "key {probe}"),
                    None => {
                        let mut init = [0f32; 2];
                        Initializer::Normal { std: 0.1, seed: 3 }.fill(probe, &mut init);
                        assert_eq!((out, version), (init, 0), "key {probe} not held");
                    }
                }
            }
        }
        let stream = t.evictions(0, usize::MAX).unwrap();
        let got: Vec<(u64, u64)> = stream.events.iter().map(|e| (e.key, e.version)).collect();
        assert_eq!(
            got, evicted,
            "the stream names every eviction once, in order"
        );
        assert!(
            evicted.len() > 1_000,
            "the model evicts ({})",
            evicted.len()
        );
        let held = model.iter().flatten().flatten().count() as u64;
        assert_eq!(t.resident(), held);
    }

    #[test]
    fn a_time_to_live_expires_rows_not_updated_within_it_and_reads_refresh_nothing() {
        let t = rows(256, Admission::Always, Eviction::Ttl { steps: 10 });
        let mut out = [0f32; 2];
        // Keys 0..100 updated at step 0, keys 100..200 at step 5; keys 0..10 read at step 12.
        push(&t, &(0..100).collect::<Vec<_>>(), &[1; 100], &[0.5; 200]).unwrap();
        assert_eq!(t.advance_step(5).unwrap(), (5, 0));
        push(&t, &(100..200).collect::<Vec<_>>(), &[1; 100], &[0.5; 200]).unwrap();
        assert_eq!(
            t.advance_step(10).unwrap(),
            (10, 0),
            "step 0 + 10 is not yet past"
        );
        for k in 0..10 {
            t.read(k, &mut out).unwrap();
        }
        assert_eq!(
            t.advance_step(3).unwrap(),
            (10, 0),
            "the step never goes back"
        );
        assert_eq!(
            t.advance_step(12).unwrap(),
            (12, 100),
            "keys updated at step 0 expire"
        );
        assert_eq!(t.resident(), 100);
        for k in 0..100 {
            assert_eq!(
                t.read(k, &mut out).unwrap(),
                0,
                "key {k}: not held (reads refresh nothing)"
            );
            assert_eq!(out, initial(k));
        }
        for k in 100..200 {
            assert_eq!(t.read(k, &mut out).unwrap(), 1, "key {k}: held");
        }
        // Each expiry is in the stream once, scored by the step of its last update.
        let stream = t.evictions(0, 1000).unwrap().events;
        let mut keys: Vec<u64> = stream.iter().map(|e| e.key).collect();
        keys.sort_unstable();
        assert_eq!(keys, (0..100).collect::<Vec<_>>());
        assert!(stream.iter().all(|e| e.version == 1 && e.score == 0));
        // An expired key admitted again starts from its initial value; the emptied slots are
        // taken again without evicting anyone.
        push(&t, &(0..100).collect::<Vec<_>>(), &[1; 100], &[0.0; 200]).unwrap();
        assert_eq!(t.read(7, &mut out).unwrap(), 1);
        assert_eq!(out, initial(7));
        assert_eq!(t.resident(), 200);
        assert_eq!(
            t.evictions(0, 1000).unwrap().events.len(),
            100,
            "no new eviction"
        );
        assert_eq!(
            t.advance_step(16).unwrap(),
            (16, 100),
            "keys of step 5 expire at 16"
        );
        // A table without a time to live keeps no step.
        let lru = rows(64, Admission::Always, Eviction::Lru);
        assert!(matches!(
            lru.advance_step(1),
            Err(StoreError::Unsupported(_))
        ));
    }

    #[test]
    fn an_assignment_admits_evicts_and_counts_one_update_a_row() {
        // One bucket (capacity 32), a threshold no key meets by pushing: an import admits.
        let t = rows(32, Admission::Threshold { count: 200 }, Eviction::Lru);
        let keys: Vec<u64> = (0..40u64).map(|k| k * 7919).collect();
        let values: Vec<f32> = (0..keys.len() * 2).map(|i| i as f32).collect();
        assert_eq!(t.assign(&Assignment::values(&keys, &values)).unwrap(), 40);
        assert_eq!(t.resident(), 32);
        let evicted = t.evictions(0, 100).unwrap().events;
        assert_eq!(
            evicted.len(),
            8,
            "every assignment past the cap evicts one row"
        );
        // LRU: the first eight assigned are the ones gone, each once.
        let mut gone: Vec<u64> = evicted.iter().map(|e| e.key).collect();
        gone.sort_unstable();
        assert_eq!(gone, keys[..8].to_vec());
        let mut out = [0f32; 2];
        for (n, &k) in keys.iter().enumerate().skip(8) {
            assert_eq!(t.read(k, &mut out).unwrap(), 1, "key {k}: one update");
            assert_eq!(out, [values[2 * n], values[2 * n + 1]]);
        }
        // Assigned again: version 2, in place.
        assert_eq!(
            t.assign(&Assignment::values(&keys[39..], &[5.0, 6.0]))
                .unwrap(),
            1
        );
        assert_eq!(t.read(keys[39], &mut out).unwrap(), 2);
        assert_eq!(out, [5.0, 6.0]);
        // A NaN sets nothing.
        assert!(t
            .assign(&Assignment::values(&keys[..1], &[f32::NAN, 0.0]))
            .is_err());
        assert_eq!(t.resident(), 32);
    }

    #[test]
    fn an_assignment_sets_keeps_or_resets_the_optimizer_state() {
        let rule = (Admission::Always, Eviction::Lru);
        let spec = table("a", 2, Initializer::Zeros, OptimizerSpec::adam(0.01), rule);
        let layout = KeyedLayout::with_capacity(2, 64).unwrap();
        let placement = Placement::new(0, None, None).unwrap();
        let t = DynamicRows::create(&spec, 0, layout, &placement).unwrap();
        let mut image = vec![0u8; layout.row().stride()];
        let mut state = [0f32; 4];
        let held = |image: &mut [u8], state: &mut [f32; 4]| {
            let row = t.held_row(9, image, state).unwrap().unwrap();
            let mut w = [0f32; 2];
            row::decode_payload(layout.row(), image, &mut w);
            (row.version, row.step, w)
        };
        // A state set on a key not held admits it at its initial value.
        let set = StateChange::Set {
            values: &[0.5, -0.5, 0.25, 0.125],
            steps: &[7],
        };
        let nine = |values: Option<&'static [f32]>, state| Assignment {
            keys: &[9],
            values,
            state,
        };
        assert_eq!(t.assign(&nine(None, set)).unwrap(), 1);
        assert_eq!(held(&mut image, &mut state), (1, 7, [0.0, 0.0]));
        assert_eq!(state, [0.5, -0.5, 0.25, 0.125]);
        // Values with the state kept: the state is the one set.
        assert_eq!(t.assign(&nine(Some(&[1.0, 2.0]), Keep)).unwrap(), 1);
        assert_eq!(held(&mut image, &mut state), (2, 7, [1.0, 2.0]));
        assert_eq!(state, [0.5, -0.5, 0.25, 0.125]);
        // A negative second moment, or a step count missing, sets nothing.
        let bad = StateChange::Set {
            values: &[0.0, 0.0, 0.0, -1.0],
            steps: &[1],
        };
        assert!(t.assign(&nine(None, bad)).is_err());
        let short = StateChange::Set {
            values: &[0.0; 4],
            steps: &[],
        };
        assert!(t.assign(&nine(None, short)).is_err());
        assert_eq!(held(&mut image, &mut state), (2, 7, [1.0, 2.0]));
        // Reset: a new optimizer's state, the values kept.
        assert_eq!(t.assign(&nine(None, Reset)).unwrap(), 1);
        assert_eq!(held(&mut image, &mut state), (3, 0, [1.0, 2.0]));
        assert_eq!(state, [0.0; 4]);
    }

    #[test]
    fn footprint_counts_region_state_sketch_and_log() {
        let rule = (Admission::Threshold { count: 2 }, Eviction::Lfu);
        let layout = KeyedLayout::with_capacity(4, 64).unwrap();
        let of = |optimizer| table("f", 4, Initializer::Zeros, optimizer, rule);
        let adagrad = DynamicRows::footprint(&of(OptimizerSpec::adagrad(0.1)), &layout);
        let sgd = DynamicRows::footprint(&of(OptimizerSpec::sgd(0.1)), &layout);
        // Four accumulators a slot, on the heap with the allocator's header, per bucket of 32.
        assert_eq!(
            adagrad - sgd,
            2 * (32 * 16 + 16),
            "four accumulators a slot"
        );
        assert_eq!(
            sgd - DynamicRows::footprint(
                &of(OptimizerSpec::sgd(0.1)),
                &KeyedLayout::with_capacity(4, 32).unwrap()
            ),
            bytes_per_bucket(&of(OptimizerSpec::sgd(0.1))),
            "one more bucket"
        );
        assert!(sgd > layout.region_bytes() + 64 * 8 + EVICTION_LOG as u64 * LOGGED_BYTES);
    }
}
