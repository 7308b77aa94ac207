//! The LANTON step, defined once (../shared/ALGORITHM.md §2). Backends (CPU, CUDA) implement the
//! numeric kernels; the rules that decide *what* happens on a step live here:
//!
//! ```text
//! for every layer l of the group (step t = 1, 2, ...):
//!   skip the layer entirely if G has a non-finite entry (state untouched, zero update)
//!   B  = b1*B + (1-b1)*G                                   momentum
//!   if noise step t and G_prev was stored at step t-1:     (Option I)
//!       n = dual_norm(G - G_prev)
//!       relative (option): n = n / dual_norm(B)   noise-to-signal (B: this step's momentum)
//!       H = b2*H + (1-b2)*n^2;  valid |= n > 0      (dropped, H and valid kept, unless finite)
//!   if step t+1 is a noise step: G_prev = G
//! noise steps of layer l: t >= 2 with t = phase_l (mod K)    phase_l: 0 for every layer (the
//!   paper's synchronous cadence), or staggered: l's index among the group's layers of its
//!   shape, mod K, so every step refreshes about 1/K of each shape (`noise_phases`)
//! alpha_l = (H_l + eps)^(-1/2) for valid l;  r_l = alpha_l / stat_{valid j}(alpha_j), else 1
//! shaped (options):  r_l = max(r_min, r_l^p)     default p = 0.5, r_min = 0 (docs/decisions.md);
//!                                                 the paper's rule: p = 1, stat = max (`paper`)
//! capped (option):  r_l = min(cap, shaped r_l)  cap: 1 for stat = median (the default), so no single
//!                                                 quiet layer sets everyone's rate; none for the others
//! for every layer l:
//!   V = nesterov ? b1*B + (1-b1)*G : B
//!   delta = -lr * (wd*X + r_l * (s(kind, shape) * D_kind(V)))    (this order on every path: `Write`)
//! ```
//!
//! The `adam` kind is not an LMO geometry: it steps its leaves by NAdamW exactly as
//! optax.contrib.muon's Adam branch does (`AdamRule`), with the same skip rule and write-out
//! (r = 1, no noise tracking; its second moment nu, f32, lives in the G_prev buffer):
//!
//! ```text
//!   B = b1*B + (1-b1)*G;  nu = b2*nu + (1-b2)*G^2
//!   D = (b1/(1-b1^(t+1))*B + (1-b1)/(1-b1^t)*G) / (sqrt(nu/(1-b2^t) + eps_root) + eps)   (Nesterov)
//!   delta = -lr * (wd*X + 1 * (s * D))                                         s = scale (1 by default)
//! ```

use std::fmt;

pub mod layout;
pub mod options;

/// The LMO geometry of a group (ALGORITHM.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// RMS->RMS operator norm: Newton-Schulz polar factor; noise in scaled nuclear norm.
    Hidden,
    /// l1->linf operator norm: sign; noise in entrywise l1.
    Embed,
    /// RMS norm: B / (rms(B) + eps); noise in sqrt(d)*l2.
    Vector,
    /// Elementwise NAdamW (optax.contrib.muon's Adam branch, `AdamRule`): no noise tracking, r = 1.
    Adam,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "hidden" => Some(Kind::Hidden),
            "embed" => Some(Kind::Embed),
            "vector" => Some(Kind::Vector),
            "adam" => Some(Kind::Adam),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Hidden => "hidden",
            Kind::Embed => "embed",
            Kind::Vector => "vector",
            Kind::Adam => "adam",
        })
    }
}

/// Reference statistic over the group's alpha = (H + eps)^(-1/2) (`Median` by default; the
/// paper's, reconstructed, is `Max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatioStat {
    Max,
    Mean,
    Min,
    /// The median (the mean of the two middle values for an even count), with r capped at 1:
    /// the quieter half of the group steps at the base rate. Robust to one layer whose gradient
    /// fades (H -> 0, alpha -> inf), which under `Max` throttles every other layer of its group
    /// (benches/results/quality, issue 14).
    Median,
}

impl RatioStat {
    pub fn parse(s: &str) -> Option<RatioStat> {
        match s {
            "max" => Some(RatioStat::Max),
            "mean" => Some(RatioStat::Mean),
            "min" => Some(RatioStat::Min),
            "median" => Some(RatioStat::Median),
            _ => None,
        }
    }

    /// The cap on r when none is given: 1 for `Median` (the quieter half steps at the base
    /// rate), none (infinity) for the others, whose r is bounded by the statistic itself or not
    /// meant to be.
    pub fn default_cap(self) -> f32 {
        if self == RatioStat::Median { 1.0 } else { f32::INFINITY }
    }
}

/// Keller Jordan's quintic coefficients, 5 steps: the default direction for `hidden`.
pub const NS_DEFAULT: [f32; 3] = [3.4445, -4.7750, 2.0315];
pub const NS_DEFAULT_STEPS: usize = 5;

/// Polar factor used for the nuclear norm: the quintic above to lift small singular values into
/// [~0.7, ~1.2], then the classic convergent quintic (15, -10, 3)/8 to pin them at 1.
/// 5 + 2 steps: worst relative error 0.24 % on 768x768 power-law spectra, 0.13 % on smaller
/// gradient-like matrices (4 + 2 exceeds 1 %); see tests/kernels.rs.
/// <D, polar(D)> = ||D||_* (ALGORITHM.md: <D, NS5(D)> alone is not accurate enough).
pub const NUCLEAR_LIFT_STEPS: usize = 5;
pub const NUCLEAR_REFINE: [f32; 3] = [15.0 / 8.0, -10.0 / 8.0, 3.0 / 8.0];
pub const NUCLEAR_REFINE_STEPS: usize = 2;

pub fn nuclear_schedule() -> Vec<[f32; 3]> {
    let mut s = vec![NS_DEFAULT; NUCLEAR_LIFT_STEPS];
    s.extend(std::iter::repeat(NUCLEAR_REFINE).take(NUCLEAR_REFINE_STEPS));
    s
}

/// How a hidden group's noise estimate computes ||G - G_prev||_* (ALGORITHM.md: any estimate
/// within 1 % will do). Each backend has its own default (`Auto`): the CPU's is `GramEigen`
/// (the Gram matrix's sum of sqrt(eigenvalues): 0.21-0.34x a Newton-Schulz-5 there), the
/// GPU's `Polar` (7 batched polar iterations, on lanton's own f32 GEMM kernel so that they can be
/// gated on the device step count; a per-matrix eigensolver is latency-bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NuclearEstimator {
    Auto,
    GramEigen,
    Polar,
}

impl NuclearEstimator {
    pub fn parse(s: &str) -> Option<NuclearEstimator> {
        match s {
            "auto" => Some(NuclearEstimator::Auto),
            "eigen" => Some(NuclearEstimator::GramEigen),
            "polar" => Some(NuclearEstimator::Polar),
            _ => None,
        }
    }
}

/// When each layer's noise tracker is refreshed, once every K steps (ALGORITHM.md §2 allows
/// either): all layers on the same steps, or a fixed 1/K of each shape class per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseSchedule {
    /// Every layer on steps t = 0 (mod K): the paper's cadence (the noise work comes in bursts).
    Synchronous,
    /// Layer i of a shape class (counted over the group in leaf order) on steps t = i (mod K):
    /// every step does the same amount of noise work (no spike every K steps).
    Staggered,
}

impl NoiseSchedule {
    pub fn parse(s: &str) -> Option<NoiseSchedule> {
        match s {
            "synchronous" => Some(NoiseSchedule::Synchronous),
            "staggered" => Some(NoiseSchedule::Staggered),
            _ => None,
        }
    }
}

/// Each layer's phase (steps t = phase mod K refresh its tracker), in leaf order: the one
/// definition of the schedule's map (the Python package's `_plan.noise_phases` is its twin,
/// tested equal through the FFI). A shape class is (rows, cols).
pub fn noise_phases(schedule: NoiseSchedule, every: u32, shapes: &[LayerShape]) -> Vec<i32> {
    let total: usize = shapes.iter().map(|s| s.layers).sum();
    if schedule == NoiseSchedule::Synchronous {
        return vec![0; total];
    }
    let mut seen: Vec<((usize, usize), u64)> = Vec::new();
    let mut out = Vec::with_capacity(total);
    for sh in shapes {
        let key = (sh.rows, sh.cols);
        let at = seen.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
            seen.push((key, 0));
            seen.len() - 1
        });
        for _ in 0..sh.layers {
            out.push((seen[at].1 % every.max(1) as u64) as i32);
            seen[at].1 += 1;
        }
    }
    out
}

/// Structural choices: compile-time attributes of the custom call.
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    pub kind: Kind,
    /// One (a, b, c) triple per Newton-Schulz step (hidden only).
    pub ns_coeffs: Vec<[f32; 3]>,
    /// K: a layer's noise tracker is refreshed on steps t >= 2 with t = phase (mod K).
    pub noise_every: u32,
    /// How the phases are chosen (`noise_phases`); the kernels take them as data.
    pub noise_schedule: NoiseSchedule,
    /// false: r = 1 always and no noise work (the D-Muon / Scion-like baseline).
    pub noise_adaptive: bool,
    pub ratio_stat: RatioStat,
    /// eps in alpha = (H + eps)^(-1/2).
    pub ratio_eps: f32,
    /// Ratio shaping (our option, not the paper's): r = max(ratio_floor, (alpha/ref)^ratio_power)
    /// for valid layers. p < 1 tempers the spread of the rates, r_min bounds how far a noisy
    /// layer's rate may fall. Defaults 0.5 and 0; the paper's r = alpha/ref is p = 1.
    pub ratio_power: f32,
    pub ratio_floor: f32,
    /// r <= ratio_cap (infinity: no cap). Default `RatioStat::default_cap` of the statistic.
    pub ratio_cap: f32,
    /// Noise measured relative to the layer's signal (our option, issue 14): H tracks
    /// (||G - G_prev|| / ||B||)^2 in the group's dual norm, B the momentum just updated, so a
    /// layer's rate follows its noise-to-signal ratio rather than its raw noise. false: the paper's
    /// absolute noise.
    pub noise_relative: bool,
    pub nesterov: bool,
    /// eps in B / (rms(B) + eps) for `vector`.
    pub vector_eps: f32,
    /// The noise estimate's nuclear norm (hidden groups).
    pub nuclear: NuclearEstimator,
    /// eps and eps_root of the `adam` kind: D = m / (sqrt(v + eps_root) + eps) (optax's names).
    pub adam_eps: f32,
    pub adam_eps_root: f32,
}

impl StepConfig {
    /// lanton's defaults: the one set every front end uses for an option it is not given (the
    /// Python package's `StepConfig`, the XLA attributes, the C ABI's JSON keys; the reasons
    /// are in docs/decisions.md).
    /// An `adam` group tracks no noise and uses Nesterov momentum (optax.contrib.muon's Adam
    /// branch: `optax.adamw(nesterov=True)`), so its defaults differ in those two.
    pub fn new(kind: Kind) -> Self {
        let adam = kind == Kind::Adam;
        StepConfig {
            kind,
            ns_coeffs: vec![NS_DEFAULT; NS_DEFAULT_STEPS],
            noise_every: 10,
            noise_schedule: NoiseSchedule::Staggered,
            noise_adaptive: !adam,
            ratio_stat: RatioStat::Median,
            ratio_eps: 1e-30,
            ratio_power: 0.5,
            ratio_floor: 0.0,
            ratio_cap: RatioStat::Median.default_cap(),
            noise_relative: false,
            nesterov: adam,
            vector_eps: 1e-8,
            nuclear: NuclearEstimator::Auto,
            adam_eps: 1e-8,
            adam_eps_root: 0.0,
        }
    }

    /// The paper's rule (as reconstructed): r = alpha / max alpha, K = 10, every layer's noise
    /// refreshed on the same steps.
    pub fn paper(kind: Kind) -> Self {
        StepConfig {
            ratio_stat: RatioStat::Max,
            ratio_power: 1.0,
            ratio_floor: 0.0,
            ratio_cap: RatioStat::Max.default_cap(),
            noise_schedule: NoiseSchedule::Synchronous,
            ..StepConfig::new(kind)
        }
    }

    #[allow(clippy::neg_cmp_op_on_partial_ord)] // !(x >= 0) also rejects NaN
    pub fn validate(&self) -> Result<(), String> {
        if self.noise_every == 0 {
            return Err("noise_every must be >= 1".into());
        }
        if !(self.ratio_eps >= 0.0) || !(self.vector_eps >= 0.0) {
            return Err("epsilons must be non-negative".into());
        }
        if !(self.ratio_power >= 0.0 && self.ratio_power.is_finite()) {
            return Err(format!("ratio_power must be finite and >= 0, got {}", self.ratio_power));
        }
        if !(self.ratio_floor >= 0.0 && self.ratio_floor.is_finite()) {
            return Err(format!("ratio_floor must be finite and >= 0, got {}", self.ratio_floor));
        }
        if !(self.ratio_cap > 0.0 && self.ratio_cap >= self.ratio_floor) {
            return Err(format!("ratio_cap must be > 0 and >= ratio_floor ({}), got {}", self.ratio_floor, self.ratio_cap));
        }
        if self.kind == Kind::Hidden && self.ns_coeffs.is_empty() {
            return Err("hidden groups need at least one Newton-Schulz step".into());
        }
        if !(self.adam_eps >= 0.0 && self.adam_eps.is_finite()) || !(self.adam_eps_root >= 0.0 && self.adam_eps_root.is_finite()) {
            return Err(format!("adam_eps and adam_eps_root must be finite and >= 0, got {} and {}", self.adam_eps, self.adam_eps_root));
        }
        if self.kind == Kind::Adam && (self.noise_adaptive || self.noise_relative) {
            return Err("'noise_adaptive': an adam group tracks no noise (its ratio is 1); pass noise_adaptive false".into());
        }
        Ok(())
    }

    /// Is the noise tracker of a layer of this `phase` refreshed on step t (1-based)? Step 1
    /// has no previous gradient. Any phase is taken mod K (so data cannot make it undefined).
    /// (In i64: K may exceed i32::MAX, and t + 1 must not overflow at t = i32::MAX.)
    pub fn is_noise_step(&self, t: i32, phase: i32) -> bool {
        self.is_noise_step_i64(t as i64, phase)
    }

    fn is_noise_step_i64(&self, t: i64, phase: i32) -> bool {
        self.noise_adaptive && t >= 2 && (t - phase as i64).rem_euclid(self.noise_every.max(1) as i64) == 0
    }

    /// Must G be kept as G_prev on step t? Only when step t+1 will use it.
    pub fn stores_prev_grad(&self, t: i32, phase: i32) -> bool {
        self.is_noise_step_i64(t as i64 + 1, phase)
    }
}

/// G_prev is a real previous gradient only if it was stored on the step just before.
pub fn prev_grad_usable(prev_step: i32, t: i32) -> bool {
    prev_step >= 1 && prev_step == t - 1
}

/// Time-varying values: input buffers, so they can be traced and scheduled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub weight_decay: f32,
    /// Per-kind scale: hidden multiplies it by sqrt(max(d_in, d_out)); embed and vector use it as is.
    pub scale: f32,
}

/// Number of f32 entries of the `hyper` input buffer, in this order.
pub const HYPER_LEN: usize = 5;

impl Hyper {
    pub fn from_slice(h: &[f32]) -> Result<Hyper, String> {
        if h.len() != HYPER_LEN {
            return Err(format!("hyper must hold {HYPER_LEN} values (lr, beta1, beta2, weight_decay, scale), got {}", h.len()));
        }
        Ok(Hyper { lr: h[0], beta1: h[1], beta2: h[2], weight_decay: h[3], scale: h[4] })
    }
}

/// The write-out of one layer: delta = -lr * (wd * X + r * (s * D)), evaluated in this order,
/// element by element, by every backend, the pure-JAX reference and the work split of
/// `lanton._mesh` (which forms s * D on the layer's owner, then the rest once the group's ratios
/// are known): the same order gives the same f32 rounding, so a split run stores the same bf16
/// parameters as one device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Write {
    pub lr: f32,
    pub weight_decay: f32,
    /// s(kind, shape): `update_scale`.
    pub scale: f32,
    pub ratio: f32,
}

impl Write {
    pub fn new(kind: Kind, h: &Hyper, shape: &LayerShape, ratio: f32) -> Write {
        Write { lr: h.lr, weight_decay: h.weight_decay, scale: update_scale(kind, h.scale, shape), ratio }
    }

    #[inline]
    pub fn delta(&self, d: f32, x: f32) -> f32 {
        -self.lr * (self.weight_decay * x + self.ratio * (self.scale * d))
    }
}

/// A leaf seen as `layers` matrices of `rows x cols` (row-major); `rows_are_input` says which
/// axis is d_in (it matters only for the nuclear-norm scale sqrt(d_out/d_in)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub layers: usize,
    pub rows: usize,
    pub cols: usize,
    pub rows_are_input: bool,
}

impl LayerShape {
    pub fn layer_len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn d_in(&self) -> usize {
        if self.rows_are_input { self.rows } else { self.cols }
    }
    pub fn d_out(&self) -> usize {
        if self.rows_are_input { self.cols } else { self.rows }
    }
}

/// The most elements a layer, or a leaf, may have: isize::MAX / 8, so that its bytes at any
/// dtype (<= 8 bytes) and the kernels' per-layer f64 scratch stay addressable.
pub const MAX_ELEMENTS: usize = isize::MAX as usize / 8;

/// (elements of one layer, elements of the leaf) for `layers` matrices of `rows x cols`, or None
/// where either would exceed `MAX_ELEMENTS` (or overflow): the one size guard of every front end.
pub fn checked_elements(layers: usize, rows: usize, cols: usize) -> Option<(usize, usize)> {
    let layer = rows.checked_mul(cols).filter(|&n| n <= MAX_ELEMENTS)?;
    let total = layer.checked_mul(layers).filter(|&n| n <= MAX_ELEMENTS)?;
    Some((layer, total))
}

/// s_g(shape): D-Muon's RMS matching for hidden, constants for the other kinds.
pub fn update_scale(kind: Kind, scale: f32, shape: &LayerShape) -> f32 {
    match kind {
        Kind::Hidden => scale * (shape.rows.max(shape.cols) as f32).sqrt(),
        Kind::Embed | Kind::Vector | Kind::Adam => scale,
    }
}

/// Factor applied to the raw norm (nuclear, l1, l2) to get the dual norm of the group's kind.
pub fn dual_norm_factor(kind: Kind, shape: &LayerShape) -> f32 {
    match kind {
        Kind::Hidden => (shape.d_out() as f32 / shape.d_in() as f32).sqrt(),
        Kind::Embed | Kind::Adam => 1.0, // (an adam group measures no noise)
        Kind::Vector => (shape.layer_len() as f32).sqrt(),
    }
}

/// The `adam` kind's step on one element: NAdamW as optax.adamw computes it (optax's
/// scale_by_adam), with the bias corrections folded into three factors (one division per element
/// instead of three: within a few f32 ulps of optax's order; the CUDA kernel uses these factors).
/// `Write` then applies the rate and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamRule {
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub eps_root: f32,
    /// m = mu * mu_factor + g * grad_factor: b1/(1-b1^(t+1)) and (1-b1)/(1-b1^t) with Nesterov,
    /// else 1/(1-b1^t) and 0.
    pub mu_factor: f32,
    pub grad_factor: f32,
    /// 1/(1-b2^t).
    pub nu_factor: f32,
}

impl AdamRule {
    pub fn new(cfg: &StepConfig, h: &Hyper, t: i32) -> AdamRule {
        let (mu_factor, grad_factor, nu_factor) = adam_factors(h.beta1, h.beta2, t, cfg.nesterov);
        AdamRule { b1: h.beta1, b2: h.beta2, eps: cfg.adam_eps, eps_root: cfg.adam_eps_root, mu_factor, grad_factor, nu_factor }
    }

    /// nu <- b2*nu + (1-b2)*g^2 (the momentum B is the common b1*B + (1-b1)*G).
    #[inline]
    pub fn second_moment(&self, nu: f32, g: f32) -> f32 {
        self.b2 * nu + (1.0 - self.b2) * (g * g)
    }

    /// D from the new moments `mu`, `nu` and the gradient `g`.
    #[inline]
    pub fn direction(&self, mu: f32, nu: f32, g: f32) -> f32 {
        let m = mu * self.mu_factor + g * self.grad_factor;
        m / ((nu * self.nu_factor + self.eps_root).sqrt() + self.eps)
    }
}

/// (mu_factor, grad_factor, nu_factor) of `AdamRule` at step t, formed in f64 and rounded to f32
/// (the CUDA kernel's formula too).
pub fn adam_factors(b1: f32, b2: f32, t: i32, nesterov: bool) -> (f32, f32, f32) {
    let (b1, b2, t) = (b1 as f64, b2 as f64, t as f64);
    let bc = |decay: f64, t: f64| 1.0 - decay.powf(t);
    let nu = (1.0 / bc(b2, t)) as f32;
    if nesterov {
        ((b1 / bc(b1, t + 1.0)) as f32, ((1.0 - b1) / bc(b1, t)) as f32, nu)
    } else {
        ((1.0 / bc(b1, t)) as f32, 0.0, nu)
    }
}

/// H <- b2*H + (1-b2)*n^2, in f32.
pub fn track_noise(h: f32, n: f32, beta2: f32) -> f32 {
    beta2 * h + (1.0 - beta2) * n * n
}

/// How a group's ratios are formed from its alphas (the `StepConfig` fields of the same names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RatioRule {
    pub stat: RatioStat,
    pub eps: f32,
    pub power: f32,
    pub floor: f32,
    pub cap: f32,
}

impl RatioRule {
    /// The paper's rule: r = alpha / stat(alpha).
    pub fn plain(stat: RatioStat, eps: f32) -> Self {
        RatioRule { stat, eps, power: 1.0, floor: 0.0, cap: stat.default_cap() }
    }

    /// r = min(cap, max(floor, (alpha / reference)^power)), in f64 (the CUDA kernel's formula too).
    pub fn shape(&self, alpha_over_reference: f64) -> f64 {
        let r = if self.power == 1.0 { alpha_over_reference } else { alpha_over_reference.powf(self.power as f64) };
        r.max(self.floor as f64).min(self.cap as f64)
    }
}

impl StepConfig {
    pub fn ratio_rule(&self) -> RatioRule {
        RatioRule {
            stat: self.ratio_stat,
            eps: self.ratio_eps,
            power: self.ratio_power,
            floor: self.ratio_floor,
            cap: self.ratio_cap,
        }
    }
}

/// r_l = min(cap, max(floor, (alpha_l / stat_{valid j} alpha_j)^power)) with
/// alpha = (H + eps)^(-1/2); 1 where not valid.
pub fn group_ratios(noise: &[f32], valid: &[bool], rule: RatioRule, out: &mut [f32]) {
    let (stat, eps) = (rule.stat, rule.eps);
    let alpha = |h: f32| 1.0 / ((h as f64 + eps as f64).sqrt());
    let mut alphas: Vec<f64> = noise.iter().zip(valid).filter(|(_, &v)| v).map(|(&h, _)| alpha(h)).collect();
    let count = alphas.len();
    let reference = match stat {
        RatioStat::Max => alphas.iter().copied().fold(f64::MIN, f64::max),
        RatioStat::Mean => alphas.iter().sum::<f64>() / count.max(1) as f64,
        RatioStat::Min => alphas.iter().copied().fold(f64::MAX, f64::min),
        RatioStat::Median => median(&mut alphas),
    };
    for ((o, &h), &v) in out.iter_mut().zip(noise).zip(valid) {
        *o = if v && count > 0 && reference.is_finite() && reference > 0.0 {
            rule.shape(alpha(h) / reference) as f32
        } else {
            1.0
        };
    }
}

/// The median of `xs` (the mean of the two middle values for an even count; NaN when empty).
/// Sorts `xs`. NaN cannot occur here: alpha of a finite, non-negative H is a number.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    0.5 * (xs[(n - 1) / 2] + xs[n / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cadence_rules() {
        let mut c = StepConfig::new(Kind::Hidden);
        c.noise_every = 1;
        assert!(!c.is_noise_step(1, 0));
        assert!(c.is_noise_step(2, 0) && c.is_noise_step(3, 0));
        assert!(c.stores_prev_grad(1, 0));
        c.noise_every = 10;
        let noise: Vec<i32> = (1..=40).filter(|&t| c.is_noise_step(t, 0)).collect();
        assert_eq!(noise, vec![10, 20, 30, 40]);
        let stores: Vec<i32> = (1..=40).filter(|&t| c.stores_prev_grad(t, 0)).collect();
        assert_eq!(stores, vec![9, 19, 29, 39]);
        // Phase 3: steps 3, 13, ...; phase 1 skips step 1 (no previous gradient); any phase mod K.
        let noise: Vec<i32> = (1..=40).filter(|&t| c.is_noise_step(t, 3)).collect();
        assert_eq!(noise, vec![3, 13, 23, 33]);
        let noise: Vec<i32> = (1..=40).filter(|&t| c.is_noise_step(t, 1)).collect();
        assert_eq!(noise, vec![11, 21, 31]);
        assert!((1..=40).all(|t| c.is_noise_step(t, 13) == c.is_noise_step(t, 3) && c.is_noise_step(t, -7) == c.is_noise_step(t, 3)));
        let stores: Vec<i32> = (1..=40).filter(|&t| c.stores_prev_grad(t, 1)).collect();
        assert_eq!(stores, vec![10, 20, 30, 40]);
        c.noise_adaptive = false;
        assert!((1..=40).all(|t| !c.is_noise_step(t, 0) && !c.stores_prev_grad(t, 0) && !c.is_noise_step(t, 5)));
        // The extremes of t and K (the C ABI accepts K up to u32::MAX).
        c.noise_adaptive = true;
        c.noise_every = 1;
        assert!(c.is_noise_step(i32::MAX, 0) && c.stores_prev_grad(i32::MAX, 0));
        c.noise_every = u32::MAX;
        assert!((1..=1000).chain([i32::MAX]).all(|t| !c.is_noise_step(t, 0) && !c.stores_prev_grad(t, 0)));
        assert!(c.is_noise_step(i32::MAX, i32::MAX) && c.is_noise_step(i32::MAX, i32::MIN) && !c.is_noise_step(i32::MAX, 5));
        c.noise_every = 1 << 31;
        assert!(!c.is_noise_step(i32::MAX, 0) && c.stores_prev_grad(i32::MAX, 0));
        assert!(prev_grad_usable(9, 10) && !prev_grad_usable(8, 10) && !prev_grad_usable(0, 1));
    }

    #[test]
    fn staggered_phases_count_within_each_shape_class() {
        let sh = |layers, rows, cols| LayerShape { layers, rows, cols, rows_are_input: true };
        let shapes = [sh(2, 4, 8), sh(3, 8, 8), sh(3, 4, 8), sh(0, 4, 8), sh(1, 8, 4)];
        assert_eq!(noise_phases(NoiseSchedule::Synchronous, 3, &shapes), vec![0; 9]);
        // (4, 8): 0 1 | 2 0 1; (8, 8): 0 1 2; (8, 4) is its own class.
        assert_eq!(noise_phases(NoiseSchedule::Staggered, 3, &shapes), vec![0, 1, 0, 1, 2, 2, 0, 1, 0]);
        assert_eq!(noise_phases(NoiseSchedule::Staggered, 1, &shapes), vec![0; 9]);
        // Every layer is refreshed once per K steps, and each step refreshes ceil or floor of n/K
        // of a class of n layers.
        let cfg = StepConfig { noise_every: 4, noise_schedule: NoiseSchedule::Staggered, ..StepConfig::new(Kind::Hidden) };
        let phases = noise_phases(cfg.noise_schedule, cfg.noise_every, &[sh(10, 4, 4)]);
        for t in 5..=40 {
            let due = phases.iter().filter(|&&p| cfg.is_noise_step(t, p)).count();
            assert!(due == 2 || due == 3, "step {t}: {due} of 10 due");
        }
        for &p in &phases {
            assert_eq!((5..=8).filter(|&t| cfg.is_noise_step(t, p)).count(), 1);
            assert!((4..=7).all(|t| cfg.stores_prev_grad(t, p) == cfg.is_noise_step(t + 1, p)));
        }
    }

    #[test]
    fn ratios_by_hand() {
        let noise = [4.0f32, 1.0, 16.0, 0.0];
        let valid = [true, true, true, false];
        let mut r = [0.0f32; 4];
        group_ratios(&noise, &valid, RatioRule::plain(RatioStat::Max, 0.0), &mut r);
        // alpha = 1/2, 1, 1/4 -> max 1 -> r = 0.5, 1, 0.25; the invalid layer gets 1.
        assert_eq!(r, [0.5, 1.0, 0.25, 1.0]);
        group_ratios(&noise, &valid, RatioRule::plain(RatioStat::Min, 0.0), &mut r);
        assert_eq!(r, [2.0, 4.0, 1.0, 1.0]);
        group_ratios(&noise, &valid, RatioRule::plain(RatioStat::Mean, 0.0), &mut r);
        let mean = (0.5 + 1.0 + 0.25) / 3.0;
        for (got, want) in r.iter().zip([0.5 / mean, 1.0 / mean, 0.25 / mean, 1.0]) {
            assert!((got - want as f32).abs() < 1e-6);
        }
        // Singleton and all-invalid groups step at the base rate.
        group_ratios(&[3.0], &[true], RatioRule::plain(RatioStat::Max, 0.0), &mut r[..1]);
        assert_eq!(r[0], 1.0);
        group_ratios(&[0.0, 0.0], &[false, false], RatioRule::plain(RatioStat::Max, 0.0), &mut r[..2]);
        assert_eq!(&r[..2], &[1.0, 1.0]);
        // Shaped: r = max(0.6, (alpha/max)^0.5) = max(0.6, sqrt(0.5, 1, 0.25)); invalid stays 1.
        let shaped = RatioRule { power: 0.5, floor: 0.6, ..RatioRule::plain(RatioStat::Max, 0.0) };
        group_ratios(&noise, &valid, shaped, &mut r);
        assert_eq!(r, [0.5f32.sqrt(), 1.0, 0.6, 1.0]);
        // p = 0: every valid layer at the base rate.
        group_ratios(&noise, &valid, RatioRule { power: 0.0, ..shaped }, &mut r);
        assert_eq!(r, [1.0; 4]);
        // Median of alpha (1/2, 1, 1/4) is 1/2: r = min(1, alpha / (1/2)) = 1, 1, 0.5.
        group_ratios(&noise, &valid, RatioRule::plain(RatioStat::Median, 0.0), &mut r);
        assert_eq!(r, [1.0, 1.0, 0.5, 1.0]);
        // Even count: the mean of the middle two; one quiet layer (H = 1e-12) sets nobody's rate.
        let quiet = [4.0f32, 1.0, 16.0, 1e-12];
        group_ratios(&quiet, &[true; 4], RatioRule::plain(RatioStat::Median, 0.0), &mut r);
        assert_eq!(r, [2.0 / 3.0, 1.0, 1.0 / 3.0, 1.0]);
        group_ratios(&quiet, &[true; 4], RatioRule::plain(RatioStat::Max, 0.0), &mut r);
        assert!(r[1] < 1e-5, "under max the quiet layer throttles the rest: {r:?}");
        // Tempered and floored, then capped.
        let shaped = RatioRule { power: 0.5, floor: 0.7, ..RatioRule::plain(RatioStat::Median, 0.0) };
        group_ratios(&quiet, &[true; 4], shaped, &mut r);
        assert_eq!(r, [(2.0f64 / 3.0).sqrt() as f32, 1.0, 0.7, 1.0]);
        // Without the cap the quieter half steps faster (median 3/4: r = 4/3 and 1e6 / (3/4));
        // with a cap of 2 the quiet layer stops there.
        group_ratios(&quiet, &[true; 4], RatioRule { cap: f32::INFINITY, ..RatioRule::plain(RatioStat::Median, 0.0) }, &mut r);
        assert_eq!(&r[..3], &[2.0 / 3.0, 4.0 / 3.0, 1.0 / 3.0]);
        assert!((r[3] / (1e6 / 0.75) - 1.0).abs() < 1e-3, "{r:?}");
        group_ratios(&quiet, &[true; 4], RatioRule { cap: 2.0, ..RatioRule::plain(RatioStat::Median, 0.0) }, &mut r);
        assert_eq!(r, [2.0 / 3.0, 4.0 / 3.0, 1.0 / 3.0, 2.0]);
        let mut xs = [3.0, 1.0, 2.0];
        assert_eq!(median(&mut xs), 2.0);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn scales_and_factors() {
        let s = LayerShape { layers: 1, rows: 768, cols: 3072, rows_are_input: true };
        assert!((update_scale(Kind::Hidden, 0.2, &s) - 0.2 * 3072f32.sqrt()).abs() < 1e-5);
        assert_eq!(update_scale(Kind::Embed, 0.3, &s), 0.3);
        assert!((dual_norm_factor(Kind::Hidden, &s) - 2.0).abs() < 1e-6);
        let t = LayerShape { rows_are_input: false, ..s };
        assert!((dual_norm_factor(Kind::Hidden, &t) - 0.5).abs() < 1e-6);
        let v = LayerShape { layers: 3, rows: 1, cols: 64, rows_are_input: true };
        assert_eq!(dual_norm_factor(Kind::Vector, &v), 8.0);
    }
}
