//! The operator's view of checkpoints, through the `hetkv` binary: `checkpoint --cluster` on a
//! running daemon, `checkpoint list|verify|compact` on its data directory, a restart that restores
//! the newest checkpoint, and daemons that refuse to start on a damaged checkpoint or on a config
//! table that contradicts the restored one.

use std::path::Path;
use std::process::{Command, Output};

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

mod common;
use common::Daemon;

fn serve(data: &Path, extra: &[&str]) -> Command {
    let mut c = common::serve(extra);
    c.arg("--data-dir").arg(data);
    c
}

fn start(data: &Path) -> Daemon {
    Daemon::start(serve(data, &[]))
}

fn hetkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spec() -> TableSpec {
    TableSpec {
        name: "ads".into(),
        rows: 5000,
        dim: 8,
        init: Initializer::Normal { std: 0.1, seed: 2 },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            eps: 1e-8,
            initial_accumulator: 0.1,
        },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    }
}

#[test]
fn operators_checkpoint_list_verify_compact_and_restart_from_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data_s = data.to_str().unwrap();
    let d = start(&data);
    let c = TcpShardClient::connect(&d.addr, ClientConfig::default()).unwrap();
    c.create_table(&spec()).unwrap(); // created over RPC: part of what a checkpoint keeps
    c.push("ads", &[1, 2, 3], &[1, 2, 3], &[0.5; 24]).unwrap();
    let out = ok(hetkv(&["checkpoint", "--cluster", &d.addr, "--name", "a"]));
    assert!(out.contains("checkpoint a (seq 1) committed"), "{out}");
    c.push("ads", &[3, 4], &[1, 1], &[0.25; 16]).unwrap();
    let out = ok(hetkv(&[
        "checkpoint",
        "--cluster",
        &d.addr,
        "--name",
        "b",
        "--incremental",
    ]));
    assert!(out.contains("incremental on a"), "{out}");
    // A name taken is refused, with a non-zero exit.
    let again = hetkv(&["checkpoint", "--cluster", &d.addr, "--name", "b"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    c.pull("ads", &[1, 2, 3, 4, 5], &mut v, &mut rows).unwrap();
    let at_b = (v.clone(), rows.clone());
    drop(c);
    drop(d); // SIGKILL

    let list = ok(hetkv(&["checkpoint", "list", "--data-dir", data_s]));
    assert!(list.contains("a ") && list.contains("on a"), "{list}");
    ok(hetkv(&[
        "checkpoint",
        "verify",
        "--data-dir",
        data_s,
        "--name",
        "b",
    ]));

    // Restarted: the newest checkpoint (b) comes back, and the same table from a config is fine.
    let d = start(&data);
    assert_eq!(
        d.logged("restored", "checkpoint").as_deref(),
        Some("b"),
        "{:#?}",
        d.startup
    );
    let c = TcpShardClient::connect(&d.addr, ClientConfig::default()).unwrap();
    assert!(!c.create_table(&spec()).unwrap().created);
    c.pull("ads", &[1, 2, 3, 4, 5], &mut v, &mut rows).unwrap();
    assert_eq!((v.clone(), rows.clone()), at_b);
    drop(c);
    drop(d);

    // Compacted into a full checkpoint (the data dir must be free of daemons).
    let out = ok(hetkv(&[
        "checkpoint",
        "compact",
        "--data-dir",
        data_s,
        "--name",
        "b",
        "--out",
        "b-full",
    ]));
    assert!(out.contains("b-full"), "{out}");

    // A flipped byte in the newest checkpoint: verify names it, and the daemon does not start.
    let file = data.join("checkpoints/b-full/t00000.hkc");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    std::fs::write(&file, &bad).unwrap();
    let v = hetkv(&["checkpoint", "verify", "--data-dir", data_s]);
    assert!(!v.status.success());
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(err.contains("t00000.hkc") && err.contains("block"), "{err}");
    let refused = serve(&data, &[]).output().unwrap();
    assert!(
        !refused.status.success(),
        "a daemon started on a damaged checkpoint"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("t00000.hkc") && err.contains("does not start"),
        "{err}"
    );
    // The operator picks the older one explicitly.
    let older = Daemon::start(serve(&data, &["--restore", "b"]));
    assert_eq!(older.logged("restored", "checkpoint").as_deref(), Some("b"));
    drop(older);
    std::fs::write(&file, &good).unwrap();

    // A config whose table contradicts the restored one stops the daemon.
    let config = dir.path().join("conflict.toml");
    std::fs::write(
        &config,
        "[[tables]]\nname = \"ads\"\nrows = 5000\ndim = 16\ninit = \"zeros\"\noptimizer = { sgd = { lr = 0.1 } }\n",
    )
    .unwrap();
    let out = serve(&data, &["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("conflicting table"), "{err}");
    // Another shard count is refused too.
    let out = serve(&data, &["--shards", "2"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shard 0 of 1"));
}

/// `hetkv checkpoint` whose daemon is killed while it writes says at once that the outcome is
/// unknown, with a non-zero exit, instead of trying again until its deadline.
#[test]
fn a_checkpoint_whose_daemon_dies_mid_call_is_reported_unknown_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let c = TcpShardClient::connect(&d.addr, ClientConfig::default()).unwrap();
    // 1M rows of 32 floats: a checkpoint of about 150 MB, long enough to be killed inside.
    c.create_table(&TableSpec {
        name: "big".into(),
        rows: 1 << 20,
        dim: 32,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 0.1 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    })
    .unwrap();
    let started = std::time::Instant::now();
    let cli = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(["checkpoint", "--cluster", &d.addr, "--name", "x"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        let line = d
            .log
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the daemon logs the checkpoint's start");
        if line.contains("writing checkpoint") {
            break;
        }
    }
    d.child.kill().unwrap(); // SIGKILL, inside the call
    let _ = d.child.wait();
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is unknown"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "it took {:?} (the deadline is 60 s)",
        started.elapsed()
    );
}

#[test]
fn a_cluster_checkpoint_moves_onto_three_shards_and_exports_the_same_table() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<_> = (0..3).map(|i| dir.path().join(format!("s{i}"))).collect();
    let spec = TableSpec {
        buckets: 5, // divided by neither 2 nor 3
        ..spec()
    };
    let cluster = |n: usize| -> Vec<Daemon> {
        (0..n)
            .map(|i| {
                let (shard, shards) = (i.to_string(), n.to_string());
                Daemon::start(serve(&data[i], &["--shard", &shard, "--shards", &shards]))
            })
            .collect()
    };
    let addrs = |ds: &[Daemon]| {
        ds.iter()
            .map(|d| d.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let export = |ds: &[Daemon], out: &str| {
        let path = dir.path().join(out);
        let path_s = path.to_str().unwrap();
        ok(hetkv(&[
            "export",
            "--cluster",
            &addrs(ds),
            "--table",
            "ads",
            "--out",
            path_s,
        ]));
        std::fs::read(path).unwrap()
    };

    let two = cluster(2);
    let clients: Vec<TcpShardClient> = two
        .iter()
        .map(|d| TcpShardClient::connect(&d.addr, ClientConfig::default()).unwrap())
        .collect();
    let routing = spec.routing(2);
    for c in &clients {
        c.create_table(&spec).unwrap();
    }
    for k in (0..spec.rows).step_by(7) {
        let g: Vec<f32> = (0..8)
            .map(|j| (k % 13) as f32 * 0.01 - j as f32 * 0.02)
            .collect();
        clients[routing.shard_of(k)]
            .push("ads", &[k], &[1 + (k % 3) as u32], &g)
            .unwrap();
    }
    let before = export(&two, "two.safetensors");
    ok(hetkv(&[
        "checkpoint",
        "--cluster",
        &addrs(&two),
        "--name",
        "k",
    ]));
    drop(clients);
    drop(two);

    let (from, to) = (
        format!("{},{}", data[1].display(), data[0].display()),
        data.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    let out = ok(hetkv(&[
        "checkpoint",
        "reshard",
        "--from",
        &from,
        "--name",
        "k",
        "--to",
        &to,
        "--out",
        "k3",
    ]));
    assert!(out.contains("shard 2 of 3"), "{out}");
    let three = cluster(3);
    // The tensors' bytes (after the JSON header, whose metadata keys come in any order).
    let tensors = |file: &[u8]| {
        let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        file[8 + header..].to_vec()
    };
    let after = export(&three, "three.safetensors");
    assert_eq!(before.len(), after.len());
    assert!(
        tensors(&after) == tensors(&before),
        "the table on 3 shards exports as on 2"
    );
    // Resharding with a daemon still running on a directory is refused.
    let out = hetkv(&[
        "checkpoint",
        "reshard",
        "--from",
        &to,
        "--name",
        "k3",
        "--to",
        &from,
        "--out",
        "k2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop its daemon first"), "{err}");
}
