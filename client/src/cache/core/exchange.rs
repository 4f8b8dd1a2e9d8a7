//! The whole lookup and push protocol of one cache, shard by shard, still without I/O.
//!
//! A call starts with [`CacheCore::start_lookup`] or [`CacheCore::start_push`]. The driver then
//! loops: it sends every request [`CacheCore::requests`] lists (shards in parallel), and hands
//! each shard's answer back with [`CacheCore::on_reply`]: what became of the rows pushed with it
//! ([`PushOutcome`]) and the rows read, or the read's failure. A shard whose table clock could not
//! vouch for the checks left out of its request gets a follow-up request (those checks) in the next
//! round; the loop ends when no request is left, and [`CacheCore::complete_lookup`] fills the
//! caller's rows. A push acknowledged by a shard is counted there and never sent again, whatever
//! happens to the read that carried it; rows whose delivery is unknown are kept for the next call.

use hetkv_transport::wire::{Since, NOT_CACHED};
use hetkv_transport::{PushOutcome, PushRef, StaleQuery, StaleRows};

use super::{CacheCore, CacheError, PushBatch};

/// What a request asks of its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Apply the pushed rows (`push`), nothing else.
    Push,
    /// Read the rows of `keys`, all misses, with nothing pushed: no clocks are sent.
    Pull,
    /// Apply the pushed rows, then return the stale rows of `keys` (against `clocks`) and answer
    /// the `since` claim.
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
    /// The read bound.
    pub bound: u64,
    /// The claim covering the checks left out.
    pub since: Option<Since>,
    /// Rows to apply first.
    pub push: Option<PushRef<'a>>,
}

impl<'a> ShardRequest<'a> {
    /// The request as a conditional pull of `table`.
    pub fn query(&self, table: &'a str) -> StaleQuery<'a> {
        StaleQuery {
            table,
            keys: self.keys,
            clocks: self.clocks,
            bound: self.bound,
            since: self.since,
            push: self.push,
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
pub(super) struct ShardPlan {
    stage: Stage,
    keys: Vec<u64>,
    clocks: Vec<u64>,
    /// Request index (in the core's lookup requests) of each key.
    origin: Vec<u32>,
    /// Hits whose checks are left to the table clock.
    skip_keys: Vec<u64>,
    skip_clocks: Vec<u64>,
    skip_origin: Vec<u32>,
    since: Option<Since>,
    push: PushBatch,
}

impl ShardPlan {
    fn clear(&mut self) {
        self.stage = Stage::Done;
        self.keys.clear();
        self.clocks.clear();
        self.origin.clear();
        self.skip_keys.clear();
        self.skip_clocks.clear();
        self.skip_origin.clear();
        self.since = None;
        self.push.clear();
    }

    fn push_ref(&self) -> Option<PushRef<'_>> {
        (!self.push.is_empty()).then_some(PushRef {
            keys: &self.push.keys,
            counts: &self.push.counts,
            grads: &self.push.grads,
        })
    }
}

impl CacheCore {
    /// Plans a lookup of `keys` (duplicates allowed) shard by shard: each shard's request carries
    /// its misses, the hits it must check, the claim covering the checks left out, and the rows
    /// queued for it (the lines this lookup evicts among them), applied before its clock is read.
    pub fn start_lookup(&mut self, keys: &[u64]) -> Result<(), CacheError> {
        self.plan_lookup(keys)?;
        for p in &mut self.plans {
            p.clear();
        }
        for i in 0..self.req_keys.len() {
            let (k, c) = (self.req_keys[i], self.req_clocks[i]);
            let p = &mut self.plans[self.routing.shard_of(k)];
            let (keys, clocks, origin) = if self.req_skipped[i] {
                (&mut p.skip_keys, &mut p.skip_clocks, &mut p.skip_origin)
            } else {
                (&mut p.keys, &mut p.clocks, &mut p.origin)
            };
            keys.push(k);
            clocks.push(c);
            origin.push(i as u32);
        }
        self.route_pushes();
        for (s, p) in self.plans.iter_mut().enumerate() {
            p.since = self.since[s];
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
        let batch = self.take_pushes();
        let dim = self.dim;
        for (i, &k) in batch.keys.iter().enumerate() {
            let p = &mut self.plans[self.routing.shard_of(k)];
            p.push
                .add(k, batch.counts[i], &batch.grads[i * dim..(i + 1) * dim]);
        }
    }

    /// The requests to send now, one per shard at most; empty when the call is complete.
    pub fn requests(&self) -> Vec<ShardRequest<'_>> {
        let bound = self.pull_bound;
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
                    bound,
                    since: None,
                    push: p.push_ref(),
                }),
                Stage::First => {
                    let plain = p.push.is_empty()
                        && p.skip_keys.is_empty()
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
                    bound,
                    since: None,
                    push: None,
                }),
            })
            .collect()
    }

    /// Takes shard `shard`'s answer to the request [`CacheCore::requests`] listed for it: what
    /// became of the rows it pushed, and the rows it read (`None` when the read failed, after
    /// which the call cannot complete). Rows the shard applied are counted and forgotten; rows it
    /// may not have received are kept for the next call; rows it refused are dropped and counted.
    /// A reply that does not fit the request is an error, and the call cannot complete.
    ///
    /// `incarnation` is the shard's in this answer ([`CacheCore::observe_incarnation`]): when
    /// the shard restarted, every key of this lookup on that shard is read again in the next
    /// round, whatever it was checked against before.
    pub fn on_reply(
        &mut self,
        shard: usize,
        push: PushOutcome,
        reply: Option<&StaleRows>,
        incarnation: u64,
    ) -> Result<(), CacheError> {
        let stage = self.plans[shard].stage;
        if stage == Stage::Done {
            return Err(CacheError::Replies(format!(
                "a reply from shard {shard}, which was sent nothing"
            )));
        }
        let restarted = self.observe_incarnation(shard, incarnation);
        if stage == Stage::First {
            let rows = self.plans[shard].push.len();
            match push {
                PushOutcome::Applied(ack) => self.pushed(shard, rows, ack.updates),
                PushOutcome::Lost => {
                    let batch = std::mem::take(&mut self.plans[shard].push);
                    self.requeue(&batch);
                    self.plans[shard].push = batch;
                }
                PushOutcome::Held => {
                    // The transport delivers them, under their numbers; `flush` waits for it.
                    self.stats.rows_held += rows as u64;
                }
                PushOutcome::Refused => {
                    self.stats.rows_refused += rows as u64;
                    tracing::error!(shard, rows, "shard refused pushed rows; they are dropped");
                }
                PushOutcome::NotSent => {}
            }
        }
        self.plans[shard].stage = Stage::Done;
        let Some(reply) = reply else {
            self.read_failed = true;
            return Ok(());
        };
        let p = &self.plans[shard];
        let kind_keys = if stage == Stage::FollowUp {
            p.skip_origin.len()
        } else {
            p.origin.len()
        };
        if reply.rows.len() != reply.indices.len() * self.dim
            || reply.versions.len() != reply.indices.len()
            || reply.indices.iter().any(|&i| i as usize >= kind_keys)
        {
            self.read_failed = true;
            return Err(CacheError::Replies(format!(
                "shard {shard} answered {} rows of {} values and {} versions for {kind_keys} keys \
                 (dim {})",
                reply.indices.len(),
                reply.rows.len(),
                reply.versions.len(),
                self.dim
            )));
        }
        let read_keys = !p.keys.is_empty() || !p.skip_keys.is_empty();
        let follow_up = stage == Stage::First && !reply.since_held && !p.skip_keys.is_empty();
        let origin = if stage == Stage::FollowUp {
            &p.skip_origin
        } else {
            &p.origin
        };
        for &i in &reply.indices {
            self.replies.requests.push(origin[i as usize]);
        }
        self.replies.versions.extend_from_slice(&reply.versions);
        self.replies.rows.extend_from_slice(&reply.rows);
        if stage == Stage::First && read_keys {
            self.observe(shard, reply.table_clock);
        }
        if restarted && read_keys {
            // Rows of the previous incarnation, and checks against its versions, mean nothing
            // now: every key of this shard in this lookup goes again, as a miss.
            let p = &mut self.plans[shard];
            let mut keys = std::mem::take(&mut p.keys);
            keys.extend_from_slice(&p.skip_keys);
            let mut origin = std::mem::take(&mut p.origin);
            origin.extend_from_slice(&p.skip_origin);
            p.skip_clocks.clear();
            p.skip_clocks.resize(keys.len(), NOT_CACHED);
            p.skip_keys = keys;
            p.skip_origin = origin;
            p.stage = Stage::FollowUp;
        } else if follow_up {
            // The shard could not vouch for the checks left out: they go in the next round.
            self.plans[shard].stage = Stage::FollowUp;
            self.claim_failed();
        }
        Ok(())
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
