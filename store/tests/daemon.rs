//! The `hetkv` binary: tables from a TOML config, `hetkv stats --json` against two running
//! daemons, and a graceful stop on SIGTERM and SIGINT.

use std::process::Command;
use std::time::Duration;

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::ShardTransport;

const CONFIG: &str = r#"
[server]
max_frame_bytes = 8388608

[[tables]]
name = "ads"
rows = 1000
dim = 8
init = { normal = { std = 0.01, seed = 7 } }
optimizer = { adagrad = { lr = 0.05, eps = 1e-8, initial_accumulator = 0.1 } }
"#;

mod common;
use common::{serve, Daemon};

fn start(shard: u32, shards: u32, config: &std::path::Path, data_dir: &std::path::Path) -> Daemon {
    let (shard, shards) = (shard.to_string(), shards.to_string());
    let mut cmd = serve(&["--shard", &shard, "--shards", &shards]);
    cmd.arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir);
    Daemon::start(cmd)
}

trait Stop {
    fn signal_and_wait(self, signal: &str) -> Vec<String>;
}

impl Stop for Daemon {
    fn signal_and_wait(mut self, signal: &str) -> Vec<String> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "daemon exited with {status}");
                // Everything it wrote, up to the end of its stderr.
                let mut lines = Vec::new();
                while let Ok(line) = self.log.recv_timeout(Duration::from_secs(10)) {
                    lines.push(line);
                }
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().ok();
        panic!("daemon did not stop within 10 s of {signal}");
    }
}

#[test]
fn two_daemons_serve_their_config_report_stats_and_stop_on_signals() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hetkv.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let d0 = start(0, 2, &config, &dir.path().join("d0"));
    let d1 = start(1, 2, &config, &dir.path().join("d1"));

    let c0 = TcpShardClient::connect(&d0.addr, ClientConfig::default()).unwrap();
    let c1 = TcpShardClient::connect(&d1.addr, ClientConfig::default()).unwrap();
    assert_eq!(
        (c0.hello().shard, c0.hello().shards, c0.hello().max_frame),
        (0, 2, 8 << 20)
    );
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    c0.pull("ads", &[0, 2, 4], &mut v, &mut rows).unwrap();
    c1.push("ads", &[1, 3], &[2, 1], &[0.5; 16]).unwrap();
    let region = c1.region_info("ads").unwrap();
    let in_data_dir: Vec<_> = std::fs::read_dir(dir.path().join("d1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        in_data_dir,
        ["hetkv.lock"],
        "the data dir holds the lock (and checkpoints), never live regions"
    );
    assert_eq!(
        (region.shm_path, c1.hello().shm_dir.clone()),
        (None, None),
        "a data dir is not exposed as shared memory"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(["stats", "--json", "--cluster"])
        .arg(format!("{},{}", d0.addr, d1.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shards = json["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let s0 = &shards[0]["stats"];
    let s1 = &shards[1]["stats"];
    assert_eq!(s0["tables"][0]["name"], "ads");
    assert_eq!(s0["tables"][0]["rows"], 1000);
    assert_eq!(s0["tables"][0]["dim"], 8);
    assert_eq!(s0["tables"][0]["optimizer"], "adagrad");
    assert_eq!(s0["rows_read"], 3);
    assert_eq!(s1["rows_pushed"], 2);
    assert_eq!(s1["tables"][0]["updates"], 3);
    for s in [s0, s1] {
        assert!(s["requests"].as_u64().unwrap() >= 2);
        assert!(s["bytes_in"].as_u64().unwrap() > 0 && s["bytes_out"].as_u64().unwrap() > 0);
    }

    // Listing the shards in the wrong order is an error, not a silent misroute.
    let swapped = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(["stats", "--cluster"])
        .arg(format!("{},{}", d1.addr, d0.addr))
        .output()
        .unwrap();
    assert!(!swapped.status.success());
    assert!(String::from_utf8_lossy(&swapped.stderr).contains("listed as shard 0"));

    drop((c0, c1));
    let log0 = d0.signal_and_wait("-TERM");
    assert!(log0.iter().any(|l| l.contains("SIGTERM")), "{log0:?}");
    assert!(log0.iter().any(|l| l.contains("stopped")), "{log0:?}");
    let log1 = d1.signal_and_wait("-INT");
    assert!(log1.iter().any(|l| l.contains("SIGINT")), "{log1:?}");
}

#[test]
fn a_bad_config_stops_the_daemon_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[[tables]]\nname = \"t\"\nrows = 0\ndim = 4\ninit = \"zeros\"\noptimizer = { sgd = { lr = 0.1 } }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rows 0"), "{err}");
}

/// `hetkv stats` against a port that accepts and never answers, and one where nothing listens:
/// it returns within its timeout, with one error line per failed shard naming it, and fails.
#[test]
fn stats_reports_each_failing_shard_within_its_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        // Accept and hold one connection without a word, until the test is done with it.
        let conn = silent.accept().map(|(c, _)| c);
        std::thread::sleep(Duration::from_secs(4));
        drop(conn);
    });
    let dead_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(["stats", "--timeout", "1", "--cluster"])
        .arg(format!("{silent_addr},{dead_addr}"))
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("shard 0/2 at {silent_addr}: error")),
        "{err}"
    );
    assert!(
        err.contains(&format!("shard 1/2 at {dead_addr}: error")),
        "{err}"
    );
    assert!(err.contains("2 of 2 shards did not answer"), "{err}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} with a 1 s timeout"
    );
    held.join().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hetkv"))
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-token-file"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
}

/// A daemon without a token closes idle connections after 600 s unless told otherwise; one with
/// a token never does by default; `--idle-timeout 0` is never.
#[test]
fn the_idle_timeout_is_on_by_default_only_without_a_token() {
    let d = Daemon::start(serve(&[]));
    assert_eq!(
        d.logged("closing connections idle this long", "seconds")
            .as_deref(),
        Some("600.0"),
        "{:?}",
        d.startup
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "secret\n").unwrap();
    let mut cmd = serve(&["--auth-token-file"]);
    cmd.arg(&token);
    let d = Daemon::start(cmd);
    assert!(
        d.startup
            .iter()
            .any(|l| l.contains("idle connections are never closed")),
        "{:?}",
        d.startup
    );
    let d = Daemon::start(serve(&["--idle-timeout", "0"]));
    assert!(d
        .startup
        .iter()
        .any(|l| l.contains("idle connections are never closed")));
}
