//! A fault-injecting TCP proxy: between clients and a daemon, it forwards bytes in chunks of
//! random size and, while faults are on, cuts connections at random points (inside frames, in
//! either direction), stalls them (a reply that does not come for seconds) and delays them.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::TestRng;

/// What the proxy did.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections cut, client to daemon (a request cut short).
    pub cut_requests: AtomicU64,
    /// Connections cut, daemon to client (an answer cut short).
    pub cut_answers: AtomicU64,
    /// Stalls of a direction.
    pub stalls: AtomicU64,
}

/// How often each fault strikes, per forwarded chunk.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// One chunk in `cut` cuts the connection.
    pub cut: u64,
    /// One chunk in `stall` stalls for `stall_for`.
    pub stall: u64,
    /// How long a stall lasts.
    pub stall_for: Duration,
    /// One chunk in `delay` waits a millisecond or two.
    pub delay: u64,
}

/// A proxy in front of one upstream address, on 127.0.0.1.
pub struct FaultProxy {
    addr: String,
    faulty: Arc<AtomicBool>,
    /// Milliseconds the next answer chunk of any connection is held (0: none armed).
    stall_once: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// What it did.
    pub counts: Arc<FaultCounts>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`, injecting `faults` (until
    /// [`FaultProxy::heal`]); `seed` makes the fault points reproducible per connection.
    pub fn start(upstream: &str, faults: Faults, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().unwrap().to_string();
        let faulty = Arc::new(AtomicBool::new(true));
        let stall_once = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FaultCounts::default());
        let upstream = upstream.to_string();
        let accept = {
            let (faulty, stop, counts) = (faulty.clone(), stop.clone(), counts.clone());
            let stall_once = stall_once.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            n += 1;
                            counts.connections.fetch_add(1, Ordering::Relaxed);
                            let Ok(server) = TcpStream::connect(&upstream) else {
                                continue;
                            };
                            client.set_nonblocking(false).unwrap();
                            for (from, to, up, s) in [
                                (&client, &server, true, seed ^ (n * 2)),
                                (&server, &client, false, seed ^ (n * 2 + 1)),
                            ] {
                                let (from, to) =
                                    (from.try_clone().unwrap(), to.try_clone().unwrap());
                                let (faulty, stop, counts) =
                                    (faulty.clone(), stop.clone(), counts.clone());
                                let stall_once = stall_once.clone();
                                std::thread::spawn(move || {
                                    let link = Link {
                                        faulty: &faulty,
                                        stall_once: &stall_once,
                                        stop: &stop,
                                        counts: &counts,
                                    };
                                    pump(from, to, up, faults, TestRng(s), link)
                                });
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            addr,
            faulty,
            stall_once,
            stop,
            counts,
            accept: Some(accept),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops injecting faults; bytes flow freely from now on.
    pub fn heal(&self) {
        self.faulty.store(false, Ordering::Relaxed);
    }

    /// Injects faults again (after [`FaultProxy::heal`]).
    pub fn resume(&self) {
        self.faulty.store(true, Ordering::Relaxed);
    }

    /// Holds the next answer chunk that any connection forwards for `d` (faults on or not): one
    /// link stalls while the others flow.
    pub fn stall_one_answer(&self, d: Duration) {
        self.stall_once
            .store(d.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Whether the armed stall has struck.
    pub fn stall_struck(&self) -> bool {
        self.stall_once.load(Ordering::Relaxed) == 0
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// What a pump shares with its proxy.
struct Link<'a> {
    faulty: &'a AtomicBool,
    stall_once: &'a AtomicU64,
    stop: &'a AtomicBool,
    counts: &'a FaultCounts,
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    up: bool,
    faults: Faults,
    mut rng: TestRng,
    link: Link<'_>,
) {
    let Link {
        faulty,
        stall_once,
        stop,
        counts,
    } = link;
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 4096];
    let cut = |from: &TcpStream, to: &TcpStream| {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    };
    while !stop.load(Ordering::Relaxed) {
        let want = 1 + rng.below(buf.len() as u64) as usize;
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if !up {
            let ms = stall_once.swap(0, Ordering::Relaxed);
            if ms > 0 {
                counts.stalls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        if faulty.load(Ordering::Relaxed) {
            if rng.below(faults.cut) == 0 {
                // Forward part of the chunk first, so that the cut lands inside a frame.
                let part = rng.below(n as u64) as usize;
                let _ = to.write_all(&buf[..part]);
                let which = if up {
                    &counts.cut_requests
                } else {
                    &counts.cut_answers
                };
                which.fetch_add(1, Ordering::Relaxed);
                cut(&from, &to);
                return;
            }
            if rng.below(faults.stall) == 0 {
                counts.stalls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(faults.stall_for);
            } else if rng.below(faults.delay) == 0 {
                std::thread::sleep(Duration::from_millis(1 + rng.below(2)));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    cut(&from, &to);
}
