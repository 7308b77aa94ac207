// Host emulation of the CUDA features src/cuda/kernels.cu uses, so its kernels can run on a
// CPU in tests (tests/cuda_emulated.rs): each block runs with one fiber (ucontext) per CUDA
// thread, all on the calling OS thread; __syncthreads is a block barrier, warp shuffles go
// through a per-warp barrier, and a fiber that waits at a barrier yields to the next one.
// Blocks run one after another, first to last or last to first (the kernels never rely on
// inter-block order). Fibers, not OS
// threads: a barrier then costs two context switches per thread instead of waking hundreds of
// threads on a 2-core machine (the suite took minutes with threads).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <ucontext.h>
#include <vector>

#define LANTON_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
// The launch in progress (one at a time: launch.cpp holds a lock), and the running fiber's
// coordinates; the scheduler sets threadIdx before it switches to a fiber.
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// Cooperative fibers: the scheduler (emu_run) resumes each unfinished fiber in turn; a fiber
// runs until it waits at a barrier (emu_yield) or ends.
struct emu_fiber { ucontext_t ctx; bool done; };
inline ucontext_t emu_scheduler;
inline std::vector<emu_fiber> emu_fibers;
inline unsigned emu_current;
inline void emu_yield() { swapcontext(&emu_fibers[emu_current].ctx, &emu_scheduler); }

// A barrier of n fibers: the last to arrive opens it (a new generation) and goes on; the
// others yield until they see the generation change.
struct emu_barrier {
    unsigned n, arrived = 0;
    unsigned long generation = 0;
    void arrive_and_wait() {
        const unsigned long mine = generation;
        if (++arrived == n) {
            arrived = 0;
            ++generation;
            return;
        }
        while (generation == mine) emu_yield();
    }
};
inline emu_barrier emu_block_barrier;
inline std::vector<emu_barrier> emu_warp_barriers;
inline double emu_shfl[1024];

inline void __syncthreads() { emu_block_barrier.arrive_and_wait(); }
template <class T> T __shfl_down_sync(unsigned, T v, int o) {
    auto& bar = emu_warp_barriers[threadIdx.x / 32];
    emu_shfl[threadIdx.x] = (double)v;
    bar.arrive_and_wait();
    unsigned lane = threadIdx.x & 31, src = threadIdx.x + o;
    T r = (lane + o < 32 && src < blockDim.x) ? (T)emu_shfl[src] : v;
    bar.arrive_and_wait();
    return r;
}
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long u) { double d; std::memcpy(&d, &u, 8); return d; }
using std::isfinite;
inline float f16_to_f32(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short f32_to_f16(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

// cvt.rna.tf32.f32: round the magnitude to 10 mantissa bits, ties away from zero (the 13 low bits
// then zero); NaN stays NaN.
inline uint32_t emu_to_tf32(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc00000u;
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
    return u & 0xffffe000u;
}
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += a b, with the PTX ISA's fragment layout
// (lane = 4 g + q): A(row, k) in register (row >= 8) + 2 (k >= 4) of lane 4 (row % 8) + k % 4,
// B(k, col) in register (k >= 4) of lane 4 col + k % 4, D(g + 8 (e >= 2), 2 q + (e & 1)) in d[e].
// Products of TF32 values are exact in f32; the sum runs in k order (the hardware's order and
// rounding of the sum are its own: tests allow for that).
inline uint32_t emu_mma_a[1024][4], emu_mma_b[1024][2];
inline void emu_mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    auto& bar = emu_warp_barriers[threadIdx.x / 32];
    const unsigned base = threadIdx.x & ~31u, lane = threadIdx.x & 31u, g = lane >> 2, q = lane & 3u;
    for (int i = 0; i < 4; ++i) emu_mma_a[threadIdx.x][i] = a[i];
    for (int i = 0; i < 2; ++i) emu_mma_b[threadIdx.x][i] = b[i];
    bar.arrive_and_wait();
    auto A = [&](unsigned row, unsigned k) { return __uint_as_float(emu_mma_a[base + 4 * (row % 8) + k % 4][(row >= 8) + 2 * (k >= 4)]); };
    auto B = [&](unsigned k, unsigned col) { return __uint_as_float(emu_mma_b[base + 4 * col + k % 4][k >= 4]); };
    float out[4];
    for (unsigned e = 0; e < 4; ++e) {
        const unsigned row = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
        float s = d[e];
        for (unsigned k = 0; k < 8; ++k) s += A(row, k) * B(k, col);
        out[e] = s;
    }
    bar.arrive_and_wait();  // every lane has read the warp's fragments before any lane stores new ones
    for (unsigned e = 0; e < 4; ++e) d[e] = out[e];
}

// Runs `body` for every block of the grid with `block` threads each. The block's fibers are
// started once per launch and walk the blocks together (a barrier between blocks keeps them one
// at a time, as the __shared__ statics require).
inline void (*emu_entry)(void*);
inline void* emu_entry_arg;
inline void emu_fiber_main() {
    emu_entry(emu_entry_arg);
    emu_fibers[emu_current].done = true;  // uc_link returns to the scheduler
}

// Blocks in reverse order (last first): a GPU runs blocks in any order, so no result may depend
// on it (the test of deterministic reductions runs each launch both ways).
inline bool emu_reverse_blocks = false;

template <class F> void emu_run(unsigned gx, unsigned gy, unsigned block, F body) {
    constexpr size_t stack_bytes = 256 * 1024;  // the kernels' locals are a few hundred bytes
    static std::vector<std::unique_ptr<char[]>> stacks;  // kept across launches
    while (stacks.size() < block) stacks.push_back(std::make_unique<char[]>(stack_bytes));
    blockDim = {block, 1, 1};
    gridDim = {gx, gy, 1};
    emu_block_barrier = emu_barrier{block};
    emu_warp_barriers.clear();
    for (unsigned w = 0; w < (block + 31) / 32; ++w) emu_warp_barriers.push_back(emu_barrier{std::min(32u, block - 32 * w)});
    emu_barrier between_blocks{block};
    auto walk = [&] {
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                const unsigned bx = emu_reverse_blocks ? gx - 1 - x : x, by = emu_reverse_blocks ? gy - 1 - y : y;
                blockIdx = {bx, by, 1};
                body();
                between_blocks.arrive_and_wait();
            }
    };
    emu_entry = [](void* w) { (*static_cast<decltype(walk)*>(w))(); };
    emu_entry_arg = &walk;
    emu_fibers.assign(block, emu_fiber{});
    for (unsigned t = 0; t < block; ++t) {
        auto& f = emu_fibers[t];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[t].get();
        f.ctx.uc_stack.ss_size = stack_bytes;
        f.ctx.uc_link = &emu_scheduler;
        makecontext(&f.ctx, emu_fiber_main, 0);
    }
    for (unsigned left = block; left > 0;)
        for (unsigned t = 0; t < block; ++t) {
            if (emu_fibers[t].done) continue;
            emu_current = t;
            // blockIdx is the same for every fiber at a time (they walk the blocks together).
            threadIdx = {t, 0, 0};
            swapcontext(&emu_scheduler, &emu_fibers[t].ctx);
            if (emu_fibers[t].done) --left;
        }
}
