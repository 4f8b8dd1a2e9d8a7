//! The models' maths, a batch at a time: forward passes and gradients of LR, FM, DeepFM,
//! Wide&Deep and DCN over the batch's embedding rows and the dense parameters (see the module
//! above for the formulas). The MLP's layers are batched matrix products (`ndarray` over
//! `matrixmultiply`); a batch can be split over threads, each taking a contiguous share of the
//! samples and summing its own dense gradient, the shares added at the end.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::*;

/// Embedding row width by default: the linear weight then 8 factors.
pub const DEFAULT_DIM: usize = 9;
/// The most values per row of the dense table `ctr_dense`, which holds the dense parameters end
/// to end.
pub const DENSE_CHUNK: usize = 256;
/// Rows `ctr_dense` spreads small models over (one value a row below this many parameters), so
/// that every shard of a cluster of up to this many holds some of it: restoring a checkpoint
/// refuses a table with no rows on a shard.
pub const DENSE_MIN_ROWS: usize = 64;
/// Cross layers of DCN.
pub const CROSS_LAYERS: usize = 2;

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

impl ModelKind {
    fn deep(self) -> bool {
        matches!(self, Self::Deepfm | Self::Wdl | Self::Dcn)
    }

    /// Whether the model has the FM's pairwise interactions.
    fn factorized(self) -> bool {
        matches!(self, Self::Fm | Self::Deepfm)
    }
}

/// One layer of the MLP in the dense parameters: `W` (inputs x outputs, row-major) at `w`, the
/// bias at `b`.
#[derive(Clone, Debug)]
struct Layer {
    w: usize,
    b: usize,
    inputs: usize,
    outputs: usize,
}

/// A model: its kind, its embedding row width, its MLP, and where each dense parameter lies in
/// the flat dense vector (the 13 dense weights and the bias first, then each MLP layer's weights
/// and bias, the last layer being the 1-output readout, then the cross network's `w_l`, `b_l` per
/// layer and its readout).
#[derive(Clone, Debug)]
pub struct Net {
    kind: ModelKind,
    dim: usize,
    layers: Vec<Layer>,
    cross: usize,
    params: usize,
}

/// Dense inputs of a sample: `ln(1 + x)` of its 13 counts.
pub fn dense_inputs(s: &Sample) -> [f32; DENSE] {
    std::array::from_fn(|i| (1.0 + s.dense[i] as f32).ln())
}

pub(super) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// The cross-entropy of probability `sigmoid(z)` for `label`, computed stably from the logit.
fn bce(z: f32, label: f32) -> f64 {
    let z = z as f64;
    z.max(0.0) - z * label as f64 + (-z.abs()).exp().ln_1p()
}

/// What one share of a batch keeps between its forward and backward passes, reused batch to
/// batch.
#[derive(Debug, Default)]
pub struct Scratch {
    /// The MLP's input: the factor vectors of the fields, concatenated (samples x mlp_in).
    x: Vec<f32>,
    /// Each MLP layer's output (post-ReLU for hidden layers).
    acts: Vec<Vec<f32>>,
    /// The gradient at a layer's output, then at its input.
    d_out: Vec<f32>,
    d_in: Vec<f32>,
    /// Logits.
    z: Vec<f32>,
    /// FM models: each sample's factor sum `sum_f v_f` (samples x factors), from the forward
    /// pass for the backward one.
    fm_sums: Vec<f32>,
    /// The dense gradient of this share (for every share but the first).
    g_params: Vec<f32>,
}

impl Net {
    /// A `kind` model over rows of `dim` values (the linear weight, then `dim - 1` factors) with
    /// hidden MLP layers of the given widths (ignored by LR and FM).
    pub fn new(kind: ModelKind, dim: usize, hidden: &[usize]) -> Result<Self> {
        anyhow::ensure!(
            dim >= 2 || kind == ModelKind::Lr,
            "{kind:?} needs rows of at least 2 values (the linear weight and a factor); got {dim}"
        );
        anyhow::ensure!(dim >= 1, "rows need at least the linear weight");
        anyhow::ensure!(
            !kind.deep() || (!hidden.is_empty() && hidden.iter().all(|&h| h > 0)),
            "{kind:?} needs at least one hidden layer of positive width; got {hidden:?}"
        );
        let mlp_in = CATEGORICAL * (dim - 1);
        let mut at = DENSE + 1;
        let mut layers = Vec::new();
        if kind.deep() {
            let widths: Vec<usize> = hidden.iter().copied().chain([1]).collect();
            let mut inputs = mlp_in;
            for outputs in widths {
                layers.push(Layer {
                    w: at,
                    b: at + inputs * outputs,
                    inputs,
                    outputs,
                });
                at += inputs * outputs + outputs;
                inputs = outputs;
            }
        }
        let cross = at;
        if kind == ModelKind::Dcn {
            at += (2 * CROSS_LAYERS + 1) * mlp_in;
        }
        Ok(Self {
            kind,
            dim,
            layers,
            cross,
            params: at,
        })
    }

    /// The model kind.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Values per embedding row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Dense parameters in all.
    pub fn params(&self) -> usize {
        self.params
    }

    /// Values per row of `ctr_dense`: at most [`DENSE_CHUNK`], fewer for small models.
    pub fn dense_width(&self) -> usize {
        self.params.div_ceil(DENSE_MIN_ROWS).clamp(1, DENSE_CHUNK)
    }

    /// Rows of `ctr_dense` (of [`Net::dense_width`] values) that hold the dense parameters.
    pub fn dense_rows(&self) -> usize {
        self.params.div_ceil(self.dense_width())
    }

    fn factors(&self) -> usize {
        self.dim - 1
    }

    fn mlp_in(&self) -> usize {
        CATEGORICAL * self.factors()
    }

    /// The starting dense parameters, padded to whole rows of `ctr_dense`: He-normal weights for
    /// the hidden layers, `N(0, 1/inputs)` for the readout, `N(0, 0.01²)` for the cross network,
    /// zero biases and dense weights.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut p = vec![0f32; self.dense_rows() * self.dense_width()];
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate() {
            let gain = if l == last { 1.0 } else { 2.0 };
            let normal = Normal::new(0.0, (gain / layer.inputs as f32).sqrt()).expect("finite std");
            for v in &mut p[layer.w..layer.b] {
                *v = normal.sample(&mut rng);
            }
        }
        let normal = Normal::new(0.0, 0.01f32).expect("finite std");
        for v in &mut p[self.cross..self.params] {
            *v = normal.sample(&mut rng);
        }
        p
    }

    /// The logits of a batch: `rows` holds each sample's 26 rows (samples x 26 x dim), `dense`
    /// its dense inputs; `params` the dense parameters (at least [`Net::params`] values).
    pub fn logits(
        &self,
        params: &[f32],
        rows: &[f32],
        dense: &[[f32; DENSE]],
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        self.forward(params, rows, dense, scratch);
        out.copy_from_slice(&scratch.z);
    }

    /// One training step's gradients of the batch's mean cross-entropy: fills `g_rows` (one
    /// gradient row per row of `rows`) and `g_params` (like `params`), splitting the batch over
    /// `scratch.len()` threads. Returns the batch's summed loss.
    #[allow(clippy::too_many_arguments)]
    pub fn gradients(
        &self,
        params: &[f32],
        rows: &[f32],
        dense: &[[f32; DENSE]],
        labels: &[f32],
        scratch: &mut [Scratch],
        g_rows: &mut [f32],
        g_params: &mut [f32],
    ) -> f64 {
        let n = labels.len();
        let per_sample = CATEGORICAL * self.dim;
        debug_assert_eq!(rows.len(), n * per_sample);
        debug_assert_eq!(g_rows.len(), rows.len());
        assert!(!scratch.is_empty(), "one Scratch per thread, at least one");
        let scale = 1.0 / n.max(1) as f32;
        g_params.fill(0.0);
        let shares = scratch.len().clamp(1, n.max(1));
        let per_share = n.div_ceil(shares).max(1);
        if shares == 1 {
            return self.share(
                params,
                rows,
                dense,
                labels,
                scale,
                &mut scratch[0],
                g_rows,
                g_params,
            );
        }
        let (first, others) = scratch.split_at_mut(1);
        let head = per_share.min(n);
        let (g_head, mut g_rest) = g_rows.split_at_mut(head * per_sample);
        let loss = std::thread::scope(|s| {
            let mut handles = Vec::new();
            for (i, sc) in others.iter_mut().enumerate().take(shares - 1) {
                let lo = ((i + 1) * per_share).min(n);
                let hi = ((i + 2) * per_share).min(n);
                let (g, rest) = std::mem::take(&mut g_rest).split_at_mut((hi - lo) * per_sample);
                g_rest = rest;
                sc.g_params.clear();
                sc.g_params.resize(g_params.len(), 0.0);
                handles.push(s.spawn(move || {
                    let mut gp = std::mem::take(&mut sc.g_params);
                    let loss = self.share(
                        params,
                        &rows[lo * per_sample..hi * per_sample],
                        &dense[lo..hi],
                        &labels[lo..hi],
                        scale,
                        sc,
                        g,
                        &mut gp,
                    );
                    sc.g_params = gp;
                    loss
                }));
            }
            let mut loss = self.share(
                params,
                &rows[..head * per_sample],
                &dense[..head],
                &labels[..head],
                scale,
                &mut first[0],
                g_head,
                g_params,
            );
            for h in handles {
                loss += h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
            loss
        });
        for sc in &others[..shares - 1] {
            for (g, p) in g_params.iter_mut().zip(&sc.g_params) {
                *g += p;
            }
        }
        loss
    }

    /// Forward and backward over one share of a batch, adding to `g_params`.
    #[allow(clippy::too_many_arguments)]
    fn share(
        &self,
        params: &[f32],
        rows: &[f32],
        dense: &[[f32; DENSE]],
        labels: &[f32],
        scale: f32,
        scratch: &mut Scratch,
        g_rows: &mut [f32],
        g_params: &mut [f32],
    ) -> f64 {
        self.forward(params, rows, dense, scratch);
        let mut loss = 0.0;
        // The gradient of the loss at each logit, scaled to the batch mean; kept in `z`.
        for (z, &y) in scratch.z.iter_mut().zip(labels) {
            loss += bce(*z, y);
            *z = (sigmoid(*z) - y) * scale;
        }
        g_rows.fill(0.0);
        self.backward(params, rows, dense, scratch, g_rows, g_params);
        loss
    }

    fn forward(&self, params: &[f32], rows: &[f32], dense: &[[f32; DENSE]], sc: &mut Scratch) {
        let (n, dim, k) = (dense.len(), self.dim, self.factors());
        let per_sample = CATEGORICAL * dim;
        let fm = self.kind.factorized();
        sc.z.clear();
        sc.fm_sums.clear();
        sc.fm_sums.resize(if fm { n * k } else { 0 }, 0.0);
        for (i, (r, d)) in rows.chunks_exact(per_sample).zip(dense).enumerate() {
            // The linear part: bias, dense weights, each field's weight.
            let mut z = params[DENSE];
            for (a, x) in params[..DENSE].iter().zip(d) {
                z += a * x;
            }
            z += r.chunks_exact(dim).map(|row| row[0]).sum::<f32>();
            if fm {
                z += fm_interactions(r, dim, &mut sc.fm_sums[i * k..(i + 1) * k]);
            }
            sc.z.push(z);
        }
        if !self.kind.deep() {
            return;
        }
        let mlp_in = self.mlp_in();
        sc.x.clear();
        sc.x.reserve(n * mlp_in);
        for row in rows.chunks_exact(dim) {
            sc.x.extend_from_slice(&row[1..1 + k]);
        }
        sc.acts.resize_with(self.layers.len(), Vec::new);
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (before, rest) = sc.acts.split_at_mut(l);
            let input = if l == 0 { &sc.x } else { &before[l - 1] };
            let out = &mut rest[0];
            out.clear();
            for _ in 0..n {
                out.extend_from_slice(&params[layer.b..layer.b + layer.outputs]);
            }
            let a = ArrayView2::from_shape((n, layer.inputs), input).expect("input shape");
            let w =
                ArrayView2::from_shape((layer.inputs, layer.outputs), &params[layer.w..layer.b])
                    .expect("weight shape");
            let mut o =
                ArrayViewMut2::from_shape((n, layer.outputs), out.as_mut_slice()).expect("shape");
            general_mat_mul(1.0, &a, &w, 1.0, &mut o);
            if l != last {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        for (z, y) in sc.z.iter_mut().zip(&sc.acts[last]) {
            *z += y;
        }
        if self.kind == ModelKind::Dcn {
            let c = &params[self.cross..self.params];
            for (z, x0) in sc.z.iter_mut().zip(sc.x.chunks_exact(mlp_in)) {
                *z += Cross::output(c, x0);
            }
        }
    }

    /// Adds the gradients of the logits, whose loss gradients are in `sc.z`, to `g_rows` and
    /// `g_params`.
    fn backward(
        &self,
        params: &[f32],
        rows: &[f32],
        dense: &[[f32; DENSE]],
        sc: &mut Scratch,
        g_rows: &mut [f32],
        g_params: &mut [f32],
    ) {
        let (n, dim, k) = (dense.len(), self.dim, self.factors());
        let per_sample = CATEGORICAL * dim;
        let fm = self.kind.factorized();
        for (i, (((r, g), d), &e)) in rows
            .chunks_exact(per_sample)
            .zip(g_rows.chunks_exact_mut(per_sample))
            .zip(dense)
            .zip(&sc.z)
            .enumerate()
        {
            for (gp, x) in g_params[..DENSE].iter_mut().zip(d) {
                *gp += e * x;
            }
            g_params[DENSE] += e;
            for gr in g.chunks_exact_mut(dim) {
                gr[0] += e;
            }
            if fm {
                fm_gradient(r, dim, &sc.fm_sums[i * k..(i + 1) * k], e, g);
            }
        }
        if !self.kind.deep() {
            return;
        }
        let mlp_in = self.mlp_in();
        // d(logit)/d(readout output) = 1: the output gradient of the last layer is e itself.
        sc.d_out.clear();
        sc.d_out.extend_from_slice(&sc.z);
        let last = self.layers.len() - 1;
        for l in (0..self.layers.len()).rev() {
            let layer = &self.layers[l];
            if l != last {
                for (d, &a) in sc.d_out.iter_mut().zip(&sc.acts[l]) {
                    if a <= 0.0 {
                        *d = 0.0;
                    }
                }
            }
            let input = if l == 0 { &sc.x } else { &sc.acts[l - 1] };
            let a = ArrayView2::from_shape((n, layer.inputs), input).expect("input shape");
            let dz = ArrayView2::from_shape((n, layer.outputs), &sc.d_out).expect("grad shape");
            {
                let (gw, gb) = g_params[layer.w..layer.b + layer.outputs]
                    .split_at_mut(layer.inputs * layer.outputs);
                let mut gw =
                    ArrayViewMut2::from_shape((layer.inputs, layer.outputs), gw).expect("shape");
                general_mat_mul(1.0, &a.t(), &dz, 1.0, &mut gw);
                for row in sc.d_out.chunks_exact(layer.outputs) {
                    for (b, d) in gb.iter_mut().zip(row) {
                        *b += d;
                    }
                }
            }
            let w =
                ArrayView2::from_shape((layer.inputs, layer.outputs), &params[layer.w..layer.b])
                    .expect("weight shape");
            sc.d_in.clear();
            sc.d_in.resize(n * layer.inputs, 0.0);
            let mut di = ArrayViewMut2::from_shape((n, layer.inputs), sc.d_in.as_mut_slice())
                .expect("shape");
            general_mat_mul(1.0, &dz, &w.t(), 0.0, &mut di);
            std::mem::swap(&mut sc.d_in, &mut sc.d_out);
        }
        // Now `d_out` is the gradient at the MLP's input.
        if self.kind == ModelKind::Dcn {
            let c = &params[self.cross..self.params];
            let gc = &mut g_params[self.cross..self.params];
            for ((x0, dx), &e) in
                sc.x.chunks_exact(mlp_in)
                    .zip(sc.d_out.chunks_exact_mut(mlp_in))
                    .zip(&sc.z)
            {
                Cross::backward(c, x0, e, gc, dx);
            }
        }
        for (g, dx) in g_rows.chunks_exact_mut(dim).zip(sc.d_out.chunks_exact(k)) {
            for (gv, d) in g[1..].iter_mut().zip(dx) {
                *gv += d;
            }
        }
    }
}

/// `sum_{f<g} <v_f, v_g>` over one sample's rows: `(|sum v|^2 - sum |v|^2) / 2`; leaves
/// `sum v` in `sum` (zeros on entry).
fn fm_interactions(r: &[f32], dim: usize, sum: &mut [f32]) -> f32 {
    let mut squares = 0f32;
    for row in r.chunks_exact(dim) {
        for (s, v) in sum.iter_mut().zip(&row[1..]) {
            *s += v;
            squares += v * v;
        }
    }
    (sum.iter().map(|s| s * s).sum::<f32>() - squares) / 2.0
}

/// Adds `e` times the gradient of the FM interactions, `sum v - v_f` for field f, to `g`; `sum`
/// is the sample's factor sum from the forward pass.
fn fm_gradient(r: &[f32], dim: usize, sum: &[f32], e: f32, g: &mut [f32]) {
    for (row, gr) in r.chunks_exact(dim).zip(g.chunks_exact_mut(dim)) {
        for ((gv, s), v) in gr[1..].iter_mut().zip(sum).zip(&row[1..]) {
            *gv += e * (s - v);
        }
    }
}

/// DCN's cross network over inputs of width m: `x_{l+1} = x0 (x_l . w_l) + b_l + x_l`, output
/// `p . x_L`; its parameters are `w_l`, `b_l` per layer, then `p`, each m values.
pub struct Cross;

impl Cross {
    fn layer(c: &[f32], m: usize, l: usize) -> (&[f32], &[f32]) {
        (
            &c[2 * l * m..(2 * l + 1) * m],
            &c[(2 * l + 1) * m..(2 * l + 2) * m],
        )
    }

    /// The layers' inputs x_0..x_L and the scalars s_l = x_l . w_l.
    fn forward(c: &[f32], x0: &[f32]) -> (Vec<Vec<f32>>, [f32; CROSS_LAYERS]) {
        let m = x0.len();
        let mut xs = vec![x0.to_vec()];
        let mut s = [0f32; CROSS_LAYERS];
        for (l, sl) in s.iter_mut().enumerate() {
            let (w, b) = Self::layer(c, m, l);
            let x = &xs[l];
            *sl = x.iter().zip(w).map(|(a, b)| a * b).sum();
            let next = (0..m).map(|i| x0[i] * *sl + b[i] + x[i]).collect();
            xs.push(next);
        }
        (xs, s)
    }

    /// The output.
    pub fn output(c: &[f32], x0: &[f32]) -> f32 {
        let m = x0.len();
        let (xs, _) = Self::forward(c, x0);
        let p = &c[2 * CROSS_LAYERS * m..];
        xs[CROSS_LAYERS].iter().zip(p).map(|(a, b)| a * b).sum()
    }

    /// Adds `k` times the gradient of the output to `g_c` and `g_x0`.
    pub fn backward(c: &[f32], x0: &[f32], k: f32, g_c: &mut [f32], g_x0: &mut [f32]) {
        let m = x0.len();
        let (xs, s) = Self::forward(c, x0);
        let p = &c[2 * CROSS_LAYERS * m..];
        let mut dx: Vec<f32> = p.iter().map(|v| k * v).collect();
        for (g, x) in g_c[2 * CROSS_LAYERS * m..]
            .iter_mut()
            .zip(&xs[CROSS_LAYERS])
        {
            *g += k * x;
        }
        for l in (0..CROSS_LAYERS).rev() {
            let (w, _) = Self::layer(c, m, l);
            let x = &xs[l];
            // x_{l+1} = x0 s_l + b_l + x_l, s_l = x_l . w_l
            let ds: f32 = dx.iter().zip(x0).map(|(a, b)| a * b).sum();
            for i in 0..m {
                g_c[2 * l * m + i] += ds * x[i];
                g_c[(2 * l + 1) * m + i] += dx[i];
                g_x0[i] += dx[i] * s[l];
            }
            for (d, wi) in dx.iter_mut().zip(w) {
                *d += ds * wi;
            }
        }
        for (g, d) in g_x0.iter_mut().zip(&dx) {
            *g += d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [ModelKind; 5] = [
        ModelKind::Lr,
        ModelKind::Fm,
        ModelKind::Deepfm,
        ModelKind::Wdl,
        ModelKind::Dcn,
    ];

    struct Case {
        net: Net,
        rows: Vec<f32>,
        dense: Vec<[f32; DENSE]>,
        labels: Vec<f32>,
        params: Vec<f32>,
    }

    fn case(kind: ModelKind, samples: usize) -> Case {
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
        };
        let net = Net::new(kind, 4, &[6, 5]).unwrap();
        let rows = (0..samples * CATEGORICAL * 4).map(|_| next()).collect();
        let dense = (0..samples)
            .map(|_| std::array::from_fn(|_| next() + 0.5))
            .collect();
        let labels = (0..samples).map(|i| (i % 2) as f32).collect();
        // Random everywhere (biases included), so that no ReLU sits at its kink by construction.
        let params = (0..net.params()).map(|_| next()).collect();
        Case {
            net,
            rows,
            dense,
            labels,
            params,
        }
    }

    impl Case {
        fn loss(&self, rows: &[f32], params: &[f32]) -> f64 {
            let mut z = vec![0f32; self.labels.len()];
            self.net
                .logits(params, rows, &self.dense, &mut Scratch::default(), &mut z);
            let n = self.labels.len() as f64;
            z.iter()
                .zip(&self.labels)
                .map(|(&z, &y)| bce(z, y))
                .sum::<f64>()
                / n
        }

        fn gradients(&self, threads: usize) -> (Vec<f32>, Vec<f32>, f64) {
            let mut g_rows = vec![f32::NAN; self.rows.len()];
            let mut g_params = vec![f32::NAN; self.params.len()];
            let mut scratch: Vec<Scratch> = (0..threads).map(|_| Scratch::default()).collect();
            let loss = self.net.gradients(
                &self.params,
                &self.rows,
                &self.dense,
                &self.labels,
                &mut scratch,
                &mut g_rows,
                &mut g_params,
            );
            (g_rows, g_params, loss)
        }
    }

    #[test]
    fn every_model_s_gradients_match_finite_differences() {
        for kind in KINDS {
            let c = case(kind, 3);
            let (g_rows, g_params, loss) = c.gradients(1);
            assert!((loss / 3.0 - c.loss(&c.rows, &c.params)).abs() < 1e-5);
            let h = 1e-3f32;
            let check = |what: &str, base: &[f32], analytic: &[f32], f: &dyn Fn(&[f32]) -> f64| {
                for i in (0..base.len()).step_by(3) {
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
            check("row value", &c.rows, &g_rows, &|r| c.loss(r, &c.params));
            check("dense parameter", &c.params, &g_params, &|p| {
                c.loss(&c.rows, p)
            });
        }
    }

    #[test]
    fn a_batch_split_over_threads_has_the_gradients_of_one_thread() {
        for kind in KINDS {
            let c = case(kind, 11);
            let (rows1, params1, loss1) = c.gradients(1);
            for threads in [2, 3, 4, 16] {
                let (rows_t, params_t, loss_t) = c.gradients(threads);
                assert!((loss1 - loss_t).abs() < 1e-9, "{kind:?} x{threads}: loss");
                let close = |what: &str, x: &[f32], y: &[f32]| {
                    for (i, (a, b)) in x.iter().zip(y).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
                            "{kind:?} x{threads}: {what} {i}: {a} vs {b}"
                        );
                    }
                };
                close("row gradient", &rows1, &rows_t);
                close("dense gradient", &params1, &params_t);
            }
        }
    }

    #[test]
    fn the_dense_layout_counts_every_parameter_and_pads_to_whole_rows() {
        let net = Net::new(ModelKind::Dcn, 128, &[256, 256, 256]).unwrap();
        let m = CATEGORICAL * 127;
        let mlp = m * 256 + 256 + 2 * (256 * 256 + 256) + 256 + 1;
        assert_eq!(net.params(), DENSE + 1 + mlp + 5 * m);
        assert_eq!(net.init(1).len(), net.dense_rows() * net.dense_width());
        assert!(Net::new(ModelKind::Deepfm, 9, &[]).is_err());
        assert!(Net::new(ModelKind::Fm, 1, &[]).is_err());
    }
}
