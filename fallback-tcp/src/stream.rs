//! A sending stream of numbered pushes to one shard (the client's half of
//! `hetkv_transport::pushes`): it numbers pushes, knows which are still unsettled, and tells the
//! shard with every push that every number below the oldest unsettled one is settled, so the shard
//! forgets only those. No I/O.
//!
//! Threads of one process share a stream: the numbers are handed out under a lock and each is
//! settled by whichever thread learns its fate. A process is never shared: a forked child that
//! uses its parent's client draws a stream of its own at its first push (its parent's numbers
//! would otherwise collide with its own, and one of two pushes under one number would be taken
//! for a repeat of the other and dropped).

use std::collections::BTreeSet;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use hetkv_transport::pushes::MAX_SPAN;
use hetkv_transport::wire::Origin;

#[derive(Debug)]
struct State {
    /// The process the stream belongs to.
    pid: u32,
    /// The stream's id.
    client: u64,
    /// The next number.
    next: u64,
    /// Numbers handed out and not yet settled.
    unsettled: BTreeSet<u64>,
    /// Pushes given up with their fate unknown, and their rows, not yet reported.
    unknown: (u64, u64),
}

/// One process's numbered pushes to one shard.
#[derive(Debug)]
pub struct PushStream {
    state: Mutex<State>,
    settled: Condvar,
}

/// A random stream id, never 0.
fn fresh_id() -> io::Result<u64> {
    let nonce = hetkv_transport::auth::nonce()?;
    Ok(u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes")).max(1))
}

impl PushStream {
    /// A stream of this process, with a random id.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: Mutex::new(State {
                pid: std::process::id(),
                client: fresh_id()?,
                next: 1,
                unsettled: BTreeSet::new(),
                unknown: (0, 0),
            }),
            settled: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the stream this process's: true (once) when it was another's, a parent's before a
    /// fork; everything it knew is then dropped and it starts over under a new id. The caller
    /// drops what it keeps of the old stream (pooled connections, held pushes).
    pub fn claim_for_this_process(&self) -> io::Result<bool> {
        let pid = std::process::id();
        let mut s = self.lock();
        if s.pid == pid {
            return Ok(false);
        }
        *s = State {
            pid,
            client: fresh_id()?,
            next: 1,
            unsettled: BTreeSet::new(),
            unknown: (0, 0),
        };
        Ok(true)
    }

    /// The stream's id.
    pub fn client(&self) -> u64 {
        self.lock().client
    }

    /// Numbers the next push. While the oldest unsettled push is [`MAX_SPAN`] numbers behind,
    /// waits for it to settle, until `until`; then fails (the push was not sent).
    pub fn number(&self, until: Instant) -> io::Result<Origin> {
        let mut s = self.lock();
        loop {
            let oldest = s.unsettled.first().copied().unwrap_or(s.next);
            if s.next - oldest < MAX_SPAN {
                break;
            }
            let now = Instant::now();
            if now >= until {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "push {oldest} is still unsettled {MAX_SPAN} pushes later; the new push \
                         was not sent"
                    ),
                ));
            }
            s = self
                .settled
                .wait_timeout(s, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let seq = s.next;
        s.next += 1;
        s.unsettled.insert(seq);
        let settled_below = s.unsettled.first().copied().unwrap_or(seq);
        Ok(Origin {
            client: s.client,
            seq,
            settled_below,
        })
    }

    /// Push `seq` is settled: acknowledged, refused, or never sent. It is never sent again.
    pub fn settle(&self, seq: u64) {
        let mut s = self.lock();
        if s.unsettled.remove(&seq) {
            self.settled.notify_all();
        }
    }

    /// Push `seq` of `rows` rows is given up with its fate unknown (the shard no longer knows
    /// whether it applied it, or its answer could not be read): settled, never sent again, and
    /// reported by [`Self::take_unknown`].
    pub fn give_up(&self, seq: u64, rows: u64) {
        let mut s = self.lock();
        if s.unsettled.remove(&seq) {
            s.unknown.0 += 1;
            s.unknown.1 += rows;
            self.settled.notify_all();
        }
    }

    /// Pushes given up since the last call, and their rows.
    pub fn take_unknown(&self) -> (u64, u64) {
        std::mem::take(&mut self.lock().unknown)
    }

    /// Numbers handed out and not settled.
    pub fn unsettled(&self) -> usize {
        self.lock().unsettled.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_oldest_unsettled_push_bounds_what_the_shard_may_forget() {
        let s = PushStream::new().unwrap();
        let far = Instant::now() + Duration::from_secs(5);
        let a = s.number(far).unwrap();
        let b = s.number(far).unwrap();
        assert_eq!((a.seq, a.settled_below), (1, 1));
        assert_eq!((b.seq, b.settled_below), (2, 1), "1 is unsettled");
        s.settle(2);
        assert_eq!(s.number(far).unwrap().settled_below, 1, "1 still is");
        s.give_up(1, 7);
        let d = s.number(far).unwrap();
        assert_eq!((d.seq, d.settled_below), (4, 3));
        assert_eq!(s.take_unknown(), (1, 7));
        assert_eq!(s.take_unknown(), (0, 0), "reported once");
        assert!(!s.claim_for_this_process().unwrap());
    }

    #[test]
    fn a_stream_waits_for_its_oldest_push_rather_than_outrun_the_shards_memory() {
        let s = std::sync::Arc::new(PushStream::new().unwrap());
        let far = Instant::now() + Duration::from_secs(30);
        let first = s.number(far).unwrap();
        for _ in 1..MAX_SPAN {
            let o = s.number(far).unwrap();
            s.settle(o.seq);
        }
        // The next would put the oldest MAX_SPAN behind: it waits, and fails at its deadline.
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(s.number(soon).is_err());
        // Another thread settles the oldest: the wait ends.
        let settler = {
            let s = s.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                s.settle(first.seq);
            })
        };
        let o = s.number(far).unwrap();
        assert_eq!(o.settled_below, o.seq);
        settler.join().unwrap();
    }
}
