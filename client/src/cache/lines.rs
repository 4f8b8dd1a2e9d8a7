//! The cache's storage and its eviction policy: slots of lines, the key index, and the policy
//! that orders them (in the manner of foyer: reserving a slot hands back the victim it displaced,
//! and the caller deals with the victim's unpushed updates before the slot is reused).
//!
//! A line holds, contiguously: the shard's row it derives from (`base`, of version `c_s`), the
//! gradient sum not yet pushed, and the optimizer state of the base row. What a lookup returns is
//! computed from them (the base itself when nothing is pending). Its bookkeeping is one 64-byte
//! [`LineMeta`], so that a hit touches one cache line of it.

use rustc_hash::FxHashMap;

use hetkv_transport::region;

use super::policy::{self, EvictionPolicy, PolicyKind};

/// No slot.
pub(crate) const NIL: u32 = u32::MAX;

/// What the cache keeps of one slot besides its values.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(64))]
pub(crate) struct LineMeta {
    /// The key the slot holds (meaningful while it is in the index).
    pub key: u64,
    /// The server version of the base row: the shard's row as fetched, refreshed, or produced by
    /// this cache's own acknowledged pushes.
    pub c_s: u64,
    /// The shard's foreign clock when the base row was read.
    pub fetched_at: u64,
    /// The lookup that last read or reserved the slot: a lookup never evicts what it reads.
    pub stamp: u64,
    /// This cache's updates, and the foreign updates seen, since the line was fetched: its share
    /// of the key's updates, for the update rules that weigh by it.
    pub own_seen: u64,
    /// See `own_seen`.
    pub foreign_seen: u64,
    /// The base state's step count (Adam).
    pub step: u64,
    /// Updates applied locally and not pushed yet.
    pub p: u32,
    /// The shard restarted since the row was fetched: the next lookup reads it again, whatever
    /// its clock says (the shard's versions may have gone back).
    pub revalidate: bool,
}

/// The parts of one line's values.
pub(crate) struct LineParts<'a> {
    /// The shard's row at version `c_s`.
    pub base: &'a mut [f32],
    /// The gradient sum of the updates not yet pushed.
    pub pending: &'a mut [f32],
    /// The optimizer state of the base row.
    pub state: &'a mut [f32],
}

/// A slot reserved for a key that missed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reserved {
    /// The slot.
    pub slot: u32,
    /// Whether a line was evicted to make room: its data is still in the slot (the caller queues
    /// its unpushed updates before filling the slot).
    pub evicted: bool,
}

/// Slots, index and policy of one cache.
pub(crate) struct Lines {
    dim: usize,
    /// f32 values per slot: base, pending, state.
    stride: usize,
    capacity: usize,
    index: FxHashMap<u64, u32>,
    meta: Vec<LineMeta>,
    values: Vec<f32>,
    free: Vec<u32>,
    policy: Box<dyn EvictionPolicy>,
    /// A dynamic table's: each slot's birth stamp (the incarnation of its key whose row the base
    /// is; 0 for a key the shard did not hold). Empty for a fixed table, whose lines' meta stay
    /// one cache line.
    born: Vec<u64>,
}

impl Lines {
    /// `capacity` empty slots of rows of `dim` with `state_len` optimizer values each.
    pub fn new(capacity: usize, dim: usize, state_len: usize, policy: PolicyKind) -> Self {
        let stride = Self::values_per_line(dim, state_len);
        Self {
            dim,
            stride,
            capacity,
            index: FxHashMap::with_capacity_and_hasher(capacity, Default::default()),
            meta: vec![LineMeta::default(); capacity],
            values: vec![0.0; capacity * stride],
            free: (0..capacity as u32).rev().collect(),
            policy: policy::build(policy, capacity),
            born: Vec::new(),
        }
    }

    /// Keeps a birth stamp for every slot (a dynamic table's lines).
    pub fn with_births(mut self) -> Self {
        self.born = vec![0; self.capacity];
        self
    }

    /// The birth stamp of the row in `slot` (0 for a fixed table's).
    pub fn born(&self, slot: u32) -> u64 {
        self.born.get(slot as usize).copied().unwrap_or(0)
    }

    /// Sets the birth stamp of the row in `slot` (nothing for a fixed table's).
    pub fn set_born(&mut self, slot: u32, born: u64) {
        if let Some(b) = self.born.get_mut(slot as usize) {
            *b = born;
        }
    }

    /// f32 values a line takes, for rows of `dim` and `state_len` optimizer values.
    pub fn values_per_line(dim: usize, state_len: usize) -> usize {
        2 * dim + state_len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn resident(&self) -> usize {
        self.index.len()
    }

    /// The slot holding `key`.
    pub fn slot_of(&self, key: u64) -> Option<u32> {
        self.index.get(&key).copied()
    }

    /// The resident lines: key and slot, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.index.iter().map(|(&k, &s)| (k, s))
    }

    pub fn meta(&self, slot: u32) -> &LineMeta {
        &self.meta[slot as usize]
    }

    pub fn meta_mut(&mut self, slot: u32) -> &mut LineMeta {
        &mut self.meta[slot as usize]
    }

    /// The line's base row, pending gradient sum and state, read-only.
    pub fn parts(&self, slot: u32) -> (&[f32], &[f32], &[f32]) {
        let at = slot as usize * self.stride;
        let line = &self.values[at..at + self.stride];
        let (base, rest) = line.split_at(self.dim);
        let (pending, state) = rest.split_at(self.dim);
        (base, pending, state)
    }

    /// The line's pending gradient sum, read-only.
    pub fn pending(&self, slot: u32) -> &[f32] {
        self.parts(slot).1
    }

    /// The line's values, to change them.
    pub fn parts_mut(&mut self, slot: u32) -> LineParts<'_> {
        let at = slot as usize * self.stride;
        let line = &mut self.values[at..at + self.stride];
        let (base, rest) = line.split_at_mut(self.dim);
        let (pending, state) = rest.split_at_mut(self.dim);
        LineParts {
            base,
            pending,
            state,
        }
    }

    /// Asks the CPU to load what recording `key` with the policy touches.
    pub fn prefetch_policy(&self, key: u64) {
        self.policy.prefetch(key);
    }

    /// Records an access to `key`, a miss, with the policy, before its slot is reserved.
    pub fn record(&mut self, key: u64) {
        self.policy.record(key);
    }

    /// A resident line was hit by lookup `stamp`: the access is recorded with the policy.
    pub fn hit(&mut self, slot: u32, stamp: u64) {
        let key = self.meta[slot as usize].key;
        self.policy.touch(slot, key);
        self.meta[slot as usize].stamp = stamp;
    }

    /// A slot for `key` (a miss of lookup `stamp`, already recorded): a free one, or the policy's
    /// victim, which leaves the index and the policy and is handed back in the slot (unless
    /// lookup `stamp` read or reserved it). `None` when the policy does not admit `key` or there
    /// is no cache.
    pub fn reserve(&mut self, key: u64, stamp: u64) -> Option<Reserved> {
        let (slot, evicted) = match self.free.pop() {
            Some(slot) => (slot, false),
            None => {
                let victim = self.policy.victim(key)?;
                if self.meta[victim as usize].stamp == stamp {
                    return None;
                }
                self.policy.remove(victim);
                self.index.remove(&self.meta[victim as usize].key);
                (victim, true)
            }
        };
        self.meta[slot as usize].stamp = stamp;
        Some(Reserved { slot, evicted })
    }

    /// Empties every slot (its row, pending gradient and state forgotten, its slot free); the
    /// policy forgets the lines but keeps what it counted of keys' popularity.
    pub fn clear(&mut self) {
        for (_, slot) in self.index.drain() {
            self.policy.remove(slot);
            self.meta[slot as usize] = LineMeta::default();
            self.free.push(slot);
        }
        self.born.iter_mut().for_each(|b| *b = 0);
    }

    /// Gives back a reserved slot that was never filled.
    pub fn give_back(&mut self, slot: u32) {
        self.meta[slot as usize].p = 0;
        self.free.push(slot);
    }

    /// Fills a reserved slot with `key`'s row at `version` and its optimizer state: the base is
    /// the row, nothing is pending.
    pub fn fill(&mut self, slot: u32, key: u64, version: u64, row: &[f32], state: &[f32]) {
        let m = &mut self.meta[slot as usize];
        m.key = key;
        m.c_s = version;
        m.p = 0;
        m.own_seen = 0;
        m.foreign_seen = 0;
        m.revalidate = false;
        let line = self.parts_mut(slot);
        line.base.copy_from_slice(row);
        line.pending.fill(0.0);
        line.state.copy_from_slice(state);
        self.index.insert(key, slot);
        self.policy.insert(slot, key);
    }

    /// Asks the CPU to load what a hit of `slot` touches: its bookkeeping and its record in the
    /// policy.
    pub fn prefetch_hit(&self, slot: u32) {
        region::prefetch(std::slice::from_ref(&self.meta[slot as usize]));
        self.policy.prefetch_slot(slot);
    }

    /// Asks the CPU to load what reading a slot's value touches: its bookkeeping and its whole
    /// line (base, pending sum and state, which the value of a line with pending updates is
    /// computed from). Whether anything is pending is not asked first: that would wait for the
    /// bookkeeping to load, and most hit lines have pending updates.
    pub fn prefetch_value(&self, slot: u32) {
        region::prefetch(std::slice::from_ref(&self.meta[slot as usize]));
        self.prefetch_line(slot);
    }

    /// Asks the CPU to load a slot's whole line (what an update touches).
    pub fn prefetch_line(&self, slot: u32) {
        let at = slot as usize * self.stride;
        region::prefetch(&self.values[at..at + self.stride]);
    }

    /// Slots that hold more than `updates` unpushed updates (free slots hold none).
    pub fn dirty_above(&self, updates: u64) -> impl Iterator<Item = u32> + '_ {
        (0..self.capacity as u32).filter(move |&s| self.meta[s as usize].p as u64 > updates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_into_a_full_cache_hands_back_the_victim_in_its_slot() {
        let mut lines = Lines::new(2, 1, 0, PolicyKind::Lru);
        for (stamp, key) in [(1, 10u64), (2, 20)] {
            lines.record(key);
            let r = lines.reserve(key, stamp).unwrap();
            assert!(!r.evicted);
            lines.fill(r.slot, key, 0, &[key as f32], &[]);
        }
        lines.record(30);
        let r = lines.reserve(30, 3).unwrap();
        assert!(r.evicted, "the cache was full");
        // The victim (10, least recently used) is out of the index, its data still in the slot.
        assert_eq!(lines.meta(r.slot).key, 10);
        assert_eq!(lines.slot_of(10), None);
        assert_eq!(lines.parts(r.slot).0, [10.0]);
        lines.fill(r.slot, 30, 5, &[30.0], &[]);
        assert_eq!(lines.slot_of(30), Some(r.slot));
        assert_eq!(
            (lines.meta(r.slot).c_s, lines.parts(r.slot).0),
            (5, &[30.0][..])
        );
        // A line read by the same lookup is never its victim.
        let s20 = lines.slot_of(20).unwrap();
        lines.hit(s20, 4);
        let s30 = lines.slot_of(30).unwrap();
        lines.hit(s30, 4);
        lines.record(40);
        assert!(lines.reserve(40, 4).is_none());
    }

    #[test]
    fn a_cleared_cache_holds_no_key_and_fills_every_slot_again_without_eviction() {
        for policy in [
            PolicyKind::Lru,
            PolicyKind::Lfu,
            PolicyKind::LightLfu { pin_after: 1 },
        ] {
            let mut lines = Lines::new(3, 1, 0, policy).with_births();
            for (stamp, key) in [(1, 10u64), (2, 20), (3, 30)] {
                lines.record(key);
                let r = lines.reserve(key, stamp).unwrap();
                lines.fill(r.slot, key, 7, &[key as f32], &[]);
                lines.set_born(r.slot, 9);
                lines.hit(r.slot, stamp + 10); // light LFU pins a line hit once
            }
            lines.clear();
            assert_eq!(lines.resident(), 0, "{policy:?}");
            assert!([10, 20, 30].iter().all(|&k| lines.slot_of(k).is_none()));
            for (stamp, key) in [(40, 40u64), (50, 50), (60, 60), (70, 70)] {
                lines.record(key);
                if key == 70 {
                    // Full again: a victim among the new lines, none pinned before the clear.
                    assert!(
                        lines.reserve(key, stamp).is_some_and(|r| r.evicted),
                        "{policy:?}"
                    );
                    break;
                }
                let r = lines.reserve(key, stamp).expect("a free slot");
                assert!(!r.evicted, "{policy:?}: nothing to evict after a clear");
                assert_eq!(lines.born(r.slot), 0);
                assert_eq!(lines.meta(r.slot).c_s, 0);
                lines.fill(r.slot, key, 1, &[key as f32], &[]);
            }
        }
    }
}
