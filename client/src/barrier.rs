//! The barrier that makes a checkpoint a consistent cut of a training job (DESIGN section 8):
//! every worker flushes its caches, then one checkpoints, then all go on.

use std::sync::{Barrier, Mutex};

use hetkv_transport::wire::CheckpointResponse;

use crate::{CachedTable, ClientError, Cluster};

/// A checkpoint barrier for `workers` workers that are threads of one process and share a
/// [`Cluster`]. Each worker calls [`CheckpointBarrier::checkpoint`] after the same step: its caches
/// are flushed (every update it made is applied), the last to arrive writes the checkpoint, and
/// every worker returns once it is committed, with its outcome. No worker runs a step while the
/// checkpoint is written, so it holds every update of the steps before the barrier and none
/// after. Workers in other processes need the same three phases from their coordinator
/// (`hetkv-bench train --checkpoint-every` does it over its pipes).
#[derive(Debug)]
pub struct CheckpointBarrier {
    cluster: Cluster,
    barrier: Barrier,
    outcome: Mutex<Option<Result<Vec<CheckpointResponse>, String>>>,
    failed_flush: Mutex<Option<String>>,
}

impl CheckpointBarrier {
    /// A barrier for `workers` threads checkpointing `cluster`.
    pub fn new(cluster: Cluster, workers: usize) -> Self {
        Self {
            cluster,
            barrier: Barrier::new(workers.max(1)),
            outcome: Mutex::new(None),
            failed_flush: Mutex::new(None),
        }
    }

    /// Flushes `caches`, waits for every worker, has one of them write checkpoint `name`, and
    /// returns its outcome to all. Every worker must call this with the same name. If any
    /// worker's flush fails, no checkpoint is written and every worker gets the error.
    pub fn checkpoint(
        &self,
        caches: &mut [&mut CachedTable],
        name: &str,
        incremental: bool,
    ) -> Result<Vec<CheckpointResponse>, ClientError> {
        for cache in caches.iter_mut() {
            if let Err(e) = cache.flush() {
                self.lock_flush()
                    .get_or_insert(format!("a worker's flush failed: {e}"));
            }
        }
        if self.barrier.wait().is_leader() {
            let outcome = match self.lock_flush().take() {
                Some(e) => Err(e),
                None => self
                    .cluster
                    .checkpoint(name, incremental)
                    .map_err(|e| e.to_string()),
            };
            *self.lock_outcome() = Some(outcome);
        }
        self.barrier.wait();
        let outcome = self
            .lock_outcome()
            .clone()
            .unwrap_or_else(|| Err("the checkpoint left no outcome".into()));
        // Everyone has read the outcome before a later barrier may replace it.
        self.barrier.wait();
        outcome.map_err(ClientError::CheckpointFailed)
    }

    fn lock_flush(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failed_flush.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_outcome(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<Result<Vec<CheckpointResponse>, String>>> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner())
    }
}
