//! The LANTON group step on host memory, following the rules of `crate::step`.

use super::gemm::PoolError;
use super::kernels;
use super::newton_schulz::{newton_schulz, nuclear_norm, nuclear_norm_polar, NsWorkspace};
use crate::tensor::{Tensor, TensorMut};
use crate::step::{self, Hyper, Kind, LayerShape, NuclearEstimator, StepConfig};

/// How the step's result leaves the kernel.
pub enum ParamIo<'a> {
    /// optax convention: the update (delta) is written beside read-only parameters.
    Update { param: Tensor<'a>, update: TensorMut<'a> },
    /// The fused path: parameters are rewritten in place.
    InPlace { param: TensorMut<'a> },
}

impl ParamIo<'_> {
    /// The parameters (and update) cut into pieces by `cut` (`Tensor::split`/`chunks` and their
    /// writable twins, which must cut alike).
    fn pieces<'b>(
        &'b mut self,
        cut: impl Fn(&Tensor<'b>) -> Vec<Tensor<'b>>,
        cut_mut: impl FnOnce(&'b mut TensorMut) -> Vec<TensorMut<'b>>,
    ) -> Vec<ParamIo<'b>> {
        match self {
            ParamIo::Update { param, update } => {
                cut(param).into_iter().zip(cut_mut(update)).map(|(param, update)| ParamIo::Update { param, update }).collect()
            }
            ParamIo::InPlace { param } => cut_mut(param).into_iter().map(|param| ParamIo::InPlace { param }).collect(),
        }
    }

    /// Writes delta = `w.delta(D, X)` (D in `d`; X is read into `x`) as the update, or X + delta
    /// into the parameters. A skipped piece (`w` None) gets a zero update and keeps X.
    fn write_step(&mut self, w: Option<&step::Write>, d: &mut [f32], x: &mut [f32]) {
        let Some(w) = w else {
            if let ParamIo::Update { update, .. } = self {
                d.fill(0.0);
                update.write(0, d);
            }
            return;
        };
        match self {
            ParamIo::Update { param, update } => {
                param.read(0, x);
                d.iter_mut().zip(x.iter()).for_each(|(d, &x)| *d = w.delta(*d, x));
                update.write(0, d);
            }
            ParamIo::InPlace { param } => {
                param.read(0, x);
                d.iter_mut().zip(x.iter()).for_each(|(d, &x)| *d = x + w.delta(*d, x));
                param.write(0, d);
            }
        }
    }
}

/// One leaf of the group: its layers' tensors and per-layer state.
pub struct LeafIo<'a> {
    pub shape: LayerShape,
    pub params: ParamIo<'a>,
    pub grad: Tensor<'a>,
    pub momentum: TensorMut<'a>,
    pub prev_grad: TensorMut<'a>,
    pub noise: &'a mut [f32],
    pub valid: &'a mut [f32],
    pub prev_step: &'a mut [i32],
    /// Steps each layer was skipped for a non-finite gradient (this step's skip adds one).
    pub skipped: &'a mut [i32],
    pub ratio: &'a mut [f32],
}

/// Scratch for one layer at a time.
#[derive(Default)]
struct Scratch {
    g: Vec<f32>,
    b: Vec<f32>,
    v: Vec<f32>,
    d: Vec<f32>,
    ns: NsWorkspace,
}

impl Scratch {
    fn fit(&mut self, n: usize) {
        for buf in [&mut self.g, &mut self.b, &mut self.v, &mut self.d] {
            buf.resize(n, 0.0);
        }
    }
}

/// Raw norm (nuclear, l1 or l2) of `d` times the kind's dual-norm factor; the CPU's nuclear
/// norm is the Gram-eigenvalue estimator unless `nuclear` asks for the polar iteration.
pub fn dual_norm(kind: Kind, nuclear: NuclearEstimator, d: &[f32], shape: &LayerShape, ns: &mut NsWorkspace) -> f32 {
    let raw = match kind {
        Kind::Hidden if nuclear == NuclearEstimator::Polar => nuclear_norm_polar(d, shape.rows, shape.cols, ns),
        Kind::Hidden => nuclear_norm(d, shape.rows, shape.cols, ns),
        Kind::Embed => kernels::l1(d),
        Kind::Vector => kernels::l2(d),
        Kind::Adam => 0.0, // measures no noise (StepConfig::validate)
    };
    raw * step::dual_norm_factor(kind, shape)
}

/// D_kind(v) into `out` for the LMO kinds (an adam layer's direction is `apply_adam`'s).
pub fn direction(cfg: &StepConfig, v: &[f32], shape: &LayerShape, out: &mut [f32], ns: &mut NsWorkspace) {
    match cfg.kind {
        Kind::Hidden => newton_schulz(v, shape.rows, shape.cols, &cfg.ns_coeffs, out, ns, true),
        Kind::Embed => kernels::sign(v, out),
        Kind::Vector => kernels::rms_normalize(v, cfg.vector_eps, out),
        Kind::Adam => out.copy_from_slice(v), // not reached: `apply` sends adam layers to `apply_adam`
    }
}

/// One layer of a leaf: its slices of the leaf's tensors and its per-layer state.
struct Layer<'a> {
    shape: LayerShape,
    params: ParamIo<'a>,
    grad: Tensor<'a>,
    momentum: TensorMut<'a>,
    prev_grad: TensorMut<'a>,
    noise: &'a mut f32,
    valid: &'a mut f32,
    prev_step: &'a mut i32,
    skipped_count: &'a mut i32,
    ratio: &'a mut f32,
    /// Its noise phase: steps t = phase (mod K) refresh its tracker (`StepConfig::is_noise_step`).
    phase: i32,
    /// It gets a zero update and keeps X this step: its gradient was not finite (phase 1 sets
    /// this, and then leaves its state as it was).
    skipped: bool,
}

impl Layer<'_> {
    /// Folds this step's dual norm of G - G_prev into the tracker H (a norm that would make H
    /// non-finite is dropped, so one overflow cannot pin the layer's rate at 0 for good; a
    /// positive one makes the tracker valid).
    fn record_noise(&mut self, norm: f32, beta2: f32) {
        let tracked = step::track_noise(*self.noise, norm, beta2);
        if tracked.is_finite() {
            *self.noise = tracked;
            if norm > 0.0 {
                *self.valid = 1.0;
            }
        }
    }

    /// Relative cost of its direction, to hand out the most expensive layers first.
    fn cost(&self) -> usize {
        if self.skipped {
            return 0;
        }
        let n = self.shape.layer_len();
        n.saturating_mul(self.shape.rows.min(self.shape.cols).max(1))
    }
}

/// Every layer of every leaf, in leaf order (the order of the group's ratio statistic and of
/// `phases`, one per layer).
fn split_layers<'b>(leaves: &'b mut [LeafIo], phases: &[i32]) -> Vec<Layer<'b>> {
    let mut out = Vec::new();
    let mut phase = phases.iter().copied();
    for leaf in leaves.iter_mut().filter(|lf| lf.shape.layers > 0) {
        // (A leaf without layers has no data; its layer size need not be allocatable.)
        let (shape, n) = (leaf.shape, leaf.shape.layer_len());
        let count = shape.layers;
        let params = leaf.params.pieces(|x| x.split(count, n), |x| x.split_mut(count, n));
        let per_layer = params
            .into_iter()
            .zip(leaf.grad.split(count, n))
            .zip(leaf.momentum.split_mut(count, n).into_iter().zip(leaf.prev_grad.split_mut(count, n)))
            .zip(leaf.noise.iter_mut().zip(leaf.valid.iter_mut()))
            .zip(leaf.prev_step.iter_mut().zip(leaf.ratio.iter_mut()))
            .zip(leaf.skipped.iter_mut());
        for (((((params, grad), (momentum, prev_grad)), (noise, valid)), (prev_step, ratio)), skipped_count) in per_layer {
            out.push(Layer {
                shape,
                params,
                grad,
                momentum,
                prev_grad,
                noise,
                valid,
                prev_step,
                skipped_count,
                ratio,
                phase: phase.next().unwrap_or(0),
                skipped: false,
            });
        }
    }
    out
}

/// Runs `f` on every layer. With at least two layers per thread, each thread takes whole
/// layers (the most expensive first) and keeps their products to itself; otherwise the layers
/// go one by one with the products split across the pool.
fn for_each_layer<F>(layers: &mut [Layer], f: F)
where
    F: Fn(&mut Layer, &mut Scratch) + Sync,
{
    let threads = rayon::current_num_threads();
    if threads < 2 || layers.len() < 2 * threads {
        let mut s = Scratch::default();
        layers.iter_mut().for_each(|l| f(l, &mut s));
        return;
    }
    let mut order: Vec<&mut Layer> = layers.iter_mut().collect();
    order.sort_by_key(|l| std::cmp::Reverse(l.cost()));
    let queue = std::sync::Mutex::new(order.into_iter());
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
    rayon::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|_| {
                let mut s = Scratch::default();
                super::gemm::serial(|| {
                    while let Some(layer) = next() {
                        f(layer, &mut s);
                    }
                })
            });
        }
    });
}

/// One LANTON step for every layer of every leaf of one group; `phases` holds every layer's
/// noise phase in leaf order (`step::noise_phases`; callers check its length). Runs on lanton's
/// GEMM pool; fails (touching nothing) if that pool cannot run, e.g. `LANTON_NUM_THREADS` is invalid.
pub fn group_step(cfg: &StepConfig, hyper: &Hyper, t: i32, phases: &[i32], leaves: &mut [LeafIo]) -> Result<(), PoolError> {
    super::gemm::pool()?.install(|| group_step_on_pool(cfg, hyper, t, phases, leaves));
    Ok(())
}

fn group_step_on_pool(cfg: &StepConfig, h: &Hyper, t: i32, phases: &[i32], leaves: &mut [LeafIo]) {
    let mut layers = split_layers(leaves, phases);
    // Phase 1: momentum and the noise tracker, per layer; a skipped layer is counted.
    for_each_layer(&mut layers, |layer, s| {
        track(cfg, h, t, layer, s);
        if layer.skipped {
            *layer.skipped_count = layer.skipped_count.saturating_add(1);
        }
    });
    if cfg.kind == Kind::Adam {
        // No ratios: the second moment, the direction and the write-out, per layer.
        let rule = step::AdamRule::new(cfg, h, t);
        return for_each_layer(&mut layers, |layer, _| apply_adam(&rule, h, layer));
    }
    // Phase 2: the within-group ratio r from every layer's tracker.
    let noise: Vec<f32> = layers.iter().map(|l| *l.noise).collect();
    let valid: Vec<bool> = layers.iter().map(|l| *l.valid > 0.5).collect();
    let mut ratios = vec![1.0f32; noise.len()];
    if cfg.noise_adaptive {
        step::group_ratios(&noise, &valid, cfg.ratio_rule(), &mut ratios);
    }
    for (layer, r) in layers.iter_mut().zip(ratios) {
        *layer.ratio = r;
    }
    // Phase 3: direction, weight decay and the write-out.
    for_each_layer(&mut layers, |layer, s| apply(cfg, h, layer, s));
}

/// Phase 1 for one layer: momentum, and on noise steps the tracker H from ||G - G_prev||.
fn track(cfg: &StepConfig, h: &Hyper, t: i32, layer: &mut Layer, s: &mut Scratch) {
    if cfg.kind == Kind::Adam {
        // Its moments are updated with the write-out (`apply_adam`, one pass over the layer).
        layer.skipped = !all_finite_chunks(&layer.grad);
        return;
    }
    if cfg.kind == Kind::Embed {
        return track_elementwise(cfg, h, t, layer);
    }
    let shape = layer.shape;
    s.fit(shape.layer_len());
    layer.grad.read(0, &mut s.g);
    layer.skipped = !kernels::all_finite(&s.g);
    if layer.skipped {
        return; // Non-finite gradient: this layer's state stays as it was.
    }
    layer.momentum.read(0, &mut s.b);
    kernels::momentum(&mut s.b, &s.g, h.beta1);
    layer.momentum.write(0, &s.b);
    if cfg.is_noise_step(t, layer.phase) && step::prev_grad_usable(*layer.prev_step, t) {
        layer.prev_grad.read(0, &mut s.d);
        s.d.iter_mut().zip(&s.g).for_each(|(d, &g)| *d = g - *d);
        let mut n = dual_norm(cfg.kind, cfg.nuclear, &s.d, &shape, &mut s.ns);
        if cfg.noise_relative {
            n /= dual_norm(cfg.kind, cfg.nuclear, &s.b, &shape, &mut s.ns); // B = 0: dropped as non-finite
        }
        layer.record_noise(n, h.beta2);
    }
    if cfg.stores_prev_grad(t, layer.phase) {
        layer.prev_grad.write(0, &s.g);
        *layer.prev_step = t;
    }
}

/// Phase 3 for one layer: delta = -lr * (wd * X + r * (s * D(B))), written as the update or
/// into the parameters.
fn apply(cfg: &StepConfig, h: &Hyper, layer: &mut Layer, s: &mut Scratch) {
    if cfg.kind == Kind::Embed {
        return apply_elementwise(cfg, h, layer);
    }
    let shape = layer.shape;
    s.fit(shape.layer_len());
    if layer.skipped {
        return layer.params.write_step(None, &mut s.d, &mut s.g);
    }
    layer.momentum.read(0, &mut s.b);
    if cfg.nesterov {
        layer.grad.read(0, &mut s.g);
        s.v.iter_mut().zip(s.b.iter().zip(&s.g)).for_each(|(v, (&b, &g))| *v = h.beta1 * b + (1.0 - h.beta1) * g);
    } else {
        s.v.copy_from_slice(&s.b);
    }
    direction(cfg, &s.v, &shape, &mut s.d, &mut s.ns);
    let write = step::Write::new(cfg.kind, h, &shape, *layer.ratio);
    layer.params.write_step(Some(&write), &mut s.d, &mut s.g);
}

/// Embedding layers (sign direction, l1 noise: elementwise work and sums) go through in pieces
/// of this many elements, spread over the pool: no whole-layer scratch (a 50257 x 768 embedding
/// took 4 x 154 MB of fresh memory per phase, ~1 s of a GPT-2-small step) and every thread's
/// memory bandwidth. 16 Ki f32 = 64 KiB, below malloc's mmap threshold.
const CHUNK: usize = 1 << 14;

/// Is every entry of `grad` finite? Piece by piece, over the pool.
fn all_finite_chunks(grad: &Tensor) -> bool {
    use rayon::prelude::*;
    grad.chunks(CHUNK)
        .par_iter()
        .map_init(|| vec![0.0f32; CHUNK], |g, gt| {
            let g = &mut g[..gt.len()];
            gt.read(0, g);
            kernels::all_finite(g)
        })
        .all(|ok| ok)
}

/// `track` for an embed layer, piece by piece; the same arithmetic per element.
fn track_elementwise(cfg: &StepConfig, h: &Hyper, t: i32, layer: &mut Layer) {
    use rayon::prelude::*;
    let buf = || vec![0.0f32; CHUNK];
    layer.skipped = !all_finite_chunks(&layer.grad);
    let grads = layer.grad.chunks(CHUNK);
    if layer.skipped {
        return; // Non-finite gradient: this layer's state stays as it was.
    }
    let noise_now = cfg.is_noise_step(t, layer.phase) && step::prev_grad_usable(*layer.prev_step, t);
    let keep = cfg.stores_prev_grad(t, layer.phase);
    let pieces = grads.into_par_iter().zip(layer.momentum.chunks_mut(CHUNK)).zip(layer.prev_grad.chunks_mut(CHUNK));
    // (l1 of G - G_prev, l1 of the new momentum B) over the pieces; the second only if needed.
    let (noise_l1, signal_l1): (f64, f64) = pieces
        .map_init(
            || (buf(), buf()),
            |(g, b), ((gt, mut mt), mut pt)| {
                let n = gt.len();
                let (g, b) = (&mut g[..n], &mut b[..n]);
                gt.read(0, g);
                mt.read(0, b);
                kernels::momentum(b, g, h.beta1);
                mt.write(0, b);
                let mut part = (0.0f64, 0.0f64);
                if noise_now {
                    if cfg.noise_relative {
                        part.1 = kernels::l1_f64(b);
                    }
                    pt.read(0, b);
                    part.0 = g.iter().zip(b.iter()).map(|(&g, &p)| ((g - p) as f64).abs()).sum();
                }
                if keep {
                    pt.write(0, g);
                }
                part
            },
        )
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    if noise_now {
        let factor = step::dual_norm_factor(cfg.kind, &layer.shape);
        let mut n = noise_l1 as f32 * factor;
        if cfg.noise_relative {
            n /= signal_l1 as f32 * factor; // B = 0: dropped as non-finite
        }
        layer.record_noise(n, h.beta2);
    }
    if keep {
        *layer.prev_step = t;
    }
}

/// `apply` for an embed layer, piece by piece: delta = -lr * (wd * X + r * (s * sign(B))).
fn apply_elementwise(cfg: &StepConfig, h: &Hyper, layer: &mut Layer) {
    use rayon::prelude::*;
    let write = step::Write::new(cfg.kind, h, &layer.shape, *layer.ratio);
    let (skipped, nesterov, beta1) = (layer.skipped, cfg.nesterov, h.beta1);
    let moms = layer.momentum.as_ref().chunks(CHUNK);
    let grads = layer.grad.chunks(CHUNK);
    let buf = || (vec![0.0f32; CHUNK], vec![0.0f32; CHUNK], vec![0.0f32; CHUNK]);
    let pieces = layer.params.pieces(|x| x.chunks(CHUNK), |x| x.chunks_mut(CHUNK));
    pieces.into_par_iter().zip(moms).zip(grads).for_each_init(buf, |(b, g, d), ((mut piece, mt), gt)| {
        let n = mt.len();
        let (b, g, d) = (&mut b[..n], &mut g[..n], &mut d[..n]);
        if !skipped {
            // D = sign(B), or sign(b1 B + (1 - b1) G) with Nesterov.
            mt.read(0, b);
            if nesterov {
                gt.read(0, g);
                b.iter_mut().zip(g.iter()).for_each(|(b, &g)| *b = beta1 * *b + (1.0 - beta1) * g);
            }
            kernels::sign(b, d);
        }
        piece.write_step((!skipped).then_some(&write), d, g);
    });
}

/// Phases 1 and 3 for an adam layer in one pass, piece by piece (`track` checked its gradient):
/// B <- b1*B + (1-b1)*G, nu <- b2*nu + (1-b2)*G^2 in the G_prev buffer, D = `AdamRule::direction`
/// of the moments as stored, then the write-out delta = -lr * (wd * X + 1 * (s * D)). A skipped
/// layer keeps its moments and gets a zero update.
fn apply_adam(rule: &step::AdamRule, h: &Hyper, layer: &mut Layer) {
    use rayon::prelude::*;
    let write = step::Write::new(Kind::Adam, h, &layer.shape, 1.0);
    *layer.ratio = 1.0;
    let skipped = layer.skipped;
    let moms = layer.momentum.chunks_mut(CHUNK);
    let grads = layer.grad.chunks(CHUNK);
    let nus = layer.prev_grad.chunks_mut(CHUNK);
    let buf = || (vec![0.0f32; CHUNK], vec![0.0f32; CHUNK], vec![0.0f32; CHUNK], vec![0.0f32; CHUNK]);
    let pieces = layer.params.pieces(|x| x.chunks(CHUNK), |x| x.chunks_mut(CHUNK));
    pieces.into_par_iter().zip(moms).zip(grads).zip(nus).for_each_init(buf, |(b, g, v, d), (((mut piece, mut mt), gt), mut nt)| {
        let n = gt.len();
        let (b, g, v, d) = (&mut b[..n], &mut g[..n], &mut v[..n], &mut d[..n]);
        if !skipped {
            mt.read(0, b);
            gt.read(0, g);
            nt.read(0, v);
            kernels::momentum(b, g, rule.b1);
            mt.write(0, b);
            if !matches!(mt, TensorMut::F32(_)) {
                mt.read(0, b); // the momentum as stored (its dtype's rounding), as the CUDA kernel reads it
            }
            for i in 0..n {
                v[i] = rule.second_moment(v[i], g[i]);
                d[i] = rule.direction(b[i], v[i], g[i]);
            }
            nt.write(0, v);
        }
        piece.write_step((!skipped).then_some(&write), d, g);
    });
}
