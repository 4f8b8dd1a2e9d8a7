//! What one cache knows of each shard's table clock and incarnation: the observations, the claims
//! that let a lookup leave version checks out (check elision, `docs/ARCHITECTURE.md`), and the
//! restarts that make it forget them.

use hetkv_transport::incarnation::{Incarnations, Seen};
use hetkv_transport::wire::Since;

/// What a client knows of one shard's table clock (the updates applied to the table there).
///
/// `clock - own_at` is the *foreign clock*: updates from other clients up to the last observation.
/// A line fetched when the foreign clock was `f` lacks at most `foreign_now - f` updates, so while
/// that stays within `bound + p` its version check can be skipped.
#[derive(Clone, Copy, Debug, Default)]
struct ShardClock {
    observed: bool,
    /// The table clock at the last observation.
    clock: u64,
    /// Updates this cache pushed to the shard and saw acknowledged, in all.
    own: u64,
    /// `own` at the last observation.
    own_at: u64,
    /// Foreign updates between the last two observations: the forecast for the next interval.
    forecast: u64,
}

impl ShardClock {
    fn foreign(&self) -> u64 {
        self.clock.saturating_sub(self.own_at)
    }
}

/// The clocks and incarnations of every shard, as one cache knows them.
#[derive(Debug)]
pub(crate) struct Clocks {
    shards: Vec<ShardClock>,
    /// Each shard's incarnations: the current one and those seen replaced (an answer of one of
    /// them is of a dead daemon's memory).
    incarnations: Vec<Incarnations>,
}

impl Clocks {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: vec![ShardClock::default(); shards],
            incarnations: vec![Incarnations::default(); shards],
        }
    }

    /// The foreign clock of `shard` at the last observation (0 before any).
    pub fn foreign_now(&self, shard: usize) -> u64 {
        self.shards[shard].foreign()
    }

    /// How many foreign updates a line of `shard` fetched at foreign clock `fetched_at`, whose
    /// allowance (read bound plus its unpushed updates) is `allowance`, can still absorb; `None`
    /// when its check cannot be left to the table clock (nothing observed yet, the line is
    /// already out of its allowance, or fewer to spare than the foreign updates forecast for
    /// this interval).
    pub fn slack(&self, shard: usize, allowance: u64, fetched_at: u64) -> Option<u64> {
        let sc = &self.shards[shard];
        if !sc.observed {
            return None;
        }
        let slack = allowance.checked_sub(sc.foreign().saturating_sub(fetched_at))?;
        (slack >= sc.forecast).then_some(slack)
    }

    /// The claim covering checks of `shard` left out with at most `slack` foreign updates to
    /// spare, narrowed into `claim` (made when it is the first).
    pub fn narrow_claim(&self, shard: usize, slack: u64, claim: &mut Option<Since>) {
        let sc = &self.shards[shard];
        let c = claim.get_or_insert(Since {
            clock: sc.clock,
            own: sc.own - sc.own_at,
            max_foreign: slack,
        });
        c.max_foreign = c.max_foreign.min(slack);
    }

    /// Records the table clock `clock` that `shard` reported (read after applying the rows the
    /// request carried, which [`Clocks::pushed`] counted, and before any row it read).
    pub fn observe(&mut self, shard: usize, clock: u64) {
        let sc = &mut self.shards[shard];
        let foreign_now = clock.saturating_sub(sc.own);
        sc.forecast = if sc.observed {
            foreign_now.saturating_sub(sc.foreign())
        } else {
            0
        };
        sc.clock = clock;
        sc.own_at = sc.own;
        sc.observed = true;
    }

    /// `updates` of this cache were applied by `shard`.
    pub fn pushed(&mut self, shard: usize, updates: u64) {
        self.shards[shard].own += updates;
    }

    /// Takes the incarnation of `shard`'s latest answer; on [`Seen::Replaced`] (the shard
    /// restarted) what was known of its table clock is forgotten.
    pub fn observe_incarnation(&mut self, shard: usize, incarnation: u64) -> Seen {
        let seen = self.incarnations[shard].observe(incarnation);
        if let Seen::Replaced { .. } = seen {
            self.shards[shard] = ShardClock::default();
        }
        seen
    }

    /// Whether `incarnation` of `shard` was seen replaced by another.
    pub fn retired(&self, shard: usize, incarnation: u64) -> bool {
        self.incarnations[shard].is_retired(incarnation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_vouched_for_while_the_foreign_updates_fit_its_allowance() {
        let mut c = Clocks::new(1);
        assert_eq!(c.slack(0, 10, 0), None, "nothing observed");
        c.observe(0, 5);
        assert_eq!(c.foreign_now(0), 5);
        // Fetched at foreign clock 2: it lacks at most 3 of an allowance of 10.
        assert_eq!(c.slack(0, 10, 2), Some(7));
        assert_eq!(c.slack(0, 2, 2), None, "out of its allowance");
        // Own pushes are not foreign.
        c.pushed(0, 4);
        c.observe(0, 9);
        assert_eq!(c.foreign_now(0), 5);
        // The claim carries the clock and the own updates since.
        let mut claim = None;
        c.narrow_claim(0, 7, &mut claim);
        c.narrow_claim(0, 3, &mut claim);
        assert_eq!(
            claim,
            Some(Since {
                clock: 9,
                own: 0,
                max_foreign: 3
            })
        );
        // A new incarnation forgets the clock.
        assert_eq!(c.observe_incarnation(0, 7), Seen::First);
        c.observe(0, 9);
        assert_eq!(c.observe_incarnation(0, 8), Seen::Replaced { previous: 7 });
        assert!(
            c.retired(0, 7) && !c.retired(0, 8),
            "the replaced one is retired"
        );
        assert_eq!(c.slack(0, 10, 0), None);
    }
}
