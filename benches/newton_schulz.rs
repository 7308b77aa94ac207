//! Newton-Schulz and the noise estimate on CPU, for the GPT-2-small shapes:
//! * NS5 throughput, lanton's symmetric products vs plain products (effective GFLOP/s = the
//!   plain algorithm's FLOP count / time, so both rows compare directly), with the products
//!   split across the pool (a group with few layers) and one matrix per thread (many layers);
//! * the noise estimate's cost (nuclear norm of one matrix on a noise step) as a fraction of
//!   NS5, for the CPU estimator (f64 Gram matrix, tridiagonal, quadrature) and the polar iteration
//!   (the CUDA estimator); target <= 0.4x;
//! * both estimators' accuracy against an f64 SVD on several spectra.
//!
//! Writes target/bench_newton_schulz.json. Run: cargo bench --bench newton_schulz [-- --quick]

use faer::Mat;
use lanton::cpu::gemm::serial;
use lanton::cpu::newton_schulz::{newton_schulz, nuclear_norm, nuclear_norm_polar, NsWorkspace};
use lanton::step::{NS_DEFAULT, NS_DEFAULT_STEPS};
use std::time::Instant;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
    fn matrix(&mut self, r: usize, c: usize) -> Mat<f64> {
        Mat::from_fn(r, c, |_, _| self.next())
    }
}

/// An r x c matrix U diag(s) V^T with random orthogonal U, V: its nuclear norm is sum(s).
fn with_spectrum(rng: &mut Rng, r: usize, c: usize, s: &[f64]) -> Vec<f32> {
    let u = rng.matrix(r, r).qr().compute_Q();
    let v = rng.matrix(c, c).qr().compute_Q();
    let d = Mat::from_fn(r, c, |i, j| if i == j { s[i] } else { 0.0 });
    let m = &u * &d * v.transpose();
    (0..r * c).map(|k| m[(k / c, k % c)] as f32).collect()
}

fn svd_nuclear(v: &[f32], r: usize, c: usize) -> f64 {
    Mat::from_fn(r, c, |i, j| v[i * c + j] as f64).singular_values().unwrap().iter().sum()
}

/// Median wall time of `reps` runs of `f`, after one warm-up run.
fn median_secs(reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[reps / 2]
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
        let mut rng = Rng(0x2545F4914F6CDD1D);
        let v: Vec<f32> = (0..r * c).map(|_| rng.next() as f32).collect();
        let mut out = vec![0.0f32; r * c];
        let mut ws = NsWorkspace::default();
        let reps = if quick { 2 } else { 7 };
        let median = |f: &mut dyn FnMut()| median_secs(reps, f);
        // On the library's pool, as the step driver calls them (a rayon join from outside the
        // pool pays a wake-up each time).
        let (plain, sym, eigen, polar) = pool.install(|| {
            let plain = median(&mut || newton_schulz(&v, r, c, &coeffs, &mut out, &mut ws, false));
            let sym = median(&mut || newton_schulz(&v, r, c, &coeffs, &mut out, &mut ws, true));
            let eigen = median(&mut || {
                std::hint::black_box(nuclear_norm(&v, r, c, &mut ws));
            });
            let polar = median(&mut || {
                std::hint::black_box(nuclear_norm_polar(&v, r, c, &mut ws));
            });
            (plain, sym, eigen, polar)
        });
        let ns5 = plain.min(sym); // the variant the kernels use (see newton_schulz.rs)
        let (gp, gs) = (flops / plain / 1e9, flops / sym / 1e9);
        println!(
            "{:<10} {:>7.1} {:>7.1} {:>8.1} {:>9.1} {:>10.1} {:>6.2}x {:>10.1} {:>6.2}x",
            format!("{r}x{c}"), gp, gs, 1e3 * sym, 1e3 * plain, 1e3 * eigen, eigen / ns5, 1e3 * polar, polar / ns5
        );
        rows_json.push(serde_json::json!({
            "shape": [r, c], "plain_s": plain, "lanton_s": sym, "plain_gflops": gp, "lanton_gflops": gs,
            "steps": NS_DEFAULT_STEPS, "nuclear_eigen_s": eigen, "nuclear_polar_s": polar,
            "eigen_over_ns5": eigen / ns5, "polar_over_ns5": polar / ns5,
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
        let mut rng = Rng(0x51ED270B27D4A2C1 ^ (r * 7 + c) as u64);
        let v: Vec<f32> = (0..r * c).map(|_| rng.next() as f32).collect();
        let mut out = vec![0.0f32; r * c];
        let mut ws = NsWorkspace::default();
        let reps = if quick { 3 } else { 9 };
        let median = |f: &mut dyn FnMut()| median_secs(reps, f);
        let (plain, sym, eigen) = serial(|| {
            let plain = median(&mut || newton_schulz(&v, r, c, &coeffs, &mut out, &mut ws, false));
            let sym = median(&mut || newton_schulz(&v, r, c, &coeffs, &mut out, &mut ws, true));
            let eigen = median(&mut || {
                std::hint::black_box(nuclear_norm(&v, r, c, &mut ws));
            });
            (plain, sym, eigen)
        });
        let ns5 = plain.min(sym);
        println!(
            "{:<10} {:>9.2} {:>9.2} {:>6.2}x {:>10.2} {:>6.2}x",
            format!("{r}x{c}"),
            1e3 * plain,
            1e3 * sym,
            sym / plain,
            1e3 * eigen,
            eigen / ns5
        );
        serial_json.push(serde_json::json!({
            "shape": [r, c], "plain_s": plain, "sym_s": sym, "nuclear_eigen_s": eigen, "eigen_over_ns5": eigen / ns5,
        }));
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
        let mut rng = Rng(0x9E3779B97F4A7C15 ^ (r * 31 + c) as u64);
        let mut ws = NsWorkspace::default();
        for (label, s) in spectra {
            let d = if s.is_empty() { (0..r * c).map(|_| rng.next() as f32).collect() } else { with_spectrum(&mut rng, r, c, &s) };
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
    let doc = serde_json::json!({"threads": threads, "results": rows_json, "one_thread_per_matrix": serial_json, "accuracy": acc_json});
    if std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).is_ok() {
        println!("saved {}", path.display());
    }
}
