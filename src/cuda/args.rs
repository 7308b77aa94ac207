//! The C mirrors of the kernels' argument structs (`kernels.cu`), and how a launch fills them:
//! the per-leaf kernels' multi-tensor batches and the noise products' grid slices. Their sizes
//! are asserted here and in kernels.cu, so a field added on one side only fails to build.

use super::device::{Gemm, Grid, CUDA_R_32F};
use std::ffi::c_void;

/// f64 accumulators per layer and their slots (ACC_* in kernels.cu): the non-finite count,
/// ||V||^2, the noise difference's norm, <D0, polar(D0)>.
pub const ACC_N: usize = 4;
pub const ACC_NONFINITE: i32 = 0;
pub const ACC_DOT: i32 = 3;

/// Threads per block of every launch (BLOCK in kernels.cu).
pub const BLOCK: u32 = 256;
/// Grid rows of one launch (CUDA's limit on gridDim.y): lanton_noise_gemm's batch.
pub(super) const MAX_GRID_Y: usize = 65_535;
/// C tile of lanton_noise_gemm (GEMM_TILE in kernels.cu).
const GEMM_TILE: usize = 64;

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
    /// Per layer: steps skipped for a non-finite gradient (lanton_apply adds this step's).
    pub skipped: *mut i32,
    pub ns_in: *mut c_void,
    pub noise_in: *mut f32,
    pub ns_out: *const c_void,
    pub noise_out: *const f32,
    pub layer_len: i64,
    pub noise_slot: i32,
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
const _: () = assert!(std::mem::size_of::<LeafArgs>() == 168);

/// Leaves per multi-tensor launch (kernel parameters stay under 4 KB: a LeafBatch and a GroupArgs).
pub const MAX_LEAVES: usize = 22;

/// Mirrors `struct LeafBatch` in kernels.cu: up to MAX_LEAVES leaves in one launch.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LeafBatch {
    pub leaf: [LeafArgs; MAX_LEAVES],
    pub first_block: [i32; MAX_LEAVES + 1],
    pub chunks: [i32; MAX_LEAVES],
    pub count: i32,
}
const _: () = assert!(std::mem::size_of::<LeafBatch>() == 3880);
const _: () = assert!(std::mem::size_of::<LeafBatch>() + std::mem::size_of::<GroupArgs>() <= 4096);

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
    pub partials: *mut f64,
    /// Noise phase per group layer (null: all 0).
    pub phases: *const i32,
    /// Per noise matrix: its noise estimate runs this step (written by lanton_prepare).
    pub due: *mut i32,
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
    pub chunk_stride: i32,
    /// The adam kind's eps and eps_root.
    pub adam_eps: f32,
    pub adam_eps_root: f32,
    /// r <= ratio_cap (infinity: no cap).
    pub ratio_cap: f32,
}
const _: () = assert!(std::mem::size_of::<GroupArgs>() == 128);

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
    /// Matrix y of the batch is multiplied only if due[due_first + y].
    pub due: *const i32,
    pub due_first: i32,
    pub unused: i32,
}
const _: () = assert!(std::mem::size_of::<GemmArgs>() == 104);

impl GemmArgs {
    /// The kernel's launches for an f32 product: grid x = 64 x 64 tiles of C, y = matrices of
    /// the batch, in slices of at most MAX_GRID_Y matrices; matrix z of the batch is multiplied
    /// only if `due[due_first + z]`.
    pub fn launches(g: &Gemm, due: *const i32, due_first: usize) -> Result<Vec<(GemmArgs, Grid)>, String> {
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
                    beta: g.beta, due, due_first: (due_first + first) as i32, unused: 0,
                };
                (args, Grid { x: tiles as u32, y: (batch - first).min(MAX_GRID_Y) as u32, block: BLOCK })
            })
            .collect())
    }
}
/// Blocks per layer of a per-layer pass over `layer_len` elements (one, idle, for an empty layer).
pub fn chunks_per_layer(layer_len: usize) -> usize {
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
            } else {
                // A zero-size leaf gets one (idle) block per layer: lanton_apply still writes
                // each layer's ratio, and the reductions add nothing.
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
