// Mixture-of-Experts dispatch and combine for moz-lab's ExpertLinear on the GPU. The per-expert
// GEMMs between them go through cuBLAS on contiguous row blocks (tokens sorted by expert).
// Slots are token-expert assignments sorted by expert: slot s reads token slot_tokens[s]; the
// k slots of token t are back[t*k .. t*k+k]. f32 arithmetic; storage f32 or bf16.

// bf16_t, ld, st, sigmoidf_: kernels/common.cuh (prepended at compile time).

// A slot that reads no token: the padding rows that round each expert's rows up to a multiple
// of the device routing's granule (a padding slot has no gate pick either).
#define NO_TOKEN 0xffffffffu

// The row kernels below take one block per row. When the row length is a multiple of 8 and
// every buffer is 16-byte aligned they move 8 elements per access (ld8 / st8), with the same
// arithmetic in the same order per element, so both paths give the same values (but for the
// summation order of combine_bwd's dot product).

// xs[s, :] = x[slot_tokens[s], :]  (one block row per slot, threads over the row).
template <typename T>
__device__ void gather(const T *x, const unsigned *slot_tokens, int slots, int d, T *xs) {
    const long s = blockIdx.x;
    if (s >= slots) return;
    const unsigned tok = slot_tokens[s];
    const bool vec = d % 8 == 0 && aligned16(x) && aligned16(xs);
    if (tok == NO_TOKEN) {  // a padding row: zeros, so it adds nothing to a weight gradient
        for (int j = threadIdx.x; j < d; j += blockDim.x) xs[s * d + j] = T(0);
        return;
    }
    const long src = (long)tok * d;
    if (vec) {  // a plain copy: 16-byte units of the row (8 bf16 or 4 f32 elements each)
        const uint4 *from = reinterpret_cast<const uint4 *>(x + src);
        uint4 *to = reinterpret_cast<uint4 *>(xs + s * d);
        const int units = d * (int)sizeof(T) / 16;
        for (int u = threadIdx.x; u < units; u += blockDim.x) to[u] = from[u];
        return;
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) xs[s * d + j] = x[src + j];
}

// out[t, :] = sum_j gate(back[t*k+j]) * rows[back[t*k+j], :]; gate = 1 when gates is null.
template <typename T>
__device__ void combine(const T *rows, const T *gates, const unsigned *back, int tokens, int k,
                        int d, T *out) {
    const long t = blockIdx.x;
    if (t >= tokens) return;
    if (d % 8 == 0 && aligned16(rows) && aligned16(out)) {
        for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, v[8];
            for (int q = 0; q < k; q++) {
                long s = back[t * k + q];
                float g = gates ? ld(gates, s) : 1.f;
                ld8(rows, s * d + j, v);
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = fmaf(g, v[e], acc[e]);
            }
            st8(out, t * d + j, acc);
        }
        return;
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = 0.f;
        for (int q = 0; q < k; q++) {
            long s = back[t * k + q];
            float g = gates ? ld(gates, s) : 1.f;
            acc = fmaf(g, ld(rows, s * d + j), acc);
        }
        st(out, t * d + j, acc);
    }
}

// Backward of the gated combine, one block per slot s (token t = slot_tokens[s]):
// dys[s, :] = gate[s] * dy[t, :], dgates[s] = dy[t, :] . ys[s, :].
template <typename T>
__device__ void combine_bwd(const T *dy, const T *ys, const T *gates, const unsigned *slot_tokens,
                            int slots, int d, T *dys, T *dgates) {
    __shared__ float red[32];
    const long s = blockIdx.x;
    if (s >= slots) return;
    if (slot_tokens[s] == NO_TOKEN) {
        for (int j = threadIdx.x; j < d; j += blockDim.x) st(dys, s * d + j, 0.f);
        if (threadIdx.x == 0) st(dgates, s, 0.f);
        return;
    }
    const long t = slot_tokens[s];
    const float g = ld(gates, s);
    float dot = 0.f;
    if (d % 8 == 0 && aligned16(dy) && aligned16(ys) && aligned16(dys)) {
        for (int j = 8 * threadIdx.x; j < d; j += 8 * blockDim.x) {
            float v[8], y[8], o[8];
            ld8(dy, t * d + j, v);
            ld8(ys, s * d + j, y);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                dot = fmaf(v[e], y[e], dot);
                o[e] = g * v[e];
            }
            st8(dys, s * d + j, o);
        }
    } else {
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float v = ld(dy, t * d + j);
            dot = fmaf(v, ld(ys, s * d + j), dot);
            st(dys, s * d + j, g * v);
        }
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) sum += red[w];
        st(dgates, s, sum);
    }
}

// Gate probabilities in slot order: gates[s] = probs[pick[s]] (pick = token * E + expert), and
// the backward's scatter into a zeroed (T * E) buffer (the picks of a routing are distinct).
template <typename T>
__device__ void pick(const T *probs, const unsigned *idx, int n, T *gates) {
    const long s = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s < n) {
        if (idx[s] == NO_TOKEN) st(gates, s, 0.f);
        else gates[s] = probs[idx[s]];
    }
}
template <typename T>
__device__ void pick_bwd(const T *dgates, const unsigned *idx, int n, T *dprobs) {
    const long s = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s < n && idx[s] != NO_TOKEN) dprobs[idx[s]] = dgates[s];
}

// Top-1 routing on the device, a stable counting sort by expert in three launches (slots keep
// token order within an expert, as the host routing does); the winner of each token is its first
// maximum. probs (tokens x experts). Blocks of 1024 threads own 1024 consecutive tokens each.
// 1. route_count: eid[t], rank[t] (the token's rank among its block's tokens of its expert,
//    from warp ballots) and counts[block * experts + e].
// 2. route_scan (one block): offsets[experts + 1] (the experts' token counts, cumulated),
//    frac[e] = count_e / tokens, and base[block * experts + e], the first slot of each block's
//    tokens of expert e (counts are replaced by it). Each expert's slots start at a multiple of
//    `granule`: its rows are padded with slots that read no token, so the expert GEMMs' row
//    counts take few distinct values (cuBLAS plans every new GEMM shape on the host, ~0.3 ms).
// 3. route_place: slot = base[block, eid] + rank; slot_tokens[slot] = t, back[t] = slot,
//    pick[slot] = t * experts + eid (the gate pick's index).
template <typename T>
__device__ void route_count(const T *probs, int tokens, int experts, unsigned *eid,
                            unsigned *rank, unsigned *counts) {
    extern __shared__ unsigned warp_counts[];  // experts x 32
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int best = -1;
    if (t < tokens) {
        const long r = t * experts;
        float bv = ld(probs, r);
        best = 0;
        for (int e = 1; e < experts; e++) {
            const float v = ld(probs, r + e);
            if (v > bv) {
                bv = v;
                best = e;
            }
        }
        eid[t] = best;
    }
    const unsigned below = (1u << lane) - 1u;
    unsigned my_rank = 0;
    for (int e = 0; e < experts; e++) {
        const unsigned mask = __ballot_sync(0xffffffffu, best == e);
        if (best == e) my_rank = __popc(mask & below);
        if (lane == 0) warp_counts[e * 32 + warp] = __popc(mask);
    }
    __syncthreads();
    // Exclusive scan of each expert's 32 warp counts (a warp per expert, experts strided).
    for (int e = warp; e < experts; e += 32) {
        const unsigned c = warp_counts[e * 32 + lane];
        unsigned incl = c;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        warp_counts[e * 32 + lane] = incl - c;
        if (lane == 31) counts[(long)blockIdx.x * experts + e] = incl;
    }
    __syncthreads();
    if (t < tokens) rank[t] = warp_counts[best * 32 + warp] + my_rank;
}

__device__ void route_scan(int tokens, int experts, int blocks, int granule, int slots,
                           unsigned *counts, unsigned *offsets, float *frac,
                           unsigned *slot_tokens, unsigned *pick) {
    __shared__ unsigned warp_excl[32];
    __shared__ unsigned carry, padded;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) / 32;
    if (threadIdx.x == 0) carry = padded = 0;
    __syncthreads();
    for (int e = 0; e < experts; e++) {
        if (threadIdx.x == 0) offsets[e] = carry;
        const unsigned start = carry, pstart = padded;
        for (int b0 = 0; b0 < blocks; b0 += blockDim.x) {
            const int b = b0 + threadIdx.x;
            const unsigned c = b < blocks ? counts[(long)b * experts + e] : 0u;
            unsigned incl = c;
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            if (lane == 31) warp_excl[warp] = incl;
            __syncthreads();
            if (warp == 0) {
                const unsigned w = lane < nw ? warp_excl[lane] : 0u;
                unsigned wi = w;
                for (int o = 1; o < 32; o <<= 1) {
                    const unsigned v = __shfl_up_sync(0xffffffffu, wi, o);
                    if (lane >= o) wi += v;
                }
                if (lane < nw) warp_excl[lane] = wi - w;
            }
            __syncthreads();
            const unsigned done = carry - start;  // this expert's tokens in earlier chunks
            if (b < blocks) counts[(long)b * experts + e] = pstart + done + warp_excl[warp] + incl - c;
            __syncthreads();  // every thread has read carry and warp_excl
            if (threadIdx.x == blockDim.x - 1) carry += warp_excl[warp] + incl;
            __syncthreads();
        }
        const unsigned n = carry - start;
        const unsigned rounded = (n + granule - 1) / granule * granule;
        // The expert's padding rows (after its tokens, up to the granule) read no token.
        for (unsigned r = pstart + n + threadIdx.x; r < pstart + rounded; r += blockDim.x) {
            slot_tokens[r] = NO_TOKEN;
            pick[r] = NO_TOKEN;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            frac[e] = (float)n / (float)max(tokens, 1);
            padded = pstart + rounded;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) offsets[experts] = carry;
    for (unsigned r = padded + threadIdx.x; r < (unsigned)slots; r += blockDim.x) {
        slot_tokens[r] = NO_TOKEN;
        pick[r] = NO_TOKEN;
    }
}

__device__ void route_place(int tokens, int experts, const unsigned *eid, const unsigned *rank,
                            const unsigned *base, unsigned *slot_tokens, unsigned *back,
                            unsigned *pick) {
    const long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const unsigned e = eid[t];
    const unsigned slot = base[(long)blockIdx.x * experts + e] + rank[t];
    slot_tokens[slot] = (unsigned)t;
    back[t] = slot;
    pick[slot] = (unsigned)t * experts + e;
}

extern "C" __global__ void moe_route_scan(int tokens, int experts, int blocks, int granule,
                                          int slots, unsigned *counts, unsigned *offsets,
                                          float *frac, unsigned *slot_tokens, unsigned *pick) {
    route_scan(tokens, experts, blocks, granule, slots, counts, offsets, frac, slot_tokens, pick);
}
extern "C" __global__ void moe_route_place(int tokens, int experts, const unsigned *eid,
                                           const unsigned *rank, const unsigned *base,
                                           unsigned *slot_tokens, unsigned *back,
                                           unsigned *pick) {
    route_place(tokens, experts, eid, rank, base, slot_tokens, back, pick);
}

// Row softmax of the router logits (rows x cols, cols = experts), one warp per row, and its
// backward dx = p * (dy - sum_j dy_j p_j) from the saved probabilities.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename T>
__device__ void softmax_rows(const T *x, int rows, int cols, T *y) {
    const long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;  // the whole warp: one row per warp
    const long o = r * cols;
    float m = __int_as_float(0xff800000);  // -inf
    for (int j = lane; j < cols; j += 32) m = fmaxf(m, ld(x, o + j));
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < cols; j += 32) s += expf(ld(x, o + j) - m);
    s = warp_sum(s);
    for (int j = lane; j < cols; j += 32) st(y, o + j, expf(ld(x, o + j) - m) / s);
}
template <typename T>
__device__ void softmax_rows_bwd(const T *p, const T *dy, int rows, int cols, T *dx) {
    const long r = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const long o = r * cols;
    float d = 0.f;
    for (int j = lane; j < cols; j += 32) d = fmaf(ld(dy, o + j), ld(p, o + j), d);
    d = warp_sum(d);
    for (int j = lane; j < cols; j += 32) st(dx, o + j, ld(p, o + j) * (ld(dy, o + j) - d));
}

// Switch load-balancing loss, scale * sum_e frac[e] * mean_t p[t, e] (scale = alpha * E), in one
// block (a grid-stride sum, f32, then a block reduction), and its backward
// dp[t, e] = g * scale * frac[e] / tokens.
template <typename T>
__device__ void aux_loss(const T *p, const float *frac, int tokens, int experts, float scale,
                         T *out) {
    __shared__ float red[32];
    const long n = (long)tokens * experts;
    float acc = 0.f;
    for (long i = threadIdx.x; i < n; i += blockDim.x) acc = fmaf(ld(p, i), frac[i % experts], acc);
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) st(out, 0, v * scale / (float)max(tokens, 1));
    }
}
template <typename T>
__device__ void aux_loss_bwd(const T *g, const float *frac, int tokens, int experts, float scale,
                             T *dp) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)tokens * experts) return;
    st(dp, i, ld(g, 0) * scale * frac[i % experts] / (float)max(tokens, 1));
}

#define INSTANTIATE(T, SUF)                                                                     \
    extern "C" __global__ void moe_gather_##SUF(const T *x, const unsigned *slot_tokens,        \
                                                int slots, int d, T *xs) {                      \
        gather<T>(x, slot_tokens, slots, d, xs);                                                \
    }                                                                                           \
    extern "C" __global__ void moe_combine_##SUF(const T *rows, const T *gates,                 \
                                                 const unsigned *back, int tokens, int k, int d, \
                                                 T *out) {                                      \
        combine<T>(rows, gates, back, tokens, k, d, out);                                       \
    }                                                                                           \
    extern "C" __global__ void moe_combine_bwd_##SUF(const T *dy, const T *ys, const T *gates,  \
                                                     const unsigned *slot_tokens, int slots,    \
                                                     int d, T *dys, T *dgates) {                \
        combine_bwd<T>(dy, ys, gates, slot_tokens, slots, d, dys, dgates);                      \
    }                                                                                           \
    extern "C" __global__ void moe_route_count_##SUF(const T *probs, int tokens, int experts,  \
                                                     unsigned *eid, unsigned *rank,             \
                                                     unsigned *counts) {                        \
        route_count<T>(probs, tokens, experts, eid, rank, counts);                             \
    }                                                                                           \
    extern "C" __global__ void moe_softmax_##SUF(const T *x, int rows, int cols, T *y) {       \
        softmax_rows<T>(x, rows, cols, y);                                                      \
    }                                                                                           \
    extern "C" __global__ void moe_softmax_bwd_##SUF(const T *p, const T *dy, int rows,         \
                                                     int cols, T *dx) {                         \
        softmax_rows_bwd<T>(p, dy, rows, cols, dx);                                             \
    }                                                                                           \
    extern "C" __global__ void moe_aux_loss_##SUF(const T *p, const float *frac, int tokens,   \
                                                  int experts, float scale, T *out) {           \
        aux_loss<T>(p, frac, tokens, experts, scale, out);                                      \
    }                                                                                           \
    extern "C" __global__ void moe_aux_loss_bwd_##SUF(const T *g, const float *frac,            \
                                                      int tokens, int experts, float scale,     \
                                                      T *dp) {                                  \
        aux_loss_bwd<T>(g, frac, tokens, experts, scale, dp);                                   \
    }                                                                                           \
    extern "C" __global__ void moe_pick_##SUF(const T *probs, const unsigned *idx, int n,       \
                                              T *gates) {                                       \
        pick<T>(probs, idx, n, gates);                                                          \
    }                                                                                           \
    extern "C" __global__ void moe_pick_bwd_##SUF(const T *dgates, const unsigned *idx, int n,  \
                                                  T *dprobs) {                                  \
        pick_bwd<T>(dgates, idx, n, dprobs);                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
