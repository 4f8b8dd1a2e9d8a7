//! The whole lookup and push protocol of one cache, shard by shard, still without I/O.
//!
//! A call starts with [`CacheCore::start_lookup`] (or [`CacheCore::start_prefetch`]) or
//! [`CacheCore::start_push`]. The driver then loops: it sends every request
//! [`CacheCore::requests`] lists (shards in parallel), and hands each shard's answer back with
//! [`CacheCore::on_reply`]: what became of the rows pushed with it ([`PushOutcome`], with the rows
//! the push produced where the shard handed them back) and the rows read, or the read's failure.
//! A shard whose table clock could not vouch for the checks left out of its request gets a
//! follow-up request (those checks) in the next round; the loop ends when no request is left, and
//! [`CacheCore::complete_lookup`] fills the caller's rows. A push acknowledged by a shard is
//! counted there and never sent again, whatever happens to the read that carried it; rows whose
//! delivery is unknown are kept for the next call.

use hetkv_transport::wire::{Since, NOT_CACHED};
use hetkv_transport::{Exchange, PushOutcome, PushRef, StaleQuery, StaleRows};

use super::core::{CacheCore, CacheError};
use super::lines::NIL;
use super::queue::PushBatch;

/// What a request asks of its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Apply the pushed rows (`push`), nothing else.
    Push,
    /// Read the rows of `keys`, all misses wanting no optimizer state, with nothing pushed: no
    /// clocks are sent.
    Pull,
    /// Apply the pushed rows, then return the stale rows of `keys` (against `clocks`), with the
    /// optimizer state of the first `state_keys`, and answer the `since` claim.
    PullIfStale,
}

/// One request the core asks the driver to send.
#[derive(Clone, Copy, Debug)]
pub struct ShardRequest<'a> {
    /// The shard to send it to.
    pub shard: usize,
    /// What to send.
    pub kind: RequestKind,
    /// Keys to read or check.
    pub keys: &'a [u64],
    /// Their clocks ([`NOT_CACHED`] for misses).
    pub clocks: &'a [u64],
    /// A dynamic table's: their lines' birth stamps (0 for misses).
    pub births: Option<&'a [u64]>,
    /// The first `state_keys` keys want their optimizer state.
    pub state_keys: u32,
    /// The read bound.
    pub bound: u64,
    /// The claim covering the checks left out.
    pub since: Option<Since>,
    /// Rows to apply first.
    pub push: Option<PushRef<'a>>,
}

impl<'a> ShardRequest<'a> {
    /// The request to send for `table` (None: a push of no rows, nothing to send).
    pub fn exchange(&self, table: &'a str) -> Option<Exchange<'a>> {
        match self.kind {
            RequestKind::Push => self.push.map(|rows| Exchange::Push { table, rows }),
            RequestKind::Pull => Some(Exchange::Pull {
                table,
                keys: self.keys,
            }),
            RequestKind::PullIfStale => Some(Exchange::PullIfStale(self.query(table))),
        }
    }

    /// The request as a conditional pull of `table`.
    pub fn query(&self, table: &'a str) -> StaleQuery<'a> {
        StaleQuery {
            table,
            keys: self.keys,
            clocks: self.clocks,
            births: self.births,
            bound: self.bound,
            since: self.since,
            push: self.push,
            state_keys: self.state_keys,
        }
    }
}

/// Where one shard's part of the current call stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stage {
    /// Nothing to send, or everything answered.
    #[default]
    Done,
    /// The first request is to be sent.
    First,
    /// The checks left out of the first request are to be sent.
    FollowUp,
}

/// One shard's part of the current call.
#[derive(Debug, Default)]
pub(crate) struct ShardPlan {
    stage: Stage,
    /// Keys of the first request: those wanting state first (`state_keys` of them).
    keys: Vec<u64>,
    clocks: Vec<u64>,
    births: Vec<u64>,
    state_keys: u32,
    /// Request index (in the core's lookup requests) of each key.
    origin: Vec<u32>,
    /// The first request's keys that want no state, while it is built.
    tail_keys: Vec<u64>,
    tail_clocks: Vec<u64>,
    tail_births: Vec<u64>,
    tail_origin: Vec<u32>,
    /// Hits whose checks are left to the table clock (every one wants state).
    skip_keys: Vec<u64>,
    skip_clocks: Vec<u64>,
    skip_births: Vec<u64>,
    skip_origin: Vec<u32>,
    since: Option<Since>,
    push: PushBatch,
}

impl ShardPlan {
    fn clear(&mut self) {
        self.stage = Stage::Done;
        self.keys.clear();
        self.clocks.clear();
        self.births.clear();
        self.state_keys = 0;
        self.origin.clear();
        self.skip_keys.clear();
        self.skip_clocks.clear();
        self.skip_births.clear();
        self.skip_origin.clear();
        self.since = None;
        self.push.clear();
    }

    fn push_ref(&self) -> Option<PushRef<'_>> {
        (!self.push.is_empty()).then(|| self.push.as_push_ref())
    }
}

impl CacheCore {
    /// Plans a lookup of `keys` (duplicates allowed) shard by shard: each shard's request carries
    /// its misses, the hits it must check, the claim covering the checks left out, and the rows
    /// queued for it (the lines this lookup evicts among them), applied before its clock is read.
    pub fn start_lookup(&mut self, keys: &[u64]) -> Result<(), CacheError> {
        self.start(keys, false)
    }

    /// [`CacheCore::start_lookup`] for a prefetch: every row read also brings its optimizer
    /// state, since updates made while the prefetch is in flight may touch keys the cache does
    /// not hold, whose rows [`CacheCore::update_after_lookup`] then steps with it.
    pub fn start_prefetch(&mut self, keys: &[u64]) -> Result<(), CacheError> {
        self.start(keys, true)
    }

    fn start(&mut self, keys: &[u64], all_state: bool) -> Result<(), CacheError> {
        self.plan_lookup(keys, all_state)?;
        for p in &mut self.plans {
            p.clear();
        }
        let b = &self.batch;
        // Requests wanting state go first in each shard's request, then the others (gathered in
        // the plan's tail lists and appended).
        for i in 0..b.req_keys.len() {
            let (k, c, born) = (b.req_keys[i], b.req_clocks[i], b.req_births[i]);
            let p = &mut self.plans[self.routing.shard_of(k)];
            if b.req_skipped[i] {
                p.skip_keys.push(k);
                p.skip_clocks.push(c);
                p.skip_births.push(born);
                p.skip_origin.push(i as u32);
            } else if b.req_state[i] {
                p.keys.push(k);
                p.clocks.push(c);
                p.births.push(born);
                p.origin.push(i as u32);
            } else {
                p.tail_keys.push(k);
                p.tail_clocks.push(c);
                p.tail_births.push(born);
                p.tail_origin.push(i as u32);
            }
        }
        for p in &mut self.plans {
            p.state_keys = p.keys.len() as u32;
            p.keys.append(&mut p.tail_keys);
            p.clocks.append(&mut p.tail_clocks);
            p.births.append(&mut p.tail_births);
            p.origin.append(&mut p.tail_origin);
        }
        self.route_pushes();
        for (s, p) in self.plans.iter_mut().enumerate() {
            p.since = self.batch.since[s];
            let busy = !p.keys.is_empty() || !p.skip_keys.is_empty() || !p.push.is_empty();
            p.stage = if busy { Stage::First } else { Stage::Done };
        }
        self.replies.clear();
        self.read_failed = false;
        Ok(())
    }

    /// Plans the push of every row queued (by [`CacheCore::update`], [`CacheCore::flush`] or an
    /// earlier call that could not deliver them), one request per shard.
    pub fn start_push(&mut self) {
        for p in &mut self.plans {
            p.clear();
        }
        self.route_pushes();
        for p in &mut self.plans {
            if !p.push.is_empty() {
                p.stage = Stage::First;
            }
        }
        self.read_failed = false;
    }

    /// Spreads the queued rows over the shards' plans.
    fn route_pushes(&mut self) {
        let batch = self.queue.take();
        for i in 0..batch.len() {
            let p = &mut self.plans[self.routing.shard_of(batch.keys[i])];
            p.push.add_row_of(&batch, i, self.dim);
        }
    }

    /// Whether the rows of this table carry optimizer state a line needs.
    fn has_state(&self) -> bool {
        self.state_len > 0 || self.optimizer.has_steps()
    }

    /// The requests to send now, one per shard at most; empty when the call is complete.
    pub fn requests(&self) -> Vec<ShardRequest<'_>> {
        let bound = self.pull_bound;
        let dynamic = self.dynamic();
        fn births(dynamic: bool, b: &[u64]) -> Option<&[u64]> {
            dynamic.then_some(b)
        }
        let skip_state = |p: &ShardPlan| {
            if self.has_state() {
                p.skip_keys.len() as u32
            } else {
                0
            }
        };
        self.plans
            .iter()
            .enumerate()
            .filter_map(|(shard, p)| match p.stage {
                Stage::Done => None,
                Stage::First if p.keys.is_empty() && p.skip_keys.is_empty() => Some(ShardRequest {
                    shard,
                    kind: RequestKind::Push,
                    keys: &[],
                    clocks: &[],
                    births: None,
                    state_keys: 0,
                    bound,
                    since: None,
                    push: p.push_ref(),
                }),
                Stage::First => {
                    // A dynamic table's rows come with their birth stamps: never a plain pull.
                    let plain = !self.dynamic()
                        && p.push.is_empty()
                        && p.skip_keys.is_empty()
                        && p.state_keys == 0
                        && p.clocks.iter().all(|&c| c == NOT_CACHED);
                    Some(ShardRequest {
                        shard,
                        kind: if plain {
                            RequestKind::Pull
                        } else {
                            RequestKind::PullIfStale
                        },
                        keys: &p.keys,
                        clocks: &p.clocks,
                        births: births(dynamic, &p.births),
                        state_keys: p.state_keys,
                        bound,
                        since: p.since,
                        push: p.push_ref(),
                    })
                }
                Stage::FollowUp => Some(ShardRequest {
                    shard,
                    kind: RequestKind::PullIfStale,
                    keys: &p.skip_keys,
                    clocks: &p.skip_clocks,
                    births: births(dynamic, &p.skip_births),
                    state_keys: skip_state(p),
                    bound,
                    since: None,
                    push: None,
                }),
            })
            .collect()
    }

    /// Takes shard `shard`'s answer to the request [`CacheCore::requests`] listed for it: what
    /// became of the rows it pushed (`push`; the rows it produced and handed back are in
    /// `answer.produced`), and the rows it read (`answer`, when `read_ok`; after a failed read
    /// the call cannot complete). Rows the shard applied are counted and forgotten, and the
    /// lines of rows it handed back take them; rows it may not have received are kept for the
    /// next call; rows it refused are dropped and counted, and their lines read again at their
    /// next lookup. A reply that does not fit the request is an error, and the call cannot
    /// complete.
    ///
    /// Restarts are data: the push's acknowledgement and the rows each carry the incarnation
    /// of the daemon they are of (`PushResponse::incarnation`, `StaleRows::incarnation`), and
    /// [`CacheCore::observe_incarnation`] takes them. When the shard restarted, every key of
    /// this lookup on that shard is read again in the next round, whatever it was checked
    /// against before. Rows and a clock of another incarnation than the one that applied the
    /// push in the same answer (a one-sided read of a dead daemon's memory, or a restart between
    /// the push and the read) are never taken: those keys are read again. Rows of an incarnation
    /// this cache saw replaced fail the read.
    pub fn on_reply(
        &mut self,
        shard: usize,
        push: PushOutcome,
        answer: &StaleRows,
        read_ok: bool,
    ) -> Result<(), CacheError> {
        let stage = self.plans[shard].stage;
        if stage == Stage::Done {
            return Err(CacheError::Replies(format!(
                "a reply from shard {shard}, which was sent nothing"
            )));
        }
        let pushed_by = match push {
            PushOutcome::Applied(ack) => ack.incarnation,
            _ => 0,
        };
        // An acknowledgement of a retired incarnation (read late) changes nothing.
        let mut restarted = self.observe_incarnation(shard, pushed_by);
        if stage == Stage::First {
            self.take_push_outcome(shard, push, answer)?;
        }
        self.plans[shard].stage = Stage::Done;
        if !read_ok {
            self.read_failed = true;
            return Ok(());
        }
        let read_from = answer.incarnation;
        let other = pushed_by != 0 && read_from != 0 && read_from != pushed_by;
        if !other && read_from != 0 && self.clocks.retired(shard, read_from) {
            self.read_failed = true;
            return Err(CacheError::Replies(format!(
                "shard {shard} answered with rows of incarnation {read_from:016x}, which this \
                 cache saw restart"
            )));
        }
        if !other && read_from != 0 {
            restarted |= self.observe_incarnation(shard, read_from);
        }
        self.take_rows(shard, stage, answer, restarted, other)
    }

    /// The push half of a shard's answer to its first request.
    fn take_push_outcome(
        &mut self,
        shard: usize,
        push: PushOutcome,
        answer: &StaleRows,
    ) -> Result<(), CacheError> {
        let rows = self.plans[shard].push.len();
        match push {
            PushOutcome::Applied(ack) => {
                self.stats.rows_pushed += rows as u64;
                self.clocks.pushed(shard, ack.updates);
                let batch = std::mem::take(&mut self.plans[shard].push);
                let result = self.adopt_produced(&batch, answer);
                self.plans[shard].push = batch;
                result?;
            }
            PushOutcome::Lost => self.queue.requeue(&self.plans[shard].push),
            PushOutcome::Held => {
                // The transport delivers them, under their numbers; `flush` waits for it.
                self.stats.rows_held += rows as u64;
            }
            PushOutcome::Refused | PushOutcome::Unknown => {
                if push == PushOutcome::Refused {
                    self.stats.rows_refused += rows as u64;
                    tracing::error!(shard, rows, "shard refused pushed rows; they are dropped");
                } else {
                    // Never sent again (that could apply them twice); flush reports them.
                    self.stats.rows_unknown += rows as u64;
                }
                // What the lines committed may not be on the shard: they are read again.
                let keys = std::mem::take(&mut self.plans[shard].push.keys);
                self.revalidate(&keys);
                self.plans[shard].push.keys = keys;
            }
            PushOutcome::NotSent => {}
        }
        Ok(())
    }

    /// The lines of the rows `batch` pushed that the shard handed back take them.
    fn adopt_produced(&mut self, batch: &PushBatch, answer: &StaleRows) -> Result<(), CacheError> {
        let p = &answer.produced;
        let (dim, len) = (self.dim, self.state_len);
        let n = p.indices.len();
        let steps = self.optimizer.has_steps();
        if p.versions.len() != n
            || p.rows.len() != n * dim
            || p.states.values.len() != n * len
            || (steps && p.states.steps.len() != n)
            || (self.dynamic() && p.births.len() != n)
            || p.indices.iter().any(|&i| i as usize >= batch.len())
        {
            return Err(CacheError::Replies(format!(
                "{n} produced rows of {} values and {} state values for a push of {} rows",
                p.rows.len(),
                p.states.values.len(),
                batch.len()
            )));
        }
        let mut row = vec![0f32; dim];
        for j in 0..n {
            let key = batch.keys[p.indices[j] as usize];
            row.copy_from_slice(&p.rows[j * dim..(j + 1) * dim]);
            // A key the shard does not hold (it refused the push) is its initial value.
            self.spec.complete_pulled(key, p.versions[j], &mut row);
            let state = &p.states.values[j * len..(j + 1) * len];
            let step = p.states.steps.get(j).copied().unwrap_or(0);
            let born = p.births.get(j).copied().unwrap_or(0);
            self.adopt(key, (p.versions[j], born), &row, state, step);
        }
        Ok(())
    }

    /// The read half of a shard's answer.
    fn take_rows(
        &mut self,
        shard: usize,
        stage: Stage,
        reply: &StaleRows,
        restarted: bool,
        other_incarnation: bool,
    ) -> Result<(), CacheError> {
        if other_incarnation {
            // Neither the rows nor the clock are of the incarnation that applied the push: the
            // keys go again, as after a restart.
            self.stats.clock_retries += 1;
            self.read_again(shard);
            return Ok(());
        }
        let p = &self.plans[shard];
        let (origin, asked_state) = if stage == Stage::FollowUp {
            let all = if self.has_state() {
                p.skip_keys.len()
            } else {
                0
            };
            (&p.skip_origin, all)
        } else {
            (&p.origin, p.state_keys as usize)
        };
        let len = self.state_len;
        let with_state = reply
            .indices
            .iter()
            .take_while(|&&i| (i as usize) < asked_state)
            .count();
        let steps = self.optimizer.has_steps();
        if reply.rows.len() != reply.indices.len() * self.dim
            || reply.versions.len() != reply.indices.len()
            || (self.dynamic() && reply.births.len() != reply.indices.len())
            || reply.indices.iter().any(|&i| i as usize >= origin.len())
            || reply.states.values.len() != with_state * len
            || (steps && reply.states.steps.len() != with_state)
        {
            self.read_failed = true;
            return Err(CacheError::Replies(format!(
                "shard {shard} answered {} rows of {} values, {} versions and {} state values for \
                 {} keys (dim {}, {asked_state} wanting state)",
                reply.indices.len(),
                reply.rows.len(),
                reply.versions.len(),
                reply.states.values.len(),
                origin.len(),
                self.dim
            )));
        }
        let read_keys = !p.keys.is_empty() || !p.skip_keys.is_empty();
        let follow_up = stage == Stage::First && !reply.since_held && !p.skip_keys.is_empty();
        // The replies keep one step count per state row (0 where the optimizer counts none), so
        // the rows of state taken so far are the step counts.
        let first_state = self.replies.states.steps.len();
        for (j, &i) in reply.indices.iter().enumerate() {
            self.replies.requests.push(origin[i as usize]);
            self.replies.state_at.push(if j < with_state {
                (first_state + j) as u32
            } else {
                NIL
            });
        }
        self.replies.versions.extend_from_slice(&reply.versions);
        let first_row = self.replies.rows.len();
        self.replies.rows.extend_from_slice(&reply.rows);
        if self.dynamic() {
            self.replies.births.extend_from_slice(&reply.births);
            // A key the shard does not hold is its initial value (the one rule,
            // `TableSpec::complete_pulled`).
            let dim = self.dim;
            for (j, &i) in reply.indices.iter().enumerate() {
                let key = self.batch.req_keys[origin[i as usize] as usize];
                let at = first_row + j * dim;
                let row = &mut self.replies.rows[at..at + dim];
                self.spec.complete_pulled(key, reply.versions[j], row);
            }
        }
        self.replies
            .states
            .values
            .extend_from_slice(&reply.states.values);
        if steps {
            self.replies
                .states
                .steps
                .extend_from_slice(&reply.states.steps);
        } else {
            self.replies
                .states
                .steps
                .extend(std::iter::repeat_n(0, with_state));
        }
        if stage == Stage::First && read_keys {
            self.clocks.observe(shard, reply.table_clock);
        }
        if restarted && read_keys {
            // Rows of the previous incarnation, and checks against its versions, mean nothing
            // now: every key of this shard in this lookup goes again, as a miss.
            self.read_again(shard);
        } else if follow_up {
            // The shard could not vouch for the checks left out: they go in the next round.
            self.plans[shard].stage = Stage::FollowUp;
            self.stats.clock_retries += 1;
        }
        Ok(())
    }

    /// Every key of `shard` in this lookup goes in the next round, as a miss.
    fn read_again(&mut self, shard: usize) {
        let p = &mut self.plans[shard];
        if p.keys.is_empty() && p.skip_keys.is_empty() {
            return;
        }
        let mut keys = std::mem::take(&mut p.keys);
        keys.extend_from_slice(&p.skip_keys);
        let mut origin = std::mem::take(&mut p.origin);
        origin.extend_from_slice(&p.skip_origin);
        p.skip_clocks.clear();
        p.skip_clocks.resize(keys.len(), NOT_CACHED);
        p.skip_births.clear();
        p.skip_births.resize(keys.len(), 0);
        p.skip_keys = keys;
        p.skip_origin = origin;
        p.stage = Stage::FollowUp;
    }

    /// Completes the lookup once [`CacheCore::requests`] is empty: writes every key's row into
    /// `out` (keys x dim) and, when given, its clock into `clocks`. When a read failed, gives the
    /// reserved slots back and fails; the pushes' outcomes were taken already.
    pub fn complete_lookup(
        &mut self,
        out: &mut [f32],
        clocks: Option<&mut [u64]>,
    ) -> Result<(), CacheError> {
        if self.read_failed || self.plans.iter().any(|p| p.stage != Stage::Done) {
            self.abort_lookup();
            return Err(CacheError::Replies(
                "the lookup is incomplete: a shard's read failed or is unanswered".into(),
            ));
        }
        let replies = std::mem::take(&mut self.replies);
        let result = self.finish_lookup(&replies, out, clocks);
        self.replies = replies;
        result
    }
}
