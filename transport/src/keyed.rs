//! The memory layout of a dynamic table (any u64 key): keyed rows found through buckets of key
//! digests, in one region that clients read one-sidedly (docs/PROTOCOL.md, section 1).
//!
//! ```text
//! offset 0                    bucket 0 .. bucket B-1, BUCKET_BYTES each
//! offset B * BUCKET_BYTES     slot 0 .. slot B*BUCKET_SLOTS-1, keyed rows of the row layout
//!
//! bucket:  offset 0   seq: u64 LE        even = stable, odd = a write is in progress
//!          offset 8   digests: 32 x u16 LE   entry i describes slot b*32 + i; 0 = empty
//!          offset 72  crc: u32 LE        CRC32C over bytes [0, 72) with the low bit of seq clear
//!          offset 76  zero padding to 80
//! ```
//!
//! A key's 64-bit hash ([`key_hash`]) picks its placement bucket (bits 0..32, [`Routing`]: the
//! shard, and the group of region buckets that placement bucket owns there), its bucket in that
//! group (the high bits) and its 16-bit digest (the low bits); its row lives in one of the bucket's 32 slots, as in HierarchicalKV's buckets and
//! Pilaf's, so a reader that has never seen a key finds it with one read of its bucket and one of
//! each slot whose digest matches (one in 2,048 lookups of a full bucket reads a second row). The
//! row carries its key under its checksum ([`crate::row`]): a reader whose bucket image is older
//! than the slot's row (the slot was given to another key in between) sees the other key and
//! answers absent, which is what the key was at some moment between its two reads.
//!
//! Buckets and rows follow the writer protocol of rows ([`crate::row::write_image`]): one writer
//! per bucket at a time (the daemon locks the bucket), readers lock-free anywhere. A slot changes
//! key as a row write (the new key's image) followed by a bucket write (the new digest); an
//! eviction without a replacement is a bucket write alone. A table holds at most
//! `buckets x BUCKET_SLOTS` rows; a full bucket evicts the lowest score among its own slots even
//! when other buckets have room, so the cap is hard and every placement is O(32).

use std::sync::atomic::AtomicU64;

use crate::hash::splitmix64;
use crate::region::WORD;
use crate::row::{self, RowError, RowLayout, SEQ_BYTES};
use crate::Routing;

/// Slots per bucket.
pub const BUCKET_SLOTS: usize = 32;
/// The digest that marks an empty entry.
pub const EMPTY: u16 = 0;
const DIGESTS_BYTES: usize = 2 * BUCKET_SLOTS;
const BUCKET_CRC_AT: usize = SEQ_BYTES + DIGESTS_BYTES;
/// Bytes of one bucket image (a multiple of 8).
pub const BUCKET_BYTES: usize = (BUCKET_CRC_AT + row::CRC_BYTES).div_ceil(WORD) * WORD;

/// The 64-bit hash of a key, from which its bucket and digest come ([`splitmix64`], a bijection,
/// so distinct keys never share a hash).
pub fn key_hash(key: u64) -> u64 {
    splitmix64(key)
}

/// A key's digest in its bucket: the low 16 bits of its hash, never [`EMPTY`].
pub fn digest_of(key: u64) -> u16 {
    match key_hash(key) as u16 {
        EMPTY => 1,
        d => d,
    }
}

/// Why a keyed layout cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyedError {
    /// A capacity of no rows.
    #[error("a dynamic table needs a capacity of at least one row")]
    NoCapacity,
    /// The region would not fit a 64-bit length.
    #[error("a capacity of {capacity} rows of stride {stride} does not fit one region")]
    TooLarge {
        /// Rows asked for.
        capacity: u64,
        /// Bytes per row.
        stride: usize,
    },
}

/// Geometry of one shard's region of a dynamic table: for each placement bucket the shard owns
/// (its *groups*, in the order of [`Routing::local_bucket`]), the same number of region buckets
/// of [`BUCKET_SLOTS`] slots, so that a placement bucket moves between shards with its region
/// buckets whole (resharding keeps every key in the same entry of the same region bucket of its
/// group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedLayout {
    routing: Routing,
    groups: u64,
    per_group: u64,
    buckets: u64,
    row: RowLayout,
}

impl KeyedLayout {
    /// The layout of shard `shard`'s region of a dynamic table of `dim` and capacity `rows`
    /// placed by `routing` (`TableSpec::routing` of a dynamic table): each of the shard's
    /// placement buckets with [`Routing::region_buckets_per_bucket`] region buckets. `dim` must
    /// be in `1..=row::MAX_DIM`.
    pub fn for_shard(
        dim: u32,
        routing: Routing,
        shard: u32,
        rows: u64,
    ) -> Result<Self, KeyedError> {
        Self::build(
            dim,
            routing,
            u64::from(routing.buckets_on(shard)),
            routing.region_buckets_per_bucket(rows),
        )
    }

    /// A region of one group: at least `capacity` keyed rows of `dim` (rounded up to whole
    /// buckets; see [`KeyedLayout::capacity`]), every key in it (a region outside a cluster:
    /// tests, tools).
    pub fn with_capacity(dim: u32, capacity: u64) -> Result<Self, KeyedError> {
        if capacity == 0 {
            return Err(KeyedError::NoCapacity);
        }
        Self::build(
            dim,
            Routing::hashed(1, 1),
            1,
            capacity.div_ceil(BUCKET_SLOTS as u64),
        )
    }

    fn build(dim: u32, routing: Routing, groups: u64, per_group: u64) -> Result<Self, KeyedError> {
        let buckets = groups.saturating_mul(per_group);
        if buckets == 0 {
            return Err(KeyedError::NoCapacity);
        }
        let row = RowLayout::keyed(dim);
        let layout = Self {
            routing,
            groups,
            per_group,
            buckets,
            row,
        };
        let fits = buckets
            .checked_mul(BUCKET_BYTES as u64)
            .zip(
                buckets
                    .checked_mul(BUCKET_SLOTS as u64)
                    .and_then(|c| c.checked_mul(row.stride() as u64)),
            )
            .and_then(|(b, r)| b.checked_add(r))
            .is_some_and(|total| total <= u64::MAX / 2);
        if !fits {
            return Err(KeyedError::TooLarge {
                capacity: buckets.saturating_mul(BUCKET_SLOTS as u64),
                stride: row.stride(),
            });
        }
        Ok(layout)
    }

    /// Region buckets of each group (each placement bucket the shard owns).
    pub fn per_group(&self) -> u64 {
        self.per_group
    }

    /// The keyed rows' layout.
    pub fn row(&self) -> &RowLayout {
        &self.row
    }

    /// Buckets in the region.
    pub fn buckets(&self) -> u64 {
        self.buckets
    }

    /// Slots in the region: the most rows it holds (the capacity asked for, rounded up to whole
    /// buckets).
    pub fn capacity(&self) -> u64 {
        self.buckets * BUCKET_SLOTS as u64
    }

    /// The bucket of `key`: in its placement bucket's group, the one the high bits of its hash
    /// pick (independent of the digest's low 16 bits and of the placement bucket's bits 0..32).
    /// A key of another shard gets a bucket of this region too (never found there).
    pub fn bucket_of(&self, key: u64) -> u64 {
        let group = u64::from(self.routing.local_bucket(key)) % self.groups;
        let within = ((key_hash(key) >> 16) as u128 * self.per_group as u128) >> 48;
        group * self.per_group + within as u64
    }

    /// The first slot of bucket `b`; its slots are `[b * BUCKET_SLOTS, (b + 1) * BUCKET_SLOTS)`.
    pub fn first_slot(&self, bucket: u64) -> u64 {
        bucket * BUCKET_SLOTS as u64
    }

    /// Byte offset of bucket `b` in the region.
    pub fn bucket_offset(&self, bucket: u64) -> u64 {
        bucket * BUCKET_BYTES as u64
    }

    /// Byte offset of slot `s`'s row in the region.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.buckets * BUCKET_BYTES as u64 + self.row.row_offset(slot)
    }

    /// Bytes of the region.
    pub fn region_bytes(&self) -> u64 {
        self.slot_offset(self.capacity())
    }

    /// The region's words split into its buckets and its rows.
    pub fn split<'a>(&self, words: &'a [AtomicU64]) -> (&'a [AtomicU64], &'a [AtomicU64]) {
        let at = self.buckets as usize * BUCKET_BYTES / WORD;
        let end = self.region_bytes() as usize / WORD;
        (&words[..at], &words[at..end])
    }
}

/// A bucket: its version (how many times it changed) and its digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Writes the bucket has seen.
    pub version: u64,
    /// Entry `i` describes slot `first_slot + i`: the digest of the key it holds, or [`EMPTY`].
    pub digests: [u16; BUCKET_SLOTS],
}

impl Bucket {
    /// A bucket with no keys, at version 0.
    pub const EMPTY: Self = Self {
        version: 0,
        digests: [EMPTY; BUCKET_SLOTS],
    };

    /// Writes the bucket's stable image into `image` ([`BUCKET_BYTES`] long).
    pub fn encode(&self, image: &mut [u8]) {
        assert_eq!(
            image.len(),
            BUCKET_BYTES,
            "a bucket image is BUCKET_BYTES long"
        );
        image[..SEQ_BYTES].copy_from_slice(&row::seq_of(self.version).to_le_bytes());
        for (chunk, d) in image[SEQ_BYTES..BUCKET_CRC_AT]
            .chunks_exact_mut(2)
            .zip(&self.digests)
        {
            chunk.copy_from_slice(&d.to_le_bytes());
        }
        let crc = crc32c::crc32c(&image[..BUCKET_CRC_AT]);
        image[BUCKET_CRC_AT..BUCKET_CRC_AT + row::CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
        image[BUCKET_CRC_AT + row::CRC_BYTES..].fill(0);
    }

    /// Verifies a copied bucket image (even seq, matching checksum) and decodes it.
    pub fn decode(image: &[u8]) -> Result<Self, RowError> {
        if image.len() < BUCKET_BYTES {
            return Err(RowError::Length {
                got: image.len(),
                expected: BUCKET_BYTES,
            });
        }
        let seq = u64::from_le_bytes(image[..SEQ_BYTES].try_into().expect("8 bytes"));
        if seq & 1 == 1 {
            return Err(RowError::WriteInProgress { seq });
        }
        let stored = u32::from_le_bytes(
            image[BUCKET_CRC_AT..BUCKET_CRC_AT + row::CRC_BYTES]
                .try_into()
                .expect("4 bytes"),
        );
        let computed = crc32c::crc32c(&image[..BUCKET_CRC_AT]);
        if stored != computed {
            return Err(RowError::Checksum { stored, computed });
        }
        let mut digests = [EMPTY; BUCKET_SLOTS];
        for (d, chunk) in digests
            .iter_mut()
            .zip(image[SEQ_BYTES..BUCKET_CRC_AT].chunks_exact(2))
        {
            *d = u16::from_le_bytes(chunk.try_into().expect("2 bytes"));
        }
        Ok(Self {
            version: row::version_of(seq),
            digests,
        })
    }

    /// The entries whose digest is `key`'s: the slots to read for it, first to last.
    pub fn candidates(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let d = digest_of(key);
        (0..BUCKET_SLOTS).filter(move |&i| self.digests[i] == d)
    }

    /// The first empty entry.
    pub fn free_entry(&self) -> Option<usize> {
        self.digests.iter().position(|&d| d == EMPTY)
    }
}

/// What a verified row image says about `key`: its version when the row is `key`'s, `None` when
/// the slot holds another key (given to it after the bucket was read).
pub fn match_row(layout: &RowLayout, key: u64, image: &[u8]) -> Result<Option<u64>, RowError> {
    let version = row::verify_image(layout, image)?;
    Ok((layout.key(image) == Some(key)).then_some(version))
}

/// Where a key was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// Its slot.
    pub slot: u64,
    /// The version of its row as read.
    pub version: u64,
}

/// Where a key goes when it is placed ([`KeyedRegion::place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The key already holds this slot, its row at `version`.
    Resident {
        /// The slot.
        slot: u64,
        /// The version of the key's row.
        version: u64,
    },
    /// An empty slot of its bucket.
    Free(u64),
    /// Its bucket is full: this slot, now held by `key` at `version`, has the lowest score.
    Evict {
        /// The slot.
        slot: u64,
        /// The key it holds.
        key: u64,
        /// The version of that key's row.
        version: u64,
    },
}

/// A dynamic table's region, for its writer (the daemon) and its in-process readers.
#[derive(Clone, Copy, Debug)]
pub struct KeyedRegion<'a> {
    layout: &'a KeyedLayout,
    buckets: &'a [AtomicU64],
    rows: &'a [AtomicU64],
}

impl<'a> KeyedRegion<'a> {
    /// The region over `words` (at least [`KeyedLayout::region_bytes`] long).
    pub fn new(layout: &'a KeyedLayout, words: &'a [AtomicU64]) -> Self {
        let (buckets, rows) = layout.split(words);
        Self {
            layout,
            buckets,
            rows,
        }
    }

    /// Writes an empty image into every bucket: a fresh region (all zeros) has no valid bucket,
    /// and readers refuse what they cannot verify. The caller is the only writer.
    pub fn format(&self) {
        let mut image = [0u8; BUCKET_BYTES];
        Bucket::EMPTY.encode(&mut image);
        for b in 0..self.layout.buckets() {
            row::write_image(self.bucket_words(b), &image);
        }
    }

    fn bucket_words(&self, bucket: u64) -> &'a [AtomicU64] {
        let at = bucket as usize * BUCKET_BYTES / WORD;
        &self.buckets[at..at + BUCKET_BYTES / WORD]
    }

    /// Asks the CPU to start loading `key`'s bucket, so that a batch's lookups overlap their
    /// first cache misses (a hint, as [`row::prefetch_row`]).
    pub fn prefetch_bucket(&self, key: u64) {
        crate::region::prefetch(self.bucket_words(self.layout.bucket_of(key)));
    }

    /// A verified copy of bucket `b`, read as any reader reads it (at most `attempts` copies).
    pub fn read_bucket(&self, bucket: u64, attempts: u32) -> Result<Bucket, RowError> {
        let mut image = [0u8; BUCKET_BYTES];
        row::read_verified(
            self.bucket_words(bucket),
            &mut image,
            attempts,
            Bucket::decode,
        )
        .map(|(bucket, _)| bucket)
    }

    /// Finds `key` lock-free, as a one-sided reader does: its bucket, then each slot whose digest
    /// matches, accepting the row that verifies and carries `key`. `image` is one stride; when
    /// the key is found it holds the key's row. `None`: the key was absent at some moment during
    /// the call.
    pub fn find(
        &self,
        key: u64,
        image: &mut [u8],
        attempts: u32,
    ) -> Result<Option<Located>, RowError> {
        let mut found = None;
        self.find_batch(&[key], image, attempts, |_, at, _| found = at)?;
        Ok(found)
    }

    /// [`KeyedRegion::find`] for each of `keys` in turn, handing `each(j, found, image)` key `j`'s
    /// outcome (with its row in `image` when found), and loading later keys' memory ahead: the
    /// bucket of key `j + 2 LOOKAHEAD` is prefetched and the bucket of key `j + LOOKAHEAD` read
    /// and its candidate rows prefetched before key `j`'s rows are read, so a batch's two
    /// dependent cache misses a key (bucket, then row) overlap across keys. A key's bucket is
    /// read before its rows, as `find` reads them: a row given to another key meanwhile is
    /// noticed by its key and answered absent (the key was evicted at some moment in between).
    pub fn find_batch(
        &self,
        keys: &[u64],
        image: &mut [u8],
        attempts: u32,
        mut each: impl FnMut(usize, Option<Located>, &[u8]),
    ) -> Result<(), RowError> {
        const LOOKAHEAD: usize = 4;
        let layout = self.layout.row();
        // Each staged key's bucket as read, and the bucket's first slot.
        let mut views = [(Bucket::EMPTY, 0u64); LOOKAHEAD];
        // Reads key `j`'s bucket into its place in the ring and prefetches its candidate rows.
        let stage = |j: usize, views: &mut [(Bucket, u64); LOOKAHEAD]| -> Result<(), RowError> {
            if let Some(&key) = keys.get(j) {
                let bucket = self.layout.bucket_of(key);
                let (view, first) = (
                    self.read_bucket(bucket, attempts)?,
                    self.layout.first_slot(bucket),
                );
                for i in view.candidates(key) {
                    row::prefetch_row(self.rows, layout, first + i as u64);
                }
                views[j % LOOKAHEAD] = (view, first);
            }
            Ok(())
        };
        for &key in keys.iter().take(2 * LOOKAHEAD) {
            self.prefetch_bucket(key);
        }
        for j in 0..LOOKAHEAD {
            stage(j, &mut views)?;
        }
        for (j, &key) in keys.iter().enumerate() {
            if let Some(&ahead) = keys.get(j + 2 * LOOKAHEAD) {
                self.prefetch_bucket(ahead);
            }
            let (view, first) = views[j % LOOKAHEAD];
            stage(j + LOOKAHEAD, &mut views)?;
            let mut found = None;
            for i in view.candidates(key) {
                let slot = first + i as u64;
                let read = row::read_row(self.rows, layout, slot, image, attempts)?;
                if layout.key(image) == Some(key) {
                    found = Some(Located {
                        slot,
                        version: read.version,
                    });
                    break;
                }
            }
            each(j, found, image);
        }
        Ok(())
    }

    /// Where `key` goes, for the writer of its bucket: its own slot, an empty one, or the slot
    /// of the lowest `score` (ties to the first), whose key is named. For a resident key or a
    /// victim, `image` (one stride) is left holding that slot's verified row. Changes nothing;
    /// a row that does not verify under its writer's lock (memory gone bad) is an error.
    pub fn place(
        &self,
        key: u64,
        score: impl Fn(u64) -> u64,
        image: &mut [u8],
    ) -> Result<Placement, RowError> {
        let layout = self.layout.row();
        let bucket = self.layout.bucket_of(key);
        let first = self.layout.first_slot(bucket);
        let view = self.writer_bucket(bucket);
        // Nothing else writes the bucket meanwhile: one copy of a row is stable.
        let read = |slot: u64, image: &mut [u8]| {
            row::copy_row(self.rows, layout, slot, image);
            row::verify_image(layout, image)
        };
        for i in view.candidates(key) {
            let slot = first + i as u64;
            let version = read(slot, image)?;
            if layout.key(image) == Some(key) {
                return Ok(Placement::Resident { slot, version });
            }
        }
        if let Some(i) = view.free_entry() {
            return Ok(Placement::Free(first + i as u64));
        }
        let slot = (first..first + BUCKET_SLOTS as u64)
            .min_by_key(|&s| (score(s), s))
            .expect("a bucket has slots");
        let version = read(slot, image)?;
        let key = layout.key(image).expect("keyed rows");
        Ok(Placement::Evict { slot, key, version })
    }

    /// The bucket as its writer sees it (nothing else writes it meanwhile, so one copy is
    /// stable; a region not formatted reads as empty).
    fn writer_bucket(&self, bucket: u64) -> Bucket {
        let mut image = [0u8; BUCKET_BYTES];
        row::copy_words(self.bucket_words(bucket), 0, &mut image);
        Bucket::decode(&image).unwrap_or(Bucket::EMPTY)
    }

    /// The held slots of `bucket` among `entries` (bit `i`: the bucket's `i`-th slot), for its
    /// writer (who holds it still): `each(slot, key, version, image)` with the slot's verified
    /// row in `image` (one stride of scratch), in slot order; the other slots are not read. A
    /// held row that does not verify, or whose key is not of this bucket, is an error (memory
    /// gone bad: nothing else writes it meanwhile), naming the slot.
    pub fn held(
        &self,
        bucket: u64,
        entries: u32,
        image: &mut [u8],
        mut each: impl FnMut(u64, u64, u64, &[u8]),
    ) -> Result<(), String> {
        let layout = self.layout.row();
        let view = self.writer_bucket(bucket);
        let first = self.layout.first_slot(bucket);
        for (i, &digest) in view.digests.iter().enumerate() {
            if digest == EMPTY || entries & (1 << i) == 0 {
                continue;
            }
            let slot = first + i as u64;
            row::copy_row(self.rows, layout, slot, image);
            let version =
                row::verify_image(layout, image).map_err(|e| format!("slot {slot}: {e}"))?;
            let key = layout.key(image).unwrap_or_default();
            if self.layout.bucket_of(key) != bucket || digest_of(key) != digest {
                return Err(format!(
                    "slot {slot} holds key {key}, which bucket {bucket}'s digest does not name"
                ));
            }
            each(slot, key, version, image);
        }
        Ok(())
    }

    /// Writes `key`'s row into `slot` (of `key`'s bucket) at `version` and publishes it: the row
    /// first, then the bucket's digest, so that a reader never finds the digest before the row.
    /// A slot that held another key stops being found as that key by the same bucket write.
    /// `image` is scratch of one stride. The caller is the bucket's only writer.
    pub fn publish(&self, slot: u64, key: u64, version: u64, payload: &[f32], image: &mut [u8]) {
        self.write(slot, key, version, payload, image);
        let bucket = self.layout.bucket_of(key);
        let entry = self.entry_of(bucket, slot);
        let mut view = self.writer_bucket(bucket);
        if view.digests[entry] != digest_of(key) {
            view.digests[entry] = digest_of(key);
            self.write_bucket(bucket, view);
        }
    }

    /// Rewrites the row of `key`, resident in `slot`, at `version` (an update); `image` is
    /// scratch of one stride. The caller is the bucket's only writer.
    pub fn write(&self, slot: u64, key: u64, version: u64, payload: &[f32], image: &mut [u8]) {
        let layout = self.layout.row();
        row::encode_keyed_image(layout, version, key, payload, image);
        row::write_row(self.rows, layout, slot, image);
    }

    /// Empties `slot` (of `bucket`): its key is no longer found. The row stays until the slot is
    /// given again. The caller is the bucket's only writer.
    pub fn remove(&self, bucket: u64, slot: u64) {
        let entry = self.entry_of(bucket, slot);
        let mut view = self.writer_bucket(bucket);
        if view.digests[entry] != EMPTY {
            view.digests[entry] = EMPTY;
            self.write_bucket(bucket, view);
        }
    }

    fn entry_of(&self, bucket: u64, slot: u64) -> usize {
        let first = self.layout.first_slot(bucket);
        assert!(
            (first..first + BUCKET_SLOTS as u64).contains(&slot),
            "slot {slot} is not in bucket {bucket}"
        );
        (slot - first) as usize
    }

    fn write_bucket(&self, bucket: u64, mut view: Bucket) {
        view.version += 1;
        let mut image = [0u8; BUCKET_BYTES];
        view.encode(&mut image);
        row::write_image(self.bucket_words(bucket), &image);
    }
}

/// What became of one key of a [`SpanFind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Not decided yet: its bucket or a candidate row has not verified.
    Pending,
    /// Its row, at this version, was the candidate read at this index of
    /// [`SpanFind::row_reads`].
    Row {
        /// The candidate read holding the row.
        read: usize,
        /// The row's version.
        version: u64,
    },
    /// The key was absent at some moment of the lookup.
    Absent,
}

/// A batch of lookups in a keyed region by a reader that copies spans of it (shared memory,
/// RDMA READ): the lookup of [`KeyedRegion::find`] (the key's bucket, then each slot whose digest
/// matches, a row counting only when it verifies and carries the key) split into its two rounds
/// of reads, with no I/O of its own, so that every one-sided reader runs the same algorithm.
///
/// Round one reads each distinct bucket of the batch ([`SpanFind::bucket_reads`], handed back
/// through [`SpanFind::take_bucket`]); a copy that does not verify is read again
/// ([`SpanFind::torn_buckets`]). Round two reads the candidate rows of every key whose bucket
/// verified ([`SpanFind::plan_rows`], [`SpanFind::row_reads`], [`SpanFind::take_row`]), again
/// re-reading torn copies. A key whose bucket or candidate rows never verify stays
/// [`Found::Pending`], for the caller to ask the daemon.
#[derive(Clone, Debug)]
pub struct SpanFind<'k> {
    layout: KeyedLayout,
    keys: &'k [u64],
    /// Distinct buckets of the batch, in first-seen order.
    buckets: Vec<u64>,
    /// Each distinct bucket's verified copy, once read.
    views: Vec<Option<Bucket>>,
    /// Each key's index in `buckets`.
    bucket_of_key: Vec<u32>,
    /// Candidate reads: (key index, slot), keys in order, a key's slots in bucket order.
    rows: Vec<(u32, u64)>,
    /// Whether each candidate read's copy verified.
    verified: Vec<bool>,
    found: Vec<Found>,
}

impl<'k> SpanFind<'k> {
    /// The lookup of `keys` in a region of `layout`.
    pub fn new(layout: KeyedLayout, keys: &'k [u64]) -> Self {
        let mut buckets = Vec::new();
        let mut first_seen = |b: u64| {
            buckets.push(b);
            buckets.len() as u32 - 1
        };
        // Distinct buckets by a table over the region's buckets when it is not much larger than
        // the batch (one store and one load a key), else by a map.
        let bucket_of_key = if layout.buckets() <= 16 * keys.len() as u64 + 4096 {
            let mut index = vec![u32::MAX; layout.buckets() as usize];
            keys.iter()
                .map(|&k| {
                    let b = layout.bucket_of(k);
                    let at = &mut index[b as usize];
                    if *at == u32::MAX {
                        *at = first_seen(b);
                    }
                    *at
                })
                .collect()
        } else {
            let mut index = std::collections::HashMap::with_capacity(keys.len());
            keys.iter()
                .map(|&k| {
                    let b = layout.bucket_of(k);
                    *index.entry(b).or_insert_with(|| first_seen(b))
                })
                .collect()
        };
        Self {
            layout,
            keys,
            views: vec![None; buckets.len()],
            buckets,
            bucket_of_key,
            rows: Vec::new(),
            verified: Vec::new(),
            found: vec![Found::Pending; keys.len()],
        }
    }

    /// The `(offset, len)` in the region of each distinct bucket to read, by bucket index.
    pub fn bucket_reads(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.buckets
            .iter()
            .map(|&b| (self.layout.bucket_offset(b), BUCKET_BYTES as u32))
    }

    /// Takes a copy of bucket `i` (an index of [`SpanFind::bucket_reads`]); returns whether it
    /// verified. One that did not stays to be read again.
    pub fn take_bucket(&mut self, i: usize, image: &[u8]) -> bool {
        match Bucket::decode(image) {
            Ok(view) => {
                self.views[i] = Some(view);
                true
            }
            Err(_) => false,
        }
    }

    /// The buckets not verified yet, by index.
    pub fn torn_buckets(&self) -> Vec<usize> {
        (0..self.views.len())
            .filter(|&i| self.views[i].is_none())
            .collect()
    }

    /// Plans round two from the verified buckets: every candidate slot of every key whose bucket
    /// verified; a key without a candidate is absent (its bucket named no slot with its digest).
    pub fn plan_rows(&mut self) {
        self.rows.clear();
        self.found.fill(Found::Pending);
        for (j, &key) in self.keys.iter().enumerate() {
            let Some(view) = self.views[self.bucket_of_key[j] as usize] else {
                continue;
            };
            let first = self.layout.first_slot(self.layout.bucket_of(key));
            let before = self.rows.len();
            self.rows
                .extend(view.candidates(key).map(|i| (j as u32, first + i as u64)));
            if self.rows.len() == before {
                self.found[j] = Found::Absent;
            }
        }
        self.verified.clear();
        self.verified.resize(self.rows.len(), false);
    }

    /// The `(offset, len)` of each candidate row to read, by read index.
    pub fn row_reads(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let stride = self.layout.row().stride() as u32;
        self.rows
            .iter()
            .map(move |&(_, slot)| (self.layout.slot_offset(slot), stride))
    }

    /// Takes a copy of candidate read `r`: a verified row carrying its key decides the key; a
    /// verified row of another key rules that slot out; a copy that does not verify stays to be
    /// read again (unless its key was decided by another candidate). Returns whether the copy
    /// verified.
    pub fn take_row(&mut self, r: usize, image: &[u8]) -> bool {
        let (j, _) = self.rows[r];
        let j = j as usize;
        match match_row(self.layout.row(), self.keys[j], image) {
            Ok(found) => {
                if let (Some(version), Found::Pending) = (found, self.found[j]) {
                    self.found[j] = Found::Row { read: r, version };
                }
                self.verified[r] = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Ends round two's reading: each key still pending whose candidates all verified without
    /// carrying it is absent (the slots it was named in were given to other keys meanwhile).
    pub fn settle_rows(&mut self) {
        let mut unverified = vec![false; self.keys.len()];
        for (r, &(j, _)) in self.rows.iter().enumerate() {
            unverified[j as usize] |= !self.verified[r];
        }
        for (j, found) in self.found.iter_mut().enumerate() {
            let read = self.views[self.bucket_of_key[j] as usize].is_some();
            if *found == Found::Pending && read && !unverified[j] {
                *found = Found::Absent;
            }
        }
    }

    /// Candidate reads whose copy has not verified and whose key is still pending.
    pub fn torn_rows(&self) -> Vec<usize> {
        (0..self.rows.len())
            .filter(|&r| !self.verified[r] && self.found[self.rows[r].0 as usize] == Found::Pending)
            .collect()
    }

    /// The key (its index in the batch) that candidate read `r` is for.
    pub fn key_of_read(&self, r: usize) -> usize {
        self.rows[r].0 as usize
    }

    /// What became of each key, in the batch's order.
    pub fn found(&self) -> &[Found] {
        &self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;
    use std::collections::HashMap;

    #[test]
    fn a_bucket_image_is_byte_exact_and_refuses_any_flipped_bit() {
        assert_eq!(BUCKET_BYTES, 80);
        let mut b = Bucket::EMPTY;
        b.version = 3;
        b.digests[0] = 0x1234;
        b.digests[31] = 0xBEEF;
        let mut image = [0xAAu8; BUCKET_BYTES];
        b.encode(&mut image);
        assert_eq!(&image[..8], &6u64.to_le_bytes());
        assert_eq!(&image[8..10], &0x1234u16.to_le_bytes());
        assert_eq!(&image[70..72], &0xBEEFu16.to_le_bytes());
        assert_eq!(&image[72..76], &crc32c::crc32c(&image[..72]).to_le_bytes());
        assert_eq!(&image[76..], &[0; 4]);
        assert_eq!(Bucket::decode(&image), Ok(b));
        for byte in 0..76 {
            let mut bad = image;
            bad[byte] ^= 0x04;
            assert!(
                Bucket::decode(&bad).is_err(),
                "flip in byte {byte} accepted"
            );
        }
        assert!(
            Bucket::decode(&[0u8; BUCKET_BYTES]).is_err(),
            "zeros are no bucket"
        );
    }

    #[test]
    fn a_keyed_row_carries_its_key_under_the_checksum() {
        let l = RowLayout::keyed(3);
        assert_eq!(
            (l.stride(), l.payload_offset(), l.crc_offset()),
            (32, 16, 28)
        );
        let mut image = vec![0u8; l.stride()];
        row::encode_keyed_image(&l, 4, u64::MAX, &[1.0, 2.0, 3.0], &mut image);
        assert_eq!(&image[8..16], &u64::MAX.to_le_bytes());
        assert_eq!(match_row(&l, u64::MAX, &image), Ok(Some(4)));
        assert_eq!(match_row(&l, 0, &image), Ok(None), "another key's row");
        image[9] ^= 1;
        assert!(
            match_row(&l, u64::MAX, &image).is_err(),
            "the key is checksummed"
        );
    }

    #[test]
    fn layouts_round_capacity_up_to_whole_buckets_and_refuse_what_cannot_be() {
        let l = KeyedLayout::with_capacity(4, 33).unwrap();
        assert_eq!((l.buckets(), l.capacity()), (2, 64));
        assert_eq!(l.slot_offset(0), 2 * BUCKET_BYTES as u64);
        assert_eq!(l.region_bytes(), 160 + 64 * l.row().stride() as u64);
        assert_eq!(
            KeyedLayout::with_capacity(4, 0),
            Err(KeyedError::NoCapacity)
        );
        assert!(matches!(
            KeyedLayout::with_capacity(1 << 16, u64::MAX / 4),
            Err(KeyedError::TooLarge { .. })
        ));
        // Every key's bucket is in range, including the extremes.
        for key in [0, 1, u64::MAX, u64::MAX - 1, 1 << 63] {
            assert!(l.bucket_of(key) < l.buckets());
            assert_ne!(digest_of(key), EMPTY);
        }
    }

    #[test]
    fn a_one_sided_lookup_decides_nothing_on_a_copy_that_does_not_verify() {
        let layout = KeyedLayout::with_capacity(2, BUCKET_SLOTS as u64).unwrap();
        let region = Region::anonymous(layout.region_bytes()).unwrap();
        let keyed = KeyedRegion::new(&layout, region.words());
        keyed.format();
        let mut image = vec![0u8; layout.row().stride()];
        keyed.publish(5, 42, 3, &[1.0, 2.0], &mut image);
        let copy = |(offset, len): (u64, u32)| {
            let mut image = Vec::new();
            row::copy_span(region.words(), offset, len as usize, &mut image);
            image
        };
        let keys = [42, 43, 42];
        let mut plan = SpanFind::new(layout, &keys);
        let reads: Vec<_> = plan.bucket_reads().collect();
        assert_eq!(reads.len(), 1, "one bucket, read once for the batch");
        let mut torn = copy(reads[0]);
        torn[9] ^= 1;
        assert!(!plan.take_bucket(0, &torn));
        assert_eq!(plan.torn_buckets(), [0]);
        plan.plan_rows();
        assert_eq!(
            plan.row_reads().count(),
            0,
            "no row of an unverified bucket"
        );
        plan.settle_rows();
        assert_eq!(plan.found(), [Found::Pending; 3], "left to the daemon");
        assert!(plan.take_bucket(0, &copy(reads[0])));
        plan.plan_rows();
        // 43 has no slot with its digest: absent without a row read.
        assert_eq!(plan.found()[1], Found::Absent);
        let rows: Vec<_> = plan.row_reads().collect();
        assert_eq!(rows.len(), 2, "42's slot, once for each of its lookups");
        assert_eq!((plan.key_of_read(0), plan.key_of_read(1)), (0, 2));
        let mut torn = copy(rows[0]);
        torn[20] ^= 1;
        assert!(!plan.take_row(0, &torn));
        assert!(plan.take_row(1, &copy(rows[1])));
        plan.settle_rows();
        assert_eq!(
            plan.torn_rows(),
            [0],
            "the first lookup of 42 is read again"
        );
        assert_eq!(plan.found()[0], Found::Pending);
        assert_eq!(
            plan.found()[2],
            Found::Row {
                read: 1,
                version: 3
            }
        );
        assert!(plan.take_row(0, &copy(rows[0])));
        assert_eq!(
            plan.found()[0],
            Found::Row {
                read: 0,
                version: 3
            }
        );
    }

    /// The writer's decisions against a model: a map of key → (version, payload) with a score per
    /// key, under random inserts, updates, removals and evictions of a small region.
    #[test]
    fn placements_follow_a_model_of_buckets_with_lowest_score_eviction() {
        let layout = KeyedLayout::with_capacity(2, 4 * BUCKET_SLOTS as u64).unwrap();
        let region = Region::anonymous(layout.region_bytes()).unwrap();
        let keyed = KeyedRegion::new(&layout, region.words());
        keyed.format();
        let mut model: HashMap<u64, (u64, u64)> = HashMap::new(); // key → (slot, version)
        let mut score = vec![0u64; layout.capacity() as usize];
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut image = vec![0u8; layout.row().stride()];
        let mut evictions = 0;
        for step in 1..20_000u64 {
            // A key space of 8x the capacity, with the extremes in it.
            let key = match next() % 1024 {
                0 => u64::MAX,
                1 => 0,
                k => k.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            };
            if next().is_multiple_of(10) {
                if let Some((slot, _)) = model.remove(&key) {
                    keyed.remove(layout.bucket_of(key), slot);
                }
            } else {
                match keyed.place(key, |s| score[s as usize], &mut image).unwrap() {
                    Placement::Resident { slot, version: at } => {
                        let (held, version) = model.get_mut(&key).expect("resident in the model");
                        assert_eq!((*held, *version), (slot, at));
                        *version += 1;
                        keyed.write(
                            slot,
                            key,
                            *version,
                            &[key as f32, *version as f32],
                            &mut image,
                        );
                    }
                    Placement::Free(slot) => {
                        assert!(!model.contains_key(&key));
                        assert!(model.values().all(|&(s, _)| s != slot), "free slot held");
                        keyed.publish(slot, key, 0, &[key as f32, 0.0], &mut image);
                        model.insert(key, (slot, 0));
                    }
                    Placement::Evict {
                        slot,
                        key: victim,
                        version,
                    } => {
                        evictions += 1;
                        let bucket = layout.bucket_of(key);
                        let first = layout.first_slot(bucket);
                        // The bucket is full in the model too, and the victim has its lowest score.
                        let held: Vec<_> = model
                            .iter()
                            .filter(|(_, &(s, _))| {
                                (first..first + BUCKET_SLOTS as u64).contains(&s)
                            })
                            .collect();
                        assert_eq!(held.len(), BUCKET_SLOTS);
                        assert_eq!(model[&victim], (slot, version));
                        let lowest = held.iter().map(|(_, &(s, _))| score[s as usize]).min();
                        assert_eq!(Some(score[slot as usize]), lowest);
                        model.remove(&victim);
                        keyed.publish(slot, key, 0, &[key as f32, 0.0], &mut image);
                        model.insert(key, (slot, 0));
                    }
                }
                let slot = model[&key].0;
                score[slot as usize] = step;
            }
            assert!(model.len() as u64 <= layout.capacity());
            // Probe a few keys: found exactly where the model says, at its version.
            for probe in [key, next() % 1024] {
                let found = keyed.find(probe, &mut image, 4).unwrap();
                let want = model
                    .get(&probe)
                    .map(|&(slot, version)| Located { slot, version });
                assert_eq!(found, want, "key {probe} at step {step}");
            }
            // Every so often, a batch of keys (held, absent, repeated) looked up with memory
            // loaded ahead answers what the model says, key by key, with each found key's row.
            if step % 97 == 0 {
                let batch: Vec<u64> = (0..1 + next() % 40)
                    .map(|_| match next() % 3 {
                        0 => key,
                        _ => (next() % 1024).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    })
                    .collect();
                let mut seen = 0;
                keyed
                    .find_batch(&batch, &mut image, 4, |j, found, row| {
                        assert_eq!(j, seen, "in order");
                        seen += 1;
                        let want = model
                            .get(&batch[j])
                            .map(|&(slot, version)| Located { slot, version });
                        assert_eq!(found, want, "key {} of a batch at step {step}", batch[j]);
                        if found.is_some() {
                            assert_eq!(layout.row().key(row), Some(batch[j]));
                        }
                    })
                    .unwrap();
                assert_eq!(seen, batch.len());
                // The same batch as a one-sided reader looks it up: spans copied in two rounds.
                let copy = |(offset, len): (u64, u32)| {
                    let mut image = Vec::new();
                    row::copy_span(region.words(), offset, len as usize, &mut image);
                    image
                };
                let mut plan = SpanFind::new(layout, &batch);
                let reads: Vec<_> = plan.bucket_reads().collect();
                for (i, &read) in reads.iter().enumerate() {
                    assert!(plan.take_bucket(i, &copy(read)));
                }
                assert!(plan.torn_buckets().is_empty());
                plan.plan_rows();
                let reads: Vec<_> = plan.row_reads().collect();
                for (r, &read) in reads.iter().enumerate() {
                    assert!(plan.take_row(r, &copy(read)));
                }
                plan.settle_rows();
                for (j, found) in plan.found().iter().enumerate() {
                    let want = model.get(&batch[j]);
                    match (*found, want) {
                        (Found::Absent, None) => {}
                        (Found::Row { read, version }, Some(&(slot, at))) => {
                            assert_eq!(version, at, "key {} at step {step}", batch[j]);
                            assert_eq!(reads[read].0, layout.slot_offset(slot));
                        }
                        (found, want) => panic!(
                            "key {} at step {step}: one-sided {found:?}, model {want:?}",
                            batch[j]
                        ),
                    }
                }
            }
        }
        assert!(evictions > 1000, "the test evicts ({evictions})");
    }
}
