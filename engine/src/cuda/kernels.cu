// Switchyard's CUDA kernels, compiled by NVRTC when a device is opened (no nvcc at build time).
//
// No headers: bf16 values travel as `unsigned short` bit patterns (round to nearest even on the
// way in), so neither cuda_bf16.h nor a toolkit include path is needed. Each kernel states the
// CPU op it mirrors; engine/tests/gpu.rs checks each against that op.

#define WARP 32
// No math.h: +∞ from its bit pattern.
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 floats. Ends with a barrier, so `shared` may be reused right after.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    v = warp_max(v);
    __syncthreads();
    return v;
}

// ---- routed experts (cuda/experts.rs; CPU: model/experts.rs) ----

// out[r, :] = x[rows[r], :] for r < n; x and out are bf16 [*, h].
extern "C" __global__ void gather_rows_bf16(const unsigned short* x, const int* rows,
                                            unsigned short* out, int n, int h) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * h) {
        long r = i / h, c = i % h;
        out[i] = x[(long)rows[r] * h + c];
    }
}

// The gated activation of one element: silu(g) · u, or (gelu) GeGLU with the tanh GELU
// (CPU: cpu::ops::silu_mul_inplace / gelu_tanh_mul_inplace, same operation order).
__device__ __forceinline__ float glu(float g, float u, int gelu) {
    if (gelu) return 0.5f * g * (1.0f + tanhf(0.7978846f * (g + 0.044715f * g * g * g))) * u;
    return g / (1.0f + expf(-g)) * u;
}

// out[r, c] = glu(gu[r, c], gu[r, inter + c]) as bf16; gu is f32 [n, 2 * inter] (gate | up).
extern "C" __global__ void glu_bf16(const float* gu, unsigned short* out, int n, int inter,
                                    int gelu) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * inter) {
        long r = i / inter, c = i % inter;
        out[i] = f32_to_bf16(glu(gu[r * 2 * inter + c], gu[r * 2 * inter + inter + c], gelu));
    }
}

// As glu_bf16, kept in f32 (for f32 weights, whose GEMMs take f32 activations).
extern "C" __global__ void glu_f32(const float* gu, float* out, int n, int inter, int gelu) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * inter) {
        long r = i / inter, c = i % inter;
        out[i] = glu(gu[r * 2 * inter + c], gu[r * 2 * inter + inter + c], gelu);
    }
}

// out[t, c] = Σ_{j in offsets[t] .. offsets[t+1]} w[idx[j]] · y[idx[j], c]: each token sums its
// experts' rows in a fixed order, so the result is deterministic and needs no atomics.
extern "C" __global__ void combine_rows(const float* y, const int* offsets, const int* idx,
                                        const float* w, float* out, int tokens, int h) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)tokens * h) {
        long t = i / h, c = i % h;
        float acc = 0.0f;
        for (int j = offsets[t]; j < offsets[t + 1]; j++) {
            int r = idx[j];
            acc += w[r] * y[(long)r * h + c];
        }
        out[i] = acc;
    }
}

// ---- norms, positions, embeddings (CPU: cpu/ops.rs, model/rope.rs) ----

// x[r, :] = x[r, :] · rsqrt(mean(x[r, :]²) + eps) · weight, in place; one block per row.
extern "C" __global__ void rms_norm_f32(float* x, const float* weight, int dim, float eps) {
    __shared__ float shared[32];
    float* row = x + (long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += row[c] * row[c];
    ss = block_sum(ss, shared);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) row[c] = row[c] * inv * weight[c];
}

// Rotates dims [offset, offset + 2·half) of every head of x: [tokens, heads, stride], in place.
// Pair i turns by positions[t] · inv_freq[i]; cos and sin are scaled by `factor` (YaRN).
// interleaved: pairs (2i, 2i+1) as DeepSeek stores them; otherwise rotate-half (i, i + half).
extern "C" __global__ void rope_f32(float* x, const int* positions, const float* inv_freq,
                                    int tokens, int heads, int stride, int offset, int half,
                                    float factor, int interleaved) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)tokens * heads * half) return;
    int p = (int)(i % half);
    long th = i / half;
    int t = (int)(th / heads);
    float* v = x + th * stride + offset;
    float s, c;
    sincosf((float)positions[t] * inv_freq[p], &s, &c);
    c *= factor;
    s *= factor;
    int a = interleaved ? 2 * p : p, b = interleaved ? 2 * p + 1 : p + half;
    float xa = v[a], xb = v[b];
    v[a] = xa * c - xb * s;
    v[b] = xb * c + xa * s;
}

// out[r, :] = table[ids[r], :] · scale as f32; table is bf16 [vocab, h] (ids checked < vocab).
extern "C" __global__ void embed_bf16(const unsigned short* table, const int* ids, float* out,
                                      int n, int h, float scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)n * h) {
        long r = i / h, c = i % h;
        out[i] = bf16_to_f32(table[(long)ids[r] * h + c]) * scale;
    }
}

// ---- the MoE gate (CPU: model/gate.rs) ----

#define MAX_EXPERTS 512
#define MAX_GROUPS 64

// The index of the largest `v[i]` not yet taken, the lower index on ties; -1 if none.
__device__ int best_of(const float* v, const unsigned char* taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++) {
        if (taken[i]) continue;
        if (best < 0 || v[i] > v[best]) best = i;
    }
    return best;
}

// One thread per token: scores (sigmoid, or softmax over the experts), the selection scores
// (plus the correction bias when has_bias), group-limited selection (group_mode 1: a group's best
// score, as DeepSeek-V2; 2: the sum of its best two, as DeepSeek-V3) keeping `topk_group`
// groups, then the k best experts, best first. Weights are the unbiased scores, renormalised
// when `norm` (and k > 1), times `scaling`. logits: [tokens, experts]; ids, weights: [tokens, k].
extern "C" __global__ void route_topk(const float* logits, const float* bias, int has_bias,
                                      int tokens,
                                      int experts, int k, int softmax, int group_mode,
                                      int n_group, int topk_group, int norm, float scaling,
                                      int* ids, float* weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    float scores[MAX_EXPERTS], choice[MAX_EXPERTS];
    unsigned char taken[MAX_EXPERTS];
    const float* l = logits + (long)t * experts;
    if (softmax) {
        float m = -INFINITY, sum = 0.0f;
        for (int e = 0; e < experts; e++) m = fmaxf(m, l[e]);
        for (int e = 0; e < experts; e++) {
            scores[e] = expf(l[e] - m);
            sum += scores[e];
        }
        float inv = 1.0f / sum;
        for (int e = 0; e < experts; e++) scores[e] *= inv;
    } else {
        for (int e = 0; e < experts; e++) scores[e] = 1.0f / (1.0f + expf(-l[e]));
    }
    for (int e = 0; e < experts; e++) {
        choice[e] = has_bias ? scores[e] + bias[e] : scores[e];
        taken[e] = 0;
    }
    if (group_mode != 0 && n_group > 1) {
        int per = experts / n_group;
        float gscore[MAX_GROUPS];
        unsigned char gtaken[MAX_GROUPS], keep[MAX_GROUPS];
        for (int g = 0; g < n_group; g++) {
            float a = -INFINITY, b = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                float v = choice[e];
                if (v > a) {
                    b = a;
                    a = v;
                } else if (v > b) {
                    b = v;
                }
            }
            gscore[g] = group_mode == 2 ? a + b : a;
            gtaken[g] = 0;
            keep[g] = 0;
        }
        for (int j = 0; j < topk_group; j++) {
            int g = best_of(gscore, gtaken, n_group);
            if (g < 0) break;
            gtaken[g] = 1;
            keep[g] = 1;
        }
        // Dropped groups can never be chosen.
        for (int e = 0; e < experts; e++)
            if (!keep[e / per]) choice[e] = -INFINITY;
    }
    int* out_ids = ids + (long)t * k;
    float* out_w = weights + (long)t * k;
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
        int e = best_of(choice, taken, experts);
        taken[e] = 1;
        out_ids[j] = e;
        out_w[j] = scores[e];
        sum += scores[e];
    }
    float denom = (norm && k > 1) ? sum + 1e-20f : 1.0f;
    for (int j = 0; j < k; j++) out_w[j] = out_w[j] / denom * scaling;
}

// ---- sampling helpers (CPU: sampling.rs) ----

// ids[r] = the index of the largest logits[r, :], the first on ties; one block per row.
extern "C" __global__ void argmax_rows(const float* logits, int vocab, int* ids) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* row = logits + (long)blockIdx.x * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > bv || (bi == 0x7fffffff && !(v != v))) {
            bv = v;
            bi = i;
        }
    }
    for (int o = WARP / 2; o > 0; o /= 2) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < warps ? sv[lane] : -INFINITY;
        bi = lane < warps ? si[lane] : 0x7fffffff;
        for (int o = WARP / 2; o > 0; o /= 2) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) ids[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

// probs[r, :] = softmax(logits[r, :] / temperature), in place; one block per row.
extern "C" __global__ void softmax_rows(float* x, int vocab, float temperature) {
    __shared__ float shared[32];
    float* row = x + (long)blockIdx.x * vocab;
    float inv_t = 1.0f / temperature;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row[i] * inv_t);
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float e = expf(row[i] * inv_t - m);
        row[i] = e;
        sum += e;
    }
    sum = block_sum(sum, shared);
    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) row[i] *= inv;
}

// ---- MLA decode over the latent cache (CPU: MlaAttention::attend_absorbed) ----

// One block per (head, sequence), one query token per sequence, weight-absorbed form:
//   score[l] = (q_abs · c[l] + q_pe · k_pe[l]) · scale over the sequence's ctx_lens[s] rows,
//   out     = Σ_l softmax(score)[l] · c[l].
// q_abs: [seqs, heads, rank]; q_pe: [seqs, heads, rope]; cache: [pool rows, rank + rope], each
// row the latent then the roped key, row l of sequence s at
// tables[s, l / block] · block + l % block; scratch: [seqs, heads, max_ctx]; out: [seqs, heads,
// rank]. A warp per cached row for the scores (lanes over the row, coalesced), then threads
// over the latent dims for the weighted sum.
extern "C" __global__ void mla_decode(const float* q_abs, const float* q_pe, const float* cache,
                                      const int* tables, const int* ctx_lens, float* scratch,
                                      float* out, int heads, int rank, int rope, int block,
                                      int max_blocks, int max_ctx, float scale) {
    __shared__ float shared[32];
    int h = blockIdx.x, s = blockIdx.y;
    int ctx = ctx_lens[s];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    long qh = (long)s * heads + h;
    const float* qa = q_abs + qh * rank;
    const float* qr = q_pe + qh * rope;
    const int* table = tables + (long)s * max_blocks;
    float* sc = scratch + qh * max_ctx;
    int width = rank + rope;
    for (int l = warp; l < ctx; l += warps) {
        const float* row = cache + ((long)table[l / block] * block + l % block) * width;
        float d = 0.0f;
        for (int c = lane; c < rank; c += WARP) d += qa[c] * row[c];
        for (int c = lane; c < rope; c += WARP) d += qr[c] * row[rank + c];
        d = warp_sum(d);
        if (lane == 0) sc[l] = d * scale;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int l = threadIdx.x; l < ctx; l += blockDim.x) m = fmaxf(m, sc[l]);
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int l = threadIdx.x; l < ctx; l += blockDim.x) {
        float e = expf(sc[l] - m);
        sc[l] = e;
        sum += e;
    }
    sum = block_sum(sum, shared);
    float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < rank; c += blockDim.x) {
        float acc = 0.0f;
        for (int l = 0; l < ctx; l++) {
            const float* row = cache + ((long)table[l / block] * block + l % block) * width;
            acc += sc[l] * inv * row[c];
        }
        out[qh * rank + c] = acc;
    }
}
