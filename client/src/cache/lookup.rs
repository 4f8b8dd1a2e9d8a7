//! Planning a lookup (which keys to ask for, with which clocks, which checks to leave to the table
//! clock, which slots the misses take), placing what came back, and bringing a prefetched
//! lookup's rows up to date with the updates made while it was in flight.

use hetkv_transport::wire::NOT_CACHED;

use super::batch::{Ahead, Replies};
use super::core::{CacheCore, CacheError};
use super::lines::NIL;

impl CacheCore {
    /// Plans a lookup of `keys` (duplicates allowed) into the batch's requests: misses with
    /// [`NOT_CACHED`], hits with their clock `c_s + p` unless the read bound is infinite (then
    /// they are not sent at all), each hit marked *skipped* when the table clock can vouch for it.
    /// Slots for the misses are reserved now, so that the lines they evict travel with this
    /// lookup's requests; a line this lookup reads or reserves is never its victim. A request
    /// wants the row's optimizer state when the row goes into a line (a hit, or a miss that got
    /// a slot), or, with `all_state`, always (a prefetch: updates made while it is in flight may
    /// touch keys that are not cached).
    pub(super) fn plan_lookup(&mut self, keys: &[u64], all_state: bool) -> Result<(), CacheError> {
        self.check_keys(keys)?;
        let shards = self.plans.len();
        let b = &mut self.batch;
        b.dedup(keys);
        b.clear_requests(shards);
        let check_hits = self.pull_bound != u64::MAX;
        self.calls += 1;
        self.batch.resolve(&self.lines);
        for u in 0..self.batch.uniq.len() {
            self.batch.plan_ahead(&self.lines, u);
            let slot = self.batch.slot_of_uniq[u];
            if slot == NIL {
                self.stats.misses += 1;
                self.lines.record(self.batch.uniq[u]);
                self.batch.request(u, NOT_CACHED, 0, false, all_state);
                continue;
            }
            self.stats.hits += 1;
            self.lines.hit(slot, self.calls);
            let m = *self.lines.meta(slot);
            if m.revalidate {
                // Its shard restarted: read the row again, whatever its clock says.
                self.stats.version_checks += 1;
                self.batch.request(u, NOT_CACHED, 0, false, true);
                continue;
            }
            if !check_hits {
                self.batch.req_of_uniq.push(NIL);
                continue;
            }
            let clock = m.c_s + u64::from(m.p);
            let skipped = self.covered_by_clock(m.key, m.p, m.fetched_at);
            if skipped {
                self.stats.checks_skipped += 1;
            } else {
                self.stats.version_checks += 1;
            }
            let born = self.lines.born(slot);
            self.batch.request(u, clock, born, skipped, true);
        }
        let b = &mut self.batch;
        b.reserved_of_uniq.clear();
        b.reserved_of_uniq.resize(b.uniq.len(), NIL);
        for u in 0..self.batch.uniq.len() {
            if self.batch.slot_of_uniq[u] != NIL {
                continue;
            }
            if let Some(r) = self.lines.reserve(self.batch.uniq[u], self.calls) {
                if r.evicted {
                    self.queue_evicted(r.slot);
                }
                self.batch.reserved_of_uniq[u] = r.slot;
                let req = self.batch.req_of_uniq[u] as usize;
                self.batch.req_state[req] = true;
            }
        }
        // Every row queued for pushing goes with this lookup and is applied before its shard reads
        // the clock, so each shard's claim counts those updates as this cache's own.
        for (k, c) in self.queue.counts() {
            if let Some(claim) = &mut self.batch.since[self.routing.shard_of(k)] {
                claim.own += u64::from(c);
            }
        }
        if self.state_len == 0 && !self.optimizer.has_steps() {
            self.batch.req_state.iter_mut().for_each(|s| *s = false);
        }
        self.stats.lookups += keys.len() as u64;
        self.stats.unique_keys += self.batch.uniq.len() as u64;
        Ok(())
    }

    /// Whether the check of a hit on `key` (with `p` unpushed updates, fetched at foreign clock
    /// `fetched_at`) can be left to the table clock, and if so, narrows that shard's claim to
    /// what this line can absorb. The line lacks at most `foreign_now - fetched_at` updates; it
    /// is valid while that is at most `bound + p`.
    ///
    /// A dynamic table's checks are never left out: a key evicted and admitted again changes
    /// its row without the clock counting it.
    fn covered_by_clock(&mut self, key: u64, p: u32, fetched_at: u64) -> bool {
        if self.dynamic() {
            return false;
        }
        let shard = self.routing.shard_of(key);
        let allowance = self.pull_bound.saturating_add(u64::from(p));
        let Some(slack) = self.clocks.slack(shard, allowance, fetched_at) else {
            return false;
        };
        self.clocks
            .narrow_claim(shard, slack, &mut self.batch.since[shard]);
        true
    }

    /// Completes the lookup planned last: applies `replies` (stale hits are refreshed with their
    /// pending updates re-applied; misses fill the slots reserved for them while planning), then
    /// writes every key's row into `out` (keys x dim) and, when given, its clock into `clocks`.
    /// On an error nothing changes and the reserved slots are given back.
    pub(super) fn finish_lookup(
        &mut self,
        replies: &Replies,
        out: &mut [f32],
        clocks: Option<&mut [u64]>,
    ) -> Result<(), CacheError> {
        let result = self
            .check_replies(replies, out, clocks.as_deref())
            .map(|()| self.place(replies, out, clocks));
        if result.is_err() {
            self.abort_lookup();
        }
        result
    }

    /// Checks that the replies cover the plan before anything changes: sizes, a row for every
    /// miss, and the optimizer state of every row that goes into a line.
    fn check_replies(
        &mut self,
        replies: &Replies,
        out: &[f32],
        clocks: Option<&[u64]>,
    ) -> Result<(), CacheError> {
        let dim = self.dim;
        let n = self.batch.uniq_of_pos.len();
        if out.len() != n * dim {
            return Err(self.wrong_dim(n, out.len()));
        }
        if let Some(c) = clocks.filter(|c| c.len() != n) {
            return Err(self.wrong_dim(n, c.len()));
        }
        let states = self.state_len > 0 || self.optimizer.has_steps();
        if replies.versions.len() != replies.requests.len()
            || replies.rows.len() != replies.requests.len() * dim
            || replies.state_at.len() != replies.requests.len()
        {
            return Err(CacheError::Replies(format!(
                "{} requests, {} versions, {} values",
                replies.requests.len(),
                replies.versions.len(),
                replies.rows.len()
            )));
        }
        let b = &mut self.batch;
        b.reply_of_req.clear();
        b.reply_of_req.resize(b.req_keys.len(), NIL);
        for (i, &r) in replies.requests.iter().enumerate() {
            let at = b.reply_of_req.get_mut(r as usize).ok_or_else(|| {
                CacheError::Replies(format!("reply for request {r} of {}", b.req_keys.len()))
            })?;
            *at = i as u32;
        }
        for u in 0..b.uniq.len() {
            let r = b.req_of_uniq[u];
            let reply = if r == NIL {
                NIL
            } else {
                b.reply_of_req[r as usize]
            };
            if b.slot_of_uniq[u] == NIL && reply == NIL {
                return Err(CacheError::Replies(format!(
                    "no row for missed key {}",
                    b.uniq[u]
                )));
            }
            let into_line = b.slot_of_uniq[u] != NIL || b.reserved_of_uniq[u] != NIL;
            if states && into_line && reply != NIL && replies.state_at[reply as usize] == NIL {
                return Err(CacheError::Replies(format!(
                    "no optimizer state came with the row of key {}",
                    b.uniq[u]
                )));
            }
        }
        Ok(())
    }

    /// Places checked replies (see [`CacheCore::finish_lookup`]).
    fn place(&mut self, replies: &Replies, out: &mut [f32], mut clocks: Option<&mut [u64]>) {
        let (dim, len) = (self.dim, self.state_len);
        let b = &mut self.batch;
        b.uniq_clock.clear();
        b.uniq_clock.resize(b.uniq.len(), 0);
        // Hits first; the misses then fill the slots reserved for them while planning (never a
        // line this lookup hits: those carry its stamp).
        for u in 0..self.batch.uniq.len() {
            self.batch.load_ahead(&self.lines, u, Ahead::Value);
            let slot = self.batch.slot_of_uniq[u];
            if slot == NIL {
                continue;
            }
            let r = self.batch.req_of_uniq[u];
            let reply = if r == NIL {
                NIL
            } else {
                self.batch.reply_of_req[r as usize]
            };
            if reply != NIL {
                // Stale (or its shard restarted): the shard's row and state become the base, the
                // pending updates stay on top.
                let i = reply as usize;
                let version = replies.versions[i];
                let (state, step) = replies.state(i, len).unwrap_or((&[], 0));
                let fetched_at = self
                    .clocks
                    .foreign_now(self.routing.shard_of(self.batch.uniq[u]));
                let m = self.lines.meta_mut(slot);
                if std::mem::take(&mut m.revalidate) {
                    if version < m.c_s {
                        self.stats.rows_went_back += 1;
                    }
                } else {
                    self.stats.stale_refreshes += 1;
                }
                // The server's updates beyond the line's (own pushes counted in c_s) are foreign.
                m.foreign_seen += version.saturating_sub(m.c_s);
                m.c_s = version;
                m.step = step;
                m.fetched_at = fetched_at;
                self.lines.set_born(slot, replies.born(i));
                let line = self.lines.parts_mut(slot);
                line.base
                    .copy_from_slice(&replies.rows[i * dim..(i + 1) * dim]);
                line.state.copy_from_slice(state);
                self.stats.rows_pulled += 1;
            }
            let first = self.batch.first_pos[u] as usize * dim;
            self.value_into(slot, &mut out[first..first + dim]);
            let m = self.lines.meta(slot);
            self.batch.uniq_clock[u] = m.c_s + u64::from(m.p);
        }
        for u in 0..self.batch.uniq.len() {
            self.batch.load_ahead(&self.lines, u, Ahead::Reserved);
            if self.batch.slot_of_uniq[u] != NIL {
                continue;
            }
            let i = self.batch.reply_of_req[self.batch.req_of_uniq[u] as usize] as usize;
            let (key, version) = (self.batch.uniq[u], replies.versions[i]);
            let fresh = &replies.rows[i * dim..(i + 1) * dim];
            self.stats.rows_pulled += 1;
            let first = self.batch.first_pos[u] as usize * dim;
            out[first..first + dim].copy_from_slice(fresh);
            self.batch.uniq_clock[u] = version;
            let state = replies.state(i, len);
            let slot = std::mem::replace(&mut self.batch.reserved_of_uniq[u], NIL);
            if slot == NIL {
                self.stats.not_admitted += 1;
                if let Some((values, step)) = state {
                    let b = &mut self.batch;
                    b.uncached.insert(key, b.uncached.len() as u32);
                    b.uncached_states.values.extend_from_slice(values);
                    b.uncached_states.steps.push(step);
                }
                continue;
            }
            let (values, step) = state.unwrap_or((&[], 0));
            self.lines.fill(slot, key, version, fresh, values);
            self.lines.set_born(slot, replies.born(i));
            let fetched_at = self.clocks.foreign_now(self.routing.shard_of(key));
            let m = self.lines.meta_mut(slot);
            m.fetched_at = fetched_at;
            m.step = step;
            self.batch.slot_of_uniq[u] = slot;
        }
        let b = &self.batch;
        for (pos, &u) in b.uniq_of_pos.iter().enumerate() {
            let u = u as usize;
            let first = b.first_pos[u] as usize;
            if first != pos {
                out.copy_within(first * dim..(first + 1) * dim, pos * dim);
            }
            if let Some(c) = clocks.as_deref_mut() {
                c[pos] = b.uniq_clock[u];
            }
        }
        self.batch.resolved = true;
    }

    /// Applies updates made while a lookup of `keys` was in flight, once that lookup has
    /// completed into `out` and `clocks` (a prefetch: its rows were read before these updates
    /// were made). The updates go through [`CacheCore::update`]; then every row of `out` whose
    /// key they touched is brought up to date: a cached key's row and clock are copied from its
    /// line again, and a key not cached (its updates written through, not yet pushed) takes the
    /// row those updates will produce (the optimizer's step with what the rule pushes, from the
    /// row and state read), its clock their count. So a prefetched row includes every update
    /// this worker made before it is used, as a row looked up then would.
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
        // `update` left the late keys de-duplicated (`uniq`, `counts`) and, where a key occurred
        // more than once, their gradient sums in `uniq_rows`; the rows not cached take those.
        let summed = self.batch.uniq.len() != late_keys.len();
        let weight = self.rule.push_weight(None);
        for (pos, &key) in keys.iter().enumerate() {
            let Some(u) = self.batch.uniq_index(key) else {
                continue;
            };
            let row = &mut out[pos * dim..(pos + 1) * dim];
            if let Some(slot) = self.lines.slot_of(key) {
                self.value_into(slot, row);
                let m = self.lines.meta(slot);
                if let Some(c) = clocks.as_deref_mut() {
                    c[pos] = m.c_s + u64::from(m.p);
                }
                continue;
            }
            let u = u as usize;
            let sums: &[f32] = if summed {
                &self.batch.uniq_rows
            } else {
                late_grads
            };
            self.weighted.clear();
            self.weighted
                .extend(sums[u * dim..(u + 1) * dim].iter().map(|g| g * weight));
            self.scratch.clear();
            let mut step = 0;
            if self.state_len > 0 || self.optimizer.has_steps() {
                let Some(&at) = self.batch.uncached.get(&key) else {
                    return Err(CacheError::Replies(format!(
                        "no optimizer state came with key {key}, which updates made during its \
                         prefetch touch"
                    )));
                };
                let (len, at) = (self.state_len, at as usize);
                let states = &self.batch.uncached_states;
                self.scratch
                    .extend_from_slice(&states.values[at * len..(at + 1) * len]);
                step = states.steps.get(at).copied().unwrap_or(0);
            }
            self.optimizer
                .apply(row, &self.weighted, &mut self.scratch, &mut step);
            if let Some(c) = clocks.as_deref_mut() {
                c[pos] += u64::from(self.batch.counts[u]);
            }
        }
        Ok(())
    }

    /// Gives back the slots reserved by the lookup planned last, when it cannot complete (a shard
    /// failed). The lines they evicted were already queued for pushing.
    pub fn abort_lookup(&mut self) {
        self.batch.resolved = false;
        for slot in std::mem::take(&mut self.batch.reserved_of_uniq) {
            if slot != NIL {
                self.lines.give_back(slot);
            }
        }
    }
}
