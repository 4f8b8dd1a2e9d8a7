//! Waits a caller can interrupt: a Python user's Ctrl-C must end a call that waits on a stalled
//! shard within a second, not at its deadline.
//!
//! A caller that can be interrupted runs its call under [`with_poll`], giving a poll (for
//! Python: take the GIL and run the pending signal handlers). While such a call runs, the
//! transports cut every wait they make (a socket read, a backoff sleep) into slices of at most
//! [`SLICE`], and between slices ask [`interrupted`]: on the calling thread that runs the poll; on
//! the threads a call spawns for other shards ([`current_flag`], [`with_flag`]) it reads the flag
//! the calling thread sets. An interrupted wait ends with an [`io::ErrorKind::Interrupted`]
//! error, which no transport retries. Without a poll nothing changes: waits are whole, and
//! [`interrupted`] is false.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest piece of a wait between two polls.
pub const SLICE: Duration = Duration::from_millis(100);

struct Context {
    flag: Arc<AtomicBool>,
    poll: Option<Box<dyn Fn() -> bool>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Restores the thread's previous context when a call ends, however it ends.
struct Restore(Option<Context>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

fn install<R>(context: Context, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.borrow_mut().replace(context));
    let _restore = Restore(previous);
    f()
}

/// Runs `f`, whose waits end early once `poll` (asked on this thread at least every [`SLICE`]
/// of a wait) says the caller wants to stop.
pub fn with_poll<R>(poll: impl Fn() -> bool + 'static, f: impl FnOnce() -> R) -> R {
    install(
        Context {
            flag: Arc::new(AtomicBool::new(false)),
            poll: Some(Box::new(poll)),
        },
        f,
    )
}

/// The flag of the call running on this thread, for the threads it spawns.
pub fn current_flag() -> Option<Arc<AtomicBool>> {
    CURRENT.with(|c| c.borrow().as_ref().map(|c| c.flag.clone()))
}

/// Runs `f` (on a thread a call spawned) under the calling thread's `flag`.
pub fn with_flag<R>(flag: Option<Arc<AtomicBool>>, f: impl FnOnce() -> R) -> R {
    match flag {
        Some(flag) => install(Context { flag, poll: None }, f),
        None => f(),
    }
}

/// Whether a wait of this thread is to be cut into slices (an interruptible call runs).
pub fn active() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// Whether the running call was interrupted (asking the poll, on the calling thread).
pub fn interrupted() -> bool {
    CURRENT.with(|c| {
        let c = c.borrow();
        let Some(c) = c.as_ref() else {
            return false;
        };
        if c.flag.load(Ordering::Relaxed) {
            return true;
        }
        if c.poll.as_ref().is_some_and(|poll| poll()) {
            c.flag.store(true, Ordering::Relaxed);
            return true;
        }
        false
    })
}

/// The error an interrupted wait ends with.
pub fn error() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "interrupted by the caller")
}

/// Sleeps for `d`, in slices while an interruptible call runs; fails when it was interrupted.
pub fn sleep(d: Duration) -> io::Result<()> {
    if !active() {
        std::thread::sleep(d);
        return Ok(());
    }
    let until = Instant::now() + d;
    loop {
        if interrupted() {
            return Err(error());
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        std::thread::sleep((until - now).min(SLICE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn a_poll_ends_a_sleep_within_a_slice_and_reaches_spawned_threads() {
        assert!(!interrupted() && !active());
        sleep(Duration::from_millis(1)).unwrap();
        let polls = Arc::new(AtomicU32::new(0));
        let counted = polls.clone();
        let start = Instant::now();
        let (mine, theirs) = with_poll(
            move || counted.fetch_add(1, Ordering::Relaxed) >= 2,
            || {
                let flag = current_flag();
                let spawned = std::thread::spawn(move || {
                    with_flag(flag, || {
                        let t = Instant::now();
                        let r = sleep(Duration::from_secs(30));
                        (r.is_err(), t.elapsed())
                    })
                });
                let mine = sleep(Duration::from_secs(30));
                (mine, spawned.join().unwrap())
            },
        );
        assert_eq!(mine.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(theirs.0, "the spawned thread's wait ended too");
        assert!(theirs.1 < Duration::from_secs(2));
        assert!(!active(), "the context ends with the call");
    }
}
