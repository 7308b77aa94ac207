//! The launch sequence of one group step: the kernels and the batched Newton-Schulz products of
//! a `Plan`, enqueued in stream order on a `Queue` (XLA's stream through `device::Session`; the
//! host emulation in tests/cuda_emulated.rs). No host synchronization: the step count and the
//! hyperparameters stay on the device and the kernels apply `crate::step`'s rules. Every step
//! enqueues the same work: the noise estimate's blocks (lanton_noise_gemm) return at once
//! unless their layer is measured this step (its phase and the device step count).

use super::args::{batches, GemmArgs, GroupArgs, LeafArgs, LeafBatch, ACC_DOT, ACC_NONFINITE, BLOCK};
use super::device::{self, Gemm, Grid, Session, CUBLAS_COMPUTE_32F};
use super::kernels::Kernel;
use super::plan::{noise_gemm_kernel, ns_dtype_size, Plan, ShapeClass};
use super::CudaError;
use crate::step::{self, layout::StepLayout};
use cudarc::driver::sys as cu;
use std::ffi::c_void;

/// Who multiplies in a Newton-Schulz run.
#[derive(Clone, Copy)]
enum Products {
    /// cuBLAS: the direction, needed on every step.
    Cublas,
    /// lanton_noise_gemm or lanton_noise_gemm_tc, and a gated lanton_affine_diag: the noise
    /// estimate, whose blocks do nothing unless their matrix's flag in `due` (one per noise
    /// matrix, set by lanton_prepare for the layers measured this step) is set.
    Gated { due: *const i32, kernel: Kernel },
}

impl Products {
    /// `first`: the index of the batch's first matrix among the noise matrices.
    fn multiply<Q: Queue>(self, s: &Q, g: &Gemm, first: usize) -> Result<(), String> {
        match self {
            Products::Cublas => s.gemm(g),
            Products::Gated { due, kernel } => {
                for (mut args, grid) in GemmArgs::launches(g, due, first)? {
                    // SAFETY: GemmArgs mirrors the kernel's struct (sizes asserted on both sides);
                    // the operands are the plan's scratch ranges, sized for the batch, and `due`
                    // holds a flag for every noise matrix.
                    unsafe { s.launch(kernel, grid, &mut [&mut args as *mut GemmArgs as *mut c_void])? };
                }
                Ok(())
            }
        }
    }

    /// lanton_affine_diag's gate: the flags (null for "always") and the batch's first index.
    fn gate(self, first: usize) -> (*const i32, i32) {
        match self {
            Products::Cublas => (std::ptr::null(), 0),
            Products::Gated { due, .. } => (due, first as i32),
        }
    }
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
    let (dt, cuda_dt, size) = ns_dtype_size(f32_ops);
    let at = |p: *mut c_void, elems: usize| (p as usize + elems * size) as *mut c_void;
    // A class of zero-size matrices has nothing to multiply (and would hand cuBLAS ld = 0).
    for c in classes.iter().filter(|c| c.batch > 0 && c.rows > 0 && c.cols > 0) {
        let (r, cl, sm) = (c.rows as i32, c.cols as i32, c.small() as i32);
        let (mat, gram) = ((c.rows * c.cols) as i64, (c.small() * c.small()) as i64);
        let (mut src, mut dst) = (at(x, c.base), at(y, c.base));
        let batch = c.batch as i32;
        let (gate_due, gate_first) = products.gate(c.first);
        for &[ca, cb, cc] in coeffs {
            // Row-major R x C is column-major P = X^T (C x R, ld C). Rows <= cols: A = P^T P;
            // else A = P P^T (the transposed problem), with no data transposition.
            let (xs, xd) = ((src, cl, mat), (dst, cl, mat));
            let (am, bp) = ((a, sm, gram), (bm, sm, gram));
            products.multiply(s, &if c.rows <= c.cols {
                batched((true, false), (r, r, cl), 1.0, xs, xs, 0.0, am, batch, cuda_dt)
            } else {
                batched((false, true), (cl, cl, r), 1.0, xs, xs, 0.0, am, batch, cuda_dt)
            }, c.first)?;
            // Bm = b*A + a*I, then Bm += c*A*A.
            let total = gram * c.batch as i64;
            let (mut pa, mut pb, mut pdt, mut psm, mut ptot, mut pca, mut pcb) = (a, bm, dt, sm, total, ca, cb);
            let (mut pdue, mut pfirst) = (gate_due, gate_first);
            let grid = Grid { x: (total as u64).div_ceil(BLOCK as u64 * 4).clamp(1, 4096) as u32, y: 1, block: BLOCK };
            // SAFETY: A and Bm hold `total` elements of dtype dt.
            unsafe {
                s.launch(Kernel::AffineDiag, grid, &mut [
                    &mut pa as *mut _ as *mut c_void, &mut pb as *mut _ as *mut c_void, &mut pdt as *mut _ as *mut c_void,
                    &mut psm as *mut _ as *mut c_void, &mut ptot as *mut _ as *mut c_void, &mut pca as *mut _ as *mut c_void,
                    &mut pcb as *mut _ as *mut c_void, &mut pdue as *mut _ as *mut c_void,
                    &mut pfirst as *mut _ as *mut c_void,
                ])?;
            }
            products.multiply(s, &batched((false, false), (sm, sm, sm), cc, am, am, 1.0, bp, batch, cuda_dt), c.first)?;
            // X' = X Bm (rows <= cols) or Bm X (the transposed problem).
            products.multiply(s, &if c.rows <= c.cols {
                batched((false, false), (cl, r, r), 1.0, xs, bp, 0.0, xd, batch, cuda_dt)
            } else {
                batched((false, false), (cl, r, cl), 1.0, bp, xs, 0.0, xd, batch, cuda_dt)
            }, c.first)?;
            std::mem::swap(&mut src, &mut dst);
        }
    }
    Ok(if coeffs.len() % 2 == 0 { x } else { y })
}

/// Before execution and before any CUDA-graph capture (XLA's initialize stage): compiles the
/// kernels and creates the cuBLAS handle for the stream's context, neither of which may happen
/// while a stream is being captured.
///
/// # Safety
/// `stream` is a live CUDA stream for the whole call (XLA's).
pub unsafe fn prepare_device(stream: *mut c_void) -> Result<(), CudaError> {
    let stream = stream as cu::CUstream;
    let internal = CudaError::Internal;
    // SAFETY: the stream (and so its context) lives for the whole call (this function's contract).
    let ctx = unsafe { device::stream_context(stream) }.map_err(internal)?;
    let _current = unsafe { device::ContextGuard::push(ctx) }.map_err(internal)?;
    // SAFETY: ctx owns XLA's stream and was made current above.
    unsafe { device::device(ctx, || Ok(()), internal) }?;
    Ok(())
}

/// Enqueues one LANTON group step on `stream`: the `plan` of `layout` (`plan_in_scratch`, which
/// checks the scratch before anything touches the device).
///
/// # Safety
/// `stream` is a live CUDA stream for the whole call (XLA's), and the layout's addresses are
/// device buffers of that stream's context, valid until the enqueued work has run.
pub unsafe fn group_step(stream: *mut c_void, layout: &StepLayout, mut plan: Plan) -> Result<(), CudaError> {
    let stream = stream as cu::CUstream;
    let internal = CudaError::Internal;
    // SAFETY: the stream (and so its context) lives for the whole call (this function's contract).
    let ctx = unsafe { device::stream_context(stream) }.map_err(internal)?;
    let _current = unsafe { device::ContextGuard::push(ctx) }.map_err(internal)?;
    // Normally built at the initialize stage; building it here is only safe outside capture.
    let not_capturing = || {
        // SAFETY: the stream lives for the whole call.
        let status = unsafe { super::sys::stream_capture_status(stream) }.map_err(internal)?;
        device::setup_allowed(status).map_err(CudaError::Precondition)
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
    unsafe fn launch(&self, k: Kernel, grid: Grid, params: &mut [*mut c_void]) -> Result<(), String>;
    fn gemm(&self, g: &Gemm) -> Result<(), String>;
    fn copy(&self, dst: *mut c_void, src: *const c_void, bytes: usize) -> Result<(), String>;
    fn zero(&self, dst: *mut c_void, words: usize) -> Result<(), String>;
}

impl Queue for Session<'_> {
    unsafe fn launch(&self, k: Kernel, grid: Grid, params: &mut [*mut c_void]) -> Result<(), String> {
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
            s.copy(p.ret.data, p.arg.data, p.ret.bytes())?;
        }
    }
    let g = &mut plan.group;
    let per_leaf = |k: Kernel, leaves: &mut [LeafArgs], g: &mut GroupArgs| -> Result<(), String> {
        for (mut batch, blocks) in batches(leaves, k == Kernel::Track)? {
            let grid = Grid { x: blocks, y: 1, block: BLOCK };
            // SAFETY: LeafBatch/GroupArgs mirror the kernels' structs (sizes asserted on both
            // sides); every pointer is a decoded XLA buffer or a carved scratch range.
            unsafe {
                s.launch(k, grid, &mut [&mut batch as *mut LeafBatch as *mut c_void, g as *mut GroupArgs as *mut c_void])?
            };
        }
        Ok(())
    };
    let mut group_layers = plan.group_layers as i32;
    // The per-(layer, chunk) partial sums of lanton_stats or lanton_dot, added in a fixed order
    // into acc[first .. first + count) of every layer.
    let sum_chunks = |g: &mut GroupArgs, mut first: i32, mut count: i32| -> Result<(), String> {
        let mut layers = group_layers;
        // One block per layer: its (up to 1,024) slots added by the block's threads in a fixed order.
        let grid = Grid { x: layers as u32, y: 1, block: BLOCK };
        // SAFETY: lanton_sum_chunks(GroupArgs, int, int, int); the plan carved acc and partials
        // for every layer of the group and chunk_stride slots each.
        unsafe {
            s.launch(Kernel::SumChunks, grid, &mut [
                g as *mut GroupArgs as *mut c_void, &mut layers as *mut i32 as *mut c_void,
                &mut first as *mut i32 as *mut c_void, &mut count as *mut i32 as *mut c_void,
            ])
        }
    };
    per_leaf(Kernel::Stats, &mut plan.leaves, g)?;
    sum_chunks(g, ACC_NONFINITE, 3)?; // non-finite count, ||V||^2, ||D||
    per_leaf(Kernel::Prepare, &mut plan.leaves, g)?;
    if plan.noise_polar {
        // The polar factor of D0 (kept in n0 for the inner product): one step n0 -> n1, then
        // n1 and n2 alternate. Gated per matrix: only the layers measured this step cost work.
        let schedule = step::nuclear_schedule();
        let gated = Products::Gated { due: g.due, kernel: plan.noise_gemm };
        newton_schulz(s, &plan.classes, at(o.n0), at(o.n1), at(o.na), at(o.nb), true, &schedule[..1], gated)?;
        let polar = newton_schulz(s, &plan.classes, at(o.n1), at(o.n2), at(o.na), at(o.nb), true, &schedule[1..], gated)?;
        for a in plan.leaves.iter_mut() {
            a.noise_out = (polar as usize + (a.noise_in as usize - at(o.n0) as usize)) as *const f32;
        }
        per_leaf(Kernel::Dot, &mut plan.leaves, g)?;
        sum_chunks(g, ACC_DOT, 1)?;
    }
    per_leaf(Kernel::Track, &mut plan.leaves, g)?;
    // SAFETY: as above; one block reduces the group's H/valid scratch.
    unsafe {
        s.launch(Kernel::Reference, Grid { x: 1, y: 1, block: BLOCK },
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
    per_leaf(Kernel::Apply, &mut plan.leaves, g)
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::args::MAX_GRID_Y;
    use crate::cuda::device::{CUDA_R_16BF, CUDA_R_32F};

    #[test]
    fn noise_products_of_many_matrices_take_several_launches() {
        let base = 0x1000_0000usize;
        let g = batched((true, false), (100, 100, 70), 1.0, (base as *mut c_void, 70, 7000), (base as *mut c_void, 70, 7000),
                        0.0, ((2 * base) as *mut c_void, 100, 10_000), 70_000, CUDA_R_32F);
        let l = GemmArgs::launches(&g, std::ptr::null(), 7).unwrap();
        assert_eq!((l[0].0.due_first, l[1].0.due_first), (7, 7 + MAX_GRID_Y as i32));
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].1.x, l[0].1.y, l[1].1.y), (4, MAX_GRID_Y as u32, (70_000 - MAX_GRID_Y) as u32));
        assert_eq!(l[1].0.a as usize, base + MAX_GRID_Y * 7000 * 4);
        assert_eq!(l[1].0.c as usize, 2 * base + MAX_GRID_Y * 10_000 * 4);
        let bf16 = Gemm { dtype: CUDA_R_16BF, ..g };
        assert!(GemmArgs::launches(&bf16, std::ptr::null(), 0).is_err());
        let empty = Gemm { n: 0, ..bf16 };
        assert!(GemmArgs::launches(&Gemm { dtype: CUDA_R_32F, ..empty }, std::ptr::null(), 0).unwrap().is_empty());
        let huge = batched((false, false), (i32::MAX - 10, 1, 1), 1.0, (base as *mut c_void, i32::MAX, 0),
                           (base as *mut c_void, 1, 0), 0.0, (base as *mut c_void, i32::MAX, 0), 1, CUDA_R_32F);
        assert!(matches!(GemmArgs::launches(&huge, std::ptr::null(), 0), Err(e) if e.contains("32-bit")));
    }
}
