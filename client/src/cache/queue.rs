//! The push queue: rows waiting to be pushed (bound pushes, evicted dirty lines, write-throughs)
//! and rows whose delivery is unknown, which go first with the next call.

use hetkv_transport::wire::NO_BASE;
use hetkv_transport::PushRef;

/// Rows to push: `(key, count, base version, gradient sum)`. A row pushed from a line carries the
/// line's base version, so that the shard hands back the row it produces when another update came
/// between ([`hetkv_transport::wire::PushRequest::bases`]); others carry [`NO_BASE`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushBatch {
    /// Keys.
    pub keys: Vec<u64>,
    /// Update counts.
    pub counts: Vec<u32>,
    /// Base versions ([`NO_BASE`]: nothing to hand back).
    pub bases: Vec<u64>,
    /// Gradient sums, keys x dim.
    pub grads: Vec<f32>,
}

impl PushBatch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is nothing to push.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The updates the rows carry.
    pub fn updates(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// Adds a row whose gradient sum is `grad` times `weight`.
    pub(crate) fn add(&mut self, key: u64, count: u32, base: u64, grad: &[f32], weight: f32) {
        self.keys.push(key);
        self.counts.push(count);
        self.bases.push(base);
        if weight == 1.0 {
            self.grads.extend_from_slice(grad);
        } else {
            self.grads.extend(grad.iter().map(|g| g * weight));
        }
    }

    /// Adds row `i` of `other` (rows of `dim`).
    pub(crate) fn add_row_of(&mut self, other: &PushBatch, i: usize, dim: usize) {
        self.keys.push(other.keys[i]);
        self.counts.push(other.counts[i]);
        self.bases.push(other.bases[i]);
        self.grads
            .extend_from_slice(&other.grads[i * dim..(i + 1) * dim]);
    }

    pub(crate) fn append(&mut self, other: &PushBatch) {
        self.keys.extend_from_slice(&other.keys);
        self.counts.extend_from_slice(&other.counts);
        self.bases.extend_from_slice(&other.bases);
        self.grads.extend_from_slice(&other.grads);
    }

    pub(crate) fn clear(&mut self) {
        self.keys.clear();
        self.counts.clear();
        self.bases.clear();
        self.grads.clear();
    }

    /// The rows as a transport takes them; the bases go only when some row has one.
    pub fn as_push_ref(&self) -> PushRef<'_> {
        PushRef {
            keys: &self.keys,
            counts: &self.counts,
            grads: &self.grads,
            bases: self
                .bases
                .iter()
                .any(|&b| b != NO_BASE)
                .then_some(&self.bases[..]),
        }
    }
}

/// Rows queued by this call, and rows an earlier call could not deliver.
#[derive(Debug, Default)]
pub(crate) struct PushQueue {
    queued: PushBatch,
    unsent: PushBatch,
}

impl PushQueue {
    /// The queue this call adds to.
    pub fn queued(&mut self) -> &mut PushBatch {
        &mut self.queued
    }

    /// Takes every row: those of earlier calls first.
    pub fn take(&mut self) -> PushBatch {
        if self.unsent.is_empty() {
            return std::mem::take(&mut self.queued);
        }
        let mut batch = std::mem::take(&mut self.unsent);
        batch.append(&self.queued);
        self.queued.clear();
        batch
    }

    /// Rows whose delivery is unknown: kept for the next call.
    pub fn requeue(&mut self, batch: &PushBatch) {
        self.unsent.append(batch);
    }

    /// Rows waiting for a retry.
    pub fn unsent(&self) -> usize {
        self.unsent.len()
    }

    /// Every queued row's key and count, unsent ones included.
    pub fn counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let unsent = self.unsent.keys.iter().zip(&self.unsent.counts);
        let queued = self.queued.keys.iter().zip(&self.queued.counts);
        unsent.chain(queued).map(|(&k, &c)| (k, c))
    }
}
