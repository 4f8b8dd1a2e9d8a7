//! The row format in registered memory (DESIGN section 4) and its writer and readers.
//!
//! ```text
//! offset 0          seq: u64 LE   even = stable, odd = a write is in progress; version = seq >> 1
//! offset 8          payload: dim x f32 LE
//! offset 8 + 4*dim  crc: u32 LE   CRC32C over bytes [0, 8 + 4*dim) with the low bit of seq clear
//! padding           to a multiple of 8 bytes (the stride)
//! ```
//!
//! A *keyed* row (the rows of a dynamic table, [`crate::keyed`]) carries its key in the word after
//! `seq`, under the checksum, and its payload from offset 16:
//!
//! ```text
//! offset 0          seq: u64 LE
//! offset 8          key: u64 LE
//! offset 16         payload: dim x f32 LE
//! offset 16 + 4*dim crc: u32 LE   CRC32C over bytes [0, 16 + 4*dim) with the low bit of seq clear
//! ```
//!
//! Row `i` of a region starts at `i * stride`. There is one writer per row at a time (the daemon
//! serialises writers per row); readers are lock-free and may be remote (RDMA), another process
//! (shared memory) or a daemon thread. A reader copies the whole row and accepts it only if `seq`
//! is even and the CRC matches, whatever order the words were fetched in.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::region::WORD;

/// Bytes of the seq word at the head of a row.
pub const SEQ_BYTES: usize = 8;
/// Bytes of the key word of a keyed row.
pub const KEY_BYTES: usize = 8;
/// Bytes of the CRC32C after the payload.
pub const CRC_BYTES: usize = 4;
/// Largest supported row dimension (keeps a row, and so a stride, far below any frame limit).
pub const MAX_DIM: u32 = 1 << 16;
/// How many times the in-process readers retry a torn copy before reporting it.
pub const DEFAULT_READ_ATTEMPTS: u32 = 64;

/// Geometry of one table's rows: the dimension, whether each row carries its key, and the stride
/// between rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    dim: u32,
    stride: u32,
    keyed: bool,
}

impl RowLayout {
    /// The layout for rows of `dim` f32 values. `dim` must be in `1..=MAX_DIM`.
    pub fn new(dim: u32) -> Self {
        Self::build(dim, false)
    }

    /// The layout for keyed rows of `dim` f32 values (the key under the checksum, for a dynamic
    /// table). `dim` must be in `1..=MAX_DIM`.
    pub fn keyed(dim: u32) -> Self {
        Self::build(dim, true)
    }

    fn build(dim: u32, keyed: bool) -> Self {
        assert!(
            (1..=MAX_DIM).contains(&dim),
            "row dim {dim} outside 1..={MAX_DIM} (validated by TableSpec before reaching here)"
        );
        let header = SEQ_BYTES + if keyed { KEY_BYTES } else { 0 };
        let unpadded = header as u32 + 4 * dim + CRC_BYTES as u32;
        let stride = unpadded.div_ceil(WORD as u32) * WORD as u32;
        Self { dim, stride, keyed }
    }

    /// Whether each row carries its key.
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// Offset of the payload within a row: after `seq`, and the key when rows carry one.
    pub fn payload_offset(&self) -> usize {
        SEQ_BYTES + if self.keyed { KEY_BYTES } else { 0 }
    }

    /// Number of f32 values in a row.
    pub fn dim(&self) -> usize {
        self.dim as usize
    }

    /// Bytes between the starts of consecutive rows (a multiple of 8).
    pub fn stride(&self) -> usize {
        self.stride as usize
    }

    /// Words between the starts of consecutive rows.
    pub fn stride_words(&self) -> usize {
        self.stride as usize / WORD
    }

    /// Offset of the CRC within a row, which is also the length of the checksummed prefix.
    pub fn crc_offset(&self) -> usize {
        self.payload_offset() + 4 * self.dim as usize
    }

    /// Byte offset of row `index` in its region.
    pub fn row_offset(&self, index: u64) -> u64 {
        index * self.stride as u64
    }

    /// Bytes needed for a region of `rows` rows.
    pub fn region_bytes(&self, rows: u64) -> u64 {
        rows.saturating_mul(self.stride as u64)
    }

    /// The payload bytes (dim x f32 LE) of a row image.
    pub fn payload<'a>(&self, image: &'a [u8]) -> &'a [u8] {
        &image[self.payload_offset()..self.crc_offset()]
    }

    /// The key of a keyed row image (`None` for a layout without keys). Meaningful once the
    /// image verified: the key is under the checksum.
    pub fn key(&self, image: &[u8]) -> Option<u64> {
        self.keyed.then(|| {
            u64::from_le_bytes(
                image[SEQ_BYTES..SEQ_BYTES + KEY_BYTES]
                    .try_into()
                    .expect("8 bytes"),
            )
        })
    }
}

/// Why a row copy was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// The seq word was odd: the copy overlapped a write.
    #[error("row copy overlapped a write (seq {seq} is odd)")]
    WriteInProgress {
        /// The seq word as copied.
        seq: u64,
    },
    /// The checksum did not match the copied bytes: the copy was torn (or memory is corrupt).
    #[error("row checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC stored in the row.
        stored: u32,
        /// CRC computed over the copy.
        computed: u32,
    },
    /// The copy was shorter than one stride.
    #[error("row image of {got} bytes, expected {expected}")]
    Length {
        /// Bytes supplied.
        got: usize,
        /// The layout's stride.
        expected: usize,
    },
}

/// Writes the stable image of a row (even seq for `version`, payload, CRC, zero padding) into
/// `image`, which must be exactly one stride long.
pub fn encode_image(layout: &RowLayout, version: u64, payload: &[f32], image: &mut [u8]) {
    assert!(!layout.is_keyed(), "a keyed row is encoded with its key");
    encode(layout, version, payload, image);
}

/// Writes the stable image of a keyed row (even seq for `version`, `key`, payload, CRC, zero
/// padding) into `image`, which must be exactly one stride of a keyed layout.
pub fn encode_keyed_image(
    layout: &RowLayout,
    version: u64,
    key: u64,
    payload: &[f32],
    image: &mut [u8],
) {
    assert!(layout.is_keyed(), "only a keyed layout has room for a key");
    image[SEQ_BYTES..SEQ_BYTES + KEY_BYTES].copy_from_slice(&key.to_le_bytes());
    encode(layout, version, payload, image);
}

fn encode(layout: &RowLayout, version: u64, payload: &[f32], image: &mut [u8]) {
    assert_eq!(
        payload.len(),
        layout.dim(),
        "payload length is the table's dim"
    );
    assert_eq!(image.len(), layout.stride(), "image length is the stride");
    image[..SEQ_BYTES].copy_from_slice(&seq_of(version).to_le_bytes());
    for (chunk, v) in image[layout.payload_offset()..layout.crc_offset()]
        .chunks_exact_mut(4)
        .zip(payload)
    {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    seal_image(layout, image);
}

/// Recomputes the CRC of an image whose seq and payload are in place, and zeroes the padding.
pub fn seal_image(layout: &RowLayout, image: &mut [u8]) {
    let crc_at = layout.crc_offset();
    let crc = crc32c::crc32c(&image[..crc_at]);
    image[crc_at..crc_at + CRC_BYTES].copy_from_slice(&crc.to_le_bytes());
    image[crc_at + CRC_BYTES..].fill(0);
}

/// Verifies a copied row image and returns its version. The payload is `layout.payload(image)`.
pub fn verify_image(layout: &RowLayout, image: &[u8]) -> Result<u64, RowError> {
    if image.len() < layout.stride() {
        return Err(RowError::Length {
            got: image.len(),
            expected: layout.stride(),
        });
    }
    let seq = u64::from_le_bytes(image[..SEQ_BYTES].try_into().expect("8 bytes"));
    if seq & 1 == 1 {
        return Err(RowError::WriteInProgress { seq });
    }
    let crc_at = layout.crc_offset();
    let stored = u32::from_le_bytes(
        image[crc_at..crc_at + CRC_BYTES]
            .try_into()
            .expect("4 bytes"),
    );
    let computed = crc32c::crc32c(&image[..crc_at]);
    if stored != computed {
        return Err(RowError::Checksum { stored, computed });
    }
    Ok(version_of(seq))
}

/// Decodes a verified image's payload into `out` (dim f32 values).
pub fn decode_payload(layout: &RowLayout, image: &[u8], out: &mut [f32]) {
    for (v, chunk) in out.iter_mut().zip(layout.payload(image).chunks_exact(4)) {
        *v = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
    }
}

/// Copies `image.len() / 8` words starting at word `first` with relaxed atomic loads.
pub fn copy_words(words: &[AtomicU64], first: usize, image: &mut [u8]) {
    let src = &words[first..first + image.len() / WORD];
    for (dst, w) in image.chunks_exact_mut(WORD).zip(src) {
        dst.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    fence(Ordering::Acquire);
}

/// Appends the bytes `[offset, offset + len)` of a region to `out` with relaxed atomic loads,
/// without verifying anything: what a NIC's READ of that span returns. The span must lie within
/// the region.
pub fn copy_span(words: &[AtomicU64], offset: u64, len: usize, out: &mut Vec<u8>) {
    if len == 0 {
        return;
    }
    let first = (offset / WORD as u64) as usize;
    let last = ((offset + len as u64).div_ceil(WORD as u64)) as usize;
    let skip = (offset % WORD as u64) as usize;
    let start = out.len();
    out.reserve(len + 2 * WORD);
    for w in &words[first..last] {
        out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    fence(Ordering::Acquire);
    out.drain(start..start + skip);
    out.truncate(start + len);
}

/// Copies row `index` into `image` (one stride) without verifying it: what a NIC does.
pub fn copy_row(words: &[AtomicU64], layout: &RowLayout, index: u64, image: &mut [u8]) {
    copy_words(words, index as usize * layout.stride_words(), image);
}

/// Outcome of a verified read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifiedRead {
    /// Version of the row that was read.
    pub version: u64,
    /// How many torn copies were discarded before this one.
    pub retries: u32,
}

/// The verifying reader: copies row `index` into `image` (one stride) until a copy verifies, at
/// most `attempts` times. On success the payload is `layout.payload(image)`.
pub fn read_row(
    words: &[AtomicU64],
    layout: &RowLayout,
    index: u64,
    image: &mut [u8],
    attempts: u32,
) -> Result<VerifiedRead, RowError> {
    let first = index as usize * layout.stride_words();
    let row = &words[first..first + layout.stride_words()];
    read_verified(row, image, attempts, |image| verify_image(layout, image))
        .map(|(version, retries)| VerifiedRead { version, retries })
}

/// The verifying reader's loop, for any image whose first word is a seq (a row, or a bucket of a
/// dynamic table): copies `words` into `image` until `verify` accepts the copy, at most
/// `attempts` times, and returns what it made of it with the number of torn copies discarded.
/// The one home of the retry rule.
pub fn read_verified<T>(
    words: &[AtomicU64],
    image: &mut [u8],
    attempts: u32,
    verify: impl Fn(&[u8]) -> Result<T, RowError>,
) -> Result<(T, u32), RowError> {
    let mut last = RowError::Length {
        got: 0,
        expected: image.len(),
    };
    for retries in 0..attempts.max(1) {
        copy_words(words, 0, image);
        match verify(image) {
            Ok(v) => return Ok((v, retries)),
            Err(e) => {
                last = e;
                std::hint::spin_loop();
            }
        }
    }
    Err(last)
}

/// Asks the CPU to start loading row `index` into its caches, so that a gather of random rows
/// overlaps their memory latencies (a verified read does too much work per row for the CPU to look
/// ahead by itself). Only a hint: no effect off x86_64 or for an index past the region.
pub fn prefetch_row(words: &[AtomicU64], layout: &RowLayout, index: u64) {
    let base = index as usize * layout.stride_words();
    if let Some(row) = words.get(base..base + layout.stride_words()) {
        crate::region::prefetch(row);
    }
}

/// The version a seq word stands for (`seq >> 1`): the row's version when the word is even, a
/// lower bound while it is odd (a write is under way). The one home of that rule.
pub fn version_of(seq: u64) -> u64 {
    seq >> 1
}

/// The largest version a row may reach: its seq word (`version << 1`, odd while written) fits in
/// 64 bits, and the protocol's base markers (`u64::MAX`, `u64::MAX - 1`) are never versions. A
/// checkpoint record above it is refused.
pub const MAX_VERSION: u64 = u64::MAX >> 2;

/// The stable seq word of a row at `version` (even).
pub fn seq_of(version: u64) -> u64 {
    version << 1
}

/// The seq word of row `index`: even = stable at version `seq >> 1`; odd = a write is under way
/// and the version is at least `seq >> 1`.
pub fn read_seq(words: &[AtomicU64], layout: &RowLayout, index: u64) -> u64 {
    words[index as usize * layout.stride_words()].load(Ordering::Acquire)
}

/// The writer protocol. The caller must be the only writer of row `index` for the duration of the
/// call, and `image` must hold the new stable image (from [`encode_image`] or [`seal_image`]).
///
/// Stores `old_seq | 1`, then the payload and CRC words, then the new even seq with Release.
pub fn write_row(words: &[AtomicU64], layout: &RowLayout, index: u64, image: &[u8]) {
    let base = index as usize * layout.stride_words();
    write_image(&words[base..base + layout.stride_words()], image);
}

/// The writer protocol over any sealed image whose first word is a seq (a row, or a bucket of a
/// dynamic table's index): the one home of its order. `row` is exactly the image's words; the
/// caller is their only writer for the duration of the call.
pub fn write_image(row: &[AtomicU64], image: &[u8]) {
    debug_assert_eq!(row.len() * WORD, image.len());
    let old = row[0].load(Ordering::Relaxed);
    row[0].store(old | 1, Ordering::Relaxed);
    fence(Ordering::Release);
    for (w, chunk) in row[1..].iter().zip(image[WORD..].chunks_exact(WORD)) {
        w.store(
            u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
            Ordering::Relaxed,
        );
    }
    let new_seq = u64::from_le_bytes(image[..WORD].try_into().expect("8 bytes"));
    debug_assert_eq!(new_seq & 1, 0, "a stable image has an even seq");
    row[0].store(new_seq, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;

    #[test]
    fn stride_has_12_to_16_bytes_overhead_and_is_word_aligned() {
        for dim in 1..300u32 {
            let l = RowLayout::new(dim);
            let overhead = l.stride() - 4 * dim as usize;
            assert!((12..=16).contains(&overhead), "dim {dim}: {overhead}");
            assert_eq!(l.stride() % 8, 0);
        }
        assert_eq!(RowLayout::new(64).stride(), 8 + 256 + 8);
        assert_eq!(RowLayout::new(3).stride(), 24);
    }

    #[test]
    fn image_layout_is_byte_exact() {
        let l = RowLayout::new(3);
        let mut img = vec![0xAAu8; l.stride()];
        encode_image(&l, 5, &[1.0, -2.0, 0.5], &mut img);
        assert_eq!(&img[..8], &10u64.to_le_bytes());
        assert_eq!(&img[8..12], &1.0f32.to_le_bytes());
        assert_eq!(&img[16..20], &0.5f32.to_le_bytes());
        let crc = crc32c::crc32c(&img[..20]);
        assert_eq!(&img[20..24], &crc.to_le_bytes());
        assert_eq!(verify_image(&l, &img), Ok(5));
    }

    #[test]
    fn verify_rejects_odd_seq_and_flipped_bits() {
        let l = RowLayout::new(8);
        let mut img = vec![0u8; l.stride()];
        encode_image(&l, 7, &[0.25; 8], &mut img);
        let mut odd = img.clone();
        odd[0] |= 1;
        assert!(matches!(
            verify_image(&l, &odd),
            Err(RowError::WriteInProgress { .. })
        ));
        for byte in 0..l.crc_offset() + CRC_BYTES {
            let mut bad = img.clone();
            bad[byte] ^= 0x10;
            assert!(
                verify_image(&l, &bad).is_err(),
                "flip in byte {byte} accepted"
            );
        }
        assert!(matches!(
            verify_image(&l, &img[..8]),
            Err(RowError::Length { .. })
        ));
    }

    #[test]
    fn write_then_read_round_trips_and_keeps_neighbours() {
        let l = RowLayout::new(5);
        let region = Region::anonymous(l.region_bytes(3)).unwrap();
        let mut img = vec![0u8; l.stride()];
        for (i, v) in [(0u64, 1.0f32), (1, 2.0), (2, 3.0)] {
            encode_image(&l, i + 1, &[v; 5], &mut img);
            write_row(region.words(), &l, i, &img);
        }
        let mut out = [0f32; 5];
        for (i, v) in [(0u64, 1.0f32), (1, 2.0), (2, 3.0)] {
            let r = read_row(region.words(), &l, i, &mut img, 4).unwrap();
            assert_eq!(r.version, i + 1);
            decode_payload(&l, &img, &mut out);
            assert_eq!(out, [v; 5]);
            assert_eq!(read_seq(region.words(), &l, i), (i + 1) << 1);
        }
    }

    #[test]
    fn copy_span_returns_unaligned_byte_ranges() {
        let region = Region::anonymous(32).unwrap();
        for (i, w) in region.words().iter().enumerate() {
            w.store(
                u64::from_le_bytes([
                    i as u8 * 8,
                    i as u8 * 8 + 1,
                    i as u8 * 8 + 2,
                    i as u8 * 8 + 3,
                    i as u8 * 8 + 4,
                    i as u8 * 8 + 5,
                    i as u8 * 8 + 6,
                    i as u8 * 8 + 7,
                ]),
                Ordering::Relaxed,
            );
        }
        for (off, len) in [(0u64, 32usize), (3, 7), (5, 20), (31, 1), (8, 0)] {
            let mut out = vec![0xEE];
            copy_span(region.words(), off, len, &mut out);
            let want: Vec<u8> = std::iter::once(0xEE)
                .chain(off as u8..off as u8 + len as u8)
                .collect();
            assert_eq!(out, want, "span {off}+{len}");
        }
    }

    #[test]
    fn a_zeroed_row_is_refused() {
        // Fresh memory has seq 0 but no valid CRC: it must never be taken for a row of zeros.
        let l = RowLayout::new(4);
        let region = Region::anonymous(l.region_bytes(1)).unwrap();
        let mut img = vec![0u8; l.stride()];
        assert!(matches!(
            read_row(region.words(), &l, 0, &mut img, 2),
            Err(RowError::Checksum { .. })
        ));
    }
}
