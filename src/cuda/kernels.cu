// lanton CUDA kernels, compiled at run time by NVRTC (no headers: bf16/f16 conversions are
// written out). The per-leaf passes are multi-tensor launches: one launch covers up to
// MAX_LEAVES leaves (a LeafBatch passed by value), each block finds its leaf, layer and chunk.
// One group step = these launches on XLA's stream, in this order:
//   lanton_stats    per leaf: per-layer non-finite count, ||V||^2 and the noise difference's norm
//                   (each block's partial sums in its own slot)
//   lanton_sum_chunks  one block per layer: the slots added in a fixed order (deterministic)
//   lanton_prepare  per leaf: momentum write, Newton-Schulz input V/||V||, noise input D/||D||,
//                   G_prev store
//   [Newton-Schulz on the noise inputs with lanton_noise_gemm (or lanton_noise_gemm_tc, TF32
//    tensor cores, opt-in), then lanton_dot: <D0, polar(D0)> per layer, and lanton_sum_chunks;
//    each block returns at once unless its matrix is due this step (its phase, the device step
//    count and a usable G_prev: the `due` flags lanton_prepare writes), so a staggered schedule
//    costs the same 1/K of the noise work every step]
//   lanton_track    per leaf: H, valid and prev_step per layer; H/valid copied to group scratch
//   lanton_reference  one block: the group's reference alpha (max/mean/min/median over valid layers)
//   [cuBLAS Newton-Schulz on the direction inputs]
//   lanton_apply    per leaf: r per layer, direction, weight decay, write-out (the adam kind:
//                   its second moment in the G_prev buffer and NAdamW's direction, r = 1)
// The rules (cadence, usable G_prev, skipped layers) mirror src/step/mod.rs line for line.

typedef unsigned short u16;
typedef unsigned int u32;

#define DT_F16 10
#define DT_F32 11
#define DT_BF16 16

#define KIND_HIDDEN 0
#define KIND_EMBED 1
#define KIND_VECTOR 2
#define KIND_ADAM 3

#define STAT_MAX 0
#define STAT_MEAN 1
#define STAT_MIN 2
#define STAT_MEDIAN 3

// Per-layer accumulators (double) in group scratch, ACC_N per layer.
#define ACC_NONFINITE 0
#define ACC_V2 1
#define ACC_D 2
#define ACC_DOT 3
#define ACC_N 4

#define BLOCK 256

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
    return (u16)(u >> 16);
}
#ifndef LANTON_EMULATE
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif  // the host emulation (tests/cuda_emu/emu.h) brings its own
__device__ __forceinline__ float load(const void* p, int dt, long long i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const u16*)p)[i]);
    return f16_to_f32(((const u16*)p)[i]);
}
__device__ __forceinline__ void store(void* p, int dt, long long i, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else if (dt == DT_BF16) ((u16*)p)[i] = f32_to_bf16(v);
    else ((u16*)p)[i] = f32_to_f16(v);
}

// One leaf of the group, passed by value (layout mirrored by `LeafArgs` in src/cuda/args.rs).
struct LeafArgs {
    const void* param;   // parameters (read; in place: also written)
    void* out;           // the update (optax) or the parameters (in place)
    const void* grad;
    void* momentum;      // result buffer, holding the incoming momentum
    void* prev_grad;     // result buffer, holding the incoming G_prev
    float* noise;        // result buffers, per layer
    float* valid;
    int* prev_step;
    float* ratio;
    int* skipped;        // result buffer, per layer: steps skipped for a non-finite gradient
    void* ns_in;         // direction Newton-Schulz input (hidden), this leaf's first layer
    float* noise_in;     // noise Newton-Schulz input (hidden, noise work), this leaf's first layer
    const void* ns_out;  // direction Newton-Schulz result (hidden), this leaf's first layer
    const float* noise_out;  // polar factor of noise_in
    long long layer_len; // rows * cols
    int noise_slot;      // index of this leaf's first layer among the noise matrices (hidden, noise work)
    int layers;
    int group_layer;     // index of this leaf's first layer among the group's layers
    int dt_param, dt_grad, dt_mom, dt_prev, dt_ns;
    int in_place;
    float shape_scale;   // s(kind, shape) / scale: sqrt(max(rows, cols)) for hidden, else 1
    float dual_factor;   // dual-norm factor of the kind and shape
};
static_assert(sizeof(LeafArgs) == 168, "LeafArgs layout must match src/cuda/args.rs");

// Structural options and the group's scratch, identical for every leaf of a call.
struct GroupArgs {
    const float* hyper;  // lr, beta1, beta2, weight_decay, scale
    const int* step;     // t, 1-based
    double* acc;         // ACC_N per group layer
    float* group_h;      // H per group layer (after tracking)
    float* group_valid;
    double* reference;   // [0] reference alpha, [1] count of valid layers
    double* partials;    // ACC_N per (group layer, chunk): each block's sums, added in a fixed order
    const int* phases;   // noise phase per group layer (null: 0 for every layer, the synchronous schedule)
    int* due;            // per noise matrix: 1 if its noise estimate runs this step (zeroed scratch)
    int kind, noise_every, noise_adaptive, nesterov, ratio_stat, noise_work;
    float ratio_eps, vector_eps;
    float ratio_power, ratio_floor;  // r = min(cap, max(floor, (alpha/ref)^power)) (src/step RatioRule::shape)
    int chunk_stride;    // partial slots per layer: the most chunks any layer of the group has
    float adam_eps, adam_eps_root;  // the adam kind's D = m / (sqrt(v + eps_root) + eps)
    float ratio_cap;     // r <= ratio_cap (inf: no cap)
};
static_assert(sizeof(GroupArgs) == 128, "GroupArgs layout must match src/cuda/args.rs");

// Up to MAX_LEAVES leaves per launch (the batch stays under the 4 KB kernel-parameter limit).
#define MAX_LEAVES 22
struct LeafBatch {
    LeafArgs leaf[MAX_LEAVES];
    int first_block[MAX_LEAVES + 1];  // prefix sum of each leaf's blocks
    int chunks[MAX_LEAVES];           // blocks per layer (per-layer passes) or per leaf (track)
    int count;
};
static_assert(sizeof(LeafBatch) == 3880, "LeafBatch layout must match src/cuda/args.rs");

// This block's leaf j, its block index within the leaf, and the leaf's blocks per layer.
struct Where { int j, local, chunks; };
__device__ __forceinline__ Where locate(const LeafBatch& b) {
    int j = 0;
    while (j + 1 < b.count && b.first_block[j + 1] <= (int)blockIdx.x) ++j;
    return {j, (int)blockIdx.x - b.first_block[j], b.chunks[j]};
}

// src/step/mod.rs is_noise_step: t >= 2 and t = phase (mod K), any phase taken mod K.
// 64-bit: callers ask about t + 1, which must not overflow at t = INT_MAX (as on the CPU).
__device__ __forceinline__ bool is_noise_step(const GroupArgs& g, long long t, int phase) {
    return g.noise_adaptive && t >= 2 && (t - (long long)phase) % (long long)g.noise_every == 0;  // (a zero remainder has no sign)
}
__device__ __forceinline__ int phase_of(const GroupArgs& g, long long group_layer) { return g.phases ? g.phases[group_layer] : 0; }
__device__ __forceinline__ bool prev_usable(int prev_step, int t) { return prev_step >= 1 && prev_step == t - 1; }

// Block-wide sum, result valid in thread 0.
__device__ double block_sum(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? shared[lane] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}

// The partial sums of one (group layer, chunk): ACC_N doubles.
__device__ __forceinline__ double* partial_slot(const GroupArgs& g, long long group_layer, int chunk) {
    return g.partials + (group_layer * g.chunk_stride + chunk) * ACC_N;
}

// grid: the batch's blocks (layers x chunks per leaf), block BLOCK.
extern "C" __global__ void lanton_stats(LeafBatch batch, GroupArgs g) {
    const Where w = locate(batch);
    const LeafArgs& a = batch.leaf[w.j];
    const int l = w.local / w.chunks, chunk = w.local % w.chunks;
    __shared__ double shared[32];
    const int t = *g.step;
    const float b1 = g.hyper[1];
    const int phase = phase_of(g, a.group_layer + l);
    const bool noise = g.noise_work && is_noise_step(g, t, phase) && prev_usable(a.prev_step[l], t);
    const long long base = (long long)l * a.layer_len;
    double nonfinite = 0, v2 = 0, dn = 0;
    for (long long i = chunk * (long long)blockDim.x + threadIdx.x; i < a.layer_len; i += (long long)w.chunks * blockDim.x) {
        float gr = load(a.grad, a.dt_grad, base + i);
        float b = b1 * load(a.momentum, a.dt_mom, base + i) + (1.f - b1) * gr;
        float v = g.nesterov ? b1 * b + (1.f - b1) * gr : b;
        nonfinite += isfinite(gr) ? 0.0 : 1.0;
        v2 += (double)v * v;
        if (noise) {
            float d = gr - load(a.prev_grad, a.dt_prev, base + i);
            dn += g.kind == KIND_EMBED ? fabs((double)d) : (double)d * d;
        }
    }
    nonfinite = block_sum(nonfinite, shared);
    v2 = block_sum(v2, shared);
    dn = block_sum(dn, shared);
    if (threadIdx.x == 0) {  // this block's slot; lanton_sum_chunks adds the chunks in a fixed order
        double* slot = partial_slot(g, a.group_layer + l, chunk);
        slot[ACC_NONFINITE] = nonfinite;
        slot[ACC_V2] = v2;
        slot[ACC_D] = dn;
    }
}

// grid: the batch's blocks (layers x chunks per leaf), block BLOCK.
extern "C" __global__ void lanton_prepare(LeafBatch batch, GroupArgs g) {
    const Where w = locate(batch);
    const LeafArgs& a = batch.leaf[w.j];
    const int l = w.local / w.chunks, chunk = w.local % w.chunks;
    const int t = *g.step;
    const float b1 = g.hyper[1];
    const double* acc = g.acc + (long long)(a.group_layer + l) * ACC_N;
    const bool finite = acc[ACC_NONFINITE] == 0.0;
    const int phase = phase_of(g, a.group_layer + l);
    const bool noise = finite && g.noise_work && is_noise_step(g, t, phase) && prev_usable(a.prev_step[l], t);
    const bool keep = finite && is_noise_step(g, (long long)t + 1, phase);
    // Only a measured layer's polar factor is computed (lanton_noise_gemm reads `due`).
    const bool noise_inputs = g.kind == KIND_HIDDEN && a.noise_in && noise;
    if (noise_inputs && chunk == 0 && threadIdx.x == 0) g.due[a.noise_slot + l] = 1;
    const float inv_v = (float)(1.0 / (sqrt(acc[ACC_V2]) + 1e-7));
    const double dnorm = sqrt(acc[ACC_D]);
    const float inv_d = (noise && dnorm > 0.0 && isfinite(dnorm)) ? (float)(1.0 / dnorm) : 0.f;
    const long long base = (long long)l * a.layer_len;
    for (long long i = chunk * (long long)blockDim.x + threadIdx.x; i < a.layer_len; i += (long long)w.chunks * blockDim.x) {
        float gr = load(a.grad, a.dt_grad, base + i);
        float v = 0.f;
        if (finite) {
            float b = b1 * load(a.momentum, a.dt_mom, base + i) + (1.f - b1) * gr;
            store(a.momentum, a.dt_mom, base + i, b);
            v = g.nesterov ? b1 * b + (1.f - b1) * gr : b;
        }
        if (g.kind == KIND_HIDDEN) {
            store(a.ns_in, a.dt_ns, base + i, finite ? v * inv_v : 0.f);  // a skipped layer's NaN stays out
            if (noise_inputs)  // D / ||D|| (zeros for D = 0)
                a.noise_in[base + i] = inv_d != 0.f ? (gr - load(a.prev_grad, a.dt_prev, base + i)) * inv_d : 0.f;
        }
        if (keep) store(a.prev_grad, a.dt_prev, base + i, gr);
    }
}

// <D0, P> per layer measured this step (P is only computed then). grid: the batch's blocks, block BLOCK.
extern "C" __global__ void lanton_dot(LeafBatch batch, GroupArgs g) {
    const Where w = locate(batch);
    const LeafArgs& a = batch.leaf[w.j];
    const int l = w.local / w.chunks, chunk = w.local % w.chunks;
    if (!g.due[a.noise_slot + l]) return;  // uniform across the block; the slot keeps its zero
    __shared__ double shared[32];
    const long long base = (long long)l * a.layer_len;
    double s = 0;
    for (long long i = chunk * (long long)blockDim.x + threadIdx.x; i < a.layer_len; i += (long long)w.chunks * blockDim.x)
        s += (double)a.noise_in[base + i] * a.noise_out[base + i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial_slot(g, a.group_layer + l, chunk)[ACC_DOT] = s;
}

// acc[first .. first + count) of every group layer = its chunks' partial sums, in a fixed order
// (thread i adds chunks i, i + BLOCK, ... in turn, then block_sum's fixed tree): the same bits
// whatever order the blocks of lanton_stats or lanton_dot ran in (no floating-point atomics).
// Slots past a layer's own chunks hold the zeros the step starts with. One block per layer.
extern "C" __global__ void lanton_sum_chunks(GroupArgs g, int group_layers, int first, int count) {
    const long long l = blockIdx.x;  // grid: group_layers blocks (uniform across the block)
    if (l >= group_layers) return;
    __shared__ double shared[32];
    for (int q = first; q < first + count; ++q) {
        double s = 0;
        for (int c = threadIdx.x; c < g.chunk_stride; c += blockDim.x) s += partial_slot(g, l, c)[q];
        s = block_sum(s, shared);
        if (threadIdx.x == 0) g.acc[l * ACC_N + q] = s;
    }
}

// One thread per layer: chunks = ceil(layers / BLOCK) blocks per leaf.
extern "C" __global__ void lanton_track(LeafBatch batch, GroupArgs g) {
    const Where w = locate(batch);
    const LeafArgs& a = batch.leaf[w.j];
    const int l = w.local * blockDim.x + threadIdx.x;
    if (l >= a.layers) return;
    const int t = *g.step;
    const double* acc = g.acc + (long long)(a.group_layer + l) * ACC_N;
    const bool finite = acc[ACC_NONFINITE] == 0.0;
    float h = a.noise[l], valid = a.valid[l];
    const int phase = phase_of(g, a.group_layer + l);
    if (finite && g.noise_work && is_noise_step(g, t, phase) && prev_usable(a.prev_step[l], t)) {
        double raw = g.kind == KIND_HIDDEN ? sqrt(acc[ACC_D]) * acc[ACC_DOT]
                   : g.kind == KIND_EMBED  ? acc[ACC_D]
                                           : sqrt(acc[ACC_D]);
        float n = (float)raw * a.dual_factor;
        float tracked = g.hyper[2] * h + (1.f - g.hyper[2]) * n * n;
        if (isfinite(tracked)) {  // a norm that would make H non-finite is dropped (src/cpu record_noise)
            h = tracked;
            if (n > 0.f) valid = 1.f;
        }
    }
    if (finite && is_noise_step(g, (long long)t + 1, phase)) a.prev_step[l] = t;
    a.noise[l] = h;
    a.valid[l] = valid;
    g.group_h[a.group_layer + l] = h;
    g.group_valid[a.group_layer + l] = valid;
}

__device__ __forceinline__ double alpha_of(float h, float eps) { return 1.0 / sqrt((double)h + (double)eps); }

// The group's reference alpha over valid layers. One block of BLOCK threads.
extern "C" __global__ void lanton_reference(GroupArgs g, int group_layers) {
    __shared__ double shared[32];
    double count = 0, sum = 0, mx = -__longlong_as_double(0x7ff0000000000000LL), mn = __longlong_as_double(0x7ff0000000000000LL);
    for (int j = threadIdx.x; j < group_layers; j += blockDim.x) {
        if (g.group_valid[j] > 0.5f) {
            double al = alpha_of(g.group_h[j], g.ratio_eps);
            count += 1;
            sum += al;
            mx = fmax(mx, al);
            mn = fmin(mn, al);
        }
    }
    __shared__ double smax[BLOCK], smin[BLOCK];
    smax[threadIdx.x] = mx;
    smin[threadIdx.x] = mn;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            smax[threadIdx.x] = fmax(smax[threadIdx.x], smax[threadIdx.x + s]);
            smin[threadIdx.x] = fmin(smin[threadIdx.x], smin[threadIdx.x + s]);
        }
        __syncthreads();
    }
    count = block_sum(count, shared);
    sum = block_sum(sum, shared);
    // The median by rank: the valid layer whose rank interval [less, less + equal) holds the middle
    // rank(s) (n - 1) / 2 and n / 2. O(n^2 / BLOCK) work: groups have tens to thousands of layers.
    __shared__ double total, mid[2];
    if (threadIdx.x == 0) {
        total = count;
        mid[0] = mid[1] = 0.0;
    }
    __syncthreads();
    if (g.ratio_stat == STAT_MEDIAN) {
        const long long n = (long long)total, k[2] = {(n - 1) / 2, n / 2};
        for (int j = threadIdx.x; j < group_layers; j += blockDim.x) {
            if (!(g.group_valid[j] > 0.5f)) continue;
            const double aj = alpha_of(g.group_h[j], g.ratio_eps);
            long long less = 0, equal = 0;
            for (int i = 0; i < group_layers; ++i) {
                if (!(g.group_valid[i] > 0.5f)) continue;
                const double ai = alpha_of(g.group_h[i], g.ratio_eps);
                less += ai < aj;
                equal += ai == aj;
            }
            for (int m = 0; m < 2; ++m)
                if (less <= k[m] && k[m] < less + equal) mid[m] = aj;  // ties write the same value
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double ref = g.ratio_stat == STAT_MAX ? smax[0] : g.ratio_stat == STAT_MIN ? smin[0]
                   : g.ratio_stat == STAT_MEDIAN ? 0.5 * (mid[0] + mid[1]) : sum / fmax(count, 1.0);
        g.reference[0] = ref;
        g.reference[1] = count;
    }
}

// Newton-Schulz helper: B = b*A + a*I for a batch of s x s matrices (dtype dt). Gated like
// lanton_noise_gemm when `due` is set (the noise estimate's iterations): matrix m of the batch
// only if due[due_first + m].
extern "C" __global__ void lanton_affine_diag(const void* A, void* B, int dt, int s, long long total, float a, float b,
                                              const int* due, int due_first) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        if (due && !due[due_first + i / ((long long)s * s)]) continue;
        long long within = i % ((long long)s * s);
        float diag = (within / s == within % s) ? a : 0.f;
        store(B, dt, i, b * load(A, dt, i) + diag);
    }
}

// One f32 strided-batched product, column-major with cuBLAS's conventions (layout mirrored by
// `GemmArgs` in src/cuda/args.rs): C = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n,
// C not read when beta = 0.
struct GemmArgs {
    const float* a;
    const float* b;
    float* c;
    long long stride_a, stride_b, stride_c;
    int m, n, k, lda, ldb, ldc;
    int trans_a, trans_b;
    float alpha, beta;
    const int* due;      // matrix y of the batch is multiplied only if due[due_first + y]
    int due_first, unused;
};
static_assert(sizeof(GemmArgs) == 104, "GemmArgs layout must match src/cuda/args.rs");

#define GEMM_TILE 64
#define GEMM_DEPTH 16
static_assert(BLOCK == 256 && GEMM_TILE == 4 * 16, "lanton_noise_gemm: 16 x 16 threads of 4 x 4 outputs");
// Stages one DEPTH-deep slice of both operands' tiles in shared memory for the noise products:
// sa[kk][r] = op(A)[i0 + r][k0 + kk], sb[kk][r] = op(B)[k0 + kk][j0 + r], zero outside the
// matrices. e -> (kk, r) with whichever index is contiguous in memory varying fastest across
// threads (coalesced loads). The caller syncs the block before and after reading the tiles.
template <int DEPTH, int PAD>
__device__ __forceinline__ void stage_tiles(const GemmArgs& p, const float* A, const float* B, int i0, int j0, int k0,
                                            float (*sa)[PAD], float (*sb)[PAD]) {
    for (int e = threadIdx.x; e < DEPTH * GEMM_TILE; e += blockDim.x) {
        int kk = p.trans_a ? e % DEPTH : e / GEMM_TILE, r = p.trans_a ? e / DEPTH : e % GEMM_TILE;
        int kp = k0 + kk, i = i0 + r;
        sa[kk][r] = (i < p.m && kp < p.k) ? (p.trans_a ? A[kp + (long long)i * p.lda] : A[i + (long long)kp * p.lda]) : 0.f;
        kk = p.trans_b ? e / GEMM_TILE : e % DEPTH;
        r = p.trans_b ? e % GEMM_TILE : e / DEPTH;
        kp = k0 + kk;
        const int j = j0 + r;
        sb[kk][r] = (j < p.n && kp < p.k) ? (p.trans_b ? B[j + (long long)kp * p.ldb] : B[kp + (long long)j * p.ldb]) : 0.f;
    }
}
// The noise estimate's products. cuBLAS cannot skip work on a value that lives on the device,
// so these run on our kernel, whose blocks return at once unless their matrix is due this step
// (lanton_prepare's flags): every step enqueues the same launches (no conditional, no host
// synchronization), and only the measured matrices cost more than a block's launch.
// grid: x = 64 x 64 tiles of C (column-major tile order), y = the batch; block BLOCK (each
// thread 4 x 4 outputs, strided by 16 so a warp's loads and stores are contiguous).
extern "C" __global__ void lanton_noise_gemm(GemmArgs p) {
    if (!p.due[p.due_first + blockIdx.y]) return;  // uniform across the block: no thread waits at a barrier
    __shared__ float sa[GEMM_DEPTH][GEMM_TILE + 1], sb[GEMM_DEPTH][GEMM_TILE + 1];
    const int tiles_m = (p.m + GEMM_TILE - 1) / GEMM_TILE;
    const int i0 = (int)(blockIdx.x % tiles_m) * GEMM_TILE, j0 = (int)(blockIdx.x / tiles_m) * GEMM_TILE;
    const float* A = p.a + blockIdx.y * p.stride_a;
    const float* B = p.b + blockIdx.y * p.stride_b;
    float* C = p.c + blockIdx.y * p.stride_c;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads: blockDim.x == BLOCK == 256
    float acc[4][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += GEMM_DEPTH) {
        stage_tiles<GEMM_DEPTH, GEMM_TILE + 1>(p, A, B, i0, j0, k0, sa, sb);
        __syncthreads();
        for (int kk = 0; kk < GEMM_DEPTH; ++kk) {
            float av[4], bv[4];
            for (int u = 0; u < 4; ++u) {
                av[u] = sa[kk][tx + 16 * u];
                bv[u] = sb[kk][ty + 16 * u];
            }
            for (int u = 0; u < 4; ++u)
                for (int v = 0; v < 4; ++v) acc[u][v] += av[u] * bv[v];
        }
        __syncthreads();
    }
    for (int v = 0; v < 4; ++v)
        for (int u = 0; u < 4; ++u) {
            const int i = i0 + tx + 16 * u, j = j0 + ty + 16 * v;
            if (i < p.m && j < p.n) {
                float* out = C + i + (long long)j * p.ldc;
                *out = p.alpha * acc[u][v] + (p.beta != 0.f ? p.beta * *out : 0.f);
            }
        }
}

// lanton_noise_gemm on tensor cores: the same product, tiles, gate and launch shape, with each
// warp's 32 x 16 share of the 64 x 64 C tile computed by mma.sync m16n8k8 with TF32 operands
// (10-bit mantissa, rounded to nearest) and f32 accumulation. Ampere and newer; selected by the
// host only there (src/cuda/plan.rs noise_gemm_kernel), the body is empty for older targets.
#define TC_DEPTH 32
#define TC_PAD (GEMM_TILE + 4)  // row stride 68 words: a warp's fragment reads hit 32 different banks
__device__ __forceinline__ u32 to_tf32(float x) {
#ifdef LANTON_EMULATE
    return emu_to_tf32(x);
#else
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#endif
}
// d += a b for one warp's 16 x 8 tile, k = 8 (PTX ISA, mma.m16n8k8 .tf32). With lane = 4 g + q:
// a0 (g, q), a1 (g + 8, q), a2 (g, q + 4), a3 (g + 8, q + 4) of A (16 x 8); b0 (q, g), b1 (q + 4, g)
// of B (8 x 8); d0 (g, 2q), d1 (g, 2q + 1), d2 (g + 8, 2q), d3 (g + 8, 2q + 1) of D.
__device__ __forceinline__ void mma_tf32(float d[4], const u32 a[4], const u32 b[2]) {
#ifdef LANTON_EMULATE
    emu_mma_m16n8k8_tf32(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

extern "C" __global__ void lanton_noise_gemm_tc(GemmArgs p) {
#if defined(LANTON_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
    if (!p.due[p.due_first + blockIdx.y]) return;  // uniform across the block: no thread waits at a barrier
    __shared__ float sa[TC_DEPTH][TC_PAD], sb[TC_DEPTH][TC_PAD];
    const int tiles_m = (p.m + GEMM_TILE - 1) / GEMM_TILE;
    const int i0 = (int)(blockIdx.x % tiles_m) * GEMM_TILE, j0 = (int)(blockIdx.x / tiles_m) * GEMM_TILE;
    const float* A = p.a + blockIdx.y * p.stride_a;
    const float* B = p.b + blockIdx.y * p.stride_b;
    float* C = p.c + blockIdx.y * p.stride_c;
    // 8 warps as 2 (rows) x 4 (columns) of 32 x 16 outputs: 2 x 2 mma tiles of 16 x 8 each.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gr = lane >> 2, q = lane & 3;
    const int wm = (warp & 1) * 32, wn = (warp >> 1) * 16;
    float acc[2][2][4] = {};
    for (int k0 = 0; k0 < p.k; k0 += TC_DEPTH) {
        stage_tiles<TC_DEPTH, TC_PAD>(p, A, B, i0, j0, k0, sa, sb);
        __syncthreads();
        for (int kk = 0; kk < TC_DEPTH; kk += 8) {
            u32 a[2][4], b[2][2];
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm + 16 * mi + gr;
                a[mi][0] = to_tf32(sa[kk + q][r]);
                a[mi][1] = to_tf32(sa[kk + q][r + 8]);
                a[mi][2] = to_tf32(sa[kk + q + 4][r]);
                a[mi][3] = to_tf32(sa[kk + q + 4][r + 8]);
            }
            for (int ni = 0; ni < 2; ++ni) {
                const int c = wn + 8 * ni + gr;
                b[ni][0] = to_tf32(sb[kk + q][c]);
                b[ni][1] = to_tf32(sb[kk + q + 4][c]);
            }
            for (int mi = 0; mi < 2; ++mi)
                for (int ni = 0; ni < 2; ++ni) mma_tf32(acc[mi][ni], a[mi], b[ni]);
        }
        __syncthreads();
    }
    for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 2; ++ni)
            for (int e = 0; e < 4; ++e) {
                const int i = i0 + wm + 16 * mi + gr + (e >= 2 ? 8 : 0), j = j0 + wn + 8 * ni + 2 * q + (e & 1);
                if (i < p.m && j < p.n) {
                    float* out = C + i + (long long)j * p.ldc;
                    *out = p.alpha * acc[mi][ni][e] + (p.beta != 0.f ? p.beta * *out : 0.f);
                }
            }
#endif
}

// grid: the batch's blocks (layers x chunks per leaf), block BLOCK.
extern "C" __global__ void lanton_apply(LeafBatch batch, GroupArgs g) {
    const Where w = locate(batch);
    const LeafArgs& a = batch.leaf[w.j];
    const int l = w.local / w.chunks, chunk = w.local % w.chunks;
    const double* acc = g.acc + (long long)(a.group_layer + l) * ACC_N;
    const bool finite = acc[ACC_NONFINITE] == 0.0;
    const float lr = g.hyper[0], b1 = g.hyper[1], wd = g.hyper[3];
    const double ref = g.reference[0], count = g.reference[1];
    float r = 1.f;
    if (g.noise_adaptive && a.valid[l] > 0.5f && count > 0 && isfinite(ref) && ref > 0)
    {
        const double q = alpha_of(a.noise[l], g.ratio_eps) / ref;
        const double shaped = fmax(g.ratio_power == 1.f ? q : pow(q, (double)g.ratio_power), (double)g.ratio_floor);
        r = (float)fmin(shaped, (double)g.ratio_cap);
    }
    if (chunk == 0 && threadIdx.x == 0) {  // once per layer (lanton_apply runs once per step)
        a.ratio[l] = r;
        if (!finite && a.skipped[l] < 0x7fffffff) a.skipped[l] += 1;
    }
    const long long base = (long long)l * a.layer_len;
    if (!finite) {  // skipped: zero update, X kept
        if (!a.in_place)
            for (long long i = chunk * (long long)blockDim.x + threadIdx.x; i < a.layer_len; i += (long long)w.chunks * blockDim.x)
                store(a.out, a.dt_param, base + i, 0.f);
        return;
    }
    const float s = g.hyper[4] * a.shape_scale;  // update_scale
    if (g.kind == KIND_ADAM) {  // src/step AdamRule: nu <- b2 nu + (1 - b2) G^2, NAdamW's D
        const int t = *g.step;
        const float b2 = g.hyper[2];
        // src/step adam_factors: the bias corrections as three factors, in f64, rounded to f32.
        const double bc1 = 1.0 - pow((double)b1, (double)t), bc2 = 1.0 - pow((double)b2, (double)t);
        const float mu_f = (float)(g.nesterov ? (double)b1 / (1.0 - pow((double)b1, (double)t + 1.0)) : 1.0 / bc1);
        const float grad_f = g.nesterov ? (float)((1.0 - (double)b1) / bc1) : 0.f;
        const float nu_f = (float)(1.0 / bc2);
        for (long long i = chunk * (long long)blockDim.x + threadIdx.x; i < a.layer_len; i += (long long)w.chunks * blockDim.x) {
            const float gr = load(a.grad, a.dt_grad, base + i);
            const float mu = load(a.momentum, a.dt_mom, base + i);  // already the new momentum
            const float nu = b2 * load(a.prev_grad, a.dt_prev, base + i) + (1.f - b2) * (gr * gr);
            store(a.prev_grad, a.dt_prev, base + i, nu);
            const float m = mu * mu_f + gr * grad_f;
            const float d = m / (sqrtf(nu * nu_f + g.adam_eps_root) + g.adam_eps);
            float x = load(a.param, a.dt_param, base + i);
            float delta = -lr * (wd * x + r * (s * d));  // step::Write's order
            store(a.out, a.dt_param, base + i, a.in_place ? x + delta : delta);
        }
        return;
    }
    float inv_rms = 0.f;
    if (g.kind == KIND_VECTOR) {
        float rms = (float)sqrt(acc[ACC_V2]) / sqrtf((float)a.layer_len);
        inv_rms = 1.f / (rms + g.vector_eps);
    }
    for (long long i = chunk * (long long)blockDim.x + threadIdx.x; i < a.layer_len; i += (long long)w.chunks * blockDim.x) {
        float d;
        if (g.kind == KIND_HIDDEN) {
            d = load(a.ns_out, a.dt_ns, base + i);
        } else {
            float v = load(a.momentum, a.dt_mom, base + i);  // already the new momentum
            if (g.nesterov) v = b1 * v + (1.f - b1) * load(a.grad, a.dt_grad, base + i);
            d = g.kind == KIND_EMBED ? (v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f)) : v * inv_rms;
        }
        float x = load(a.param, a.dt_param, base + i);
        float delta = -lr * (wd * x + r * (s * d));  // step::Write's order
        store(a.out, a.dt_param, base + i, a.in_place ? x + delta : delta);
    }
}
