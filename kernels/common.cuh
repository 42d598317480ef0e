// Shared by every kernels/*.cu: moz-lab prepends this file to each module's source before NVRTC
// compiles it (src/ops/cuda.rs; NVRTC is given no include path). bf16 is handled as its bit
// pattern, so no CUDA header is needed. Storage is f32 or bf16; arithmetic is f32.

typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float *p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t *p, long i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float *p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t *p, long i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16_t)((u >> 16) | 0x40u);  // keep NaN a NaN
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }
