//! Daemons that do not answer: every operator command against a silent, a dead and a non-hetkv
//! address fails within its timeout with a message naming the address; and a daemon SIGSTOPped
//! in the middle of a client's calls makes them wait (never past their deadline) and go on,
//! each push applied once, when it is SIGCONTed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use hetkv_fallback_tcp::{ClientConfig, TcpShardClient};
use hetkv_transport::{Initializer, OptimizerSpec, ShardTransport, TableSpec};

mod common;
use common::Daemon;

/// A listener that accepts connections and never says a word (until the test ends).
fn silent() -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    l.set_nonblocking(true).unwrap();
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match l.accept() {
                Ok((c, _)) => held.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (addr, h)
}

/// A listener that answers every connection with an HTTP response, as a web server would.
fn not_hetkv() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten().take(64) {
            let mut buf = [0u8; 256];
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    addr
}

fn dead() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn every_operator_command_fails_within_its_timeout_naming_the_address() {
    let (quiet, _held) = silent();
    let targets = [
        ("silent", quiet),
        ("dead", dead()),
        ("not hetkv", not_hetkv()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.safetensors");
    std::fs::write(&file, b"not read: the cluster is asked first").unwrap();
    let out_file = dir.path().join("out.safetensors");
    for (what, addr) in &targets {
        let commands: [Vec<&str>; 4] = [
            vec!["stats", "--timeout", "1", "--cluster", addr],
            vec![
                "checkpoint",
                "--timeout",
                "1",
                "--cluster",
                addr,
                "--name",
                "c",
            ],
            vec![
                "export",
                "--timeout",
                "1",
                "--cluster",
                addr,
                "--table",
                "t",
                "--out",
                out_file.to_str().unwrap(),
            ],
            vec![
                "import",
                "--timeout",
                "1",
                "--cluster",
                addr,
                "--table",
                "t",
                "--file",
                file.to_str().unwrap(),
            ],
        ];
        for args in commands {
            let started = Instant::now();
            let out = Command::new(common::hetkv_binary())
                .args(&args)
                .output()
                .unwrap();
            let took = started.elapsed();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: {args:?} succeeded");
            assert!(err.contains(addr.as_str()), "{what}: {args:?}: {err}");
            assert!(
                took < Duration::from_secs(4),
                "{what}: {args:?} took {took:?} with a 1 s timeout: {err}"
            );
        }
    }
}

#[test]
fn calls_wait_through_a_stopped_daemon_and_go_on_when_it_continues() {
    let d = Daemon::start(common::serve(&[]));
    let config = ClientConfig {
        io_timeout: Some(Duration::from_millis(300)),
        deadline: Duration::from_secs(20),
        ..ClientConfig::default()
    };
    let c = TcpShardClient::connect(&d.addr, config).unwrap();
    c.create_table(&TableSpec {
        name: "t".into(),
        rows: 16,
        dim: 2,
        init: Initializer::Zeros,
        optimizer: OptimizerSpec::Sgd { lr: 1.0 },
        buckets: hetkv_transport::DEFAULT_BUCKETS,
        dynamic: None,
    })
    .unwrap();
    let pid = d.child.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut slowest, mut pushes) = (Duration::ZERO, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                c.push("t", &[3], &[1], &[1.0, 1.0]).unwrap();
                slowest = slowest.max(t.elapsed());
                pushes += 1;
            }
            (c, slowest, pushes)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    signal("-STOP");
    std::thread::sleep(Duration::from_millis(1500)); // several I/O timeouts: calls are re-sent
    signal("-CONT");
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (c, slowest, pushes) = worker.join().unwrap();
    assert!(
        slowest >= Duration::from_millis(1000),
        "a call waited through the stop ({slowest:?})"
    );
    assert!(slowest < Duration::from_secs(20), "within the deadline");
    assert!(
        c.retries() > 0,
        "calls were sent again after stalled connections"
    );
    let (mut v, mut rows) = (Vec::new(), Vec::new());
    c.pull("t", &[3], &mut v, &mut rows).unwrap();
    assert_eq!(v[0], pushes, "every push applied exactly once");
    assert_eq!(rows, vec![-(pushes as f32); 2]);
}
