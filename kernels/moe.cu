// Mixture-of-Experts dispatch and combine for moz-lab's ExpertLinear on the GPU. The per-expert
// GEMMs between them go through cuBLAS on contiguous row blocks (tokens sorted by expert).
// Slots are token-expert assignments sorted by expert: slot s reads token slot_tokens[s]; the
// k slots of token t are back[t*k .. t*k+k]. f32 arithmetic; storage f32 or bf16.

// bf16_t, ld, st, sigmoidf_: kernels/common.cuh (prepended at compile time).

// xs[s, :] = x[slot_tokens[s], :]  (one block row per slot, threads over the row).
template <typename T>
__device__ void gather(const T *x, const unsigned *slot_tokens, int slots, int d, T *xs) {
    const long s = blockIdx.x;
    if (s >= slots) return;
    const long src = (long)slot_tokens[s] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) xs[s * d + j] = x[src + j];
}

// out[t, :] = sum_j gate(back[t*k+j]) * rows[back[t*k+j], :]; gate = 1 when gates is null.
template <typename T>
__device__ void combine(const T *rows, const T *gates, const unsigned *back, int tokens, int k,
                        int d, T *out) {
    const long t = blockIdx.x;
    if (t >= tokens) return;
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
    const long t = slot_tokens[s];
    const float g = ld(gates, s);
    float dot = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(dy, t * d + j);
        dot = fmaf(v, ld(ys, s * d + j), dot);
        st(dys, s * d + j, g * v);
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
    if (s < n) gates[s] = probs[idx[s]];
}
template <typename T>
__device__ void pick_bwd(const T *dgates, const unsigned *idx, int n, T *dprobs) {
    const long s = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (s < n) dprobs[idx[s]] = dgates[s];
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
