//! Server-side optimizers, applied to one row at a time (DESIGN section 3).
//!
//! All are sparse: only pushed rows change. One pushed entry `(key, count, gradient sum)` is one
//! optimizer step with the summed gradient; the row's version grows by `count`. For SGD this equals
//! `count` sequential steps exactly (up to float reassociation); for Adagrad and Adam it is the step
//! HET's server takes for an accumulated gradient. Adam is lazy: its moments and its step count
//! are per row and advance only when the row is pushed.

use hetkv_transport::OptimizerSpec;

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

    /// f32 state values per row for rows of `dim`.
    pub fn state_len(&self, dim: usize) -> usize {
        match self.spec {
            OptimizerSpec::Sgd { .. } => 0,
            OptimizerSpec::Adagrad { .. } => dim,
            OptimizerSpec::Adam { .. } => 2 * dim,
        }
    }

    /// Whether rows carry a step count.
    pub fn has_steps(&self) -> bool {
        matches!(self.spec, OptimizerSpec::Adam { .. })
    }

    /// The initial state of one row.
    pub fn init_state(&self, state: &mut [f32]) {
        match self.spec {
            OptimizerSpec::Adagrad {
                initial_accumulator,
                ..
            } => state.fill(initial_accumulator),
            _ => state.fill(0.0),
        }
    }

    /// Applies one step with gradient `g` to row `w`, updating its `state` (of
    /// [`Self::state_len`]) and `step` count.
    pub fn apply(&self, w: &mut [f32], g: &[f32], state: &mut [f32], step: &mut u64) {
        debug_assert_eq!(w.len(), g.len());
        match self.spec {
            OptimizerSpec::Sgd { lr } => {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= lr * g;
                }
            }
            OptimizerSpec::Adagrad { lr, eps, .. } => {
                for ((w, g), acc) in w.iter_mut().zip(g).zip(state.iter_mut()) {
                    *acc += g * g;
                    *w -= lr * g / (acc.sqrt() + eps);
                }
            }
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                *step += 1;
                let t = (*step).min(i32::MAX as u64) as i32;
                let c1 = 1.0 - beta1.powi(t);
                let c2 = 1.0 - beta2.powi(t);
                let (m, v) = state.split_at_mut(w.len());
                for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    let m_hat = *m / c1;
                    let v_hat = *v / c2;
                    *w -= lr * m_hat / (v_hat.sqrt() + eps);
                }
            }
        }
    }
}
