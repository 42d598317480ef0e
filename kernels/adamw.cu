// One AdamW step per parameter in one pass, and the squared gradient norm, for moz-lab's
// optimizer (src/train/optim.rs). The step follows the CPU op (src/ops/adamw.rs) operation by
// operation with the round-to-nearest intrinsics (__fmul_rn and friends are never contracted
// into an FMA, and the division and square root are the IEEE ones), so CPU and GPU agree to
// the last bit of f32:
//   g' = g * grad_scale            (only when grad_scale != 1)
//   m' = m * b1 + g' * (1 - b1)
//   v' = v * b2 + (g' g') * (1 - b2)
//   w' = w * (1 - lr wd)           (only when decayed)
//   w' = w' - ((m' * (1/bc1)) / (sqrt(v' * (1/bc2)) + eps)) * lr
// w, m, v f32 (the master weights when the parameters are bf16); g f32 or bf16; the _copy
// kernels also write w' rounded to bf16 (the parameter the model computes with).
// The sum of squares adds every block's partial sum (f64, like the CPU op) into one f64
// accumulator shared by all gradients, so the global norm costs one host read.

// bf16_t, ld, st, sigmoidf_: kernels/common.cuh (prepended at compile time).

// Step constants, each rounded to f32 on the host as the CPU op rounds them.
struct AdamConsts {
    float grad_scale, b1, nb1, b2, nb2, ibc1, ibc2, eps, lr, decay;
    int scale, decayed;
};

template <typename G, bool COPY>
__device__ void adamw_step(const float *__restrict__ w, const G *__restrict__ g,
                           const float *__restrict__ m, const float *__restrict__ v, long n,
                           AdamConsts c, float *__restrict__ wo, float *__restrict__ mo,
                           float *__restrict__ vo, bf16_t *__restrict__ wb) {
    const long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float gi = ld(g, i);
        if (c.scale) gi = __fmul_rn(gi, c.grad_scale);
        const float mi = __fadd_rn(__fmul_rn(m[i], c.b1), __fmul_rn(gi, c.nb1));
        const float vi = __fadd_rn(__fmul_rn(v[i], c.b2), __fmul_rn(__fmul_rn(gi, gi), c.nb2));
        const float wi = c.decayed ? __fmul_rn(w[i], c.decay) : w[i];
        const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, c.ibc2)), c.eps);
        const float wn = __fsub_rn(wi, __fmul_rn(__fdiv_rn(__fmul_rn(mi, c.ibc1), denom), c.lr));
        wo[i] = wn;
        mo[i] = mi;
        vo[i] = vi;
        if (COPY) st(wb, i, wn);
    }
}

#define STEP(G, SUF)                                                                          \
    extern "C" __global__ void adamw_step_##SUF(const float *w, const G *g, const float *m,   \
                                                const float *v, long n, AdamConsts c,         \
                                                float *wo, float *mo, float *vo) {            \
        adamw_step<G, false>(w, g, m, v, n, c, wo, mo, vo, nullptr);                          \
    }                                                                                         \
    extern "C" __global__ void adamw_step_##SUF##_copy(const float *w, const G *g,            \
                                                       const float *m, const float *v, long n, \
                                                       AdamConsts c, float *wo, float *mo,    \
                                                       float *vo, bf16_t *wb) {               \
        adamw_step<G, true>(w, g, m, v, n, c, wo, mo, vo, wb);                                \
    }

STEP(float, f32)
STEP(bf16_t, bf16)

#define SUM_SQ_BLOCK 256

// atomicAdd on f64 is native from sm_60; NVRTC's default target may be older.
__device__ __forceinline__ void atomic_add_f64(double *a, double v) {
#if __CUDA_ARCH__ >= 600
    atomicAdd(a, v);
#else
    unsigned long long *p = (unsigned long long *)a;
    unsigned long long old = *p, assumed;
    do {
        assumed = old;
        old = atomicCAS(p, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
    } while (assumed != old);
#endif
}

// Grid-stride sum of x^2 in f64; warp shuffles, then one warp over the warps' sums, then one
// atomicAdd per block (blockDim.x == SUM_SQ_BLOCK).
template <typename T>
__device__ void sum_sq(const T *__restrict__ x, long n, double *acc) {
    __shared__ double warp_sums[SUM_SQ_BLOCK / 32];
    double s = 0.0;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double xi = (double)ld(x, i);
        s += xi * xi;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < SUM_SQ_BLOCK / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) atomic_add_f64(acc, s);
    }
}

extern "C" __global__ void sum_sq_f32(const float *x, long n, double *acc) { sum_sq(x, n, acc); }
extern "C" __global__ void sum_sq_bf16(const bf16_t *x, long n, double *acc) {
    sum_sq(x, n, acc);
}
