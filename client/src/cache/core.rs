//! The cache core: one worker's lines of one table, the bounds of DESIGN section 5, and the
//! optimizer steps that keep a line what the shards would hold. It does no I/O.
//!
//! The protocol with the shards, call by call, is in `exchange.rs`: [`CacheCore::start_lookup`]
//! (or [`CacheCore::start_prefetch`]) and [`CacheCore::start_push`] plan a call,
//! [`CacheCore::requests`] lists what to send to which shard, [`CacheCore::on_reply`] takes each
//! shard's answer, and [`CacheCore::complete_lookup`] fills the caller's rows. Planning and placing
//! a lookup (and bringing a prefetched lookup's rows up to date) is `lookup.rs`; this file holds
//! the lines' updates, pushes and bounds.
//!
//! A line holds the shard's row as of version `c_s` (its *base*: fetched, refreshed, or produced
//! by this cache's own push), that row's optimizer state, the sum of the gradients not yet pushed
//! and their number `p`; its clock is `c_c = c_s + p`, and its value, computed whenever it is read,
//! is the base plus what the update rule adds for the pending updates: under the default rule, one
//! step of the table's optimizer with the pending sum from the base and its state, which is exactly
//! what the shard produces when that sum is pushed and no other update comes between. A push commits the line to
//! the row its push produces (computed here with the same optimizer code, or handed back by the
//! shard when another update came between).

use hetkv_transport::incarnation::Seen;
use hetkv_transport::wire::{ANY_BASE, NO_BASE};
use hetkv_transport::{Optimizer, Routing, TableSpec};

use super::batch::{Ahead, Batch, Replies};
use super::clocks::Clocks;
use super::exchange::ShardPlan;
use super::lines::{LineMeta, Lines, NIL};
use super::queue::PushQueue;
use super::rule::{LineShare, LocalStep, UpdateRule, UpdateRuleKind};
use super::{Bound, CacheConfig};
use crate::stats::CacheStats;

/// Errors found before anything changes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    /// A key outside the table.
    #[error("key {key} is outside table {table} of {rows} rows")]
    KeyOutOfRange {
        /// Table.
        table: String,
        /// Key.
        key: u64,
        /// Rows.
        rows: u64,
    },
    /// A buffer of the wrong length.
    #[error("table {table} has dim {dim}: {len} values do not fit {keys} keys")]
    WrongDim {
        /// Table.
        table: String,
        /// Dim.
        dim: usize,
        /// Keys.
        keys: usize,
        /// Values.
        len: usize,
    },
    /// A NaN or infinite gradient value.
    #[error("gradient for key {key} holds {value}; nothing was applied")]
    NonFinite {
        /// Key.
        key: u64,
        /// The value.
        value: f32,
    },
    /// The shards' replies do not cover the plan.
    #[error("replies do not match the lookup plan: {0}")]
    Replies(String),
    /// Lines forgotten while they held updates the shards never got (flush first).
    #[error(
        "table {table}: {updates} updates are not pushed yet: flush before forgetting the lines"
    )]
    Unflushed {
        /// Table.
        table: String,
        /// Updates not pushed.
        updates: u64,
    },
}

/// Whether any value is NaN or infinite: whether its exponent bits are all set, that is whether
/// adding one to its exponent carries into the sign bit. Ors of that carry, eight lanes at a time
/// and without early exit, in integer operations every vector unit has, so that it vectorizes.
fn any_non_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    const EXPONENT_ONE: u32 = 0x0080_0000;
    let carry = |v: &f32| (v.to_bits() & EXPONENT).wrapping_add(EXPONENT_ONE);
    let mut lanes = [0u32; 8];
    let mut eights = values.chunks_exact(8);
    for eight in &mut eights {
        for (lane, v) in lanes.iter_mut().zip(eight) {
            *lane |= carry(v);
        }
    }
    let rest = eights.remainder().iter().fold(0, |acc, v| acc | carry(v));
    lanes.iter().fold(rest, |acc, l| acc | l) & 0x8000_0000 != 0
}

/// What a cache holds of one key ([`CacheCore::peek`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LineView {
    /// The value a lookup would return (without asking the shard).
    pub value: Vec<f32>,
    /// The server version of the row it is derived from.
    pub version: u64,
    /// Updates applied to it and not pushed yet.
    pub unpushed: u32,
}

/// One worker's cache of one table.
pub struct CacheCore {
    /// The table cached. A dynamic one's ([`CacheCore::dynamic`]): any u64 key; every hit is
    /// checked (with its line's birth stamp), none left to the table clock, and a row the shard
    /// does not hold takes the key's initial value ([`TableSpec::complete_pulled`]).
    pub(super) spec: TableSpec,
    pub(super) dim: usize,
    pub(super) optimizer: Optimizer,
    pub(super) state_len: usize,
    pub(super) pull_bound: u64,
    push_bound: u64,
    pub(super) lines: Lines,
    pub(super) clocks: Clocks,
    pub(super) routing: Routing,
    pub(super) queue: PushQueue,
    pub(super) rule: Box<dyn UpdateRule>,
    pub(super) batch: Batch,
    /// Lookups planned so far (a lookup's stamp).
    pub(super) calls: u64,
    pub(super) stats: CacheStats,
    /// A copy of a state for a step, and a weighted gradient for a commit.
    pub(super) scratch: Vec<f32>,
    pub(super) weighted: Vec<f32>,
    /// Each shard's part of the current call (`exchange.rs`).
    pub(super) plans: Vec<ShardPlan>,
    /// Rows read so far by the current lookup, from every shard.
    pub(super) replies: Replies,
    /// Whether a read of the current lookup failed.
    pub(super) read_failed: bool,
}

impl std::fmt::Debug for CacheCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheCore")
            .field("table", &self.spec.name)
            .field("capacity", &self.lines.capacity())
            .field("resident", &self.lines.resident())
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

impl CacheCore {
    /// A cache of `spec`'s rows, spread over `shards` shards (by the table's [`Routing`]), under
    /// `config`, with the default update rule ([`UpdateRuleKind::PushWhole`]).
    pub fn new(spec: &TableSpec, config: &CacheConfig, shards: usize) -> Self {
        let shards = shards.max(1);
        let dim = spec.dim as usize;
        let optimizer = Optimizer::new(spec.optimizer);
        let state_len = optimizer.state_len(dim);
        let capacity = config.capacity.rows(spec);
        Self {
            spec: spec.clone(),
            dim,
            optimizer,
            state_len,
            pull_bound: config.pull_bound.get(),
            push_bound: config.push_bound.get(),
            lines: match spec.is_dynamic() {
                false => Lines::new(capacity, dim, state_len, config.policy),
                true => Lines::new(capacity, dim, state_len, config.policy).with_births(),
            },
            clocks: Clocks::new(shards),
            routing: spec.routing(shards as u32),
            queue: PushQueue::default(),
            rule: UpdateRuleKind::PushWhole.build(),
            batch: Batch::default(),
            calls: 0,
            stats: CacheStats::default(),
            scratch: Vec::with_capacity(state_len),
            weighted: Vec::with_capacity(dim),
            plans: (0..shards).map(|_| ShardPlan::default()).collect(),
            replies: Replies::default(),
            read_failed: false,
        }
    }

    /// Forgets every line (none may hold unpushed updates: [`CacheError::Unflushed`]), so that
    /// each key is read from the shards at its next lookup: for after the table's rows were
    /// replaced (set from a file or a saved model), when a line's version could still be within
    /// its bound of the new row's. What the cache knows of the shards (clocks, restarts) and its
    /// counters stay.
    pub fn forget_lines(&mut self) -> Result<(), CacheError> {
        let updates = self.pending_updates();
        if updates > 0 {
            return Err(CacheError::Unflushed {
                table: self.spec.name.clone(),
                updates,
            });
        }
        self.lines.clear();
        Ok(())
    }

    /// Whether the table is dynamic (lines keep birth stamps; no check is left to the clock).
    pub(super) fn dynamic(&self) -> bool {
        self.spec.is_dynamic()
    }

    /// Rows the cache can hold.
    pub fn capacity(&self) -> usize {
        self.lines.capacity()
    }

    /// Rows it holds now.
    pub fn resident(&self) -> usize {
        self.lines.resident()
    }

    /// Counters so far (transport bytes are the caller's to add).
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Updates of `key` this cache holds and the shards have not acknowledged: those in its line
    /// (0 when not cached) and those queued for pushing.
    pub fn unpushed(&self, key: u64) -> u64 {
        let line = self.lines.slot_of(key).map_or(0, |s| self.lines.meta(s).p);
        let queued: u64 = self
            .queue
            .counts()
            .filter(|&(k, _)| k == key)
            .map(|(_, c)| u64::from(c))
            .sum();
        u64::from(line) + queued
    }

    /// Updates this cache holds that the shards have not acknowledged: in its lines and queued
    /// for pushing (those a transport holds after a deadline are the transport's).
    pub fn pending_updates(&self) -> u64 {
        let lines: u64 = self
            .lines
            .dirty_above(0)
            .map(|s| u64::from(self.lines.meta(s).p))
            .sum();
        lines + self.queue.counts().map(|(_, c)| u64::from(c)).sum::<u64>()
    }

    /// What the cache holds of `key`, without touching the policy or asking a shard.
    pub fn peek(&self, key: u64) -> Option<LineView> {
        let slot = self.lines.slot_of(key)?;
        let m = self.lines.meta(slot);
        let mut value = vec![0f32; self.dim];
        self.value_into(slot, &mut value);
        Some(LineView {
            value,
            version: m.c_s,
            unpushed: m.p,
        })
    }

    /// The update rule ([`UpdateRuleKind::PushWhole`] unless set).
    pub fn update_rule(&self) -> &dyn UpdateRule {
        self.rule.as_ref()
    }

    /// Sets the update rule. Lines holding unpushed updates keep their values until their next
    /// update or push.
    pub fn set_update_rule(&mut self, rule: Box<dyn UpdateRule>) {
        self.rule = rule;
    }

    pub(super) fn check_keys(&self, keys: &[u64]) -> Result<(), CacheError> {
        if self.dynamic() {
            return Ok(());
        }
        match keys.iter().find(|&&k| k >= self.spec.rows) {
            Some(&key) => Err(CacheError::KeyOutOfRange {
                table: self.spec.name.clone(),
                key,
                rows: self.spec.rows,
            }),
            None => Ok(()),
        }
    }

    pub(super) fn wrong_dim(&self, keys: usize, len: usize) -> CacheError {
        CacheError::WrongDim {
            table: self.spec.name.clone(),
            dim: self.dim,
            keys,
            len,
        }
    }

    /// Writes the value of the line in `slot` into `out`: its base when nothing is pending,
    /// else what the update rule makes of the base, its state and the pending sum.
    pub(super) fn value_into(&self, slot: u32, out: &mut [f32]) {
        let m = self.lines.meta(slot);
        let (base, pending, state) = self.lines.parts(slot);
        if m.p == 0 {
            out.copy_from_slice(base);
            return;
        }
        let step = LocalStep {
            optimizer: &self.optimizer,
            base,
            state,
            step: m.step,
            pending,
        };
        self.rule.local_value(&step, out);
    }

    /// The line's share of its key's updates, for the rule's push weight.
    fn share(m: &LineMeta) -> LineShare {
        LineShare {
            p: m.p,
            own: m.own_seen,
            foreign: m.foreign_seen,
        }
    }

    /// Applies `grads` (keys x dim, one gradient row per key occurrence) locally and leaves in the
    /// push queue every line whose unpushed count now exceeds the push bound, and every key that
    /// is not cached (written through). Nothing changes if any value is NaN or infinite.
    pub fn update(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), CacheError> {
        self.check_update(keys, grads)?;
        let dim = self.dim;
        // The update of exactly the unique keys the last lookup placed, in its order (what a
        // backward pass hands over): their slots are known and each key occurs once.
        let placed = self.batch.resolved && keys == self.batch.uniq.as_slice();
        let b = &mut self.batch;
        b.counts.clear();
        let summed = if placed {
            b.counts.resize(b.uniq.len(), 1);
            false
        } else {
            b.dedup(keys);
            b.counts.resize(b.uniq.len(), 0);
            // With duplicates, sum each key's gradient rows first; without, use the caller's
            // rows as they are.
            let summed = b.uniq.len() != keys.len();
            if summed {
                b.uniq_rows.clear();
                b.uniq_rows.resize(b.uniq.len() * dim, 0.0);
            }
            for (pos, &u) in b.uniq_of_pos.iter().enumerate() {
                let u = u as usize;
                b.counts[u] += 1;
                if summed {
                    let sums = &mut b.uniq_rows[u * dim..(u + 1) * dim];
                    for (s, g) in sums.iter_mut().zip(&grads[pos * dim..(pos + 1) * dim]) {
                        *s += g;
                    }
                }
            }
            b.resolve(&self.lines);
            summed
        };
        self.stats.updates += keys.len() as u64;
        let rows = std::mem::take(&mut self.batch.uniq_rows);
        let sums: &[f32] = if summed { &rows } else { grads };
        for u in 0..self.batch.uniq.len() {
            self.batch.load_ahead(&self.lines, u, Ahead::Line);
            let key = self.batch.uniq[u];
            let g = &sums[u * dim..(u + 1) * dim];
            let count = self.batch.counts[u];
            let slot = self.batch.slot_of_uniq[u];
            if slot == NIL {
                self.stats.write_throughs += 1;
                let weight = self.rule.push_weight(None);
                self.queue.queued().add(key, count, NO_BASE, g, weight);
                continue;
            }
            for (p, g) in self.lines.parts_mut(slot).pending.iter_mut().zip(g) {
                *p += g;
            }
            let m = self.lines.meta_mut(slot);
            m.p = m.p.saturating_add(count);
            m.own_seen += u64::from(count);
            let p = m.p;
            if p as u64 > self.push_bound || p == u32::MAX {
                self.push_line(slot);
            }
        }
        self.batch.uniq_rows = rows;
        Ok(())
    }

    /// What [`CacheCore::update`] refuses, checked without changing anything: a wrong length, a
    /// key out of range, a NaN or infinite value.
    pub fn check_update(&self, keys: &[u64], grads: &[f32]) -> Result<(), CacheError> {
        let dim = self.dim;
        if grads.len() != keys.len() * dim {
            return Err(self.wrong_dim(keys.len(), grads.len()));
        }
        self.check_keys(keys)?;
        let chunk = dim.max(1) * 16;
        let bad = grads.chunks(chunk).position(any_non_finite);
        match bad.and_then(|c| {
            let at = c * chunk;
            grads[at..]
                .iter()
                .position(|g| !g.is_finite())
                .map(|p| at + p)
        }) {
            Some(pos) => Err(CacheError::NonFinite {
                key: keys[pos / dim],
                value: grads[pos],
            }),
            None => Ok(()),
        }
    }

    /// Queues a line's unpushed updates `(key, p, c_s, weight x pending)` and commits the line to
    /// the row that push produces: the optimizer's step with the pushed sum from the base and its
    /// state (the shard's own computation, bit for bit, when nothing comes between), `c_s` up by
    /// `p`, nothing pending. Whatever the rule added beyond what is pushed is gone.
    pub(super) fn push_line(&mut self, slot: u32) {
        let m = *self.lines.meta(slot);
        let weight = self.rule.push_weight(Some(Self::share(&m)));
        // A line to be read again (its shard restarted, or refused its push) may hold a version
        // another row reaches now: it asks for the produced row whatever the version.
        let base = if m.revalidate { ANY_BASE } else { m.c_s };
        let line = self.lines.parts_mut(slot);
        self.queue
            .queued()
            .add(m.key, m.p, base, line.pending, weight);
        let mut step = m.step;
        if weight == 1.0 {
            self.optimizer
                .apply(line.base, line.pending, line.state, &mut step);
        } else {
            self.weighted.clear();
            self.weighted
                .extend(line.pending.iter().map(|g| g * weight));
            self.optimizer
                .apply(line.base, &self.weighted, line.state, &mut step);
        }
        line.pending.fill(0.0);
        let meta = self.lines.meta_mut(slot);
        meta.step = step;
        meta.c_s += u64::from(m.p);
        meta.p = 0;
    }

    /// Queues the unpushed updates of a line evicted from `slot` (its data is still there) as a
    /// push with no base: the line is gone, nothing is to be handed back.
    pub(super) fn queue_evicted(&mut self, slot: u32) {
        let m = *self.lines.meta(slot);
        self.stats.evictions += 1;
        if m.p == 0 {
            return;
        }
        self.stats.dirty_evictions += 1;
        let weight = self.rule.push_weight(Some(Self::share(&m)));
        let pending = self.lines.pending(slot);
        self.queue
            .queued()
            .add(m.key, m.p, NO_BASE, pending, weight);
        self.lines.meta_mut(slot).p = 0;
    }

    /// Takes a row a shard handed back for `key` (produced by this cache's push where another
    /// update came between, or the row as it is now after a repeated push): the line's base,
    /// state and version become the shard's, and its pending updates (made since) stay on top.
    pub(super) fn adopt(
        &mut self,
        key: u64,
        (version, born): (u64, u64),
        row: &[f32],
        state: &[f32],
        step: u64,
    ) {
        let Some(slot) = self.lines.slot_of(key) else {
            return;
        };
        self.lines.set_born(slot, born);
        let shard = self.routing.shard_of(key);
        let fetched_at = self.clocks.foreign_now(shard);
        let m = self.lines.meta_mut(slot);
        m.foreign_seen += version.saturating_sub(m.c_s);
        m.c_s = version;
        m.step = step;
        m.fetched_at = fetched_at;
        let line = self.lines.parts_mut(slot);
        line.base.copy_from_slice(row);
        line.state.copy_from_slice(state);
        self.stats.rows_handed_back += 1;
    }

    /// Marks the lines of `keys` to be read again at their next lookup: a shard refused their
    /// push, so what they committed locally is not the shard's.
    pub(super) fn revalidate(&mut self, keys: &[u64]) {
        for &k in keys {
            if let Some(slot) = self.lines.slot_of(k) {
                self.lines.meta_mut(slot).revalidate = true;
            }
        }
    }

    /// The read and write bounds from now on. Raising them is always safe: what held under the
    /// old bounds holds under the new. A lowered read bound applies from the next lookup (every
    /// hit is checked against it). Lowering the write bound leaves in the push queue every line
    /// holding more unpushed updates than the new bound, so that after the push the bound holds
    /// again.
    pub fn set_bounds(&mut self, pull: Bound, push: Bound) {
        self.pull_bound = pull.get();
        self.push_bound = push.get();
        self.push_lines_above(self.push_bound);
    }

    /// The read and write bounds in force.
    pub fn bounds(&self) -> (Bound, Bound) {
        (
            Bound::updates(self.pull_bound),
            Bound::updates(self.push_bound),
        )
    }

    /// Leaves every dirty line in the push queue.
    pub fn flush(&mut self) {
        self.push_lines_above(0);
    }

    /// Leaves in the push queue every line holding more than `updates` unpushed updates.
    fn push_lines_above(&mut self, updates: u64) {
        let dirty: Vec<u32> = self.lines.dirty_above(updates).collect();
        for slot in dirty {
            self.push_line(slot);
        }
    }

    /// Takes the incarnation of shard `shard`'s latest answer. When it is not the one seen
    /// before, the shard restarted: what this cache knew of its table clock is forgotten, and
    /// every line of that shard is read again at its next lookup (its row replaced by the
    /// shard's, with the line's unpushed updates re-applied and kept for pushing). Returns true
    /// on a restart.
    pub fn observe_incarnation(&mut self, shard: usize, incarnation: u64) -> bool {
        let Seen::Replaced { .. } = self.clocks.observe_incarnation(shard, incarnation) else {
            return false;
        };
        self.stats.restarts += 1;
        let of_shard: Vec<u32> = self
            .lines
            .iter()
            .filter(|&(k, _)| self.routing.shard_of(k) == shard)
            .map(|(_, s)| s)
            .collect();
        for slot in of_shard {
            let m = self.lines.meta_mut(slot);
            m.revalidate = true;
            self.stats.lines_revalidated += 1;
            self.stats.updates_kept += u64::from(m.p);
        }
        tracing::warn!(
            table = %self.spec.name,
            shard,
            incarnation = format!("{incarnation:016x}"),
            "the shard restarted: its cached lines will be read again"
        );
        true
    }

    /// Rows waiting for a retry after a failed push.
    pub fn unsent(&self) -> usize {
        self.queue.unsent()
    }
}
