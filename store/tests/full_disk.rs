//! A full disk during a checkpoint: the checkpoint fails with the error, its files are removed,
//! the previous checkpoint stays whole, and a full checkpoint works again once there is room.
//! A test binary of its own: it forks `mount` and `umount`, which must not share another test's
//! data-directory lock.

use std::path::Path;

#[path = "common/rows.rs"]
mod rows;

use hetkv_store::checkpoint::CheckpointDir;
use hetkv_store::{Shard, ShardConfig, Table};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

fn shard(dir: &Path) -> Shard {
    let mut c = ShardConfig::new(0, 1);
    c.data_dir = Some(dir.to_path_buf());
    Shard::new(c).unwrap()
}

/// Pushes gradients to every row.
fn train(t: &Table) {
    let keys: Vec<u64> = (0..t.local_rows()).collect();
    let grads: Vec<f32> = (0..keys.len() * t.spec().dim as usize)
        .map(|i| i as f32 * 1e-6)
        .collect();
    rows::push(t, &keys, &vec![1; keys.len()], &grads);
}

#[test]
fn a_full_disk_fails_the_checkpoint_and_keeps_the_previous_one() {
    // A tmpfs of 7 MiB: one checkpoint (about 4.6 MiB) fits, two do not.
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=7m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("running mount");
    assert!(
        status.success(),
        "this test mounts a small tmpfs to fill (it needs root, as in CI and scripts/test.sh)"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let s = shard(&mnt);
    let (t, _) = s
        .create(TableSpec {
            name: "emb".into(),
            rows: 100_000,
            dim: 8,
            init: Initializer::Zeros,
            optimizer: OptimizerSpec::Sgd { lr: 0.1 },
            buckets: hetkv_transport::DEFAULT_BUCKETS,
            dynamic: None,
        })
        .unwrap();
    train(&t);
    s.checkpoint("first", false).unwrap();
    let err = s.checkpoint("second", false).unwrap_err().to_string();
    assert!(
        err.contains("No space left") || err.contains("space"),
        "{err}"
    );
    let dir = CheckpointDir::at(&mnt);
    dir.verify("first").unwrap();
    assert!(
        !mnt.join("checkpoints").join("second").exists(),
        "the failed checkpoint's files are removed"
    );
    assert_eq!(dir.newest().unwrap().unwrap().name, "first");
    // The chain is broken for incremental ones, and a full one works again once there is room.
    let err = s.checkpoint("third", true).unwrap_err().to_string();
    assert!(err.contains("needs a parent"), "{err}");
    std::fs::remove_dir_all(mnt.join("checkpoints").join("first")).unwrap();
    s.checkpoint("fourth", false).unwrap();
}
