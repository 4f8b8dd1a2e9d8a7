//! The models' maths: forward passes and gradients of LR, FM, DeepFM, Wide&Deep and DCN over one
//! sample's embedding rows and the dense parameters (see the module above for the formulas).

use super::*;

/// Factor dimension K of the FM.
pub const FACTORS: usize = 8;
/// Embedding row: the linear weight then the K factors.
pub const ROW: usize = 1 + FACTORS;

/// The FM's forward pass and gradients for one sample, given its rows.
pub struct Fm;

impl Fm {
    /// Dense inputs of a sample.
    pub fn dense(s: &Sample) -> [f32; DENSE] {
        std::array::from_fn(|i| (1.0 + s.dense[i] as f32).ln())
    }

    /// The logit; `rows` is the sample's 26 embedding rows (26 x ROW), `dense_w` the 13 dense
    /// weights then the bias.
    pub fn logit(rows: &[f32], dense: &[f32; DENSE], dense_w: &[f32]) -> f32 {
        let mut z = dense_w[DENSE];
        for (a, d) in dense_w[..DENSE].iter().zip(dense) {
            z += a * d;
        }
        let mut sum = [0f32; FACTORS];
        let mut squares = 0f32;
        for r in rows.chunks_exact(ROW) {
            z += r[0];
            for (s, v) in sum.iter_mut().zip(&r[1..]) {
                *s += v;
                squares += v * v;
            }
        }
        z + (sum.iter().map(|s| s * s).sum::<f32>() - squares) / 2.0
    }

    /// Adds d(loss)/d(parameters) scaled by `scale` to `g_rows` (26 x ROW) and `g_dense`
    /// (14), for error `e = p - y` (the gradient of cross-entropy with respect to the logit).
    pub fn gradient(
        rows: &[f32],
        dense: &[f32; DENSE],
        e: f32,
        scale: f32,
        g_rows: &mut [f32],
        g_dense: &mut [f32],
    ) {
        let mut sum = [0f32; FACTORS];
        for r in rows.chunks_exact(ROW) {
            for (s, v) in sum.iter_mut().zip(&r[1..]) {
                *s += v;
            }
        }
        let k = e * scale;
        for (r, g) in rows.chunks_exact(ROW).zip(g_rows.chunks_exact_mut(ROW)) {
            g[0] += k;
            for j in 0..FACTORS {
                g[1 + j] += k * (sum[j] - r[1 + j]);
            }
        }
        for (g, d) in g_dense[..DENSE].iter_mut().zip(dense) {
            *g += k * d;
        }
        g_dense[DENSE] += k;
    }
}

/// Hidden units of DeepFM's MLP.
pub const HIDDEN: usize = 32;
/// Inputs of the MLP: the factor vectors of the 26 fields, concatenated.
pub const MLP_IN: usize = CATEGORICAL * FACTORS;
/// Rows (of `HIDDEN` values) of the MLP's table: `W1` (one row per input), `b1`, `W2`, and a row
/// whose first value is `b2`.
pub const MLP_ROWS: usize = MLP_IN + 3;

/// The models `hetkv-bench train` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Logistic regression: bias, dense weights, one weight per key.
    Lr,
    /// Factorization machine: LR plus pairwise factor interactions.
    Fm,
    /// DeepFM: the FM plus an MLP over the concatenated factors.
    Deepfm,
    /// Wide&Deep: LR (wide) plus the MLP over the concatenated factors (deep).
    Wdl,
    /// Deep&Cross: LR, plus two cross layers over the concatenated factors with a linear
    /// readout, plus the MLP.
    Dcn,
}

/// Cross layers of DCN.
pub const CROSS_LAYERS: usize = 2;
/// Rows (of `MLP_IN` values) of the cross table: `w_l` and `b_l` per layer, then the readout.
pub const CROSS_ROWS: usize = 2 * CROSS_LAYERS + 1;

/// DCN's cross network: `x_{l+1} = x0 (x_l . w_l) + b_l + x_l`, output `p . x_L`.
pub struct Cross;

impl Cross {
    fn layer(c: &[f32], l: usize) -> (&[f32], &[f32]) {
        (
            &c[2 * l * MLP_IN..(2 * l + 1) * MLP_IN],
            &c[(2 * l + 1) * MLP_IN..(2 * l + 2) * MLP_IN],
        )
    }

    /// The layers' inputs x_0..x_L and the scalars s_l = x_l . w_l.
    fn forward(c: &[f32], x0: &[f32; MLP_IN]) -> (Vec<[f32; MLP_IN]>, [f32; CROSS_LAYERS]) {
        let mut xs = vec![*x0];
        let mut s = [0f32; CROSS_LAYERS];
        for (l, sl) in s.iter_mut().enumerate() {
            let (w, b) = Self::layer(c, l);
            let x = xs[l];
            *sl = x.iter().zip(w).map(|(a, b)| a * b).sum();
            xs.push(std::array::from_fn(|i| x0[i] * *sl + b[i] + x[i]));
        }
        (xs, s)
    }

    /// The output.
    pub fn output(c: &[f32], x0: &[f32; MLP_IN]) -> f32 {
        let (xs, _) = Self::forward(c, x0);
        let p = &c[2 * CROSS_LAYERS * MLP_IN..];
        xs[CROSS_LAYERS].iter().zip(p).map(|(a, b)| a * b).sum()
    }

    /// Adds `k` times the gradient of the output to `g_c` and `g_x0`.
    pub fn backward(
        c: &[f32],
        x0: &[f32; MLP_IN],
        k: f32,
        g_c: &mut [f32],
        g_x0: &mut [f32; MLP_IN],
    ) {
        let (xs, s) = Self::forward(c, x0);
        let p = &c[2 * CROSS_LAYERS * MLP_IN..];
        let mut dx: [f32; MLP_IN] = std::array::from_fn(|i| k * p[i]);
        for (i, g) in g_c[2 * CROSS_LAYERS * MLP_IN..].iter_mut().enumerate() {
            *g += k * xs[CROSS_LAYERS][i];
        }
        for l in (0..CROSS_LAYERS).rev() {
            let (w, _) = Self::layer(c, l);
            let x = &xs[l];
            // x_{l+1} = x0 s_l + b_l + x_l, s_l = x_l . w_l
            let ds: f32 = dx.iter().zip(x0).map(|(a, b)| a * b).sum();
            for i in 0..MLP_IN {
                g_c[2 * l * MLP_IN + i] += ds * x[i];
                g_c[(2 * l + 1) * MLP_IN + i] += dx[i];
                g_x0[i] += dx[i] * s[l];
            }
            dx = std::array::from_fn(|i| dx[i] + ds * w[i]);
        }
        for i in 0..MLP_IN {
            g_x0[i] += dx[i];
        }
    }
}

/// DeepFM's MLP: `y = W2 . relu(W1^T x + b1) + b2`, parameters as `MLP_ROWS x HIDDEN` values.
pub struct Mlp;

impl Mlp {
    /// The factor vectors of a sample's rows, concatenated.
    pub fn input(rows: &[f32]) -> [f32; MLP_IN] {
        std::array::from_fn(|i| rows[(i / FACTORS) * ROW + 1 + i % FACTORS])
    }

    /// The output and the hidden activations.
    pub fn forward(p: &[f32], x: &[f32; MLP_IN]) -> (f32, [f32; HIDDEN]) {
        let mut h: [f32; HIDDEN] = p[MLP_IN * HIDDEN..(MLP_IN + 1) * HIDDEN]
            .try_into()
            .expect("b1");
        for (i, &xi) in x.iter().enumerate() {
            for (hj, w) in h.iter_mut().zip(&p[i * HIDDEN..(i + 1) * HIDDEN]) {
                *hj += xi * w;
            }
        }
        h.iter_mut().for_each(|v| *v = v.max(0.0));
        let w2 = &p[(MLP_IN + 1) * HIDDEN..(MLP_IN + 2) * HIDDEN];
        let b2 = p[(MLP_IN + 2) * HIDDEN];
        (h.iter().zip(w2).map(|(a, b)| a * b).sum::<f32>() + b2, h)
    }

    /// Adds `k` times the gradient of the output to `g_p` (parameters) and `g_x` (inputs).
    pub fn backward(
        p: &[f32],
        x: &[f32; MLP_IN],
        h: &[f32; HIDDEN],
        k: f32,
        g_p: &mut [f32],
        g_x: &mut [f32; MLP_IN],
    ) {
        let w2 = &p[(MLP_IN + 1) * HIDDEN..(MLP_IN + 2) * HIDDEN];
        let mut dh = [0f32; HIDDEN];
        for j in 0..HIDDEN {
            g_p[(MLP_IN + 1) * HIDDEN + j] += k * h[j];
            dh[j] = if h[j] > 0.0 { k * w2[j] } else { 0.0 };
            g_p[MLP_IN * HIDDEN + j] += dh[j];
        }
        g_p[(MLP_IN + 2) * HIDDEN] += k;
        for (i, &xi) in x.iter().enumerate() {
            let w1 = &p[i * HIDDEN..(i + 1) * HIDDEN];
            let g1 = &mut g_p[i * HIDDEN..(i + 1) * HIDDEN];
            let mut gx = 0.0;
            for j in 0..HIDDEN {
                g1[j] += xi * dh[j];
                gx += w1[j] * dh[j];
            }
            g_x[i] += gx;
        }
    }
}

/// A model's logit and gradients over one sample.
pub struct Model;

impl Model {
    /// The LR part: bias, dense weights, one weight per key.
    fn linear(rows: &[f32], dense: &[f32; DENSE], dense_w: &[f32]) -> f32 {
        let mut z = dense_w[DENSE];
        for (a, d) in dense_w[..DENSE].iter().zip(dense) {
            z += a * d;
        }
        z + rows.chunks_exact(ROW).map(|r| r[0]).sum::<f32>()
    }

    /// The logit of `kind` (`mlp` and `cross` may be empty when the model has none); also returns
    /// the MLP's activations.
    pub fn logit(
        kind: ModelKind,
        rows: &[f32],
        dense: &[f32; DENSE],
        dense_w: &[f32],
        mlp: &[f32],
        cross: &[f32],
    ) -> (f32, [f32; HIDDEN]) {
        match kind {
            ModelKind::Lr => (Self::linear(rows, dense, dense_w), [0.0; HIDDEN]),
            ModelKind::Fm => (Fm::logit(rows, dense, dense_w), [0.0; HIDDEN]),
            ModelKind::Deepfm => {
                let (y, h) = Mlp::forward(mlp, &Mlp::input(rows));
                (Fm::logit(rows, dense, dense_w) + y, h)
            }
            ModelKind::Wdl => {
                let (y, h) = Mlp::forward(mlp, &Mlp::input(rows));
                (Self::linear(rows, dense, dense_w) + y, h)
            }
            ModelKind::Dcn => {
                let x0 = Mlp::input(rows);
                let (y, h) = Mlp::forward(mlp, &x0);
                (
                    Self::linear(rows, dense, dense_w) + y + Cross::output(cross, &x0),
                    h,
                )
            }
        }
    }

    /// Adds `e * scale` times the gradient of the logit to the gradient buffers; `params` and
    /// `g_params` are the MLP's and the cross network's.
    #[allow(clippy::too_many_arguments)]
    pub fn gradient(
        kind: ModelKind,
        rows: &[f32],
        dense: &[f32; DENSE],
        params: (&[f32], &[f32]),
        h: &[f32; HIDDEN],
        e: f32,
        scale: f32,
        g_rows: &mut [f32],
        g_dense: &mut [f32],
        g_params: (&mut [f32], &mut [f32]),
    ) {
        let (mlp, cross) = params;
        let (g_mlp, g_cross) = g_params;
        let k = e * scale;
        let linear = |g_rows: &mut [f32], g_dense: &mut [f32]| {
            for g in g_rows.chunks_exact_mut(ROW) {
                g[0] += k;
            }
            for (g, d) in g_dense[..DENSE].iter_mut().zip(dense) {
                *g += k * d;
            }
            g_dense[DENSE] += k;
        };
        match kind {
            ModelKind::Lr => linear(g_rows, g_dense),
            ModelKind::Fm => Fm::gradient(rows, dense, e, scale, g_rows, g_dense),
            ModelKind::Deepfm | ModelKind::Wdl | ModelKind::Dcn => {
                if kind == ModelKind::Deepfm {
                    Fm::gradient(rows, dense, e, scale, g_rows, g_dense);
                } else {
                    linear(g_rows, g_dense);
                }
                let x = Mlp::input(rows);
                let mut g_x = [0f32; MLP_IN];
                Mlp::backward(mlp, &x, h, k, g_mlp, &mut g_x);
                if kind == ModelKind::Dcn {
                    Cross::backward(cross, &x, k, g_cross, &mut g_x);
                }
                for (i, g) in g_x.iter().enumerate() {
                    g_rows[(i / FACTORS) * ROW + 1 + i % FACTORS] += g;
                }
            }
        }
    }
}

pub(super) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_s_gradients_match_finite_differences() {
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
        };
        let rows: Vec<f32> = (0..CATEGORICAL * ROW).map(|_| next()).collect();
        let dense: [f32; DENSE] = std::array::from_fn(|_| next() + 0.5);
        let dense_w: Vec<f32> = (0..=DENSE).map(|_| next()).collect();
        let mlp: Vec<f32> = (0..MLP_ROWS * HIDDEN).map(|_| next()).collect();
        let cross: Vec<f32> = (0..CROSS_ROWS * MLP_IN).map(|_| next() * 0.1).collect();
        let kinds = [
            ModelKind::Lr,
            ModelKind::Fm,
            ModelKind::Deepfm,
            ModelKind::Wdl,
            ModelKind::Dcn,
        ];
        for kind in kinds {
            // Loss for label 1: -ln sigmoid(logit), as a function of each parameter group.
            let loss = |rows: &[f32], dense_w: &[f32], mlp: &[f32], cross: &[f32]| -> f64 {
                let (z, _) = Model::logit(kind, rows, &dense, dense_w, mlp, cross);
                -(sigmoid(z) as f64).ln()
            };
            let (z, hid) = Model::logit(kind, &rows, &dense, &dense_w, &mlp, &cross);
            let e = sigmoid(z) - 1.0;
            let mut g_rows = vec![0f32; rows.len()];
            let mut g_dense = vec![0f32; DENSE + 1];
            let (mut g_mlp, mut g_cross) = (vec![0f32; mlp.len()], vec![0f32; cross.len()]);
            Model::gradient(
                kind,
                &rows,
                &dense,
                (&mlp, &cross),
                &hid,
                e,
                1.0,
                &mut g_rows,
                &mut g_dense,
                (&mut g_mlp, &mut g_cross),
            );
            let h = 1e-3f32;
            // Central differences of one parameter group, at the given indices.
            let check = |what: &str,
                         base: &[f32],
                         analytic: &[f32],
                         idx: Vec<usize>,
                         f: &dyn Fn(&[f32]) -> f64| {
                for i in idx {
                    let (mut up, mut down) = (base.to_vec(), base.to_vec());
                    up[i] += h;
                    down[i] -= h;
                    let numeric = (f(&up) - f(&down)) / (2.0 * h as f64);
                    assert!(
                        (numeric - analytic[i] as f64).abs() < 2e-3,
                        "{kind:?} {what} {i}: numeric {numeric} vs analytic {}",
                        analytic[i]
                    );
                }
            };
            check(
                "row parameter",
                &rows,
                &g_rows,
                (0..rows.len()).step_by(5).collect(),
                &|r| loss(r, &dense_w, &mlp, &cross),
            );
            check(
                "dense parameter",
                &dense_w,
                &g_dense,
                (0..=DENSE).collect(),
                &|d| loss(&rows, d, &mlp, &cross),
            );
            if kind != ModelKind::Lr && kind != ModelKind::Fm {
                let idx = (0..mlp.len())
                    .step_by(37)
                    .chain([
                        MLP_IN * HIDDEN,
                        (MLP_IN + 1) * HIDDEN,
                        (MLP_IN + 2) * HIDDEN,
                    ])
                    .collect();
                check("mlp parameter", &mlp, &g_mlp, idx, &|m| {
                    loss(&rows, &dense_w, m, &cross)
                });
            }
            if kind == ModelKind::Dcn {
                check(
                    "cross parameter",
                    &cross,
                    &g_cross,
                    (0..cross.len()).step_by(11).collect(),
                    &|c| loss(&rows, &dense_w, &mlp, c),
                );
            }
        }
    }
}
