//! One shard's incarnations as one observer knows them: the one it answers as now, and those seen
//! replaced. The rule every observer of restarts follows (the TCP client's restart account, the
//! cache's clocks) lives here.
//!
//! A daemon draws its incarnation at random when it starts (DESIGN section 7), so an incarnation
//! never comes back: once another has answered, an answer of the old one is of a dead daemon (its
//! frozen shared memory, or a reply read late) and must not move the observer back to it.

/// How many replaced incarnations one observer remembers, per shard.
pub const RETIRED: usize = 16;

/// What an observed incarnation is to the observer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Nothing to learn: the current incarnation, or 0 (an answer that carries none).
    Current,
    /// The first incarnation observed.
    First,
    /// A new incarnation replaced `previous`: the shard restarted.
    Replaced {
        /// The incarnation it replaced, now retired.
        previous: u64,
    },
    /// An incarnation already seen replaced: a dead daemon's. The current one stays.
    Retired,
}

/// The current incarnation of one shard and the last [`RETIRED`] it replaced.
#[derive(Clone, Debug, Default)]
pub struct Incarnations {
    current: u64,
    /// Replaced incarnations, oldest first.
    retired: Vec<u64>,
}

impl Incarnations {
    /// The incarnation observed last that was not retired (0 before any).
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Takes the incarnation of an answer.
    pub fn observe(&mut self, incarnation: u64) -> Seen {
        if incarnation == 0 || incarnation == self.current {
            return Seen::Current;
        }
        if self.is_retired(incarnation) {
            return Seen::Retired;
        }
        let previous = std::mem::replace(&mut self.current, incarnation);
        if previous == 0 {
            return Seen::First;
        }
        if self.retired.len() == RETIRED {
            self.retired.remove(0);
        }
        self.retired.push(previous);
        Seen::Replaced { previous }
    }

    /// Whether `incarnation` was seen replaced.
    pub fn is_retired(&self, incarnation: u64) -> bool {
        incarnation != 0 && self.retired.contains(&incarnation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incarnation_once_replaced_never_becomes_current_again() {
        let mut i = Incarnations::default();
        assert_eq!(i.observe(0), Seen::Current, "no incarnation carried");
        assert_eq!(i.observe(7), Seen::First);
        assert_eq!(i.observe(7), Seen::Current);
        assert_eq!(i.observe(9), Seen::Replaced { previous: 7 });
        assert_eq!(
            i.observe(7),
            Seen::Retired,
            "a late answer of the dead daemon"
        );
        assert_eq!(i.current(), 9, "the late answer moved nothing");
        assert!(i.is_retired(7) && !i.is_retired(9) && !i.is_retired(0));
    }

    #[test]
    fn the_oldest_retired_incarnations_are_forgotten_first() {
        let mut i = Incarnations::default();
        for n in 1..=(RETIRED as u64 + 2) {
            i.observe(n);
        }
        // Current: RETIRED + 2; retired: 2 ..= RETIRED + 1 (1 forgotten).
        assert!(!i.is_retired(1) && i.is_retired(2) && i.is_retired(RETIRED as u64 + 1));
        assert_eq!(
            i.observe(1),
            Seen::Replaced {
                previous: RETIRED as u64 + 2
            }
        );
    }
}
