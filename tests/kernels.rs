//! Each direction and dual norm against a float64 reference on fresh random inputs.

mod common;
use common::*;
use lanton::cpu::newton_schulz::{newton_schulz, nuclear_norm, nuclear_norm_polar, NsWorkspace};
use lanton::cpu::step::{direction, dual_norm};
use lanton::step::{Kind, LayerShape, NuclearEstimator, StepConfig};

const SHAPES: &[(usize, usize)] = &[(1, 9), (9, 1), (16, 16), (24, 40), (40, 24), (33, 130), (130, 33)];

fn rel_fro(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

#[test]
fn newton_schulz_matches_f64_for_tall_wide_and_degenerate_shapes() {
    let coeffs = StepConfig::new(Kind::Hidden).ns_coeffs;
    let mut rng = Rng::new(11);
    let mut ws = NsWorkspace::default();
    for &(r, c) in SHAPES {
        for quantize in [false, true] {
            let mut v = rng.normals(r * c, 1.0);
            if quantize {
                v = bf16_round(&v);
            }
            let want = newton_schulz_f64(&v, r, c, &coeffs);
            for symmetric in [true, false] {
                let mut got = vec![0.0f32; r * c];
                newton_schulz(&v, r, c, &coeffs, &mut got, &mut ws, symmetric);
                let err = rel_fro(&got, &want);
                assert!(err < 2e-4, "NS {r}x{c} sym={symmetric} bf16={quantize}: rel err {err}");
            }
        }
    }
}

#[test]
fn newton_schulz_orthogonalizes() {
    // After 5 steps the singular values of the output lie in roughly [0.6, 1.25].
    let coeffs = StepConfig::new(Kind::Hidden).ns_coeffs;
    let mut rng = Rng::new(5);
    let (r, c) = (48, 80);
    let v = rng.gradient_like(r, c);
    let mut out = vec![0.0f32; r * c];
    newton_schulz(&v, r, c, &coeffs, &mut out, &mut NsWorkspace::default(), true);
    let sv = singular_values(&out, r, c);
    assert!(sv.iter().all(|&s| (0.55..1.3).contains(&s)), "singular values {sv:?}");
}

#[test]
fn nuclear_norm_within_one_percent_of_svd() {
    let mut rng = Rng::new(23);
    let mut ws = NsWorkspace::default();
    let mut shapes = SHAPES.to_vec();
    shapes.extend([(64, 64), (96, 200), (200, 96)]);
    for &(r, c) in &shapes {
        for (label, d) in [("gradient-like", rng.gradient_like(r, c)), ("gaussian", rng.normals(r * c, 0.01))] {
            let want = nuclear_f64(&d, r, c);
            let got = nuclear_norm(&d, r, c, &mut ws) as f64;
            let rel = (got - want).abs() / want;
            assert!(rel < 0.01, "{label} {r}x{c}: nuclear {got} vs svd {want} (rel {rel})");
        }
    }
    assert_eq!(nuclear_norm(&[0.0; 12], 3, 4, &mut ws), 0.0);
}

/// One matrix of the noise estimate's test spectra and its f64 SVD nuclear norm.
struct SpectrumCase {
    label: &'static str,
    r: usize,
    c: usize,
    bf16: bool,
    d: Vec<f32>,
    want: f64,
}

/// Power-law and exponential (slowly converging small singular values), low rank, rank 1 and
/// flat spectra on each shape, in f32 and rounded to bf16 (the f64 reference then sees the
/// rounded matrix).
fn spectrum_cases(rng: &mut Rng, shapes: &[(usize, usize)]) -> Vec<SpectrumCase> {
    let mut cases = Vec::new();
    for &(r, c) in shapes {
        for (label, s) in test_spectra(r.min(c)) {
            for bf16 in [false, true] {
                let mut d = with_spectrum(rng, r, c, &s);
                if bf16 {
                    d = bf16_round(&d);
                }
                let want = nuclear_f64(&d, r, c);
                cases.push(SpectrumCase { label, r, c, bf16, d, want });
            }
        }
    }
    cases
}

type Estimator = fn(&[f32], usize, usize, &mut NsWorkspace) -> f32;
/// (name, estimator, relative-error bar): the 1 % for the polar iteration; the f64 Gram
/// quadrature measures ~1e-6 (benches/newton_schulz.rs), so its bar is 1e-4.
const ESTIMATORS: [(&str, Estimator, f64); 2] = [("gram-eigen", nuclear_norm, 1e-4), ("polar", nuclear_norm_polar, 1e-2)];

#[test]
fn nuclear_norm_on_test_spectra_tall_wide_f32_and_bf16() {
    // Power-law and exponential (slowly converging small singular values), low rank, rank 1,
    // flat; tall, wide and square; inputs in f32 and rounded to bf16 (the f64 reference then
    // sees the rounded matrix). Bars: ESTIMATORS.
    let mut rng = Rng::new(29);
    let mut ws = NsWorkspace::default();
    for case in spectrum_cases(&mut rng, &[(64, 64), (48, 120), (120, 48), (200, 96)]) {
        let SpectrumCase { label, r, c, bf16, d, want } = &case;
        for (name, est, bar) in ESTIMATORS {
            let got = est(d, *r, *c, &mut ws) as f64;
            let rel = (got - want).abs() / want;
            assert!(rel < bar, "{name} {label} {r}x{c} bf16={bf16}: nuclear {got} vs {want} (rel {rel})");
        }
    }
    for (name, est, _) in ESTIMATORS {
        assert_eq!(est(&[0.0; 12], 3, 4, &mut ws), 0.0, "{name}: zero matrix");
        assert_eq!(est(&[0.0; 12], 4, 3, &mut ws), 0.0, "{name}: zero matrix, tall");
        // A scale far from 1 must not overflow the Gram matrix, nor (subnormal entries) the
        // normalization's 1 / ||d||.
        for scale in [1e18, 1e-42] {
            let d: Vec<f32> = rng.normals(24 * 40, scale);
            let (got, want) = (est(&d, 24, 40, &mut ws) as f64, nuclear_f64(&d, 24, 40));
            assert!((got - want).abs() / want < 1e-2, "{name}: scale {scale:e}: {got} vs {want}");
        }
    }
}

/// Larger matrices, whose Gram reduction is split across the pool's threads (steps above
/// 2^15 trailing elements): the same spectra on square, wide and tall matrices of 264-520 rows,
/// f32 and bf16 inputs, within the gram-eigen bar of an f64 SVD, pooled and on one thread.
/// (A temporary f32-Gram variant of this test read bf16-rounded rank-1 1.4 % low; not kept.)
#[test]
fn nuclear_norm_large_on_test_spectra_pooled_and_serial() {
    use lanton::cpu::gemm::{pool, serial};
    let pool = pool().expect("the CPU pool");
    let mut rng = Rng::new(37);
    let mut ws = NsWorkspace::default();
    for case in spectrum_cases(&mut rng, &[(300, 300), (264, 520), (520, 264)]) {
        let SpectrumCase { label, r, c, bf16, d, want } = &case;
        let pooled = pool.install(|| nuclear_norm(d, *r, *c, &mut ws)) as f64;
        let alone = serial(|| nuclear_norm(d, *r, *c, &mut ws)) as f64;
        for (mode, got) in [("pooled", pooled), ("serial", alone)] {
            let rel = (got - want).abs() / want;
            assert!(rel < ESTIMATORS[0].2, "{mode} {label} {r}x{c} bf16={bf16}: nuclear {got} vs {want} (rel {rel})");
        }
    }
}

/// `gram_upper` writes the whole upper triangle (row-major) of X X^T, which is all the noise
/// estimate's reduction reads: against a plain f64 sum on NaN-filled output, below, at and above the
/// 64- and 192-row block sizes, pooled and serial.
#[test]
fn gram_upper_fills_the_upper_triangle() {
    use lanton::cpu::gemm::{gram_upper, pool, serial};
    let mut rng = Rng::new(41);
    for &(m, k) in &[(1, 3), (5, 7), (64, 33), (100, 130), (130, 64), (200, 90), (300, 40)] {
        let x: Vec<f64> = rng.normals(m * k, 1.0).iter().map(|&v| v as f64).collect();
        // The plain sum (syrk shares gram_upper's blocks above 192 rows).
        let want: Vec<f64> = (0..m * m).map(|ij| (0..k).map(|p| x[ij / m * k + p] * x[ij % m * k + p]).sum()).collect();
        for pooled in [true, false] {
            let mut got = vec![f64::NAN; m * m];
            if pooled {
                pool().expect("the CPU pool").install(|| gram_upper(m, k, &x, &mut got));
            } else {
                serial(|| gram_upper(m, k, &x, &mut got));
            }
            for i in 0..m {
                for j in i..m {
                    let (g, w) = (got[i * m + j], want[i * m + j]);
                    assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "{m}x{k} pooled={pooled} ({i},{j}): {g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn dual_norms_match_f64_with_kind_factors() {
    let mut rng = Rng::new(31);
    let mut ws = NsWorkspace::default();
    for &(r, c) in SHAPES {
        for rows_are_input in [true, false] {
            let shape = LayerShape { layers: 1, rows: r, cols: c, rows_are_input };
            for quantize in [false, true] {
                let mut d = rng.normals(r * c, 0.5);
                if quantize {
                    d = bf16_round(&d);
                }
                let d64: Vec<f64> = d.iter().map(|&x| x as f64).collect();
                for kind in [Kind::Hidden, Kind::Embed, Kind::Vector] {
                    let want = ref_dual_norm(kind, &d64, &shape);
                    let got = dual_norm(kind, NuclearEstimator::Auto, &d, &shape, &mut ws) as f64;
                    let tol = if kind == Kind::Hidden { 1e-2 } else { 1e-5 };
                    assert!((got - want).abs() <= tol * want, "{kind} {r}x{c} rows_in={rows_are_input}: {got} vs {want}");
                }
            }
        }
    }
}

#[test]
fn sign_and_rms_directions_match_f64() {
    let mut rng = Rng::new(41);
    let mut ws = NsWorkspace::default();
    for &(r, c) in SHAPES {
        let shape = LayerShape { layers: 1, rows: r, cols: c, rows_are_input: true };
        let mut v = rng.normals(r * c, 2.0);
        v[0] = 0.0; // sign(0) = 0
        for kind in [Kind::Embed, Kind::Vector] {
            let cfg = StepConfig { noise_every: 1, ..StepConfig::paper(kind) };
            let want = ref_direction(&cfg, &v.iter().map(|&x| x as f64).collect::<Vec<_>>(), &shape);
            let mut got = vec![0.0f32; r * c];
            direction(&cfg, &v, &shape, &mut got, &mut ws);
            assert!(max_abs_diff(&got, &want) < 1e-5, "{kind} {r}x{c}");
            if kind == Kind::Embed {
                assert_eq!(got[0], 0.0);
            }
        }
    }
}
