//! One XLA call-frame case: build, call every target, check the outcome.

use super::*;

pub fn run_frame_case(stats: &mut Stats, seed: u64, case: u64) {
    let mut rng = Rng::new(case_seed(seed, case));
    let mut spec = FrameSpec::well_formed(&mut rng);
    let mutations = match rng.below(8) {
        0 | 1 => 0,
        2..=4 => 1,
        5 | 6 => 2,
        _ => 2 + rng.upto(6),
    };
    for _ in 0..mutations {
        mutate(&mut spec, &mut rng);
    }
    spec.null_frame = rng.one_in(300);
    if std::env::var("LANTON_FUZZ_DUMP").is_ok_and(|v| v == "1") {
        say(&format!("{spec:#?}"));
    }
    // Run the same description against every target (each gets freshly built memory).
    for (name, handler) in TARGETS {
        let mut built = build(&spec, &mut Rng::new(case_seed(seed, case) ^ 0x55));
        let frame_ptr: *mut XLA_FFI_CallFrame = if spec.null_frame { std::ptr::null_mut() } else { &mut *built.frame };
        // SAFETY (harness): `built` owns every byte the frame points at, for the whole call.
        let err = unsafe { handler(frame_ptr) };
        stats.executions += 1;
        let counts = stats.by_target.entry(name).or_default();
        counts.0 += 1;
        let can_report = !spec.null_frame && built.api.is_some();
        let label = format!("{name} ({} mutations)", mutations);
        if err.is_null() {
            if can_report {
                stats.successes += 1;
                counts.1 += 1;
            } else {
                stats.unreported += 1;
            }
        } else if !can_report {
            stats.fail(seed, case, format!("{label}: returned an error without an api table to create it"));
        } else {
            let e = take_error(err).unwrap();
            let rest = e.message.strip_prefix(&format!("{name}: ")).map(str::trim).unwrap_or("");
            if rest.is_empty() {
                stats.fail(seed, case, format!("{label}: unnamed or empty error message {:?}", e.message));
            } else if e.message.contains(PANIC_MESSAGE) {
                stats.fail(seed, case, format!("{label}: panic caught by the firewall: {}", e.message));
            } else if ![errc::INVALID_ARGUMENT, errc::FAILED_PRECONDITION, errc::UNIMPLEMENTED, errc::INTERNAL].contains(&e.code) {
                stats.fail(seed, case, format!("{label}: unexpected error code {}: {}", e.code, e.message));
            } else {
                stats.reject(rest);
            }
        }
        if let Some(b) = built.arena.guards_intact() {
            stats.fail(seed, case, format!("{label}: wrote past the end of buffer block {b}"));
        }
        for (b, before) in &built.inputs {
            if &built.arena.blocks[*b] != before {
                stats.fail(seed, case, format!("{label}: modified input block {b}, which no result shares"));
            }
        }
    }
}
