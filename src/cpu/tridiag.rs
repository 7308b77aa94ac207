//! Householder reduction of a symmetric matrix to tridiagonal form, T = Q^T A Q (LAPACK's
//! `sytd2`, lower triangle), for the noise estimate's Gram matrix.
//!
//! Why not faer's: at the noise estimate's sizes the reduction is bound by memory traffic over
//! the trailing matrix, not by flops. Here each step makes one pass over the trailing lower
//! triangle that both applies the previous step's rank-2 update and forms this step's
//! symmetric product A v (half the matrix, each element read and written once per step, two
//! columns at a time so they share the vector loads); the pass is compiled for AVX2/FMA where
//! the CPU has them (pulp's runtime dispatch) and can be split by columns across threads.
//! 0.59-0.84x the time of faer's `tridiag_in_place` at 128-768 rows here
//! (benches/newton_schulz.rs, which also gives the noise estimate's cost in context).
//!
//! Step k, with x = A[k+1.., k]:  v = x - beta e1 scaled so v[0] = 1, tau = (beta - alpha) / beta,
//! beta = -sign(alpha) ||x||;  p = A22 v,  w = tau p - (tau^2/2)(p^T v) v,  A22 -= v w^T + w v^T.
//! T's diagonal is A[k, k] after the updates before step k, its off-diagonal beta.

use pulp::{Arch, Simd, WithSimd};

/// Reduces the symmetric n x n matrix `a` (only its lower triangle is read, column-major:
/// element (i, j), i >= j, at a[j * n + i]; a symmetric buffer is the same either way) to
/// tridiagonal form, overwriting it. Returns T's diagonal in `diag` and the squares of its
/// off-diagonal in `offdiag2` (what the quadrature reads). With `threads` > 1,
/// each large step's pass is split by columns across the current rayon pool (call it from
/// inside the pool: a join from outside costs a wake-up per step); p's partial sums then add in
/// another order, so the result differs at round-off.
pub fn tridiagonalize(a: &mut [f64], n: usize, diag: &mut Vec<f64>, offdiag2: &mut Vec<f64>, threads: usize) {
    assert!(a.len() >= n * n, "tridiagonalize: {} elements for a {n} x {n} matrix", a.len());
    diag.clear();
    offdiag2.clear();
    Arch::new().dispatch(Reduce { a: &mut a[..n * n], n, diag, offdiag2, threads: threads.max(1) });
}

/// A step's pass goes to several threads only from this many trailing elements (a join costs
/// about as much as a pass over ~10^4 elements).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

struct Reduce<'a> {
    a: &'a mut [f64],
    n: usize,
    diag: &'a mut Vec<f64>,
    offdiag2: &'a mut Vec<f64>,
    threads: usize,
}

impl WithSimd for Reduce<'_> {
    type Output = ();

    // inline(always) down to the inner loop: the body is compiled with the target features of
    // pulp's dispatching function, so the loops vectorize for the CPU found at run time.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Reduce { a, n, diag, offdiag2, threads } = self;
        // Global row indices; entries at or above the current step's pivot stay 0.
        let (mut v, mut w) = (vec![0.0; n], vec![0.0; n]);
        let (mut v_next, mut p) = (vec![0.0; n], vec![0.0; n]);
        // Threads a step's pass can use: one per PARALLEL_MIN_ELEMENTS trailing elements, at
        // most `threads`; each extra thread has its own share of p (summed after the pass).
        let share = |trailing: usize| (trailing / PARALLEL_MIN_ELEMENTS).clamp(1, threads);
        let mut p_parts = vec![vec![0.0; n]; share(n * n.saturating_sub(1) / 2) - 1];
        for k in 0..n {
            // Column k gets the previous step's update; it then holds T's diagonal entry and x.
            let col = &mut a[k * n + k..(k + 1) * n];
            let (vk, wk) = (v[k], w[k]);
            for ((c, &vi), &wi) in col.iter_mut().zip(&v[k..]).zip(&w[k..]) {
                *c -= vi * wk + wi * vk;
            }
            diag.push(col[0]);
            if k + 1 == n {
                break;
            }
            // The reflector of x = col[1..].
            let x = &col[1..];
            let alpha = x[0];
            let sigma: f64 = x[1..].iter().map(|e| e * e).sum();
            v_next.fill(0.0);
            let tau = if sigma == 0.0 {
                offdiag2.push(alpha * alpha);
                0.0
            } else {
                let beta = -alpha.signum() * (alpha * alpha + sigma).sqrt();
                offdiag2.push(beta * beta);
                let scale = 1.0 / (alpha - beta);
                v_next[k + 1] = 1.0;
                for (vi, &xi) in v_next[k + 2..].iter_mut().zip(&x[1..]) {
                    *vi = xi * scale;
                }
                (beta - alpha) / beta
            };
            // One pass over the trailing lower triangle: step k-1's update, then p = A22 v.
            p.fill(0.0);
            let trailing = (n - k) * (n - k - 1) / 2;
            let (v_ref, w_ref, vn) = (&v[..], &w[..], &v_next[..]);
            let threads = share(trailing);
            if threads == 1 {
                Pass { cols: &mut a[(k + 1) * n..], first: k + 1, n, v: v_ref, w: w_ref, v_next: vn, p: &mut p }.with_simd(simd);
            } else {
                // Column ranges of about equal element counts, one per thread.
                let mut passes = Vec::with_capacity(threads);
                let mut rest = &mut a[(k + 1) * n..];
                let (mut first, mut before) = (k + 1, 0);
                let mut parts = std::iter::once(&mut p).chain(p_parts.iter_mut());
                for t in 0..threads {
                    let mut last = first;
                    let target = trailing * (t + 1) / threads;
                    while last < n && (last == first || before < target) {
                        before += n - last;
                        last += 1;
                    }
                    if t + 1 == threads {
                        last = n;
                    }
                    let (cols, tail) = std::mem::take(&mut rest).split_at_mut((last - first) * n);
                    rest = tail;
                    let part = parts.next().expect("one p per thread");
                    part.fill(0.0);
                    passes.push(Pass { cols, first, n, v: v_ref, w: w_ref, v_next: vn, p: part });
                    first = last;
                }
                run_parallel(passes);
                for part in &p_parts[..threads - 1] {
                    for (pi, &qi) in p.iter_mut().zip(part) {
                        *pi += qi;
                    }
                }
            }
            // w = tau p - (tau^2/2)(p . v) v, the next pass's update with v.
            let pv: f64 = p[k + 1..].iter().zip(&v_next[k + 1..]).map(|(&pi, &vi)| pi * vi).sum();
            let half = 0.5 * tau * tau * pv;
            w.fill(0.0);
            for i in k + 1..n {
                w[i] = tau * p[i] - half * v_next[i];
            }
            std::mem::swap(&mut v, &mut v_next);
        }
    }
}

/// Passes on the current rayon pool, halves joined recursively; each re-enters pulp's
/// dispatch (a closure run by rayon is not compiled with the caller's target features).
fn run_parallel(mut passes: Vec<Pass<'_>>) {
    match passes.len() {
        0 => {}
        1 => Arch::new().dispatch(passes.pop().expect("one pass")),
        len => {
            let right = passes.split_off(len / 2);
            rayon::join(|| run_parallel(passes), || run_parallel(right));
        }
    }
}

/// One step's pass over trailing columns first.. (`cols` holds whole columns from `first`
/// on): applies the previous step's update (v, w) and adds this range's share of A22 v_next
/// into p (length n, global rows). Column j's entries below the diagonal also belong to row j
/// of A22 (symmetry): times v_next[j] they go into p below j, and the column's dot with v_next
/// goes into p[j].
struct Pass<'a> {
    cols: &'a mut [f64],
    first: usize,
    n: usize,
    v: &'a [f64],
    w: &'a [f64],
    v_next: &'a [f64],
    p: &'a mut [f64],
}

impl WithSimd for Pass<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Pass { cols, first, n, v, w, v_next: vn, p } = self;
        let last = first + cols.len() / n;
        // Columns go in pairs, which share their loads of v, w, v_next and p.
        let mut j = first;
        while j + 1 < last {
            let (left, right) = cols.split_at_mut((j + 1 - first) * n);
            let (c0, c1) = (&mut left[(j - first) * n + j..], &mut right[j + 1..n]);
            let (dot0, dot1) = update_and_multiply_pair(simd, c0, c1, &v[j..], &w[j..], &vn[j..], &mut p[j..]);
            p[j] += dot0;
            p[j + 1] += dot1;
            j += 2;
        }
        // An odd column out: once per step, plain loops.
        if j < last {
            let col = &mut cols[(j - first) * n + j..(j - first + 1) * n];
            let (vj, wj, nj) = (v[j], w[j], vn[j]);
            let mut dot = 0.0;
            for (i, c) in col.iter_mut().enumerate() {
                let e = *c - (v[j + i] * wj + w[j + i] * vj);
                *c = e;
                dot += e * vn[j + i];
                if i > 0 {
                    p[j + i] += e * nj;
                }
            }
            p[j] += dot;
        }
    }
}

/// Columns j (c0, rows j..n) and j + 1 (c1, rows j + 1..n) of the trailing matrix; v, w, vn
/// and p start at row j. Applies the rank-2 update to both, adds their below-diagonal entries
/// times vn[j], vn[j + 1] into p, and returns their dots with vn (diagonal included).
/// Explicit SIMD: the compiler kept the plain loop scalar.
#[inline(always)]
fn update_and_multiply_pair<S: Simd>(simd: S, c0: &mut [f64], c1: &mut [f64], v: &[f64], w: &[f64], vn: &[f64], p: &mut [f64]) -> (f64, f64) {
    let len = c0.len();
    let (v, w, vn, p) = (&v[..len], &w[..len], &vn[..len], &mut p[..len]);
    let (v0, w0, n0, v1, w1, n1) = (v[0], w[0], vn[0], v[1], w[1], vn[1]);
    // Row j: column j's diagonal. Row j + 1: column j's entry and column j + 1's diagonal.
    let d0 = c0[0] - (v0 * w0 + w0 * v0);
    c0[0] = d0;
    let e = c0[1] - (v1 * w0 + w1 * v0);
    c0[1] = e;
    p[1] += e * n0;
    let d1 = c1[0] - (v1 * w1 + w1 * v1);
    c1[0] = d1;
    let (mut dot0, mut dot1) = (d0 * n0 + e * n1, d1 * n1);
    // Rows j + 2..n of both columns: whole registers, then a scalar tail.
    let (c0_head, c0_tail) = S::as_mut_simd_f64s(&mut c0[2..]);
    let (c1_head, c1_tail) = S::as_mut_simd_f64s(&mut c1[1..]);
    let (p_head, p_tail) = S::as_mut_simd_f64s(&mut p[2..]);
    let ((v_head, v_tail), (w_head, w_tail), (vn_head, vn_tail)) = (S::as_simd_f64s(&v[2..]), S::as_simd_f64s(&w[2..]), S::as_simd_f64s(&vn[2..]));
    let rows = Rows { c0: c0_head, c1: c1_head, p: p_head, v: v_head, w: w_head, vn: vn_head };
    let (acc0, acc1) = rows.update(simd, [v0, w0, n0, v1, w1, n1]);
    let tail = c0_tail.iter_mut().zip(c1_tail.iter_mut()).zip(p_tail).zip(v_tail).zip(w_tail).zip(vn_tail);
    for (((((a0, a1), pi), &vi), &wi), &ni) in tail {
        let e0 = *a0 - (vi * w0 + wi * v0);
        let e1 = *a1 - (vi * w1 + wi * v1);
        *a0 = e0;
        *a1 = e1;
        dot0 += e0 * ni;
        dot1 += e1 * ni;
        *pi += e0 * n0 + e1 * n1;
    }
    (dot0 + acc0, dot1 + acc1)
}

/// The register-wide rows of a column pair (all slices the same length).
struct Rows<'a, S: Simd> {
    c0: &'a mut [S::f64s],
    c1: &'a mut [S::f64s],
    p: &'a mut [S::f64s],
    v: &'a [S::f64s],
    w: &'a [S::f64s],
    vn: &'a [S::f64s],
}

impl<S: Simd> Rows<'_, S> {
    /// The update and products of `update_and_multiply_pair` on these rows; returns the two
    /// columns' dots. `scalars` = v, w, vn at rows j and j + 1.
    #[inline(always)]
    fn update(self, simd: S, scalars: [f64; 6]) -> (f64, f64) {
        let Rows { c0, c1, p, v, w, vn } = self;
        let [v0, w0, n0, v1, w1, n1] = scalars;
        // One splat each, kept in registers (an array of splats went through the stack); the
        // update as two multiply-adds with the negated scalars.
        let (neg_v0, neg_w0, vn0) = (simd.splat_f64s(-v0), simd.splat_f64s(-w0), simd.splat_f64s(n0));
        let (neg_v1, neg_w1, vn1) = (simd.splat_f64s(-v1), simd.splat_f64s(-w1), simd.splat_f64s(n1));
        let zero = simd.splat_f64s(0.0);
        // Two accumulators per dot (even and odd rows): one multiply-add chain per column was
        // the loop's critical path.
        let (mut even0, mut odd0, mut even1, mut odd1) = (zero, zero, zero, zero);
        // Equal lengths, so the indexing below needs no bounds checks.
        let len = vn.len();
        let (c0, c1, p, v, w) = (&mut c0[..len], &mut c1[..len], &mut p[..len], &v[..len], &w[..len]);
        // A macro, not a closure: a closure is not compiled with the dispatch's target features.
        macro_rules! row {
            ($i:expr, $acc0:ident, $acc1:ident) => {{
                let i = $i;
                let e0 = simd.mul_add_f64s(w[i], neg_v0, simd.mul_add_f64s(v[i], neg_w0, c0[i]));
                let e1 = simd.mul_add_f64s(w[i], neg_v1, simd.mul_add_f64s(v[i], neg_w1, c1[i]));
                c0[i] = e0;
                c1[i] = e1;
                $acc0 = simd.mul_add_f64s(e0, vn[i], $acc0);
                $acc1 = simd.mul_add_f64s(e1, vn[i], $acc1);
                p[i] = simd.mul_add_f64s(e0, vn0, simd.mul_add_f64s(e1, vn1, p[i]));
            }};
        }
        let mut i = 0;
        while i + 1 < len {
            row!(i, even0, even1);
            row!(i + 1, odd0, odd1);
            i += 2;
        }
        if i < len {
            row!(i, even0, even1);
        }
        (simd.reduce_sum_f64s(simd.add_f64s(even0, odd0)), simd.reduce_sum_f64s(simd.add_f64s(even1, odd1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
        let m = faer::Mat::from_fn(n, n, |i, j| a[j * n + i]);
        let mut e: Vec<f64> = m.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
        e.sort_by(|x, y| x.partial_cmp(y).unwrap());
        e
    }

    /// T has A's eigenvalues (both from faer's dense solver) on random symmetric matrices of
    /// mixed sign, a rank-deficient Gram matrix and two sparse patterns (zero reflectors, zero
    /// pivots), at sizes below and above a SIMD register and with odd and even column counts;
    /// on 1, 2 and 3 threads and through pulp's scalar fallback; only the lower triangle is read
    /// (the upper is NaN).
    #[test]
    fn tridiagonal_keeps_the_spectrum() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        // 300: steps above PARALLEL_MIN_ELEMENTS, so the split runs.
        for n in [1usize, 2, 3, 9, 17, 40, 131, 300] {
            for kind in ["random", "gram", "blocks", "pattern"] {
                let mut a = vec![0.0; n * n];
                if kind == "gram" {
                    // G = X X^T with X n x (n/3 + 1): positive semi-definite, mostly zeros.
                    let k = n / 3 + 1;
                    let x: Vec<f64> = (0..n * k).map(|_| next()).collect();
                    for i in 0..n {
                        for j in 0..n {
                            a[j * n + i] = (0..k).map(|p| x[i * k + p] * x[j * k + p]).sum();
                        }
                    }
                } else {
                    // "blocks": 3 x 3 diagonal blocks, so whole subcolumns are zero (tau = 0
                    // mid-matrix); "pattern": zeros where (i + j) % 3 == 1, so some steps have
                    // alpha = 0 with the rest of x nonzero.
                    let keep = |i: usize, j: usize| match kind {
                        "blocks" => i / 3 == j / 3,
                        "pattern" => i == j || (i + j) % 3 != 1,
                        _ => true,
                    };
                    for j in 0..n {
                        for i in j..n {
                            a[j * n + i] = if keep(i, j) { next() } else { 0.0 };
                            a[i * n + j] = a[j * n + i];
                        }
                    }
                }
                let want = eigenvalues(&a, n);
                let scale = want.iter().fold(0.0f64, |m, e| m.max(e.abs()));
                // The upper triangle is garbage to the reduction.
                let mut lower = a.clone();
                for j in 0..n {
                    for i in 0..j {
                        lower[j * n + i] = f64::NAN;
                    }
                }
                // One thread, and each large step split over 2 and 3 threads of a pool.
                for threads in [1, 2, 3] {
                    let (mut d, mut e2) = (Vec::new(), Vec::new());
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut f64_copy = lower.clone();
                    pool.install(|| tridiagonalize(&mut f64_copy, n, &mut d, &mut e2, threads));
                    assert_eq!((d.len(), e2.len()), (n, n.saturating_sub(1)));
                    let got = eigenvalues(&tridiagonal(&d, &e2), n);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-13 * scale * n as f64, "n={n} {kind} threads={threads}: {g} vs {w}");
                    }
                }
                // pulp's portable fallback (what a CPU without AVX2 runs), one thread.
                let (mut d, mut e2) = (Vec::new(), Vec::new());
                let mut copy = lower.clone();
                Reduce { a: &mut copy, n, diag: &mut d, offdiag2: &mut e2, threads: 1 }.with_simd(pulp::Scalar::new());
                let got = eigenvalues(&tridiagonal(&d, &e2), n);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-13 * scale * n as f64, "n={n} {kind} scalar: {g} vs {w}");
                }
            }
        }
    }

    fn tridiagonal(d: &[f64], e2: &[f64]) -> Vec<f64> {
        let n = d.len();
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            t[i * n + i] = d[i];
            if i + 1 < n {
                t[i * n + i + 1] = e2[i].sqrt();
                t[(i + 1) * n + i] = e2[i].sqrt();
            }
        }
        t
    }
}
