//! Running the `hetkv` binary in tests: a daemon started from a command line, its address read
//! from its log, its log kept (and drained, so its writes to stderr never fail), killed when
//! dropped. Tests of other crates of the workspace include this file too (`#[path]`), and find
//! the binary beside their own executable.

#![allow(dead_code)] // each test binary uses part of this

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A `hetkv serve` process.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: String,
    /// Its log lines up to and including "listening".
    pub startup: Vec<String>,
    /// Its later log lines.
    pub log: mpsc::Receiver<String>,
}

/// The `hetkv` binary: `$HETKV_BIN` when set (a test binary run where cargo's target directory
/// is not, as in the soft-RoCE VM); else cargo's for the store's own tests; for another crate's
/// tests, the one in the target directory above their executable (`cargo test --workspace`
/// builds it).
pub fn hetkv_binary() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("HETKV_BIN") {
        return bin.into();
    }
    if let Some(bin) = option_env!("CARGO_BIN_EXE_hetkv") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test's executable");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("hetkv"))
        .expect("a target directory");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p \
         hetkv-store` first)",
        bin.display()
    );
    bin
}

/// `hetkv serve --listen 127.0.0.1:0` with `args`, logging at info level without colours.
pub fn serve(args: &[&str]) -> Command {
    serve_on("127.0.0.1:0", args)
}

/// `hetkv serve --listen addr` with `args`, logging at info level without colours.
pub fn serve_on(addr: &str, args: &[&str]) -> Command {
    let mut c = Command::new(hetkv_binary());
    c.args(["serve", "--listen", addr])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    c
}

impl Daemon {
    /// Starts `cmd` and waits (at most 60 s) until it logs where it listens.
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hetkv serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = mpsc::channel();
        let mut d = Daemon {
            child,
            addr: String::new(),
            startup: Vec::new(),
            log,
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        while d.addr.is_empty() {
            let line = d
                .log
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("the daemon did not log 'listening': {:#?}", d.startup));
            if line.contains("listening") {
                let at = line.find("addr=").expect("addr field") + 5;
                d.addr = line[at..].split_whitespace().next().unwrap().to_string();
            }
            d.startup.push(line);
        }
        d
    }

    /// The value of `field=` in the first startup line containing `what`.
    pub fn logged(&self, what: &str, field: &str) -> Option<String> {
        let key = format!("{field}=");
        self.startup
            .iter()
            .filter(|l| l.contains(what))
            .find_map(|l| l.find(&key).map(|at| l[at + key.len()..].to_string()))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
