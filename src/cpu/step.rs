//! The LANTON group step on host memory, following the rules of `crate::step`.

use super::gemm::PoolError;
use super::kernels;
use super::newton_schulz::{newton_schulz, nuclear_norm, nuclear_norm_polar, NsWorkspace};
use crate::ffi::{Tensor, TensorMut};
use crate::step::{self, Hyper, Kind, LayerShape, NuclearEstimator, StepConfig};

/// How the step's result leaves the kernel.
pub enum ParamIo<'a> {
    /// optax convention: the update (delta) is written beside read-only parameters.
    Update { param: Tensor<'a>, update: TensorMut<'a> },
    /// The fused path: parameters are rewritten in place.
    InPlace { param: TensorMut<'a> },
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
    };
    raw * step::dual_norm_factor(kind, shape)
}

/// D_kind(v) into `out`.
pub fn direction(cfg: &StepConfig, v: &[f32], shape: &LayerShape, out: &mut [f32], ns: &mut NsWorkspace) {
    match cfg.kind {
        Kind::Hidden => newton_schulz(v, shape.rows, shape.cols, &cfg.ns_coeffs, out, ns, true),
        Kind::Embed => kernels::sign(v, out),
        Kind::Vector => kernels::rms_normalize(v, cfg.vector_eps, out),
    }
}

/// One LANTON step for every layer of every leaf of one group. Runs on lanton's GEMM pool;
/// fails (touching nothing) if that pool cannot run, e.g. `LANTON_NUM_THREADS` is invalid.
pub fn group_step(cfg: &StepConfig, hyper: &Hyper, t: i32, leaves: &mut [LeafIo]) -> Result<(), PoolError> {
    super::gemm::pool()?.install(|| group_step_on_pool(cfg, hyper, t, leaves));
    Ok(())
}

fn group_step_on_pool(cfg: &StepConfig, h: &Hyper, t: i32, leaves: &mut [LeafIo]) {
    let mut s = Scratch::default();
    let noise_step = cfg.is_noise_step(t);
    let keep_grad = cfg.stores_prev_grad(t);
    let mut skipped: Vec<bool> = Vec::new();

    // Phase 1: momentum and the noise tracker, layer by layer.
    for leaf in leaves.iter_mut().filter(|lf| lf.shape.layers > 0) {
        // (A leaf without layers has no data; its layer size need not be allocatable.)
        let (shape, n) = (leaf.shape, leaf.shape.layer_len());
        s.fit(n);
        for l in 0..shape.layers {
            let off = l * n;
            leaf.grad.read(off, &mut s.g);
            let finite = kernels::all_finite(&s.g);
            skipped.push(!finite);
            if !finite {
                continue; // Non-finite gradient: this layer's state stays as it was.
            }
            leaf.momentum.read(off, &mut s.b);
            kernels::momentum(&mut s.b, &s.g, h.beta1);
            leaf.momentum.write(off, &s.b);
            if noise_step && step::prev_grad_usable(leaf.prev_step[l], t) {
                leaf.prev_grad.read(off, &mut s.d);
                s.d.iter_mut().zip(&s.g).for_each(|(d, &g)| *d = g - *d);
                let norm = dual_norm(cfg.kind, cfg.nuclear, &s.d, &shape, &mut s.ns);
                if norm.is_finite() {
                    leaf.noise[l] = step::track_noise(leaf.noise[l], norm, h.beta2);
                    if norm > 0.0 {
                        leaf.valid[l] = 1.0;
                    }
                }
            }
            if keep_grad {
                leaf.prev_grad.write(off, &s.g);
                leaf.prev_step[l] = t;
            }
        }
    }

    // Phase 2: the within-group ratio r from every layer's tracker.
    let noise: Vec<f32> = leaves.iter().flat_map(|lf| lf.noise.iter().copied()).collect();
    let valid: Vec<bool> = leaves.iter().flat_map(|lf| lf.valid.iter().map(|&v| v > 0.5)).collect();
    let mut ratios = vec![1.0f32; noise.len()];
    if cfg.noise_adaptive {
        step::group_ratios(&noise, &valid, cfg.ratio_stat, cfg.ratio_eps, &mut ratios);
    }

    // Phase 3: direction, weight decay and the write-out.
    let mut idx = 0;
    for leaf in leaves.iter_mut().filter(|lf| lf.shape.layers > 0) {
        let (shape, n) = (leaf.shape, leaf.shape.layer_len());
        s.fit(n);
        let scale = step::update_scale(cfg.kind, h.scale, &shape);
        for l in 0..shape.layers {
            let (off, r, skip) = (l * n, ratios[idx], skipped[idx]);
            idx += 1;
            leaf.ratio[l] = r;
            if skip {
                if let ParamIo::Update { update, .. } = &mut leaf.params {
                    s.d.fill(0.0);
                    update.write(off, &s.d);
                }
                continue;
            }
            leaf.momentum.read(off, &mut s.b);
            if cfg.nesterov {
                leaf.grad.read(off, &mut s.g);
                s.v.iter_mut().zip(s.b.iter().zip(&s.g)).for_each(|(v, (&b, &g))| *v = h.beta1 * b + (1.0 - h.beta1) * g);
            } else {
                s.v.copy_from_slice(&s.b);
            }
            direction(cfg, &s.v, &shape, &mut s.d, &mut s.ns);
            // delta = -lr * (wd * X + s * r * D); X arrives in s.g.
            let (step_d, step_x) = (-h.lr * scale * r, -h.lr * h.weight_decay);
            match &mut leaf.params {
                ParamIo::Update { param, update } => {
                    param.read(off, &mut s.g);
                    s.d.iter_mut().zip(&s.g).for_each(|(d, &x)| *d = step_d * *d + step_x * x);
                    update.write(off, &s.d);
                }
                ParamIo::InPlace { param } => {
                    param.read(off, &mut s.g);
                    s.d.iter_mut().zip(&s.g).for_each(|(d, &x)| *d = x + step_d * *d + step_x * x);
                    param.write(off, &s.d);
                }
            }
        }
    }
}
