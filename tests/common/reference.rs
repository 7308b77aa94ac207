//! The float64 reference of the LANTON math: SVD by Jacobi, Newton-Schulz, norms, the group step.

use super::*;

/// Singular values of a (rows x cols) via cyclic Jacobi on the smaller Gram matrix, in f64.
pub fn singular_values(a: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let (m, n, at) = if rows <= cols { (rows, cols, false) } else { (cols, rows, true) };
    let get = |i: usize, k: usize| if at { a[k * cols + i] as f64 } else { a[i * cols + k] as f64 };
    let mut g = vec![0.0f64; m * m];
    for i in 0..m {
        for j in 0..m {
            g[i * m + j] = (0..n).map(|k| get(i, k) * get(j, k)).sum();
        }
    }
    for _sweep in 0..100 {
        let off: f64 = (0..m).flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| g[i * m + j].powi(2)).sum();
        let diag: f64 = (0..m).map(|i| g[i * m + i].powi(2)).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = g[p * m + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (g[q * m + q] - g[p * m + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..m {
                    let (gkp, gkq) = (g[k * m + p], g[k * m + q]);
                    g[k * m + p] = c * gkp - s * gkq;
                    g[k * m + q] = s * gkp + c * gkq;
                }
                for k in 0..m {
                    let (gpk, gqk) = (g[p * m + k], g[q * m + k]);
                    g[p * m + k] = c * gpk - s * gqk;
                    g[q * m + k] = s * gpk + c * gqk;
                }
            }
        }
    }
    (0..m).map(|i| g[i * m + i].max(0.0).sqrt()).collect()
}

pub fn nuclear_f64(a: &[f32], rows: usize, cols: usize) -> f64 {
    singular_values(a, rows, cols).iter().sum()
}

/// Newton-Schulz in f64 with the same orientation and normalization as the kernel.
pub fn newton_schulz_f64(v: &[f32], rows: usize, cols: usize, coeffs: &[[f32; 3]]) -> Vec<f64> {
    let (m, n, tr) = if rows <= cols { (rows, cols, false) } else { (cols, rows, true) };
    let mut x: Vec<f64> = (0..m * n)
        .map(|idx| {
            let (i, k) = (idx / n, idx % n);
            if tr { v[k * cols + i] as f64 } else { v[i * cols + k] as f64 }
        })
        .collect();
    let fro = x.iter().map(|e| e * e).sum::<f64>().sqrt();
    x.iter_mut().for_each(|e| *e /= fro + 1e-7);
    for &[a, b, c] in coeffs {
        let (a, b, c) = (a as f64, b as f64, c as f64);
        let mut am = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                am[i * m + j] = (0..n).map(|k| x[i * n + k] * x[j * n + k]).sum();
            }
        }
        let mut bm = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                let aa: f64 = (0..m).map(|k| am[i * m + k] * am[k * m + j]).sum();
                bm[i * m + j] = b * am[i * m + j] + c * aa;
            }
        }
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for k in 0..n {
                y[i * n + k] = a * x[i * n + k] + (0..m).map(|j| bm[i * m + j] * x[j * n + k]).sum::<f64>();
            }
        }
        x = y;
    }
    let mut out = vec![0.0; rows * cols];
    for i in 0..m {
        for k in 0..n {
            if tr { out[k * cols + i] = x[i * n + k] } else { out[i * cols + k] = x[i * n + k] }
        }
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

// ---------------------------------------------------------------- float64 reference step

/// One leaf's state in f64, mirroring the kernel's state arrays.
#[derive(Clone)]
pub struct RefLeaf {
    pub shape: LayerShape,
    pub param: Vec<f64>,
    pub momentum: Vec<f64>,
    pub prev_grad: Vec<f64>,
    pub noise: Vec<f64>,
    pub valid: Vec<bool>,
    pub prev_step: Vec<i32>,
    pub ratio: Vec<f64>,
}

impl RefLeaf {
    pub fn new(shape: LayerShape, param: &[f32]) -> Self {
        let n = shape.layers * shape.layer_len();
        RefLeaf {
            shape,
            param: param.iter().map(|&x| x as f64).collect(),
            momentum: vec![0.0; n],
            prev_grad: vec![0.0; n],
            noise: vec![0.0; shape.layers],
            valid: vec![false; shape.layers],
            prev_step: vec![0; shape.layers],
            ratio: vec![1.0; shape.layers],
        }
    }
}

pub fn ref_dual_norm(kind: Kind, d: &[f64], shape: &LayerShape) -> f64 {
    let f = lanton::step::dual_norm_factor(kind, shape) as f64;
    f * match kind {
        Kind::Hidden => {
            let d32: Vec<f32> = d.iter().map(|&x| x as f32).collect();
            nuclear_f64(&d32, shape.rows, shape.cols)
        }
        Kind::Embed => d.iter().map(|x| x.abs()).sum(),
        Kind::Vector => d.iter().map(|x| x * x).sum::<f64>().sqrt(),
        Kind::Adam => panic!("the LMO reference has no adam kind (tests/step_sequence.rs has its own)"),
    }
}

pub fn ref_direction(cfg: &StepConfig, v: &[f64], shape: &LayerShape) -> Vec<f64> {
    match cfg.kind {
        Kind::Hidden => {
            let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            newton_schulz_f64(&v32, shape.rows, shape.cols, &cfg.ns_coeffs)
        }
        Kind::Embed => v.iter().map(|&x| if x > 0.0 { 1.0 } else if x < 0.0 { -1.0 } else { 0.0 }).collect(),
        Kind::Vector => {
            let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
            v.iter().map(|x| x / (rms + cfg.vector_eps as f64)).collect()
        }
        Kind::Adam => panic!("the LMO reference has no adam kind (tests/step_sequence.rs has its own)"),
    }
}

/// The LANTON group step in f64, written independently of the kernel from ALGORITHM.md.
/// Returns each leaf's update (delta).
pub fn ref_group_step(cfg: &StepConfig, h: &Hyper, t: i32, leaves: &mut [RefLeaf], grads: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let k = cfg.noise_every as i64;
    // Phases: 0, or (staggered) the layer's count among earlier layers of its (rows, cols), mod K.
    let mut before: std::collections::HashMap<(usize, usize), i64> = Default::default();
    let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
    let mut skipped = Vec::new();
    for (leaf, g) in leaves.iter_mut().zip(grads) {
        let n = leaf.shape.layer_len();
        for l in 0..leaf.shape.layers {
            let seen = before.entry((leaf.shape.rows, leaf.shape.cols)).or_insert(0);
            let phase = if cfg.noise_schedule == NoiseSchedule::Staggered { *seen % k } else { 0 };
            *seen += 1;
            let due = |t: i64| cfg.noise_adaptive && t >= 2 && (t - phase) % k == 0;
            let (noise_step, keep) = (due(t as i64), due(t as i64 + 1));
            let r = l * n..(l + 1) * n;
            let gl: Vec<f64> = g[r.clone()].iter().map(|&x| x as f64).collect();
            let bad = gl.iter().any(|x| !x.is_finite());
            skipped.push(bad);
            if bad {
                continue;
            }
            for (b, &gv) in leaf.momentum[r.clone()].iter_mut().zip(&gl) {
                *b = b1 * *b + (1.0 - b1) * gv;
            }
            if noise_step && leaf.prev_step[l] == t - 1 && leaf.prev_step[l] >= 1 {
                let d: Vec<f64> = gl.iter().zip(&leaf.prev_grad[r.clone()]).map(|(a, b)| a - b).collect();
                let mut nrm = ref_dual_norm(cfg.kind, &d, &leaf.shape);
                if cfg.noise_relative {
                    nrm /= ref_dual_norm(cfg.kind, &leaf.momentum[r.clone()], &leaf.shape);
                }
                let tracked = b2 * leaf.noise[l] + (1.0 - b2) * nrm * nrm;
                if (tracked as f32).is_finite() {
                    leaf.noise[l] = tracked;
                    if nrm > 0.0 {
                        leaf.valid[l] = true;
                    }
                }
            }
            if keep {
                leaf.prev_grad[r].copy_from_slice(&gl);
                leaf.prev_step[l] = t;
            }
        }
    }
    let eps = cfg.ratio_eps as f64;
    let alphas: Vec<f64> = leaves
        .iter()
        .flat_map(|lf| lf.noise.iter().zip(&lf.valid).filter(|(_, &v)| v).map(|(&h, _)| 1.0 / (h + eps).sqrt()).collect::<Vec<_>>())
        .collect();
    let reference = match cfg.ratio_stat {
        RatioStat::Max => alphas.iter().cloned().fold(f64::MIN, f64::max),
        RatioStat::Min => alphas.iter().cloned().fold(f64::MAX, f64::min),
        RatioStat::Mean => alphas.iter().sum::<f64>() / alphas.len().max(1) as f64,
        RatioStat::Median => {
            let mut sorted = alphas.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let n = sorted.len();
            if n == 0 { f64::NAN } else { 0.5 * (sorted[(n - 1) / 2] + sorted[n / 2]) }
        }
    };
    let mut updates = Vec::new();
    let mut idx = 0;
    for (leaf, g) in leaves.iter_mut().zip(grads) {
        let n = leaf.shape.layer_len();
        let s = lanton::step::update_scale(cfg.kind, h.scale, &leaf.shape) as f64;
        let mut upd = vec![0.0; leaf.param.len()];
        for l in 0..leaf.shape.layers {
            let r = l * n..(l + 1) * n;
            let ratio = if cfg.noise_adaptive && leaf.valid[l] && !alphas.is_empty() {
                let q = 1.0 / (leaf.noise[l] + eps).sqrt() / reference;
                q.powf(cfg.ratio_power as f64).max(cfg.ratio_floor as f64).min(cfg.ratio_cap as f64)
            } else {
                1.0
            };
            leaf.ratio[l] = ratio;
            let bad = skipped[idx];
            idx += 1;
            if bad {
                continue;
            }
            let v: Vec<f64> = if cfg.nesterov {
                leaf.momentum[r.clone()].iter().zip(&g[r.clone()]).map(|(&b, &gv)| b1 * b + (1.0 - b1) * gv as f64).collect()
            } else {
                leaf.momentum[r.clone()].to_vec()
            };
            let d = ref_direction(cfg, &v, &leaf.shape);
            for (j, i) in r.enumerate() {
                let delta = -(h.lr as f64) * (h.weight_decay as f64 * leaf.param[i] + s * ratio * d[j]);
                upd[i] = delta;
                leaf.param[i] += delta;
            }
        }
        updates.push(upd);
    }
    updates
}
