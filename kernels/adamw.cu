// The optimizer's element-wise work for moz-lab (src/train/optim.rs), as multi-tensor
// launches: one kernel updates every parameter and one sums every gradient's squares. A step
// with one launch per parameter cost ~17 us of host time per launch (MoZ has ~130
// parameters), while the GPU sat idle after the gradient-norm read.
//
// A table of MtTensor entries (uploaded once per step) describes the tensors; each tensor owns
// a run of MT_CHUNK-element chunks, one block per chunk, and a block finds its tensor by a
// binary search over the entries' first chunks.
//
// The AdamW step is done in place and follows the CPU op (src/ops/adamw.rs) operation by
// operation with the round-to-nearest intrinsics (__fmul_rn and friends are never contracted
// into an FMA; the division and square root are the IEEE ones), so CPU and GPU agree to the
// last bit of f32:
//   g' = g * grad_scale            (only when grad_scale != 1)
//   m' = m * b1 + g' * (1 - b1)
//   v' = v * b2 + (g' g') * (1 - b2)
//   w' = w * (1 - lr wd)           (only when the tensor is decayed)
//   w' = w' - ((m' * (1/bc1)) / (sqrt(v' * (1/bc2)) + eps)) * lr
// w, m, v are f32 (the master weights when the parameters are bf16); g is f32 or bf16; when a
// tensor has a copy, w' is also written there, rounded to bf16 or as f32 (the parameter the
// model computes with).
// The sum of squares adds every block's partial sum (f64, like the CPU op) into one f64
// accumulator, so the global norm costs one host read.

// bf16_t, ld, st: kernels/common.cuh (prepended at compile time).

#define MT_CHUNK 4096
#define MT_BLOCK 256
#define MT_DECAYED 1
#define MT_G_BF16 2
#define MT_COPY_BF16 4
#define MT_COPY_F32 8

// One tensor of a multi-tensor launch (src/ops/adamw_cuda.rs builds the same layout).
struct MtTensor {
    unsigned long long w, g, m, v, copy;  // device addresses; unused ones are 0
    long long n, first_chunk;
    float decay;  // 1 - lr wd, when MT_DECAYED
    int flags;
};

// Step constants, each rounded to f32 on the host as the CPU op rounds them.
struct AdamConsts {
    float grad_scale, b1, nb1, b2, nb2, ibc1, ibc2, eps, lr;
    int scale;
};

// The entry whose chunks include this block's; entries are sorted by first_chunk.
__device__ __forceinline__ MtTensor mt_entry(const MtTensor *__restrict__ table, int count) {
    __shared__ int found;
    if (threadIdx.x == 0) {
        int lo = 0, hi = count - 1;
        const long long chunk = blockIdx.x;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (table[mid].first_chunk <= chunk) lo = mid;
            else hi = mid - 1;
        }
        found = lo;
    }
    __syncthreads();
    return table[found];
}

extern "C" __global__ void adamw_multi(const MtTensor *table, int count, AdamConsts c) {
    const MtTensor t = mt_entry(table, count);
    const long long start = ((long long)blockIdx.x - t.first_chunk) * MT_CHUNK;
    const long long end = min(t.n, start + MT_CHUNK);
    float *w = (float *)t.w, *m = (float *)t.m, *v = (float *)t.v;
    const bool g16 = t.flags & MT_G_BF16, decayed = t.flags & MT_DECAYED;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float gi = g16 ? ld((const bf16_t *)t.g, i) : ld((const float *)t.g, i);
        if (c.scale) gi = __fmul_rn(gi, c.grad_scale);
        const float mi = __fadd_rn(__fmul_rn(m[i], c.b1), __fmul_rn(gi, c.nb1));
        const float vi = __fadd_rn(__fmul_rn(v[i], c.b2), __fmul_rn(__fmul_rn(gi, gi), c.nb2));
        const float wi = decayed ? __fmul_rn(w[i], t.decay) : w[i];
        const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(vi, c.ibc2)), c.eps);
        const float wn = __fsub_rn(wi, __fmul_rn(__fdiv_rn(__fmul_rn(mi, c.ibc1), denom), c.lr));
        w[i] = wn;
        m[i] = mi;
        v[i] = vi;
        if (t.flags & MT_COPY_BF16) st((bf16_t *)t.copy, i, wn);
        else if (t.flags & MT_COPY_F32) ((float *)t.copy)[i] = wn;
    }
}

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

// Sum of g^2 over every entry's chunk in f64: warp shuffles, then one warp over the warps'
// sums, then one atomicAdd per block (blockDim.x == MT_BLOCK).
extern "C" __global__ void sum_sq_multi(const MtTensor *table, int count, double *acc) {
    __shared__ double warp_sums[MT_BLOCK / 32];
    const MtTensor t = mt_entry(table, count);
    const long long start = ((long long)blockIdx.x - t.first_chunk) * MT_CHUNK;
    const long long end = min(t.n, start + MT_CHUNK);
    const bool g16 = t.flags & MT_G_BF16;
    double s = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double x = g16 ? ld((const bf16_t *)t.g, i) : ld((const float *)t.g, i);
        s += x * x;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < MT_BLOCK / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) atomic_add_f64(acc, s);
    }
}
