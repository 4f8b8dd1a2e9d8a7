//! A data directory an operator (or an attacker who can write into it) got wrong: files forged to
//! pass every checksum, symbolic links, FIFOs. A restore and `checkpoint verify` refuse each,
//! naming the file, without following the link or allocating what a header claims. (A FIFO is
//! `fifo_in_data_dir.rs`: it runs `mkfifo`, and a child forked while a shard of these tests
//! holds its data directory's lock would hold it too.)

use std::io::BufReader;
use std::path::Path;

use hetkv_store::checkpoint::format::{Kind, TableFileReader};
use hetkv_store::checkpoint::CheckpointDir;
use hetkv_transport::row::MAX_VERSION;

#[path = "common/data_dir.rs"]
mod data_dir;

use data_dir::{checkpointed, forge, set_manifest, shard};

/// The restore's error and `verify`'s, which must agree that the checkpoint is refused.
fn refusals(dir: &Path) -> (String, String) {
    let restore = shard(dir).restore(None).expect_err("restored").to_string();
    let verify = CheckpointDir::at(dir)
        .verify("k")
        .expect_err("verified")
        .to_string();
    (restore, verify)
}

#[test]
fn a_header_claiming_more_rows_than_its_file_holds_is_refused_before_the_table_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpointed(dir.path());
    // 2^31 rows of 4 floats and Adagrad state: 64 GiB of table, claimed by a file of 100 bytes.
    let path = ck.join("t00000.hkc");
    let mut h = {
        let f = std::fs::File::open(&path).unwrap();
        TableFileReader::open(BufReader::new(f), "original")
            .unwrap()
            .header()
            .clone()
    };
    h.spec.rows = 1 << 31;
    h.local_rows = 1 << 31;
    let bytes = h.encode();
    std::fs::write(&path, &bytes).unwrap();
    set_manifest(&ck, |m| {
        let t = &mut m.tables[0];
        (t.rows, t.bytes) = (1 << 31, bytes.len() as u64);
    });
    let (restore, verify) = refusals(dir.path());
    for err in [&restore, &verify] {
        assert!(
            err.contains("t00000.hkc") && err.contains("is at least"),
            "{err}"
        );
    }
    // A manifest whose length disagrees with the file on disk is refused as early.
    set_manifest(&ck, |m| m.tables[0].bytes = 1 << 40);
    let (restore, _) = refusals(dir.path());
    assert!(restore.contains("bytes on disk"), "{restore}");
}

#[test]
fn forged_versions_and_non_finite_values_are_refused() {
    type Edit = fn(&mut [u8]);
    let cases: [(&str, Edit); 4] = [
        ("version above the largest", |r| {
            if r[0] == 7 {
                r[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            }
        }),
        ("version just above the largest", |r| {
            if r[0] == 9 {
                r[8..16].copy_from_slice(&(MAX_VERSION + 1).to_le_bytes());
            }
        }),
        ("NaN value", |r| {
            if r[0] == 11 {
                r[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }),
        ("infinite optimizer state", |r| {
            if r[0] == 13 {
                // The first element after the four values: Adagrad's accumulator.
                r[32..36].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }
        }),
    ];
    for (what, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpointed(dir.path());
        forge(&ck, |_| {}, edit);
        let (restore, verify) = refusals(dir.path());
        for err in [&restore, &verify] {
            assert!(err.contains("t00000.hkc"), "{what}: {err}");
            let named = if what.contains("version") {
                "above the largest a row may reach"
            } else {
                "non-finite"
            };
            assert!(err.contains(named), "{what}: {err}");
        }
    }
    // The same forgery with an honest record restores: the refusals are of the edits.
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpointed(dir.path());
    forge(&ck, |h| assert_eq!(h.kind, Kind::Full), |_| {});
    shard(dir.path()).restore(None).unwrap().unwrap();
}

#[test]
fn symbolic_links_in_the_data_dir_are_never_followed() {
    // A table file, a manifest, a checkpoint's directory and `checkpoints/` itself, each replaced
    // by a link to an intact copy elsewhere: each is refused, naming the link.
    for victim in ["t00000.hkc", "MANIFEST", "k", "checkpoints"] {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpointed(dir.path());
        let elsewhere = tempfile::tempdir().unwrap();
        let path = match victim {
            "k" => ck.clone(),
            "checkpoints" => dir.path().join("checkpoints"),
            file => ck.join(file),
        };
        let moved = elsewhere.path().join(victim);
        std::fs::rename(&path, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &path).unwrap();
        let err = shard(dir.path())
            .restore(Some("k"))
            .expect_err("followed a link")
            .to_string();
        assert!(err.contains("symbolic link"), "{victim}: {err}");
        // Nothing is written through a linked directory either.
        if victim == "checkpoints" || victim == "k" {
            let s = shard(dir.path());
            let err = s.checkpoint("k", false).unwrap_err().to_string();
            assert!(err.contains("symbolic link"), "{victim}: {err}");
        }
    }
}
