//! One call's batch: its keys de-duplicated and resolved to slots, the requests a lookup plans,
//! and what came back. Kept between calls only to reuse the allocations (and, for the update that
//! follows a lookup of the same keys, the resolution).

use rustc_hash::FxHashMap;

use hetkv_transport::wire::Since;
use hetkv_transport::RowStates;

use super::lines::{Lines, NIL};

/// Keys seen in the current call, and the index each got: an open-addressing table cleared by
/// bumping a stamp, so that de-duplicating a batch costs one probe a key and no clearing.
#[derive(Debug, Default)]
struct Seen {
    /// (key, stamp of the call that wrote it, index); a power-of-two count.
    slots: Vec<(u64, u32, u32)>,
    stamp: u32,
}

impl Seen {
    /// Starts a call of at most `n` keys.
    fn start(&mut self, n: usize) {
        let want = (2 * n).next_power_of_two().max(16);
        if self.slots.len() < want {
            self.slots = vec![(0, 0, 0); want];
            self.stamp = 0;
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.slots.iter_mut().for_each(|s| s.1 = 0);
            self.stamp = 1;
        }
    }

    fn home(&self, key: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// `key`'s index: the one it got earlier in this call, or `next`, which it gets now.
    fn index_of(&mut self, key: u64, next: u32) -> u32 {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let slot = &mut self.slots[i];
            if slot.1 != self.stamp {
                *slot = (key, self.stamp, next);
                return next;
            }
            if slot.0 == key {
                return slot.2;
            }
            i = (i + 1) & mask;
        }
    }

    /// `key`'s index in this call, if it came.
    fn get(&self, key: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            if slot.1 != self.stamp {
                return None;
            }
            if slot.0 == key {
                return Some(slot.2);
            }
            i = (i + 1) & mask;
        }
    }
}

/// The scratch of the current call.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    dedup: Seen,
    /// The unique keys, in first-seen order.
    pub uniq: Vec<u64>,
    /// For each position of the call's keys, its unique key.
    pub uniq_of_pos: Vec<u32>,
    /// Position of each unique key's first occurrence.
    pub first_pos: Vec<u32>,
    /// Each unique key's slot (`NIL`: not cached).
    pub slot_of_uniq: Vec<u32>,
    /// Whether `slot_of_uniq` still says where every key of `uniq` is (set once a lookup has
    /// placed its rows, cleared by anything that plans, evicts or gives slots back), so that the
    /// update of exactly those keys, which a training step makes right after its lookup, skips
    /// de-duplicating and resolving them again.
    pub resolved: bool,
    /// For each missed key of the current lookup, the slot reserved for it (`NIL`: not admitted).
    pub reserved_of_uniq: Vec<u32>,
    /// For each unique key, its request (`NIL`: none, a hit under an infinite read bound).
    pub req_of_uniq: Vec<u32>,
    /// The requests: keys, clocks ([`hetkv_transport::wire::NOT_CACHED`] for misses), whether the
    /// table clock vouches for the check, and whether the row's optimizer state is wanted.
    pub req_keys: Vec<u64>,
    pub req_clocks: Vec<u64>,
    /// Each request's birth stamp (a dynamic table's line's; 0 for a miss).
    pub req_births: Vec<u64>,
    pub req_skipped: Vec<bool>,
    pub req_state: Vec<bool>,
    /// Per shard, the claim covering its skipped checks.
    pub since: Vec<Option<Since>>,
    /// For each request, its reply (`NIL`: none came back).
    pub reply_of_req: Vec<u32>,
    /// Each unique key's clock as returned.
    pub uniq_clock: Vec<u64>,
    /// Updates per unique key, and their gradient sums where keys repeat.
    pub counts: Vec<u32>,
    pub uniq_rows: Vec<f32>,
    /// The optimizer state of rows returned for keys not cached (for updates made while a
    /// prefetch was in flight): key → index into `uncached_states`.
    pub uncached: FxHashMap<u64, u32>,
    pub uncached_states: RowStates,
}

impl Batch {
    /// De-duplicates `keys` into `uniq` (first-seen order) and `uniq_of_pos`.
    pub fn dedup(&mut self, keys: &[u64]) {
        self.resolved = false;
        self.dedup.start(keys.len());
        self.uniq.clear();
        self.uniq_of_pos.clear();
        self.first_pos.clear();
        for (pos, &k) in keys.iter().enumerate() {
            let next = self.uniq.len() as u32;
            let u = self.dedup.index_of(k, next);
            if u == next {
                self.uniq.push(k);
                self.first_pos.push(pos as u32);
            }
            self.uniq_of_pos.push(u);
        }
    }

    /// The unique index of `key` in the last de-duplication.
    pub fn uniq_index(&self, key: u64) -> Option<u32> {
        self.dedup.get(key)
    }

    /// Resolves every unique key's slot into `slot_of_uniq`. Each probe is independent of the
    /// others, so their cache misses overlap.
    pub fn resolve(&mut self, lines: &Lines) {
        self.slot_of_uniq.clear();
        self.slot_of_uniq
            .extend(self.uniq.iter().map(|&k| lines.slot_of(k).unwrap_or(NIL)));
    }

    /// Asks the CPU to load what planning unique key `u + KEYS_AHEAD` touches (when resident,
    /// its line's bookkeeping and policy record; else its counters in the policy), so that a loop
    /// over the unique keys in order finds them in cache. A fixed distance, not the whole batch
    /// up front: a batch's loads do not fit the first-level cache, and the ones issued first
    /// would be gone by the time the loop reaches them.
    pub fn plan_ahead(&self, lines: &Lines, u: usize) {
        const KEYS_AHEAD: usize = 12;
        if let Some(&key) = self.uniq.get(u + KEYS_AHEAD) {
            match self.slot_of_uniq[u + KEYS_AHEAD] {
                NIL => lines.prefetch_policy(key),
                slot => lines.prefetch_hit(slot),
            }
        }
    }

    /// Clears the requests of a lookup about to be planned over `shards` shards.
    pub fn clear_requests(&mut self, shards: usize) {
        self.req_of_uniq.clear();
        self.req_keys.clear();
        self.req_clocks.clear();
        self.req_births.clear();
        self.req_skipped.clear();
        self.req_state.clear();
        self.since.clear();
        self.since.resize(shards, None);
        self.uncached.clear();
        self.uncached_states.clear();
    }

    /// Adds a request for unique key `u`.
    pub fn request(&mut self, u: usize, clock: u64, born: u64, skipped: bool, state: bool) {
        debug_assert_eq!(self.req_of_uniq.len(), u);
        self.req_of_uniq.push(self.req_keys.len() as u32);
        self.req_keys.push(self.uniq[u]);
        self.req_clocks.push(clock);
        self.req_births.push(born);
        self.req_skipped.push(skipped);
        self.req_state.push(state);
    }

    /// Asks the CPU to load the line of unique key `u + LINES_AHEAD` (from the slots it holds,
    /// or with [`Ahead::Reserved`] the slot reserved for it), so that a loop over the unique keys
    /// in order finds each line in cache (a batch's lines do not stay in cache between the phases
    /// of a step).
    pub fn load_ahead(&self, lines: &Lines, u: usize, what: Ahead) {
        const LINES_AHEAD: usize = 6;
        let slots = match what {
            Ahead::Reserved => &self.reserved_of_uniq,
            Ahead::Value | Ahead::Line => &self.slot_of_uniq,
        };
        if let Some(&slot) = slots.get(u + LINES_AHEAD) {
            if slot != NIL {
                match what {
                    Ahead::Value => lines.prefetch_value(slot),
                    Ahead::Line | Ahead::Reserved => lines.prefetch_line(slot),
                }
            }
        }
    }
}

/// What [`Batch::load_ahead`] loads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ahead {
    /// What reading a line's value touches (its base, and its pending sum when it has one).
    Value,
    /// The whole line (what an update touches).
    Line,
    /// The whole line of the slot reserved for a miss (what filling it writes).
    Reserved,
}

/// What came back for a lookup's requests: for each returned row, its request index, version,
/// values and, where the request wanted it, optimizer state.
#[derive(Clone, Debug, Default)]
pub(crate) struct Replies {
    /// Request indices, in any order.
    pub requests: Vec<u32>,
    /// Server versions.
    pub versions: Vec<u64>,
    /// Rows, requests x dim.
    pub rows: Vec<f32>,
    /// For each returned row, the index of its state in `states` (`NIL`: none came).
    pub state_at: Vec<u32>,
    /// States, `len` values and (with steps) one step count each.
    pub states: RowStates,
    /// A dynamic table's: each row's birth stamp.
    pub births: Vec<u64>,
}

impl Replies {
    pub fn clear(&mut self) {
        self.requests.clear();
        self.versions.clear();
        self.births.clear();
        self.rows.clear();
        self.state_at.clear();
        self.states.clear();
    }

    /// The birth stamp of returned row `i` (0 for a fixed table's).
    pub fn born(&self, i: usize) -> u64 {
        self.births.get(i).copied().unwrap_or(0)
    }

    /// The state of returned row `i` (values of `len`, and its step count), if one came.
    pub fn state(&self, i: usize, len: usize) -> Option<(&[f32], u64)> {
        let at = *self.state_at.get(i)?;
        (at != NIL).then(|| {
            let at = at as usize;
            (
                &self.states.values[at * len..(at + 1) * len],
                self.states.steps.get(at).copied().unwrap_or(0),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn de_duplication_keeps_first_seen_order_across_calls_of_any_size() {
        let mut b = Batch::default();
        for round in 0..3u64 {
            let keys: Vec<u64> = (0..50).map(|i| (i * 7 + round) % 13).collect();
            b.dedup(&keys);
            let mut want: Vec<u64> = Vec::new();
            for &k in &keys {
                if !want.contains(&k) {
                    want.push(k);
                }
            }
            assert_eq!(b.uniq, want);
            for (pos, &k) in keys.iter().enumerate() {
                assert_eq!(b.uniq[b.uniq_of_pos[pos] as usize], k);
                assert_eq!(b.uniq_index(k), Some(b.uniq_of_pos[pos]));
            }
            assert_eq!(b.uniq_index(1000), None, "a key of no call");
        }
        // A bigger call after smaller ones, then a small one: nothing of the earlier calls stays.
        let big: Vec<u64> = (0..5000).collect();
        b.dedup(&big);
        assert_eq!(b.uniq.len(), 5000);
        b.dedup(&[3, 3]);
        assert_eq!((b.uniq.clone(), b.uniq_index(4000)), (vec![3], None));
    }
}
