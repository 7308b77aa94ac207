//! The LANTON group step on the GPU: scratch layout, kernel launches and the batched
//! Newton-Schulz products, all enqueued on XLA's stream (no host synchronization: the step
//! count and hyperparameters stay on the device and the kernels apply `crate::step`'s rules).
//! Every step enqueues the same work: the noise estimate's launches (lanton_noise_gemm) read the
//! step count themselves and return at once unless it refreshes the tracker.

use super::device::{self, Gemm, Grid, Session, CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_32F};
use crate::ffi::api::dtype;
use crate::ffi::{CallFrame, FfiError, FfiResult};
use crate::step::layout::StepLayout;
use crate::step::{self, Kind, LayerShape, RatioStat};
use cudarc::driver::sys as cu;
use std::ffi::c_void;

const BLOCK: u32 = 256;
const ACC_N: usize = 4;
const CUBLAS_WORKSPACE: usize = 32 << 20;
const ALIGN: usize = 256;

// Kernel indices in device::KERNEL_NAMES.
const K_STATS: usize = 0;
const K_PREPARE: usize = 1;
const K_DOT: usize = 2;
const K_TRACK: usize = 3;
const K_REFERENCE: usize = 4;
const K_AFFINE_DIAG: usize = 5;
const K_APPLY: usize = 6;
const K_NOISE_GEMM: usize = 7;
const K_NOISE_GEMM_TC: usize = 8;

/// Chooses the noise estimate's product kernel: `LANTON_NOISE_GEMM=tf32` asks for the tensor-core
/// kernel (lanton_noise_gemm_tc), used where the device has TF32 mma (compute capability >= 8.0);
/// unset or `simt`, the CUDA-core kernel. Opt-in until it has run on a GPU: the first GPU run
/// (H200, 2026-12-04) measured the SIMT kernel at ~18 TFLOP/s, the whole of the noise step's cost.
pub fn noise_gemm_kernel(choice: Option<&str>, tensor_cores: bool) -> Result<usize, String> {
    match choice {
        None | Some("") | Some("simt") => Ok(K_NOISE_GEMM),
        Some("tf32") => Ok(if tensor_cores { K_NOISE_GEMM_TC } else { K_NOISE_GEMM }),
        Some(other) => Err(format!("LANTON_NOISE_GEMM={other:?}: expected \"simt\" (the default) or \"tf32\"")),
    }
}

/// Grid rows of one launch (CUDA's limit on gridDim.y): lanton_noise_gemm's batch.
const MAX_GRID_Y: usize = 65_535;
/// C tile of lanton_noise_gemm (GEMM_TILE in kernels.cu).
const GEMM_TILE: usize = 64;

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

/// Mirrors `struct LeafArgs` in kernels.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LeafArgs {
    pub param: *const c_void,
    pub out: *mut c_void,
    pub grad: *const c_void,
    pub momentum: *mut c_void,
    pub prev_grad: *mut c_void,
    pub noise: *mut f32,
    pub valid: *mut f32,
    pub prev_step: *mut i32,
    pub ratio: *mut f32,
    pub ns_in: *mut c_void,
    pub noise_in: *mut f32,
    pub ns_out: *const c_void,
    pub noise_out: *const f32,
    pub layer_len: i64,
    pub layers: i32,
    pub group_layer: i32,
    pub dt_param: i32,
    pub dt_grad: i32,
    pub dt_mom: i32,
    pub dt_prev: i32,
    pub dt_ns: i32,
    pub in_place: i32,
    pub shape_scale: f32,
    pub dual_factor: f32,
}
const _: () = assert!(std::mem::size_of::<LeafArgs>() == 152);

/// Leaves per multi-tensor launch (kernel parameters stay under 4 KB).
pub const MAX_LEAVES: usize = 24;

/// Mirrors `struct LeafBatch` in kernels.cu: up to MAX_LEAVES leaves in one launch.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LeafBatch {
    pub leaf: [LeafArgs; MAX_LEAVES],
    pub first_block: [i32; MAX_LEAVES + 1],
    pub chunks: [i32; MAX_LEAVES],
    pub count: i32,
}
const _: () = assert!(std::mem::size_of::<LeafBatch>() == 3848);

/// Mirrors `struct GroupArgs` in kernels.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GroupArgs {
    pub hyper: *const f32,
    pub step: *const i32,
    pub acc: *mut f64,
    pub group_h: *mut f32,
    pub group_valid: *mut f32,
    pub reference: *mut f64,
    pub kind: i32,
    pub noise_every: i32,
    pub noise_adaptive: i32,
    pub nesterov: i32,
    pub ratio_stat: i32,
    pub noise_work: i32,
    pub ratio_eps: f32,
    pub vector_eps: f32,
    pub ratio_power: f32,
    pub ratio_floor: f32,
}
const _: () = assert!(std::mem::size_of::<GroupArgs>() == 88);

/// Mirrors `struct GemmArgs` in kernels.cu: one f32 product of lanton_noise_gemm.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    pub a: *const f32,
    pub b: *const f32,
    pub c: *mut f32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    pub trans_a: i32,
    pub trans_b: i32,
    pub alpha: f32,
    pub beta: f32,
}
const _: () = assert!(std::mem::size_of::<GemmArgs>() == 88);

impl GemmArgs {
    /// The kernel's launches for an f32 product: grid x = 64 x 64 tiles of C, y = matrices of
    /// the batch, in slices of at most MAX_GRID_Y matrices.
    pub fn launches(g: &Gemm) -> Result<Vec<(GemmArgs, Grid)>, String> {
        if g.dtype != CUDA_R_32F {
            return Err("lanton_noise_gemm multiplies f32 operands only".into());
        }
        // The kernel's row and column indices are 32-bit: leave them a tile of headroom.
        let limit = i32::MAX - GEMM_TILE as i32;
        if g.m > limit || g.n > limit {
            return Err(format!("a noise product of {} x {} exceeds lanton_noise_gemm's 32-bit indices", g.m, g.n));
        }
        let tiles = (g.m.max(0) as usize).div_ceil(GEMM_TILE) * (g.n.max(0) as usize).div_ceil(GEMM_TILE);
        if tiles > i32::MAX as usize {
            return Err(format!("a noise product of {tiles} tiles exceeds one launch's grid"));
        }
        if tiles == 0 {
            return Ok(Vec::new()); // an empty C: nothing to launch (as cuBLAS would do nothing)
        }
        let batch = g.batch.max(0) as usize;
        let skip = |p: *const c_void, stride: i64, first: usize| (p as usize + first * stride as usize * 4) as *mut f32;
        Ok((0..batch)
            .step_by(MAX_GRID_Y)
            .map(|first| {
                let args = GemmArgs {
                    a: skip(g.a, g.stride_a, first), b: skip(g.b, g.stride_b, first), c: skip(g.c, g.stride_c, first),
                    stride_a: g.stride_a, stride_b: g.stride_b, stride_c: g.stride_c, m: g.m, n: g.n, k: g.k, lda: g.lda,
                    ldb: g.ldb, ldc: g.ldc, trans_a: g.trans_a as i32, trans_b: g.trans_b as i32, alpha: g.alpha,
                    beta: g.beta,
                };
                (args, Grid { x: tiles as u32, y: (batch - first).min(MAX_GRID_Y) as u32, block: BLOCK })
            })
            .collect())
    }
}

/// Who multiplies in a Newton-Schulz run.
#[derive(Clone, Copy)]
enum Products {
    /// cuBLAS: the direction, needed on every step.
    Cublas,
    /// lanton_noise_gemm or lanton_noise_gemm_tc (the kernel index), and a gated
    /// lanton_affine_diag, under the group's cadence: the noise estimate, whose launches do
    /// nothing unless the device step count refreshes the tracker.
    Gated(GroupArgs, usize),
}

impl Products {
    fn multiply<Q: Queue>(self, s: &Q, g: &Gemm) -> Result<(), String> {
        match self {
            Products::Cublas => s.gemm(g),
            Products::Gated(mut group, kernel) => {
                for (mut args, grid) in GemmArgs::launches(g)? {
                    // SAFETY: GemmArgs/GroupArgs mirror the kernel's structs (sizes asserted on
                    // both sides); the operands are the plan's scratch ranges, sized for the batch.
                    unsafe {
                        s.launch(kernel, grid, &mut [
                            &mut args as *mut GemmArgs as *mut c_void, &mut group as *mut GroupArgs as *mut c_void,
                        ])?
                    };
                }
                Ok(())
            }
        }
    }

    /// lanton_affine_diag's gate: (step count, every) or (null, 0) for "always".
    fn gate(self) -> (*const i32, i32) {
        match self {
            Products::Cublas => (std::ptr::null(), 0),
            Products::Gated(group, _) => (group.step, group.noise_every),
        }
    }
}

/// Same-shape hidden layers of the group, batched through one strided GEMM per product.
#[derive(Debug, PartialEq, Eq)]
pub struct ShapeClass {
    pub rows: usize,
    pub cols: usize,
    /// Offset (elements) of the class's first matrix in the Newton-Schulz buffers.
    pub base: usize,
    pub batch: usize,
}

impl ShapeClass {
    fn small(&self) -> usize {
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

fn ns_dtype_size(f32_ops: bool) -> (i32, i32, usize) {
    if f32_ops { (dtype::F32, CUDA_R_32F, 4) } else { (dtype::BF16, CUDA_R_16BF, 2) }
}

/// One operand of a column-major strided-batched product: pointer, leading dimension, batch stride.
type Operand = (*mut c_void, i32, i64);

/// C = alpha * op(A) op(B) + beta * C over `batch` matrices, f32 accumulation.
#[allow(clippy::too_many_arguments)]
fn batched(
    (trans_a, trans_b): (bool, bool), (m, n, k): (i32, i32, i32), alpha: f32, (a, lda, stride_a): Operand,
    (b, ldb, stride_b): Operand, beta: f32, (c, ldc, stride_c): Operand, batch: i32, dtype: i32,
) -> Gemm {
    Gemm { trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch, dtype,
           compute: CUBLAS_COMPUTE_32F }
}

/// Newton-Schulz on every class: X holds the normalized inputs, Y is the other ping-pong
/// buffer; returns which holds the result. A and Bm are one class's Gram and polynomial.
#[allow(clippy::too_many_arguments)]
fn newton_schulz<Q: Queue>(
    s: &Q, classes: &[ShapeClass], x: *mut c_void, y: *mut c_void, a: *mut c_void, bm: *mut c_void,
    f32_ops: bool, coeffs: &[[f32; 3]], products: Products,
) -> Result<*mut c_void, String> {
    let (gate_step, gate_every) = products.gate();
    let (dt, cuda_dt, size) = ns_dtype_size(f32_ops);
    let at = |p: *mut c_void, elems: usize| (p as usize + elems * size) as *mut c_void;
    // A class of zero-size matrices has nothing to multiply (and would hand cuBLAS ld = 0).
    for c in classes.iter().filter(|c| c.batch > 0 && c.rows > 0 && c.cols > 0) {
        let (r, cl, sm) = (c.rows as i32, c.cols as i32, c.small() as i32);
        let (mat, gram) = ((c.rows * c.cols) as i64, (c.small() * c.small()) as i64);
        let (mut src, mut dst) = (at(x, c.base), at(y, c.base));
        let batch = c.batch as i32;
        for &[ca, cb, cc] in coeffs {
            // Row-major R x C is column-major P = X^T (C x R, ld C). Rows <= cols: A = P^T P;
            // else A = P P^T (the transposed problem), with no data transposition.
            let (xs, xd) = ((src, cl, mat), (dst, cl, mat));
            let (am, bp) = ((a, sm, gram), (bm, sm, gram));
            products.multiply(s, &if c.rows <= c.cols {
                batched((true, false), (r, r, cl), 1.0, xs, xs, 0.0, am, batch, cuda_dt)
            } else {
                batched((false, true), (cl, cl, r), 1.0, xs, xs, 0.0, am, batch, cuda_dt)
            })?;
            // Bm = b*A + a*I, then Bm += c*A*A.
            let total = gram * c.batch as i64;
            let (mut pa, mut pb, mut pdt, mut psm, mut ptot, mut pca, mut pcb) = (a, bm, dt, sm, total, ca, cb);
            let (mut pstep, mut pevery) = (gate_step, gate_every);
            let grid = Grid { x: (total as u64).div_ceil(BLOCK as u64 * 4).clamp(1, 4096) as u32, y: 1, block: BLOCK };
            // SAFETY: A and Bm hold `total` elements of dtype dt.
            unsafe {
                s.launch(K_AFFINE_DIAG, grid, &mut [
                    &mut pa as *mut _ as *mut c_void, &mut pb as *mut _ as *mut c_void, &mut pdt as *mut _ as *mut c_void,
                    &mut psm as *mut _ as *mut c_void, &mut ptot as *mut _ as *mut c_void, &mut pca as *mut _ as *mut c_void,
                    &mut pcb as *mut _ as *mut c_void, &mut pstep as *mut _ as *mut c_void,
                    &mut pevery as *mut _ as *mut c_void,
                ])?;
            }
            products.multiply(s, &batched((false, false), (sm, sm, sm), cc, am, am, 1.0, bp, batch, cuda_dt))?;
            // X' = X Bm (rows <= cols) or Bm X (the transposed problem).
            products.multiply(s, &if c.rows <= c.cols {
                batched((false, false), (cl, r, r), 1.0, xs, bp, 0.0, xd, batch, cuda_dt)
            } else {
                batched((false, false), (cl, r, cl), 1.0, bp, xs, 0.0, xd, batch, cuda_dt)
            })?;
            std::mem::swap(&mut src, &mut dst);
        }
    }
    Ok(if coeffs.len() % 2 == 0 { x } else { y })
}

/// Blocks per layer of a per-layer pass over `layer_len` elements.
fn chunks_per_layer(layer_len: usize) -> usize {
    layer_len.div_ceil(BLOCK as usize * 4).clamp(1, 1024)
}

/// The multi-tensor launches of one per-leaf kernel: leaves in batches of MAX_LEAVES, each
/// block of the grid assigned to (leaf, layer, chunk); `track` runs one thread per layer.
/// Every layer gets at least one block, even an empty one (its ratio is still written).
pub fn batches(leaves: &[LeafArgs], track: bool) -> Result<Vec<(LeafBatch, u32)>, String> {
    let mut out = Vec::new();
    for group in leaves.chunks(MAX_LEAVES) {
        let mut b = LeafBatch { leaf: [group[0]; MAX_LEAVES], first_block: [0; MAX_LEAVES + 1], chunks: [0; MAX_LEAVES], count: group.len() as i32 };
        let mut total: u64 = 0;
        for (i, a) in group.iter().enumerate() {
            let (len, layers) = (a.layer_len as usize, a.layers as usize);
            let (chunks, blocks) = if track {
                let c = layers.div_ceil(BLOCK as usize);
                (c, c)
            } else if len == 0 {
                // One (idle) block per layer of a zero-size leaf: lanton_apply still writes
                // each layer's ratio, and the reductions add nothing.
                (1, layers)
            } else {
                let c = chunks_per_layer(len);
                (c, c * layers)
            };
            b.leaf[i] = *a;
            b.chunks[i] = chunks as i32;
            b.first_block[i] = total as i32;
            total += blocks as u64;
        }
        if total > i32::MAX as u64 {
            return Err(format!("{total} blocks exceed one launch's grid"));
        }
        for k in group.len()..=MAX_LEAVES {
            b.first_block[k] = total as i32;
        }
        out.push((b, total as u32));
    }
    Ok(out)
}

/// Byte offsets of the scratch sub-buffers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Offsets {
    pub acc: usize,
    pub reference: usize,
    pub h: usize,
    pub valid: usize,
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
    /// The noise products' kernel (K_NOISE_GEMM unless `noise_gemm_kernel` picks the TF32 one).
    pub noise_gemm: usize,
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
            classes.push(ShapeClass { rows: sh.rows, cols: sh.cols, base: 0, batch: 0 });
            classes.len() - 1
        });
        class_of.push((idx, classes[idx].batch));
        classes[idx].batch += sh.layers;
    }
    // Layer sizes first: a class of zero-size layers may have a huge row or column count.
    let (mut elems, mut gram_max) = (0usize, 0usize);
    for c in classes.iter_mut() {
        c.base = elems;
        elems += c.batch * (c.rows * c.cols);
        gram_max = gram_max.max(c.batch * (c.small() * c.small()));
    }
    let (_, _, ns_size) = ns_dtype_size(opts.ns_f32);
    let (noise_elems, noise_gram) = if noise_polar { (elems, gram_max) } else { (0, 0) };
    let mut carve = Carve::default();
    let mut o = Offsets {
        acc: carve.take(group_layers * ACC_N * 8),
        reference: carve.take(16),
        h: carve.take(group_layers * 4),
        valid: carve.take(group_layers * 4),
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
    ScratchLayout { classes, class_of, offsets: o, len: carve.len, noise_polar }
}

impl Plan {
    pub fn new(layout: &StepLayout, opts: CudaOptions, scratch: usize) -> Result<Plan, String> {
        let cfg = &layout.config;
        let hidden = cfg.kind == Kind::Hidden;
        let shapes: Vec<LayerShape> = layout.leaves.iter().map(|l| l.shape).collect();
        let group_layers: usize = shapes.iter().map(|sh| sh.layers).sum();
        let ScratchLayout { classes, class_of, offsets: o, len, noise_polar } =
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
            kind: match cfg.kind { Kind::Hidden => 0, Kind::Embed => 1, Kind::Vector => 2 },
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
                ratio: leaf.ratio.data as *mut f32,
                ns_in: if hidden { at(o.x + ns_elem * ns_size) } else { std::ptr::null_mut() },
                noise_in: if noise_polar { at(o.n0 + ns_elem * 4) as *mut f32 } else { std::ptr::null_mut() },
                ns_out: std::ptr::null(), // the Newton-Schulz result buffer is known after enqueueing it
                noise_out: std::ptr::null(),
                layer_len: sh.layer_len() as i64,
                layers: sh.layers as i32,
                group_layer: group_layer as i32,
                dt_param: leaf.param.ret.dtype,
                dt_grad: leaf.grad.dtype,
                dt_mom: leaf.state[0].ret.dtype,
                dt_prev: leaf.state[1].ret.dtype,
                dt_ns,
                in_place: layout.in_place as i32,
                shape_scale: step::update_scale(cfg.kind, 1.0, &sh),
                dual_factor: step::dual_norm_factor(cfg.kind, &sh),
            });
            group_layer += sh.layers;
        }
        Ok(Plan {
            classes, offsets: o, len, leaves, group, group_layers, noise_polar, hidden,
            ns_f32: opts.ns_f32, noise_gemm: K_NOISE_GEMM, scratch,
        })
    }
}

/// XLA's initialize stage (before execution and before any CUDA-graph capture): compiles the
/// kernels and creates the cuBLAS handle for the stream's context, neither of which may happen
/// while a stream is being captured.
pub fn prepare_device(call: &CallFrame) -> FfiResult<()> {
    let stream = call.stream()? as cu::CUstream;
    let internal = |e: String| FfiError::internal(e);
    // SAFETY: XLA's stream (and so its context) lives for the whole call.
    let ctx = unsafe { device::stream_context(stream) }.map_err(internal)?;
    let _current = unsafe { device::ContextGuard::push(ctx) }.map_err(internal)?;
    // SAFETY: ctx owns XLA's stream and was made current above.
    unsafe { device::device(ctx, || Ok(()), internal) }?;
    Ok(())
}

/// Names a group in errors: its kind and its leaves (the first few).
fn describe_group(layout: &StepLayout) -> String {
    let names: Vec<&str> = layout.leaves.iter().take(3).map(|l| l.name.as_str()).collect();
    let more = if layout.leaves.len() > 3 { format!(", ... {} leaves in all", layout.leaves.len()) } else { String::new() };
    format!("the {} group ({}{more})", layout.config.kind, names.join(", "))
}

/// Minimum alignment of the scratch result (XLA's promise for its buffers; the f64
/// accumulators and the 256-byte carving need no more).
pub const SCRATCH_ALIGN: usize = 16;

/// The plan laid out in the call's scratch: the trailing uint8 result the Python shim sizes
/// with `lanton_cuda_scratch_bytes`. Refused, naming the group, when that result is missing,
/// smaller than the plan or misaligned. Nothing is allocated: a CUDA graph that records the
/// call keeps addresses XLA owns for the whole execution (the result is part of its buffer
/// assignment), never memory handed back to a pool.
pub fn plan_in_scratch(layout: &StepLayout, opts: CudaOptions) -> FfiResult<Plan> {
    let Some(scratch) = layout.scratch else {
        return Err(FfiError::invalid(format!(
            "{}: the CUDA targets need a trailing uint8 scratch result (sized by lanton_cuda_scratch_bytes), \
             but the call has only the results of its {} leaves; the Python shim does not match this library",
            describe_group(layout),
            layout.leaves.len()
        )));
    };
    let plan = Plan::new(layout, opts, scratch.data as usize).map_err(FfiError::invalid)?;
    let have = scratch.len();
    if have < plan.len {
        return Err(FfiError::invalid(format!(
            "{}: the scratch result holds {have} bytes, but the step needs {} (lanton_cuda_scratch_bytes sizes it \
             from the same plan; the Python shim and the library disagree)",
            describe_group(layout),
            plan.len
        )));
    }
    if scratch.data as usize % SCRATCH_ALIGN != 0 {
        return Err(FfiError::invalid(format!(
            "{}: the scratch result at {:p} is not {SCRATCH_ALIGN}-byte aligned",
            describe_group(layout),
            scratch.data
        )));
    }
    Ok(plan)
}

/// Enqueues one LANTON group step on XLA's stream, with its scratch in the call's scratch
/// result (checked before the device is touched).
pub fn group_step(call: &CallFrame, layout: &StepLayout, opts: CudaOptions) -> FfiResult<()> {
    let mut plan = plan_in_scratch(layout, opts)?;
    let stream = call.stream()? as cu::CUstream;
    let internal = |e: String| FfiError::internal(e);
    // SAFETY: XLA's stream (and so its context) lives for the whole call.
    let ctx = unsafe { device::stream_context(stream) }.map_err(internal)?;
    let _current = unsafe { device::ContextGuard::push(ctx) }.map_err(internal)?;
    // Normally built at the initialize stage; building it here is only safe outside capture.
    let not_capturing = || {
        // SAFETY: XLA's stream lives for the whole call.
        let status = unsafe { super::sys::stream_capture_status(stream) }.map_err(internal)?;
        device::setup_allowed(status).map_err(FfiError::precondition)
    };
    // SAFETY: ctx owns XLA's stream and was made current above.
    let dev = unsafe { device::device(ctx, not_capturing, internal) }?;
    enqueue(dev, stream, layout, &mut plan).map_err(internal)
}

/// What the step needs from a stream: kernel launches, GEMMs, copies and fills, in order.
/// `Session` is the CUDA one; tests/cuda_emulated.rs runs the same plan on the host.
pub trait Queue {
    /// # Safety
    /// `params` must match kernel `k`'s signature and its pointers be valid for the kernel.
    unsafe fn launch(&self, k: usize, grid: Grid, params: &mut [*mut c_void]) -> Result<(), String>;
    fn gemm(&self, g: &Gemm) -> Result<(), String>;
    fn copy(&self, dst: *mut c_void, src: *const c_void, bytes: usize) -> Result<(), String>;
    fn zero(&self, dst: *mut c_void, words: usize) -> Result<(), String>;
}

impl Queue for Session<'_> {
    unsafe fn launch(&self, k: usize, grid: Grid, params: &mut [*mut c_void]) -> Result<(), String> {
        Session::launch(self, k, grid, params)
    }
    fn gemm(&self, g: &Gemm) -> Result<(), String> {
        Session::gemm(self, g)
    }
    fn copy(&self, dst: *mut c_void, src: *const c_void, bytes: usize) -> Result<(), String> {
        Session::copy(self, dst, src, bytes)
    }
    fn zero(&self, dst: *mut c_void, words: usize) -> Result<(), String> {
        Session::zero(self, dst, words)
    }
}

fn enqueue(dev: &device::Device, stream: cu::CUstream, layout: &StepLayout, plan: &mut Plan) -> Result<(), String> {
    let o = plan.offsets;
    let at = |off: usize| (plan.scratch + off) as *mut c_void;
    // SAFETY: the caller made the stream's context current; the workspace is carved from this
    // call's scratch result, which XLA keeps for the whole execution.
    let s = unsafe { Session::new(dev, stream, at(o.workspace), o.workspace_len) }?;
    plan.noise_gemm = noise_gemm_kernel(std::env::var("LANTON_NOISE_GEMM").ok().as_deref(), dev.tensor_cores)?;
    enqueue_on(&s, layout, plan)
}

/// Enqueues the plan's launches and products on `s`, in stream order.
pub fn enqueue_on<Q: Queue>(s: &Q, layout: &StepLayout, plan: &mut Plan) -> Result<(), String> {
    let o = plan.offsets;
    let base = plan.scratch;
    let at = |off: usize| (base + off) as *mut c_void;
    s.zero(at(0), o.zeroed / 4)?;
    // State inputs that were not donated are copied into their results first.
    for leaf in &layout.leaves {
        let pairs = leaf.state.iter().chain(layout.in_place.then_some(&leaf.param));
        for p in pairs {
            s.copy(p.ret.data, p.arg.data, p.ret.len() * dtype::size(p.ret.dtype))?;
        }
    }
    let g = &mut plan.group;
    let per_leaf = |k: usize, leaves: &mut [LeafArgs], g: &mut GroupArgs| -> Result<(), String> {
        for (mut batch, blocks) in batches(leaves, k == K_TRACK)? {
            let grid = Grid { x: blocks, y: 1, block: BLOCK };
            // SAFETY: LeafBatch/GroupArgs mirror the kernels' structs (sizes asserted on both
            // sides); every pointer is a decoded XLA buffer or a carved scratch range.
            unsafe {
                s.launch(k, grid, &mut [&mut batch as *mut LeafBatch as *mut c_void, g as *mut GroupArgs as *mut c_void])?
            };
        }
        Ok(())
    };
    per_leaf(K_STATS, &mut plan.leaves, g)?;
    per_leaf(K_PREPARE, &mut plan.leaves, g)?;
    if plan.noise_polar {
        // The polar factor of D0 (kept in n0 for the inner product): one step n0 -> n1, then
        // n1 and n2 alternate. Gated on the device step count: a no-op unless it is a noise step.
        let schedule = step::nuclear_schedule();
        let gated = Products::Gated(*g, plan.noise_gemm);
        newton_schulz(s, &plan.classes, at(o.n0), at(o.n1), at(o.na), at(o.nb), true, &schedule[..1], gated)?;
        let polar = newton_schulz(s, &plan.classes, at(o.n1), at(o.n2), at(o.na), at(o.nb), true, &schedule[1..], gated)?;
        for a in plan.leaves.iter_mut() {
            a.noise_out = (polar as usize + (a.noise_in as usize - at(o.n0) as usize)) as *const f32;
        }
        per_leaf(K_DOT, &mut plan.leaves, g)?;
    }
    per_leaf(K_TRACK, &mut plan.leaves, g)?;
    let mut group_layers = plan.group_layers as i32;
    // SAFETY: as above; one block reduces the group's H/valid scratch.
    unsafe {
        s.launch(K_REFERENCE, Grid { x: 1, y: 1, block: BLOCK },
                 &mut [g as *mut GroupArgs as *mut c_void, &mut group_layers as *mut i32 as *mut c_void])?;
    }
    if plan.hidden {
        let coeffs = &layout.config.ns_coeffs;
        let dir = newton_schulz(s, &plan.classes, at(o.x), at(o.y), at(o.a), at(o.b), plan.ns_f32, coeffs,
                                Products::Cublas)?;
        for a in plan.leaves.iter_mut() {
            a.ns_out = (dir as usize + (a.ns_in as usize - at(o.x) as usize)) as *const c_void;
        }
    }
    per_leaf(K_APPLY, &mut plan.leaves, g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_products_of_many_matrices_take_several_launches() {
        let base = 0x1000_0000usize;
        let g = batched((true, false), (100, 100, 70), 1.0, (base as *mut c_void, 70, 7000), (base as *mut c_void, 70, 7000),
                        0.0, ((2 * base) as *mut c_void, 100, 10_000), 70_000, CUDA_R_32F);
        let l = GemmArgs::launches(&g).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].1.x, l[0].1.y, l[1].1.y), (4, MAX_GRID_Y as u32, (70_000 - MAX_GRID_Y) as u32));
        assert_eq!(l[1].0.a as usize, base + MAX_GRID_Y * 7000 * 4);
        assert_eq!(l[1].0.c as usize, 2 * base + MAX_GRID_Y * 10_000 * 4);
        let bf16 = Gemm { dtype: CUDA_R_16BF, ..g };
        assert!(GemmArgs::launches(&bf16).is_err());
        let empty = Gemm { n: 0, ..bf16 };
        assert!(GemmArgs::launches(&Gemm { dtype: CUDA_R_32F, ..empty }).unwrap().is_empty());
        let huge = batched((false, false), (i32::MAX - 10, 1, 1), 1.0, (base as *mut c_void, i32::MAX, 0),
                           (base as *mut c_void, 1, 0), 0.0, (base as *mut c_void, i32::MAX, 0), 1, CUDA_R_32F);
        assert!(matches!(GemmArgs::launches(&huge), Err(e) if e.contains("32-bit")));
    }

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
