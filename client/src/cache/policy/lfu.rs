//! Least frequently used, with frequencies that outlive residency, and optional pinning (HET's
//! "light LFU").
//!
//! Lines sit in one of 64 frequency buckets (capped at 63), each a list in the order lines
//! entered it; a bitmap of non-empty buckets finds the lowest in O(1). The victim is the line of
//! the lowest frequency that entered its bucket first. A miss whose estimated frequency is below
//! the victim's is not admitted.
//!
//! Who counts what: the sketch counts the accesses of keys that are not resident; a resident
//! line counts its own hits in its record (it enters with the sketch's estimate of its key, and
//! each hit adds one), and hands its count back to the sketch when it leaves
//! ([`FrequencySketch::raise`]), so a popular key that is evicted keeps its history. A hit thus
//! touches the line's 16-byte record and nothing else (the sketch's counters are a cache miss of
//! their own); every access still advances the sketch's aging.
//!
//! Buckets are kept lazily: a hit only records the line's new frequency, and a line moves to the
//! bucket of its frequency when the search for a victim finds it at the head of a lower one. A
//! line's frequency never falls between two halvings (it only grows, and a halving moves every
//! line), so no line sits in a bucket above its frequency and the lowest bucket whose head is in
//! place holds the least frequent line. Each move the search makes pays for a hit that skipped
//! it.
//!
//! Why a sketch: HET's LFU counted hits only while a line was resident, so every new line entered
//! with the lowest count and was the next victim; within a batch each new miss evicted the previous
//! one and the contents froze (68.4% hits where the best static cache gets 77.3%). Counting every
//! access, resident or not, lets a popular key that was evicted or never admitted earn its way in.

use super::links::{Links, List, NIL};
use super::EvictionPolicy;
use hetkv_transport::sketch::FrequencySketch;

const BUCKETS: usize = 64;
/// The sketch halves every `AGING_PERIOD x capacity` accesses. Embedding popularity drifts slowly,
/// so aging is slow: on the reference Zipf workload at 10% (`hetkv-bench cache-sweep`), 10x
/// (TinyLFU's default) hit 71.7% and 100x 72.2%, against 72.5% for exact, never-aged counts.
const AGING_PERIOD: u64 = 100;
/// Largest share of the capacity that may be pinned.
const MAX_PINNED: f64 = 0.9;

/// What the policy keeps of one slot, in one 16-byte record so that a hit loads one.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: u64,
    hits: u32,
    /// The line's frequency (its estimate when last counted, capped at 63).
    freq: u8,
    /// The bucket whose list holds the line: at most `freq`.
    bucket: u8,
    pinned: bool,
    resident: bool,
}

/// LFU (and light LFU) over slots.
#[derive(Clone, Debug)]
pub struct Lfu {
    links: Links,
    buckets: [List; BUCKETS],
    nonempty: u64,
    slots: Vec<Slot>,
    sketch: FrequencySketch,
    pin_after: Option<u32>,
    pinned_count: usize,
    max_pinned: usize,
}

impl Lfu {
    /// An empty policy for `capacity` slots; `pin_after` enables pinning.
    pub fn new(capacity: usize, pin_after: Option<u32>) -> Self {
        Self {
            links: Links::new(capacity),
            buckets: [List::EMPTY; BUCKETS],
            nonempty: 0,
            slots: vec![Slot::default(); capacity],
            sketch: FrequencySketch::new(capacity, AGING_PERIOD * capacity.max(64) as u64),
            pin_after,
            pinned_count: 0,
            max_pinned: (capacity as f64 * MAX_PINNED) as usize,
        }
    }

    fn frequency(&self, key: u64) -> u8 {
        self.sketch.estimate(key).min(BUCKETS as u8 - 1)
    }

    fn link(&mut self, slot: u32, freq: u8) {
        let b = freq as usize;
        let s = &mut self.slots[slot as usize];
        (s.freq, s.bucket) = (freq, freq);
        self.links.push_back(&mut self.buckets[b], slot);
        self.nonempty |= 1 << b;
    }

    fn unlink(&mut self, slot: u32) {
        let b = self.slots[slot as usize].bucket as usize;
        self.links.unlink(&mut self.buckets[b], slot);
        if self.buckets[b].is_empty() {
            self.nonempty &= !(1 << b);
        }
    }

    /// After the sketch halves, every unpinned line's count halves with it and the line moves to
    /// its new bucket. O(capacity) once per `AGING_PERIOD x capacity` accesses.
    fn rebucket(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            let s = self.slots[slot as usize];
            if s.resident && !s.pinned {
                self.unlink(slot);
                self.link(slot, s.freq >> 1);
            }
        }
    }
}

impl Lfu {
    /// The line of the lowest frequency that entered its bucket first, moving the lines that
    /// the search finds out of place (see the module's doc) into their buckets.
    fn lowest(&mut self) -> Option<(u32, usize)> {
        loop {
            if self.nonempty == 0 {
                return None;
            }
            let lowest = self.nonempty.trailing_zeros() as usize;
            let slot = self.buckets[lowest].head;
            debug_assert_ne!(slot, NIL);
            let freq = self.slots[slot as usize].freq;
            if freq as usize == lowest {
                return Some((slot, lowest));
            }
            self.unlink(slot);
            self.link(slot, freq);
        }
    }
}

impl EvictionPolicy for Lfu {
    fn prefetch(&self, key: u64) {
        self.sketch.prefetch(key);
    }

    fn record(&mut self, key: u64) {
        if self.sketch.increment(key) {
            self.rebucket();
        }
    }

    fn touch(&mut self, slot: u32, _key: u64) {
        if self.sketch.tick() {
            self.rebucket();
        }
        let s = &mut self.slots[slot as usize];
        if s.pinned {
            return;
        }
        s.hits = s.hits.saturating_add(1);
        s.freq = (s.freq + 1).min(BUCKETS as u8 - 1);
        if let Some(k) = self.pin_after {
            if s.hits >= k && self.pinned_count < self.max_pinned {
                self.unlink(slot);
                self.slots[slot as usize].pinned = true;
                self.pinned_count += 1;
            }
        }
    }

    fn insert(&mut self, slot: u32, key: u64) {
        let s = &mut self.slots[slot as usize];
        s.key = key;
        s.hits = 0;
        s.resident = true;
        let f = self.frequency(key);
        self.link(slot, f);
    }

    fn remove(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if s.pinned {
            s.pinned = false;
            self.pinned_count -= 1;
        } else {
            self.unlink(slot);
        }
        let s = &mut self.slots[slot as usize];
        s.resident = false;
        // The line's count goes back to the sketch, which counts the key from now on.
        let (key, freq) = (s.key, s.freq);
        self.sketch.raise(key, freq);
    }

    fn prefetch_slot(&self, slot: u32) {
        hetkv_transport::region::prefetch(std::slice::from_ref(&self.slots[slot as usize]));
    }

    fn victim(&mut self, key: u64) -> Option<u32> {
        let (slot, lowest) = self.lowest()?;
        (self.frequency(key) as usize >= lowest).then_some(slot)
    }

    fn order(&self) -> Vec<u32> {
        let mut rest = self.clone();
        std::iter::from_fn(|| {
            let (slot, _) = rest.lowest()?;
            rest.remove(slot);
            Some(slot)
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_frequent_and_refuses_rarer_newcomers() {
        let mut p = Lfu::new(3, None);
        for (slot, key, accesses) in [(0u32, 10u64, 5), (1, 11, 1), (2, 12, 3)] {
            for _ in 0..accesses {
                p.record(key);
            }
            p.insert(slot, key);
        }
        assert_eq!(p.order(), vec![1, 2, 0]);
        // Key 99 seen once: ties with key 11 (frequency 1), so it may replace it.
        p.record(99);
        assert_eq!(p.victim(99), Some(1));
        p.remove(1);
        p.insert(1, 99);
        // Key 98 never seen before this access, key 99 and the rest seen at least once: a new key
        // seen once ties with 99 and the least recent of the tie goes.
        p.record(98);
        assert_eq!(p.victim(98), Some(1));
        // A key seen zero times (not even recorded) is not admitted over a line seen once.
        assert_eq!(p.victim(97), None);
    }

    #[test]
    fn a_hit_lifts_a_line_in_place_and_the_search_for_a_victim_moves_it() {
        let mut p = Lfu::new(3, None);
        for (slot, key) in [(0u32, 10u64), (1, 11), (2, 12)] {
            p.record(key);
            p.insert(slot, key);
        }
        // Slot 0, first in bucket 1, is hit twice: its frequency is 3, its list still bucket 1's.
        p.touch(0, 10);
        p.touch(0, 10);
        assert_eq!((p.slots[0].freq, p.slots[0].bucket), (3, 1));
        assert_eq!(
            p.order(),
            vec![1, 2, 0],
            "the order is by frequency all the same"
        );
        // The search passes it (moving it to bucket 3) and finds the least frequent line.
        p.record(13);
        assert_eq!(p.victim(13), Some(1));
        assert_eq!((p.slots[0].freq, p.slots[0].bucket), (3, 3));
        p.remove(1);
        p.insert(1, 13);
        assert_eq!(p.order(), vec![2, 1, 0]);
    }

    #[test]
    fn a_line_counts_its_hits_and_hands_the_count_back_when_it_leaves() {
        let mut p = Lfu::new(1, None);
        p.record(1);
        p.insert(0, 1);
        for _ in 0..10 {
            p.touch(0, 1);
        }
        assert_eq!(p.slots[0].freq, 11);
        assert_eq!(
            p.sketch.estimate(1),
            1,
            "hits of a resident line stay in its record"
        );
        p.remove(0);
        assert_eq!(
            p.frequency(1),
            11,
            "the sketch knows the key's count from now on"
        );
        // So the key, back as a newcomer, wins over a line seen less often.
        p.record(2);
        p.insert(0, 2);
        p.record(1);
        assert_eq!(p.victim(1), Some(0));
    }

    #[test]
    fn a_newcomer_does_not_evict_the_previous_newcomer_of_equal_frequency() {
        // HET's freeze: with in-cache counts, each new miss evicted the previous new miss. Here the
        // least recently used line of the lowest bucket goes, which is the older one.
        let mut p = Lfu::new(2, None);
        p.record(1);
        p.insert(0, 1);
        p.record(2);
        p.insert(1, 2);
        p.record(3);
        assert_eq!(p.victim(3), Some(0), "the older of two equal lines");
    }

    #[test]
    fn light_lfu_pins_after_k_hits_and_never_evicts_pinned_lines() {
        let mut p = Lfu::new(10, Some(2));
        p.record(5);
        p.insert(0, 5);
        p.record(6);
        p.insert(1, 6);
        for _ in 0..2 {
            p.record(5);
            p.touch(0, 5);
        }
        assert_eq!(
            p.order(),
            vec![1],
            "slot 0 is pinned and out of the eviction order"
        );
        for _ in 0..50 {
            p.record(7);
        }
        assert_eq!(p.victim(7), Some(1));
        p.remove(0);
        assert_eq!(p.pinned_count, 0);
    }

    #[test]
    fn halving_rebuckets_resident_lines() {
        let mut p = Lfu::new(1, None); // halves every 6,400 additions
        for _ in 0..40 {
            p.record(1);
        }
        p.insert(0, 1);
        assert_eq!(p.slots[0].freq, 40);
        for k in 0..6360 {
            p.record(1000 + k);
        }
        assert_eq!(p.slots[0].freq, 20, "halved with the sketch");
    }
}
