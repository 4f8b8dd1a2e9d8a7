//! The optimizers' maths, one step of one row, shared by the shard that applies pushes and the
//! cache that mirrors them between pushes (DESIGN sections 3 and 5).
//!
//! All are sparse: only pushed rows change. One pushed entry `(key, count, gradient sum)` is one
//! optimizer step with the summed gradient; the row's version grows by `count`. For SGD that equals
//! `count` sequential steps (up to float reassociation); for the others it is one step with the
//! sum, as HET's server takes for an accumulated gradient (docs/ARCHITECTURE.md, "Push
//! semantics", says what that means at a write bound). Adam is lazy: its moments and its step
//! count are per row and advance only when the row is pushed.
//!
//! Every operation here is IEEE-754 arithmetic in a fixed order (no library `pow`, whose last bit
//! may differ between builds), so a client and a daemon built from this code compute the same
//! bits from the same row, state and gradient: a cache line that takes its own pending updates
//! with [`Optimizer::apply`] holds exactly the row the shard will produce from them.

use crate::spec::OptimizerSpec;

/// The shape of one row's optimizer state: `len` f32 values and, for optimizers that count steps
/// (Adam), a u64 step count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateShape {
    /// f32 values per row.
    pub len: usize,
    /// Whether a u64 step count comes with them.
    pub steps: bool,
}

impl StateShape {
    /// No state (SGD).
    pub const NONE: Self = Self {
        len: 0,
        steps: false,
    };

    /// Bytes one row's state takes on the wire.
    pub fn bytes(&self) -> usize {
        4 * self.len + if self.steps { 8 } else { 0 }
    }

    /// Whether there is no state at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0 && !self.steps
    }
}

/// An optimizer and the layout of its per-row state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimizer {
    spec: OptimizerSpec,
}

impl Optimizer {
    /// The optimizer of a (validated) spec.
    pub fn new(spec: OptimizerSpec) -> Self {
        Self { spec }
    }

    /// The spec.
    pub fn spec(&self) -> OptimizerSpec {
        self.spec
    }

    /// f32 state values per row for rows of `dim`: none (SGD), one accumulator per element
    /// (Adagrad), one per row (row-wise Adagrad), two moments per element (Adam).
    pub fn state_len(&self, dim: usize) -> usize {
        match self.spec {
            OptimizerSpec::Sgd { .. } => 0,
            OptimizerSpec::Adagrad { .. } => dim,
            OptimizerSpec::RowwiseAdagrad { .. } => 1,
            OptimizerSpec::Adam { .. } => 2 * dim,
        }
    }

    /// The shape of a row's state for rows of `dim`.
    pub fn state_shape(&self, dim: usize) -> StateShape {
        StateShape {
            len: self.state_len(dim),
            steps: self.has_steps(),
        }
    }

    /// Whether rows carry a step count (Adam's bias correction).
    pub fn has_steps(&self) -> bool {
        matches!(self.spec, OptimizerSpec::Adam { .. })
    }

    /// Whether a step depends on anything but the row and the gradient: whether a client that
    /// mirrors the step needs the row's state.
    pub fn has_state(&self) -> bool {
        !matches!(self.spec, OptimizerSpec::Sgd { .. })
    }

    /// The initial state of one row.
    pub fn init_state(&self, state: &mut [f32]) {
        match self.spec {
            OptimizerSpec::Adagrad {
                initial_accumulator,
                ..
            }
            | OptimizerSpec::RowwiseAdagrad {
                initial_accumulator,
                ..
            } => state.fill(initial_accumulator),
            _ => state.fill(0.0),
        }
    }

    /// Checks one row's state (of [`Self::state_len`] values) before it is set: every value
    /// finite, and the ones a step takes a square root of (Adagrad's accumulators, Adam's second
    /// moments) not negative. The error names the first value refused and its element.
    pub fn check_state(&self, state: &[f32]) -> Result<(), String> {
        if let Some(at) = state.iter().position(|v| !v.is_finite()) {
            return Err(format!("state element {at} is {}", state[at]));
        }
        let squares = match self.spec {
            OptimizerSpec::Sgd { .. } => 0..0,
            OptimizerSpec::Adagrad { .. } | OptimizerSpec::RowwiseAdagrad { .. } => 0..state.len(),
            OptimizerSpec::Adam { .. } => state.len() / 2..state.len(),
        };
        match squares.into_iter().find(|&i| state[i] < 0.0) {
            Some(at) => Err(format!(
                "state element {at} is {}, and a {} must not be negative",
                state[at],
                if matches!(self.spec, OptimizerSpec::Adam { .. }) {
                    "second moment"
                } else {
                    "squared-gradient accumulator"
                }
            )),
            None => Ok(()),
        }
    }

    /// Applies one step with gradient `g` to row `w`, updating its `state` (of
    /// [`Self::state_len`]) and `step` count.
    pub fn apply(&self, w: &mut [f32], g: &[f32], state: &mut [f32], step: &mut u64) {
        debug_assert_eq!(w.len(), g.len());
        match self.spec {
            OptimizerSpec::Sgd { lr } => {
                for (w, g) in w.iter_mut().zip(g) {
                    *w = sgd(*w, *g, lr);
                }
            }
            OptimizerSpec::Adagrad { lr, eps, .. } => {
                for ((w, g), acc) in w.iter_mut().zip(g).zip(state.iter_mut()) {
                    (*w, *acc) = adagrad(*w, *g, *acc, lr, eps);
                }
            }
            OptimizerSpec::RowwiseAdagrad { lr, eps, .. } => {
                let (acc, scale) = rowwise_scale(g, state[0], lr, eps);
                state[0] = acc;
                for (w, g) in w.iter_mut().zip(g) {
                    *w = sgd(*w, *g, scale);
                }
            }
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                *step = step.saturating_add(1);
                let c = adam_corrections(beta1, beta2, *step);
                let (m, v) = state.split_at_mut(w.len());
                for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    (*w, *m, *v) = adam(*w, *g, *m, *v, lr, beta1, beta2, eps, c);
                }
            }
        }
    }

    /// Writes into `out` the row [`Optimizer::apply`] would make of `base` with gradient `g`,
    /// its `state` and `step` count, leaving them as they are: the same arithmetic, so the same
    /// bits. A cache shows its lines' pending updates this way without copying their state.
    pub fn preview(&self, base: &[f32], g: &[f32], state: &[f32], step: u64, out: &mut [f32]) {
        debug_assert!(base.len() == g.len() && out.len() == g.len());
        match self.spec {
            OptimizerSpec::Sgd { lr } => {
                for ((o, w), g) in out.iter_mut().zip(base).zip(g) {
                    *o = sgd(*w, *g, lr);
                }
            }
            OptimizerSpec::Adagrad { lr, eps, .. } => {
                for (((o, w), g), acc) in out.iter_mut().zip(base).zip(g).zip(state) {
                    *o = adagrad(*w, *g, *acc, lr, eps).0;
                }
            }
            OptimizerSpec::RowwiseAdagrad { lr, eps, .. } => {
                let (_, scale) = rowwise_scale(g, state[0], lr, eps);
                for ((o, w), g) in out.iter_mut().zip(base).zip(g) {
                    *o = sgd(*w, *g, scale);
                }
            }
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let c = adam_corrections(beta1, beta2, step.saturating_add(1));
                let (m, v) = state.split_at(base.len());
                for ((((o, w), g), m), v) in out.iter_mut().zip(base).zip(g).zip(m).zip(v) {
                    *o = adam(*w, *g, *m, *v, lr, beta1, beta2, eps, c).0;
                }
            }
        }
    }
}

// One element of each optimizer's step, shared by `apply` and `preview` so that both compute the
// same operations in the same order.

#[inline(always)]
fn sgd(w: f32, g: f32, lr: f32) -> f32 {
    w - lr * g
}

#[inline(always)]
fn adagrad(w: f32, g: f32, acc: f32, lr: f32, eps: f32) -> (f32, f32) {
    let acc = acc + g * g;
    (w - lr * g / (acc.sqrt() + eps), acc)
}

/// FBGEMM's row-wise Adagrad: one accumulator per row, grown by the mean square of the
/// gradient's elements; returns the new accumulator and the row's step size.
#[inline(always)]
fn rowwise_scale(g: &[f32], acc: f32, lr: f32, eps: f32) -> (f32, f32) {
    let sum_sq = g.iter().fold(0f32, |s, g| s + g * g);
    let acc = acc + sum_sq / g.len().max(1) as f32;
    (acc, lr / (acc.sqrt() + eps))
}

/// Adam's bias corrections `(1 - beta1^t, 1 - beta2^t)` at step `t`.
fn adam_corrections(beta1: f32, beta2: f32, t: u64) -> (f32, f32) {
    (1.0 - power(beta1, t), 1.0 - power(beta2, t))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam(
    w: f32,
    g: f32,
    m: f32,
    v: f32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    (c1, c2): (f32, f32),
) -> (f32, f32, f32) {
    let m = beta1 * m + (1.0 - beta1) * g;
    let v = beta2 * v + (1.0 - beta2) * g * g;
    let m_hat = m / c1;
    let v_hat = v / c2;
    (w - lr * m_hat / (v_hat.sqrt() + eps), m, v)
}

/// `base^n` by squaring in f64, rounded to f32: the same bits on every build (Adam's bias
/// corrections).
fn power(base: f32, mut n: u64) -> f32 {
    let (mut result, mut b) = (1f64, base as f64);
    while n > 0 {
        if n & 1 == 1 {
            result *= b;
        }
        b *= b;
        n >>= 1;
    }
    result as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_to_set_is_checked_where_a_step_would_go_wrong() {
        let adagrad = Optimizer::new(OptimizerSpec::Adagrad {
            lr: 0.1,
            eps: 1e-8,
            initial_accumulator: 0.0,
        });
        assert!(adagrad.check_state(&[0.0, 2.5]).is_ok());
        assert!(adagrad
            .check_state(&[0.0, -1.0])
            .unwrap_err()
            .contains("element 1"));
        assert!(adagrad
            .check_state(&[f32::NAN, 1.0])
            .unwrap_err()
            .contains("element 0"));
        let adam = Optimizer::new(OptimizerSpec::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        });
        // First moments may be negative; second moments may not.
        assert!(adam.check_state(&[-1.0, -2.0, 1.0, 0.0]).is_ok());
        let e = adam.check_state(&[-1.0, -2.0, 1.0, -0.5]).unwrap_err();
        assert!(
            e.contains("element 3") && e.contains("second moment"),
            "{e}"
        );
        let sgd = Optimizer::new(OptimizerSpec::Sgd { lr: 0.1 });
        assert!(sgd.check_state(&[]).is_ok());
    }

    #[test]
    fn power_by_squaring_matches_repeated_multiplication_closely() {
        for base in [0.9f32, 0.999, 0.5] {
            let mut slow = 1f64;
            for n in 0..2000u64 {
                let fast = power(base, n) as f64;
                assert!(
                    (fast - slow).abs() <= 1e-6 * slow + 1e-37,
                    "{base}^{n}: {fast} vs {slow}"
                );
                slow *= base as f64;
            }
        }
    }

    #[test]
    fn preview_computes_the_bits_apply_does_and_leaves_the_state() {
        let specs = [
            OptimizerSpec::sgd(0.3),
            OptimizerSpec::adagrad(0.3),
            OptimizerSpec::rowwise_adagrad(0.3),
            OptimizerSpec::adam(0.3),
        ];
        for spec in specs {
            let opt = Optimizer::new(spec);
            let dim = 7;
            let base: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
            let g: Vec<f32> = (0..dim).map(|i| (i as f32 * 1.3).cos() * 0.1).collect();
            let mut state = vec![0f32; opt.state_len(dim)];
            opt.init_state(&mut state);
            let mut step = 0;
            // A few steps first, so that the state is not the initial one.
            let mut w = base.clone();
            for _ in 0..3 {
                opt.apply(&mut w, &g, &mut state, &mut step);
            }
            let (state0, step0) = (state.clone(), step);
            let mut out = vec![0f32; dim];
            opt.preview(&w, &g, &state, step, &mut out);
            assert_eq!(
                (&state, step),
                (&state0, step0),
                "{spec}: preview changed nothing"
            );
            opt.apply(&mut w, &g, &mut state, &mut step);
            assert_eq!(out, w, "{spec}: preview and apply agree bit for bit");
        }
    }

    #[test]
    fn rowwise_adagrad_grows_one_accumulator_by_the_mean_square() {
        let opt = Optimizer::new(OptimizerSpec::RowwiseAdagrad {
            lr: 0.5,
            eps: 0.0,
            initial_accumulator: 1.0,
        });
        let mut w = [1.0f32, 1.0];
        let mut state = [0f32; 1];
        opt.init_state(&mut state);
        opt.apply(&mut w, &[3.0, 1.0], &mut state, &mut 0);
        // acc = 1 + (9 + 1) / 2 = 6; scale = 0.5 / sqrt(6).
        assert_eq!(state, [6.0]);
        let scale = 0.5 / 6f32.sqrt();
        assert_eq!(w, [1.0 - scale * 3.0, 1.0 - scale]);
        assert_eq!(opt.state_len(2), 1);
        assert!(opt.has_state() && !opt.has_steps());
    }
}
