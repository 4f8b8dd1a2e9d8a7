//! The shared-memory backend (DESIGN section 6): a client on the daemon's host maps each table's
//! region and clock word read-only and reads rows and version words itself, with no daemon CPU.
//! [`ShmMemory`] is that mapping as a [`RemoteMemory`]; [`ShmTransport`] is the one-sided
//! transport over it, with pushes and control over a second transport (TCP).
//!
//! The daemon announces its shared-memory directory in the hello; the directory's name carries a
//! random instance id, so finding it on this host shows the daemon is on this host.

use std::io;
use std::path::{Path, PathBuf};

use crate::client::ShardTransport;
use crate::onesided::{Attachment, OneSidedTransport, RemoteMemory, RemoteSpan};
use crate::region::{self, SharedRegion, WORD};
use crate::row;
use crate::wire::RegionDescriptor;

/// Spans a batch prefetches ahead of the one it copies.
const PREFETCH_SPANS: usize = 8;

/// A shard read through shared memory, controlled (and pushed to) through `C`.
pub type ShmTransport<C> = OneSidedTransport<ShmMemory, C>;

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

/// The regions of one same-host daemon, mapped read-only from its shared-memory directory.
#[derive(Debug)]
pub struct ShmMemory {
    /// The directory under which the daemon makes its instance directories (the parent of the
    /// one its hello announced): a restarted daemon makes a new instance beside the old one.
    root: PathBuf,
}

impl ShmMemory {
    /// The memory of the shard behind `control`, when it exposes its regions on this host.
    pub fn of<C: ShardTransport>(control: &C) -> Result<Self, ShmUnavailable> {
        let addr = control.addr().to_string();
        let Some(dir) = control.hello().shm_dir.as_deref().map(PathBuf::from) else {
            return Err(ShmUnavailable::NotOffered { addr });
        };
        if !dir.is_dir() {
            let dir = dir.display().to_string();
            return Err(ShmUnavailable::NotOnThisHost { addr, dir });
        }
        let root = dir.parent().map_or(dir.clone(), Path::to_path_buf);
        Ok(Self { root })
    }

    /// Maps the file at `path`, which must lie under the daemon's shared-memory root and hold
    /// `len` bytes.
    fn open(&self, path: Option<&str>, what: &str, len: u64) -> Result<SharedRegion, String> {
        let Some(path) = path.map(Path::new).filter(|p| p.starts_with(&self.root)) else {
            return Err(format!("no {what} file under {}", self.root.display()));
        };
        let region =
            SharedRegion::open(path).map_err(|e| format!("mapping {}: {e}", path.display()))?;
        if region.len() < len {
            return Err(format!(
                "{} holds {} bytes, the descriptor says {len}",
                path.display(),
                region.len()
            ));
        }
        Ok(region)
    }
}

/// Asks the CPU to start loading a span (a hint; nothing happens for a span past the region).
fn prefetch(span: &RemoteSpan<'_, SharedRegion>) {
    let words = span.region.words();
    let first = (span.offset / WORD as u64) as usize;
    let last = first.saturating_add((span.len as usize).div_ceil(WORD));
    if let Some(w) = words.get(first..last) {
        region::prefetch(w);
    }
}

impl RemoteMemory for ShmMemory {
    type Region = SharedRegion;

    fn attach(&self, desc: &RegionDescriptor) -> Result<Attachment<SharedRegion>, String> {
        Ok(Attachment {
            rows: self.open(desc.shm_path.as_deref(), "region", desc.len)?,
            clock: self.open(desc.clock_shm_path.as_deref(), "clock", 8)?,
        })
    }

    /// Copies each span with atomic loads; the CPU is asked for the spans a few ahead, so that a
    /// gather of random rows overlaps their memory latencies.
    fn read(
        &self,
        spans: &[RemoteSpan<'_, SharedRegion>],
        each: &mut dyn FnMut(usize, &[u8]),
    ) -> io::Result<()> {
        let mut image = Vec::new();
        spans.iter().take(PREFETCH_SPANS).for_each(prefetch);
        for (i, span) in spans.iter().enumerate() {
            if let Some(ahead) = spans.get(i + PREFETCH_SPANS) {
                prefetch(ahead);
            }
            let (offset, len) = (span.offset, span.len as usize);
            if offset.saturating_add(len as u64) > span.region.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "span {offset}+{len} outside a mapping of {}",
                        span.region.len()
                    ),
                ));
            }
            image.clear();
            if offset % WORD as u64 == 0 && len % WORD == 0 {
                image.resize(len, 0);
                row::copy_words(
                    span.region.words(),
                    (offset / WORD as u64) as usize,
                    &mut image,
                );
            } else {
                row::copy_span(span.region.words(), offset, len, &mut image);
            }
            each(i, &image);
        }
        Ok(())
    }
}

impl<C: ShardTransport> OneSidedTransport<ShmMemory, C> {
    /// Reads the shard behind `control` through shared memory. When the shard cannot be read so
    /// from here, hands the control transport back with the reason.
    pub fn new(control: C) -> Result<Self, (C, ShmUnavailable)> {
        match ShmMemory::of(&control) {
            Ok(memory) => Ok(Self::with_memory(memory, control)),
            Err(why) => Err((control, why)),
        }
    }
}
