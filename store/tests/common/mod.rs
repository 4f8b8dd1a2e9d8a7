//! Running the `hetkv` binary in tests: a daemon started from a command line, its address read
//! from its log, its log kept (and drained, so its writes to stderr never fail), killed when
//! dropped.

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

/// `hetkv serve --listen 127.0.0.1:0` with `args`, logging at info level without colours.
pub fn serve(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hetkv"));
    c.args(["serve", "--listen", "127.0.0.1:0"])
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
