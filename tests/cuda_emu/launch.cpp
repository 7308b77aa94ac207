// The emulated cuLaunchKernel: kernel name, grid and the argument pointers, as the driver gets them.
#include "emu.h"
#include "../../src/cuda/kernels.cu"
#include <string>

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned block, void** p, int reverse_blocks) {
    // One launch at a time: the emulated grid state is global (tests run on several threads).
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> guard(one_at_a_time);
    emu_reverse_blocks = reverse_blocks != 0;
    std::string k(name);
    if (k == "lanton_stats") emu_run(gx, gy, block, [&] { lanton_stats(*(LeafBatch*)p[0], *(GroupArgs*)p[1]); });
    else if (k == "lanton_sum_chunks")
        emu_run(gx, gy, block, [&] { lanton_sum_chunks(*(GroupArgs*)p[0], *(int*)p[1], *(int*)p[2], *(int*)p[3]); });
    else if (k == "lanton_prepare") emu_run(gx, gy, block, [&] { lanton_prepare(*(LeafBatch*)p[0], *(GroupArgs*)p[1]); });
    else if (k == "lanton_dot") emu_run(gx, gy, block, [&] { lanton_dot(*(LeafBatch*)p[0], *(GroupArgs*)p[1]); });
    else if (k == "lanton_track") emu_run(gx, gy, block, [&] { lanton_track(*(LeafBatch*)p[0], *(GroupArgs*)p[1]); });
    else if (k == "lanton_apply") emu_run(gx, gy, block, [&] { lanton_apply(*(LeafBatch*)p[0], *(GroupArgs*)p[1]); });
    else if (k == "lanton_reference") emu_run(gx, gy, block, [&] { lanton_reference(*(GroupArgs*)p[0], *(int*)p[1]); });
    else if (k == "lanton_affine_diag")
        emu_run(gx, gy, block, [&] {
            lanton_affine_diag(*(const void**)p[0], *(void**)p[1], *(int*)p[2], *(int*)p[3], *(long long*)p[4],
                               *(float*)p[5], *(float*)p[6], *(const int**)p[7], *(int*)p[8]);
        });
    else if (k == "lanton_noise_gemm")
        emu_run(gx, gy, block, [&] { lanton_noise_gemm(*(GemmArgs*)p[0]); });
    else if (k == "lanton_noise_gemm_tc")
        emu_run(gx, gy, block, [&] { lanton_noise_gemm_tc(*(GemmArgs*)p[0]); });
    else return 1;
    return 0;
}
