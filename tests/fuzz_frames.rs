//! Hostile inputs, generated from a seeded PRNG, for every entry point a host can reach:
//!
//! * XLA FFI call frames for `lanton_step_{update,inplace}_{cpu,cuda}` and for the CUDA decode
//!   and launch-planning path (`decode_layout` + `Plan::new` + `batches`, which needs no GPU):
//!   random numbers of args/rets, entry type tags, dtypes (invalid codes too), ranks and dims
//!   (0, negative, huge, overflowing products), null/misaligned/aliased data pointers, struct
//!   sizes, stages, extension chains, api tables, and attribute sets (missing, extra, renamed,
//!   wrong types and dtypes, null payloads, non-UTF-8 strings, empty and large arrays);
//! * the plain C ABI (`include/lanton.h`): arbitrary JSON (and non-JSON) configurations, leaf
//!   descriptions with zero, huge and overflowing sizes, null pointers, hyperparameters and
//!   steps, error buffers of every length; CUDA scratch plans (`lanton_cuda_scratch_bytes`)
//!   with hostile leaf sizes and options.
//!
//! Inputs never break the documented safety contract themselves: every non-null pointer points
//! at live memory of at least the size its description states (descriptions whose size cannot
//! exist get null or a small live allocation, which the callee must refuse before reading), so
//! whatever goes wrong is the callee's fault. Each execution must end in success or in an error
//! with a named, non-empty message; the panic firewall's message (a panic caught at the ABI,
//! i.e. a missing validation), `LANTON_ERR_PANIC`, a write outside the buffers (guard words),
//! or a write to an input that was not donated counts as a failure. A crash ends the process:
//! the seed is printed first (on stderr, uncaptured) so the run can be repeated.
//!
//! `LANTON_FUZZ_ITERS` cases (default 20000) from case `LANTON_FUZZ_FIRST` (default 0), seed
//! `LANTON_FUZZ_SEED` (default 0x1a2705); `LANTON_FUZZ_CASE=i` replays one case,
//! `LANTON_FUZZ_TRACE=1` names every case before running it, `LANTON_FUZZ_DUMP=1` prints each
//! frame description.

mod common;
mod fuzz;

use fuzz::*;

#[test]
fn hostile_frames_and_c_abi_inputs() {
    let iters = env_u64("LANTON_FUZZ_ITERS", DEFAULT_ITERS);
    let seed = env_u64("LANTON_FUZZ_SEED", DEFAULT_SEED);
    let only = std::env::var("LANTON_FUZZ_CASE").ok().map(|v| v.parse::<u64>().expect("LANTON_FUZZ_CASE is an integer"));
    let trace = std::env::var("LANTON_FUZZ_TRACE").is_ok_and(|v| v == "1");
    say(&format!(
        "fuzz_frames: seed {seed:#x}, {iters} cases (LANTON_FUZZ_SEED / LANTON_FUZZ_ITERS; LANTON_FUZZ_CASE=i replays one, LANTON_FUZZ_TRACE=1 names each)"
    ));
    let start = std::time::Instant::now();
    let mut stats = Stats::default();
    let first = env_u64("LANTON_FUZZ_FIRST", 0);
    let cases: Vec<u64> = match only {
        Some(c) => vec![c],
        None => (first..first + iters).collect(),
    };
    for &case in &cases {
        if trace {
            say(&format!("fuzz_frames: case {case}"));
        }
        run_frame_case(&mut stats, seed, case);
        run_c_abi_case(&mut stats, seed, case);
    }
    let crashes = stats.failures.len();
    println!(
        "fuzz: {} executions, {} crashes/panics, {} distinct rejection messages",
        stats.executions,
        crashes,
        stats.messages.len()
    );
    println!(
        "fuzz: seed {seed:#x}, {} cases in {:.1} s; {} successful calls, {} without an api table to report through; per target (calls, successes): {:?}",
        cases.len(),
        start.elapsed().as_secs_f64(),
        stats.successes,
        stats.unreported,
        stats.by_target
    );
    if std::env::var("LANTON_FUZZ_MESSAGES").is_ok_and(|v| v == "1") {
        for m in &stats.messages {
            println!("  {m}");
        }
    }
    if crashes > 0 {
        let shown: Vec<&String> = stats.failures.iter().filter(|s| !s.is_empty()).collect();
        panic!(
            "fuzz: {crashes} failures with seed {seed:#x} (reproduce: LANTON_FUZZ_SEED={seed:#x} LANTON_FUZZ_ITERS={iters} cargo test --release --test fuzz_frames -- --nocapture):\n{}",
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }
}
