//! The cache core: lines, their clocks and pending gradients, and the bounds of DESIGN section 5.
//!
//! It does no I/O. The whole protocol, shard by shard, is in `exchange.rs`:
//! [`CacheCore::start_lookup`] and [`CacheCore::start_push`] plan a call, [`CacheCore::requests`]
//! lists what to send to which shard, [`CacheCore::on_reply`] takes each shard's answer (the
//! push's outcome apart from the read's) and schedules the follow-up checks a shard's table
//! clock could not vouch for, and [`CacheCore::complete_lookup`] fills the caller's rows. The core
//! routes keys to shards itself ([`Routing`]).
//!
//! Below that sit the building blocks, usable on their own for one shard:
//! [`CacheCore::plan_lookup`] says which keys to ask for and with which clocks;
//! [`CacheCore::finish_lookup`] is told what came back; [`CacheCore::update`] and
//! [`CacheCore::flush`] leave the rows to push in a [`PushBatch`] taken with
//! [`CacheCore::take_pushes`] and acknowledged with [`CacheCore::pushed`] (or kept with
//! [`CacheCore::requeue`] when their delivery is unknown).
//!
//! Each line holds the row (with the worker's own pending updates applied), `c_s` (the server
//! version when fetched or last refreshed), `pending` (the gradient sum not yet pushed) and `p` (the
//! number of updates in it); its clock is `c_c = c_s + p`.

mod exchange;

use rustc_hash::FxHashMap;

use hetkv_transport::wire::{Since, NOT_CACHED};
use hetkv_transport::{region, Routing, TableSpec};

use exchange::ShardPlan;
pub use exchange::{RequestKind, ShardRequest};

use super::policy::{self, EvictionPolicy};
use super::{Bound, CacheConfig};
use crate::stats::CacheStats;

const NIL: u32 = u32::MAX;

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
}

/// Rows to push: `(key, count, gradient sum)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushBatch {
    /// Keys.
    pub keys: Vec<u64>,
    /// Update counts.
    pub counts: Vec<u32>,
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

    fn add(&mut self, key: u64, count: u32, grad: &[f32]) {
        self.keys.push(key);
        self.counts.push(count);
        self.grads.extend_from_slice(grad);
    }

    fn append(&mut self, other: &PushBatch) {
        self.keys.extend_from_slice(&other.keys);
        self.counts.extend_from_slice(&other.counts);
        self.grads.extend_from_slice(&other.grads);
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.counts.clear();
        self.grads.clear();
    }
}

/// What a lookup needs from the shards: for each request, a key and the clock to check it
/// against ([`NOT_CACHED`] for misses).
///
/// Requests marked `skipped` are hits whose check the table clock can vouch for: send them only if
/// the shard says the claim in `since` (per shard) did not hold.
#[derive(Debug)]
pub struct LookupPlan<'a> {
    /// Keys to ask for.
    pub keys: &'a [u64],
    /// Their clocks.
    pub clocks: &'a [u64],
    /// Whether each request's check is left to the table clock.
    pub skipped: &'a [bool],
    /// Per shard, the claim covering its skipped checks.
    pub since: &'a [Option<Since>],
    /// The bound to check clocks against.
    pub bound: u64,
}

/// What a client knows of one shard's table clock (the updates applied to the table there).
///
/// `clock - own_at` is the *foreign clock*: updates from other clients up to the last observation.
/// A line fetched when the foreign clock was `f` lacks at most `foreign_now - f` updates, so while
/// that stays within `bound + p` its version check can be skipped.
#[derive(Clone, Copy, Debug, Default)]
struct ShardClock {
    observed: bool,
    /// The table clock at the last observation.
    clock: u64,
    /// Updates this cache pushed to the shard and saw acknowledged, in all.
    own: u64,
    /// `own` at the last observation.
    own_at: u64,
    /// Foreign updates between the last two observations: the forecast for the next interval.
    forecast: u64,
}

impl ShardClock {
    fn foreign(&self) -> u64 {
        self.clock.saturating_sub(self.own_at)
    }
}

/// What came back for a plan: for each returned row, its request index, version and values.
#[derive(Clone, Debug, Default)]
pub struct Replies {
    /// Request indices (into the plan's keys), in any order.
    pub requests: Vec<u32>,
    /// Server versions.
    pub versions: Vec<u64>,
    /// Rows, requests x dim.
    pub rows: Vec<f32>,
}

impl Replies {
    /// Empties the replies, keeping their buffers.
    pub fn clear(&mut self) {
        self.requests.clear();
        self.versions.clear();
        self.rows.clear();
    }
}

/// One worker's cache of one table.
pub struct CacheCore {
    table: String,
    rows: u64,
    dim: usize,
    lr: f32,
    pull_bound: u64,
    push_bound: u64,
    capacity: usize,
    index: FxHashMap<u64, u32>,
    /// Each slot's bookkeeping, one cache line per slot.
    meta: Vec<LineMeta>,
    /// Each slot's row then its pending gradient, contiguous (`2 x dim` values per slot), so one
    /// line is one region of memory.
    lines: Vec<f32>,
    free: Vec<u32>,
    /// Each shard's incarnation in its last answer (0: none seen).
    incarnations: Vec<u64>,
    /// Lookups planned so far.
    calls: u64,
    routing: Routing,
    clocks: Vec<ShardClock>,
    /// Each shard's part of the current call.
    plans: Vec<ShardPlan>,
    /// Rows read so far by the current lookup, from every shard.
    replies: Replies,
    /// Whether a read of the current lookup failed.
    read_failed: bool,
    policy: Box<dyn EvictionPolicy>,
    stats: CacheStats,
    // Scratch of the current call, kept to reuse its allocations.
    dedup: FxHashMap<u64, u32>,
    uniq: Vec<u64>,
    uniq_of_pos: Vec<u32>,
    /// Position of each unique key's first occurrence.
    first_pos: Vec<u32>,
    slot_of_uniq: Vec<u32>,
    /// Whether `slot_of_uniq` still says where every key of `uniq` is (set once a lookup has
    /// placed its rows, cleared by anything that plans, evicts or gives slots back), so that the
    /// update of exactly those keys, which a training step makes right after its lookup, skips
    /// de-duplicating and resolving them again.
    resolved: bool,
    /// For each missed key of the current lookup, the slot reserved for it (NIL: not admitted).
    reserved_of_uniq: Vec<u32>,
    req_of_uniq: Vec<u32>,
    req_keys: Vec<u64>,
    req_clocks: Vec<u64>,
    req_skipped: Vec<bool>,
    since: Vec<Option<Since>>,
    reply_of_req: Vec<u32>,
    uniq_rows: Vec<f32>,
    uniq_clock: Vec<u64>,
    counts: Vec<u32>,
    pushes: PushBatch,
    unsent: PushBatch,
    /// What every pushed gradient sum is multiplied by ([`CacheCore::set_push_scale`]).
    push_scale: f32,
    /// How local updates of a key combine with other workers' ([`CacheCore::set_shared_keys`]).
    shared_keys: SharedKeys,
}

/// How a cache's updates of a key combine with the updates other workers make to the same key
/// while its line is dirty, under a write bound above 0. DESIGN leaves it open (every push is
/// applied by the shards' optimizer, and versions count every update once in every mode);
/// `docs/ARCHITECTURE.md` states each mode's consistency and `docs/BENCHMARKS.md` measures them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum SharedKeys {
    /// Every local step is `lr x g` and every push the whole gradient sum: after a flush the
    /// rows equal sequential SGD over the updates in push order. Several workers training one key
    /// each take up to `push_bound` steps that see only their own progress, and the shards sum
    /// them (an overshoot for the keys every worker trains).
    #[default]
    Summed,
    /// Every local step is `lr x g`; a push is weighted by the line's share of the key's updates
    /// (see `CacheCore::line_weight`): a key W workers train moves by the mean of their local
    /// progress, a key one worker trains by all of it.
    Averaged,
    /// A local step is `lr x g` plus the extrapolation `lr x (scale - 1) x a`, `scale = 1 /
    /// share` at most `max_scale`, `share = (own + 1) / (own + foreign + 1)` being the line's
    /// part of the key's updates seen since it was fetched; pushes are whole (the shards take
    /// every gradient at `lr`, as in `Summed`). The local copy so anticipates the other workers'
    /// concurrent progress on the key instead of ignoring it, and the next gradients are taken
    /// near where the shards' copy is going. `a` is limited element by element (a minmod
    /// limiter): of this gradient `g` and the mean of the gradients pending in the line (this one
    /// included), the one smaller in magnitude where they agree in sign, 0 where they do not.
    /// Extrapolating `g` itself fed the worker's noise back `scale` times over (DeepFM at rows of
    /// 128 diverged), and the mean alone kept pushing past the optimum after the gradient turned
    /// (logloss drift); docs/BENCHMARKS.md measures the three. A refresh re-applies the pending
    /// sum at `lr` only: the fresh row already holds the foreign progress made meanwhile.
    /// `max_scale` bounds the extrapolation of a line with little own history (the trainer uses
    /// its number of workers).
    Extrapolated {
        /// The largest factor a local step is scaled by (at least 1).
        max_scale: f32,
    },
}

/// What the cache keeps of one slot besides its values. One struct per slot, aligned to a cache
/// line, so that a hit reads and writes one line of bookkeeping instead of one per field.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(64))]
struct LineMeta {
    /// The key the slot holds (meaningful while it is in the index).
    key: u64,
    /// The server version the row reflects, this cache's acknowledged pushes included.
    c_s: u64,
    /// The shard's foreign clock when the row was fetched or refreshed.
    fetched_at: u64,
    /// The lookup that last read or reserved the slot: a lookup never evicts what it reads.
    stamp: u64,
    /// This cache's updates and the foreign updates seen (at refreshes) since the line was
    /// fetched: its share of the key's updates.
    own_seen: u64,
    foreign_seen: u64,
    /// Updates applied locally and not pushed yet.
    p: u32,
    /// The shard restarted since the row was fetched: the next lookup reads it again, whatever
    /// its clock says (the shard's versions may have gone back).
    revalidate: bool,
}

impl std::fmt::Debug for CacheCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheCore")
            .field("table", &self.table)
            .field("capacity", &self.capacity)
            .field("resident", &self.index.len())
            .finish_non_exhaustive()
    }
}

impl CacheCore {
    /// A cache of `spec`'s rows, spread over `shards` shards (row r on shard `r % shards`), under
    /// `config`. The local update uses the table's learning rate.
    pub fn new(spec: &TableSpec, config: &CacheConfig, shards: usize) -> Self {
        let shards = shards.max(1);
        let capacity = config.capacity.rows(spec);
        let dim = spec.dim as usize;
        Self {
            table: spec.name.clone(),
            rows: spec.rows,
            dim,
            lr: spec.optimizer.lr(),
            pull_bound: config.pull_bound.get(),
            push_bound: config.push_bound.get(),
            capacity,
            index: FxHashMap::with_capacity_and_hasher(capacity, Default::default()),
            meta: vec![LineMeta::default(); capacity],
            lines: vec![0.0; capacity * 2 * dim],
            free: (0..capacity as u32).rev().collect(),
            incarnations: vec![0; shards],
            calls: 0,
            routing: Routing::new(shards as u32),
            clocks: vec![ShardClock::default(); shards],
            plans: (0..shards).map(|_| ShardPlan::default()).collect(),
            replies: Replies::default(),
            read_failed: false,
            policy: policy::build(config.policy, capacity),
            stats: CacheStats::default(),
            dedup: FxHashMap::default(),
            uniq: Vec::new(),
            uniq_of_pos: Vec::new(),
            first_pos: Vec::new(),
            slot_of_uniq: Vec::new(),
            resolved: false,
            reserved_of_uniq: Vec::new(),
            req_of_uniq: Vec::new(),
            req_keys: Vec::new(),
            req_clocks: Vec::new(),
            req_skipped: Vec::new(),
            since: vec![None; shards],
            reply_of_req: Vec::new(),
            uniq_rows: Vec::new(),
            uniq_clock: Vec::new(),
            counts: Vec::new(),
            pushes: PushBatch::default(),
            unsent: PushBatch::default(),
            push_scale: 1.0,
            shared_keys: SharedKeys::Summed,
        }
    }

    /// Rows the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows it holds now.
    pub fn resident(&self) -> usize {
        self.index.len()
    }

    /// Counters so far (transport bytes are the caller's to add).
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Unpushed updates held for `key` (0 when not cached).
    pub fn unpushed(&self, key: u64) -> u32 {
        self.index.get(&key).map_or(0, |&s| self.meta[s as usize].p)
    }

    /// A slot's row and its pending gradient.
    fn line_mut(&mut self, slot: u32) -> (&mut [f32], &mut [f32]) {
        let dim = self.dim;
        let at = slot as usize * 2 * dim;
        self.lines[at..at + 2 * dim].split_at_mut(dim)
    }

    fn check_keys(&self, keys: &[u64]) -> Result<(), CacheError> {
        match keys.iter().find(|&&k| k >= self.rows) {
            Some(&key) => Err(CacheError::KeyOutOfRange {
                table: self.table.clone(),
                key,
                rows: self.rows,
            }),
            None => Ok(()),
        }
    }

    fn wrong_dim(&self, keys: usize, len: usize) -> CacheError {
        CacheError::WrongDim {
            table: self.table.clone(),
            dim: self.dim,
            keys,
            len,
        }
    }

    /// De-duplicates `keys` into `uniq` (first-seen order) and `uniq_of_pos`.
    fn dedup_keys(&mut self, keys: &[u64]) {
        self.resolved = false;
        self.dedup.clear();
        self.uniq.clear();
        self.uniq_of_pos.clear();
        self.first_pos.clear();
        for (pos, &k) in keys.iter().enumerate() {
            let next = self.uniq.len() as u32;
            let u = *self.dedup.entry(k).or_insert(next);
            if u == next {
                self.uniq.push(k);
                self.first_pos.push(pos as u32);
            }
            self.uniq_of_pos.push(u);
        }
    }

    /// Starts a lookup of `keys` (duplicates allowed): classifies hits and misses and returns the
    /// requests to send. Misses carry [`NOT_CACHED`]; hits carry their clock `c_s + p` unless the
    /// read bound is infinite, in which case they are not sent at all.
    pub fn plan_lookup(&mut self, keys: &[u64]) -> Result<LookupPlan<'_>, CacheError> {
        self.check_keys(keys)?;
        self.dedup_keys(keys);
        self.req_of_uniq.clear();
        self.req_keys.clear();
        self.req_clocks.clear();
        self.req_skipped.clear();
        self.since.iter_mut().for_each(|s| *s = None);
        let check_hits = self.pull_bound != u64::MAX;
        self.calls += 1;
        // Separate passes, each of independent memory accesses: the lines (which finish_lookup
        // copies), then the frequency sketch, then the policy and the requests.
        self.resolve_lines();
        for &key in &self.uniq {
            self.policy.record(key);
        }
        for u in 0..self.uniq.len() {
            let key = self.uniq[u];
            let slot = self.slot_of_uniq[u];
            if slot != NIL {
                self.stats.hits += 1;
                self.policy.touch(slot, key);
                self.meta[slot as usize].stamp = self.calls;
                let s = slot as usize;
                if self.meta[s].revalidate {
                    // Its shard restarted: read the row again, whatever its clock says.
                    self.stats.version_checks += 1;
                    self.req_clocks.push(NOT_CACHED);
                    self.req_skipped.push(false);
                    self.req_of_uniq.push(self.req_keys.len() as u32);
                    self.req_keys.push(key);
                    continue;
                }
                if !check_hits {
                    self.req_of_uniq.push(NIL);
                    continue;
                }
                let clock = self.meta[s].c_s + self.meta[s].p as u64;
                let skipped = self.covered_by_clock(key, s);
                if skipped {
                    self.stats.checks_skipped += 1;
                } else {
                    self.stats.version_checks += 1;
                }
                self.req_clocks.push(clock);
                self.req_skipped.push(skipped);
            } else {
                self.stats.misses += 1;
                self.req_clocks.push(NOT_CACHED);
                self.req_skipped.push(false);
            }
            self.req_of_uniq.push(self.req_keys.len() as u32);
            self.req_keys.push(key);
        }
        // Slots for the misses are chosen now, so that the lines they evict travel with this
        // lookup's requests; a line this lookup reads or reserves is never its victim.
        self.reserved_of_uniq.clear();
        self.reserved_of_uniq.resize(self.uniq.len(), NIL);
        for u in 0..self.uniq.len() {
            if self.slot_of_uniq[u] == NIL {
                if let Some(slot) = self.make_room(self.uniq[u]) {
                    self.meta[slot as usize].stamp = self.calls;
                    self.reserved_of_uniq[u] = slot;
                }
            }
        }
        // Every row queued for pushing goes with this lookup and is applied before its shard reads
        // the clock, so each shard's claim counts those updates as this cache's own.
        let queued = self.unsent.keys.iter().zip(&self.unsent.counts);
        for (&k, &c) in queued.chain(self.pushes.keys.iter().zip(&self.pushes.counts)) {
            if let Some(claim) = &mut self.since[self.routing.shard_of(k)] {
                claim.own += c as u64;
            }
        }
        self.stats.lookups += keys.len() as u64;
        self.stats.unique_keys += self.uniq.len() as u64;
        Ok(LookupPlan {
            keys: &self.req_keys,
            clocks: &self.req_clocks,
            skipped: &self.req_skipped,
            since: &self.since,
            bound: self.pull_bound,
        })
    }

    /// Whether the check of the hit in `slot` can be left to the table clock, and if so, narrows
    /// that shard's claim to what this line can absorb. The line lacks at most `foreign_now -
    /// fetched_at` updates; it is valid while that is at most `bound + p`. Lines whose slack is
    /// below the foreign updates forecast for this interval are checked as usual.
    fn covered_by_clock(&mut self, key: u64, slot: usize) -> bool {
        let shard = self.routing.shard_of(key);
        let sc = self.clocks[shard];
        if !sc.observed {
            return false;
        }
        let allowance = self.pull_bound.saturating_add(self.meta[slot].p as u64);
        let Some(slack) =
            allowance.checked_sub(sc.foreign().saturating_sub(self.meta[slot].fetched_at))
        else {
            return false;
        };
        if slack < sc.forecast {
            return false;
        }
        let claim = self.since[shard].get_or_insert(Since {
            clock: sc.clock,
            own: sc.own - sc.own_at,
            max_foreign: slack,
        });
        claim.max_foreign = claim.max_foreign.min(slack);
        true
    }

    /// Records the table clock `clock` that shard `shard` reported for the lookup planned last
    /// (read after applying the rows the lookup carried and before any row it read). Call after
    /// [`CacheCore::pushed`] for those rows and before [`CacheCore::finish_lookup`].
    pub fn observe(&mut self, shard: usize, clock: u64) {
        let sc = &mut self.clocks[shard];
        let foreign_now = clock.saturating_sub(sc.own);
        sc.forecast = if sc.observed {
            foreign_now.saturating_sub(sc.foreign())
        } else {
            0
        };
        sc.clock = clock;
        sc.own_at = sc.own;
        sc.observed = true;
    }

    /// A shard said its claim did not hold: its skipped checks were sent after all.
    pub fn claim_failed(&mut self) {
        self.stats.clock_retries += 1;
    }

    fn foreign_now(&self, key: u64) -> u64 {
        self.clocks[self.routing.shard_of(key)].foreign()
    }

    /// Completes the lookup planned last: applies `replies` (stale hits are refreshed with their
    /// pending gradient re-applied; misses fill the slots reserved for them while planning), then
    /// writes every key's row into `out` (keys x dim) and, when given, its clock into `clocks`.
    /// The lines evicted for those slots were queued while planning and travel with the lookup's
    /// requests. On an error nothing changes and the reserved slots are given back.
    pub fn finish_lookup(
        &mut self,
        replies: &Replies,
        out: &mut [f32],
        clocks: Option<&mut [u64]>,
    ) -> Result<(), CacheError> {
        let result = self.place(replies, out, clocks);
        if result.is_err() {
            self.abort_lookup();
        }
        result
    }

    fn place(
        &mut self,
        replies: &Replies,
        out: &mut [f32],
        mut clocks: Option<&mut [u64]>,
    ) -> Result<(), CacheError> {
        let dim = self.dim;
        let n = self.uniq_of_pos.len();
        if out.len() != n * dim {
            return Err(self.wrong_dim(n, out.len()));
        }
        if clocks.as_ref().is_some_and(|c| c.len() != n) {
            return Err(self.wrong_dim(n, clocks.as_ref().map_or(0, |c| c.len())));
        }
        if replies.versions.len() != replies.requests.len()
            || replies.rows.len() != replies.requests.len() * dim
        {
            return Err(CacheError::Replies(format!(
                "{} requests, {} versions, {} values",
                replies.requests.len(),
                replies.versions.len(),
                replies.rows.len()
            )));
        }
        self.reply_of_req.clear();
        self.reply_of_req.resize(self.req_keys.len(), NIL);
        for (i, &r) in replies.requests.iter().enumerate() {
            let slot = self.reply_of_req.get_mut(r as usize).ok_or_else(|| {
                CacheError::Replies(format!("reply for request {r} of {}", self.req_keys.len()))
            })?;
            *slot = i as u32;
        }
        // Every miss must have come back before anything changes.
        for u in 0..self.uniq.len() {
            let r = self.req_of_uniq[u];
            if self.slot_of_uniq[u] == NIL && self.reply_of_req[r as usize] == NIL {
                return Err(CacheError::Replies(format!(
                    "no row for missed key {}",
                    self.uniq[u]
                )));
            }
        }
        // Each unique key's row goes to its first position in `out`; duplicates are copied from
        // there at the end.
        self.uniq_clock.resize(self.uniq.len(), 0);
        // Hits first; the misses then fill the slots reserved for them while planning (never a
        // line this lookup hits: those carry its stamp).
        for u in 0..self.uniq.len() {
            self.load_ahead(u);
            let slot = self.slot_of_uniq[u];
            if slot == NIL {
                continue;
            }
            let s = slot as usize;
            let r = self.req_of_uniq[u];
            let reply = if r == NIL {
                NIL
            } else {
                self.reply_of_req[r as usize]
            };
            if reply != NIL {
                // Stale (or its shard restarted): take the server's row, keep the pending
                // gradient and re-apply it.
                let i = reply as usize;
                if std::mem::take(&mut self.meta[s].revalidate) {
                    if replies.versions[i] < self.meta[s].c_s {
                        self.stats.rows_went_back += 1;
                    }
                } else {
                    self.stats.stale_refreshes += 1;
                }
                self.stats.rows_pulled += 1;
                let fresh = &replies.rows[i * dim..(i + 1) * dim];
                // At the plain learning rate in every mode: the fresh row already holds the
                // foreign progress an extrapolated step anticipated.
                let lr = self.lr;
                let (data, pending) = self.line_mut(slot);
                for ((d, f), g) in data.iter_mut().zip(fresh).zip(pending.iter()) {
                    *d = f - lr * g;
                }
                // The server's updates beyond the line's (own pushes counted in c_s) are foreign.
                self.meta[s].foreign_seen += replies.versions[i].saturating_sub(self.meta[s].c_s);
                self.meta[s].c_s = replies.versions[i];
                self.meta[s].fetched_at = self.foreign_now(self.uniq[u]);
            }
            let (at, first) = (s * 2 * dim, self.first_pos[u] as usize * dim);
            out[first..first + dim].copy_from_slice(&self.lines[at..at + dim]);
            self.uniq_clock[u] = self.meta[s].c_s + self.meta[s].p as u64;
        }
        for u in 0..self.uniq.len() {
            if self.slot_of_uniq[u] != NIL {
                continue;
            }
            let i = self.reply_of_req[self.req_of_uniq[u] as usize] as usize;
            let (key, version) = (self.uniq[u], replies.versions[i]);
            let fresh = &replies.rows[i * dim..(i + 1) * dim];
            self.stats.rows_pulled += 1;
            let first = self.first_pos[u] as usize * dim;
            out[first..first + dim].copy_from_slice(fresh);
            self.uniq_clock[u] = version;
            let slot = std::mem::replace(&mut self.reserved_of_uniq[u], NIL);
            if slot != NIL {
                let s = slot as usize;
                self.index.insert(key, slot);
                self.meta[s].key = key;
                self.meta[s].c_s = version;
                self.meta[s].fetched_at = self.foreign_now(key);
                self.meta[s].p = 0;
                self.meta[s].own_seen = 0;
                self.meta[s].foreign_seen = 0;
                self.meta[s].revalidate = false;
                let (data, pending) = self.line_mut(slot);
                data.copy_from_slice(fresh);
                pending.fill(0.0);
                self.policy.insert(slot, key);
                self.slot_of_uniq[u] = slot;
            } else {
                self.stats.not_admitted += 1;
            }
        }
        for (pos, &u) in self.uniq_of_pos.iter().enumerate() {
            let u = u as usize;
            let first = self.first_pos[u] as usize;
            if first != pos {
                out.copy_within(first * dim..(first + 1) * dim, pos * dim);
            }
            if let Some(c) = clocks.as_deref_mut() {
                c[pos] = self.uniq_clock[u];
            }
        }
        self.resolved = true;
        Ok(())
    }

    /// Gives back the slots reserved by the lookup planned last, when it cannot complete (a shard
    /// failed). The lines they evicted were already queued for pushing.
    pub fn abort_lookup(&mut self) {
        self.resolved = false;
        for slot in self.reserved_of_uniq.drain(..) {
            if slot != NIL {
                self.free.push(slot);
            }
        }
    }

    /// A free slot for `key`, evicting a victim if needed (its unpushed updates go to the push
    /// batch); `None` when the policy does not admit `key` or there is no cache.
    fn make_room(&mut self, key: u64) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        let victim = self.policy.victim(key)?;
        if self.meta[victim as usize].stamp == self.calls {
            return None;
        }
        let s = victim as usize;
        self.policy.remove(victim);
        self.index.remove(&self.meta[s].key);
        self.stats.evictions += 1;
        if self.meta[s].p > 0 {
            self.stats.dirty_evictions += 1;
            self.queue_line(victim);
            self.meta[s].p = 0;
        }
        Some(victim)
    }

    /// Applies `grads` (keys x dim, one gradient row per key occurrence) locally and leaves in the
    /// push batch every line whose unpushed count now exceeds the push bound, and every key that is
    /// not cached (written through). Nothing changes if any value is NaN or infinite.
    pub fn update(&mut self, keys: &[u64], grads: &[f32]) -> Result<(), CacheError> {
        self.check_update(keys, grads)?;
        let dim = self.dim;
        // The update of exactly the unique keys the last lookup placed, in its order (what a
        // backward pass hands over): their slots are known and each key occurs once.
        let placed = self.resolved && keys == self.uniq.as_slice();
        self.counts.clear();
        let summed = if placed {
            self.counts.resize(self.uniq.len(), 1);
            false
        } else {
            self.dedup_keys(keys);
            self.counts.resize(self.uniq.len(), 0);
            // With duplicates, sum each key's gradient rows first; without, use the caller's
            // rows as they are.
            let summed = self.uniq.len() != keys.len();
            if summed {
                self.uniq_rows.clear();
                self.uniq_rows.resize(self.uniq.len() * dim, 0.0);
            }
            for (pos, &u) in self.uniq_of_pos.iter().enumerate() {
                let u = u as usize;
                self.counts[u] += 1;
                if summed {
                    let sums = &mut self.uniq_rows[u * dim..(u + 1) * dim];
                    for (s, g) in sums.iter_mut().zip(&grads[pos * dim..(pos + 1) * dim]) {
                        *s += g;
                    }
                }
            }
            self.resolve_lines();
            summed
        };
        self.stats.updates += keys.len() as u64;
        let rows = std::mem::take(&mut self.uniq_rows);
        let sums: &[f32] = if summed { &rows } else { grads };
        for u in 0..self.uniq.len() {
            self.load_ahead(u);
            let key = self.uniq[u];
            let g = &sums[u * dim..(u + 1) * dim];
            let slot = self.slot_of_uniq[u];
            if slot == NIL {
                self.stats.write_throughs += 1;
                self.pushes.add(key, self.counts[u], g);
                continue;
            }
            let s = slot as usize;
            let count = self.counts[u];
            let lr = self.lr;
            let scale = self.local_scale(s);
            if scale > 1.0 {
                // Extrapolation, limited: per element, whichever of this gradient and the
                // pending mean (`count` occurrences' worth) is smaller, nothing where they
                // disagree in sign.
                let extra = lr * (scale - 1.0);
                let per_update = count as f32 / self.meta[s].p.saturating_add(count).max(1) as f32;
                let (data, pending) = self.line_mut(slot);
                for ((d, p), &g) in data.iter_mut().zip(pending.iter_mut()).zip(g) {
                    *p += g;
                    let mean = *p * per_update;
                    let along = if g * mean > 0.0 {
                        if mean.abs() < g.abs() {
                            mean
                        } else {
                            g
                        }
                    } else {
                        0.0
                    };
                    *d -= lr * g + extra * along;
                }
            } else {
                let (data, pending) = self.line_mut(slot);
                for ((d, p), g) in data.iter_mut().zip(pending.iter_mut()).zip(g) {
                    *p += g;
                    *d -= lr * g;
                }
            }
            self.meta[s].p = self.meta[s].p.saturating_add(count);
            self.meta[s].own_seen += count as u64;
            if self.meta[s].p as u64 > self.push_bound || self.meta[s].p == u32::MAX {
                self.push_line(slot);
            }
        }
        self.uniq_rows = rows;
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
        // Chunk by chunk without early exit (so the test vectorizes), then the first bad value.
        let chunk = dim.max(1) * 16;
        let bad = grads
            .chunks(chunk)
            .position(|c| c.iter().fold(false, |bad, g| bad | !g.is_finite()));
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

    /// Applies updates made while a lookup of `keys` was in flight, once that lookup has
    /// completed into `out` and `clocks` (a prefetch: its rows were read before these updates
    /// were made). The updates go through [`CacheCore::update`]; then every row of `out` whose
    /// key they touched is brought up to date: a cached key's row and clock are copied from its
    /// line again, and a key not cached (its updates written through, not yet pushed) takes the
    /// local step `-lr x` their gradient sum, its clock their count. So a prefetched row includes
    /// every update this worker made before it is used, as a row looked up then would.
    pub fn update_after_lookup(
        &mut self,
        keys: &[u64],
        out: &mut [f32],
        mut clocks: Option<&mut [u64]>,
        late_keys: &[u64],
        late_grads: &[f32],
    ) -> Result<(), CacheError> {
        let dim = self.dim;
        if out.len() != keys.len() * dim {
            return Err(self.wrong_dim(keys.len(), out.len()));
        }
        if clocks.as_ref().is_some_and(|c| c.len() != keys.len()) {
            return Err(self.wrong_dim(keys.len(), clocks.as_ref().map_or(0, |c| c.len())));
        }
        self.update(late_keys, late_grads)?;
        // `update` left the late keys de-duplicated (`uniq`; `dedup`: key -> index into it;
        // `counts`) and, where a key occurred more than once, their gradient sums in `uniq_rows`;
        // the rows not cached take those.
        let summed = self.uniq.len() != late_keys.len();
        let sums: &[f32] = if summed { &self.uniq_rows } else { late_grads };
        for (pos, key) in keys.iter().enumerate() {
            let Some(&u) = self.dedup.get(key) else {
                continue;
            };
            let row = &mut out[pos * dim..(pos + 1) * dim];
            match self.index.get(key) {
                Some(&slot) => {
                    let (s, at) = (slot as usize, slot as usize * 2 * dim);
                    row.copy_from_slice(&self.lines[at..at + dim]);
                    if let Some(c) = clocks.as_deref_mut() {
                        c[pos] = self.meta[s].c_s + self.meta[s].p as u64;
                    }
                }
                None => {
                    let u = u as usize;
                    let lr = self.lr;
                    for (d, g) in row.iter_mut().zip(&sums[u * dim..(u + 1) * dim]) {
                        *d -= lr * g;
                    }
                    if let Some(c) = clocks.as_deref_mut() {
                        c[pos] += self.counts[u] as u64;
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolves the slot of every unique key into `slot_of_uniq`, then asks the CPU to load each
    /// resident line's bookkeeping. Each probe and each load is independent of the others, so
    /// their cache misses overlap; the loop that follows finds them in cache instead of waiting
    /// for them one at a time.
    fn resolve_lines(&mut self) {
        self.slot_of_uniq.clear();
        let index = &self.index;
        self.slot_of_uniq.extend(
            self.uniq
                .iter()
                .map(|k| index.get(k).copied().unwrap_or(NIL)),
        );
        for &slot in &self.slot_of_uniq {
            if slot != NIL {
                region::prefetch(std::slice::from_ref(&self.meta[slot as usize]));
            }
        }
    }

    /// Asks the CPU to load the values (row and pending gradient) of the line of unique key
    /// `u + LINES_AHEAD`, so that a loop over the unique keys in order finds each line in cache
    /// (a line is `2 x dim` values, too many for one batch's lines to stay in cache between
    /// the phases of a step).
    fn load_ahead(&self, u: usize) {
        const LINES_AHEAD: usize = 6;
        if let Some(&slot) = self.slot_of_uniq.get(u + LINES_AHEAD) {
            if slot != NIL {
                let (line, s) = (2 * self.dim, slot as usize);
                region::prefetch(&self.lines[s * line..(s + 1) * line]);
            }
        }
    }

    /// Moves a line's unpushed updates into the push batch; the line's `c_s` advances by them.
    fn push_line(&mut self, slot: u32) {
        let s = slot as usize;
        self.queue_line(slot);
        self.meta[s].c_s += self.meta[s].p as u64;
        self.meta[s].p = 0;
        self.line_mut(slot).1.fill(0.0);
    }

    /// Queues a dirty line's pending gradient (weighted under [`SharedKeys::Averaged`]).
    fn queue_line(&mut self, slot: u32) {
        let s = slot as usize;
        let at = s * 2 * self.dim + self.dim;
        let weight = self.line_weight(s);
        let start = self.pushes.grads.len();
        self.pushes.add(
            self.meta[s].key,
            self.meta[s].p,
            &self.lines[at..at + self.dim],
        );
        if weight != 1.0 {
            self.pushes.grads[start..]
                .iter_mut()
                .for_each(|g| *g *= weight);
        }
    }

    /// What a line's pending gradient sum is multiplied by when pushed: 1, or under
    /// [`SharedKeys::Averaged`] `1/p + share x (1 - 1/p)`, `share` being this cache's part of the
    /// key's updates seen since the line was fetched (`(own + 1) / (own + foreign + 1)`) and `p` the updates
    /// in the push. The first of the `p` local steps was taken from the point every worker shares
    /// and is summed, as synchronous SGD sums the workers' gradients; the other `p - 1` are local
    /// progress, which each worker updating the key makes on its own data, and count by share:
    /// for a key every one of W workers trains, the shards' copy moves by the mean of their
    /// local progress (as model averaging does), and for a key only this worker trains, by all of
    /// it. With `p = 1` (a push bound of 0) or no foreign updates the weight is 1.
    fn line_weight(&self, s: usize) -> f32 {
        if self.shared_keys != SharedKeys::Averaged || self.meta[s].p <= 1 {
            return 1.0;
        }
        let share = self.line_share(s);
        let first = 1.0 / self.meta[s].p as f64;
        (first + share * (1.0 - first)) as f32
    }

    /// What a local step of line `s` multiplies the learning rate by at most: under
    /// [`SharedKeys::Extrapolated`] `1 / share`, at most `max_scale`; otherwise 1.
    fn local_scale(&self, s: usize) -> f32 {
        match self.shared_keys {
            // A push bound of 0 pushes every update at once: nothing is held back for the
            // extrapolation to stand in for, and the line must stay the shards' row plus nothing.
            SharedKeys::Extrapolated { .. } if self.push_bound == 0 => 1.0,
            SharedKeys::Extrapolated { max_scale } => {
                ((1.0 / self.line_share(s)) as f32).clamp(1.0, max_scale.max(1.0))
            }
            _ => 1.0,
        }
    }

    /// This cache's part of the key's updates seen since line `s` was fetched,
    /// `(own + 1) / (own + foreign + 1)`, foreign updates being learnt at its refreshes (1 before
    /// any).
    fn line_share(&self, s: usize) -> f64 {
        let own = self.meta[s].own_seen as f64 + 1.0;
        own / (own + self.meta[s].foreign_seen as f64)
    }

    /// How this cache's updates of a key combine with other workers' ([`SharedKeys`]);
    /// [`SharedKeys::Summed`] by default (every update applied whole, which the model-based test
    /// and the sequential-SGD equivalence rely on). One worker, or a push bound of 0, behaves the
    /// same in every mode (no foreign updates while a line is dirty, or pushes of one update).
    pub fn set_shared_keys(&mut self, mode: SharedKeys) {
        self.shared_keys = mode;
    }

    /// The read and write bounds from now on. Raising them is always safe: what held under the
    /// old bounds holds under the new. A lowered read bound applies from the next lookup (every
    /// hit is checked against it). Lowering the write bound leaves in the push batch every line
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

    /// Leaves every dirty line in the push batch.
    pub fn flush(&mut self) {
        self.push_lines_above(0);
    }

    /// Leaves in the push batch every line holding more than `updates` unpushed updates.
    fn push_lines_above(&mut self, updates: u64) {
        for slot in 0..self.capacity as u32 {
            // Free slots always have p = 0 (eviction and insertion reset it).
            if self.meta[slot as usize].p as u64 > updates {
                self.push_line(slot);
            }
        }
    }

    /// Multiplies every gradient sum pushed from now on by `scale` (1 by default); the local
    /// copies still take each update whole. With `1 / workers`, for parameters every worker
    /// updates, the shards' copy moves by the mean of the workers' local progress instead of its
    /// sum: local SGD with periodic model averaging, the period being the push bound.
    pub fn set_push_scale(&mut self, scale: f32) {
        self.push_scale = scale;
    }

    /// Takes the rows to push, with any that an earlier call could not deliver first.
    pub fn take_pushes(&mut self) -> PushBatch {
        if self.push_scale != 1.0 {
            let scale = self.push_scale;
            self.pushes.grads.iter_mut().for_each(|g| *g *= scale);
        }
        if self.unsent.is_empty() {
            return std::mem::take(&mut self.pushes);
        }
        let mut batch = std::mem::take(&mut self.unsent);
        batch.append(&self.pushes);
        self.pushes.clear();
        batch
    }

    /// Takes the incarnation of shard `shard`'s latest answer. When it is not the one seen
    /// before, the shard restarted: what this cache knew of its table clock is forgotten, and
    /// every line of that shard is read again at its next lookup (its row replaced by the
    /// shard's, with the line's unpushed updates re-applied and kept for pushing). Returns true
    /// on a restart.
    pub fn observe_incarnation(&mut self, shard: usize, incarnation: u64) -> bool {
        let seen = self.incarnations[shard];
        if incarnation == 0 || incarnation == seen {
            return false;
        }
        self.incarnations[shard] = incarnation;
        if seen == 0 {
            return false; // the first answer: nothing known to forget
        }
        self.stats.restarts += 1;
        self.clocks[shard] = ShardClock::default();
        for (&key, &slot) in &self.index {
            if self.routing.shard_of(key) == shard {
                let s = slot as usize;
                self.meta[s].revalidate = true;
                self.stats.lines_revalidated += 1;
                self.stats.updates_kept += self.meta[s].p as u64;
            }
        }
        tracing::warn!(
            table = %self.table,
            shard,
            incarnation = format!("{incarnation:016x}"),
            "the shard restarted: its cached lines will be read again"
        );
        true
    }

    /// `rows` rows carrying `updates` updates of a taken batch were applied by shard `shard`.
    pub fn pushed(&mut self, shard: usize, rows: usize, updates: u64) {
        self.stats.rows_pushed += rows as u64;
        self.clocks[shard].own += updates;
    }

    /// The batch (or part of it) could not be delivered: keep it for the next call.
    pub fn requeue(&mut self, batch: &PushBatch) {
        self.unsent.append(batch);
    }

    /// Rows waiting for a retry after a failed push.
    pub fn unsent(&self) -> usize {
        self.unsent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Bound, Capacity, PolicyKind};
    use hetkv_transport::{Initializer, OptimizerSpec};

    /// Table `t` of `rows` rows of `dim` zeros, SGD at lr 0.5.
    fn sgd_table(rows: u64, dim: u32) -> TableSpec {
        TableSpec {
            name: "t".into(),
            rows,
            dim,
            init: Initializer::Zeros,
            optimizer: OptimizerSpec::Sgd { lr: 0.5 },
        }
    }

    fn one_row_core(push_bound: u64, shared: bool) -> CacheCore {
        let spec = sgd_table(4, 1);
        let mut config =
            CacheConfig::new(Capacity::Fraction(1.0), PolicyKind::Lfu, Bound::updates(0));
        config.push_bound = Bound::updates(push_bound);
        let mut core = CacheCore::new(&spec, &config, 1);
        core.set_shared_keys(if shared {
            SharedKeys::Averaged
        } else {
            SharedKeys::Summed
        });
        core
    }

    /// Looks key 1 up, the shard answering `version` (a stale hit or a miss is refreshed).
    fn look_up(core: &mut CacheCore, version: u64) {
        core.plan_lookup(&[1]).unwrap();
        let replies = Replies {
            requests: vec![0],
            versions: vec![version],
            rows: vec![0.0],
        };
        core.finish_lookup(&replies, &mut [0f32], None).unwrap();
    }

    #[test]
    fn shared_averaging_weights_a_push_by_the_line_s_share_of_the_key_s_updates() {
        for shared in [false, true] {
            let mut core = one_row_core(2, shared);
            look_up(&mut core, 0);
            core.update(&[1], &[1.0]).unwrap();
            // The shard has 9 updates the line has not: foreign ones.
            look_up(&mut core, 9);
            core.update(&[1], &[1.0]).unwrap();
            core.update(&[1], &[1.0]).unwrap();
            let pushed = core.take_pushes();
            assert_eq!(
                pushed.counts,
                [3],
                "three updates exceed the push bound of 2"
            );
            // share = (3 own + 1) / (3 + 1 + 9 foreign) = 4/13; weight = 1/3 + 4/13 x 2/3.
            let want = if shared { 3.0 * 21.0 / 39.0 } else { 3.0 };
            assert!(
                (pushed.grads[0] - want).abs() < 1e-5,
                "shared {shared}: pushed {} for {want}",
                pushed.grads[0]
            );
        }
        // A push of one update (a push bound of 0) is whole, however many foreign updates.
        let mut core = one_row_core(0, true);
        look_up(&mut core, 0);
        core.update(&[1], &[1.0]).unwrap();
        look_up(&mut core, 50);
        core.update(&[1], &[1.0]).unwrap();
        assert_eq!(core.take_pushes().grads, [1.0, 1.0]);
    }

    #[test]
    fn lowering_the_write_bound_pushes_the_lines_above_it_and_a_new_read_bound_goes_with_lookups() {
        // Push bound 3: three updates stay in the line.
        let mut core = one_row_core(3, false);
        look_up(&mut core, 0);
        for _ in 0..3 {
            core.update(&[1], &[1.0]).unwrap();
        }
        assert_eq!(core.take_pushes().counts, Vec::<u32>::new());
        core.set_bounds(Bound::STRICT, Bound::updates(1));
        assert_eq!(core.bounds(), (Bound::STRICT, Bound::updates(1)));
        let pushed = core.take_pushes();
        assert_eq!(pushed.counts, [3], "the line held 3 > 1 unpushed updates");
        assert_eq!(core.unpushed(1), 0);
        // A line within the new bound stays.
        core.update(&[1], &[1.0]).unwrap();
        core.set_bounds(Bound::STRICT, Bound::updates(1));
        assert!(core.take_pushes().counts.is_empty());
        assert_eq!(core.unpushed(1), 1);

        // The read bound travels with each lookup's checks (the shard answers a row only when
        // the line lags by more): the new one from the next lookup on.
        let mut core = one_row_core(0, false);
        look_up(&mut core, 0);
        assert_eq!(core.plan_lookup(&[1]).unwrap().bound, 0);
        core.set_bounds(Bound::updates(10), Bound::STRICT);
        assert_eq!(core.plan_lookup(&[1]).unwrap().bound, 10);
    }

    /// The value of key 1's line in a core of one-value rows.
    fn local_value(core: &CacheCore) -> f32 {
        core.lines[core.index[&1] as usize * 2]
    }

    #[test]
    fn extrapolation_scales_local_steps_by_the_inverse_share_and_pushes_whole() {
        // (max_scale, the local value after the two extrapolated steps).
        for (max_scale, want) in [(8.0, -5.25), (2.0, -2.5)] {
            let mut core = one_row_core(2, false);
            core.set_shared_keys(SharedKeys::Extrapolated { max_scale });
            look_up(&mut core, 0);
            core.update(&[1], &[1.0]).unwrap();
            assert_eq!(local_value(&core), -0.5, "no foreign updates seen: lr x g");
            // 9 foreign updates: the refresh re-applies the pending gradient at lr.
            look_up(&mut core, 9);
            assert_eq!(local_value(&core), -0.5);
            // share (1 + 1) / (1 + 1 + 9) = 2/11: the step is 5.5 lr x g (or the cap);
            // then (2 + 1) / (2 + 1 + 9) = 1/4: 4 lr x g (or the cap).
            core.update(&[1], &[1.0]).unwrap();
            core.update(&[1], &[1.0]).unwrap();
            assert!(
                (local_value(&core) - want).abs() < 1e-5,
                "max_scale {max_scale}: local {} for {want}",
                local_value(&core)
            );
            let pushed = core.take_pushes();
            assert_eq!(pushed.counts, [3]);
            assert_eq!(pushed.grads, [3.0], "pushes are the whole gradient sum");
            // A refresh takes the shards' row and the pending gradient at lr, unscaled: the
            // row already holds the foreign progress the local steps anticipated.
            core.update(&[1], &[1.0]).unwrap();
            look_up(&mut core, 20);
            assert_eq!(local_value(&core), -0.5);
        }
        // One worker (no foreign updates) and a push bound of 0 are plain SGD.
        let mut core = one_row_core(0, false);
        core.set_shared_keys(SharedKeys::Extrapolated { max_scale: 4.0 });
        look_up(&mut core, 0);
        for _ in 0..3 {
            core.update(&[1], &[1.0]).unwrap();
        }
        assert_eq!(local_value(&core), -1.5);
        assert_eq!(core.take_pushes().grads, [1.0, 1.0, 1.0]);
    }

    /// A core of one-value rows extrapolating up to 8 times, whose line of key 1 took one own
    /// update of 1 and then learnt of 9 foreign ones at a refresh (the shard's row 0): its share
    /// is (1 + 1) / (1 + 1 + 9) = 2/11. At a push bound of 0 the own update was pushed, so the
    /// shard's version also counts it.
    fn extrapolating_core_after_9_foreign(push_bound: u64) -> CacheCore {
        let mut core = one_row_core(push_bound, false);
        core.set_shared_keys(SharedKeys::Extrapolated { max_scale: 8.0 });
        look_up(&mut core, 0);
        core.update(&[1], &[1.0]).unwrap();
        look_up(&mut core, 9 + u64::from(push_bound == 0));
        core
    }

    #[test]
    fn the_extrapolated_part_of_a_step_is_limited_by_the_mean_pending_gradient() {
        let mut core = extrapolating_core_after_9_foreign(5);
        assert_eq!(
            local_value(&core),
            -0.5,
            "the fresh row and the pending update"
        );
        let steps = [
            // share 2/11, scale 5.5; pending 1 + 3 = 4 over 2 updates, mean 2 < 3: the step is
            // lr x 3 + lr x 4.5 x 2 = 1.5 + 4.5, not 5.5 x lr x 3 = 8.25.
            (vec![1], vec![3.0], -6.5),
            // Two occurrences: share (2 + 1) / (2 + 1 + 9), scale 4; pending 6 over 4 updates,
            // two means 3 > the gradient 2: lr x 2 + lr x 3 x 2 = 1 + 3.
            (vec![1, 1], vec![1.0, 1.0], -10.5),
            // A gradient against the pending mean (5 / 5) is not extrapolated: lr x -1.
            (vec![1], vec![-1.0], -10.0),
        ];
        for (keys, grads, want) in steps {
            core.update(&keys, &grads).unwrap();
            assert!(
                (local_value(&core) - want).abs() < 1e-5,
                "after {grads:?}: local {} for {want}",
                local_value(&core)
            );
        }
        assert!(core.take_pushes().is_empty(), "within the push bound");
    }

    #[test]
    fn at_a_push_bound_of_0_an_extrapolating_cache_takes_plain_steps() {
        // Share 2/11, which at a push bound above 0 would scale a step by 5.5.
        let mut core = extrapolating_core_after_9_foreign(0);
        assert_eq!(local_value(&core), 0.0, "refreshed to the shard's row");
        core.update(&[1], &[3.0]).unwrap();
        assert_eq!(
            local_value(&core),
            -1.5,
            "lr x 3, what the shard applies: the line stays the shard's row"
        );
        assert_eq!(core.take_pushes().grads, [1.0, 3.0]);
    }

    #[test]
    fn a_push_scale_shrinks_what_is_pushed_but_not_the_local_copy() {
        let spec = sgd_table(4, 2);
        let config = CacheConfig::new(Capacity::Fraction(1.0), PolicyKind::Lfu, Bound::updates(1));
        let mut core = CacheCore::new(&spec, &config, 1);
        core.set_push_scale(0.25);
        core.plan_lookup(&[1]).unwrap();
        let replies = Replies {
            requests: vec![0],
            versions: vec![0],
            rows: vec![1.0, 2.0],
        };
        let mut out = [0f32; 2];
        core.finish_lookup(&replies, &mut out, None).unwrap();
        core.update(&[1], &[4.0, 8.0]).unwrap();
        assert!(core.take_pushes().is_empty(), "within the push bound");
        core.update(&[1], &[4.0, 8.0]).unwrap();
        let pushed = core.take_pushes();
        assert_eq!(pushed.keys, [1]);
        assert_eq!(pushed.counts, [2]);
        assert_eq!(pushed.grads, [2.0, 4.0], "the sum (8, 16) times 0.25");
        // The local copy took both updates whole: 1 - 0.5 * 8, 2 - 0.5 * 16.
        core.plan_lookup(&[1]).unwrap();
        core.finish_lookup(&Replies::default(), &mut out, None)
            .unwrap();
        assert_eq!(out, [-3.0, -6.0]);
    }

    /// A core of 16 rows of 2 values holding 4, read bound infinite (hits are not sent), every
    /// update of a line pushed once it holds more than 1.
    fn four_line_core() -> CacheCore {
        let spec = sgd_table(16, 2);
        let mut config = CacheConfig::new(Capacity::Rows(4), PolicyKind::Lru, Bound::INFINITE);
        config.push_bound = Bound::updates(1);
        CacheCore::new(&spec, &config, 1)
    }

    /// Looks `keys` up, the shard answering every request with version 7 and row `[k, -k]`.
    fn look_up_all(core: &mut CacheCore, keys: &[u64]) -> Vec<f32> {
        let plan = core.plan_lookup(keys).unwrap();
        let asked = plan.keys.to_vec();
        let replies = Replies {
            requests: (0..asked.len() as u32).collect(),
            versions: vec![7; asked.len()],
            rows: asked
                .iter()
                .flat_map(|&k| [k as f32, -(k as f32)])
                .collect(),
        };
        let mut out = vec![0f32; keys.len() * 2];
        core.finish_lookup(&replies, &mut out, None).unwrap();
        out
    }

    #[test]
    fn the_update_of_the_keys_a_lookup_placed_equals_one_that_resolves_them_again() {
        // Keys 1, 2, 3, 5 are admitted into the four lines; 7 and 9 are not (LRU evicts only
        // lines this lookup did not reserve), so the update touches lines and writes through.
        let keys = [1, 2, 1, 3, 5, 7, 9, 2, 3];
        let unique = [1u64, 2, 3, 5, 7, 9];
        let grads: Vec<f32> = (0..unique.len() * 2)
            .map(|i| 0.25 * i as f32 + 1.0)
            .collect();
        let mut outcomes = Vec::new();
        for resolve_again in [false, true] {
            let mut core = four_line_core();
            look_up_all(&mut core, &keys);
            if resolve_again {
                // Any other call in between: the update's keys are resolved anew.
                core.update(&[], &[]).unwrap();
            }
            for round in 0..3 {
                core.update(&unique, &grads).unwrap();
                let pushes = core.take_pushes();
                let unpushed: Vec<u32> = unique.iter().map(|&k| core.unpushed(k)).collect();
                outcomes.push((resolve_again, round, pushes, unpushed));
            }
            let rows = look_up_all(&mut core, &unique);
            outcomes.push((resolve_again, 9, PushBatch::default(), vec![]));
            outcomes.last_mut().unwrap().2.grads = rows;
        }
        let (fast, slow) = outcomes.split_at(outcomes.len() / 2);
        for (a, b) in fast.iter().zip(slow) {
            assert_eq!(
                (a.1, &a.2.keys, &a.2.counts, &a.2.grads, &a.3),
                (b.1, &b.2.keys, &b.2.counts, &b.2.grads, &b.3),
                "round {}",
                a.1
            );
        }
        // The lines took the updates: resident keys hold the local steps.
        assert_eq!(
            fast[0].3,
            [1, 1, 1, 1, 0, 0],
            "one unpushed update per line"
        );
        assert_eq!(
            fast[0].2.keys,
            [7, 9],
            "the keys not admitted are written through"
        );
    }
}
