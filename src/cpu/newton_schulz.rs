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
}

fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
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

/// out (rows x cols) = NS(v / (||v||_F + 1e-7)) with the given coefficient schedule.
pub fn newton_schulz(v: &[f32], rows: usize, cols: usize, coeffs: &[[f32; 3]], out: &mut [f32], ws: &mut NsWorkspace, symmetric: bool) {
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

/// Gram eigenvalues below this fraction of the largest are f32 round-off of the product, not
/// signal: summed through sqrt they add up (a rank-1 384x768 D read 1.5 % high without a floor in
/// a prototype run; 4e-4 with it, benches/newton_schulz.rs). Singular values under ~3e-4 of the
/// largest are dropped with them.
pub const GRAM_EIGEN_FLOOR: f32 = 1e-7;

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
/// m = min(rows, cols)): a symmetric product plus faer's symmetric eigenvalue solver. This is
/// the CPU's noise estimate (0.3-0.4x a Newton-Schulz-5 here, see benches/newton_schulz.rs);
/// the GPU keeps the polar iteration (`nuclear_norm_polar`), which suits tensor cores.
pub fn nuclear_norm(d: &[f32], rows: usize, cols: usize, ws: &mut NsWorkspace) -> f32 {
    // Normalized, the Gram matrix has trace 1: no overflow whatever the gradients' scale.
    let (m, n, fro) = match load_normalized(d, rows, cols, ws) {
        Ok(v) => v,
        Err(norm) => return norm,
    };
    resize(&mut ws.a, m * m);
    gemm::syrk(m, n, &ws.x[..m * n], &mut ws.a);
    let gram = faer::MatRef::from_row_major_slice(&ws.a[..m * m], m, m);
    let Ok(eigenvalues) = gram.self_adjoint_eigenvalues(faer::Side::Lower) else {
        // The solver did not converge (it does for any finite symmetric input): the polar factor.
        return nuclear_norm_polar(d, rows, cols, ws);
    };
    let top = eigenvalues.iter().copied().fold(0.0f32, f32::max);
    let sum: f64 = eigenvalues.iter().filter(|&&l| l > GRAM_EIGEN_FLOOR * top).map(|&l| (l as f64).sqrt()).sum();
    (fro * sum) as f32
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
