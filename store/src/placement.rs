//! Where a shard's state lives: its regions in anonymous memory, or in files of a shared-memory
//! instance directory that clients on this host map read-only; its checkpoints in a data
//! directory, which it locks.
//!
//! A [`Placement`] creates the regions, removes what it created (its own shared-memory instance
//! directory), and holds an exclusive lock on a data directory for as long as it lives, so that a
//! second daemon started on the same directory is refused instead of writing the same
//! checkpoints. The data directory never holds live regions: the live state is scratch, and
//! mapping it from files there would only make the kernel write it back to disk (competing with
//! checkpoints for the disk and throttling pushes that dirty its pages).
//!
//! Everything it makes is owner-only: directories 0700, files 0600 ([`Region::file_backed`] also
//! replaces a symbolic link rather than following it). A data directory that already exists must
//! be a real directory owned by this user; its permissions are tightened to 0700. At start, the
//! shared-memory instance directories that daemons of this user left behind (killed before they
//! could remove them: their recorded pid is gone) are removed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hetkv_transport::Region;

use crate::StoreError;

/// Name of the lock file a daemon holds in its data directory.
pub const LOCK_FILE: &str = "hetkv.lock";
/// Names of shared-memory instance directories start with this, then the shard index.
const INSTANCE_PREFIX: &str = "hetkv-shard";
/// The file in an instance directory that names the daemon's pid.
const OWNER_FILE: &str = "owner.pid";
/// `O_NOFOLLOW`: refuse a symbolic link.
pub(crate) const O_NOFOLLOW: i32 = libc::O_NOFOLLOW;
/// `O_NONBLOCK`: an open that does not wait (for a FIFO's writer).
pub(crate) const O_NONBLOCK: i32 = libc::O_NONBLOCK;
/// What an open with `O_NOFOLLOW` fails with on a symbolic link.
pub(crate) const ELOOP: i32 = libc::ELOOP;

/// Where a shard's regions and checkpoints live.
#[derive(Debug)]
pub struct Placement {
    /// The data directory and its lock file (the lock goes with the file).
    data_dir: Option<(PathBuf, File)>,
    /// The shared-memory instance directory `dir/hetkv-shard{I}-{random id}`, made by this shard
    /// and removed when it is dropped; regions are anonymous without one.
    shm: Option<PathBuf>,
}

impl Placement {
    /// The placement of shard `shard`: checkpoints under `data_dir` (locked); regions in an
    /// instance directory under `shm_dir`, or anonymous.
    pub fn new(
        shard: u32,
        data_dir: Option<&Path>,
        shm_dir: Option<&Path>,
    ) -> Result<Self, StoreError> {
        let data_dir = data_dir.map(Self::lock_data_dir).transpose()?;
        let shm = match shm_dir {
            Some(dir) => {
                let instance = make_instance_dir(dir, shard)?;
                remove_stale_instances(dir, &instance);
                Some(instance)
            }
            None => None,
        };
        Ok(Self { data_dir, shm })
    }

    fn lock_data_dir(dir: &Path) -> Result<(PathBuf, File), StoreError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
        let io = |what: &str, e: std::io::Error| {
            StoreError::Io(format!("{what} data dir {}: {e}", dir.display()))
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("creating", e))?;
        let meta = std::fs::symlink_metadata(dir).map_err(|e| io("inspecting", e))?;
        if !meta.is_dir() {
            return Err(StoreError::Config(format!(
                "data dir {} is not a directory (a symbolic link is refused)",
                dir.display()
            )));
        }
        let path = dir.join(LOCK_FILE);
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io("opening the lock file of", e))?;
        // The lock file is this process's (or was made by this user before): its owner is who we
        // are, and the directory must be theirs too.
        let me = lock
            .metadata()
            .map_err(|e| io("inspecting the lock file of", e))?
            .uid();
        if meta.uid() != me {
            return Err(StoreError::Config(format!(
                "data dir {} belongs to uid {}, not to this daemon's uid {me}",
                dir.display(),
                meta.uid()
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "tightening the data dir to 0700");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io("restricting", e))?;
        }
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
        Ok((dir.to_path_buf(), lock))
    }

    /// The data directory, when there is one (locked by this placement).
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_ref().map(|(d, _)| d.as_path())
    }

    /// The shared-memory instance directory, when regions are exposed to clients on this host.
    pub fn shm_instance(&self) -> Option<&Path> {
        self.shm.as_deref()
    }

    /// Maps `len` bytes for the `what` (`region` or `clock`) of table `table` of shard `shard`.
    pub fn map(
        &self,
        shard: u32,
        table: &str,
        what: &str,
        len: u64,
    ) -> Result<Arc<Region>, StoreError> {
        match &self.shm {
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
        if let Some(instance) = &self.shm {
            if let Err(e) = std::fs::remove_dir_all(instance) {
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
    use std::os::unix::fs::DirBuilderExt;
    let path = dir.join(format!("{INSTANCE_PREFIX}{shard}-{:016x}", h.finish()));
    let io =
        |e: std::io::Error| StoreError::Io(format!("creating shm dir {}: {e}", path.display()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(io)?;
    write_private(
        &path.join(OWNER_FILE),
        format!("{}\n", std::process::id()).as_bytes(),
    )
    .map_err(io)?;
    Ok(path)
}

/// Writes a new owner-only file.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// Removes the instance directories under `root` that this user's daemons left behind: those
/// whose recorded pid no longer runs. Others' directories, and anything unreadable, are left.
fn remove_stale_instances(root: &Path, ours: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata(ours).map(|m| m.uid()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let is_instance = name
            .to_str()
            .is_some_and(|n| n.starts_with(INSTANCE_PREFIX));
        let owned_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !is_instance || !owned_dir || path == ours {
            continue;
        }
        let pid = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if pid.is_some() && !alive {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), pid, "removed the shm dir of a daemon that is gone")
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "could not remove a stale shm dir")
                }
            }
        }
    }
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
    }

    #[test]
    fn what_a_placement_makes_is_owner_only_and_a_planted_link_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        let shm = root.path().join("shm");
        std::fs::create_dir(&shm).unwrap();
        let p = Placement::new(0, Some(&dir), Some(&shm)).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        let instance = p.shm_instance().unwrap().to_path_buf();
        assert_eq!(mode(&instance), 0o700);
        // Another user's trick: a link where a region file will be, to a file it wants changed.
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, instance.join("shard0-t.region")).unwrap();
        p.map(0, "t", "region", 4096).unwrap();
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"precious",
            "the link was not followed"
        );
        let region = instance.join("shard0-t.region");
        assert!(std::fs::symlink_metadata(&region).unwrap().is_file());
        assert_eq!(mode(&region), 0o600);
        // The data dir holds the lock (and, later, checkpoints), never live regions.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [LOCK_FILE]);
        drop(p);
        // A data dir that is a link is refused; a loose one is tightened.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(Placement::new(0, Some(&link), None).is_err());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _p = Placement::new(0, Some(&dir), None).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn shm_dirs_left_by_dead_daemons_are_removed_at_start() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join("hetkv-shard0-dead");
        std::fs::create_dir(&dead).unwrap();
        // No process has pid 0x7fffffff.
        std::fs::write(dead.join(OWNER_FILE), "2147483647\n").unwrap();
        let alive = root.path().join("hetkv-shard1-alive");
        std::fs::create_dir(&alive).unwrap();
        std::fs::write(alive.join(OWNER_FILE), format!("{}\n", std::process::id())).unwrap();
        let other = root.path().join("unrelated");
        std::fs::create_dir(&other).unwrap();
        let p = Placement::new(2, None, Some(root.path())).unwrap();
        assert!(!dead.exists(), "the dead daemon's dir is gone");
        assert!(
            alive.exists() && other.exists(),
            "the live one and unrelated dirs stay"
        );
        let instance = p.shm_instance().unwrap();
        assert_eq!(
            std::fs::read_to_string(instance.join(OWNER_FILE))
                .unwrap()
                .trim(),
            std::process::id().to_string()
        );
    }
}
