//! Newton-Schulz on CPU: the polar-factor direction of `hidden` groups and the nuclear norm
//! used for their noise estimate. Matrices are oriented so that rows <= cols, as in muon.py.

use super::gemm;
use super::tridiag::tridiagonalize;

/// Scratch reused across the layers of one call.
#[derive(Default)]
pub struct NsWorkspace {
    x: Vec<f32>,
    y: Vec<f32>,
    a: Vec<f32>,
    aa: Vec<f32>,
    /// The noise estimate's input and Gram matrix, in f64.
    x64: Vec<f64>,
    gram: Vec<f64>,
    /// The Gram matrix's tridiagonal form: diagonal, squared off-diagonal.
    diag: Vec<f64>,
    offdiag2: Vec<f64>,
}

fn resize<T: gemm::Scalar>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::ZERO);
    }
}

/// Copies `v` (rows x cols) into `out` as an m x n matrix with m <= n; returns (m, n, transposed).
fn load_oriented(v: &[f32], rows: usize, cols: usize, out: &mut Vec<f32>) -> (usize, usize, bool) {
    resize(out, rows * cols);
    if rows <= cols {
        out[..rows * cols].copy_from_slice(&v[..rows * cols]);
        (rows, cols, false)
    } else {
        for i in 0..rows {
            for j in 0..cols {
                out[j * rows + i] = v[i * cols + j];
            }
        }
        (cols, rows, true)
    }
}

fn frobenius(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

/// X <- a*X + (b*A + c*A*A)*X with A = X*X^T, once per coefficient triple, on ws.x (m x n).
/// `symmetric` computes X*X^T and A*A from their upper triangles (half the work).
fn iterate(ws: &mut NsWorkspace, m: usize, n: usize, coeffs: &[[f32; 3]], symmetric: bool) {
    resize(&mut ws.y, m * n);
    resize(&mut ws.a, m * m);
    resize(&mut ws.aa, m * m);
    for &[a, b, c] in coeffs {
        let x = &ws.x[..m * n];
        if symmetric {
            gemm::syrk(m, n, x, &mut ws.a);
            gemm::syrk(m, m, &ws.a[..m * m], &mut ws.aa);
        } else {
            gemm::xxt_plain(m, n, x, &mut ws.a);
            gemm::matmul(m, m, m, &ws.a[..m * m], &ws.a[..m * m], &mut ws.aa);
        }
        // Fold a*I into the left factor: X_new = (a*I + b*A + c*A*A) * X, one product.
        for i in 0..m {
            for j in 0..m {
                let idx = i * m + j;
                ws.a[idx] = b * ws.a[idx] + c * ws.aa[idx] + if i == j { a } else { 0.0 };
            }
        }
        gemm::matmul(m, n, m, &ws.a[..m * m], &ws.x[..m * n], &mut ws.y);
        std::mem::swap(&mut ws.x, &mut ws.y);
    }
}

/// Newton-Schulz directions computed in this process (`lanton_newton_schulz_runs`).
pub static DIRECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// out (rows x cols) = NS(v / (||v||_F + 1e-7)) with the given coefficient schedule.
pub fn newton_schulz(v: &[f32], rows: usize, cols: usize, coeffs: &[[f32; 3]], out: &mut [f32], ws: &mut NsWorkspace, symmetric: bool) {
    DIRECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (m, n, transposed) = load_oriented(v, rows, cols, &mut ws.x);
    let inv = (1.0 / (frobenius(&ws.x[..m * n]) + 1e-7)) as f32;
    ws.x[..m * n].iter_mut().for_each(|e| *e *= inv);
    iterate(ws, m, n, coeffs, symmetric);
    if transposed {
        for i in 0..rows {
            for j in 0..cols {
                out[i * cols + j] = ws.x[j * rows + i];
            }
        }
    } else {
        out[..rows * cols].copy_from_slice(&ws.x[..rows * cols]);
    }
}

/// The quadrature in `sum_sqrt_eigenvalues` starts at s = GRAM_FLOOR * trace: eigenvalues far below
/// it count as about (4/pi) * lambda / sqrt(s), eigenvalues far above it in full. For the f64
/// Gram matrix the floor sits under its round-off (singular values under ~1e-6 of ||D||_F).
pub const GRAM_FLOOR: f64 = 1e-12;

/// Loads `d` oriented (m <= n) into ws.x, divided by its Frobenius norm, which it returns
/// with (m, n); Err(norm) if the norm is 0 or not finite (the nuclear norm is then that norm).
fn load_normalized(d: &[f32], rows: usize, cols: usize, ws: &mut NsWorkspace) -> Result<(usize, usize, f64), f32> {
    let (m, n, _) = load_oriented(d, rows, cols, &mut ws.x);
    let fro = frobenius(&ws.x[..m * n]);
    if fro == 0.0 || !fro.is_finite() {
        return Err(fro as f32);
    }
    // In f64: 1 / ||d|| of a subnormal-scale d is past f32's range.
    let inv = 1.0 / fro;
    ws.x[..m * n].iter_mut().for_each(|e| *e = (*e as f64 * inv) as f32);
    Ok((m, n, fro))
}

/// ||d||_* = sum of sqrt(eigenvalues) of the Gram matrix of the smaller side, D D^T (m x m,
/// m = min(rows, cols)): the product (its upper triangle), its Householder reduction to a
/// tridiagonal T (`tridiag`) and `sum_sqrt_eigenvalues` on T (O(m) per quadrature point, no
/// eigensolver), all in f64: <= 6e-7 of an f64 SVD in the bench. In f32 (product and
/// reduction) the 768-row case took half the time, but a temporary f32 variant of the
/// large-matrix test in tests/kernels.rs read a bf16-rounded rank-1 matrix 1.4 % low: its many
/// tiny singular values sit under f32 round-off. This is the CPU's noise estimate (its cost against a
/// Newton-Schulz-5 and its error: benches/newton_schulz.rs); the GPU keeps the polar iteration
/// (`nuclear_norm_polar`): batched products, no per-matrix reduction.
pub fn nuclear_norm(d: &[f32], rows: usize, cols: usize, ws: &mut NsWorkspace) -> f32 {
    // Normalized, the Gram matrix has trace 1: no overflow whatever the gradients' scale.
    let (m, n, fro) = match load_normalized(d, rows, cols, ws) {
        Ok(v) => v,
        Err(norm) => return norm,
    };
    ws.x64.clear();
    ws.x64.extend(ws.x[..m * n].iter().map(|&v| v as f64));
    resize(&mut ws.gram, m * m);
    gemm::gram_upper(m, n, &ws.x64, &mut ws.gram);
    // The reduction's work: ~m^3 / 6 elements, four multiply-adds each.
    let threads = gemm::threads_for(m * m * m * 2 / 3);
    tridiagonalize(&mut ws.gram[..m * m], m, &mut ws.diag, &mut ws.offdiag2, threads);
    match sum_sqrt_eigenvalues(&ws.diag, &ws.offdiag2) {
        Some(sum) => (fro * sum) as f32,
        // Not positive semi-definite beyond round-off, or not finite (no finite input is known
        // to get here): the polar factor.
        None => nuclear_norm_polar(d, rows, cols, ws),
    }
}

/// sum_i sqrt(lambda_i) of the positive semi-definite tridiagonal T (diagonal `a`, squared
/// off-diagonal `b2`), without its eigenvalues. With s = e^(2u),
///   sqrt(lambda) = (2/pi) * int e^u * lambda / (lambda + s) du   over the real line,
/// so the sum is (2/pi) * int e^u * (m - s * tr((T + s)^-1)) du. Each eigenvalue's integrand is
/// sqrt(lambda) / (2 cosh(u - ln(lambda)/2)): the trapezoid rule in u converges exponentially
/// (step 1/2: ~3e-8), and tr((T + s)^-1) = d/ds ln det(T + s) comes from the LDL^T pivots in
/// O(m). The ends: below u_lo the integrand is ~C e^u, above u_hi ~tr(T) e^-u (integrated in
/// closed form, with their Euler-Maclaurin terms; at u_hi, s >= e^16 lambda_max makes the
/// closed form exact to ~1e-7 of the tail). None if a pivot is not positive.
pub fn sum_sqrt_eigenvalues(a: &[f64], b2: &[f64]) -> Option<f64> {
    const STEP: f64 = 0.5;
    let m = a.len();
    let trace: f64 = a.iter().sum();
    if !trace.is_finite() {
        // A non-finite T (from an input scaled past f32's range): no points to place.
        return None;
    }
    if trace > 0.0 && trace < f64::MIN_POSITIVE / GRAM_FLOOR {
        // So small that GRAM_FLOOR * trace underflows: the caller normalizes to trace 1.
        return None;
    }
    if m == 0 || trace <= 0.0 {
        return Some(0.0);
    }
    let (lo, hi) = (0.5 * (GRAM_FLOOR * trace).ln(), 0.5 * trace.ln() + 8.0);
    let points = ((hi - lo) / STEP).ceil() as usize;
    let h = (hi - lo) / points as f64;
    // The integrand at POINTS abscissae at once: each is a chain of dependent divisions, and
    // independent chains side by side overlap (3-4x faster than one at a time here).
    const POINTS: usize = 4;
    let integrand = |u: [f64; POINTS]| -> Option<[f64; POINTS]> {
        let s = u.map(|u| (2.0 * u).exp());
        // Pivots p_i of T + s and their derivatives in s; tr((T + s)^-1) = sum p_i' / p_i.
        let mut p = s.map(|s| a[0] + s);
        let mut dp = [1.0; POINTS];
        let mut inv = p.map(|p| 1.0 / p);
        let mut trace_inv = inv;
        let mut positive = p.iter().all(|&p| p > 0.0);
        for i in 1..m {
            for l in 0..POINTS {
                let r = b2[i - 1] * inv[l];
                p[l] = a[i] + s[l] - r;
                dp[l] = 1.0 + r * inv[l] * dp[l];
                inv[l] = 1.0 / p[l];
                trace_inv[l] += dp[l] * inv[l];
                positive &= p[l] > 0.0;
            }
        }
        let mut f = [0.0; POINTS];
        for l in 0..POINTS {
            f[l] = (m as f64 - s[l] * trace_inv[l]) * u[l].exp();
        }
        positive.then_some(f)
    };
    // f(lo + k h) for k = 0..=points (the last batch padded with hi).
    let mut values = Vec::with_capacity(points + POINTS);
    for first in (0..=points).step_by(POINTS) {
        let u = std::array::from_fn(|l| match first + l {
            k if k >= points => hi,
            k => lo + h * k as f64,
        });
        values.extend_from_slice(&integrand(u)?);
    }
    let (f_lo, f_hi) = (values[0], values[points]);
    let mut inner = 0.0;
    for &f in &values[1..points] {
        inner += f;
    }
    let trapezoid = h * (inner + 0.5 * (f_lo + f_hi));
    let (tail_lo, tail_hi) = (f_lo, trace * (-hi).exp());
    let ends = h * h / 12.0 * (f_lo + tail_hi);
    let sum = std::f64::consts::FRAC_2_PI * (trapezoid + tail_lo + tail_hi + ends);
    sum.is_finite().then_some(sum)
}

/// ||d||_* = <d, polar(d)>, with the polar factor from `step::nuclear_schedule()`: the
/// estimator the CUDA kernels use, kept here as their host-side twin and for the benchmark.
pub fn nuclear_norm_polar(d: &[f32], rows: usize, cols: usize, ws: &mut NsWorkspace) -> f32 {
    let (m, n, fro) = match load_normalized(d, rows, cols, ws) {
        Ok(v) => v,
        Err(norm) => return norm,
    };
    // Keep the normalized input: <X0, P> after the iteration overwrites ws.x.
    let x0 = ws.x[..m * n].to_vec();
    iterate(ws, m, n, &crate::step::nuclear_schedule(), true);
    let dot: f64 = x0.iter().zip(&ws.x[..m * n]).map(|(&a, &b)| a as f64 * b as f64).sum();
    (fro * dot) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tridiagonal matrices with known eigenvalues: sum sqrt(lambda) to 1e-7 (the rule: ~3e-8).
    #[test]
    fn sum_sqrt_eigenvalues_matches_known_spectra() {
        let close = |got: f64, want: f64| (got - want).abs() <= 1e-7 * want;
        // Diagonal: the eigenvalues are the entries, spread over 8 decades (above the floor).
        let a: Vec<f64> = (0..50).map(|i| 10f64.powf(-(i as f64) * 8.0 / 49.0)).collect();
        let want: f64 = a.iter().map(|v| v.sqrt()).sum();
        let got = sum_sqrt_eigenvalues(&a, &[0.0; 49]).unwrap();
        assert!(close(got, want), "diagonal: {got} vs {want}");
        // The second-difference matrix 2, -1 (b^2 = 1): lambda_k = 2 - 2 cos(k pi / (n + 1)).
        let n = 40;
        let want: f64 = (1..=n).map(|k| (2.0 - 2.0 * (k as f64 * std::f64::consts::PI / (n + 1) as f64).cos()).sqrt()).sum();
        let got = sum_sqrt_eigenvalues(&vec![2.0; n], &vec![1.0; n - 1]).unwrap();
        assert!(close(got, want), "second difference: {got} vs {want}");
        // One eigenvalue at the trace, the rest exactly 0 (a rank-1 Gram matrix, tridiagonalized).
        let got = sum_sqrt_eigenvalues(&[0.0, 0.0, 4.0], &[0.0, 0.0]).unwrap();
        assert!(close(got, 2.0), "rank 1: {got}");
        assert_eq!(sum_sqrt_eigenvalues(&[], &[]), Some(0.0));
        // Indefinite beyond round-off: refused, not a wrong number.
        assert_eq!(sum_sqrt_eigenvalues(&[2.0, -1.0], &[0.0]), None);
        assert_eq!(sum_sqrt_eigenvalues(&[f64::NAN, 1.0], &[0.0]), None);
        assert_eq!(sum_sqrt_eigenvalues(&[f64::INFINITY, 1.0], &[1.0]), None);
    }
}
