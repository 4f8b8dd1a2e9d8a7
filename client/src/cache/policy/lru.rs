//! Least recently used: one list, most recent at the tail.

use super::links::{Links, List};
use super::EvictionPolicy;

/// LRU over slots.
#[derive(Debug)]
pub struct Lru {
    links: Links,
    list: List,
}

impl Lru {
    /// An empty policy for `capacity` slots.
    pub fn new(capacity: usize) -> Self {
        Self {
            links: Links::new(capacity),
            list: List::EMPTY,
        }
    }
}

impl EvictionPolicy for Lru {
    fn prefetch_slot(&self, slot: u32) {
        self.links.prefetch(slot);
    }

    fn record(&mut self, _key: u64) {}

    fn touch(&mut self, slot: u32, _key: u64) {
        self.links.unlink(&mut self.list, slot);
        self.links.push_back(&mut self.list, slot);
    }

    fn insert(&mut self, slot: u32, _key: u64) {
        self.links.push_back(&mut self.list, slot);
    }

    fn remove(&mut self, slot: u32) {
        self.links.unlink(&mut self.list, slot);
    }

    fn victim(&mut self, _key: u64) -> Option<u32> {
        (!self.list.is_empty()).then_some(self.list.head)
    }

    fn order(&self) -> Vec<u32> {
        self.links.iter(&self.list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut p = Lru::new(3);
        for s in 0..3 {
            p.insert(s, s as u64);
        }
        p.touch(0, 0);
        assert_eq!(p.order(), vec![1, 2, 0]);
        assert_eq!(p.victim(9), Some(1));
        p.remove(1);
        p.insert(1, 9);
        assert_eq!(p.order(), vec![2, 0, 1]);
    }
}
