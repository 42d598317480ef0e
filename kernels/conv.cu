// Depthwise causal conv1d + bias + SiLU for moz-lab's Mamba2 mixer (mamba_ssm's causal_conv1d
// with activation "silu"), over x (B, L, C) channels-last, weight (C, K), bias (C):
//   z[t, c] = bias[c] + sum_k w[c, k] x[t - (K-1) + k, c],   y = silu(z) = z sigmoid(z).
// Threads of a warp take consecutive channels, so every load and store is coalesced. The
// backward walks a segment of time per thread with the last KMAX inputs and pre-activation
// gradients in registers (taps right-aligned, so every register index is a compile-time
// constant); dw and db are summed per thread over its segment and added to f32 accumulators.
// f32 arithmetic; storage f32 or bf16. K <= KMAX.

// bf16_t, ld, st, sigmoidf_: kernels/common.cuh (prepended at compile time).

#define KMAX 8

// One thread per output element.
template <typename T>
__device__ void conv_fwd(const T *__restrict__ x, const T *__restrict__ w,
                         const T *__restrict__ bias, int B, int L, int C, int K, T *__restrict__ y) {
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)B * L * C) return;
    const int c = e % C;
    const int t = (e / C) % L;
    float z = ld(bias, c);
    for (int k = 0; k < K; k++) {
        const int s = t - (K - 1) + k;
        if (s >= 0) z = fmaf(ld(w, (long)c * K + k), ld(x, e + (long)(s - t) * C), z);
    }
    st(y, e, z * sigmoidf_(z));
}

// Thread (c, segment, b) owns dx[b, t0..t1, c] and the segment's share of dw[c, :], db[c].
// Register slot j holds time t - (KMAX-1) + j; tap k of a K-tap filter sits at slot KMAX-K+k.
template <typename T>
__device__ void conv_bwd(const T *__restrict__ x, const T *__restrict__ w,
                         const T *__restrict__ bias, const T *__restrict__ dy, int B, int L,
                         int C, int K, int seg, T *__restrict__ dx, float *__restrict__ dw_acc,
                         float *__restrict__ db_acc) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int b = blockIdx.z;
    const int t0 = blockIdx.y * seg;
    if (t0 >= L) return;
    const int t1 = min(L, t0 + seg);
    const long base = (long)b * L * C + c;  // element (b, 0, c)
    float wz[KMAX];   // z_t = bias + sum_j wz[j] xs[j]
    float wx[KMAX];   // dx_s = sum_j wx[j] dzs[j], s = t - (KMAX-1)
    float xs[KMAX], dzs[KMAX], dwj[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; j++) {
        const int k = j - (KMAX - K);  // tap at slot j (as input of z_t)
        wz[j] = k >= 0 ? ld(w, (long)c * K + k) : 0.f;
        wx[j] = j < K ? ld(w, (long)c * K + (K - 1 - j)) : 0.f;  // dz_{s+j} meets tap K-1-j
        const int s = t0 - KMAX + j;  // the slots as they stand before the first step's shift
        xs[j] = s >= 0 ? ld(x, base + (long)s * C) : 0.f;
        dzs[j] = 0.f;
        dwj[j] = 0.f;
    }
    const float bc = ld(bias, c);
    float db = 0.f;
    for (int t = t0; t < t1 + KMAX - 1; t++) {
#pragma unroll
        for (int j = 0; j < KMAX - 1; j++) {
            xs[j] = xs[j + 1];
            dzs[j] = dzs[j + 1];
        }
        float dz = 0.f;
        if (t < L) {
            xs[KMAX - 1] = ld(x, base + (long)t * C);
            float z = bc;
#pragma unroll
            for (int j = 0; j < KMAX; j++) z = fmaf(wz[j], xs[j], z);
            const float sg = sigmoidf_(z);
            dz = ld(dy, base + (long)t * C) * sg * (1.f + z * (1.f - sg));
            if (t < t1) {
                db += dz;
#pragma unroll
                for (int j = 0; j < KMAX; j++) dwj[j] = fmaf(dz, xs[j], dwj[j]);
            }
        } else {
            xs[KMAX - 1] = 0.f;
        }
        dzs[KMAX - 1] = dz;
        const int s = t - (KMAX - 1);
        if (s >= t0 && s < t1) {
            float acc = 0.f;
#pragma unroll
            for (int j = 0; j < KMAX; j++) acc = fmaf(wx[j], dzs[j], acc);
            st(dx, base + (long)s * C, acc);
        }
    }
#pragma unroll
    for (int j = 0; j < KMAX; j++) {
        const int k = j - (KMAX - K);
        if (k >= 0) atomicAdd(&dw_acc[(long)c * K + k], dwj[j]);
    }
    atomicAdd(&db_acc[c], db);
}

#define INSTANTIATE(T, SUF)                                                                     \
    extern "C" __global__ void conv_silu_fwd_##SUF(const T *x, const T *w, const T *bias, int B, \
                                                   int L, int C, int K, T *y) {                 \
        conv_fwd<T>(x, w, bias, B, L, C, K, y);                                                 \
    }                                                                                           \
    extern "C" __global__ void conv_silu_bwd_##SUF(const T *x, const T *w, const T *bias,       \
                                                   const T *dy, int B, int L, int C, int K,     \
                                                   int seg, T *dx, float *dw_acc,               \
                                                   float *db_acc) {                             \
        conv_bwd<T>(x, w, bias, dy, B, L, C, K, seg, dx, dw_acc, db_acc);                       \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)
