//! What a client remembers of its acknowledged pushes to one shard, to tell after a restart
//! which of them the shard's new incarnation no longer holds. No I/O: the TCP client feeds it
//! acknowledgements and hellos.

use std::collections::VecDeque;

use hetkv_transport::wire::AppliedPushes;
use hetkv_transport::Restarts;

/// Acknowledged pushes remembered (the shards remember as many applied numbers per client).
pub const REMEMBERED: usize = 4096;

/// The acknowledged pushes of the current incarnation, and what restarts cost so far.
#[derive(Debug, Default)]
pub struct PushLedger {
    /// The incarnation of the last hello (0 before any).
    incarnation: u64,
    /// What that incarnation remembered of this client when it said hello.
    remembered: Option<AppliedPushes>,
    /// `(seq, rows)` of the pushes it acknowledged, oldest first.
    acked: VecDeque<(u64, u64)>,
    restarts: Restarts,
}

impl PushLedger {
    /// A hello from incarnation `incarnation`, which remembers `pushes` of this client. Returns
    /// true when it is a new incarnation (a restart, after the first hello): the pushes
    /// acknowledged by the previous one are then settled against what the new one holds.
    pub fn greeted(&mut self, incarnation: u64, pushes: Option<AppliedPushes>) -> bool {
        if incarnation == self.incarnation {
            return false;
        }
        let restart = self.incarnation != 0;
        if restart {
            self.restarts.seen += 1;
            let acked = std::mem::take(&mut self.acked);
            for (seq, rows) in acked {
                self.settle(seq, rows, pushes.as_ref());
            }
        }
        self.incarnation = incarnation;
        self.remembered = pushes;
        restart
    }

    /// Push `seq` of `rows` rows was acknowledged by incarnation `incarnation`.
    pub fn acknowledged(&mut self, seq: u64, rows: u64, incarnation: u64) {
        if incarnation == self.incarnation {
            if self.acked.len() == REMEMBERED {
                self.acked.pop_front();
            }
            self.acked.push_back((seq, rows));
        } else {
            // An answer of an incarnation already replaced, read late: settle it at once.
            let remembered = self.remembered.clone();
            self.settle(seq, rows, remembered.as_ref());
        }
    }

    fn settle(&mut self, seq: u64, rows: u64, holds: Option<&AppliedPushes>) {
        let floor = holds.map_or(0, |h| h.floor);
        if seq < floor {
            self.restarts.pushes_unknown += 1;
        } else if holds.is_none_or(|h| h.applied.binary_search(&seq).is_err()) {
            self.restarts.pushes_rolled_back += 1;
            self.restarts.rows_rolled_back += rows;
        }
    }

    /// What restarts cost so far.
    pub fn restarts(&self) -> Restarts {
        self.restarts
    }

    /// The incarnation of the last hello.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_counts_the_acknowledged_pushes_the_new_incarnation_lacks() {
        let mut l = PushLedger::default();
        assert!(!l.greeted(7, None));
        for seq in 1..=5 {
            l.acknowledged(seq, 10 * seq, 7);
        }
        // The checkpoint held pushes 1, 2 and 4 (out of order, as concurrent pushes apply).
        let held = AppliedPushes {
            floor: 0,
            applied: vec![1, 2, 4],
        };
        assert!(
            !l.greeted(7, None),
            "the same incarnation again is no restart"
        );
        assert!(l.greeted(9, Some(held)));
        let r = l.restarts();
        assert_eq!(
            (r.seen, r.pushes_rolled_back, r.rows_rolled_back),
            (1, 2, 30 + 50)
        );
        // A late answer of incarnation 7 for push 6 is rolled back too; one of 9 is kept.
        l.acknowledged(6, 1, 7);
        l.acknowledged(7, 1, 9);
        assert_eq!(l.restarts().pushes_rolled_back, 3);
        // Restarted empty: nothing is held, everything acknowledged since is rolled back.
        assert!(l.greeted(11, None));
        assert_eq!(l.restarts().pushes_rolled_back, 4);
        assert_eq!(l.restarts().seen, 2);
    }

    #[test]
    fn pushes_below_what_the_shard_remembers_are_unknown() {
        let mut l = PushLedger::default();
        l.greeted(1, None);
        l.acknowledged(3, 1, 1);
        l.acknowledged(20, 1, 1);
        l.greeted(
            2,
            Some(AppliedPushes {
                floor: 10,
                applied: vec![20],
            }),
        );
        let r = l.restarts();
        assert_eq!((r.pushes_unknown, r.pushes_rolled_back), (1, 0));
    }

    #[test]
    fn at_most_the_remembered_number_are_kept() {
        let mut l = PushLedger::default();
        l.greeted(1, None);
        for seq in 0..(REMEMBERED as u64 + 100) {
            l.acknowledged(seq, 1, 1);
        }
        l.greeted(2, None);
        assert_eq!(l.restarts().pushes_rolled_back, REMEMBERED as u64);
    }
}
