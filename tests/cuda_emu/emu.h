// Host emulation of the CUDA features src/cuda/kernels.cu uses, so its kernels can run on a
// CPU in tests (tests/cuda_emulated.rs): each block runs with one OS thread per CUDA thread,
// __syncthreads is a block barrier, warp shuffles go through a per-warp barrier, atomics take a
// lock. Blocks run one after another (the kernels never rely on inter-block order).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define LANTON_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline std::unique_ptr<std::barrier<>> emu_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline double emu_shfl[1024];
inline std::mutex emu_atomic_lock;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <class T> T __shfl_down_sync(unsigned, T v, int o) {
    auto& bar = *emu_warp_barriers[threadIdx.x / 32];
    emu_shfl[threadIdx.x] = (double)v;
    bar.arrive_and_wait();
    unsigned lane = threadIdx.x & 31, src = threadIdx.x + o;
    T r = (lane + o < 32 && src < blockDim.x) ? (T)emu_shfl[src] : v;
    bar.arrive_and_wait();
    return r;
}
inline double atomicAdd(double* p, double v) {
    std::lock_guard<std::mutex> g(emu_atomic_lock);
    double old = *p;
    *p = old + v;
    return old;
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
    auto& bar = *emu_warp_barriers[threadIdx.x / 32];
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

// Runs `body` for every block of the grid with `block` threads each. The block's threads are
// started once per launch and walk the blocks together (a barrier between blocks keeps them one
// at a time, as the __shared__ statics require).
template <class F> void emu_run(unsigned gx, unsigned gy, unsigned block, F body) {
    blockDim = {block, 1, 1};
    gridDim = {gx, gy, 1};
    emu_block_barrier = std::make_unique<std::barrier<>>(block);
    emu_warp_barriers.clear();
    for (unsigned w = 0; w < (block + 31) / 32; ++w)
        emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
    std::barrier<> between_blocks(block);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned by = 0; by < gy; ++by)
                for (unsigned bx = 0; bx < gx; ++bx) {
                    blockIdx = {bx, by, 1};
                    body();
                    between_blocks.arrive_and_wait();
                }
        });
    for (auto& t : threads) t.join();
}
