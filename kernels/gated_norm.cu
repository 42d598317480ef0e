// mamba_ssm's RMSNormGated (norm_before_gate = False) for moz-lab, over rows of d channels
// split into groups of `group`:
//   g = y * silu(z) (or g = y without a gate),  out = g * rsqrt(mean_group(g^2) + eps) * w.
// A block of NT threads owns one group of RPB consecutive rows; each thread keeps its channels
// of the group (c = tid + NT m) and their weights in registers for all the rows, so the
// backward sums dw per thread over the rows and adds it to an f32 accumulator once.
// f32 arithmetic; storage f32 or bf16. Each kernel comes for M = 4 (group <= 1024) and M = 16
// (group <= 4096) register slots per thread: fewer registers keep more blocks resident.

// bf16_t, ld, st, sigmoidf_: kernels/common.cuh (prepended at compile time).

#define NT 256

// Sum of v over the block (all threads get it); red holds NT/32 floats.
__device__ __forceinline__ float block_sum(float v, float *red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // the previous call's readers are done with red
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NT / 32; w++) s += red[w];
    return s;
}

template <typename T, int MAXM>
__device__ void norm_fwd(const T *__restrict__ y, const T *__restrict__ z,
                         const T *__restrict__ w, long rows, int d, int group, float eps, int rpb,
                         T *__restrict__ out) {
    __shared__ float red[NT / 32];
    const int tid = threadIdx.x;
    const long c0 = (long)blockIdx.y * group;
    const long r0 = (long)blockIdx.x * rpb, r1 = min(rows, r0 + rpb);
    float wv[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; m++) {
        const int i = tid + NT * m;
        wv[m] = i < group ? ld(w, c0 + i) : 0.f;
    }
    const float inv = 1.f / (float)group;
    for (long r = r0; r < r1; r++) {
        const long o = r * d + c0;
        float gv[MAXM];
        float ss = 0.f;
#pragma unroll
        for (int m = 0; m < MAXM; m++) {
            const int i = tid + NT * m;
            float g = 0.f;
            if (i < group) {
                g = ld(y, o + i);
                if (z) {
                    const float zv = ld(z, o + i);
                    g *= zv * sigmoidf_(zv);
                }
            }
            gv[m] = g;
            ss = fmaf(g, g, ss);
        }
        const float rstd = rsqrtf(block_sum(ss, red) * inv + eps);
#pragma unroll
        for (int m = 0; m < MAXM; m++) {
            const int i = tid + NT * m;
            if (i < group) st(out, o + i, gv[m] * rstd * wv[m]);
        }
    }
}

// With n = g * rstd:  dw += dout n,  dn = dout w,  dg = rstd (dn - n mean(dn n)),
// dy = dg z sigmoid(z),  dz = dg y sigmoid(z) (1 + z (1 - sigmoid(z)))  (gated), else dy = dg.
template <typename T, int MAXM>
__device__ void norm_bwd(const T *__restrict__ y, const T *__restrict__ z,
                         const T *__restrict__ w, const T *__restrict__ dout, long rows, int d,
                         int group, float eps, int rpb, T *__restrict__ dy, T *__restrict__ dz,
                         float *__restrict__ dw_acc) {
    __shared__ float red[NT / 32];
    const int tid = threadIdx.x;
    const long c0 = (long)blockIdx.y * group;
    const long r0 = (long)blockIdx.x * rpb, r1 = min(rows, r0 + rpb);
    float wv[MAXM], dwv[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; m++) {
        const int i = tid + NT * m;
        wv[m] = i < group ? ld(w, c0 + i) : 0.f;
        dwv[m] = 0.f;
    }
    const float inv = 1.f / (float)group;
    for (long r = r0; r < r1; r++) {
        const long o = r * d + c0;
        float gv[MAXM], dn[MAXM];
        float ss = 0.f;
#pragma unroll
        for (int m = 0; m < MAXM; m++) {
            const int i = tid + NT * m;
            float g = 0.f, dv = 0.f;
            if (i < group) {
                g = ld(y, o + i);
                if (z) {
                    const float zv = ld(z, o + i);
                    g *= zv * sigmoidf_(zv);
                }
                dv = ld(dout, o + i);
            }
            gv[m] = g;
            dn[m] = dv;
            ss = fmaf(g, g, ss);
        }
        const float rstd = rsqrtf(block_sum(ss, red) * inv + eps);
        float dot = 0.f;
#pragma unroll
        for (int m = 0; m < MAXM; m++) {
            const float n = gv[m] * rstd;
            dwv[m] = fmaf(dn[m], n, dwv[m]);
            dn[m] *= wv[m];
            gv[m] = n;
            dot = fmaf(dn[m], n, dot);
        }
        const float mean = block_sum(dot, red) * inv;
#pragma unroll
        for (int m = 0; m < MAXM; m++) {
            const int i = tid + NT * m;
            if (i >= group) continue;
            const float dg = rstd * (dn[m] - gv[m] * mean);
            if (z) {
                const float yv = ld(y, o + i), zv = ld(z, o + i);
                const float sg = sigmoidf_(zv);
                st(dy, o + i, dg * zv * sg);
                st(dz, o + i, dg * yv * sg * (1.f + zv * (1.f - sg)));
            } else {
                st(dy, o + i, dg);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MAXM; m++) {
        const int i = tid + NT * m;
        if (i < group) atomicAdd(&dw_acc[c0 + i], dwv[m]);
    }
}

#define INSTANTIATE(T, SUF, M)                                                                  \
    extern "C" __global__ void __launch_bounds__(NT)                                            \
        gated_norm_fwd_##SUF##_m##M(const T *y, const T *z, const T *w, long rows, int d,       \
                                    int group, float eps, int rpb, T *out) {                    \
        norm_fwd<T, M>(y, z, w, rows, d, group, eps, rpb, out);                                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NT)                                            \
        gated_norm_bwd_##SUF##_m##M(const T *y, const T *z, const T *w, const T *dout,          \
                                    long rows, int d, int group, float eps, int rpb, T *dy,     \
                                    T *dz, float *dw_acc) {                                     \
        norm_bwd<T, M>(y, z, w, dout, rows, d, group, eps, rpb, dy, dz, dw_acc);                \
    }

INSTANTIATE(float, f32, 4)
INSTANTIATE(float, f32, 16)
INSTANTIATE(bf16_t, bf16, 4)
INSTANTIATE(bf16_t, bf16, 16)
