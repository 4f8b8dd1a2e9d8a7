//! What a client remembers of its acknowledged pushes to one shard, to tell after a restart
//! which of them the shard's new incarnation no longer holds. No I/O: the TCP client feeds it
//! acknowledgements and hellos.
//!
//! The account is exact for the last [`REMEMBERED`] pushes the current incarnation acknowledged:
//! a push below the floor the restored shard reports was acknowledged before the checkpoint's
//! copy began (the stream said it was settled in a request the checkpoint's records hold), so
//! the checkpoint holds it; one at or above the floor is held exactly when the restored bitmap
//! says it was applied. Older acknowledged pushes, forgotten here, are counted as of unknown
//! fate: the account then says it is a bound.

use std::collections::VecDeque;

use hetkv_transport::incarnation::{Incarnations, Seen};
use hetkv_transport::wire::AppliedPushes;
use hetkv_transport::Restarts;

/// Acknowledged pushes remembered per shard (16 bytes each).
pub const REMEMBERED: usize = 65_536;

/// The acknowledged pushes of the current incarnation, and what restarts cost so far.
#[derive(Debug, Default)]
pub struct PushLedger {
    /// The incarnations of the hellos: the current one and those replaced.
    incarnations: Incarnations,
    /// What the current incarnation remembered of this client when it said hello.
    remembered: Option<AppliedPushes>,
    /// `(seq, rows)` of the pushes it acknowledged, oldest first.
    acked: VecDeque<(u64, u64)>,
    /// Acknowledged pushes of the current incarnation forgotten here (past [`REMEMBERED`]).
    forgotten: u64,
    restarts: Restarts,
}

impl PushLedger {
    /// A hello from incarnation `incarnation`, which remembers `pushes` of this client. Returns
    /// what the incarnation is to this client: on [`Seen::Replaced`] (a restart) the pushes
    /// acknowledged by the previous one are settled against what the new one holds; a hello of
    /// a retired incarnation changes nothing.
    pub fn greeted(&mut self, incarnation: u64, pushes: Option<AppliedPushes>) -> Seen {
        let seen = self.incarnations.observe(incarnation);
        match seen {
            Seen::Current | Seen::Retired => return seen,
            Seen::First => {}
            Seen::Replaced { .. } => {
                self.restarts.seen += 1;
                let acked = std::mem::take(&mut self.acked);
                for (seq, rows) in acked {
                    self.settle(seq, rows, pushes.as_ref());
                }
                self.restarts.pushes_unknown += std::mem::take(&mut self.forgotten);
            }
        }
        self.remembered = pushes;
        seen
    }

    /// Push `seq` of `rows` rows was acknowledged by incarnation `incarnation`.
    pub fn acknowledged(&mut self, seq: u64, rows: u64, incarnation: u64) {
        if incarnation == self.incarnations.current() {
            if self.acked.len() == REMEMBERED {
                self.acked.pop_front();
                self.forgotten += 1;
            }
            self.acked.push_back((seq, rows));
        } else {
            // An answer of an incarnation already replaced, read late: settle it at once.
            let remembered = self.remembered.clone();
            self.settle(seq, rows, remembered.as_ref());
        }
    }

    fn settle(&mut self, seq: u64, rows: u64, holds: Option<&AppliedPushes>) {
        let held = holds.is_some_and(|h| seq < h.floor || h.contains(seq));
        if !held {
            self.restarts.pushes_rolled_back += 1;
            self.restarts.rows_rolled_back += rows;
        }
    }

    /// What restarts cost so far.
    pub fn restarts(&self) -> Restarts {
        self.restarts
    }

    /// The current incarnation: the last hello's that was not of a retired one.
    pub fn incarnation(&self) -> u64 {
        self.incarnations.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(floor: u64, applied: &[u64]) -> AppliedPushes {
        let mut a = AppliedPushes {
            floor,
            words: Vec::new(),
        };
        for &s in applied {
            a.insert(s).unwrap();
        }
        a
    }

    #[test]
    fn a_restart_counts_the_acknowledged_pushes_the_new_incarnation_lacks() {
        let mut l = PushLedger::default();
        assert_eq!(l.greeted(7, None), Seen::First);
        for seq in 1..=5 {
            l.acknowledged(seq, 10 * seq, 7);
        }
        // The checkpoint held pushes 1, 2 and 4 (out of order, as concurrent pushes apply).
        assert_eq!(
            l.greeted(7, None),
            Seen::Current,
            "the same incarnation again is no restart"
        );
        assert_eq!(
            l.greeted(9, Some(holding(0, &[1, 2, 4]))),
            Seen::Replaced { previous: 7 }
        );
        let r = l.restarts();
        assert_eq!(
            (r.seen, r.pushes_rolled_back, r.rows_rolled_back),
            (1, 2, 30 + 50)
        );
        // A late answer of incarnation 7 for push 6 is rolled back too; one of 9 is kept.
        l.acknowledged(6, 1, 7);
        l.acknowledged(7, 1, 9);
        assert_eq!(l.restarts().pushes_rolled_back, 3);
        // A hello of the dead incarnation (read late) is no restart and changes nothing.
        assert_eq!(l.greeted(7, None), Seen::Retired);
        assert_eq!((l.incarnation(), l.restarts().seen), (9, 1));
        // Restarted empty: nothing is held, everything acknowledged since is rolled back.
        assert_eq!(l.greeted(11, None), Seen::Replaced { previous: 9 });
        assert_eq!(l.restarts().pushes_rolled_back, 4);
        assert_eq!(l.restarts().seen, 2);
    }

    #[test]
    fn pushes_below_the_restored_floor_are_held_by_the_checkpoint() {
        let mut l = PushLedger::default();
        l.greeted(1, None);
        l.acknowledged(3, 1, 1);
        l.acknowledged(20, 1, 1);
        l.acknowledged(21, 1, 1);
        l.greeted(2, Some(holding(10, &[20])));
        let r = l.restarts();
        assert_eq!(
            (r.pushes_unknown, r.pushes_rolled_back),
            (0, 1),
            "3 is below the floor (held), 20 applied, 21 not"
        );
    }

    #[test]
    fn past_what_it_remembers_the_account_says_it_is_a_bound() {
        let mut l = PushLedger::default();
        l.greeted(1, None);
        for seq in 0..(REMEMBERED as u64 + 100) {
            l.acknowledged(seq, 1, 1);
        }
        l.greeted(2, None);
        let r = l.restarts();
        assert_eq!(r.pushes_rolled_back, REMEMBERED as u64);
        assert_eq!(
            r.pushes_unknown, 100,
            "the forgotten ones are counted as unknown"
        );
    }
}
