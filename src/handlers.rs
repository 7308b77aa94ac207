//! The exported XLA FFI handlers. Each decodes and validates its frame in one place
//! (`decode_step_call`), then calls the backend's plain group-step function.
//!
//! Call layout (shared with jax_bindings/lanton/_ffi.py):
//!   args: hyper f32[5] (lr, beta1, beta2, weight_decay, scale), step i32[] (t, 1-based),
//!         then per leaf: param (L,R,C), grad (L,R,C), momentum (L,R,C), prev_grad (L,R,C),
//!         noise f32[L], valid f32[L], prev_step i32[L]
//!   rets per leaf: update or new param (L,R,C), momentum, prev_grad, noise, valid, prev_step,
//!         ratio f32[L]; then, for the CUDA targets only, scratch u8[bytes] (bytes from
//!         `lanton_cuda_scratch_bytes`, src/capi.rs: the handler allocates nothing)
//!   attrs: kind, ns_coeffs, noise_every, noise_adaptive, ratio_stat, ratio_eps, nesterov,
//!         vector_eps, ratio_power, ratio_floor and noise_relative (optional, 1, 0 and false), rows_are_input (one per leaf), leaf_names ("\n"-joined, optional),
//!         layer_dims (optional, (L, R, C) per leaf: then param/grad/momentum/prev_grad may have
//!         any shape of L*R*C elements in that order, and the per-layer buffers any shape of L)

use crate::cpu::{self, LeafIo, ParamIo};
use crate::cuda::{self, CudaOptions};
use crate::ffi::api::{dtype, XLA_FFI_CallFrame, XLA_FFI_Error, TRAIT_COMMAND_BUFFER_COMPATIBLE};
use crate::ffi::buffers::float_dtype_ok;
use crate::ffi::frame::element_count;
use crate::ffi::handler::{dispatch, dispatch_staged};
use crate::ffi::{BufferRef, BufferSet, CallFrame, FfiError, FfiResult, TensorMut};
use crate::step::layout::{LeafBuffers, Pair, StepLayout};
use crate::step::{Hyper, Kind, LayerShape, NuclearEstimator, RatioStat, StepConfig, HYPER_LEN};

pub const ARGS_PER_LEAF: usize = 7;
pub const RETS_PER_LEAF: usize = 7;
pub const GROUP_ARGS: usize = 2;
const ARG_NAMES: [&str; ARGS_PER_LEAF] = ["param", "grad", "momentum", "prev_grad", "noise", "valid", "prev_step"];
const RET_NAMES: [&str; RETS_PER_LEAF] = ["out", "momentum", "prev_grad", "noise", "valid", "prev_step", "ratio"];

/// Reads the structural attributes into a validated config.
pub fn decode_config(call: &CallFrame) -> FfiResult<StepConfig> {
    let kind_s = call.attr_str("kind")?;
    let kind = Kind::parse(&kind_s).ok_or_else(|| {
        FfiError::invalid(format!("attribute 'kind': expected one of hidden, embed, vector, got '{kind_s}'"))
    })?;
    let stat_s = call.attr_str("ratio_stat")?;
    let ratio_stat = RatioStat::parse(&stat_s)
        .ok_or_else(|| FfiError::invalid(format!("attribute 'ratio_stat': expected max, mean, min or median, got '{stat_s}'")))?;
    let flat = call.attr_f32_array("ns_coeffs")?;
    if flat.len() % 3 != 0 {
        return Err(FfiError::invalid(format!(
            "attribute 'ns_coeffs': expected (a, b, c) triples (a multiple of 3 values), got {}",
            flat.len()
        )));
    }
    let noise_every = call.attr_i64("noise_every")?;
    if !(1..=i32::MAX as i64).contains(&noise_every) {
        return Err(FfiError::invalid(format!("attribute 'noise_every': expected >= 1, got {noise_every}")));
    }
    let cfg = StepConfig {
        kind,
        ns_coeffs: flat.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
        noise_every: noise_every as u32,
        noise_adaptive: call.attr_bool("noise_adaptive")?,
        ratio_stat,
        ratio_eps: call.attr_f32("ratio_eps")?,
        ratio_power: call.attr_opt("ratio_power", CallFrame::attr_f32)?.unwrap_or(1.0),
        ratio_floor: call.attr_opt("ratio_floor", CallFrame::attr_f32)?.unwrap_or(0.0),
        noise_relative: call.attr_opt("noise_relative", CallFrame::attr_bool)?.unwrap_or(false),
        nesterov: call.attr_bool("nesterov")?,
        vector_eps: call.attr_f32("vector_eps")?,
        nuclear: match call.attr_opt("noise_estimator", CallFrame::attr_str)?.as_deref() {
            None => NuclearEstimator::Auto,
            Some(s) => NuclearEstimator::parse(s).ok_or_else(|| {
                FfiError::invalid(format!("attribute 'noise_estimator': expected auto, eigen or polar, got '{s}'"))
            })?,
        },
        // Its length is checked against the group's layers in `decode_layout`.
        owned_layers: call.attr_opt("owned_layers", CallFrame::attr_i64_array)?.map(|v| v.iter().map(|&o| o != 0).collect()),
    };
    cfg.validate().map_err(FfiError::invalid)?;
    Ok(cfg)
}

fn expect_dtype(b: &BufferRef, want: i32, what: &str) -> FfiResult<()> {
    if b.dtype != want {
        return Err(FfiError::invalid(format!("{what}: expected {}, got {}", dtype::name(want), dtype::name(b.dtype))));
    }
    Ok(())
}

fn expect_dims(b: &BufferRef, want: &[i64], what: &str) -> FfiResult<()> {
    if b.dims != want {
        return Err(FfiError::invalid(format!("{what}: expected shape {want:?}, got {:?}", b.dims)));
    }
    Ok(())
}

/// A leaf's (layers, rows, cols): from `layer_dims` when given (the buffer may have any shape
/// with that many elements, in that order), else the parameter buffer must be rank 3.
fn leaf_dims(param: &BufferRef, layer_dims: Option<&[i64]>, what: &str) -> FfiResult<[i64; 3]> {
    let Some(d) = layer_dims else {
        return match *param.dims {
            [l, r, c] => Ok([l, r, c]),
            _ => Err(FfiError::invalid(format!("{what}: expected rank 3 (layers, rows, cols), got shape {:?}", param.dims))),
        };
    };
    let dims = [d[0], d[1], d[2]];
    let want = if dims.iter().all(|&x| x >= 0) { element_count(&dims) } else { None };
    if want.is_none() || want != element_count(param.dims) {
        return Err(FfiError::invalid(format!(
            "{what}: attribute layer_dims gives (layers, rows, cols) = {dims:?}, which does not fit a buffer of shape {:?}",
            param.dims
        )));
    }
    Ok(dims)
}

/// A per-layer state buffer: shape [layers], or any shape of `layers` elements with `layer_dims`.
fn expect_per_layer(b: &BufferRef, layers: i64, any_shape: bool, what: &str) -> FfiResult<()> {
    if !any_shape {
        return expect_dims(b, &[layers], what);
    }
    if element_count(b.dims) != usize::try_from(layers).ok() {
        return Err(FfiError::invalid(format!("{what}: expected {layers} elements (one per layer), got shape {:?}", b.dims)));
    }
    Ok(())
}

/// Everything the CPU step needs, borrowed from the frame.
pub struct DecodedStep<'a> {
    pub config: StepConfig,
    pub hyper: Hyper,
    pub t: i32,
    pub leaves: Vec<LeafIo<'a>>,
}

/// Decodes and validates a step call; `in_place` selects the fused variant's output meaning.
#[allow(clippy::needless_range_loop)] // i indexes args, rets and attributes alike
pub fn decode_layout<'a>(call: &CallFrame<'a>, in_place: bool) -> FfiResult<StepLayout<'a>> {
    let config = decode_config(call)?;
    let nargs = call.num_args();
    if nargs < GROUP_ARGS || (nargs - GROUP_ARGS) % ARGS_PER_LEAF != 0 {
        return Err(FfiError::invalid(format!(
            "expected 2 + {ARGS_PER_LEAF} x (number of leaves) arguments, got {nargs}"
        )));
    }
    let n_leaves = (nargs - GROUP_ARGS) / ARGS_PER_LEAF;
    // 7 results per leaf, then optionally one scratch result (7n + 1 is never a multiple of 7).
    let leaf_rets = n_leaves * RETS_PER_LEAF;
    let nrets = call.num_rets();
    if nrets != leaf_rets && nrets != leaf_rets + 1 {
        return Err(FfiError::invalid(format!(
            "expected {RETS_PER_LEAF} x {n_leaves} results for {n_leaves} leaves (plus one uint8 scratch result on CUDA), got {nrets}"
        )));
    }
    let rows_are_input = call.attr_i64_array("rows_are_input")?;
    if rows_are_input.len() != n_leaves {
        return Err(FfiError::invalid(format!(
            "attribute 'rows_are_input': expected one entry per leaf ({n_leaves}), got {}",
            rows_are_input.len()
        )));
    }
    // (layers, rows, cols) per leaf when the buffers keep the parameters' own shapes (no
    // reshape in the shim, so XLA can update donated buffers in place without copies).
    let layer_dims = call.attr_opt("layer_dims", CallFrame::attr_i64_array)?;
    if let Some(d) = &layer_dims {
        if d.len() != 3 * n_leaves {
            return Err(FfiError::invalid(format!(
                "attribute 'layer_dims': expected (layers, rows, cols) per leaf, {} entries for {n_leaves} leaves, got {}",
                3 * n_leaves,
                d.len()
            )));
        }
    }
    let names: Vec<String> = match call.attr_opt("leaf_names", CallFrame::attr_str)? {
        Some(joined) => joined.split('\n').map(str::to_owned).collect(),
        None => Vec::new(),
    };
    let leaf_name = |i: usize| names.get(i).filter(|s| !s.is_empty()).cloned().unwrap_or_else(|| format!("leaf {i}"));

    let hyper_b = call.arg(0)?;
    expect_dtype(&hyper_b, dtype::F32, "argument 'hyper'")?;
    expect_dims(&hyper_b, &[HYPER_LEN as i64], "argument 'hyper'")?;
    let step_b = call.arg(1)?;
    expect_dtype(&step_b, dtype::S32, "argument 'step'")?;
    expect_dims(&step_b, &[], "argument 'step'")?;

    // Validate every leaf's buffers and register them for the aliasing proof.
    let mut set = BufferSet::new();
    set.claim(&hyper_b, false, "hyper");
    set.claim(&step_b, false, "step");
    let scratch = if nrets == leaf_rets + 1 {
        let b = call.ret(leaf_rets)?;
        expect_dtype(&b, dtype::U8, "result 'scratch'")?;
        if b.dims.len() != 1 {
            return Err(FfiError::invalid(format!("result 'scratch': expected rank 1 (bytes), got shape {:?}", b.dims)));
        }
        set.claim(&b, true, "scratch");
        Some(b)
    } else {
        None
    };
    let mut leaves = Vec::with_capacity(n_leaves);
    for i in 0..n_leaves {
        let name = leaf_name(i);
        let a = |k: usize| call.arg(GROUP_ARGS + i * ARGS_PER_LEAF + k);
        let r = |k: usize| call.ret(i * RETS_PER_LEAF + k);
        let what = |k: usize, ret: bool| format!("{} ({})", name, if ret { RET_NAMES[k] } else { ARG_NAMES[k] });
        let param = a(0)?;
        let dims3 = leaf_dims(&param, layer_dims.as_deref().map(|d| &d[3 * i..3 * i + 3]), &what(0, false))?;
        let layers = dims3[0];
        // The buffer's own size was checked; a leaf of zero layers can still claim a layer
        // size that overflows (the kernels size their per-layer scratch from it).
        let layer_len = element_count(&dims3[1..]).filter(|&n| n <= isize::MAX as usize / 8);
        if layer_len.is_none() {
            return Err(FfiError::invalid(format!(
                "{}: a layer of {} x {} elements is too large",
                what(0, false),
                dims3[1],
                dims3[2]
            )));
        }
        for k in 0..4 {
            let b = a(k)?;
            if !float_dtype_ok(b.dtype) {
                return Err(FfiError::invalid(format!(
                    "{}: unsupported dtype {} (expected float32, bfloat16 or float16)",
                    what(k, false),
                    dtype::name(b.dtype)
                )));
            }
            expect_dims(&b, param.dims, &what(k, false))?;
        }
        for k in 4..7 {
            let b = a(k)?;
            expect_dtype(&b, if k == 6 { dtype::S32 } else { dtype::F32 }, &what(k, false))?;
            expect_per_layer(&b, layers, layer_dims.is_some(), &what(k, false))?;
        }
        // Results mirror their inputs; `out` has the parameter's dtype and shape.
        let ret_src = [0usize, 2, 3, 4, 5, 6];
        for (k, &src) in ret_src.iter().enumerate() {
            let (rb, ab) = (r(k)?, a(src)?);
            expect_dtype(&rb, ab.dtype, &what(k, true))?;
            expect_dims(&rb, ab.dims, &what(k, true))?;
        }
        let ratio = r(6)?;
        expect_dtype(&ratio, dtype::F32, &what(6, true))?;
        expect_per_layer(&ratio, layers, layer_dims.is_some(), &what(6, true))?;

        let grad = a(1)?;
        set.claim(&grad, false, what(1, false));
        let link = |ak: usize, rk: usize, set: &mut BufferSet| -> FfiResult<Pair<'a>> {
            let (arg, ret) = (a(ak)?, r(rk)?);
            let aliased = arg.data == ret.data;
            if !aliased {
                set.claim(&arg, false, what(ak, false));
            }
            set.claim(&ret, true, what(rk, true));
            Ok(Pair { arg, ret, aliased })
        };
        let state = [
            link(2, 1, &mut set)?,
            link(3, 2, &mut set)?,
            link(4, 3, &mut set)?,
            link(5, 4, &mut set)?,
            link(6, 5, &mut set)?,
        ];
        let param_io = if in_place {
            link(0, 0, &mut set)?
        } else {
            set.claim(&param, false, what(0, false));
            let out = r(0)?;
            set.claim(&out, true, what(0, true));
            Pair { arg: param, ret: out, aliased: false }
        };
        set.claim(&ratio, true, what(6, true));
        let shape = LayerShape {
            layers: layers as usize,
            rows: dims3[1] as usize,
            cols: dims3[2] as usize,
            rows_are_input: rows_are_input[i] != 0,
        };
        leaves.push(LeafBuffers { name, shape, grad, state, param: param_io, ratio });
    }
    let layers: usize = leaves.iter().map(|lf| lf.shape.layers).sum();
    if let Some(owned) = &config.owned_layers {
        if owned.len() != layers {
            return Err(FfiError::invalid(format!(
                "attribute 'owned_layers': expected one flag per layer of the group ({layers}), got {}",
                owned.len()
            )));
        }
    }
    set.seal()?;
    Ok(StepLayout { config, in_place, hyper: hyper_b, step: step_b, leaves, scratch, set })
}

/// The CPU view of a decoded call: host slices, state inputs copied into their results.
pub fn decode_step_call<'a>(call: &CallFrame<'a>, in_place: bool) -> FfiResult<DecodedStep<'a>> {
    let StepLayout { config, hyper: hyper_b, step: step_b, leaves: bufs, scratch, set, .. } = decode_layout(call, in_place)?;
    if scratch.is_some() {
        return Err(FfiError::invalid(format!(
            "the CPU targets take no scratch result: expected {RETS_PER_LEAF} x {} results, got one more",
            bufs.len()
        )));
    }
    let hyper = Hyper::from_slice(set.input(&hyper_b, "hyper")?.into_f32("hyper")?).map_err(FfiError::invalid)?;
    let t = set.input_i32(&step_b, "step")?[0];
    if t < 1 {
        return Err(FfiError::invalid(format!("argument 'step': expected the 1-based step t >= 1, got {t}")));
    }

    let mut leaves = Vec::with_capacity(bufs.len());
    for LeafBuffers { name, shape, grad, state, param: param_io, ratio } in bufs {
        let float_out = |p: &Pair<'a>, what: &str| -> FfiResult<TensorMut<'a>> {
            let mut out = set.output(&p.ret, what)?;
            if !p.aliased {
                out.copy_from(&set.input(&p.arg, what)?)?;
            }
            Ok(out)
        };
        let f32_out = |p: &Pair<'a>, what: &str| -> FfiResult<&'a mut [f32]> { float_out(p, what)?.into_f32(what) };
        let prev_step = set.output_i32(&state[4].ret, &name)?;
        if !state[4].aliased {
            prev_step.copy_from_slice(set.input_i32(&state[4].arg, &name)?);
        }
        let params = if in_place {
            ParamIo::InPlace { param: float_out(&param_io, &name)? }
        } else {
            ParamIo::Update { param: set.input(&param_io.arg, &name)?, update: set.output(&param_io.ret, &name)? }
        };
        leaves.push(LeafIo {
            shape,
            params,
            grad: set.input(&grad, &name)?,
            momentum: float_out(&state[0], &name)?,
            prev_grad: float_out(&state[1], &name)?,
            noise: f32_out(&state[2], &name)?,
            valid: f32_out(&state[3], &name)?,
            prev_step,
            ratio: set.output(&ratio, &name)?.into_f32(&name)?,
        });
    }
    Ok(DecodedStep { config, hyper, t, leaves })
}

fn run_cpu_step(call: &CallFrame, in_place: bool) -> FfiResult<()> {
    let mut d = decode_step_call(call, in_place)?;
    cpu::group_step(&d.config, &d.hyper, d.t, &mut d.leaves).map_err(|e| match e {
        cpu::PoolError::Env(m) => FfiError::precondition(m),
        cpu::PoolError::Build(m) => FfiError::internal(m),
    })
}

/// The CUDA kernels index layers with 32-bit integers: refuse a group they cannot address.
pub fn check_cuda_limits(layout: &StepLayout) -> FfiResult<()> {
    let layers = layout.leaves.iter().try_fold(0usize, |n, l| n.checked_add(l.shape.layers));
    match layers {
        Some(n) if n <= i32::MAX as usize => Ok(()),
        _ => Err(FfiError::invalid(format!("the group has more than {} layers (the CUDA kernels' limit)", i32::MAX))),
    }
}

/// Reads the CUDA-only attributes (optional; defaults: noise work on, bf16 Newton-Schulz).
pub fn decode_cuda_options(call: &CallFrame) -> FfiResult<CudaOptions> {
    let noise_work = call.attr_opt("noise_work", CallFrame::attr_bool)?.unwrap_or(true);
    let ns_f32 = match call.attr_opt("ns_dtype", CallFrame::attr_str)?.as_deref() {
        None | Some("bfloat16") => false,
        Some("float32") => true,
        Some(other) => {
            return Err(FfiError::invalid(format!("attribute 'ns_dtype': expected bfloat16 or float32, got '{other}'")))
        }
    };
    Ok(CudaOptions { noise_work, ns_f32 })
}

fn run_cuda_step(call: &CallFrame, in_place: bool) -> FfiResult<()> {
    let layout = decode_layout(call, in_place)?;
    if layout.config.nuclear == NuclearEstimator::GramEigen {
        return Err(FfiError::invalid(
            "attribute 'noise_estimator': 'eigen' runs on CPU only; the CUDA kernels estimate the noise by polar iteration ('polar' or 'auto')",
        ));
    }
    if layout.config.noise_relative {
        return Err(FfiError::invalid(
            "attribute 'noise_relative': the noise-to-signal measure runs on CPU only (an ablation option); \
             the CUDA kernels measure the paper's absolute noise",
        ));
    }
    let opts = decode_cuda_options(call)?;
    check_cuda_limits(&layout)?;
    cuda::group_step(call, &layout, opts)
}

/// XLA FFI handler (CPU): one LANTON step for one group; results are optax updates.
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_update_cpu(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch(frame, "lanton_step_update_cpu", TRAIT_COMMAND_BUFFER_COMPATIBLE, |c| run_cpu_step(c, false))
}

/// XLA FFI handler (CPU): one LANTON step for one group; parameters are updated in place.
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_inplace_cpu(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch(frame, "lanton_step_inplace_cpu", TRAIT_COMMAND_BUFFER_COMPATIBLE, |c| run_cpu_step(c, true))
}

/// XLA FFI handler (CUDA): one LANTON step for one group on XLA's stream; optax updates.
/// Registered for the initialize stage too, where it compiles the kernels (`prepare_device`).
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_update_cuda(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch_staged(frame, "lanton_step_update_cuda", TRAIT_COMMAND_BUFFER_COMPATIBLE, cuda::prepare_device, |c| {
        run_cuda_step(c, false)
    })
}

/// XLA FFI handler (CUDA): one LANTON step for one group; parameters updated in place.
///
/// # Safety
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn lanton_step_inplace_cuda(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    dispatch_staged(frame, "lanton_step_inplace_cuda", TRAIT_COMMAND_BUFFER_COMPATIBLE, cuda::prepare_device, |c| {
        run_cuda_step(c, true)
    })
}
