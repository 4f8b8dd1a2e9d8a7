//! How a shard is set up: its index, its limits, where its memory and checkpoints live.

use std::path::{Path, PathBuf};

/// How a shard is set up.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// This shard's index.
    pub shard: u32,
    /// Shards in the cluster.
    pub shards: u32,
    /// The data directory: checkpoints, and the lock that keeps a second daemon out. Regions
    /// are never placed there (see [`Placement`](crate::Placement)).
    pub data_dir: Option<PathBuf>,
    /// Directory (normally under `/dev/shm`) in which the shard makes a directory of its own,
    /// named with a random instance id, for its regions and clock words, and exposes them to
    /// clients on this host. Removed when the shard is dropped. Anonymous memory without it.
    pub shm_dir: Option<PathBuf>,
    /// Register every table's region and clock word with the first RDMA device (remote read
    /// only) and accept queue pairs from clients. Needs the `rdma` feature and a device.
    pub rdma: bool,
    /// Largest footprint (region plus optimizer state) one table may have on this shard.
    pub max_table_bytes: u64,
    /// Most tables this shard holds; creating one more is refused.
    pub max_tables: usize,
    /// Most bytes all tables together may take on this shard (regions and optimizer state),
    /// checked before a table is mapped.
    pub max_memory: u64,
    /// Token a hello must carry, when set.
    pub auth_token: Option<String>,
    /// How long a client may be silent before the shard forgets its push numbers (a repeat of
    /// one of its pushes after that would be applied again).
    pub session_idle: std::time::Duration,
    /// Tables with metrics series of their own; the others are summed under one label.
    pub metrics_tables: usize,
}

impl ShardConfig {
    /// Shard `shard` of `shards`, in anonymous memory, with default limits.
    pub fn new(shard: u32, shards: u32) -> Self {
        Self {
            shard,
            shards,
            data_dir: None,
            shm_dir: None,
            rdma: false,
            max_table_bytes: DEFAULT_MAX_TABLE_BYTES,
            max_tables: DEFAULT_MAX_TABLES,
            max_memory: default_max_memory(),
            auth_token: None,
            session_idle: crate::sessions::DEFAULT_IDLE,
            metrics_tables: crate::metrics::DEFAULT_METRICS_TABLES,
        }
    }
}

/// Default bound on the number of tables of a shard. Listing them all (names of up to 128 bytes)
/// takes under 8 MiB, within the default frame.
pub const DEFAULT_MAX_TABLES: usize = 16_384;

/// Default bound on all tables' memory: three quarters of the memory this process may use: the
/// machine's (`MemTotal` of `/proc/meminfo`), or its memory cgroup's limit where that is lower (a
/// container's, a systemd unit's: cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`, the
/// lowest along the cgroup's path). Unbounded where neither can be read.
pub fn default_max_memory() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_memory_limit(&c, Path::new("/sys/fs/cgroup")));
    let usable = match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (m, c) => m.or(c).unwrap_or(u64::MAX),
    };
    if usable == u64::MAX {
        u64::MAX
    } else {
        usable / 4 * 3
    }
}

/// The lowest memory limit along this process's cgroup path (`proc_self_cgroup` is the text of
/// `/proc/self/cgroup`; `root` where the hierarchies are mounted), or `None` where there is none.
/// The v2 hierarchy (`0::/path`, `root/path/memory.max`) and the v1 memory controller
/// (`N:memory:/path`, `root/memory/path/memory.limit_in_bytes`) are both read. Each ancestor's
/// file is read too (a parent's limit binds its children), and a path the mount does not have
/// (a container mounting its own cgroup as the root) falls back to the mount's root.
pub fn cgroup_memory_limit(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (mount, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = Path::new(path.trim_start_matches('/'));
        loop {
            let limit = std::fs::read_to_string(mount.join(dir).join(file))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok()); // "max" is no limit
            if let Some(l) = limit {
                lowest = Some(lowest.map_or(l, |m| m.min(l)));
            }
            match dir.parent() {
                Some(p) => dir = p,
                None => break,
            }
        }
    }
    // v1 writes "no limit" as the largest page-aligned i64.
    lowest.filter(|&l| l < (i64::MAX as u64) / 2)
}

/// Default per-table limit: 32 GiB.
pub const DEFAULT_MAX_TABLE_BYTES: u64 = 32 << 30;

#[cfg(test)]
mod tests {
    use super::cgroup_memory_limit;

    fn write(root: &std::path::Path, file: &str, text: &str) {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_lowest_limit_along_the_cgroup_path_binds() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v2: the unit's own limit is "max", its parent's is 1 GiB.
        write(r, "system.slice/memory.max", "1073741824\n");
        write(r, "system.slice/hetkv.service/memory.max", "max\n");
        assert_eq!(
            cgroup_memory_limit("0::/system.slice/hetkv.service\n", r),
            Some(1 << 30)
        );
        // v1 beside v2 (a hybrid host): the memory controller's lower limit wins.
        write(r, "memory/job/memory.limit_in_bytes", "536870912\n");
        assert_eq!(
            cgroup_memory_limit(
                "4:memory:/job\n3:cpu,cpuacct:/job\n0::/system.slice/hetkv.service\n",
                r
            ),
            Some(512 << 20)
        );
        // v1's "no limit" and a hierarchy without files are no limit.
        let free = tempfile::tempdir().unwrap();
        write(
            free.path(),
            "memory/job/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(
            cgroup_memory_limit("4:memory:/job\n0::/\n", free.path()),
            None
        );
        // A container that mounts its own cgroup as the root: the path is not under the mount,
        // the root's file is read.
        let container = tempfile::tempdir().unwrap();
        write(container.path(), "memory.max", "268435456\n");
        assert_eq!(
            cgroup_memory_limit("0::/kubepods/pod1/abc\n", container.path()),
            Some(256 << 20)
        );
    }
}
