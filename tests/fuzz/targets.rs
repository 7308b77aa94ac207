//! The entry points under test, the statistics of a run and its knobs.

use super::*;

pub type Handler = unsafe extern "C" fn(*mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error;

/// The CUDA handlers' decode and launch planning (pure host code), as a handler.
pub fn plan_probe(frame: *mut XLA_FFI_CallFrame, name: &str, in_place: bool) -> *mut XLA_FFI_Error {
    // SAFETY (harness): the frame was built by `build` and outlives the call.
    unsafe {
        dispatch(frame, name, 0, |c| {
            let layout = decode_layout(c, in_place)?;
            let opts: CudaOptions = decode_cuda_options(c)?;
            check_cuda_limits(&layout)?;
            let plan = Plan::new(&layout, opts, 0x7000_0000).map_err(FfiError::invalid)?;
            for track in [false, true] {
                batches(&plan.leaves, track).map_err(FfiError::invalid)?;
            }
            Ok(())
        })
    }
}
pub unsafe extern "C" fn cuda_plan_update(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    plan_probe(frame, "cuda_plan_update", false)
}
pub unsafe extern "C" fn cuda_plan_inplace(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    plan_probe(frame, "cuda_plan_inplace", true)
}

pub const TARGETS: [(&str, Handler); 6] = [
    ("lanton_step_update_cpu", lanton_step_update_cpu),
    ("lanton_step_inplace_cpu", lanton_step_inplace_cpu),
    ("lanton_step_update_cuda", lanton_step_update_cuda),
    ("lanton_step_inplace_cuda", lanton_step_inplace_cuda),
    ("cuda_plan_update", cuda_plan_update),
    ("cuda_plan_inplace", cuda_plan_inplace),
];

// ---------------------------------------------------------------------------- the stats

#[derive(Default)]
pub struct Stats {
    pub executions: u64,
    pub successes: u64,
    pub unreported: u64,
    pub failures: Vec<String>,
    pub messages: BTreeSet<String>,
    pub by_target: BTreeMap<&'static str, (u64, u64)>,
}

impl Stats {
    pub fn fail(&mut self, seed: u64, case: u64, what: String) {
        if self.failures.len() < 200 {
            // At once and uncaptured: a crash later in the run must not hide it.
            say(&format!("fuzz_frames: FAILURE case {case}: {what}"));
        }
        if self.failures.len() < 20 {
            self.failures.push(format!(
                "case {case} [LANTON_FUZZ_SEED={seed:#x} LANTON_FUZZ_CASE={case}]: {what}"
            ));
        } else {
            self.failures.push(String::new());
        }
    }
    pub fn reject(&mut self, msg: &str) {
        self.messages.insert(normalize(msg));
    }
}

/// Collapses the variable parts of a message (numbers, pointers, quoted values, the list of
/// attributes given) so that distinct messages mean distinct rejections.
pub fn normalize(msg: &str) -> String {
    let msg = match msg.find("(attributes given:") {
        Some(i) => &msg[..i],
        None => msg,
    };
    let mut out = String::new();
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '0' && chars.peek() == Some(&'x') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                chars.next();
            }
            out.push('P');
        } else if c.is_ascii_digit() || (c == '-' && chars.peek().is_some_and(|d| d.is_ascii_digit())) {
            while chars.peek().is_some_and(|c| c.is_ascii_digit() || *c == '.' || *c == 'e') {
                chars.next();
            }
            out.push('N');
        } else if c == '\'' || c == '"' {
            let rest: String = chars.clone().collect();
            let close = rest.find(c).unwrap_or(rest.len());
            let inner = &rest[..close];
            let plain = !inner.is_empty() && inner.len() <= 24 && inner.chars().all(|d| d.is_ascii_lowercase() || d == '_');
            // A quoted value of random bytes may hold the quote itself: it runs to the last one.
            let end = if plain { close } else { rest.rfind(c).unwrap_or(rest.len()) };
            let skip = rest[..end].chars().count() + usize::from(end < rest.len());
            for _ in 0..skip {
                chars.next();
            }
            out.push(c);
            out.push_str(if plain { inner } else { "…" });
            out.push(c);
        } else {
            out.push(c);
        }
    }
    out
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not an integer"))
        }
        Err(_) => default,
    }
}

/// Writes straight to the process's stderr, past the test harness's capture: visible even if
/// the process dies in the next call.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
