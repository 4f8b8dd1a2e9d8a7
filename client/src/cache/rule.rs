//! Update rules: how a worker's updates of a key count, in its own line between pushes and in
//! what it pushes. They are learning rules, apart from the consistency protocol (as eviction
//! policies are apart from storage): whatever the rule, versions count every update once, the
//! bounds hold, and a line's value is the shard's row as fetched (or produced by a push) plus
//! what the rule adds for the updates not yet pushed. A push clears that part by construction:
//! the line then takes the row its push produces.
//!
//! The default, [`UpdateRuleKind::PushWhole`], is the semantics HET defines: each worker's
//! gradients are pushed whole and applied by the shards' optimizer, and a line shows what the
//! shards would hold after its own unpushed updates. The others are training heuristics, kept
//! only where they measurably beat it (docs/BENCHMARKS.md, "Update rules").

use hetkv_transport::Optimizer;

/// What a rule may weigh a line's push by: its unpushed updates and its share of the key's
/// updates since it was fetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineShare {
    /// Updates in the push.
    pub p: u32,
    /// This cache's updates of the key since its line was fetched.
    pub own: u64,
    /// Other workers' updates of the key learnt since (at refreshes and from produced rows).
    pub foreign: u64,
}

/// The row a line starts from and what is pending on it.
#[derive(Debug)]
pub struct LocalStep<'a> {
    /// The table's optimizer.
    pub optimizer: &'a Optimizer,
    /// The shard's row the line holds (as fetched, or as its last push produced).
    pub base: &'a [f32],
    /// The optimizer state of that row.
    pub state: &'a [f32],
    /// Its step count (Adam).
    pub step: u64,
    /// The gradient sum of the updates not yet pushed.
    pub pending: &'a [f32],
}

impl LocalStep<'_> {
    /// Writes into `value` the row the shards produce when `pending` is pushed whole and nothing
    /// else comes between: one step of the table's optimizer from the base row and its state
    /// ([`Optimizer::preview`], the bits of the shard's own step).
    pub fn whole(&self, value: &mut [f32]) {
        self.optimizer
            .preview(self.base, self.pending, self.state, self.step, value);
    }
}

/// How a worker's updates of a key count (see the module's documentation).
pub trait UpdateRule: Send + Sync + std::fmt::Debug {
    /// The rule's name, as the trainer's `--update-rule` and Python's `update_rule=` spell it.
    fn name(&self) -> String;

    /// The factor a pushed gradient sum is multiplied by: of a line (`Some`, with its share), or
    /// of a key written through without a line (`None`). 1 pushes it whole.
    fn push_weight(&self, line: Option<LineShare>) -> f32;

    /// Writes the value a line with pending updates shows into `value` (a line with none shows
    /// its base). The default is what the shards produce when the pending sum is pushed whole
    /// ([`LocalStep::whole`]).
    fn local_value(&self, step: &LocalStep<'_>, value: &mut [f32]) {
        step.whole(value);
    }
}

/// The rules a cache can be built with.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum UpdateRuleKind {
    /// Gradients pushed whole and applied by the shards' optimizer; a line shows its own pending
    /// updates taken by that optimizer (HET's semantics; after a flush a lone worker's lines
    /// equal the shards' rows, and at bounds 0 a cached run is the no-cache run).
    #[default]
    PushWhole,
    /// Pushes weighted by the line's share of the key's updates: a line pushing `p` updates
    /// multiplies their sum by `1/p + share x (1 - 1/p)`, `share = (own + 1) / (own + foreign
    /// + 1)`. The first local step is summed, as synchronous SGD sums workers' gradients; the
    /// other `p - 1` count by share, so a key that W workers train moves by about the mean of
    /// their local progress. Bound 0 (pushes of one update) and one worker are `PushWhole`.
    ShareWeighted,
    /// Every push (lines and write-throughs) multiplied by `factor`: with `1 / workers`, for
    /// parameters every worker updates, the shards' copy moves by the mean of the workers'
    /// progress (local SGD with periodic model averaging, the period being the write bound).
    PushScaled {
        /// The factor, above 0.
        factor: f32,
    },
}

impl std::fmt::Display for UpdateRuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PushWhole => write!(f, "push-whole"),
            Self::ShareWeighted => write!(f, "share-weighted"),
            Self::PushScaled { factor } => write!(f, "push-scaled:{factor}"),
        }
    }
}

impl std::str::FromStr for UpdateRuleKind {
    type Err = String;

    /// `push-whole`, `share-weighted` or `push-scaled:F` (F finite and above 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "push-whole" => Ok(Self::PushWhole),
            "share-weighted" => Ok(Self::ShareWeighted),
            _ => s
                .strip_prefix("push-scaled:")
                .and_then(|f| f.parse::<f32>().ok())
                .filter(|f| f.is_finite() && *f > 0.0)
                .map(|factor| Self::PushScaled { factor })
                .ok_or_else(|| {
                    format!(
                        "unknown update rule {s:?}: push-whole, share-weighted or push-scaled:F \
                         (F finite and above 0)"
                    )
                }),
        }
    }
}

impl UpdateRuleKind {
    /// The rule.
    pub fn build(self) -> Box<dyn UpdateRule> {
        match self {
            Self::PushWhole => Box::new(PushWhole),
            Self::ShareWeighted => Box::new(ShareWeighted),
            Self::PushScaled { factor } => Box::new(PushScaled(factor)),
        }
    }
}

/// [`UpdateRuleKind::PushWhole`].
#[derive(Clone, Copy, Debug)]
pub struct PushWhole;

impl UpdateRule for PushWhole {
    fn name(&self) -> String {
        UpdateRuleKind::PushWhole.to_string()
    }

    fn push_weight(&self, _line: Option<LineShare>) -> f32 {
        1.0
    }
}

/// [`UpdateRuleKind::ShareWeighted`].
#[derive(Clone, Copy, Debug)]
pub struct ShareWeighted;

impl UpdateRule for ShareWeighted {
    fn name(&self) -> String {
        UpdateRuleKind::ShareWeighted.to_string()
    }

    fn push_weight(&self, line: Option<LineShare>) -> f32 {
        let Some(line) = line.filter(|l| l.p > 1) else {
            return 1.0;
        };
        let own = line.own as f64 + 1.0;
        let share = own / (own + line.foreign as f64);
        let first = 1.0 / line.p as f64;
        (first + share * (1.0 - first)) as f32
    }
}

/// [`UpdateRuleKind::PushScaled`].
#[derive(Clone, Copy, Debug)]
pub struct PushScaled(f32);

impl UpdateRule for PushScaled {
    fn name(&self) -> String {
        UpdateRuleKind::PushScaled { factor: self.0 }.to_string()
    }

    fn push_weight(&self, _line: Option<LineShare>) -> f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetkv_transport::OptimizerSpec;

    #[test]
    fn share_weighting_counts_the_first_update_whole_and_the_rest_by_share() {
        let rule = ShareWeighted;
        // share = (3 own + 1) / (3 + 1 + 9 foreign) = 4/13; weight = 1/3 + 4/13 x 2/3.
        let w = rule.push_weight(Some(LineShare {
            p: 3,
            own: 3,
            foreign: 9,
        }));
        assert!((w - 21.0 / 39.0).abs() < 1e-6, "{w}");
        // One update, no foreign ones, or a write-through: whole.
        for line in [
            Some(LineShare {
                p: 1,
                own: 5,
                foreign: 50,
            }),
            Some(LineShare {
                p: 4,
                own: 4,
                foreign: 0,
            }),
            None,
        ] {
            assert_eq!(rule.push_weight(line), 1.0, "{line:?}");
        }
    }

    #[test]
    fn the_local_value_is_the_optimizer_s_step_of_the_pending_sum_from_the_base() {
        let opt = Optimizer::new(OptimizerSpec::Adagrad {
            lr: 1.0,
            eps: 0.0,
            initial_accumulator: 0.0,
        });
        let step = LocalStep {
            optimizer: &opt,
            base: &[1.0],
            state: &[3.0],
            step: 0,
            pending: &[1.0],
        };
        let mut value = [0f32];
        PushWhole.local_value(&step, &mut value);
        // acc 3 + 1 = 4: 1 - 1 / 2.
        assert_eq!(value, [0.5]);
        assert_eq!(step.state, [3.0], "the line's base state is not changed");
    }

    #[test]
    fn rules_parse_from_their_names() {
        for kind in [
            UpdateRuleKind::PushWhole,
            UpdateRuleKind::ShareWeighted,
            UpdateRuleKind::PushScaled { factor: 0.25 },
        ] {
            assert_eq!(kind.to_string().parse::<UpdateRuleKind>(), Ok(kind));
            assert_eq!(kind.build().name(), kind.to_string());
        }
        for bad in ["summed", "push-scaled:0", "push-scaled:nan", "push-scaled:"] {
            assert!(bad.parse::<UpdateRuleKind>().is_err(), "{bad}");
        }
    }
}
