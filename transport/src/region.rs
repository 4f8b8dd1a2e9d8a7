//! Mapped memory regions that hold a shard's rows.
//!
//! This is the shared-memory module of hetkv: the only place in `hetkv-transport` with `unsafe`.
//! A [`Region`] is a writable mapping (anonymous, or a file under a data or shm directory) owned by
//! a daemon; a [`SharedRegion`] is the same file mapped read-only by a client on the same host. Both
//! expose their bytes only as a slice of [`AtomicU64`] words, so a daemon thread writing a row and a
//! reader copying it never race in the sense of the Rust memory model: every access is atomic, and
//! the row codec ([`crate::row`]) decides with the seq word and the CRC whether a copy is whole.
//! The one exception is [`SharedRegion::copy_unverified`], a plain memcpy kept for measuring the
//! physical limit of a same-host read.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Word size of a region: every region is a whole number of little-endian `u64` words.
pub const WORD: usize = 8;

/// Views a mapping as atomic words.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the lifetime `'a`, 8-byte aligned, and every
/// access to that memory during `'a` (from this process) must go through atomics.
unsafe fn words_of<'a>(ptr: *const u8, len: usize) -> &'a [AtomicU64] {
    debug_assert_eq!(ptr as usize % WORD, 0);
    debug_assert_eq!(len % WORD, 0);
    // SAFETY: the caller guarantees validity and alignment; `AtomicU64` has the size and alignment
    // of `u64` (checked at compile time below) and no invalid bit patterns.
    unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), len / WORD) }
}

/// Asks the CPU to load the memory of `items` into its caches (one hint per 64-byte line); a
/// no-op off x86_64. A gather of scattered rows issues these for every row first, so that their
/// cache misses overlap instead of coming one at a time.
pub fn prefetch<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(items);
        let base = items.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(64) {
            // SAFETY: `_mm_prefetch` needs SSE, which every x86_64 CPU has; it is a hint that
            // never faults and reads nothing into the program. `offset < bytes`, so the address
            // lies inside `items` (`wrapping_add` needs no more than that).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    base.wrapping_add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

/// Asks the kernel to back a mapping with transparent huge pages where it can (`MADV_HUGEPAGE`:
/// honoured when `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `always`, and for
/// shared-memory files when `shmem_enabled` allows it). A shard reads and writes rows scattered
/// over its whole region, so with 4 KiB pages nearly every row costs a page walk (`comm` without a
/// cache, one client, on a 2-core machine: 1.35x the batches a second with them;
/// docs/BENCHMARKS.md). Only a hint: a kernel that refuses leaves 4 KiB pages.
fn prefer_huge_pages(map: &MmapMut) {
    #[cfg(target_os = "linux")]
    if let Err(e) = map.advise(memmap2::Advice::HugePage) {
        tracing::debug!(error = %e, "huge pages not available for a region");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = map;
}

const _: () = assert!(std::mem::size_of::<AtomicU64>() == WORD);
const _: () = assert!(std::mem::align_of::<AtomicU64>() == WORD);

/// A writable region of memory holding one table's rows on one shard.
#[derive(Debug)]
pub struct Region {
    map: MmapMut,
    path: Option<PathBuf>,
}

impl Region {
    /// Maps `len` bytes of zeroed anonymous memory. `len` is rounded up to a whole word and is at
    /// least one word (mappings cannot be empty).
    pub fn anonymous(len: u64) -> io::Result<Self> {
        let len = region_len(len)?;
        let map = MmapMut::map_anon(len)?;
        prefer_huge_pages(&map);
        Ok(Self { map, path: None })
    }

    /// Creates the file at `path`, owner-only (0600), sizes it to `len` bytes and maps it
    /// writable. Whatever was at `path` is unlinked first (a region file is live memory, never a
    /// checkpoint), and the new file is created exclusively, so a symbolic link placed there is
    /// removed, never followed, and one placed in between makes this fail. Clients on the same
    /// host (and user) can map the file read-only with [`SharedRegion::open`].
    pub fn file_backed(path: &Path, len: u64) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let len = region_len(len)?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(len as u64)?;
        // SAFETY: the file was just created by this daemon, owner-only, in a directory it owns;
        // other processes only ever map it read-only. Undefined behaviour would need another
        // process of the same user to truncate it under us, which the directory's lock rules out
        // for hetkv daemons.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
        prefer_huge_pages(&map);
        Ok(Self {
            map,
            path: Some(path.to_path_buf()),
        })
    }

    /// The region's words. All reads and writes of region memory go through these atomics.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, its length is a whole number of words
        // (`region_len`), it lives as long as `&self`, and this type never hands out a non-atomic
        // view of it after construction.
        unsafe { words_of(self.map.as_ptr(), self.map.len()) }
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the region is empty (never true: a region holds at least one word).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Base address of the mapping, for registration with an RDMA device.
    pub fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// The backing file, when the region is file-backed.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// A region file mapped read-only by a client on the daemon's host.
#[derive(Debug)]
pub struct SharedRegion {
    map: Mmap,
}

impl SharedRegion {
    /// Maps the region file at `path` read-only. Fails if the file is not a whole number of words.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 || len % WORD as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: region length {len} is not a positive multiple of 8",
                    path.display()
                ),
            ));
        }
        // SAFETY: the file is a daemon's region, which the daemon never truncates while it runs;
        // the mapping is read-only and accessed only through atomic loads (`words`).
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self { map })
    }

    /// The region's words, for atomic loads only.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: page-aligned mapping of a whole number of words (checked in `open`), alive as
        // long as `&self`; atomic loads of a read-only mapping are plain loads on every platform
        // with native 64-bit atomics, and this type offers no stores.
        unsafe { words_of(self.map.as_ptr(), self.map.len()) }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Appends `len` bytes from `offset` to `out` with one plain memory copy: no atomics, no
    /// verification, so a copy made while the daemon writes may be torn. It exists to measure the
    /// physical limit that the verifying reader is compared against (`hetkv-bench transport`).
    /// Panics if the span is not inside the mapping.
    pub fn copy_unverified(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        let start = usize::try_from(offset).expect("offset fits in memory");
        let end = start.checked_add(len).expect("span end fits in memory");
        assert!(end <= self.map.len(), "span past the mapping");
        out.reserve(len);
        let at = out.len();
        // SAFETY: the source span lies inside the live, readable mapping (checked above) and the
        // destination has `len` bytes reserved past `at`; the two cannot overlap (one is this
        // process's heap, the other a file mapping). Every bit pattern is a valid `u8`: bytes a
        // concurrent writer in the daemon is changing are only inconsistent, never invalid.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(start),
                out.as_mut_ptr().add(at),
                len,
            );
            out.set_len(at + len);
        }
    }

    /// Whether the mapping is empty (never true).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn region_len(len: u64) -> io::Result<usize> {
    let words = len.div_ceil(WORD as u64).max(1);
    usize::try_from(words * WORD as u64).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("region of {len} bytes does not fit in the address space"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn anonymous_region_is_zeroed_and_word_sized() {
        let r = Region::anonymous(13).unwrap();
        assert_eq!(r.len(), 16);
        assert!(r.words().iter().all(|w| w.load(Ordering::Relaxed) == 0));
        assert_eq!(Region::anonymous(0).unwrap().len(), 8);
    }

    #[test]
    fn file_backed_region_is_visible_to_a_shared_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.region");
        let r = Region::file_backed(&path, 64).unwrap();
        r.words()[3].store(0xdead_beef, Ordering::Release);
        let shared = SharedRegion::open(&path).unwrap();
        assert_eq!(shared.len(), 64);
        assert_eq!(shared.words()[3].load(Ordering::Acquire), 0xdead_beef);
        assert_eq!(r.path(), Some(path.as_path()));
    }
}
