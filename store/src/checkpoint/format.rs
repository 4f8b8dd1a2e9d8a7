//! The bytes of a checkpoint (docs/CHECKPOINTS.md sections 2 and 3): table files and manifests,
//! written and read as streams. Nothing here touches a file system; the readers trust nothing they
//! read and never allocate more than one block (at most [`MAX_BLOCK_BYTES`] plus one record).

use std::io::{self, Read, Write};

use hetkv_transport::wire::{decode_header, encode_record};
use hetkv_transport::{row, TableSpec};
use serde::{Deserialize, Serialize};

use super::CheckpointError;

/// Version of the checkpoint format.
pub const FORMAT: u32 = 2;
/// First bytes of a table file.
pub const TABLE_MAGIC: [u8; 4] = *b"HKVC";
/// First bytes of a table file's trailer.
pub const TRAILER_MAGIC: [u8; 4] = *b"HKVE";
/// First bytes of a manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"HKVM";
/// Most rows in one block.
pub const MAX_BLOCK_ROWS: u32 = 65_536;
/// Records of a block fill about this many bytes (one record at least).
pub const MAX_BLOCK_BYTES: usize = 1 << 20;
/// Largest encoded spec in a header.
pub const MAX_SPEC_BYTES: u32 = 65_536;
/// Largest manifest body.
pub const MAX_MANIFEST_BYTES: u32 = 16 << 20;
/// Bytes of the fixed part of a header, before the spec.
const HEADER_FIXED: usize = 52;
/// Bytes of a trailer.
const TRAILER_BYTES: usize = 32;

/// Full or incremental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Every row.
    Full,
    /// The rows changed since the parent checkpoint.
    Incremental,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Self::Full => 0,
            Self::Incremental => 1,
        }
    }

    /// `full` or `incremental`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }
}

/// The shape of one row record of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordShape {
    /// f32 values of the row.
    pub dim: usize,
    /// f32 optimizer values of the row.
    pub state_len: usize,
    /// Whether the record ends with a step count (Adam).
    pub steps: bool,
    /// A dynamic table's record: its index is the row's slot, and it ends with the row's key
    /// and eviction score.
    pub keyed: bool,
}

impl RecordShape {
    /// Bytes of one record.
    pub fn len(&self) -> usize {
        self.key_at() + if self.keyed { 16 } else { 0 }
    }

    /// Where a keyed record's key is (after the step count, if any).
    fn key_at(&self) -> usize {
        16 + 4 * self.dim + 4 * self.state_len + if self.steps { 8 } else { 0 }
    }

    /// Writes a keyed record's key and score into `out` (already filled by [`Self::encode`]).
    pub fn encode_key(&self, key: u64, score: u64, out: &mut [u8]) {
        debug_assert!(self.keyed);
        let at = self.key_at();
        out[at..at + 8].copy_from_slice(&key.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&score.to_le_bytes());
    }

    /// Always false: a record holds at least its index and version.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Rows per block for records of this shape.
    pub fn block_rows(&self) -> u32 {
        (MAX_BLOCK_BYTES / self.len()).clamp(1, MAX_BLOCK_ROWS as usize) as u32
    }

    /// Encodes one record into `out` (of [`Self::len`] bytes). `values` are the row's payload
    /// bytes as stored in the region (f32 little-endian).
    pub fn encode(
        &self,
        index: u64,
        version: u64,
        values: &[u8],
        state: &[f32],
        step: u64,
        out: &mut [u8],
    ) {
        debug_assert_eq!(out.len(), self.len());
        debug_assert_eq!(values.len(), 4 * self.dim);
        debug_assert_eq!(state.len(), self.state_len);
        out[0..8].copy_from_slice(&index.to_le_bytes());
        out[8..16].copy_from_slice(&version.to_le_bytes());
        let mut at = 16 + values.len();
        out[16..at].copy_from_slice(values);
        for s in state {
            out[at..at + 4].copy_from_slice(&s.to_le_bytes());
            at += 4;
        }
        if self.steps {
            out[at..at + 8].copy_from_slice(&step.to_le_bytes());
        }
    }
}

/// One record, borrowed from a reader's block.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    shape: RecordShape,
    bytes: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// The local index.
    pub fn index(&self) -> u64 {
        u64_at(self.bytes, 0)
    }

    /// The version.
    pub fn version(&self) -> u64 {
        u64_at(self.bytes, 8)
    }

    /// The values as stored (f32 little-endian).
    pub fn value_bytes(&self) -> &'a [u8] {
        &self.bytes[16..16 + 4 * self.shape.dim]
    }

    /// The optimizer state, decoded into `out` (of the shape's `state_len`).
    pub fn state_into(&self, out: &mut [f32]) {
        let at = 16 + 4 * self.shape.dim;
        for (v, c) in out
            .iter_mut()
            .zip(self.bytes[at..at + 4 * self.shape.state_len].chunks_exact(4))
        {
            *v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    }

    /// The step count (0 without one).
    pub fn step(&self) -> u64 {
        if self.shape.steps {
            u64_at(self.bytes, self.shape.key_at() - 8)
        } else {
            0
        }
    }

    /// A keyed record's key and eviction score (`None` for a fixed table's record).
    pub fn key_and_score(&self) -> Option<(u64, u64)> {
        let at = self.shape.key_at();
        self.shape
            .keyed
            .then(|| (u64_at(self.bytes, at), u64_at(self.bytes, at + 8)))
    }

    /// The first element of the values, then the optimizer state, that is NaN or infinite.
    pub fn first_non_finite(&self) -> Option<usize> {
        const EXPONENT: u32 = 0x7f80_0000;
        self.bytes[16..16 + 4 * (self.shape.dim + self.shape.state_len)]
            .chunks_exact(4)
            .position(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) & EXPONENT == EXPONENT)
    }

    /// The whole record's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// A record of `shape` read whole from a file already checked (`bytes` is one record).
    pub(crate) fn of(shape: RecordShape, bytes: &'a [u8]) -> Self {
        debug_assert_eq!(bytes.len(), shape.len());
        Self { shape, bytes }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// What a table file's header says.
#[derive(Clone, Debug, PartialEq)]
pub struct FileHeader {
    /// Full or incremental.
    pub kind: Kind,
    /// Shard index.
    pub shard: u32,
    /// Shards in the cluster.
    pub shards: u32,
    /// Rows of the table on this shard.
    pub local_rows: u64,
    /// The table clock when the snapshot of this table began.
    pub clock_start: u64,
    /// The table.
    pub spec: TableSpec,
    /// The shape of its records.
    pub shape: RecordShape,
}

impl FileHeader {
    /// Encodes the header.
    pub fn encode(&self) -> Vec<u8> {
        let spec = encode_record(&self.spec);
        let mut out = Vec::with_capacity(HEADER_FIXED + spec.len() + 4);
        out.extend_from_slice(&TABLE_MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&[self.kind.byte(), 0, 0, 0]);
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.shards.to_le_bytes());
        out.extend_from_slice(&self.shape.block_rows().to_le_bytes());
        out.extend_from_slice(&self.local_rows.to_le_bytes());
        out.extend_from_slice(&self.clock_start.to_le_bytes());
        out.extend_from_slice(&(self.shape.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.shape.state_len as u32).to_le_bytes());
        out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_FIXED);
        out.extend_from_slice(&spec);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// What a writer hands back: the file's summary for the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSummary {
    /// Records written.
    pub rows: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

/// Writes one table file to `W`, block by block.
#[derive(Debug)]
pub struct TableFileWriter<W: Write> {
    out: W,
    shape: RecordShape,
    block_rows: u32,
    block: Vec<u8>,
    in_block: u32,
    blocks: u32,
    rows: u64,
    bytes: u64,
    crc: u32,
    next_index: u64,
    local_rows: u64,
}

impl<W: Write> TableFileWriter<W> {
    /// Writes `header` and returns the writer for its records.
    pub fn new(mut out: W, header: &FileHeader) -> io::Result<Self> {
        let head = header.encode();
        out.write_all(&head)?;
        let shape = header.shape;
        Ok(Self {
            out,
            shape,
            block_rows: shape.block_rows(),
            block: Vec::with_capacity(8 + shape.block_rows() as usize * shape.len() + 4),
            in_block: 0,
            blocks: 0,
            rows: 0,
            bytes: head.len() as u64,
            crc: crc32c::crc32c(&head),
            next_index: 0,
            local_rows: header.local_rows,
        })
    }

    /// The room for the next record, to be filled with [`RecordShape::encode`]; `index` must be
    /// above the previous record's and below the table's local rows.
    pub fn next_record(&mut self, index: u64) -> io::Result<&mut [u8]> {
        assert!(
            index >= self.next_index && index < self.local_rows,
            "records are written in increasing index order within the table"
        );
        if self.in_block == self.block_rows {
            self.end_block()?;
        }
        if self.in_block == 0 {
            self.block.clear();
            self.block.extend_from_slice(&[0; 8]);
        }
        self.next_index = index + 1;
        self.in_block += 1;
        self.rows += 1;
        let at = self.block.len();
        self.block.resize(at + self.shape.len(), 0);
        Ok(&mut self.block[at..])
    }

    /// Appends a record already encoded (as a reader hands it out).
    pub fn copy_record(&mut self, record: &RecordView<'_>) -> io::Result<()> {
        let room = self.next_record(record.index())?;
        room.copy_from_slice(record.bytes());
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn end_block(&mut self) -> io::Result<()> {
        if self.in_block == 0 {
            return Ok(());
        }
        self.block[0..4].copy_from_slice(&self.in_block.to_le_bytes());
        let len = self.block.len();
        let crc = crc32c::crc32c(&self.block);
        self.block.extend_from_slice(&crc.to_le_bytes());
        self.out.write_all(&self.block)?;
        // The file's CRC from the block's, without a second pass over the block.
        self.crc = crc32c::crc32c_append(
            crc32c::crc32c_combine(self.crc, crc, len),
            &crc.to_le_bytes(),
        );
        self.bytes += self.block.len() as u64;
        self.blocks += 1;
        self.in_block = 0;
        Ok(())
    }

    /// Writes the last block and the trailer; returns the sink and the file's summary.
    pub fn finish(mut self, clock_end: u64) -> io::Result<(W, FileSummary)> {
        self.end_block()?;
        let mut t = Vec::with_capacity(TRAILER_BYTES);
        t.extend_from_slice(&TRAILER_MAGIC);
        t.extend_from_slice(&[0; 4]);
        t.extend_from_slice(&self.rows.to_le_bytes());
        t.extend_from_slice(&clock_end.to_le_bytes());
        t.extend_from_slice(&self.blocks.to_le_bytes());
        let crc = crc32c::crc32c(&t);
        t.extend_from_slice(&crc.to_le_bytes());
        self.put(&t)?;
        self.out.flush()?;
        let summary = FileSummary {
            rows: self.rows,
            bytes: self.bytes,
            crc32c: self.crc,
        };
        Ok((self.out, summary))
    }
}

/// Reads one table file from `R`, verifying as it goes; an error names the file (`label`), the
/// block and its offset.
#[derive(Debug)]
pub struct TableFileReader<R: Read> {
    input: R,
    label: String,
    header: FileHeader,
    block_rows: u32,
    block: Vec<u8>,
    in_block: u32,
    taken: u32,
    blocks: u32,
    rows: u64,
    offset: u64,
    crc: u32,
    next_index: u64,
    trailer: Option<Trailer>,
}

/// What a table file's trailer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Records in the file.
    pub rows: u64,
    /// The table clock after the last row was copied.
    pub clock_end: u64,
    /// Blocks in the file.
    pub blocks: u32,
}

impl<R: Read> TableFileReader<R> {
    /// Reads and checks the header.
    pub fn open(mut input: R, label: impl Into<String>) -> Result<Self, CheckpointError> {
        let label = label.into();
        let corrupt = |what: String| CheckpointError::Corrupt {
            file: label.clone(),
            what,
        };
        let mut fixed = [0u8; HEADER_FIXED];
        read_exact(&mut input, &mut fixed, &label, "the header")?;
        if fixed[0..4] != TABLE_MAGIC {
            return Err(corrupt(format!(
                "it starts with {:02x?}, not the table file magic {:02x?} (HKVC)",
                &fixed[0..4],
                TABLE_MAGIC
            )));
        }
        let format = u32_at(&fixed, 4);
        if format != FORMAT {
            return Err(corrupt(format!(
                "format version {format}; this daemon reads version {FORMAT}"
            )));
        }
        let kind = match fixed[8] {
            0 => Kind::Full,
            1 => Kind::Incremental,
            k => return Err(corrupt(format!("kind byte {k} is neither 0 nor 1"))),
        };
        let spec_len = u32_at(&fixed, 48);
        if spec_len == 0 || spec_len > MAX_SPEC_BYTES {
            return Err(corrupt(format!(
                "a spec of {spec_len} bytes (at most {MAX_SPEC_BYTES})"
            )));
        }
        let mut rest = vec![0u8; spec_len as usize + 4];
        read_exact(&mut input, &mut rest, &label, "the header's spec")?;
        let (spec_bytes, crc_bytes) = rest.split_at(spec_len as usize);
        let mut crc = crc32c::crc32c(&fixed);
        crc = crc32c::crc32c_append(crc, spec_bytes);
        if crc != u32_at(crc_bytes, 0) {
            return Err(corrupt("the header's checksum does not match".into()));
        }
        let spec: TableSpec =
            decode_header(spec_bytes).map_err(|e| corrupt(format!("the header's spec: {e}")))?;
        spec.validate()
            .map_err(|e| corrupt(format!("the header's spec is invalid: {}", e.0)))?;
        let shape = RecordShape::of(&spec);
        let (block_rows, record_len, state_len) =
            (u32_at(&fixed, 20), u32_at(&fixed, 40), u32_at(&fixed, 44));
        if record_len as usize != shape.len() || state_len as usize != shape.state_len {
            return Err(corrupt(format!(
                "records of {record_len} bytes with {state_len} optimizer values; table {} \
                 ({} optimizer, dim {}) has {} and {}",
                spec.name,
                spec.optimizer.name(),
                spec.dim,
                shape.len(),
                shape.state_len
            )));
        }
        if block_rows != shape.block_rows() {
            return Err(corrupt(format!(
                "{block_rows} rows per block; records of {record_len} bytes have {}",
                shape.block_rows()
            )));
        }
        let header = FileHeader {
            kind,
            shard: u32_at(&fixed, 12),
            shards: u32_at(&fixed, 16),
            local_rows: u64_at(&fixed, 24),
            clock_start: u64_at(&fixed, 32),
            spec,
            shape,
        };
        if header.shards == 0 || header.shard >= header.shards {
            return Err(corrupt(format!(
                "shard {} of {}",
                header.shard, header.shards
            )));
        }
        if header.local_rows != header.spec.local_rows(header.shard, header.shards) {
            return Err(corrupt(format!(
                "{} local rows; table {} of {} rows has {} on shard {} of {}",
                header.local_rows,
                header.spec.name,
                header.spec.rows,
                header.spec.local_rows(header.shard, header.shards),
                header.shard,
                header.shards
            )));
        }
        let offset = (HEADER_FIXED + rest.len()) as u64;
        let crc = crc32c::crc32c_append(crc, crc_bytes);
        Ok(Self {
            input,
            label,
            block_rows,
            block: Vec::new(),
            in_block: 0,
            taken: 0,
            blocks: 0,
            rows: 0,
            offset,
            crc,
            next_index: 0,
            trailer: None,
            header,
        })
    }

    /// The header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// The file's name in errors.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn corrupt(&self, what: String) -> CheckpointError {
        CheckpointError::Corrupt {
            file: self.label.clone(),
            what,
        }
    }

    /// The next record, or `None` after the trailer (read and checked, with nothing after it).
    pub fn next_record(&mut self) -> Result<Option<RecordView<'_>>, CheckpointError> {
        if self.trailer.is_some() {
            return Ok(None);
        }
        if self.taken == self.in_block && !self.read_block()? {
            return Ok(None);
        }
        let len = self.header.shape.len();
        let at = 8 + self.taken as usize * len;
        self.taken += 1;
        let view = RecordView {
            shape: self.header.shape,
            bytes: &self.block[at..at + len],
        };
        let index = view.index();
        if index < self.next_index || index >= self.header.local_rows {
            return Err(CheckpointError::Corrupt {
                file: self.label.clone(),
                what: format!(
                    "block {} holds local index {index} after {} (indices increase, below {})",
                    self.blocks - 1,
                    self.next_index as i128 - 1,
                    self.header.local_rows
                ),
            });
        }
        if view.version() > row::MAX_VERSION {
            return Err(CheckpointError::Corrupt {
                file: self.label.clone(),
                what: format!(
                    "block {}: local index {index} has version {}, above the largest a row may \
                     reach ({})",
                    self.blocks - 1,
                    view.version(),
                    row::MAX_VERSION
                ),
            });
        }
        if let Some(at) = view.first_non_finite() {
            return Err(CheckpointError::Corrupt {
                file: self.label.clone(),
                what: format!(
                    "block {}: local index {index} holds a non-finite {} (NaN or infinity)",
                    self.blocks - 1,
                    if at < self.header.shape.dim {
                        format!("value at element {at}")
                    } else {
                        format!("optimizer state at element {}", at - self.header.shape.dim)
                    }
                ),
            });
        }
        // A dynamic table's full file holds its occupied slots only.
        if self.header.kind == Kind::Full && !self.header.shape.keyed && index != self.next_index {
            return Err(CheckpointError::Corrupt {
                file: self.label.clone(),
                what: format!(
                    "block {} of a full file skips from index {} to {index}",
                    self.blocks - 1,
                    self.next_index as i128 - 1
                ),
            });
        }
        self.next_index = index + 1;
        Ok(Some(view))
    }

    /// Reads the next block (true) or the trailer (false).
    fn read_block(&mut self) -> Result<bool, CheckpointError> {
        let at = self.offset;
        let mut head = [0u8; 8];
        read_exact(
            &mut self.input,
            &mut head,
            &self.label,
            &format!("block {} or the trailer at offset {at}", self.blocks),
        )?;
        if head[0..4] == TRAILER_MAGIC {
            return self.read_trailer(head).map(|_| false);
        }
        let rows = u32_at(&head, 0);
        if rows == 0 || rows > self.block_rows || u32_at(&head, 4) != 0 {
            return Err(self.corrupt(format!(
                "block {} at offset {at} claims {rows} rows (1 to {} per block)",
                self.blocks, self.block_rows
            )));
        }
        let len = 8 + rows as usize * self.header.shape.len();
        self.block.clear();
        self.block.extend_from_slice(&head);
        self.block.resize(len + 4, 0);
        read_exact(
            &mut self.input,
            &mut self.block[8..],
            &self.label,
            &format!("block {} at offset {at}", self.blocks),
        )?;
        let crc = u32_at(&self.block, len);
        let computed = crc32c::crc32c(&self.block[..len]);
        if computed != crc {
            return Err(self.corrupt(format!(
                "block {} at offset {at} fails its checksum",
                self.blocks
            )));
        }
        self.crc = crc32c::crc32c_append(
            crc32c::crc32c_combine(self.crc, computed, len),
            &self.block[len..],
        );
        self.offset += self.block.len() as u64;
        self.blocks += 1;
        self.rows += rows as u64;
        self.in_block = rows;
        self.taken = 0;
        Ok(true)
    }

    fn read_trailer(&mut self, head: [u8; 8]) -> Result<(), CheckpointError> {
        let at = self.offset;
        let mut t = [0u8; TRAILER_BYTES];
        t[..8].copy_from_slice(&head);
        read_exact(
            &mut self.input,
            &mut t[8..],
            &self.label,
            &format!("the trailer at offset {at}"),
        )?;
        if crc32c::crc32c(&t[..28]) != u32_at(&t, 28) || u32_at(&t, 4) != 0 {
            return Err(self.corrupt(format!("the trailer at offset {at} fails its checksum")));
        }
        let trailer = Trailer {
            rows: u64_at(&t, 8),
            clock_end: u64_at(&t, 16),
            blocks: u32_at(&t, 24),
        };
        if trailer.rows != self.rows || trailer.blocks != self.blocks {
            return Err(self.corrupt(format!(
                "the trailer counts {} rows in {} blocks; the file holds {} in {}",
                trailer.rows, trailer.blocks, self.rows, self.blocks
            )));
        }
        // A dynamic table's full file holds its held rows, fewer than its slots when not full.
        if self.header.kind == Kind::Full
            && !self.header.shape.keyed
            && self.rows != self.header.local_rows
        {
            return Err(self.corrupt(format!(
                "a full file of {} rows out of {}",
                self.rows, self.header.local_rows
            )));
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(self.corrupt(format!(
                    "bytes follow the trailer at offset {}",
                    at + TRAILER_BYTES as u64
                )))
            }
            Err(e) => {
                return Err(CheckpointError::Io {
                    path: self.label.clone(),
                    source: e,
                })
            }
        }
        self.crc = crc32c::crc32c_append(self.crc, &t);
        self.offset += TRAILER_BYTES as u64;
        self.trailer = Some(trailer);
        Ok(())
    }

    /// The trailer, once [`Self::next_record`] has returned `None`.
    pub fn trailer(&self) -> Option<Trailer> {
        self.trailer
    }

    /// The file's summary, once the trailer has been read.
    pub fn summary(&self) -> Option<FileSummary> {
        self.trailer.map(|t| FileSummary {
            rows: t.rows,
            bytes: self.offset,
            crc32c: self.crc,
        })
    }
}

impl RecordShape {
    /// The record shape of a (validated) spec's table.
    pub fn of(spec: &TableSpec) -> Self {
        let opt = crate::Optimizer::new(spec.optimizer);
        Self {
            dim: spec.dim as usize,
            state_len: opt.state_len(spec.dim as usize),
            steps: opt.has_steps(),
            keyed: spec.is_dynamic(),
        }
    }
}

fn read_exact<R: Read>(
    input: &mut R,
    buf: &mut [u8],
    label: &str,
    what: &str,
) -> Result<(), CheckpointError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => CheckpointError::Corrupt {
            file: label.to_string(),
            what: format!("it ends inside {what} (truncated)"),
        },
        _ => CheckpointError::Io {
            path: label.to_string(),
            source: e,
        },
    })
}

/// A checkpoint's manifest: what makes it exist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The checkpoint's name.
    pub name: String,
    /// Order among the directory's checkpoints: the largest is the newest.
    pub seq: u64,
    /// Full or incremental.
    pub kind: Kind,
    /// The checkpoint an incremental one builds on.
    pub parent: Option<String>,
    /// Shard index.
    pub shard: u32,
    /// Shards in the cluster.
    pub shards: u32,
    /// When it was committed (for people; nothing depends on it).
    pub created_unix_ms: u64,
    /// One entry per table, in creation order.
    pub tables: Vec<ManifestTable>,
    /// The push numbers the shard remembered of each client when the copy began (exactly-once
    /// pushes across a restore).
    #[serde(default)]
    pub sessions: Vec<crate::sessions::ClientRecord>,
}

/// A manifest's entry for one table file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestTable {
    /// The table's name.
    pub name: String,
    /// The file, in the checkpoint's directory.
    pub file: String,
    /// Full or incremental.
    pub kind: Kind,
    /// Records in the file.
    pub rows: u64,
    /// The file's length.
    pub bytes: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

impl Manifest {
    /// The manifest's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("a manifest encodes as JSON");
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a manifest's bytes; `label` names the file in errors.
    pub fn decode(bytes: &[u8], label: &str) -> Result<Self, CheckpointError> {
        let corrupt = |what: String| CheckpointError::Corrupt {
            file: label.to_string(),
            what,
        };
        if bytes.len() < 16 {
            return Err(corrupt(format!(
                "{} bytes are too few for a manifest",
                bytes.len()
            )));
        }
        if bytes[0..4] != MANIFEST_MAGIC {
            return Err(corrupt(format!(
                "it starts with {:02x?}, not the manifest magic {:02x?} (HKVM)",
                &bytes[0..4],
                MANIFEST_MAGIC
            )));
        }
        let format = u32_at(bytes, 4);
        if format != FORMAT {
            return Err(corrupt(format!(
                "format version {format}; this daemon reads version {FORMAT}"
            )));
        }
        let body_len = u32_at(bytes, 8);
        if body_len > MAX_MANIFEST_BYTES || bytes.len() != 16 + body_len as usize {
            return Err(corrupt(format!(
                "a body of {body_len} bytes in a file of {} (truncated or extended)",
                bytes.len()
            )));
        }
        let end = 12 + body_len as usize;
        if crc32c::crc32c(&bytes[..end]) != u32_at(bytes, end) {
            return Err(corrupt("the manifest fails its checksum".into()));
        }
        let m: Manifest = serde_json::from_slice(&bytes[12..end])
            .map_err(|e| corrupt(format!("the manifest's body: {e}")))?;
        if m.shards == 0 || m.shard >= m.shards {
            return Err(corrupt(format!("shard {} of {}", m.shard, m.shards)));
        }
        if (m.kind == Kind::Full) != m.parent.is_none() {
            return Err(corrupt(format!(
                "a {} checkpoint with parent {:?}",
                m.kind.name(),
                m.parent
            )));
        }
        for t in &m.tables {
            super::check_file_name(&t.file).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetkv_transport::{Initializer, OptimizerSpec};

    fn spec(optimizer: OptimizerSpec) -> TableSpec {
        TableSpec {
            name: "emb".into(),
            rows: 10,
            dim: 3,
            init: Initializer::Zeros,
            optimizer,
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        }
    }

    fn header(kind: Kind, spec: TableSpec) -> FileHeader {
        FileHeader {
            kind,
            shard: 1,
            shards: 2,
            local_rows: spec.local_rows(1, 2),
            clock_start: 7,
            shape: RecordShape::of(&spec),
            spec,
        }
    }

    fn write(h: &FileHeader, indices: &[u64]) -> (Vec<u8>, FileSummary) {
        let mut w = TableFileWriter::new(Vec::new(), h).unwrap();
        let shape = h.shape;
        for &i in indices {
            let values: Vec<u8> = (0..shape.dim)
                .flat_map(|j| (i as f32 + j as f32 / 10.0).to_le_bytes())
                .collect();
            let state: Vec<f32> = (0..shape.state_len).map(|j| j as f32 + 0.5).collect();
            let room = w.next_record(i).unwrap();
            shape.encode(i, i * 10, &values, &state, i + 100, room);
        }
        let (bytes, summary) = w.finish(42).unwrap();
        (bytes, summary)
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(u64, u64, u64)>, CheckpointError> {
        let mut r = TableFileReader::open(bytes, "t00000.hkc")?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push((rec.index(), rec.version(), rec.step()));
        }
        let s = r.summary().unwrap();
        assert_eq!(s.bytes, bytes.len() as u64);
        assert_eq!(s.crc32c, crc32c::crc32c(bytes));
        Ok(out)
    }

    #[test]
    fn a_table_file_reads_back_what_was_written() {
        let adam = OptimizerSpec::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
        };
        let h = header(Kind::Full, spec(adam));
        assert_eq!(h.shape.len(), 16 + 12 + 24 + 8);
        let (bytes, summary) = write(&h, &[0, 1, 2, 3, 4]);
        assert_eq!(summary.rows, 5);
        assert_eq!(summary.crc32c, crc32c::crc32c(&bytes));
        let rows = read_all(&bytes).unwrap();
        assert_eq!(
            rows,
            (0..5).map(|i| (i, i * 10, i + 100)).collect::<Vec<_>>()
        );
        // The documented layout: magic, format, kind, shard, shards at their offsets.
        assert_eq!(&bytes[0..4], b"HKVC");
        assert_eq!(u32_at(&bytes, 4), 2);
        assert_eq!(bytes[8], 0);
        assert_eq!((u32_at(&bytes, 12), u32_at(&bytes, 16)), (1, 2));
        assert_eq!(u64_at(&bytes, 24), 5);
        assert_eq!(u64_at(&bytes, 32), 7);
        assert_eq!(&bytes[bytes.len() - 32..bytes.len() - 28], b"HKVE");
        assert_eq!(u64_at(&bytes, bytes.len() - 16), 42);
        let mut r = TableFileReader::open(&bytes[..], "x").unwrap();
        let first = r.next_record().unwrap().unwrap();
        let mut state = [0f32; 6];
        first.state_into(&mut state);
        assert_eq!(state, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]);
        assert_eq!(first.value_bytes()[4..8], 0.1f32.to_le_bytes());
    }

    #[test]
    fn an_incremental_file_may_skip_rows_and_a_full_one_may_not() {
        let h = header(Kind::Incremental, spec(OptimizerSpec::Sgd { lr: 0.1 }));
        let (bytes, _) = write(&h, &[1, 4]);
        assert_eq!(read_all(&bytes).unwrap().len(), 2);
        let (empty, _) = write(&h, &[]);
        assert!(read_all(&empty).unwrap().is_empty());
        let mut full = bytes.clone();
        full[8] = 0;
        let crc_at = HEADER_FIXED + encode_record(&h.spec).len();
        let crc = crc32c::crc32c(&full[..crc_at]);
        full[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        let err = read_all(&full).unwrap_err().to_string();
        assert!(err.contains("skips from index"), "{err}");
    }

    #[test]
    fn many_blocks_and_every_flipped_byte_is_refused() {
        // dim 3 SGD: 28-byte records, 37,449 rows a block; force several blocks with a big table.
        let mut s = spec(OptimizerSpec::Sgd { lr: 0.1 });
        s.rows = 2 * 80_000;
        let h = header(Kind::Full, s);
        let indices: Vec<u64> = (0..h.local_rows).collect();
        let (bytes, _) = write(&h, &indices);
        let mut r = TableFileReader::open(&bytes[..], "x").unwrap();
        while r.next_record().unwrap().is_some() {}
        assert_eq!(r.trailer().unwrap().blocks, 3);
        let step = bytes.len() / 997;
        for pos in (0..bytes.len())
            .step_by(step.max(1))
            .chain([bytes.len() - 1])
        {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[pos] ^= bit;
                assert!(read_all(&bad).is_err(), "a flip at byte {pos} was accepted");
            }
        }
        for cut in [0, 10, HEADER_FIXED + 3, bytes.len() / 2, bytes.len() - 1] {
            let err = read_all(&bytes[..cut]).unwrap_err().to_string();
            assert!(err.contains("truncated"), "cut at {cut}: {err}");
        }
        // Blocks swapped (each intact, with its own checksum) are refused too.
        let head = HEADER_FIXED + encode_record(&h.spec).len() + 4;
        let block = 8 + h.shape.block_rows() as usize * h.shape.len() + 4;
        let mut swapped = bytes.clone();
        swapped[head..head + 2 * block].rotate_left(block);
        let err = read_all(&swapped).unwrap_err().to_string();
        assert!(err.contains("block 0"), "{err}");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(read_all(&longer)
            .unwrap_err()
            .to_string()
            .contains("follow the trailer"));
    }

    #[test]
    fn a_block_failing_its_checksum_is_named_with_its_offset() {
        let h = header(Kind::Full, spec(OptimizerSpec::Sgd { lr: 0.1 }));
        let (mut bytes, _) = write(&h, &[0, 1, 2, 3, 4]);
        let first_block = HEADER_FIXED + encode_record(&h.spec).len() + 4;
        bytes[first_block + 20] ^= 4;
        let err = read_all(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("t00000.hkc") && err.contains(&format!("block 0 at offset {first_block}")),
            "{err}"
        );
    }

    #[test]
    fn a_manifest_round_trips_and_refuses_any_flip() {
        let m = Manifest {
            name: "step-100".into(),
            seq: 3,
            kind: Kind::Incremental,
            parent: Some("step-50".into()),
            shard: 0,
            shards: 2,
            created_unix_ms: 1,
            tables: vec![ManifestTable {
                name: "emb".into(),
                file: "t00000.hkc".into(),
                kind: Kind::Incremental,
                rows: 4,
                bytes: 300,
                crc32c: 0xdead_beef,
            }],
            sessions: vec![crate::sessions::ClientRecord {
                client: 5,
                floor: 2,
                words: "0000000000000014".into(),
            }],
        };
        let bytes = m.encode();
        assert_eq!(&bytes[0..4], b"HKVM");
        assert_eq!(Manifest::decode(&bytes, "MANIFEST").unwrap(), m);
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x20;
            assert!(Manifest::decode(&bad, "MANIFEST").is_err(), "byte {pos}");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1], "MANIFEST").is_err());
    }
}
