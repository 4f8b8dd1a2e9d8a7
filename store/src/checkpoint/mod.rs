//! Checkpoints under a data directory (docs/CHECKPOINTS.md): committing them crash-safely, listing,
//! verifying, reading chains back, compacting a chain into one full checkpoint, and moving a
//! cluster's checkpoint onto another shard count ([`reshard`]).
//!
//! The bytes live in [`mod@format`]; this module owns the files: where they go, the order of writes,
//! renames and fsyncs that makes a checkpoint exist only once it is whole, and the checks that
//! tie every file to its manifest. What a shard copies into a checkpoint and restores from one is
//! [`crate::Shard`]'s.

pub mod format;
mod reshard;

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

pub use format::{FileHeader, FileSummary, Kind, Manifest, ManifestTable, RecordShape};
use format::{RecordView, TableFileReader, TableFileWriter};
pub use reshard::reshard;

/// Errors of checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file that is not what it claims: named, with what is wrong and where.
    #[error("checkpoint file {file} is refused: {what}")]
    Corrupt {
        /// The file.
        file: String,
        /// What is wrong, and where (block, offset).
        what: String,
    },
    /// A file-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A request that cannot be done: a bad or taken name, a missing parent, another shard's
    /// checkpoint, one already being written.
    #[error("{0}")]
    Refused(String),
}

impl CheckpointError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The directory of checkpoints under a data directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The file that makes a checkpoint exist.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// Longest checkpoint name.
pub const MAX_NAME: usize = 128;
/// Longest chain of checkpoints followed back to a full one.
pub const MAX_CHAIN: usize = 10_000;

/// Checks a checkpoint name: 1 to 128 bytes of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn check_name(name: &str) -> Result<(), CheckpointError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CheckpointError::Refused(format!(
            "checkpoint name {name:?} is not 1 to {MAX_NAME} bytes of [A-Za-z0-9_.-] not \
             starting with '.'"
        )))
    }
}

/// The file name of the table with index `index` on its shard.
pub fn table_file_name(index: usize) -> String {
    format!("t{index:05}.hkc")
}

/// Checks a table file name as a manifest gives it (no path may escape the checkpoint).
pub(crate) fn check_file_name(file: &str) -> Result<(), CheckpointError> {
    let digits = file
        .strip_prefix('t')
        .and_then(|f| f.strip_suffix(".hkc"))
        .unwrap_or("");
    if digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(CheckpointError::Refused(format!(
            "{file:?} is not a table file name (tNNNNN.hkc)"
        )))
    }
}

/// What a checkpoint directory holds.
#[derive(Debug)]
pub enum Listing {
    /// A committed checkpoint.
    Committed(Manifest),
    /// A directory without a manifest: a crash or a failed write left it.
    Incomplete {
        /// Its name.
        name: String,
    },
    /// A manifest that cannot be read or is refused.
    Unreadable {
        /// Its name.
        name: String,
        /// Why.
        error: CheckpointError,
    },
}

/// The checkpoints of one data directory.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    /// The checkpoints under `data_dir` (nothing is created).
    pub fn at(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join(CHECKPOINTS_DIR),
        }
    }

    /// The checkpoints under `data_dir`, making the directory (0700) if needed.
    pub fn create(data_dir: &Path) -> Result<Self, CheckpointError> {
        let dir = Self::at(data_dir);
        make_private_dir(&dir.root)?;
        Ok(dir)
    }

    /// The directory holding the checkpoints.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of checkpoint `name`.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Every checkpoint directory: committed ones by `seq`, then the others by name.
    pub fn list(&self) -> Result<Vec<Listing>, CheckpointError> {
        check_real_dir(&self.root)?;
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CheckpointError::io(&self.root, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| CheckpointError::io(&self.root, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // The entry's own type: a symbolic link to a directory is not listed.
            if check_name(&name).is_err() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match self.manifest(&name) {
                Ok(m) => out.push(Listing::Committed(m)),
                Err(CheckpointError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    out.push(Listing::Incomplete { name })
                }
                Err(error) => out.push(Listing::Unreadable { name, error }),
            }
        }
        out.sort_by_key(|l| match l {
            Listing::Committed(m) => (0, m.seq, m.name.clone()),
            Listing::Incomplete { name } => (1, 0, name.clone()),
            Listing::Unreadable { name, .. } => (1, 0, name.clone()),
        });
        Ok(out)
    }

    /// The manifest of checkpoint `name`.
    pub fn manifest(&self, name: &str) -> Result<Manifest, CheckpointError> {
        check_name(name)?;
        check_real_dir(&self.root)?;
        check_real_dir(&self.path_of(name))?;
        let path = self.path_of(name).join(MANIFEST_FILE);
        let bytes = read_bounded(&path, format::MAX_MANIFEST_BYTES as u64 + 16)?;
        let m = Manifest::decode(&bytes, &path.display().to_string())?;
        if m.name != name {
            return Err(CheckpointError::Corrupt {
                file: path.display().to_string(),
                what: format!("it names checkpoint {:?}, in directory {name:?}", m.name),
            });
        }
        Ok(m)
    }

    /// The newest committed checkpoint (largest `seq`), if any. A manifest that cannot be read is
    /// an error: it might be the newest.
    pub fn newest(&self) -> Result<Option<Manifest>, CheckpointError> {
        let mut newest: Option<Manifest> = None;
        for l in self.list()? {
            match l {
                Listing::Committed(m) => {
                    if newest.as_ref().is_none_or(|n| m.seq > n.seq) {
                        newest = Some(m);
                    }
                }
                Listing::Incomplete { .. } => {}
                Listing::Unreadable { error, .. } => return Err(error),
            }
        }
        Ok(newest)
    }

    /// The `seq` the next checkpoint gets.
    pub fn next_seq(&self) -> Result<u64, CheckpointError> {
        let mut next = 1;
        for l in self.list()? {
            if let Listing::Committed(m) = l {
                next = next.max(m.seq + 1);
            }
        }
        Ok(next)
    }

    /// The chain that restores checkpoint `name`: its full root first, `name` last. Every link
    /// must be of the same shard and shard count, and older than the one after it.
    pub fn chain(&self, name: &str) -> Result<Vec<Manifest>, CheckpointError> {
        let mut chain = vec![self.manifest(name)?];
        while let Some(parent) = chain.last().and_then(|m| m.parent.clone()) {
            if chain.len() >= MAX_CHAIN {
                return Err(CheckpointError::Refused(format!(
                    "checkpoint {name}'s chain is longer than {MAX_CHAIN}: compact it"
                )));
            }
            let child = chain.last().expect("not empty");
            let m = self.manifest(&parent).map_err(|e| match e {
                CheckpointError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    CheckpointError::Refused(format!(
                        "checkpoint {} is incremental on {parent}, which is missing or \
                         incomplete in {}",
                        child.name,
                        self.root.display()
                    ))
                }
                e => e,
            })?;
            if (m.shard, m.shards) != (child.shard, child.shards) || m.seq >= child.seq {
                return Err(CheckpointError::Refused(format!(
                    "checkpoint {} (shard {} of {}, seq {}) cannot build on {} (shard {} of {}, \
                     seq {})",
                    child.name,
                    child.shard,
                    child.shards,
                    child.seq,
                    m.name,
                    m.shard,
                    m.shards,
                    m.seq
                )));
            }
            chain.push(m);
        }
        chain.reverse();
        Ok(chain)
    }

    /// The files that restore table `table` from `chain`: from its newest full file on, oldest
    /// first. Empty when no checkpoint of the chain holds the table.
    pub fn files_of(&self, chain: &[Manifest], table: &str) -> Vec<(PathBuf, ManifestTable)> {
        let mut files = Vec::new();
        for m in chain {
            if let Some(t) = m.tables.iter().find(|t| t.name == table) {
                if t.kind == Kind::Full {
                    files.clear();
                }
                files.push((self.path_of(&m.name).join(&t.file), t.clone()));
            }
        }
        files
    }

    /// The header of the newest file of `table` in `chain` (checked), or `None` when no
    /// checkpoint of the chain holds the table.
    pub fn header_of(
        &self,
        chain: &[Manifest],
        table: &str,
    ) -> Result<Option<FileHeader>, CheckpointError> {
        let Some((path, _)) = self.files_of(chain, table).pop() else {
            return Ok(None);
        };
        let file = open_regular(&path)?;
        let reader = TableFileReader::open(BufReader::new(file), path.display().to_string())?;
        Ok(Some(reader.header().clone()))
    }

    /// Reads every record of one table of `chain`, oldest file first, checking each file against
    /// its manifest entry and its header against `expect` (shard, shard count, and the spec of
    /// the first file). Returns the spec.
    pub fn read_table(
        &self,
        chain: &[Manifest],
        table: &str,
        (shard, shards): (u32, u32),
        mut each: impl FnMut(&FileHeader, RecordView<'_>) -> Result<(), CheckpointError>,
    ) -> Result<hetkv_transport::TableSpec, CheckpointError> {
        let files = self.files_of(chain, table);
        if files.first().is_none_or(|(_, t)| t.kind != Kind::Full) {
            return Err(CheckpointError::Refused(format!(
                "no full file of table {table} in the chain of {}",
                chain.last().map_or("", |m| m.name.as_str())
            )));
        }
        let mut spec: Option<hetkv_transport::TableSpec> = None;
        for (path, entry) in files {
            let label = path.display().to_string();
            let file = open_regular(&path)?;
            let len = file
                .metadata()
                .map_err(|e| CheckpointError::io(&path, e))?
                .len();
            let mut r = TableFileReader::open(BufReader::with_capacity(1 << 20, file), &label)?;
            let h = r.header().clone();
            let refuse = |what: String| CheckpointError::Corrupt {
                file: label.clone(),
                what,
            };
            if h.spec.name != table || h.kind != entry.kind {
                return Err(refuse(format!(
                    "it holds a {} file of table {}; the manifest lists a {} file of {table}",
                    h.kind.name(),
                    h.spec.name,
                    entry.kind.name()
                )));
            }
            if (h.shard, h.shards) != (shard, shards) {
                return Err(CheckpointError::Refused(format!(
                    "{label} is of shard {} of {}; this is shard {shard} of {shards} (start {} \
                     daemons, or move the checkpoint onto {shards} shards with `hetkv checkpoint \
                     reshard`)",
                    h.shard, h.shards, h.shards
                )));
            }
            // Before any record is handed on (and the table allocated): the file on disk is as
            // long as its manifest says, and a full file is long enough to hold every row its
            // header claims, so a forged header cannot make a restore allocate more than the
            // files it reads.
            if len != entry.bytes {
                return Err(refuse(format!(
                    "{len} bytes on disk; its manifest says {}",
                    entry.bytes
                )));
            }
            // A dynamic table's full file holds its occupied slots, at most all of them.
            let rows = match h.shape.keyed {
                true => entry.rows,
                false => h.local_rows,
            };
            let least = rows.saturating_mul(h.shape.len() as u64);
            if h.kind == Kind::Full && (entry.rows != rows || rows > h.local_rows || len < least) {
                return Err(refuse(format!(
                    "a full file of {} local rows of {} bytes is at least {least} bytes; this \
                     one is {len} bytes and its manifest lists {} rows",
                    h.local_rows,
                    h.shape.len(),
                    entry.rows
                )));
            }
            if let Some(s) = &spec {
                if s != &h.spec {
                    return Err(refuse(format!(
                        "table {table} is {:?} here and {s:?} earlier in the chain",
                        h.spec
                    )));
                }
            }
            while let Some(rec) = r.next_record()? {
                each(&h, rec)?;
            }
            let s = r.summary().expect("read to the trailer");
            if (s.rows, s.bytes, s.crc32c) != (entry.rows, entry.bytes, entry.crc32c) {
                return Err(refuse(format!(
                    "{} rows, {} bytes, CRC32C {:08x}; its manifest says {} rows, {} bytes, \
                     {:08x}",
                    s.rows, s.bytes, s.crc32c, entry.rows, entry.bytes, entry.crc32c
                )));
            }
            spec.get_or_insert(h.spec);
        }
        Ok(spec.expect("at least the full file"))
    }

    /// Reads the records of one table of `chain` as the chain leaves them: each local index
    /// once, from the newest file holding it, in index order, once every file was checked as
    /// [`CheckpointDir::read_table`] checks it (so each file is read twice when the chain has
    /// more than one). `each` gets the newest file's header. For a dynamic table, whose keys may
    /// change slots along a chain (a key evicted, then admitted again elsewhere in its bucket),
    /// so that its records cannot be applied one file after the other: a file would name a key
    /// that an older file's record still holds in another slot. Returns the spec.
    pub fn read_table_merged(
        &self,
        chain: &[Manifest],
        table: &str,
        identity: (u32, u32),
        mut each: impl FnMut(&FileHeader, RecordView<'_>) -> Result<(), CheckpointError>,
    ) -> Result<hetkv_transport::TableSpec, CheckpointError> {
        let files = self.files_of(chain, table);
        if files.len() <= 1 {
            return self.read_table(chain, table, identity, each);
        }
        let spec = self.read_table(chain, table, identity, |_, _| Ok(()))?;
        let header = self
            .header_of(chain, table)?
            .expect("a chain with files has a newest one");
        let mut merge = Merge::open(files)?;
        while let Some(rec) = merge.next_merged()? {
            each(&header, RecordView::of(header.shape, &rec))?;
        }
        Ok(spec)
    }

    /// Reads the whole chain of `name`, every file and block, without restoring anything;
    /// returns the chain and the rows read per table of its newest checkpoint.
    pub fn verify(&self, name: &str) -> Result<(Vec<Manifest>, Vec<u64>), CheckpointError> {
        let chain = self.chain(name)?;
        let last = chain.last().expect("a chain has its checkpoint");
        let mut rows = Vec::new();
        for t in &last.tables {
            let mut n = 0;
            self.read_table(&chain, &t.name, (last.shard, last.shards), |_, _| {
                n += 1;
                Ok(())
            })?;
            rows.push(n);
        }
        Ok((chain, rows))
    }

    /// Starts writing checkpoint `name`: refused if it exists; a directory of that name without a
    /// manifest (a crash's leftover) is cleared first.
    pub fn begin(&self, name: &str) -> Result<PendingCheckpoint, CheckpointError> {
        check_name(name)?;
        make_private_dir(&self.root)?;
        let dir = self.path_of(name);
        check_real_dir(&dir)?;
        if dir.join(MANIFEST_FILE).exists() {
            return Err(CheckpointError::Refused(format!(
                "checkpoint {name} exists in {}; a committed checkpoint is never overwritten",
                self.root.display()
            )));
        }
        if dir.exists() {
            tracing::info!(dir = %dir.display(), "clearing an incomplete checkpoint");
            std::fs::remove_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        }
        make_private_dir(&dir)?;
        fsync_dir(&self.root)?;
        Ok(PendingCheckpoint {
            dir,
            name: name.to_string(),
            tables: Vec::new(),
            committed: false,
        })
    }

    /// Writes the state `name`'s chain restores as one full checkpoint `out` (offline: the caller
    /// holds the data directory's lock). Each row comes from the newest file holding it; the
    /// files are equal byte for byte to those a full checkpoint of that state, taken while no
    /// push ran, would have (both clocks are the sum of the versions).
    pub fn compact(&self, name: &str, out: &str) -> Result<Manifest, CheckpointError> {
        let chain = self.chain(name)?;
        let last = chain.last().expect("a chain has its checkpoint").clone();
        let identity = (last.shard, last.shards);
        let mut pending = self.begin(out)?;
        for (index, t) in last.tables.iter().enumerate() {
            // First pass: verify every file of the table's chain and find the restored clock.
            let mut versions: Vec<u64> = Vec::new();
            let mut header: Option<FileHeader> = None;
            self.read_table(&chain, &t.name, identity, |h, rec| {
                if header.is_none() {
                    versions = vec![0; h.local_rows as usize];
                    header = Some(h.clone());
                }
                versions[rec.index() as usize] = rec.version();
                Ok(())
            })?;
            // A chain without a record (a dynamic table written empty) takes its header as is.
            let mut header = match header {
                Some(h) => h,
                None => self.header_of(&chain, &t.name)?.ok_or_else(|| {
                    CheckpointError::Refused(format!("checkpoint {name} has no file of {}", t.name))
                })?,
            };
            let clock: u64 = versions.iter().sum();
            drop(versions);
            header.kind = Kind::Full;
            header.clock_start = clock;
            // Second pass: merge the files' sorted streams into the new one.
            let mut merge = Merge::open(self.files_of(&chain, &t.name))?;
            let mut w = pending.table_writer(index, &header)?;
            let path = pending.dir.clone();
            while let Some(rec) = merge.next_merged()? {
                let i = u64::from_le_bytes(rec[0..8].try_into().expect("8 bytes"));
                w.next_record(i)
                    .map_err(|e| CheckpointError::io(&path, e))?
                    .copy_from_slice(&rec);
            }
            pending.finish_table(&t.name, Kind::Full, w, clock)?;
        }
        pending.commit(self.next_seq()?, None, identity, last.sessions)
    }
}

/// The sorted record streams of a table's files, merged: each index once, from the newest file
/// holding it. A dynamic table's slot whose newest record says it was emptied (version 0: a row
/// expired, docs/CHECKPOINTS.md) is left out.
struct Merge {
    streams: Vec<TableFileReader<BufReader<File>>>,
    heads: Vec<Option<Vec<u8>>>,
    dynamic: bool,
}

impl Merge {
    fn open(files: Vec<(PathBuf, ManifestTable)>) -> Result<Self, CheckpointError> {
        let mut streams = Vec::with_capacity(files.len());
        for (path, _) in &files {
            let file = open_regular(path)?;
            streams.push(TableFileReader::open(
                BufReader::with_capacity(1 << 20, file),
                path.display().to_string(),
            )?);
        }
        let heads = streams
            .iter_mut()
            .map(|s| s.next_record().map(|r| r.map(|r| r.bytes().to_vec())))
            .collect::<Result<_, _>>()?;
        let dynamic = streams
            .first()
            .is_some_and(|s| s.header().spec.dynamic.is_some());
        Ok(Self {
            streams,
            heads,
            dynamic,
        })
    }

    fn next_merged(&mut self) -> Result<Option<Vec<u8>>, CheckpointError> {
        loop {
            match self.next_of_any()? {
                // The record's version, after its 8-byte index.
                Some(rec) if self.dynamic && rec[8..16] == [0; 8] => continue,
                next => return Ok(next),
            }
        }
    }

    fn next_of_any(&mut self) -> Result<Option<Vec<u8>>, CheckpointError> {
        let index = |b: &Vec<u8>| u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let Some(min) = self.heads.iter().flatten().map(index).min() else {
            return Ok(None);
        };
        let mut chosen = None;
        // Oldest first, so the newest stream holding `min` is the one kept.
        for (s, head) in self.heads.iter_mut().enumerate() {
            if head.as_ref().is_some_and(|b| index(b) == min) {
                chosen = head.take();
                *head = self.streams[s].next_record()?.map(|r| r.bytes().to_vec());
            }
        }
        Ok(chosen)
    }
}

/// A checkpoint being written; removed unless committed.
#[derive(Debug)]
pub struct PendingCheckpoint {
    dir: PathBuf,
    name: String,
    tables: Vec<ManifestTable>,
    committed: bool,
}

/// A table file being written.
pub type TableWriter = TableFileWriter<PipelinedFile>;

/// Bytes handed to the writing thread at a time.
const PIPE_CHUNK: usize = 1 << 20;
/// Chunks in flight between the copying thread and the writing thread.
const PIPE_DEPTH: usize = 4;

/// A file written by a thread of its own: [`Write`](std::io::Write) gathers 1 MiB chunks and
/// hands them over a bounded channel, so copying rows out of the table and writing them to the
/// disk overlap (a checkpoint then runs at the slower of the two, not their sum). The first write
/// error ends the thread and is returned by every later call.
#[derive(Debug)]
pub struct PipelinedFile {
    chunk: Vec<u8>,
    to_writer: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    writer: Option<std::thread::JoinHandle<io::Result<File>>>,
}

impl PipelinedFile {
    fn new(file: File) -> Self {
        let (to_writer, chunks) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPE_DEPTH);
        let (give_back, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPE_DEPTH + 1);
        let writer = std::thread::Builder::new()
            .name("hetkv-ckpt-io".into())
            .spawn(move || -> io::Result<File> {
                use std::io::Write;
                let mut file = file;
                for mut chunk in chunks {
                    file.write_all(&chunk)?;
                    chunk.clear();
                    let _ = give_back.try_send(chunk);
                }
                Ok(file)
            })
            .expect("spawning a checkpoint writer thread");
        Self {
            chunk: Vec::with_capacity(PIPE_CHUNK),
            to_writer: Some(to_writer),
            spare,
            writer: Some(writer),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(PIPE_CHUNK));
        let full = std::mem::replace(&mut self.chunk, next);
        let sent = self.to_writer.as_ref().map(|t| t.send(full));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread ended on an error: finish() reports it.
            _ => Err(self.join_error()),
        }
    }

    fn join_error(&mut self) -> io::Error {
        self.to_writer = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("the checkpoint writer thread panicked"),
            _ => io::Error::other("the checkpoint writer thread has stopped"),
        }
    }

    /// Writes what is left and returns the file once every byte is written.
    pub fn finish(mut self) -> io::Result<File> {
        if !self.chunk.is_empty() {
            self.send()?;
        }
        self.to_writer = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the checkpoint writer thread panicked")),
            None => Err(io::Error::other("the checkpoint writer thread has stopped")),
        }
    }
}

impl std::io::Write for PipelinedFile {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let room = PIPE_CHUNK - self.chunk.len();
            let take = room.min(buf.len());
            self.chunk.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.chunk.len() == PIPE_CHUNK {
                self.send()?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Durability is `finish` and fsync; a flush only moves bytes along.
        Ok(())
    }
}

impl PendingCheckpoint {
    /// The checkpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A writer for the file of the table with index `index`, with its header written.
    pub fn table_writer(
        &self,
        index: usize,
        header: &FileHeader,
    ) -> Result<TableWriter, CheckpointError> {
        let path = self.tmp_path(index);
        let file = create_private(&path)?;
        TableFileWriter::new(PipelinedFile::new(file), header)
            .map_err(|e| CheckpointError::io(&path, e))
    }

    fn tmp_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{}.tmp", table_file_name(index)))
    }

    /// Ends the table's file (the next in creation order): trailer, fsync, rename.
    pub fn finish_table(
        &mut self,
        table: &str,
        kind: Kind,
        writer: TableWriter,
        clock_end: u64,
    ) -> Result<FileSummary, CheckpointError> {
        let index = self.tables.len();
        let tmp = self.tmp_path(index);
        let io = |e| CheckpointError::io(&tmp, e);
        let (out, summary) = writer.finish(clock_end).map_err(io)?;
        let file = out.finish().map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        let name = table_file_name(index);
        std::fs::rename(&tmp, self.dir.join(&name)).map_err(io)?;
        self.tables.push(ManifestTable {
            name: table.to_string(),
            file: name,
            kind,
            rows: summary.rows,
            bytes: summary.bytes,
            crc32c: summary.crc32c,
        });
        Ok(summary)
    }

    /// Writes the manifest: the checkpoint exists once this returns.
    pub fn commit(
        mut self,
        seq: u64,
        parent: Option<String>,
        (shard, shards): (u32, u32),
        sessions: Vec<crate::sessions::ClientRecord>,
    ) -> Result<Manifest, CheckpointError> {
        fsync_dir(&self.dir)?;
        let manifest = Manifest {
            name: self.name.clone(),
            seq,
            kind: if parent.is_some() {
                Kind::Incremental
            } else {
                Kind::Full
            },
            parent,
            shard,
            shards,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            tables: std::mem::take(&mut self.tables),
            sessions,
        };
        let tmp = self.dir.join(format!("{MANIFEST_FILE}.tmp"));
        let io = |e| CheckpointError::io(&tmp, e);
        {
            use std::io::Write;
            let mut f = create_private(&tmp)?;
            f.write_all(&manifest.encode()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, self.dir.join(MANIFEST_FILE)).map_err(io)?;
        self.committed = true;
        fsync_dir(&self.dir)?;
        Ok(manifest)
    }
}

impl Drop for PendingCheckpoint {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a failed checkpoint");
            }
        }
    }
}

fn make_private_dir(path: &Path) -> Result<(), CheckpointError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| CheckpointError::io(path, e))?;
    check_real_dir(path)
}

fn create_private(path: &Path) -> Result<File, CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(crate::placement::O_NOFOLLOW)
        .open(path)
        .map_err(|e| CheckpointError::io(path, e))
}

/// fsyncs a directory, so that the names made or renamed in it are durable.
pub fn fsync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| CheckpointError::io(path, e))
}

/// Opens a file of the data directory for reading: a symbolic link is refused (not followed),
/// and so is anything but a regular file (a FIFO would block the reader forever, a device would
/// read without end). The open itself does not block.
pub fn open_regular(path: &Path) -> Result<File, CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .read(true)
        .custom_flags(crate::placement::O_NOFOLLOW | crate::placement::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(crate::placement::ELOOP) => CheckpointError::Corrupt {
                file: path.display().to_string(),
                what: "it is a symbolic link (never followed in a data directory)".into(),
            },
            _ => CheckpointError::io(path, e),
        })?;
    let kind = file
        .metadata()
        .map_err(|e| CheckpointError::io(path, e))?
        .file_type();
    if !kind.is_file() {
        return Err(CheckpointError::Corrupt {
            file: path.display().to_string(),
            what: format!("it is a {}, not a regular file", file_kind(kind)),
        });
    }
    Ok(file)
}

/// Fails unless `path` is a directory itself (a symbolic link to one is refused). A missing
/// path passes: the caller's next step says it is missing.
pub fn check_real_dir(path: &Path) -> Result<(), CheckpointError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => Err(CheckpointError::Refused(format!(
            "{} is a {}, not a directory (a symbolic link is never followed in a data directory)",
            path.display(),
            file_kind(m.file_type())
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CheckpointError::io(path, e)),
    }
}

fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "regular file"
    }
}

/// Reads a whole file of at most `max` bytes (larger is refused before reading).
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, CheckpointError> {
    use std::io::Read;
    let file = open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| CheckpointError::io(path, e))?
        .len();
    if len > max {
        return Err(CheckpointError::Corrupt {
            file: path.display().to_string(),
            what: format!("{len} bytes, above the {max} a manifest may have"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max)
        .read_to_end(&mut bytes)
        .map_err(|e| CheckpointError::io(path, e))?;
    Ok(bytes)
}
