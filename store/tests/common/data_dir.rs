//! A data directory with one checkpoint `k` of one trained table, and forgeries of it that pass
//! every checksum (for the tests of hostile data directories).

#![allow(dead_code)] // each test binary uses part of this

use std::io::BufReader;
use std::path::{Path, PathBuf};

use hetkv_store::checkpoint::format::{FileHeader, Manifest, TableFileReader, TableFileWriter};
#[path = "rows.rs"]
mod rows;

use hetkv_store::{Shard, ShardConfig};
use hetkv_transport::{Initializer, OptimizerSpec, TableSpec};

const ADAGRAD: OptimizerSpec = OptimizerSpec::Adagrad {
    lr: 0.1,
    eps: 1e-6,
    initial_accumulator: 0.1,
};

fn spec(rows: u64) -> TableSpec {
    TableSpec {
        name: "emb".into(),
        rows,
        dim: 4,
        init: Initializer::Uniform {
            bound: 0.5,
            seed: 3,
        },
        optimizer: ADAGRAD,
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

pub fn shard(dir: &Path) -> Shard {
    let mut c = ShardConfig::new(0, 1);
    c.data_dir = Some(dir.to_path_buf());
    Shard::new(c).unwrap()
}

/// A data dir holding checkpoint `k` of one trained 500-row table; returns the checkpoint's dir.
pub fn checkpointed(dir: &Path) -> PathBuf {
    let s = shard(dir);
    let (t, _) = s.create(spec(500)).unwrap();
    let keys: Vec<u64> = (0..500).collect();
    let grads: Vec<f32> = (0..2000).map(|i| i as f32 * 1e-3).collect();
    rows::push(&t, &keys, &[1; 500], &grads);
    s.checkpoint("k", false).unwrap();
    dir.join("checkpoints").join("k")
}

/// Rewrites checkpoint `k`'s table file with `header` and each record passed through `edit`,
/// and its manifest to match: a forgery every checksum accepts.
pub fn forge(ck: &Path, header: impl FnOnce(&mut FileHeader), mut edit: impl FnMut(&mut [u8])) {
    let path = ck.join("t00000.hkc");
    let file = std::fs::File::open(&path).unwrap();
    let mut r = TableFileReader::open(BufReader::new(file), "original").unwrap();
    let mut h = r.header().clone();
    let mut records = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        records.push(rec.bytes().to_vec());
    }
    header(&mut h);
    let mut w = TableFileWriter::new(Vec::new(), &h).unwrap();
    for mut rec in records {
        edit(&mut rec);
        let index = u64::from_le_bytes(rec[0..8].try_into().unwrap());
        w.next_record(index).unwrap().copy_from_slice(&rec);
    }
    let (bytes, summary) = w.finish(0).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    set_manifest(ck, |m| {
        let t = &mut m.tables[0];
        (t.rows, t.bytes, t.crc32c) = (summary.rows, summary.bytes, summary.crc32c);
    });
}

pub fn set_manifest(ck: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = ck.join("MANIFEST");
    let mut m = Manifest::decode(&std::fs::read(&path).unwrap(), "MANIFEST").unwrap();
    edit(&mut m);
    std::fs::write(&path, m.encode()).unwrap();
}
