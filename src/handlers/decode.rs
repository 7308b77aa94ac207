//! The XLA call's decoding, once for every target: the step options from the attributes (through
//! `step::options`, the decoder the C ABI shares) and every buffer checked for dtype and shape,
//! registered for the aliasing proof, into a backend-neutral `StepLayout`.
//!
//! Call layout (shared with jax_bindings/lanton/_ffi.py):
//!   args: hyper f32[5] (lr, beta1, beta2, weight_decay, scale), step i32[] (t, 1-based),
//!         then per leaf: param (L,R,C), grad (L,R,C), momentum (L,R,C), prev_grad (L,R,C),
//!         noise f32[L], valid f32[L], prev_step i32[L], skipped i32[L] (steps skipped for a
//!         non-finite gradient, counted by the kernels); then optionally phases i32[layers of the
//!         group] (every layer's noise phase in leaf order, `step::noise_phases`; absent: the
//!         phases of the `noise_schedule` attribute, which the CPU targets compute and the CUDA
//!         targets require as data unless synchronous)
//!   rets per leaf: update or new param (L,R,C), momentum, prev_grad, noise, valid, prev_step,
//!         ratio f32[L], skipped; then, for the CUDA targets only, scratch u8[bytes] (bytes from
//!         `lanton_cuda_scratch_bytes`, src/capi.rs: the handler allocates nothing)
//!   attrs: the step options of `step::options::CONFIG_KEYS` (kind required, the others default
//!         to `StepConfig::new`'s), rows_are_input (one per leaf), leaf_names ("\n"-joined, optional),
//!         layer_dims (optional, (L, R, C) per leaf: then param/grad/momentum/prev_grad may have
//!         any shape of L*R*C elements in that order, and the per-layer buffers any shape of L)

use crate::ffi::api::dtype;
use crate::ffi::buffers::float_dtype_ok;
use crate::ffi::frame::element_count;
use crate::ffi::{BufferRef, BufferSet, CallFrame, FfiError, FfiResult};
use crate::step::layout::{LeafBuffers, Pair, StepLayout};
use crate::step::options::{self, Options};
use crate::step::{self, LayerShape, StepConfig, HYPER_LEN};

pub const ARGS_PER_LEAF: usize = 8;
pub const RETS_PER_LEAF: usize = 8;
pub const GROUP_ARGS: usize = 2;
const ARG_NAMES: [&str; ARGS_PER_LEAF] = ["param", "grad", "momentum", "prev_grad", "noise", "valid", "prev_step", "skipped"];
const RET_NAMES: [&str; RETS_PER_LEAF] = ["out", "momentum", "prev_grad", "noise", "valid", "prev_step", "ratio", "skipped"];

/// The call's attributes as the step's options (`step::options`, one decoder with the C ABI's
/// JSON front end): a wrong type is refused by the call frame's readers, naming the attribute.
struct Attributes<'c, 'a>(&'c CallFrame<'a>);

impl Options for Attributes<'_, '_> {
    fn text(&self, name: &str) -> Result<Option<String>, String> {
        self.0.attr_opt(name, CallFrame::attr_str).map_err(|e| e.message)
    }
    fn number(&self, name: &str) -> Result<Option<f64>, String> {
        self.0.attr_opt(name, CallFrame::attr_f32).map(|x| x.map(f64::from)).map_err(|e| e.message)
    }
    fn integer(&self, name: &str) -> Result<Option<i64>, String> {
        self.0.attr_opt(name, CallFrame::attr_i64).map_err(|e| e.message)
    }
    fn flag(&self, name: &str) -> Result<Option<bool>, String> {
        self.0.attr_opt(name, CallFrame::attr_bool).map_err(|e| e.message)
    }
    fn numbers(&self, name: &str) -> Result<Option<Vec<f64>>, String> {
        self.0.attr_opt(name, CallFrame::attr_f32_array).map(|v| v.map(|v| v.into_iter().map(f64::from).collect())).map_err(|e| e.message)
    }
}

/// Reads the structural attributes into a validated config (absent ones take the defaults).
pub fn decode_config(call: &CallFrame) -> FfiResult<StepConfig> {
    // Removed in ABI 7 (the shim's exchange divides the work since ABI 6): a caller that still
    // sends it would get every update on every device, so it is refused, not ignored.
    if call.attr("owned_layers")?.is_some() {
        return Err(FfiError::invalid(
            "attribute 'owned_layers' is no longer supported (C ABI 7): divide the work with lanton._mesh's exchange",
        ));
    }
    options::decode(&Attributes(call))
        .map_err(|m| FfiError::invalid(if m.starts_with('\'') { format!("attribute {m}") } else { m }))
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

/// Decodes and validates a step call; `in_place` selects the fused variant's output meaning.
/// The CUDA targets need the layout only; the CPU targets take host views through `set`.
pub fn decode_layout<'a>(call: &CallFrame<'a>, in_place: bool) -> FfiResult<StepLayout<'a>> {
    decode_call(call, in_place).map(|(layout, _)| layout)
}

/// `decode_layout` with the sealed aliasing proof over its buffers (`BufferSet`), from which
/// the host views are made.
#[allow(clippy::needless_range_loop)] // i indexes args, rets and attributes alike
pub fn decode_call<'a>(call: &CallFrame<'a>, in_place: bool) -> FfiResult<(StepLayout<'a>, BufferSet)> {
    let config = decode_config(call)?;
    let nargs = call.num_args();
    // 2 + 8n arguments, or 2 + 8n + 1 with the phases last.
    if nargs < GROUP_ARGS || (nargs - GROUP_ARGS) % ARGS_PER_LEAF > 1 {
        return Err(FfiError::invalid(format!(
            "expected 2 + {ARGS_PER_LEAF} x (number of leaves) arguments, and optionally the phases, got {nargs}"
        )));
    }
    let n_leaves = (nargs - GROUP_ARGS) / ARGS_PER_LEAF;
    let has_phases = (nargs - GROUP_ARGS) % ARGS_PER_LEAF == 1;
    // 8 results per leaf, then optionally one scratch result (8n + 1 is never a multiple of 8).
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
        let fits = match (usize::try_from(dims3[1]), usize::try_from(dims3[2])) {
            (Ok(r), Ok(c)) => step::checked_elements(0, r, c).is_some(),
            _ => false,
        };
        if !fits {
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
        for k in 4..8 {
            let b = a(k)?;
            expect_dtype(&b, if k >= 6 { dtype::S32 } else { dtype::F32 }, &what(k, false))?;
            expect_per_layer(&b, layers, layer_dims.is_some(), &what(k, false))?;
        }
        // Results mirror their inputs; `out` has the parameter's dtype and shape.
        let ret_src = [(0usize, 0usize), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (7, 7)];
        for (k, src) in ret_src {
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
            Ok(Pair { arg: arg.raw(&what(ak, false))?, ret: ret.raw(&what(rk, true))?, aliased })
        };
        let state = [
            link(2, 1, &mut set)?,
            link(3, 2, &mut set)?,
            link(4, 3, &mut set)?,
            link(5, 4, &mut set)?,
            link(6, 5, &mut set)?,
            link(7, 7, &mut set)?,
        ];
        let param_io = if in_place {
            link(0, 0, &mut set)?
        } else {
            set.claim(&param, false, what(0, false));
            let out = r(0)?;
            set.claim(&out, true, what(0, true));
            Pair { arg: param.raw(&what(0, false))?, ret: out.raw(&what(0, true))?, aliased: false }
        };
        set.claim(&ratio, true, what(6, true));
        let shape = LayerShape {
            layers: layers as usize,
            rows: dims3[1] as usize,
            cols: dims3[2] as usize,
            rows_are_input: rows_are_input[i] != 0,
        };
        let (grad, ratio) = (grad.raw(&what(1, false))?, ratio.raw(&what(6, true))?);
        leaves.push(LeafBuffers { name, shape, grad, state, param: param_io, ratio });
    }
    let phases = if has_phases {
        let b = call.arg(nargs - 1)?;
        let layers: usize = leaves.iter().map(|l| l.shape.layers).sum();
        expect_dtype(&b, dtype::S32, "argument 'phases'")?;
        expect_dims(&b, &[layers as i64], "argument 'phases' (one per layer of the group)")?;
        set.claim(&b, false, "phases");
        Some(b.raw("argument 'phases'")?)
    } else {
        None
    };
    set.seal()?;
    let (hyper, step) = (hyper_b.raw("argument 'hyper'")?, step_b.raw("argument 'step'")?);
    let scratch = scratch.map(|b| b.raw("result 'scratch'")).transpose()?;
    Ok((StepLayout { config, in_place, hyper, step, leaves, phases, scratch }, set))
}
