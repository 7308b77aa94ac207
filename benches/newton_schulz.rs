//! Newton-Schulz throughput on CPU: lanton's symmetric products vs a plain implementation.
//! Prints effective GFLOP/s (the plain algorithm's FLOP count / time, so both rows compare
//! directly) for the GPT-2-small shapes, and writes target/bench_newton_schulz.json.
//! Run: cargo bench --bench newton_schulz

use lanton::cpu::newton_schulz::{newton_schulz, nuclear_norm, NsWorkspace};
use lanton::step::{NS_DEFAULT, NS_DEFAULT_STEPS};
use std::time::Instant;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let coeffs = vec![NS_DEFAULT; NS_DEFAULT_STEPS];
    let mut rows_json = Vec::new();
    println!(
        "{:<12} {:>14} {:>14} {:>8} {:>10} {:>12}",
        "shape", "plain GFLOP/s", "lanton GFLOP/s", "speedup", "NS5 ms", "nuclear ms"
    );
    for &(r, c) in &[(768usize, 768usize), (768, 3072), (3072, 768)] {
        let (m, n) = (r.min(c), r.max(c));
        let flops = NS_DEFAULT_STEPS as f64 * (4.0 * (m * m * n) as f64 + 2.0 * (m * m * m) as f64);
        let mut seed = 0x2545F4914F6CDD1Du64;
        let v: Vec<f32> = (0..r * c)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let mut out = vec![0.0f32; r * c];
        let mut ws = NsWorkspace::default();
        let reps = if quick { 2 } else { 7 };
        let median = |f: &mut dyn FnMut()| {
            f(); // warm-up
            let mut times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            times[reps / 2]
        };
        let plain = median(&mut || newton_schulz(&v, r, c, &coeffs, &mut out, &mut ws, false));
        let sym = median(&mut || newton_schulz(&v, r, c, &coeffs, &mut out, &mut ws, true));
        // The noise estimate's cost on a noise step (K steps apart).
        let nuclear = median(&mut || {
            std::hint::black_box(nuclear_norm(&v, r, c, &mut ws));
        });
        let (gp, gs) = (flops / plain / 1e9, flops / sym / 1e9);
        println!(
            "{:<12} {:>14.1} {:>14.1} {:>7.2}x {:>10.1} {:>12.1}",
            format!("{r}x{c}"), gp, gs, plain / sym, 1e3 * sym, 1e3 * nuclear
        );
        rows_json.push(serde_json::json!({
            "shape": [r, c], "plain_s": plain, "lanton_s": sym, "nuclear_norm_s": nuclear,
            "plain_gflops": gp, "lanton_gflops": gs, "steps": NS_DEFAULT_STEPS,
        }));
    }
    let threads = lanton::cpu::gemm::pool().unwrap_or_else(|e| panic!("{e}")).current_num_threads();
    println!("threads: {threads}; XLA's own f32 Newton-Schulz reference on this CPU: ~110 GFLOP/s (shared/BENCHMARKS.md)");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench_newton_schulz.json");
    let doc = serde_json::json!({"threads": threads, "results": rows_json});
    if std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).is_ok() {
        println!("saved {}", path.display());
    }
}
