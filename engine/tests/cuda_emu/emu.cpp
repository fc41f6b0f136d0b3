// Runs Switchyard's CUDA kernels (engine/src/cuda/kernels.cu) on the CPU, so CI checks what
// they compute without a GPU: engine/tests/kernels_on_cpu.rs builds this file with g++ into a
// shared library and compares every kernel with the CPU op it mirrors.
//
// The execution model is CUDA's, with real threads: a launch runs its blocks one after
// another, each block as blockDim.x OS threads. `__syncthreads` is a barrier of the block,
// `__shfl_xor_sync` an exchange through a barrier of the warp's 32 threads, and `__shared__`
// variables are function statics — shared by the block's threads, and safe to reuse because
// only one block (of one launch) runs at a time. The kernels use nothing else of CUDA.

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef INFINITY  // kernels.cu defines its own from a bit pattern

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct Warp {
    std::barrier<> sync{32};
    uint32_t slots[32];
};
static std::unique_ptr<std::barrier<>> block_sync;
static std::vector<std::unique_ptr<Warp>> warps;

static void __syncthreads() { block_sync->arrive_and_wait(); }

template <class T>
static T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    Warp& w = *warps[threadIdx.x / 32];
    unsigned lane = threadIdx.x % 32;
    std::memcpy(&w.slots[lane], &v, 4);
    w.sync.arrive_and_wait();
    uint32_t got = w.slots[lane ^ (unsigned)offset];
    w.sync.arrive_and_wait();
    T r;
    std::memcpy(&r, &got, 4);
    return r;
}

static float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
static unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

#include "../../src/cuda/kernels.cu"

// One launch at a time (one mutex for every kernel): the barriers and `__shared__` statics
// belong to the running block.
static std::mutex one_launch_at_a_time;

template <class... Args>
static void launch(void (*kernel)(Args...), unsigned gx, unsigned gy, unsigned bx, Args... args) {
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    for (unsigned y = 0; y < gy; y++) {
        for (unsigned x = 0; x < gx; x++) {
            block_sync = std::make_unique<std::barrier<>>(bx);
            warps.clear();
            for (unsigned w = 0; w < (bx + 31) / 32; w++) warps.push_back(std::make_unique<Warp>());
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < bx; t++) {
                threads.emplace_back([=] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {x, y, 0};
                    blockDim = {bx, 1, 1};
                    gridDim = {gx, gy, 1};
                    kernel(args...);
                });
            }
            for (auto& th : threads) th.join();
        }
    }
}

// One exported launcher per kernel: grid (gx, gy), blockDim.x = bx, then the kernel's arguments.
#define EMU(name, params, args)                                                     \
    extern "C" void emu_##name(unsigned gx, unsigned gy, unsigned bx, params) { \
        launch(name, gx, gy, bx, args);                                             \
    }
#define P(...) __VA_ARGS__

EMU(gather_rows_bf16, P(const unsigned short* x, const int* rows, unsigned short* out, int n, int h),
    P(x, rows, out, n, h))
EMU(glu_bf16, P(const float* gu, unsigned short* out, int n, int inter, int gelu),
    P(gu, out, n, inter, gelu))
EMU(glu_f32, P(const float* gu, float* out, int n, int inter, int gelu), P(gu, out, n, inter, gelu))
EMU(combine_rows,
    P(const float* y, const int* offsets, const int* idx, const float* w, float* out, int tokens, int h),
    P(y, offsets, idx, w, out, tokens, h))
EMU(rms_norm_f32, P(float* x, const float* weight, int dim, float eps), P(x, weight, dim, eps))
EMU(rope_f32,
    P(float* x, const int* positions, const float* inv_freq, int tokens, int heads, int stride,
      int offset, int half, float factor, int interleaved),
    P(x, positions, inv_freq, tokens, heads, stride, offset, half, factor, interleaved))
EMU(embed_bf16, P(const unsigned short* table, const int* ids, float* out, int n, int h, float scale),
    P(table, ids, out, n, h, scale))
EMU(route_topk,
    P(const float* logits, const float* bias, int has_bias, int tokens, int experts, int k,
      int softmax, int group_mode, int n_group, int topk_group, int norm, float scaling, int* ids,
      float* weights),
    P(logits, bias, has_bias, tokens, experts, k, softmax, group_mode, n_group, topk_group, norm,
      scaling, ids, weights))
EMU(argmax_rows, P(const float* logits, int vocab, int* ids), P(logits, vocab, ids))
EMU(softmax_rows, P(float* x, int vocab, float temperature), P(x, vocab, temperature))
EMU(mla_decode,
    P(const float* q_abs, const float* q_pe, const float* cache, const int* tables,
      const int* ctx_lens, float* scratch, float* out, int heads, int rank, int rope, int block,
      int max_blocks, int max_ctx, float scale),
    P(q_abs, q_pe, cache, tables, ctx_lens, scratch, out, heads, rank, rope, block, max_blocks,
      max_ctx, scale))
