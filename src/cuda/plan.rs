//! The scratch plan of one group step: which hidden layers share a batched product (shape
//! classes), where each sub-buffer sits in the call's scratch result, and every kernel argument,
//! computed on the host from the layout and the scratch address. Pure: tests build it without
//! a GPU, and `lanton_cuda_scratch_bytes` sizes the scratch from the same function.

use super::args::{chunks_per_layer, GroupArgs, LeafArgs, ACC_N};
use super::device::{CUDA_R_16BF, CUDA_R_32F};
use super::kernels::Kernel;
use super::CudaError;
use crate::step::layout::StepLayout;
use crate::step::{self, Kind, LayerShape, RatioStat};
use crate::tensor::Dtype;
use std::ffi::c_void;

const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Alignment of every carved sub-buffer (and of cuBLAS's workspace).
const ALIGN: usize = 256;

/// Chooses the noise estimate's product kernel: `LANTON_NOISE_GEMM=tf32` asks for the tensor-core
/// kernel (lanton_noise_gemm_tc), used where the device has TF32 mma (compute capability >= 8.0);
/// unset or `simt`, the CUDA-core kernel. Opt-in until it has run on a GPU: the first GPU run
/// (H200, 2026-12-04) measured the SIMT kernel at ~18 TFLOP/s, the whole of the noise step's cost.
pub fn noise_gemm_kernel(choice: Option<&str>, tensor_cores: bool) -> Result<Kernel, String> {
    match choice {
        None | Some("") | Some("simt") => Ok(Kernel::NoiseGemm),
        Some("tf32") => Ok(if tensor_cores { Kernel::NoiseGemmTc } else { Kernel::NoiseGemm }),
        Some(other) => Err(format!("LANTON_NOISE_GEMM={other:?}: expected \"simt\" (the default) or \"tf32\"")),
    }
}

/// CUDA-only options of a call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CudaOptions {
    /// Enqueue the hidden group's noise work (polar iterations; default true). Its launches
    /// read the step count on the device and return at once on steps that do not refresh the
    /// tracker, so every step enqueues the same work and nothing waits for the host. false
    /// leaves it out entirely (no tracker refresh): for direct FFI users that keep the cadence
    /// on the host (the Python shim never sets it).
    pub noise_work: bool,
    /// Newton-Schulz operands in f32 instead of bf16 (f32 accumulation either way).
    pub ns_f32: bool,
}

/// Same-shape hidden layers of the group, batched through one strided GEMM per product.
#[derive(Debug, PartialEq, Eq)]
pub struct ShapeClass {
    pub rows: usize,
    pub cols: usize,
    /// Offset (elements) of the class's first matrix in the Newton-Schulz buffers.
    pub base: usize,
    /// Index of the class's first matrix among all classes' (the noise products' `due` flags).
    pub first: usize,
    pub batch: usize,
}

impl ShapeClass {
    pub(super) fn small(&self) -> usize {
        self.rows.min(self.cols)
    }
}

/// Byte offsets of the sub-buffers of one scratch allocation.
#[derive(Default)]
struct Carve {
    len: usize,
}

impl Carve {
    fn take(&mut self, bytes: usize) -> usize {
        let at = self.len;
        self.len += bytes.div_ceil(ALIGN) * ALIGN;
        at
    }
}

/// Bytes from `addr` up to the next multiple of ALIGN.
fn align_pad(addr: usize) -> usize {
    addr.wrapping_neg() % ALIGN
}

/// The Newton-Schulz operands' dtype: (kernels' code, cuBLAS's type, bytes per element).
pub(super) fn ns_dtype_size(f32_ops: bool) -> (i32, i32, usize) {
    let (dt, cuda) = if f32_ops { (Dtype::F32, CUDA_R_32F) } else { (Dtype::BF16, CUDA_R_16BF) };
    (dt.code(), cuda, dt.size())
}

/// Byte offsets of the scratch sub-buffers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Offsets {
    pub acc: usize,
    /// The per-(layer, chunk) partial sums that lanton_sum_chunks adds in a fixed order into `acc`.
    pub partials: usize,
    pub reference: usize,
    pub h: usize,
    pub valid: usize,
    /// Per noise matrix, whether its estimate runs this step (i32 flags lanton_prepare sets).
    pub due: usize,
    /// Bytes from the start that are zeroed before the step (the accumulators above).
    pub zeroed: usize,
    pub workspace: usize,
    pub workspace_len: usize,
    pub x: usize,
    pub y: usize,
    pub a: usize,
    pub b: usize,
    pub n0: usize,
    pub n1: usize,
    pub n2: usize,
    pub na: usize,
    pub nb: usize,
}

/// Everything one call enqueues, computed on the host from the decoded layout and the
/// scratch base address (pure: tests build it from fake frames without a GPU).
pub struct Plan {
    /// Every hidden layer by shape (the direction's and the noise estimate's products).
    pub classes: Vec<ShapeClass>,
    pub offsets: Offsets,
    /// Scratch bytes the step needs (`scratch_layout`'s size).
    pub len: usize,
    pub leaves: Vec<LeafArgs>,
    pub group: GroupArgs,
    pub group_layers: usize,
    pub noise_polar: bool,
    pub hidden: bool,
    pub ns_f32: bool,
    /// The noise products' kernel (NoiseGemm unless `noise_gemm_kernel` picks the TF32 one).
    pub noise_gemm: Kernel,
    /// The scratch base address the pointers above were computed for.
    pub scratch: usize,
}

/// The scratch of one call: the hidden group's shape classes, where each leaf's layers sit in
/// them, the byte offsets of the sub-buffers from the scratch base, and the total size.
pub struct ScratchLayout {
    pub classes: Vec<ShapeClass>,
    /// Per leaf: (class index, first matrix of the leaf within the class); (0, 0) unless hidden.
    pub class_of: Vec<(usize, usize)>,
    pub offsets: Offsets,
    /// Bytes the scratch must hold (the same for every base).
    pub len: usize,
    /// The hidden group's noise work runs polar iterations (their buffers are carved).
    pub noise_polar: bool,
    /// Partial-sum slots per layer: the most chunks any layer of the group is reduced in.
    pub chunk_stride: usize,
}

/// Lays out the scratch of one group step. The one definition of its size: `Plan::new` uses it
/// for the handler and `lanton_cuda_scratch_bytes` (src/capi.rs) for the Python shim, which
/// sizes the call's scratch result from it. It depends only on the group kind, whether the
/// noise work's polar iterations run, the Newton-Schulz operand dtype and the leaves'
/// (layers, rows, cols); `base` (the scratch address) only moves the cuBLAS workspace inside
/// its slack region. Callers bound the sizes (decoded buffers, or the C function's checks).
pub fn scratch_layout(kind: Kind, noise_adaptive: bool, opts: CudaOptions, shapes: &[LayerShape], base: usize) -> ScratchLayout {
    let hidden = kind == Kind::Hidden;
    let noise_polar = hidden && noise_adaptive && opts.noise_work;
    let group_layers: usize = shapes.iter().map(|sh| sh.layers).sum();
    // Same-shape hidden layers share one batched GEMM per product.
    let mut classes: Vec<ShapeClass> = Vec::new();
    let mut class_of = Vec::with_capacity(shapes.len());
    for sh in shapes {
        if !hidden {
            class_of.push((0, 0));
            continue;
        }
        let idx = classes.iter().position(|c| c.rows == sh.rows && c.cols == sh.cols).unwrap_or_else(|| {
            classes.push(ShapeClass { rows: sh.rows, cols: sh.cols, base: 0, first: 0, batch: 0 });
            classes.len() - 1
        });
        class_of.push((idx, classes[idx].batch));
        classes[idx].batch += sh.layers;
    }
    // Layer sizes first: a class of zero-size layers may have a huge row or column count.
    let (mut elems, mut gram_max, mut matrices) = (0usize, 0usize, 0usize);
    for c in classes.iter_mut() {
        c.base = elems;
        c.first = matrices;
        matrices += c.batch;
        elems += c.batch * (c.rows * c.cols);
        gram_max = gram_max.max(c.batch * (c.small() * c.small()));
    }
    let (_, _, ns_size) = ns_dtype_size(opts.ns_f32);
    let (noise_elems, noise_gram) = if noise_polar { (elems, gram_max) } else { (0, 0) };
    let mut carve = Carve::default();
    let chunk_stride = shapes.iter().map(|sh| chunks_per_layer(sh.layer_len())).max().unwrap_or(1);
    let mut o = Offsets {
        acc: carve.take(group_layers * ACC_N * 8),
        partials: carve.take(group_layers * chunk_stride * ACC_N * 8),
        reference: carve.take(16),
        h: carve.take(group_layers * 4),
        valid: carve.take(group_layers * 4),
        due: carve.take(matrices * 4),
        ..Offsets::default()
    };
    o.zeroed = carve.len;
    o.workspace_len = if hidden { CUBLAS_WORKSPACE } else { 0 };
    // cuBLAS wants a 256-byte aligned workspace, but XLA's buffers are only promised 16-byte
    // alignment: the region carries ALIGN bytes of slack (so `len` does not depend on the
    // base) and the workspace starts at the first aligned address inside it.
    let region = carve.take(if hidden { o.workspace_len + ALIGN } else { 0 });
    o.workspace = if hidden { region + align_pad(base + region) } else { region };
    o.x = carve.take(elems * ns_size);
    o.y = carve.take(elems * ns_size);
    o.a = carve.take(gram_max * ns_size);
    o.b = carve.take(gram_max * ns_size);
    o.n0 = carve.take(noise_elems * 4);
    o.n1 = carve.take(noise_elems * 4);
    o.n2 = carve.take(noise_elems * 4);
    o.na = carve.take(noise_gram * 4);
    o.nb = carve.take(noise_gram * 4);
    ScratchLayout { classes, class_of, offsets: o, len: carve.len, noise_polar, chunk_stride }
}

impl Plan {
    pub fn new(layout: &StepLayout, opts: CudaOptions, scratch: usize) -> Result<Plan, String> {
        let cfg = &layout.config;
        let hidden = cfg.kind == Kind::Hidden;
        let shapes: Vec<LayerShape> = layout.leaves.iter().map(|l| l.shape).collect();
        let group_layers: usize = shapes.iter().map(|sh| sh.layers).sum();
        let ScratchLayout { classes, class_of, offsets: o, len, noise_polar, chunk_stride } =
            scratch_layout(cfg.kind, cfg.noise_adaptive, opts, &shapes, scratch);
        let (dt_ns, _, ns_size) = ns_dtype_size(opts.ns_f32);
        let at = |off: usize| (scratch + off) as *mut c_void;

        let group = GroupArgs {
            hyper: layout.hyper.data as *const f32,
            step: layout.step.data as *const i32,
            acc: at(o.acc) as *mut f64,
            group_h: at(o.h) as *mut f32,
            group_valid: at(o.valid) as *mut f32,
            reference: at(o.reference) as *mut f64,
            partials: at(o.partials) as *mut f64,
            phases: layout.phases.as_ref().map_or(std::ptr::null(), |p| p.data as *const i32),
            due: at(o.due) as *mut i32,
            kind: match cfg.kind { Kind::Hidden => 0, Kind::Embed => 1, Kind::Vector => 2, Kind::Adam => 3 },
            noise_every: cfg.noise_every as i32,
            noise_adaptive: cfg.noise_adaptive as i32,
            nesterov: cfg.nesterov as i32,
            ratio_stat: match cfg.ratio_stat { RatioStat::Max => 0, RatioStat::Mean => 1, RatioStat::Min => 2, RatioStat::Median => 3 },
            // Only the hidden kind's noise work is expensive enough to be skipped.
            noise_work: (opts.noise_work || !hidden) as i32,
            ratio_eps: cfg.ratio_eps,
            vector_eps: cfg.vector_eps,
            ratio_power: cfg.ratio_power,
            ratio_floor: cfg.ratio_floor,
            ratio_cap: cfg.ratio_cap,
            chunk_stride: chunk_stride as i32,
            adam_eps: cfg.adam_eps,
            adam_eps_root: cfg.adam_eps_root,
        };
        let mut leaves = Vec::with_capacity(layout.leaves.len());
        let mut group_layer = 0usize;
        for (leaf, &(ci, within)) in layout.leaves.iter().zip(&class_of) {
            let sh = leaf.shape;
            let ns_elem = if hidden { classes[ci].base + within * sh.layer_len() } else { 0 };
            // In place, the kernel reads and writes the result buffer (the input is copied into
            // it first unless donated).
            let param = if layout.in_place { leaf.param.ret.data } else { leaf.param.arg.data };
            leaves.push(LeafArgs {
                param: param as *const c_void,
                out: leaf.param.ret.data,
                grad: leaf.grad.data,
                momentum: leaf.state[0].ret.data,
                prev_grad: leaf.state[1].ret.data,
                noise: leaf.state[2].ret.data as *mut f32,
                valid: leaf.state[3].ret.data as *mut f32,
                prev_step: leaf.state[4].ret.data as *mut i32,
                skipped: leaf.state[5].ret.data as *mut i32,
                ratio: leaf.ratio.data as *mut f32,
                ns_in: if hidden { at(o.x + ns_elem * ns_size) } else { std::ptr::null_mut() },
                noise_in: if noise_polar { at(o.n0 + ns_elem * 4) as *mut f32 } else { std::ptr::null_mut() },
                ns_out: std::ptr::null(), // the Newton-Schulz result buffer is known after enqueueing it
                noise_out: std::ptr::null(),
                layer_len: sh.layer_len() as i64,
                noise_slot: if noise_polar { (classes[ci].first + within) as i32 } else { -1 },
                layers: sh.layers as i32,
                group_layer: group_layer as i32,
                dt_param: leaf.param.ret.dtype.code(),
                dt_grad: leaf.grad.dtype.code(),
                dt_mom: leaf.state[0].ret.dtype.code(),
                dt_prev: leaf.state[1].ret.dtype.code(),
                dt_ns,
                in_place: layout.in_place as i32,
                shape_scale: step::update_scale(cfg.kind, 1.0, &sh),
                dual_factor: step::dual_norm_factor(cfg.kind, &sh),
            });
            group_layer += sh.layers;
        }
        Ok(Plan {
            classes, offsets: o, len, leaves, group, group_layers, noise_polar, hidden,
            ns_f32: opts.ns_f32, noise_gemm: Kernel::NoiseGemm, scratch,
        })
    }
}

/// Minimum alignment of the scratch result (XLA's promise for its buffers; the f64
/// accumulators and the 256-byte carving need no more).
pub const SCRATCH_ALIGN: usize = 16;

/// The plan laid out in the call's scratch: the trailing uint8 result the Python shim sizes
/// with `lanton_cuda_scratch_bytes`. Refused, naming the group, when that result is missing,
/// smaller than the plan or misaligned. Nothing is allocated: a CUDA graph that records the
/// call keeps addresses XLA owns for the whole execution (the result is part of its buffer
/// assignment), never memory handed back to a pool.
pub fn plan_in_scratch(layout: &StepLayout, opts: CudaOptions) -> Result<Plan, CudaError> {
    let Some(scratch) = layout.scratch else {
        return Err(CudaError::Invalid(format!(
            "{}: the CUDA targets need a trailing uint8 scratch result (sized by lanton_cuda_scratch_bytes), \
             but the call has only the results of its {} leaves; the Python shim does not match this library",
            layout.describe(),
            layout.leaves.len()
        )));
    };
    let plan = Plan::new(layout, opts, scratch.data as usize).map_err(CudaError::Invalid)?;
    let have = scratch.len;
    if have < plan.len {
        return Err(CudaError::Invalid(format!(
            "{}: the scratch result holds {have} bytes, but the step needs {} (lanton_cuda_scratch_bytes sizes it \
             from the same plan; the Python shim and the library disagree)",
            layout.describe(),
            plan.len
        )));
    }
    if scratch.data as usize % SCRATCH_ALIGN != 0 {
        return Err(CudaError::Invalid(format!(
            "{}: the scratch result at {:p} is not {SCRATCH_ALIGN}-byte aligned",
            layout.describe(),
            scratch.data
        )));
    }
    Ok(plan)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_pad_reaches_the_next_256_byte_boundary() {
        for addr in [0usize, 16, 240, 256, 272, 0x7000_0010, usize::MAX - 255] {
            let pad = align_pad(addr);
            assert!(pad < ALIGN);
            assert_eq!(addr.wrapping_add(pad) % ALIGN, 0, "{addr:#x}");
        }
        assert_eq!((align_pad(0), align_pad(16), align_pad(255), align_pad(512)), (0, 240, 1, 0));
    }
}
