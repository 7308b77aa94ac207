//! The plain C ABI for hosts other than XLA: a version query, a host-memory f32 step, and the
//! scratch size of a CUDA call (for the Python shim, which makes the scratch a result).
//! Every entry point catches panics; errors are returned as codes plus a message buffer.

use crate::cpu::{self, LeafIo, ParamIo, PoolError};
use crate::cuda::{self, CudaOptions};
use crate::tensor::{Tensor, TensorMut};
use crate::step::options::{self, Options, CONFIG_KEYS};
use crate::step::{self, Hyper, Kind, LayerShape, NoiseSchedule, NuclearEstimator, RatioStat, StepConfig, HYPER_LEN};
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Bumped whenever a C signature or struct below changes, or the contract of the XLA targets
/// with the Python shim does (2: leaves keep their own shapes, with a `layer_dims` attribute;
/// 3: the CUDA targets take their scratch as a trailing uint8 result sized by
/// `lanton_cuda_scratch_bytes`; 4: the `owned_layers` attribute splits a group's work across
/// devices, which an older library would ignore and so compute every update on every device;
/// 5: the `ratio_power` and `ratio_floor` attributes shape the ratio, which an older library would
/// ignore; 6: the `noise_relative` attribute, likewise; 7: `owned_layers` removed, and refused
/// by name, since the shim's exchange divides the work; 8: a trailing `phases` argument, every
/// layer's noise phase, and the `noise_schedule` option, which an older library would ignore;
/// 9: the `ratio_cap` option (r <= cap; JSON has no infinity, so any number above f32's range,
/// e.g. 1e39, means no cap), which an older library would ignore, and every leaf's `skipped`
/// counts, which the kernels now keep: a per-layer i32 argument and result of the XLA targets
/// and a field of `LantonLeafF32`).
pub const LANTON_ABI_VERSION: u32 = 9;

pub const LANTON_OK: i32 = 0;
pub const LANTON_ERR_INVALID: i32 = 1;
pub const LANTON_ERR_PANIC: i32 = 2;
/// The process cannot run the CPU kernels: an invalid environment variable (e.g.
/// `LANTON_NUM_THREADS=abc`) or a thread pool that cannot start.
pub const LANTON_ERR_ENV: i32 = 3;

/// One leaf in host memory: `layers` matrices of `rows x cols`, f32, row-major. `param` is
/// updated in place; the state arrays are read and written. Buffers must not overlap.
#[repr(C)]
pub struct LantonLeafF32 {
    pub layers: usize,
    pub rows: usize,
    pub cols: usize,
    /// Non-zero when `rows` is the input dimension d_in (Flax layout), zero for (d_out, d_in).
    pub rows_are_input: u8,
    pub param: *mut f32,
    pub grad: *const f32,
    pub momentum: *mut f32,
    pub prev_grad: *mut f32,
    /// Per-layer noise tracker H, validity flag (0/1), step of the stored G_prev, last ratio r.
    pub noise: *mut f32,
    pub valid: *mut f32,
    pub prev_step: *mut i32,
    pub ratio: *mut f32,
    /// Per layer: steps skipped for a non-finite gradient (one added on each such step).
    pub skipped: *mut i32,
}

/// The library version, e.g. "0.1.0" (static, NUL-terminated).
#[no_mangle]
pub extern "C" fn lanton_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The C ABI version (see `LANTON_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn lanton_abi_version() -> u32 {
    LANTON_ABI_VERSION
}

/// Newton-Schulz directions (one per matrix) the CPU kernels have computed in this process. A
/// group whose work is divided among devices (the Python shim's exchange) adds each matrix once
/// per step in total, not once per device: the tests read it to prove the split.
#[no_mangle]
pub extern "C" fn lanton_newton_schulz_runs() -> u64 {
    crate::cpu::newton_schulz::DIRECTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A JSON object as the step's options (`step::options`, one decoder with the XLA front end).
struct JsonOptions<'j>(&'j serde_json::Map<String, serde_json::Value>);

impl Options for JsonOptions<'_> {
    fn text(&self, n: &str) -> Result<Option<String>, String> {
        self.0.get(n).map(|x| x.as_str().map(str::to_owned).ok_or(format!("'{n}' must be a string"))).transpose()
    }
    fn number(&self, n: &str) -> Result<Option<f64>, String> {
        self.0.get(n).map(|x| x.as_f64().ok_or(format!("'{n}' must be a number"))).transpose()
    }
    fn integer(&self, n: &str) -> Result<Option<i64>, String> {
        let whole = |x: &serde_json::Value| {
            x.as_i64().or_else(|| x.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18).map(|f| f as i64))
        };
        self.0.get(n).map(|x| whole(x).ok_or(format!("'{n}' must be an integer, got {x}"))).transpose()
    }
    fn flag(&self, n: &str) -> Result<Option<bool>, String> {
        self.0.get(n).map(|x| x.as_bool().ok_or(format!("'{n}' must be true or false"))).transpose()
    }
    fn numbers(&self, n: &str) -> Result<Option<Vec<f64>>, String> {
        let Some(c) = self.0.get(n) else { return Ok(None) };
        let triples = c.as_array().ok_or(format!("'{n}' must be a list of [a, b, c]"))?;
        let mut flat = Vec::with_capacity(3 * triples.len());
        for t in triples {
            match t.as_array().map(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>()) {
                Some(Some(a)) if a.len() == 3 => flat.extend(a),
                _ => return Err(format!("every '{n}' entry must be [a, b, c] (three numbers)")),
            }
        }
        Ok(Some(flat))
    }
}

/// A configuration as the JSON object `config_from_json` reads back to the same configuration.
pub fn config_to_json(cfg: &StepConfig) -> String {
    let stat = match cfg.ratio_stat {
        RatioStat::Max => "max",
        RatioStat::Mean => "mean",
        RatioStat::Min => "min",
        RatioStat::Median => "median",
    };
    let estimator = match cfg.nuclear {
        NuclearEstimator::Auto => "auto",
        NuclearEstimator::GramEigen => "eigen",
        NuclearEstimator::Polar => "polar",
    };
    let schedule = match cfg.noise_schedule {
        NoiseSchedule::Synchronous => "synchronous",
        NoiseSchedule::Staggered => "staggered",
    };
    // JSON has no infinity: "no cap" as a number above f32's range, which decodes back to it.
    let cap = if cfg.ratio_cap.is_finite() { cfg.ratio_cap as f64 } else { 1e39 };
    serde_json::json!({
        "kind": cfg.kind.to_string(), "ns_coeffs": cfg.ns_coeffs, "noise_every": cfg.noise_every,
        "noise_schedule": schedule,
        "noise_adaptive": cfg.noise_adaptive, "ratio_stat": stat, "ratio_eps": cfg.ratio_eps,
        "ratio_power": cfg.ratio_power, "ratio_floor": cfg.ratio_floor, "ratio_cap": cap, "noise_relative": cfg.noise_relative,
        "nesterov": cfg.nesterov, "vector_eps": cfg.vector_eps, "noise_estimator": estimator,
        "adam_eps": cfg.adam_eps, "adam_eps_root": cfg.adam_eps_root,
    })
    .to_string()
}

/// lanton's defaults for a group's step options, as a JSON object of every key
/// `lanton_step_host_f32` reads (kind "hidden"): the one set the Python package, the XLA
/// attributes and this ABI share (the Python tests compare them). Static, NUL-terminated; null
/// only after an internal error.
#[no_mangle]
pub extern "C" fn lanton_default_config_json() -> *const c_char {
    static TEXT: std::sync::OnceLock<Option<std::ffi::CString>> = std::sync::OnceLock::new();
    let text = TEXT.get_or_init(|| {
        catch_unwind(|| std::ffi::CString::new(config_to_json(&StepConfig::new(Kind::Hidden))).ok()).ok().flatten()
    });
    text.as_ref().map_or(std::ptr::null(), |t| t.as_ptr())
}

/// Parses the JSON group configuration (keys: `step::options::CONFIG_KEYS`, "kind" required);
/// absent keys take the library's defaults, the same as the Python package's and the XLA
/// attributes'.
pub fn config_from_json(text: &str) -> Result<StepConfig, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("config is not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("config must be a JSON object")?;
    if let Some(k) = obj.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
        return Err(format!("config: unknown key '{k}' (known: {CONFIG_KEYS:?})"));
    }
    options::decode(&JsonOptions(obj)).map_err(|m| format!("config: {m}"))
}

/// The scratch bytes of one CUDA group call, from its JSON description: an object with
/// "kind" (hidden, embed, vector or adam) and "leaves" (a list of [layers, rows, cols], one per leaf,
/// in call order), both required, and "noise_adaptive" (default true), "noise_work" (the
/// call's `noise_work` attribute, default true) and "ns_dtype" ("bfloat16", the default, or
/// "float32"). Computed by `cuda::scratch_layout`, the function the handler lays its scratch
/// out with, so the two cannot disagree.
pub fn cuda_scratch_bytes_from_json(text: &str) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("plan is not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("plan must be a JSON object")?;
    let known = ["kind", "leaves", "noise_adaptive", "noise_work", "ns_dtype"];
    if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("plan: unknown key '{k}' (known: {known:?})"));
    }
    let kind_s = obj.get("kind").and_then(|k| k.as_str()).ok_or("plan: 'kind' (hidden, embed, vector or adam) is required")?;
    let kind = Kind::parse(kind_s).ok_or_else(|| format!("plan: unknown kind '{kind_s}'"))?;
    let flag = |k: &str| -> Result<bool, String> {
        obj.get(k).map(|x| x.as_bool().ok_or(format!("plan: '{k}' must be true or false"))).transpose().map(|b| b.unwrap_or(true))
    };
    let (noise_adaptive, noise_work) = (flag("noise_adaptive")?, flag("noise_work")?);
    let ns_f32 = match obj.get("ns_dtype").map(|x| x.as_str()) {
        None | Some(Some("bfloat16")) => false,
        Some(Some("float32")) => true,
        Some(_) => return Err("plan: 'ns_dtype' must be \"bfloat16\" or \"float32\"".into()),
    };
    let leaves = obj.get("leaves").and_then(|l| l.as_array()).ok_or("plan: 'leaves' (a list of [layers, rows, cols]) is required")?;
    // Bounds that keep every size of the layout far from overflow: a layer as the handler
    // accepts it, at most isize::MAX / 64 elements in all (the layout takes < 32 bytes each),
    // and no more layers than the kernels index.
    let (mut elems, mut layers) = (0usize, 0usize);
    let mut shapes = Vec::with_capacity(leaves.len());
    for (i, leaf) in leaves.iter().enumerate() {
        let dims = leaf.as_array().map(|a| a.iter().map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok())).collect::<Option<Vec<_>>>());
        let [l, r, c] = match dims {
            Some(Some(d)) if d.len() == 3 => [d[0], d[1], d[2]],
            _ => return Err(format!("plan: leaf {i} must be [layers, rows, cols] (three non-negative integers), got {leaf}")),
        };
        let total = step::checked_elements(l, r, c).map(|(_, total)| total);
        elems = total.and_then(|n| n.checked_add(elems)).filter(|&n| n <= isize::MAX as usize / 64).ok_or_else(|| {
            format!("plan: leaf {i} ({l} x {r} x {c}) makes the group too large")
        })?;
        layers = layers.checked_add(l).filter(|&n| n <= i32::MAX as usize).ok_or_else(|| {
            format!("plan: the group has more than {} layers (the CUDA kernels' limit)", i32::MAX)
        })?;
        shapes.push(LayerShape { layers: l, rows: r, cols: c, rows_are_input: false });
    }
    let opts = CudaOptions { noise_work, ns_f32 };
    Ok(cuda::scratch_layout(kind, noise_adaptive, opts, &shapes, 0).len as u64)
}

/// The size in bytes of the scratch result a CUDA call of `lanton_step_update`/`_inplace`
/// needs (the handlers allocate nothing, so the step can be recorded into a CUDA graph).
/// `plan_json` describes the group (see the README: kind, leaves as [layers, rows, cols],
/// noise_adaptive, noise_work, ns_dtype). Returns LANTON_OK with the size in `*bytes`, or
/// LANTON_ERR_INVALID (or LANTON_ERR_PANIC) with a NUL-terminated message in `err`.
///
/// # Safety
/// `plan_json` is null or NUL-terminated; `bytes` is null or points at a writable u64; `err`
/// is null or holds `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn lanton_cuda_scratch_bytes(plan_json: *const c_char, bytes: *mut u64, err: *mut c_char, err_len: usize) -> i32 {
    let invalid = |m: String| (LANTON_ERR_INVALID, m);
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), (i32, String)> {
        if plan_json.is_null() || bytes.is_null() {
            return Err(invalid("plan_json and bytes must not be null".into()));
        }
        // SAFETY: non-null and NUL-terminated per this function's contract.
        let text = unsafe { CStr::from_ptr(plan_json) }.to_str().map_err(|_| invalid("plan_json is not UTF-8".into()))?;
        let n = cuda_scratch_bytes_from_json(text).map_err(invalid)?;
        // SAFETY: non-null and writable per the contract.
        unsafe { *bytes = n };
        Ok(())
    }));
    finish(result, err, err_len, "lanton_cuda_scratch_bytes")
}

/// Every layer's noise phase for a group, in leaf order (`step::noise_phases`): the trailing
/// `phases` argument of the XLA targets, which the CUDA targets need for a staggered
/// schedule. `config_json` as for `lanton_step_host_f32` (its "noise_schedule" and
/// "noise_every" decide); `dims` holds (layers, rows, cols) per leaf; `out` receives
/// `out_len` int32 values, which must equal the group's total layers. Returns LANTON_OK, or
/// LANTON_ERR_INVALID (or LANTON_ERR_PANIC) with a NUL-terminated message in `err`.
///
/// # Safety
/// `config_json` is null or NUL-terminated; `dims` is null or holds 3 * `n_leaves` values; `out`
/// is null or holds `out_len` writable values; `err` is null or holds `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn lanton_noise_phases(
    config_json: *const c_char,
    dims: *const u64,
    n_leaves: usize,
    out: *mut i32,
    out_len: usize,
    err: *mut c_char,
    err_len: usize,
) -> i32 {
    let invalid = |m: String| (LANTON_ERR_INVALID, m);
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), (i32, String)> {
        if config_json.is_null() || (dims.is_null() && n_leaves > 0) || (out.is_null() && out_len > 0) {
            return Err(invalid("config_json, dims and out must not be null".into()));
        }
        // SAFETY: non-null and NUL-terminated per this function's contract.
        let text = unsafe { CStr::from_ptr(config_json) }.to_str().map_err(|_| invalid("config_json is not UTF-8".into()))?;
        let cfg = config_from_json(text).map_err(invalid)?;
        let count = n_leaves.checked_mul(3).ok_or_else(|| invalid(format!("{n_leaves} leaves overflow")))?;
        // SAFETY: `dims` holds 3 * n_leaves values per the contract.
        let dims = unsafe { host(dims, count, "dims", 0) }.map_err(invalid)?;
        let shapes: Vec<LayerShape> = dims
            .chunks(3)
            .map(|d| LayerShape { layers: d[0] as usize, rows: d[1] as usize, cols: d[2] as usize, rows_are_input: true })
            .collect();
        let layers = shapes.iter().try_fold(0usize, |n, s| n.checked_add(s.layers));
        if layers != Some(out_len) {
            return Err(invalid(format!("out holds {out_len} values, but the leaves have {layers:?} layers")));
        }
        let phases = step::noise_phases(cfg.noise_schedule, cfg.noise_every, &shapes);
        // SAFETY: `out` holds out_len writable values per the contract, and phases.len() == out_len.
        unsafe { host_mut(out, out_len, "out", 0) }.map_err(invalid)?.copy_from_slice(&phases);
        Ok(())
    }));
    finish(result, err, err_len, "lanton_noise_phases")
}

/// Writes `msg` NUL-terminated into `buf[..len]`, truncated (at a UTF-8 character boundary)
/// to fit; nothing if `buf` is null or `len` is 0.
fn write_error(buf: *mut c_char, len: usize, msg: &str) {
    if buf.is_null() || len == 0 {
        return;
    }
    let mut n = msg.len().min(len - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: the caller promises `buf` holds `len` bytes; we write n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
        *buf.add(n) = 0;
    }
}

/// SAFETY: `p` must be null only when `n == 0`, else point at `n` valid elements.
unsafe fn host<'a, T>(p: *const T, n: usize, what: &str, leaf: usize) -> Result<&'a [T], String> {
    match (p.is_null(), n) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(format!("leaf {leaf}: '{what}' is null")),
        (false, _) => Ok(std::slice::from_raw_parts(p, n)),
    }
}

/// SAFETY: as `host`, and the memory must not be referenced elsewhere during the call.
unsafe fn host_mut<'a, T>(p: *mut T, n: usize, what: &str, leaf: usize) -> Result<&'a mut [T], String> {
    match (p.is_null(), n) {
        (_, 0) => Ok(&mut []),
        (true, _) => Err(format!("leaf {leaf}: '{what}' is null")),
        (false, _) => Ok(std::slice::from_raw_parts_mut(p, n)),
    }
}

/// One LANTON step for one group of f32 leaves in host memory, parameters updated in place.
/// `config_json` is a JSON object (keys as in `StepConfig`; "kind" required), `hyper` holds
/// lr, beta1, beta2, weight_decay, scale, and `step` is the 1-based step t.
/// Returns LANTON_OK, or an error code with a NUL-terminated message in `err` (if non-null):
/// LANTON_ERR_INVALID for invalid arguments, LANTON_ERR_ENV for an invalid environment
/// (see `lanton_check_env`), LANTON_ERR_PANIC for an internal error.
///
/// # Safety
/// `config_json` is null or NUL-terminated; `hyper` is null or holds 5 floats; `leaves` is
/// null or holds `n_leaves` structs; every non-null leaf pointer is valid for the sizes its
/// leaf states; no two buffers overlap; `err` is null or holds `err_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_host_f32(
    config_json: *const c_char,
    hyper: *const f32,
    step: i32,
    leaves: *const LantonLeafF32,
    n_leaves: usize,
    err: *mut c_char,
    err_len: usize,
) -> i32 {
    let invalid = |m: String| (LANTON_ERR_INVALID, m);
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), (i32, String)> {
        if config_json.is_null() || hyper.is_null() || (leaves.is_null() && n_leaves > 0) {
            return Err(invalid("config_json, hyper and leaves must not be null".into()));
        }
        // SAFETY: non-null and NUL-terminated per this function's contract.
        let text = unsafe { CStr::from_ptr(config_json) }.to_str().map_err(|_| invalid("config_json is not UTF-8".into()))?;
        let cfg = config_from_json(text).map_err(invalid)?;
        // SAFETY: `hyper` holds HYPER_LEN floats per the contract.
        let h = Hyper::from_slice(unsafe { std::slice::from_raw_parts(hyper, HYPER_LEN) }).map_err(invalid)?;
        if step < 1 {
            return Err(invalid(format!("step must be >= 1, got {step}")));
        }
        // SAFETY: `leaves` holds n_leaves structs per the contract.
        let specs = if n_leaves == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(leaves, n_leaves) } };
        let mut io = Vec::with_capacity(n_leaves);
        for (i, lf) in specs.iter().enumerate() {
            let shape = LayerShape { layers: lf.layers, rows: lf.rows, cols: lf.cols, rows_are_input: lf.rows_are_input != 0 };
            // Per layer and in all, in elements and in bytes: the kernels size scratch per layer
            // even where the leaf has no layers.
            let n = step::checked_elements(lf.layers, lf.rows, lf.cols).map(|(_, total)| total);
            let n = n.ok_or_else(|| invalid(format!("leaf {i}: size {} x {} x {} overflows", lf.layers, lf.rows, lf.cols)))?;
            let l = lf.layers;
            // SAFETY: sizes come from the leaf description the caller vouches for.
            unsafe {
                io.push(LeafIo {
                    shape,
                    params: ParamIo::InPlace { param: TensorMut::F32(host_mut(lf.param, n, "param", i).map_err(invalid)?) },
                    grad: Tensor::F32(host(lf.grad, n, "grad", i).map_err(invalid)?),
                    momentum: TensorMut::F32(host_mut(lf.momentum, n, "momentum", i).map_err(invalid)?),
                    prev_grad: TensorMut::F32(host_mut(lf.prev_grad, n, "prev_grad", i).map_err(invalid)?),
                    noise: host_mut(lf.noise, l, "noise", i).map_err(invalid)?,
                    valid: host_mut(lf.valid, l, "valid", i).map_err(invalid)?,
                    prev_step: host_mut(lf.prev_step, l, "prev_step", i).map_err(invalid)?,
                    ratio: host_mut(lf.ratio, l, "ratio", i).map_err(invalid)?,
                    skipped: host_mut(lf.skipped, l, "skipped", i).map_err(invalid)?,
                });
            }
        }
        let shapes: Vec<LayerShape> = io.iter().map(|l| l.shape).collect();
        let phases = step::noise_phases(cfg.noise_schedule, cfg.noise_every, &shapes);
        cpu::group_step(&cfg, &h, step, &phases, &mut io).map_err(|e: PoolError| (LANTON_ERR_ENV, e.to_string()))
    }));
    finish(result, err, err_len, "lanton_step_host_f32")
}

/// Checks the environment variables lanton reads when it runs (today `LANTON_NUM_THREADS`:
/// unset, blank, or an integer from 1 to 1024). Call it when loading the library to fail
/// early: the CPU kernels refuse to run with an invalid value.
/// Returns LANTON_OK, or LANTON_ERR_ENV with a NUL-terminated message naming the variable,
/// its value and the allowed range in `err` (truncated to `err_len` bytes; nothing written
/// if `err` is null or `err_len` is 0), or LANTON_ERR_PANIC.
///
/// # Safety
/// `err` is null or holds `err_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn lanton_check_env(err: *mut c_char, err_len: usize) -> i32 {
    let result = catch_unwind(|| cpu::check_env().map_err(|m| (LANTON_ERR_ENV, m)));
    finish(result, err, err_len, "lanton_check_env")
}

/// The C ABI's error convention: a code, and the message (if any) in the caller's buffer.
fn finish(result: std::thread::Result<Result<(), (i32, String)>>, err: *mut c_char, err_len: usize, what: &str) -> i32 {
    match result {
        Ok(Ok(())) => LANTON_OK,
        Ok(Err((code, msg))) => {
            write_error(err, err_len, &msg);
            code
        }
        Err(_) => {
            write_error(err, err_len, &format!("internal error (panic) in {what}"));
            LANTON_ERR_PANIC
        }
    }
}
