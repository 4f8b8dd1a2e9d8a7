//! `hetkv export` and `hetkv import` against two running daemons: the exported safetensors file
//! loads in Python (numpy and safetensors, as a serving or analysis job would) and holds exactly
//! the rows and versions the client pulls; importing it seeds another table with those rows.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, Routing, ShardTransport, TableSpec};

mod common;
use common::{serve, Daemon};

fn start(shard: u32, shards: u32) -> Daemon {
    let (shard, shards) = (shard.to_string(), shards.to_string());
    Daemon::start(serve(&["--shard", &shard, "--shards", &shards]))
}

/// The Python the test suite set up (scripts/test.sh), else `python3`.
fn python() -> PathBuf {
    std::env::var_os("HETKV_PYTHON").map_or_else(|| "python3".into(), PathBuf::from)
}

fn hetkv(args: &[&str], cluster: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(args)
        .args(["--cluster", cluster])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hetkv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pulls `keys` of `table` through the client: (rows x dim values, versions).
fn pull(shards: &[TcpShardClient], table: &str, dim: usize, keys: &[u64]) -> (Vec<f32>, Vec<u64>) {
    let routing = Routing::new(shards.len() as u32, hetkv_transport::DEFAULT_BUCKETS);
    let (mut values, mut versions) = (vec![0f32; keys.len() * dim], vec![0u64; keys.len()]);
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    for (j, &k) in keys.iter().enumerate() {
        let s = &shards[routing.shard_of(k)];
        s.pull(table, &[k], &mut v, &mut rows).unwrap();
        values[j * dim..(j + 1) * dim].copy_from_slice(&rows);
        versions[j] = v[0];
    }
    (values, versions)
}

fn write_raw(path: &Path, bytes: impl IntoIterator<Item = u8>) {
    std::fs::write(path, bytes.into_iter().collect::<Vec<u8>>()).unwrap();
}

#[test]
fn an_exported_table_loads_in_python_as_pulled_and_imports_into_another() {
    let daemons = [start(0, 2), start(1, 2)];
    let cluster = format!("{},{}", daemons[0].addr, daemons[1].addr);
    let config = || ClientConfig {
        io_timeout: Some(Duration::from_secs(30)),
        ..ClientConfig::default()
    };
    let shards: Vec<TcpShardClient> = daemons
        .iter()
        .map(|d| TcpShardClient::connect(&d.addr, config()).unwrap())
        .collect();
    let (rows, dim) = (1001u64, 5usize);
    let spec = |name: &str| TableSpec {
        name: name.into(),
        rows,
        dim: dim as u32,
        init: Initializer::Normal { std: 0.1, seed: 11 },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            eps: 1e-8,
            initial_accumulator: 0.1,
        },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    };
    for s in &shards {
        s.create_table(&spec("emb")).unwrap();
        s.create_table(&spec("warm")).unwrap();
    }
    // Some training: keys 3k + 1 get updates of varying counts.
    let routing = spec("emb").routing(2);
    for k in (1..rows).step_by(3) {
        let s = &shards[routing.shard_of(k)];
        let g: Vec<f32> = (0..dim)
            .map(|j| (k as f32 * 0.01) - j as f32 * 0.1)
            .collect();
        s.push("emb", &[k], &[1 + (k % 4) as u32], &g).unwrap();
    }
    let all: Vec<u64> = (0..rows).collect();
    let (values, versions) = pull(&shards, "emb", dim, &all);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("emb.safetensors");
    let out = hetkv(
        &["export", "--table", "emb", "--out", file.to_str().unwrap()],
        &cluster,
    );
    assert!(out.contains("exported 1001 rows"), "{out}");
    write_raw(
        &dir.path().join("values.f32"),
        values.iter().flat_map(|v| v.to_le_bytes()),
    );
    write_raw(
        &dir.path().join("versions.u64"),
        versions.iter().flat_map(|v| v.to_le_bytes()),
    );
    // A subset, in a given order.
    let subset = [999u64, 4, 4, 0, 700];
    std::fs::write(
        dir.path().join("keys.txt"),
        subset.map(|k| k.to_string()).join("\n"),
    )
    .unwrap();
    let part = dir.path().join("part.safetensors");
    hetkv(
        &[
            "export",
            "--table",
            "emb",
            "--out",
            part.to_str().unwrap(),
            "--keys",
            dir.path().join("keys.txt").to_str().unwrap(),
        ],
        &cluster,
    );
    let script = r#"
import sys, numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
t = load_file(d + "/emb.safetensors")
e, v = t["embeddings"], t["versions"]
assert e.dtype == np.float32 and e.shape == (1001, 5), (e.dtype, e.shape)
assert v.dtype == np.uint64 and v.shape == (1001,), (v.dtype, v.shape)
want = np.fromfile(d + "/values.f32", dtype="<f4").reshape(1001, 5)
assert np.array_equal(e, want), "rows differ from those pulled"
assert np.array_equal(v, np.fromfile(d + "/versions.u64", dtype="<u8")), "versions differ"
assert int(v.sum()) > 0
p = load_file(d + "/part.safetensors")
keys = p["keys"]
assert list(keys) == [999, 4, 4, 0, 700], keys
assert np.array_equal(p["embeddings"], want[keys.astype(np.int64)])
print("python ok", e.shape, int(v.sum()))
"#;
    let py = Command::new(python())
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .expect("running python");
    assert!(
        py.status.success(),
        "python could not load the export (scripts/test.sh installs numpy and safetensors into \
         its venv and sets HETKV_PYTHON): {}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(String::from_utf8_lossy(&py.stdout).contains("python ok"));

    // Import the export into "warm": the same rows, each one update newer.
    let out = hetkv(
        &[
            "import",
            "--table",
            "warm",
            "--file",
            file.to_str().unwrap(),
        ],
        &cluster,
    );
    assert!(out.contains("imported 1001 rows"), "{out}");
    let (warm, warm_versions) = pull(&shards, "warm", dim, &all);
    assert_eq!(warm, values);
    assert!(
        warm_versions.iter().all(|&v| v == 1),
        "an import is one update per row"
    );
    // A file that is not what it claims, and a tensor of another dim, are refused.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    for (f, tensor) in [(&junk, "embeddings"), (&file, "versions")] {
        let r = Command::new(env!("CARGO_BIN_EXE_hetkv"))
            .args(["import", "--table", "warm", "--tensor", tensor, "--file"])
            .arg(f)
            .args(["--cluster", &cluster])
            .output()
            .unwrap();
        assert!(!r.status.success());
        assert!(!String::from_utf8_lossy(&r.stderr).is_empty());
    }
    let (after, _) = pull(&shards, "warm", dim, &all);
    assert_eq!(after, values, "a refused import changed nothing");
}
