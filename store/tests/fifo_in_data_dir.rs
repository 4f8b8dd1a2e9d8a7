//! A FIFO in place of a checkpoint's file is refused at once, by a restore and by `verify`: a
//! reader that opened it blocking would wait forever for a writer. (Apart from
//! `hostile_data_dir.rs`: it runs `mkfifo`, and a child forked while a shard of those tests holds
//! its data directory's lock would hold it too.)

use std::time::Duration;

use hetkv_store::checkpoint::CheckpointDir;

#[path = "common/data_dir.rs"]
mod data_dir;

use data_dir::{checkpointed, shard};

#[test]
fn a_fifo_in_place_of_a_file_is_refused_at_once() {
    for victim in ["t00000.hkc", "MANIFEST"] {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpointed(dir.path());
        let path = ck.join(victim);
        std::fs::remove_file(&path).unwrap();
        // No shard is alive here (the one that wrote the checkpoint is dropped): the child
        // inherits no lock.
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        // No writer ever opens the FIFO: the restore runs on a thread the test can give up on.
        let (tx, rx) = std::sync::mpsc::channel();
        let data = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let restore = shard(&data).restore(Some("k")).map(|_| ());
            let verify = CheckpointDir::at(&data).verify("k").map(|_| ());
            let _ = tx.send((
                restore.map_err(|e| e.to_string()),
                verify.map_err(|e| e.to_string()),
            ));
        });
        let (restore, verify) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("a restore or verify with a FIFO as {victim} hung"));
        for err in [restore, verify] {
            let err = err.expect_err("a FIFO was read");
            assert!(
                err.contains("FIFO") && err.contains(victim),
                "{victim}: {err}"
            );
        }
    }
}
