//! Checkpoints during training (`--checkpoint-every`): the barrier that makes each one a
//! consistent cut. Every worker, at its next batch boundary, flushes its caches and waits; the
//! coordinator, once every worker waits or has finished, asks each daemon to checkpoint; then the
//! workers go on (or stop, with `--stop-after-checkpoints`). No update of a later batch can reach
//! a shard before the checkpoint is committed, and every update of an earlier one is in it.
//!
//! Workers that are threads meet at a [`ThreadGate`]; worker processes get `pause` on stdin,
//! answer `paused N` on stdout (N: batches done), and wait for `resume` or `stop`
//! ([`ProcessGate`] is their side).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use super::*;

/// What a worker does after a boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Train the next batch.
    Go,
    /// Stop training (the run ends after a checkpoint).
    Stop,
}

/// A worker's side of the barrier, consulted between batches.
pub(super) trait Gate: Sync {
    /// At a batch boundary after `done` batches: flushes `t` and waits while a checkpoint is
    /// asked for; says whether to go on.
    fn between(&self, done: usize, t: &mut WorkerTables) -> Result<Step>;
}

/// One checkpoint taken during a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Its name on every shard.
    pub name: String,
    /// Seconds since the workers started, when it was committed.
    pub secs: f64,
    /// Batches each worker had done: resume from here with `--resume-batches`.
    pub batches_done: Vec<usize>,
    /// Milliseconds the workers waited: flushes, the barrier and the checkpoint.
    pub pause_ms: f64,
    /// Bytes the shards wrote.
    pub bytes: u64,
}

#[derive(Debug)]
struct GateState {
    /// Checkpoints asked for so far; a worker that has seen fewer pauses at its next boundary.
    asked: u64,
    seen: Vec<u64>,
    /// Whether the workers that paused must keep waiting.
    holding: bool,
    paused: usize,
    finished: Vec<bool>,
    done: Vec<usize>,
    stop: bool,
    /// The first flush that failed.
    failed: Option<String>,
}

/// The barrier of worker threads.
pub(super) struct ThreadGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

/// One worker thread's view of a [`ThreadGate`].
pub(super) struct ThreadWorkerGate<'a> {
    gate: &'a ThreadGate,
    worker: usize,
}

impl ThreadGate {
    pub(super) fn new(workers: usize) -> Self {
        Self {
            state: Mutex::new(GateState {
                asked: 0,
                seen: vec![0; workers],
                holding: false,
                paused: 0,
                finished: vec![false; workers],
                done: vec![0; workers],
                stop: false,
                failed: None,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn worker(&self, worker: usize) -> ThreadWorkerGate<'_> {
        ThreadWorkerGate { gate: self, worker }
    }

    /// Worker `w` has finished (its caches flushed) after `done` batches: it counts as quiet.
    pub(super) fn finished(&self, w: usize, done: usize) {
        let mut st = self.lock();
        st.finished[w] = true;
        st.done[w] = done;
        self.cv.notify_all();
    }

    /// Waits until every worker waits at a boundary or has finished, runs `f` with the batches
    /// each has done, then lets them go on (or stop, when `stop`).
    pub(super) fn quiesce<T>(
        &self,
        stop: bool,
        f: impl FnOnce(&[usize]) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.lock();
        st.asked += 1;
        st.holding = true;
        st.paused = 0;
        while st.paused + st.finished.iter().filter(|&&f| f).count() < st.finished.len() {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let done = st.done.clone();
        let failed = st.failed.take();
        drop(st);
        let result = match failed {
            Some(e) => Err(anyhow::anyhow!(
                "a worker's flush before the checkpoint failed: {e}"
            )),
            None => f(&done),
        };
        let mut st = self.lock();
        st.holding = false;
        st.stop |= stop || result.is_err();
        self.cv.notify_all();
        result
    }
}

impl Gate for ThreadWorkerGate<'_> {
    fn between(&self, done: usize, t: &mut WorkerTables) -> Result<Step> {
        let g = self.gate;
        let mut st = g.lock();
        if st.stop {
            return Ok(Step::Stop);
        }
        if st.asked > st.seen[self.worker] {
            drop(st);
            let flushed = t.flush();
            st = g.lock();
            if let Err(e) = &flushed {
                st.failed.get_or_insert(e.to_string());
            }
            st.seen[self.worker] = st.asked;
            st.done[self.worker] = done;
            st.paused += 1;
            g.cv.notify_all();
            while st.holding {
                st = g.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            flushed?;
        }
        Ok(if st.stop { Step::Stop } else { Step::Go })
    }
}

/// A worker process's side: a thread reads the coordinator's lines from stdin; `pause` raises a
/// flag the worker sees at its next boundary, where it flushes, prints `paused N` and waits for
/// `resume` or `stop`.
pub(super) struct ProcessGate {
    pause: Arc<AtomicBool>,
    replies: Mutex<mpsc::Receiver<String>>,
}

impl ProcessGate {
    /// Starts reading stdin (after the `go` line has been read).
    pub(super) fn start() -> Self {
        let (tx, rx) = mpsc::channel();
        let pause = Arc::new(AtomicBool::new(false));
        let flag = pause.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines().map_while(Result::ok) {
                if line.trim() == "pause" {
                    flag.store(true, Ordering::SeqCst);
                } else if tx.send(line.trim().to_string()).is_err() {
                    break;
                }
            }
        });
        Self {
            pause,
            replies: Mutex::new(rx),
        }
    }
}

impl Gate for ProcessGate {
    fn between(&self, done: usize, t: &mut WorkerTables) -> Result<Step> {
        if !self.pause.swap(false, Ordering::SeqCst) {
            return Ok(Step::Go);
        }
        t.flush()?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "paused {done}")?;
        stdout.flush()?;
        drop(stdout);
        let reply = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv()
            .context("the coordinator went away during a checkpoint")?;
        match reply.as_str() {
            "resume" => Ok(Step::Go),
            "stop" => Ok(Step::Stop),
            other => anyhow::bail!("expected resume or stop from the coordinator, got {other:?}"),
        }
    }
}
