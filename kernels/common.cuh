// Shared by every kernels/*.cu: moz-lab prepends this file to each module's source before NVRTC
// compiles it (src/ops/cuda.rs; NVRTC is given no include path). bf16 is handled as its bit
// pattern, so no CUDA header is needed. Storage is f32 or bf16; arithmetic is f32.

typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float *p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t *p, long i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float *p, long i, float v) { p[i] = v; }
// f32 -> bf16 bits, round to nearest even; a NaN stays a NaN.
__device__ __forceinline__ bf16_t bf16_bits(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ void st(bf16_t *p, long i, float v) { p[i] = bf16_bits(v); }

// Eight consecutive elements p[i .. i + 8) as f32, in 16-byte accesses: p + i must be 16-byte
// aligned (callers check `aligned16` and that rows are multiples of 8 elements). Memory-bound
// row kernels move 2 bytes per access otherwise.
__device__ __forceinline__ bool aligned16(const void *p) {
    return ((unsigned long long)p & 15ull) == 0;
}
__device__ __forceinline__ void ld8(const float *p, long i, float v[8]) {
    const float4 a = *reinterpret_cast<const float4 *>(p + i);
    const float4 b = *reinterpret_cast<const float4 *>(p + i + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void ld8(const bf16_t *p, long i, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p + i);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void st8(float *p, long i, const float v[8]) {
    *reinterpret_cast<float4 *>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4 *>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(bf16_t *p, long i, const float v[8]) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
        w[k] = (unsigned)bf16_bits(v[2 * k]) | ((unsigned)bf16_bits(v[2 * k + 1]) << 16);
    *reinterpret_cast<uint4 *>(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }
