//! Newton-Schulz and the noise estimate on CPU, for the GPT-2-small shapes:
//! * NS5 throughput, lanton's symmetric products vs plain products (effective GFLOP/s = the
//!   plain algorithm's FLOP count / time, so both rows compare directly), with the products
//!   split across the pool (a group with few layers) and one matrix per thread (many layers);
//! * the noise estimate's cost (nuclear norm of one matrix on a noise step) as a fraction of
//!   NS5, for the CPU estimator (f64 Gram matrix, tridiagonal, quadrature) and the polar iteration
//!   (the CUDA estimator); target <= 0.4x;
//! * the noise estimate's tridiagonalization against faer's, one thread;
//! * both estimators' accuracy against an f64 SVD on several spectra.
//!
//! Writes target/bench_newton_schulz.json. Run: cargo bench --bench newton_schulz [-- --quick]

use faer::Mat;
use lanton::cpu::gemm::serial;
use lanton::cpu::newton_schulz::{newton_schulz, nuclear_norm, nuclear_norm_polar, NsWorkspace};
use lanton::step::{NS_DEFAULT, NS_DEFAULT_STEPS};
use std::time::Instant;

// The tests' one seeded generator (splitmix64).
#[path = "../tests/common/data.rs"]
#[allow(dead_code)]
mod data;
use data::Rng;

/// Uniform in [-0.5, 0.5).
fn centred(rng: &mut Rng) -> f64 {
    rng.uniform() - 0.5
}

fn random_matrix(rng: &mut Rng, r: usize, c: usize) -> Mat<f64> {
    Mat::from_fn(r, c, |_, _| centred(rng))
}

/// An r x c matrix U diag(s) V^T with random orthogonal U, V: its nuclear norm is sum(s).
fn with_spectrum(rng: &mut Rng, r: usize, c: usize, s: &[f64]) -> Vec<f32> {
    let u = random_matrix(rng, r, r).qr().compute_Q();
    let v = random_matrix(rng, c, c).qr().compute_Q();
    let d = Mat::from_fn(r, c, |i, j| if i == j { s[i] } else { 0.0 });
    let m = &u * &d * v.transpose();
    (0..r * c).map(|k| m[(k / c, k % c)] as f32).collect()
}

fn svd_nuclear(v: &[f32], r: usize, c: usize) -> f64 {
    Mat::from_fn(r, c, |i, j| v[i * c + j] as f64).singular_values().unwrap().iter().sum()
}

/// Seconds per call of each closure, timed in rounds: each closure once per round, as a batch
/// of calls lasting >= 20 ms, so that the machine's drift falls on all of them alike and
/// ratios can be taken within a round. Returns rounds[round][closure].
fn rounds(reps: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    let batches: Vec<usize> = fs
        .iter_mut()
        .map(|f| {
            f();
            let t = Instant::now();
            f();
            ((0.02 / t.elapsed().as_secs_f64().max(1e-7)).ceil() as usize).max(1)
        })
        .collect();
    (0..reps)
        .map(|_| {
            fs.iter_mut()
                .zip(&batches)
                .map(|(f, &batch)| {
                    let t = Instant::now();
                    for _ in 0..batch {
                        f();
                    }
                    t.elapsed().as_secs_f64() / batch as f64
                })
                .collect()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median per-call time of closure `i`.
fn column(r: &[Vec<f64>], i: usize) -> f64 {
    median(r.iter().map(|round| round[i]).collect())
}

/// Median over rounds of closure `num`'s time over the faster NS5 variant's (closures 0 and 1)
/// in the same round.
fn over_ns5(r: &[Vec<f64>], num: usize) -> f64 {
    median(r.iter().map(|round| round[num] / round[0].min(round[1])).collect())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let coeffs = vec![NS_DEFAULT; NS_DEFAULT_STEPS];
    let pool = lanton::cpu::gemm::pool().expect("the CPU pool");
    let mut rows_json = Vec::new();
    println!(
        "{:<10} {:>7} {:>7} {:>8} {:>9} {:>10} {:>7} {:>10} {:>7}",
        "shape", "plain", "sym", "NS5 ms", "(plain)", "eigen ms", "/NS5", "polar ms", "/NS5"
    );
    for &(r, c) in &[(768usize, 768usize), (768, 3072), (3072, 768)] {
        let (m, n) = (r.min(c), r.max(c));
        let flops = NS_DEFAULT_STEPS as f64 * (4.0 * (m * m * n) as f64 + 2.0 * (m * m * m) as f64);
        let mut rng = Rng::new(0x2545F4914F6CDD1D);
        let v: Vec<f32> = (0..r * c).map(|_| centred(&mut rng) as f32).collect();
        let (mut out_plain, mut out_sym) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        let mut ws: [NsWorkspace; 4] = Default::default();
        let [ws_plain, ws_sym, ws_eigen, ws_polar] = &mut ws;
        let reps = if quick { 2 } else { 7 };
        // On the library's pool, as the step driver calls them (a rayon join from outside the
        // pool pays a wake-up each time).
        let r5 = pool.install(|| {
            rounds(
                reps,
                &mut [
                    &mut || newton_schulz(&v, r, c, &coeffs, &mut out_plain, ws_plain, false),
                    &mut || newton_schulz(&v, r, c, &coeffs, &mut out_sym, ws_sym, true),
                    &mut || {
                        std::hint::black_box(nuclear_norm(&v, r, c, ws_eigen));
                    },
                    &mut || {
                        std::hint::black_box(nuclear_norm_polar(&v, r, c, ws_polar));
                    },
                ],
            )
        });
        let (plain, sym, eigen, polar) = (column(&r5, 0), column(&r5, 1), column(&r5, 2), column(&r5, 3));
        let (eigen_ratio, polar_ratio) = (over_ns5(&r5, 2), over_ns5(&r5, 3));
        let (gp, gs) = (flops / plain / 1e9, flops / sym / 1e9);
        println!(
            "{:<10} {:>7.1} {:>7.1} {:>8.1} {:>9.1} {:>10.1} {:>6.2}x {:>10.1} {:>6.2}x",
            format!("{r}x{c}"), gp, gs, 1e3 * sym, 1e3 * plain, 1e3 * eigen, eigen_ratio, 1e3 * polar, polar_ratio
        );
        rows_json.push(serde_json::json!({
            "shape": [r, c], "plain_s": plain, "lanton_s": sym, "plain_gflops": gp, "lanton_gflops": gs,
            "steps": NS_DEFAULT_STEPS, "nuclear_eigen_s": eigen, "nuclear_polar_s": polar,
            "eigen_over_ns5": eigen_ratio, "polar_over_ns5": polar_ratio,
        }));
    }

    // One matrix per thread: the step driver's mode when a group has at least two layers per
    // thread (every product on the calling thread, `gemm::serial`).
    println!("\none matrix per thread (products not split): NS5 ms and the noise estimate / NS5");
    println!("{:<10} {:>9} {:>9} {:>7} {:>10} {:>7}", "shape", "plain ms", "sym ms", "sym/pl", "eigen ms", "/NS5");
    let mut serial_json = Vec::new();
    let serial_shapes: &[(usize, usize)] = if quick {
        &[(128, 128), (128, 512), (768, 768)]
    } else {
        &[(128, 128), (128, 512), (512, 128), (256, 1024), (768, 768), (768, 3072)]
    };
    for &(r, c) in serial_shapes {
        let mut rng = Rng::new(0x51ED270B27D4A2C1 ^ (r * 7 + c) as u64);
        let v: Vec<f32> = (0..r * c).map(|_| centred(&mut rng) as f32).collect();
        let (mut out_plain, mut out_sym) = (vec![0.0f32; r * c], vec![0.0f32; r * c]);
        let mut ws: [NsWorkspace; 3] = Default::default();
        let [ws_plain, ws_sym, ws_eigen] = &mut ws;
        let reps = if quick { 3 } else { 9 };
        let r3 = serial(|| {
            rounds(
                reps,
                &mut [
                    &mut || newton_schulz(&v, r, c, &coeffs, &mut out_plain, ws_plain, false),
                    &mut || newton_schulz(&v, r, c, &coeffs, &mut out_sym, ws_sym, true),
                    &mut || {
                        std::hint::black_box(nuclear_norm(&v, r, c, ws_eigen));
                    },
                ],
            )
        });
        let (plain, sym, eigen, eigen_ratio) = (column(&r3, 0), column(&r3, 1), column(&r3, 2), over_ns5(&r3, 2));
        println!(
            "{:<10} {:>9.2} {:>9.2} {:>6.2}x {:>10.2} {:>6.2}x",
            format!("{r}x{c}"),
            1e3 * plain,
            1e3 * sym,
            sym / plain,
            1e3 * eigen,
            eigen_ratio
        );
        serial_json.push(serde_json::json!({
            "shape": [r, c], "plain_s": plain, "sym_s": sym, "nuclear_eigen_s": eigen, "eigen_over_ns5": eigen_ratio,
        }));
    }

    // The noise estimate's reduction against faer's (the library's path before 2026-12-03),
    // one thread, on the f64 Gram matrix of a random matrix.
    println!("\nHouseholder tridiagonalization of an f64 Gram matrix, one thread: ms");
    println!("{:<8} {:>10} {:>10} {:>8}", "rows", "lanton", "faer", "ratio");
    let mut tridiag_json = Vec::new();
    let tridiag_sizes: &[usize] = if quick { &[128, 768] } else { &[128, 256, 512, 768] };
    for &m in tridiag_sizes {
        let mut rng = Rng::new(0x9E3779B97F4A7C15 ^ m as u64);
        let x: Vec<f64> = (0..m * m).map(|_| centred(&mut rng)).collect();
        let mut gram = vec![0.0f64; m * m];
        lanton::cpu::gemm::syrk(m, m, &x, &mut gram);
        let reps = if quick { 3 } else { 9 };
        let (mut ours_work, mut faer_work, mut diag, mut offdiag2) = (gram.clone(), gram.clone(), Vec::new(), Vec::new());
        let mut ours = || {
            ours_work.copy_from_slice(&gram);
            lanton::cpu::tridiag::tridiagonalize(&mut ours_work, m, &mut diag, &mut offdiag2, 1);
        };
        let mut theirs = || {
            use faer::dyn_stack::{MemBuffer, MemStack};
            use faer::linalg::evd::tridiag;
            faer_work.copy_from_slice(&gram);
            let mut mat = faer::MatMut::from_column_major_slice_mut(&mut faer_work, m, m);
            let mut householder = Mat::<f64>::zeros(1, m - 1);
            let mut mem = MemBuffer::new(tridiag::tridiag_in_place_scratch::<f64>(m, faer::Par::Seq, Default::default()));
            tridiag::tridiag_in_place(mat.as_mut(), householder.as_mut(), faer::Par::Seq, MemStack::new(&mut mem), Default::default());
        };
        let timed = rounds(reps, &mut [&mut ours, &mut theirs]);
        let (ours, theirs) = (column(&timed, 0), column(&timed, 1));
        let ratio = median(timed.iter().map(|round| round[0] / round[1]).collect());
        println!("{:<8} {:>10.3} {:>10.3} {:>7.2}x", m, 1e3 * ours, 1e3 * theirs, ratio);
        tridiag_json.push(serde_json::json!({ "rows": m, "lanton_s": ours, "faer_s": theirs }));
    }

    // Accuracy against an f64 SVD (relative error of ||D||_*).
    let mut acc_json = Vec::new();
    println!("\nnoise estimate vs f64 SVD, relative error of ||D||_*");
    println!("{:<12} {:<14} {:>12} {:>12}", "shape", "spectrum", "eigen", "polar");
    // 128x512 and 256x1024 take the f64 Gram quadrature, 768 rows the f32 eigensolver.
    let shapes: &[(usize, usize)] = if quick { &[(256, 512)] } else { &[(128, 512), (256, 1024), (768, 768), (768, 3072), (3072, 768)] };
    for &(r, c) in shapes {
        let k = r.min(c);
        let spectra: [(&str, Vec<f64>); 6] = [
            ("power-law 1/2", (0..k).map(|i| 1.0 / ((i + 1) as f64).sqrt()).collect()),
            ("power-law 1", (0..k).map(|i| 1.0 / (i + 1) as f64).collect()),
            ("exponential", (0..k).map(|i| (-(i as f64) / (k as f64 / 8.0)).exp()).collect()),
            ("rank-8", (0..k).map(|i| if i < 8 { 8.0 - i as f64 } else { 0.0 }).collect()),
            ("rank-1", (0..k).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect()),
            ("gaussian", Vec::new()),
        ];
        let mut rng = Rng::new(0x9E3779B97F4A7C15 ^ (r * 31 + c) as u64);
        let mut ws = NsWorkspace::default();
        for (label, s) in spectra {
            let d = if s.is_empty() { (0..r * c).map(|_| centred(&mut rng) as f32).collect() } else { with_spectrum(&mut rng, r, c, &s) };
            let want = svd_nuclear(&d, r, c);
            let e = (nuclear_norm(&d, r, c, &mut ws) as f64 - want).abs() / want;
            let p = (nuclear_norm_polar(&d, r, c, &mut ws) as f64 - want).abs() / want;
            println!("{:<12} {:<14} {:>12.2e} {:>12.2e}", format!("{r}x{c}"), label, e, p);
            acc_json.push(serde_json::json!({"shape": [r, c], "spectrum": label, "eigen_rel_err": e, "polar_rel_err": p}));
        }
    }
    let threads = lanton::cpu::gemm::pool().unwrap_or_else(|e| panic!("{e}")).current_num_threads();
    println!("threads: {threads}; XLA's own f32 Newton-Schulz reference on this CPU: ~110 GFLOP/s (shared/BENCHMARKS.md)");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench_newton_schulz.json");
    let doc = serde_json::json!({"threads": threads, "results": rows_json, "one_thread_per_matrix": serial_json, "tridiagonalization": tridiag_json, "accuracy": acc_json});
    if std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).is_ok() {
        println!("saved {}", path.display());
    }
}
