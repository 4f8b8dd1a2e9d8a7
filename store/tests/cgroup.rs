//! The daemon's default `--max-memory` inside a real memory cgroup: a child of this process's
//! own memory cgroup, limited to 1 GiB (cgroup v1 `memory.limit_in_bytes`, or v2 `memory.max`),
//! holds a `hetkv serve` started without `--max-memory`. Its bound is three quarters of the
//! limit, not of the machine, and a table larger than that is refused. Needs root and a writable
//! memory hierarchy. The soft-RoCE VM (`tests/rdma-vm/run.sh`, run by CI) mounts cgroup v2 with
//! the memory controller and sets `HETKV_CGROUP_REQUIRED=1`, so there it must run; elsewhere, a
//! machine without a usable memory cgroup says why it did not run and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

mod common;
use common::Daemon;

const LIMIT: u64 = 1 << 30;

/// A memory cgroup made for the test, removed when dropped (after the daemon in it is gone).
struct Cgroup {
    dir: PathBuf,
    /// The file a process's pid is written to, to move it in.
    procs: PathBuf,
}

impl Cgroup {
    /// A child of this process's memory cgroup, limited to `limit` bytes; why not, where this
    /// machine cannot make one.
    fn child(limit: u64) -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let root = Path::new("/sys/fs/cgroup");
        let v1 = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| (root.join("memory"), path, "memory.limit_in_bytes"))
        });
        let v2 = || {
            own.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|path| (root.to_path_buf(), path, "memory.max"))
        };
        let (mount, path, file) = v1
            .or_else(v2)
            .ok_or("no memory cgroup in /proc/self/cgroup")?;
        let dir = mount
            .join(path.trim_start_matches('/'))
            .join(format!("hetkv-test-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create the cgroup {}: {e}", dir.display()))?;
        let group = Cgroup {
            procs: dir.join("cgroup.procs"),
            dir,
        };
        std::fs::write(group.dir.join(file), limit.to_string())
            .map_err(|e| format!("cannot set {file} of {}: {e}", group.dir.display()))?;
        Ok(group)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn the_default_memory_bound_follows_a_real_cgroup_limit() {
    let group = match Cgroup::child(LIMIT) {
        Ok(group) => group,
        Err(why) if std::env::var_os("HETKV_CGROUP_REQUIRED").is_none() => {
            eprintln!("not run on this machine ({why}); the soft-RoCE VM runs it");
            return;
        }
        Err(why) => panic!("{why} (HETKV_CGROUP_REQUIRED is set)"),
    };
    // The shell moves itself into the cgroup, then becomes the daemon (same pid).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(&group.procs)
        .arg(common::hetkv_binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let daemon = Daemon::start(cmd);
    let bound: u64 = daemon
        .logged("bound on all tables' memory", "max_memory")
        .expect("the daemon logs its memory bound")
        .parse()
        .unwrap();
    assert_eq!(bound, LIMIT / 4 * 3, "three quarters of the cgroup's limit");

    let client = TcpShardClient::connect(&daemon.addr, ClientConfig::default()).unwrap();
    let table = |name: &str, rows: u64| TableSpec {
        name: name.into(),
        rows,
        dim: 1024,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 0.1 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    // About 1 GiB of rows: over the bound, refused before anything is mapped.
    let e = client.create_table(&table("big", 256 << 10)).unwrap_err();
    assert!(e.to_string().contains("memory"), "{e}");
    // A small one fits, and the daemon still serves.
    client.create_table(&table("small", 1024)).unwrap();
    let (mut versions, mut rows) = (Vec::new(), Vec::new());
    client
        .pull("small", &[3], &mut versions, &mut rows)
        .unwrap();
    assert_eq!(rows.len(), 1024);
    drop(daemon); // killed and reaped before the cgroup is removed
}
