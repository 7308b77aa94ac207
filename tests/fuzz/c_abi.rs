//! One C ABI case: hostile JSON configurations, leaf descriptions and scratch plans.

use super::*;

pub fn random_json(rng: &mut Rng, depth: u32) -> String {
    let leaf = depth == 0 || rng.one_in(3);
    match if leaf { rng.below(5) } else { 5 + rng.below(2) } {
        0 => rng.pick(&["null", "true", "false"]).to_string(),
        1 => rng.pick(&["0", "-0", "1", "-1", "1.5", "1e308", "-1e308", "1e-320", "4294967295", "4294967296", "18446744073709551616", "1e400", "3.0"]).to_string(),
        2 => format!("{}", rng.float()).replace("NaN", "0").replace("inf", "1e999"),
        3 => rng.pick(&["\"hidden\"", "\"embed\"", "\"vector\"", "\"max\"", "\"mean\"", "\"min\"", "\"\"", "\"\\u0000\"", "\"\\ud800\"", "\"é\\n\\\"\""]).to_string(),
        4 => format!("\"{}\"", rng.bytes(8).iter().map(|b| (b'a' + b % 26) as char).collect::<String>()),
        5 => {
            let items: Vec<String> = (0..rng.upto(4)).map(|_| random_json(rng, depth - 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let items: Vec<String> = (0..rng.upto(4)).map(|_| format!("{}:{}", random_key(rng), random_json(rng, depth - 1))).collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

pub fn random_key(rng: &mut Rng) -> String {
    let k = rng.pick(&[
        "kind", "ns_coeffs", "noise_every", "noise_adaptive", "ratio_stat", "ratio_eps", "nesterov", "vector_eps", "noise_evry", "",
        "KIND", "kind\\u0000",
    ]);
    format!("\"{k}\"")
}

pub fn config_value(rng: &mut Rng, key: &str) -> String {
    if rng.one_in(5) {
        return random_json(rng, 2);
    }
    match key {
        "kind" => rng.pick(&["\"hidden\"", "\"embed\"", "\"vector\"", "\"conv\"", "1", "null"]).to_string(),
        "ns_coeffs" => {
            let n = match rng.below(8) {
                0 => 0,
                1 => rng.upto(300),
                _ => 1 + rng.upto(6),
            };
            let triple = |r: &mut Rng| match r.below(10) {
                0 => "[1, 2]".to_string(),
                1 => "[1, \"a\", 2, 3]".to_string(),
                2 => "[\"x\", 1, 2, 3]".to_string(),
                3 => "5".to_string(),
                4 => format!("[{}, {}, {}]", r.pick(&["1e308", "-1e308", "0"]), r.float(), r.float()),
                _ => "[3.4445, -4.7750, 2.0315]".to_string(),
            };
            format!("[{}]", (0..n).map(|_| triple(rng)).collect::<Vec<_>>().join(","))
        }
        "noise_every" => rng.pick(&["1", "2", "10", "0", "-1", "1.5", "4294967295", "4294967296", "1e20", "\"3\"", "true"]).to_string(),
        "noise_adaptive" | "nesterov" => rng.pick(&["true", "false", "0", "1", "\"true\"", "null"]).to_string(),
        "ratio_stat" => rng.pick(&["\"max\"", "\"mean\"", "\"min\"", "\"median\"", "[]", "3"]).to_string(),
        _ => rng.pick(&["1e-30", "1e-8", "0", "-0.0", "-1", "1e300", "1e-320", "\"eps\"", "1e39"]).to_string(),
    }
}

/// Bytes of a configuration (no NUL inside; the caller appends the terminator).
pub fn random_config(rng: &mut Rng) -> Vec<u8> {
    let text = match rng.below(10) {
        0..=4 => {
            let keys = ["kind", "ns_coeffs", "noise_every", "noise_adaptive", "ratio_stat", "ratio_eps", "nesterov", "vector_eps"];
            let mut parts = Vec::new();
            for k in keys {
                if k == "kind" && !rng.one_in(10) || rng.one_in(3) {
                    parts.push(format!("\"{k}\": {}", config_value(rng, k)));
                }
            }
            if rng.one_in(8) {
                parts.push(format!("{}: {}", random_key(rng), random_json(rng, 2)));
            }
            format!("{{{}}}", parts.join(", "))
        }
        5 | 6 => random_json(rng, 4),
        7 => "[".repeat(rng.upto(300)) + &"]".repeat(rng.upto(300)),
        8 => {
            let mut b = VALID_CONFIG.as_bytes().to_vec();
            for _ in 0..1 + rng.upto(3) {
                if b.is_empty() {
                    break;
                }
                let i = rng.below(b.len() as u64) as usize;
                match rng.below(3) {
                    0 => b[i] = rng.next() as u8,
                    1 => b.truncate(i),
                    _ => {
                        b.remove(i);
                    }
                }
            }
            return b.into_iter().map(|c| if c == 0 { b'?' } else { c }).collect();
        }
        _ => return rng.bytes(40).into_iter().map(|c| c.max(1)).collect(),
    };
    text.into_bytes()
}

pub const VALID_CONFIG: &str = r#"{"kind": "hidden", "noise_every": 2, "ratio_stat": "mean", "ns_coeffs": [[3.4445, -4.775, 2.0315]]}"#;

pub fn run_c_abi_case(stats: &mut Stats, seed: u64, case: u64) {
    let mut rng = Rng::new(case_seed(seed, case) ^ 0xC0FFEE);
    let mut arena = Arena::default();

    // Version queries.
    let v = unsafe { CStr::from_ptr(lanton_version()) };
    stats.executions += 2;
    if v.to_str() != Ok(env!("CARGO_PKG_VERSION")) || lanton_abi_version() != LANTON_ABI_VERSION {
        stats.fail(seed, case, "version queries disagree with the crate".into());
    }

    // Config, hyperparameters, step.
    let config = random_config(&mut rng);
    let mut config_z = config.clone();
    config_z.push(0);
    let config_ptr = if rng.one_in(40) { std::ptr::null() } else { config_z.as_ptr() as *const c_char };
    let hyper: Vec<f32> = if rng.one_in(2) {
        vec![0.02, 0.9, 0.9, 0.0, 0.2]
    } else {
        (0..5).map(|_| rng.float()).collect()
    };
    let hyper_ptr = if rng.one_in(40) { std::ptr::null() } else { hyper.as_ptr() };
    let step = if rng.one_in(4) { rng.interesting_i32() } else { 1 + rng.below(12) as i32 };

    // Leaves.
    let n = rng.pick(&[0usize, 1, 1, 2, 3]);
    let mut descs: Vec<LantonLeafF32> = Vec::new();
    let mut const_blocks = Vec::new();
    for _ in 0..n {
        let shape_kind = rng.below(10);
        let (layers, rows, cols) = match shape_kind {
            0 => (rng.interesting_i64() as usize, rng.interesting_i64() as usize, rng.interesting_i64() as usize),
            1 => (0, rng.pick(&[1usize << 20, 1 << 31, 1 << 33, usize::MAX]), rng.pick(&[1usize << 20, 1 << 31, 3])),
            2 => (rng.pick(&[1usize << 40, usize::MAX]), 0, rng.upto(4)),
            _ => (rng.upto(3), rng.upto(9), rng.upto(9)),
        };
        let total = layers.checked_mul(rows).and_then(|x| x.checked_mul(cols));
        // Backed only when the stated sizes fit in a real allocation; otherwise pointers are
        // null, or (for sizes no memory can have, or zero-length arrays) small live blocks.
        let backed = |count: Option<usize>| count.is_some_and(|c| c <= MAX_ALLOC_BYTES / 4);
        let field = |count: Option<usize>, rng: &mut Rng, arena: &mut Arena| -> *mut c_void {
            if rng.one_in(15) {
                return std::ptr::null_mut();
            }
            match count {
                Some(c) if backed(Some(c)) => {
                    let b = arena.alloc(c * 4, rng);
                    arena.ptr(b, 0)
                }
                Some(_) => std::ptr::null_mut(),
                None => {
                    let b = arena.alloc(8, rng);
                    arena.ptr(b, 0)
                }
            }
        };
        let elems = total;
        let per_layer = Some(layers);
        let param = field(elems, &mut rng, &mut arena);
        let grad = field(elems, &mut rng, &mut arena);
        if !grad.is_null() {
            const_blocks.push(arena.blocks.len() - 1);
        }
        let desc = LantonLeafF32 {
            layers,
            rows,
            cols,
            rows_are_input: rng.next() as u8,
            param: param as *mut f32,
            grad: grad as *const f32,
            momentum: field(elems, &mut rng, &mut arena) as *mut f32,
            prev_grad: field(elems, &mut rng, &mut arena) as *mut f32,
            noise: field(per_layer, &mut rng, &mut arena) as *mut f32,
            valid: field(per_layer, &mut rng, &mut arena) as *mut f32,
            prev_step: field(per_layer, &mut rng, &mut arena) as *mut i32,
            ratio: field(per_layer, &mut rng, &mut arena) as *mut f32,
            skipped: field(per_layer, &mut rng, &mut arena) as *mut i32,
        };
        descs.push(desc);
    }
    let (leaves_ptr, n_leaves) = match rng.below(30) {
        0 => (std::ptr::null(), rng.pick(&[0usize, 1, 3])),
        _ => (if descs.is_empty() { std::ptr::null() } else { descs.as_ptr() }, descs.len()),
    };
    let grads_before: Vec<(usize, Vec<u64>)> = const_blocks.iter().map(|&b| (b, arena.blocks[b].clone())).collect();

    // The error buffer: null, empty, tiny or roomy, with a guard behind it.
    let err_len = rng.pick(&[0usize, 0, 1, 2, 7, 64, 512, 512, 512]);
    let mut err_buf = vec![0x5Au8; err_len + 16];
    let err_ptr = if rng.one_in(15) { std::ptr::null_mut() } else { err_buf.as_mut_ptr() as *mut c_char };

    // SAFETY (harness): every pointer is null or live for the sizes it is described with;
    // buffers are distinct allocations.
    let rc = unsafe { lanton_step_host_f32(config_ptr, hyper_ptr, step, leaves_ptr, n_leaves, err_ptr, err_len) };
    stats.executions += 1;
    check_c_result(stats, seed, case, "lanton_step_host_f32", rc, &[LANTON_OK, LANTON_ERR_INVALID, LANTON_ERR_ENV], &err_buf, err_ptr.is_null(), err_len);
    if let Some(b) = arena.guards_intact() {
        stats.fail(seed, case, format!("lanton_step_host_f32: wrote past the end of leaf block {b}"));
    }
    for (b, before) in &grads_before {
        if &arena.blocks[*b] != before {
            stats.fail(seed, case, "lanton_step_host_f32: modified a gradient (const input)".into());
        }
    }

    // The environment check, with every kind of error buffer.
    let err_len = rng.pick(&[0usize, 1, 2, 5, 300]);
    let mut err_buf = vec![0x5Au8; err_len + 16];
    let err_ptr = if rng.one_in(8) { std::ptr::null_mut() } else { err_buf.as_mut_ptr() as *mut c_char };
    // SAFETY (harness): `err_buf` holds err_len (+16) bytes.
    let rc = unsafe { lanton_check_env(err_ptr, err_len) };
    stats.executions += 1;
    check_c_result(stats, seed, case, "lanton_check_env", rc, &[LANTON_OK, LANTON_ERR_ENV], &err_buf, err_ptr.is_null(), err_len);

    // The CUDA scratch size of a random plan (its own stream: the calls above are unchanged).
    let mut rng = Rng::new(case_seed(seed, case) ^ 0x5C2A7C4);
    let plan = random_scratch_plan(&mut rng);
    let plan_ptr = if rng.one_in(40) { std::ptr::null() } else { plan.as_ptr() as *const c_char };
    let mut bytes = 0u64;
    let bytes_ptr: *mut u64 = if rng.one_in(40) { std::ptr::null_mut() } else { &mut bytes };
    let err_len = rng.pick(&[0usize, 1, 2, 7, 512, 512]);
    let mut err_buf = vec![0x5Au8; err_len + 16];
    let err_ptr = if rng.one_in(15) { std::ptr::null_mut() } else { err_buf.as_mut_ptr() as *mut c_char };
    // SAFETY (harness): `plan` is NUL-terminated, `bytes` a live u64, `err_buf` err_len (+16) bytes.
    let rc = unsafe { lanton_cuda_scratch_bytes(plan_ptr, bytes_ptr, err_ptr, err_len) };
    stats.executions += 1;
    check_c_result(stats, seed, case, "lanton_cuda_scratch_bytes", rc, &[LANTON_OK, LANTON_ERR_INVALID], &err_buf, err_ptr.is_null(), err_len);
    if rc == LANTON_OK && bytes < 256 {
        stats.fail(seed, case, format!("lanton_cuda_scratch_bytes: {bytes} bytes (the accumulators alone take 256)"));
    }
}

/// A NUL-terminated plan for `lanton_cuda_scratch_bytes`: mostly well-formed groups with
/// hostile sizes, else arbitrary JSON.
pub fn random_scratch_plan(rng: &mut Rng) -> Vec<u8> {
    let mut text = if rng.one_in(5) {
        random_json(rng, 3)
    } else {
        let dim = |r: &mut Rng| match r.below(6) {
            0 => r.interesting_i64().to_string(),
            1 => r.pick(&["4294967296", "18446744073709551615", "18446744073709551616", "1e3", "-0", "2.5", "null", "\"3\""]).to_string(),
            _ => r.upto(9).to_string(),
        };
        let leaves: Vec<String> = (0..rng.upto(4))
            .map(|_| match rng.below(12) {
                0 => format!("[{}, {}]", dim(rng), dim(rng)),
                1 => random_json(rng, 1),
                _ => format!("[{}, {}, {}]", dim(rng), dim(rng), dim(rng)),
            })
            .collect();
        let mut parts = vec![format!("\"leaves\": [{}]", leaves.join(", "))];
        if !rng.one_in(10) {
            parts.push(format!("\"kind\": {}", rng.pick(&["\"hidden\"", "\"embed\"", "\"vector\"", "\"conv\"", "1"])));
        }
        for k in ["noise_adaptive", "noise_work"] {
            if rng.one_in(2) {
                parts.push(format!("\"{k}\": {}", rng.pick(&["true", "false", "0", "null"])));
            }
        }
        if rng.one_in(2) {
            parts.push(format!("\"ns_dtype\": {}", rng.pick(&["\"bfloat16\"", "\"float32\"", "\"float16\"", "3"])));
        }
        if rng.one_in(10) {
            parts.push(format!("{}: 1", random_key(rng)));
        }
        format!("{{{}}}", parts.join(", "))
    }
    .into_bytes();
    text.retain(|&c| c != 0);
    text.push(0);
    text
}

#[allow(clippy::too_many_arguments)]
pub fn check_c_result(stats: &mut Stats, seed: u64, case: u64, name: &str, rc: i32, allowed: &[i32], buf: &[u8], null: bool, len: usize) {
    if !allowed.contains(&rc) {
        let end = buf[..len].iter().position(|&b| b == 0).unwrap_or(len);
        let msg = String::from_utf8_lossy(&buf[..end]).into_owned();
        stats.fail(seed, case, format!("{name}: return code {rc} (message {msg:?})"));
        return;
    }
    if buf[len..].iter().any(|&b| b != 0x5A) {
        stats.fail(seed, case, format!("{name}: wrote past err_len = {len}"));
    }
    if null {
        return;
    }
    if rc == LANTON_OK {
        if buf[..len].iter().any(|&b| b != 0x5A) {
            stats.fail(seed, case, format!("{name}: wrote an error message but returned LANTON_OK"));
        }
        return;
    }
    if len == 0 {
        return;
    }
    let Some(end) = buf[..len].iter().position(|&b| b == 0) else {
        stats.fail(seed, case, format!("{name}: error message not NUL-terminated within err_len = {len}"));
        return;
    };
    let msg = String::from_utf8_lossy(&buf[..end]);
    if len >= 2 && msg.trim().is_empty() {
        stats.fail(seed, case, format!("{name}: empty error message (code {rc})"));
    } else if msg.contains(PANIC_MESSAGE) {
        stats.fail(seed, case, format!("{name}: panic caught by the firewall: {msg}"));
    } else if len >= 512 {
        stats.reject(&format!("{name}: {msg}"));
    }
}
