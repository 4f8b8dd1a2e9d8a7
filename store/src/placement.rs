//! Where a shard's regions live: anonymous memory, files in a data directory, or files in a
//! shared-memory instance directory that clients on this host map read-only.
//!
//! A [`Placement`] creates the regions, removes what it created (its own shared-memory instance
//! directory), and holds an exclusive lock on a data directory for as long as it lives, so that a
//! second daemon started on the same directory is refused instead of mapping the same files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hetkv_transport::Region;

use crate::StoreError;

/// Name of the lock file a daemon holds in its data directory.
pub const LOCK_FILE: &str = "hetkv.lock";

/// Where a shard's regions live.
#[derive(Debug)]
pub enum Placement {
    /// Anonymous memory: nothing outlives the process, nothing is shared.
    Anonymous,
    /// Files under a data directory, locked for this daemon.
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// The locked file; the lock goes with it.
        _lock: File,
    },
    /// Files under `dir/hetkv-shard{I}-{random id}`, made by this shard and removed when it is
    /// dropped.
    Shm {
        /// The instance directory.
        instance: PathBuf,
    },
}

impl Placement {
    /// The placement of shard `shard`: under `data_dir` (locked), or in an instance directory
    /// under `shm_dir`, or anonymous. The two directories exclude each other.
    pub fn new(
        shard: u32,
        data_dir: Option<&Path>,
        shm_dir: Option<&Path>,
    ) -> Result<Self, StoreError> {
        match (data_dir, shm_dir) {
            (Some(_), Some(_)) => Err(StoreError::Config(
                "a data dir and a shm dir exclude each other: regions live in one place".into(),
            )),
            (Some(dir), None) => Self::data_dir(dir),
            (None, Some(dir)) => Ok(Self::Shm {
                instance: make_instance_dir(dir, shard)?,
            }),
            (None, None) => Ok(Self::Anonymous),
        }
    }

    fn data_dir(dir: &Path) -> Result<Self, StoreError> {
        let io = |what: &str, e: std::io::Error| {
            StoreError::Io(format!("{what} data dir {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("creating", e))?;
        let path = dir.join(LOCK_FILE);
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening the lock file of", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Config(format!(
                    "data dir {} is in use by another hetkv daemon (it holds {}): \
                     give each daemon a directory of its own",
                    dir.display(),
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", e)),
        }
        Ok(Self::DataDir {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The shared-memory instance directory, when regions are exposed to clients on this host.
    pub fn shm_instance(&self) -> Option<&Path> {
        match self {
            Self::Shm { instance } => Some(instance),
            _ => None,
        }
    }

    /// Maps `len` bytes for the `what` (`region` or `clock`) of table `table` of shard `shard`.
    pub fn map(
        &self,
        shard: u32,
        table: &str,
        what: &str,
        len: u64,
    ) -> Result<Arc<Region>, StoreError> {
        let dir = match self {
            Self::Anonymous => None,
            Self::DataDir { dir, .. } => Some(dir.as_path()),
            Self::Shm { instance } => Some(instance.as_path()),
        };
        match dir {
            Some(dir) => {
                Region::file_backed(&dir.join(format!("shard{shard}-{table}.{what}")), len)
            }
            None => Region::anonymous(len),
        }
        .map(Arc::new)
        .map_err(|e| {
            StoreError::Io(format!(
                "mapping {len} bytes for the {what} of table {table}: {e}"
            ))
        })
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Self::Shm { instance } = self {
            if let Err(e) = std::fs::remove_dir_all(&*instance) {
                tracing::warn!(dir = %instance.display(), error = %e, "could not remove the shm dir");
            }
        }
    }
}

/// Makes `dir/hetkv-shard{shard}-{random id}` for one shard instance's shared-memory files.
fn make_instance_dir(dir: &Path, shard: u32) -> Result<PathBuf, StoreError> {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let path = dir.join(format!("hetkv-shard{shard}-{:016x}", h.finish()));
    std::fs::create_dir_all(&path)
        .map_err(|e| StoreError::Io(format!("creating shm dir {}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_placement_on_a_data_dir_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Placement::new(0, Some(dir.path()), None).unwrap();
        let err = Placement::new(1, Some(dir.path()), None).unwrap_err();
        assert!(
            err.to_string().contains("in use by another hetkv daemon"),
            "{err}"
        );
        drop(first);
        Placement::new(1, Some(dir.path()), None).unwrap();
    }

    #[test]
    fn a_shm_instance_dir_is_removed_with_its_placement() {
        let dir = tempfile::tempdir().unwrap();
        let p = Placement::new(3, None, Some(dir.path())).unwrap();
        let instance = p.shm_instance().unwrap().to_path_buf();
        p.map(3, "t", "region", 64).unwrap();
        assert!(instance.join("shard3-t.region").is_file());
        drop(p);
        assert!(!instance.exists());
        assert!(Placement::new(0, Some(dir.path()), Some(dir.path())).is_err());
    }
}
