//! Elementwise kernels and the cheap dual norms, f32 data with f64 accumulation.

/// b <- beta1*b + (1-beta1)*g
pub fn momentum(b: &mut [f32], g: &[f32], beta1: f32) {
    let c = 1.0 - beta1;
    b.iter_mut().zip(g).for_each(|(b, &g)| *b = beta1 * *b + c * g);
}

pub fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

pub fn l1(x: &[f32]) -> f32 {
    l1_f64(x) as f32
}

/// Entrywise l1 accumulated in f64, for sums over pieces of a layer.
pub fn l1_f64(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64).abs()).sum()
}

pub fn l2(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32
}

/// sign(v), with sign(0) = 0.
pub fn sign(v: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(v).for_each(|(o, &x)| *o = if x > 0.0 { 1.0 } else if x < 0.0 { -1.0 } else { 0.0 });
}

/// v / (rms(v) + eps)
pub fn rms_normalize(v: &[f32], eps: f32, out: &mut [f32]) {
    let rms = if v.is_empty() { 0.0 } else { l2(v) / (v.len() as f32).sqrt() };
    let inv = 1.0 / (rms + eps);
    out.iter_mut().zip(v).for_each(|(o, &x)| *o = x * inv);
}
