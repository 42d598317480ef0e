// SSD (Mamba2) chunked scan, forward and backward, for moz-lab. Compiled at run time with NVRTC
// (no headers: bf16 is handled as its bit pattern), launched on candle's CUDA stream.
//
// Per head h, the state S (headdim P x d_state N) follows
//   S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,    y_t = S_t C_t + D_h x_t.
// Every pass is one "sweep" kernel: a block owns one (batch, head, chunk) and keeps the whole
// P x N state in registers (8 warps; warp w owns rows w, w+8, ..; lane l owns columns l, l+32, ..)
// while it walks the chunk step by step, with the inputs of 16 steps staged in shared memory.
// Chunks run in parallel: a first sweep finds each chunk's end state from zero, a small kernel
// chains them (S_in[c+1] = decay_c S_in[c] + S_local[c]), and a second sweep produces outputs.
//
// The backward pass needs no stored per-step states:
//   G_t = exp(dt_{t+1} A) G_{t+1} + dy_t C_t^T     (reverse sweep, same kernel mirrored in time)
//   du_t = G_t B_t,  dB_t = G_t^T u_t  (u = dt x),  dC_t = S_t^T dy_t (forward sweep again),
//   d(dt_t A) = sum_{s >= t} (dy_s . y_s - u_s . du_s)   (the decay gradient, a reverse cumsum).
// With Dims.SP set, dt is the raw projection and ad holds a third row, dt_bias: every kernel
// reads dt_t = softplus(dt_raw + dt_bias) where it loads dt, and the dt gradient it writes is
// that of dt_raw (times sigmoid(dt_raw + dt_bias)), with dt_bias's gradient in ad's third row.
// All arithmetic is f32; inputs and outputs are f32 or bf16.

// bf16_t, ld, st, sigmoidf_: kernels/common.cuh; Dims, dt_at: kernels/ssd_common.cuh (both
// prepended at compile time).

#define P_MAX 64
#define N_MAX 128
#define NWARP 8
#define RP (P_MAX / NWARP)
#define RN (N_MAX / 32)
#define TS 16

// Sums eight per-lane values over a warp in 9 shuffles (eight all-reduces take 40): halving
// exchanges at lane distances 16, 8, 4 leave lane l one partial of row scatter8_row(l), and two
// more steps finish it. Shuffle throughput, not FMAs, bounded the per-step row outputs.
static_assert(RP == 8, "warp_reduce_scatter8 takes the eight rows a lane holds");
__device__ __forceinline__ int scatter8_row(int lane) {
    return ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
}
__device__ __forceinline__ float warp_reduce_scatter8(const float v[8], int lane) {
    const bool h16 = lane & 16, h8 = lane & 8, h4 = lane & 4;
    float w4[4], w2[2];
#pragma unroll
    for (int j = 0; j < 4; j++)
        w4[j] = (h16 ? v[4 + j] : v[j]) + __shfl_xor_sync(0xffffffffu, h16 ? v[j] : v[4 + j], 16);
#pragma unroll
    for (int j = 0; j < 2; j++)
        w2[j] = (h8 ? w4[2 + j] : w4[j]) + __shfl_xor_sync(0xffffffffu, h8 ? w4[j] : w4[2 + j], 8);
    float w1 = (h4 ? w2[1] : w2[0]) + __shfl_xor_sync(0xffffffffu, h4 ? w2[0] : w2[1], 4);
    w1 += __shfl_xor_sync(0xffffffffu, w1, 2);
    w1 += __shfl_xor_sync(0xffffffffu, w1, 1);
    return w1;
}

// reverse = 0: state S, v = dt x, k = B, row output y = S C (+ D x into row_t), col output
//              dC = S^T dy.
// reverse = 1: state G walked from the end, v = dy, k = C, decay of step t+1, row output
//              du = G B, col output dB = G^T (dt x).
template <typename T>
__device__ void sweep(const T *__restrict__ xbc, const T *__restrict__ dt,
                      const T *__restrict__ ad, const T *__restrict__ dy, Dims d, int reverse,
                      const float *__restrict__ init, float *__restrict__ final_state,
                      float *__restrict__ chunk_logdec, float *__restrict__ row_f32,
                      T *__restrict__ row_t, float *__restrict__ col_acc) {
    __shared__ float sk[TS][N_MAX];
    __shared__ float sq[TS][N_MAX];
    __shared__ float sv[TS][P_MAX];
    __shared__ float sr[TS][P_MAX];
    __shared__ float scol[TS][N_MAX];
    __shared__ float sdec[TS];
    __shared__ float sldec[TS];
    __shared__ float sdt[TS];
    __shared__ int stime[TS];

    const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int P = d.P, N = d.N, H = d.H, G = d.G, L = d.L;
    const int g = h / (H / G);
    const int di = H * P;
    const long cd = di + 2 * G * N;
    const float A = ld(ad, h);
    const float Dh = ld(ad, H + h);
    const int t_lo = chunk * d.Q;
    const int t_hi = min(L, t_lo + d.Q);
    const int len = t_hi - t_lo;
    const long state_off = (((long)b * H + h) * d.NC + chunk) * P * N;
    // B (forward k) or C (reverse k) and the other for q.
    const long k_col = di + (long)(reverse ? G * N : 0) + g * N;
    const long q_col = di + (long)(reverse ? 0 : G * N) + g * N;

    float M[RP][RN];
#pragma unroll
    for (int r = 0; r < RP; r++)
#pragma unroll
        for (int c = 0; c < RN; c++) {
            int i = warp + NWARP * r, j = lane + 32 * c;
            M[r][c] = (init && i < P && j < N) ? init[state_off + (long)i * N + j] : 0.f;
        }
    float logsum = 0.f;

    for (int base = 0; base < len; base += TS) {
        const int ts = min(TS, len - base);
        __syncthreads();
        for (int s = tid; s < TS; s += blockDim.x) {
            int t = reverse ? t_hi - 1 - (base + s) : t_lo + base + s;
            stime[s] = t;
            float ldec = 0.f, dtv = 0.f;
            if (s < ts) {
                dtv = dt_at(dt, ad, d, ((long)b * L + t) * H + h, h);
                if (!reverse) {
                    ldec = dtv * A;
                } else if (t + 1 < L) {
                    ldec = dt_at(dt, ad, d, ((long)b * L + t + 1) * H + h, h) * A;
                }
            }
            sdec[s] = __expf(ldec);
            sldec[s] = ldec;
            sdt[s] = dtv;
        }
        __syncthreads();  // sdt is read below
        for (int idx = tid; idx < TS * N_MAX; idx += blockDim.x) {
            int s = idx / N_MAX, j = idx % N_MAX;
            float kv = 0.f, qv = 0.f;
            if (s < ts && j < N) {
                int t = reverse ? t_hi - 1 - (base + s) : t_lo + base + s;
                long row = ((long)b * L + t) * cd;
                kv = ld(xbc, row + k_col + j);
                qv = ld(xbc, row + q_col + j);
            }
            sk[s][j] = kv;
            sq[s][j] = qv;
            scol[s][j] = 0.f;
        }
        for (int idx = tid; idx < TS * P_MAX; idx += blockDim.x) {
            int s = idx / P_MAX, i = idx % P_MAX;
            float vv = 0.f, rv = 0.f;
            if (s < ts && i < P) {
                int t = reverse ? t_hi - 1 - (base + s) : t_lo + base + s;
                long bt = (long)b * L + t;
                float u = sdt[s] * ld(xbc, bt * cd + (long)h * P + i);
                float g_out = dy ? ld(dy, bt * di + (long)h * P + i) : 0.f;
                vv = reverse ? g_out : u;
                rv = reverse ? u : g_out;
            }
            sv[s][i] = vv;
            sr[s][i] = rv;
        }
        __syncthreads();
        if (tid == 0)
            for (int s = 0; s < ts; s++) logsum += sldec[s];

        for (int s = 0; s < ts; s++) {
            const float a = sdec[s];
#pragma unroll
            for (int r = 0; r < RP; r++) {
                float vi = sv[s][warp + NWARP * r];
#pragma unroll
                for (int c = 0; c < RN; c++) M[r][c] = fmaf(a, M[r][c], vi * sk[s][lane + 32 * c]);
            }
            if (row_f32 || row_t) {
                const long bt = (long)b * L + stime[s];
                float part[RP];
#pragma unroll
                for (int r = 0; r < RP; r++) {
                    part[r] = 0.f;
#pragma unroll
                    for (int c = 0; c < RN; c++)
                        part[r] = fmaf(M[r][c], sq[s][lane + 32 * c], part[r]);
                }
                const float sum = warp_reduce_scatter8(part, lane);
                const int i = warp + NWARP * scatter8_row(lane);
                if ((lane & 3) == 0 && i < P) {
                    long o_idx = bt * di + (long)h * P + i;
                    if (row_f32) row_f32[o_idx] = sum;
                    if (row_t) st(row_t, o_idx, sum + Dh * ld(xbc, bt * cd + (long)h * P + i));
                }
            }
            if (col_acc) {
#pragma unroll
                for (int c = 0; c < RN; c++) {
                    float part = 0.f;
#pragma unroll
                    for (int r = 0; r < RP; r++) part = fmaf(M[r][c], sr[s][warp + NWARP * r], part);
                    int j = lane + 32 * c;
                    if (j < N) atomicAdd(&scol[s][j], part);
                }
            }
        }
        if (col_acc) {
            __syncthreads();
            for (int idx = tid; idx < ts * N; idx += blockDim.x) {
                int s = idx / N, j = idx % N;
                atomicAdd(&col_acc[((long)b * L + stime[s]) * G * N + (long)g * N + j], scol[s][j]);
            }
        }
    }

    if (final_state) {
#pragma unroll
        for (int r = 0; r < RP; r++)
#pragma unroll
            for (int c = 0; c < RN; c++) {
                int i = warp + NWARP * r, j = lane + 32 * c;
                if (i < P && j < N) final_state[state_off + (long)i * N + j] = M[r][c];
            }
    }
    if (chunk_logdec && tid == 0) chunk_logdec[((long)b * H + h) * d.NC + chunk] = logsum;
}

// Chains chunk states in place: on entry states[c] is chunk c's end state from a zero start;
// on exit it is the state entering chunk c (from the left, or from the right when reverse).
extern "C" __global__ void ssd_chunk_chain(float *states, const float *logdec, int NC, int PN,
                                           int reverse) {
    const long bh = blockIdx.y;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= PN) return;
    float run = 0.f;
    // Eight loads in flight before the stores (one at a time, the chain was latency-bound:
    // 0.6 ms per call at paper-block, ~4x the memory traffic's time).
    for (int k0 = 0; k0 < NC; k0 += 8) {
        float local[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int k = k0 + u, c = reverse ? NC - 1 - k : k;
            local[u] = k < NC ? states[(bh * NC + c) * PN + e] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int k = k0 + u, c = reverse ? NC - 1 - k : k;
            if (k < NC) {
                states[(bh * NC + c) * PN + e] = run;
                run = __expf(logdec[bh * NC + c]) * run + local[u];
            }
        }
    }
}

// ssd_chunk_chain on four consecutive elements per thread (PN a multiple of 4, states 16-byte
// aligned): eight 16-byte loads in flight per thread. The scalar chain moved the tensor-core
// path's states (P N = 8192 floats per chunk, 32 chunks) at 1.2 TB/s, 0.22 ms per call.
extern "C" __global__ void ssd_chunk_chain4(float *states, const float *logdec, int NC, int PN,
                                            int reverse) {
    const long bh = blockIdx.y;
    const long pn4 = PN / 4;
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= pn4) return;
    float4 *s4 = reinterpret_cast<float4 *>(states);
    float4 run = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = 0; k0 < NC; k0 += 8) {
        float4 local[8];
        float dec[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int k = k0 + u, c = reverse ? NC - 1 - k : k;
            local[u] = k < NC ? s4[(bh * NC + c) * pn4 + e] : make_float4(0.f, 0.f, 0.f, 0.f);
            dec[u] = k < NC ? __expf(logdec[bh * NC + c]) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int k = k0 + u, c = reverse ? NC - 1 - k : k;
            if (k < NC) {
                s4[(bh * NC + c) * pn4 + e] = run;
                run.x = dec[u] * run.x + local[u].x;
                run.y = dec[u] * run.y + local[u].y;
                run.z = dec[u] * run.z + local[u].z;
                run.w = dec[u] * run.w + local[u].w;
            }
        }
    }
}

// Per (b, t, h), one warp: dx = dt du + D dy into dxbc's x columns, and the scalars the decay,
// dt and D gradients need: scal = (dy . y - dt x . du, x . du, x . dy) (the first 0 without ys,
// when the caller has the decay gradient already).
template <typename T>
__device__ void bwd_rows(const T *xbc, const T *dt, const T *ad, const T *dy, const float *du,
                         const float *ys, Dims d, T *dxbc, float *scal) {
    const long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const long total = (long)d.B * d.L * d.H;
    if (w >= total) return;
    const int h = w % d.H;
    const long bt = w / d.H;
    const int P = d.P, di = d.H * d.P;
    const long cd = di + 2 * d.G * d.N;
    const float dtv = dt_at(dt, ad, d, bt * d.H + h, h), Dh = ld(ad, d.H + h);
    float xdu = 0.f, dyy = 0.f, xdy = 0.f;
    for (int i = lane; i < P; i += 32) {
        long o = bt * di + (long)h * P + i;
        float x = ld(xbc, bt * cd + (long)h * P + i);
        float g = ld(dy, o), u = du[o];
        xdu += x * u;
        if (ys) dyy += g * ys[o];
        xdy += x * g;
        st(dxbc, bt * cd + (long)h * P + i, dtv * u + Dh * g);
    }
    for (int o = 16; o > 0; o >>= 1) {
        xdu += __shfl_xor_sync(0xffffffffu, xdu, o);
        dyy += __shfl_xor_sync(0xffffffffu, dyy, o);
        xdy += __shfl_xor_sync(0xffffffffu, xdy, o);
    }
    if (lane == 0) {
        scal[w * 3 + 0] = dyy - dtv * xdu;
        scal[w * 3 + 1] = xdu;
        scal[w * 3 + 2] = xdy;
    }
}

// Per (b, h), one block: reverse cumsum of scal[.,0] over time gives d(dt A) (or `da` holds it,
// from the tensor-core path); then ddt = x . du + A d(dt A), dA += dt d(dt A), dD += x . dy (dA,
// dD accumulated in f32 atomics); with SP, ddt_raw = ddt sigmoid(dt_raw + dt_bias) and
// d dt_bias += ddt_raw.
template <typename T>
__device__ void bwd_scalars(const T *dt, const T *ad, const float *scal, const float *da, Dims d,
                            T *ddt, float *dad_acc) {
    __shared__ float seg_sum[256];
    __shared__ float red[3];
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int seg = (d.L + nt - 1) / nt;
    const int t0 = min(d.L, tid * seg), t1 = min(d.L, t0 + seg);
    const float A = ld(ad, h);
    float s = 0.f;
    if (!da)
        for (int t = t0; t < t1; t++) s += scal[(((long)b * d.L + t) * d.H + h) * 3];
    seg_sum[tid] = s;
    if (tid < 3) red[tid] = 0.f;
    __syncthreads();
    if (tid == 0) {  // suffix sums of the segments, exclusive
        float run = 0.f;
        for (int k = nt - 1; k >= 0; k--) {
            float v = seg_sum[k];
            seg_sum[k] = run;
            run += v;
        }
    }
    __syncthreads();
    float acc = seg_sum[tid], dA = 0.f, dd = 0.f, dbias = 0.f;
    for (int t = t1 - 1; t >= t0; t--) {
        long w = ((long)b * d.L + t) * d.H + h;
        acc += scal[w * 3];
        const float dadt = da ? da[w] : acc;
        float g = scal[w * 3 + 1] + A * dadt;  // d loss / d dt
        float dtv;
        if (d.SP) {
            const float raw = ld(dt, w) + ld(ad, 2 * d.H + h);
            dtv = softplusf_(raw);
            g *= 1.f / (1.f + __expf(-raw));  // softplus' = sigmoid
            dbias += g;
        } else {
            dtv = ld(dt, w);
        }
        st(ddt, w, g);
        dA += dtv * dadt;
        dd += scal[w * 3 + 2];
    }
    atomicAdd(&red[0], dA);
    atomicAdd(&red[1], dd);
    if (d.SP) atomicAdd(&red[2], dbias);
    __syncthreads();
    if (tid == 0) {
        atomicAdd(&dad_acc[h], red[0]);
        atomicAdd(&dad_acc[d.H + h], red[1]);
        if (d.SP) atomicAdd(&dad_acc[2 * d.H + h], red[2]);
    }
}

// dB, dC accumulators (b, l, g*n) f32 -> dxbc's B and C columns.
template <typename T>
__device__ void bwd_bc(const float *db, const float *dc, Dims d, T *dxbc) {
    const long gn = (long)d.G * d.N;
    const long total = (long)d.B * d.L * gn;
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const long bt = e / gn, j = e % gn;
    const long di = (long)d.H * d.P, cd = di + 2 * gn;
    st(dxbc, bt * cd + di + j, db[e]);
    st(dxbc, bt * cd + di + gn + j, dc[e]);
}

#define INSTANTIATE(T, SUF)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        ssd_sweep_##SUF(const T *xbc, const T *dt, const T *ad, const T *dy, Dims d, int reverse, \
                        const float *init, float *final_state, float *chunk_logdec,              \
                        float *row_f32, T *row_t, float *col_acc) {                              \
        sweep<T>(xbc, dt, ad, dy, d, reverse, init, final_state, chunk_logdec, row_f32, row_t,  \
                 col_acc);                                                                       \
    }                                                                                            \
    extern "C" __global__ void ssd_bwd_rows_##SUF(const T *xbc, const T *dt, const T *ad,        \
                                                  const T *dy, const float *du, const float *ys, \
                                                  Dims d, T *dxbc, float *scal) {                \
        bwd_rows<T>(xbc, dt, ad, dy, du, ys, d, dxbc, scal);                                     \
    }                                                                                            \
    extern "C" __global__ void ssd_bwd_scalars_##SUF(const T *dt, const T *ad, const float *scal, \
                                                     const float *da, Dims d, T *ddt,            \
                                                     float *dad_acc) {                           \
        bwd_scalars<T>(dt, ad, scal, da, d, ddt, dad_acc);                                       \
    }                                                                                            \
    extern "C" __global__ void ssd_bwd_bc_##SUF(const float *db, const float *dc, Dims d,        \
                                                T *dxbc) {                                       \
        bwd_bc<T>(db, dc, d, dxbc);                                                              \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

// Sets n bytes to 0xff (NaN in f32 and bf16): tests poison outputs before the kernels write.
extern "C" __global__ void moz_fill_ff(unsigned char *p, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 0xff;
}
