//! Newton-Schulz on CPU: the polar-factor direction of `hidden` groups and the nuclear norm
//! used for their noise estimate. Matrices are oriented so that rows <= cols, as in muon.py.

use super::gemm;

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

/// The quadrature in `sum_sqrt_eigenvalues` starts at s = GRAM_FLOOR * trace: eigenvalues far
/// below it (f64 round-off of the Gram matrix, singular values under ~1e-6 of ||D||_F) count
/// as about (4/pi) * lambda / sqrt(s), eigenvalues far above it in full.
pub const GRAM_FLOOR: f64 = 1e-12;

/// Up to this many rows (the smaller side) the Gram matrix is f64 and summed by quadrature;
/// above it, f32 and faer's eigenvalue solver. Chosen by measurement (benches/newton_schulz.rs):
/// at 128 rows the eigensolver's QR sweeps are half the cost and the f64 product is cheap; at
/// 768 the f64 product and tridiagonalization cost more than the sweeps save.
pub const GRAM_F64_MAX_ROWS: usize = 256;

/// f32 Gram eigenvalues below this fraction of the largest are round-off of the product, not
/// signal: summed through sqrt they add up (a rank-1 384x768 D read 1.5 % high without a floor
/// in a prototype run; 4e-4 with it). Singular values under ~3e-4 of the largest go with them.
pub const GRAM_F32_EIGEN_FLOOR: f32 = 1e-7;

/// Loads `d` oriented (m <= n) into ws.x, divided by its Frobenius norm, which it returns
/// with (m, n); Err(norm) if the norm is 0 or not finite (the nuclear norm is then that norm).
fn load_normalized(d: &[f32], rows: usize, cols: usize, ws: &mut NsWorkspace) -> Result<(usize, usize, f64), f32> {
    let (m, n, _) = load_oriented(d, rows, cols, &mut ws.x);
    let fro = frobenius(&ws.x[..m * n]);
    if fro == 0.0 || !fro.is_finite() {
        return Err(fro as f32);
    }
    let inv = (1.0 / fro) as f32;
    ws.x[..m * n].iter_mut().for_each(|e| *e *= inv);
    Ok((m, n, fro))
}

/// ||d||_* = sum of sqrt(eigenvalues) of the Gram matrix of the smaller side, D D^T (m x m,
/// m = min(rows, cols)). Up to GRAM_F64_MAX_ROWS rows: the product in f64, faer's Householder
/// tridiagonalization, and `sum_sqrt_eigenvalues` on the tridiagonal (O(m) per quadrature
/// point, no eigensolver; ~1e-6 of an f64 SVD). Above: the product in f32 and faer's symmetric
/// eigenvalue solver with a floor (~5e-4). This is the CPU's noise estimate (its cost against a
/// Newton-Schulz-5 and its error: benches/newton_schulz.rs); the GPU keeps the polar iteration
/// (`nuclear_norm_polar`): batched products, no per-matrix solver.
pub fn nuclear_norm(d: &[f32], rows: usize, cols: usize, ws: &mut NsWorkspace) -> f32 {
    // Normalized, the Gram matrix has trace 1: no overflow whatever the gradients' scale.
    let (m, n, fro) = match load_normalized(d, rows, cols, ws) {
        Ok(v) => v,
        Err(norm) => return norm,
    };
    let sum = if m <= GRAM_F64_MAX_ROWS {
        ws.x64.clear();
        ws.x64.extend(ws.x[..m * n].iter().map(|&v| v as f64));
        resize(&mut ws.gram, m * m);
        gemm::syrk(m, n, &ws.x64, &mut ws.gram);
        let (diag, offdiag) = tridiagonalize(&mut ws.gram[..m * m], m);
        sum_sqrt_eigenvalues(&diag, &offdiag)
    } else {
        resize(&mut ws.a, m * m);
        gemm::syrk(m, n, &ws.x[..m * n], &mut ws.a);
        sum_sqrt_eigenvalues_f32(&ws.a[..m * m], m)
    };
    match sum {
        Some(sum) => (fro * sum) as f32,
        // Not positive semi-definite beyond round-off, or the solver did not converge (no
        // finite input gets here): the polar factor.
        None => nuclear_norm_polar(d, rows, cols, ws),
    }
}

/// sum sqrt(lambda) over the eigenvalues of the symmetric f32 matrix `a` above the floor.
fn sum_sqrt_eigenvalues_f32(a: &[f32], m: usize) -> Option<f64> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::evd;
    // Sequential: faer's parallel tridiagonalization measured slower here at 768 rows (43 vs 32 ms).
    let par = faer::Par::Seq;
    let mut eigenvalues = faer::diag::Diag::<f32>::zeros(m);
    let scratch = evd::self_adjoint_evd_scratch::<f32>(m, evd::ComputeEigenvectors::No, par, Default::default());
    let gram = faer::MatRef::from_column_major_slice(a, m, m);
    evd::self_adjoint_evd(gram, eigenvalues.as_mut(), None, par, MemStack::new(&mut MemBuffer::new(scratch)), Default::default()).ok()?;
    let eigenvalues = eigenvalues.column_vector();
    let top = eigenvalues.iter().copied().fold(0.0f32, f32::max);
    Some(eigenvalues.iter().filter(|&&l| l > GRAM_F32_EIGEN_FLOOR * top).map(|&l| (l as f64).sqrt()).sum())
}

/// The symmetric m x m matrix `a` (full storage) reduced to tridiagonal form Q^T A Q in place;
/// returns its diagonal and the squares of its off-diagonal.
fn tridiagonalize(a: &mut [f64], m: usize) -> (Vec<f64>, Vec<f64>) {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::evd::tridiag;
    let par = faer::Par::Seq;
    // Symmetric: the row-major buffer read column-major is the same matrix.
    let mut mat = faer::MatMut::from_column_major_slice_mut(a, m, m);
    let mut householder = faer::Mat::<f64>::zeros(1, m.saturating_sub(1));
    let mut mem = MemBuffer::new(tridiag::tridiag_in_place_scratch::<f64>(m, par, Default::default()));
    tridiag::tridiag_in_place(mat.as_mut(), householder.as_mut(), par, MemStack::new(&mut mem), Default::default());
    let diag = (0..m).map(|i| mat[(i, i)]).collect();
    let offdiag = (0..m.saturating_sub(1)).map(|i| mat[(i + 1, i)] * mat[(i + 1, i)]).collect();
    (diag, offdiag)
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
    if m == 0 || trace <= 0.0 {
        return Some(0.0);
    }
    let (lo, hi) = (0.5 * (GRAM_FLOOR * trace).ln(), 0.5 * trace.ln() + 8.0);
    let points = ((hi - lo) / STEP).ceil() as usize;
    let h = (hi - lo) / points as f64;
    let integrand = |u: f64| -> Option<f64> {
        let s = (2.0 * u).exp();
        // Pivots p_i of T + s and their derivatives in s; tr((T + s)^-1) = sum p_i' / p_i.
        let (mut p, mut dp) = (a[0] + s, 1.0);
        let mut inv = 1.0 / p;
        let mut trace_inv = dp * inv;
        let mut positive = p > 0.0;
        for i in 1..m {
            let r = b2[i - 1] * inv;
            p = a[i] + s - r;
            dp = 1.0 + r * inv * dp;
            inv = 1.0 / p;
            trace_inv += dp * inv;
            positive &= p > 0.0;
        }
        positive.then(|| (m as f64 - s * trace_inv) * u.exp())
    };
    let (f_lo, f_hi) = (integrand(lo)?, integrand(hi)?);
    let mut inner = 0.0;
    for k in 1..points {
        inner += integrand(lo + h * k as f64)?;
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
    }
}
