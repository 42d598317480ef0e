// Shared by the SSD kernels (ssd_scan.cu's sweeps, ssd_mma.cu's tensor-core form): moz-lab
// prepends it, after common.cuh, to both modules' sources (src/ops/cuda.rs).

struct Dims {
    int B, L, H, P, G, N, Q, NC, SP;
};

// log(1 + e^x) = max(x, 0) + log1p(e^-|x|), as the CPU op's softplus.
__device__ __forceinline__ float softplusf_(float x) {
    return fmaxf(x, 0.f) + log1pf(__expf(-fabsf(x)));
}

// dt at flat index w = (b*L + t)*H + h: the stored value, or softplus(raw + bias) with SP.
template <typename T>
__device__ __forceinline__ float dt_at(const T *dt, const T *ad, const Dims &d, long w, int h) {
    const float v = ld(dt, w);
    return d.SP ? softplusf_(v + ld(ad, 2 * d.H + h)) : v;
}
