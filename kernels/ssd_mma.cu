// SSD (Mamba2) chunked scan in its matmul form on tensor cores, for bf16 storage with headdim 64
// and d_state 64 or 128 (kernels/ssd_scan.cu's sweeps serve every other case). Compiled by NVRTC
// for compute_80 or newer (mma.sync bf16); ssd_common.cuh and common.cuh come first.
//
// Per head h and chunk c of MQ steps, with a_t = dt_t A_h, cs the inclusive cumsum of a within
// the chunk, u_t = dt_t x_t and S_in the state entering the chunk (P x N):
//   y_i   = sum_{j<=i} exp(cs_i - cs_j) (C_i . B_j) u_j  +  exp(cs_i) S_in C_i        (+ D x_i)
//   S_end = exp(cs_Q) S_in + sum_j exp(cs_Q - cs_j) u_j B_j^T
// as in mamba_ssm's chunk_state / state_passing / chunk_scan. Backward, with dS the gradient of
// S_end (the state entering chunk c+1, from the reverse chain over
// R_c = sum_i exp(cs_i) dy_i C_i^T):
//   du_j  = sum_{i>=j} exp(cs_i - cs_j) (B_j . C_i) dy_i  +  exp(cs_Q - cs_j) dS B_j
//   dC_i += sum_{j<=i} exp(cs_i - cs_j) (dy_i . u_j) B_j  +  exp(cs_i) S_in^T dy_i
//   dB_j += sum_{i>=j} exp(cs_i - cs_j) (dy_i . u_j) C_i  +  exp(cs_Q - cs_j) dS^T u_j
// (dC, dB summed over the heads of a group). The dt, A, D gradients then follow from du and y as
// in the sweep path (ssd_bwd_rows / ssd_bwd_scalars).
//
// Layout: a block has 8 warps; warp w owns the 16-row tile w % 4 of a 64-row result and half
// w / 4 of its columns. Operands are staged in shared memory as bf16 in their global layout
// (row stride padded by 8 elements so fragment loads hit 32 distinct banks); products are
// m16n8k16 mma.sync with f32 accumulators. A masked, decayed score tile (C B^T, dy u^T) goes from
// accumulators straight into the A operand of the next product without leaving registers.

#define MQ 64  // chunk length of this path
#define MP 64  // headdim
#define LDP (MP + 8)

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float bf(bf16_t v) { return __uint_as_float((unsigned)v << 16); }
__device__ __forceinline__ float bf16_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ unsigned pair(bf16_t lo, bf16_t hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}
__device__ __forceinline__ unsigned scale_pair(unsigned v, float s) {
    return pack_bf16(bf16_lo(v) * s, bf16_hi(v) * s);
}

// c += a b for one m16n8k16 tile.
__device__ __forceinline__ void mma(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Fragments (PTX ISA, m16n8k16): lane = 4 g + t. A (16 x 16): regs (row g, k 2t..2t+1),
// (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..). B (16 x 8): (k 2t.., col g),
// (k 2t+8.., col g). C (16 x 8): (row g, col 2t, 2t+1), (row g+8, col 2t, 2t+1).

// A tile at (m0, k0) of an [m][k] matrix in shared memory.
__device__ __forceinline__ void frag_a(unsigned a[4], const bf16_t *s, int ld, int m0, int k0,
                                       int g, int t) {
    const bf16_t *p = s + (m0 + g) * ld + k0 + 2 * t;
    a[0] = *reinterpret_cast<const unsigned *>(p);
    a[1] = *reinterpret_cast<const unsigned *>(p + 8 * ld);
    a[2] = *reinterpret_cast<const unsigned *>(p + 8);
    a[3] = *reinterpret_cast<const unsigned *>(p + 8 * ld + 8);
}
// The same with rows scaled: row m0 + g by s_lo, row m0 + g + 8 by s_hi.
__device__ __forceinline__ void frag_a_rows(unsigned a[4], const bf16_t *s, int ld, int m0,
                                            int k0, int g, int t, float s_lo, float s_hi) {
    frag_a(a, s, ld, m0, k0, g, t);
    a[0] = scale_pair(a[0], s_lo);
    a[2] = scale_pair(a[2], s_lo);
    a[1] = scale_pair(a[1], s_hi);
    a[3] = scale_pair(a[3], s_hi);
}
// A tile at (m0, k0) of a matrix stored [k][m], each k scaled by w[k].
__device__ __forceinline__ void frag_a_km(unsigned a[4], const bf16_t *s, int ld, int m0, int k0,
                                          int g, int t, const float *w) {
    const int k = k0 + 2 * t;
    const bf16_t *p = s + k * ld + m0 + g;
    const float w0 = w[k], w1 = w[k + 1], w8 = w[k + 8], w9 = w[k + 9];
    a[0] = pack_bf16(bf(p[0]) * w0, bf(p[ld]) * w1);
    a[1] = pack_bf16(bf(p[8]) * w0, bf(p[ld + 8]) * w1);
    a[2] = pack_bf16(bf(p[8 * ld]) * w8, bf(p[9 * ld]) * w9);
    a[3] = pack_bf16(bf(p[8 * ld + 8]) * w8, bf(p[9 * ld + 8]) * w9);
}
// B tile at (k0, n0) of a matrix stored [n][k] (the transpose of an [n][k] operand's rows).
__device__ __forceinline__ void frag_b_nk(unsigned b[2], const bf16_t *s, int ld, int k0, int n0,
                                          int g, int t) {
    const bf16_t *p = s + (n0 + g) * ld + k0 + 2 * t;
    b[0] = *reinterpret_cast<const unsigned *>(p);
    b[1] = *reinterpret_cast<const unsigned *>(p + 8);
}
// B tile at (k0, n0) of a matrix stored [k][n].
__device__ __forceinline__ void frag_b_kn(unsigned b[2], const bf16_t *s, int ld, int k0, int n0,
                                          int g, int t) {
    const bf16_t *p = s + (k0 + 2 * t) * ld + n0 + g;
    b[0] = pair(p[0], p[ld]);
    b[1] = pair(p[8 * ld], p[9 * ld]);
}

// A 16 x 64 score tile (8 accumulator tiles: rows m0 + .., columns 0..63 of the chunk) masked
// to causal order and decayed in place: with (later, earlier) = (row, col) when rows_later, else
// (col, row), entries with earlier <= later < len become v exp(cs[later] - cs[earlier]) (times
// colw[col] when given), the rest 0.
__device__ __forceinline__ void decay(float v[8][4], int m0, int g, int t, bool rows_later,
                                      int len, const float *cs, const float *colw) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = m0 + g + (e >> 1) * 8, col = nt * 8 + 2 * t + (e & 1);
            const int later = rows_later ? row : col, earlier = rows_later ? col : row;
            float x = 0.f;
            if (earlier <= later && later < len) {
                x = v[nt][e] * __expf(cs[later] - cs[earlier]);
                if (colw) x *= colw[col];
            }
            v[nt][e] = x;
        }
}
// A 16 x 64 tile of accumulators as the A operand of four k16 steps.
__device__ __forceinline__ void pack_a(const float v[8][4], unsigned a[4][4]) {
#pragma unroll
    for (int kt = 0; kt < 4; kt++) {
        a[kt][0] = pack_bf16(v[2 * kt][0], v[2 * kt][1]);
        a[kt][1] = pack_bf16(v[2 * kt][2], v[2 * kt][3]);
        a[kt][2] = pack_bf16(v[2 * kt + 1][0], v[2 * kt + 1][1]);
        a[kt][3] = pack_bf16(v[2 * kt + 1][2], v[2 * kt + 1][3]);
    }
}
// Sum over the four lanes of a fragment row group (lanes 4g .. 4g + 3).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
// Adds sign * (the sum over columns of rows m0 + g and m0 + g + 8 of acc . other) to dcs[row],
// where `other` is a bf16 [row][col] tile in shared memory (ld, columns col0 + ..) or, when null,
// all ones. NT accumulator tiles cover the columns col0 .. col0 + 8 NT. With `mirror`, the same
// floats are also added there with the opposite sign.
template <int NT>
__device__ __forceinline__ void rows_dot_into(const float acc[NT][4], const bf16_t *other, int ld,
                                              int col0, int m0, int g, int t, float sign,
                                              float *dcs, float *mirror) {
    float lo = 0.f, hi = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int col = col0 + nt * 8 + 2 * t;
        float o0 = 1.f, o1 = 1.f, o2 = 1.f, o3 = 1.f;
        if (other) {
            const unsigned r0 = *reinterpret_cast<const unsigned *>(other + (m0 + g) * ld + col);
            const unsigned r1 =
                *reinterpret_cast<const unsigned *>(other + (m0 + g + 8) * ld + col);
            o0 = bf16_lo(r0), o1 = bf16_hi(r0), o2 = bf16_lo(r1), o3 = bf16_hi(r1);
        }
        lo += acc[nt][0] * o0 + acc[nt][1] * o1;
        hi += acc[nt][2] * o2 + acc[nt][3] * o3;
    }
    lo = quad_sum(lo);
    hi = quad_sum(hi);
    if (t == 0) {
        atomicAdd(&dcs[m0 + g], sign * lo);
        atomicAdd(&dcs[m0 + g + 8], sign * hi);
        if (mirror) {
            atomicAdd(mirror, -sign * lo);
            atomicAdd(mirror, -sign * hi);
        }
    }
}

// Rows t0 .. t0 + MQ of a bf16 matrix (row stride `stride`, columns col .. col + W) into shared
// [MQ][lds], each row r times rs[r] when given; rows at or past len are zero.
template <int W>
__device__ void load_rows(bf16_t *s, int lds, const bf16_t *src, long row0, long stride, long col,
                          int len, const float *rs) {
    const bool vec = aligned16(src) && stride % 8 == 0 && col % 8 == 0;
    for (int idx = threadIdx.x; idx < MQ * (W / 8); idx += blockDim.x) {
        const int r = idx / (W / 8), c = (idx % (W / 8)) * 8;
        float v[8];
        if (r < len) {
            const long o = (row0 + r) * stride + col + c;
            if (vec) {
                ld8(src, o, v);
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = ld(src, o + k);
            }
            if (rs)
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] *= rs[r];
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = 0.f;
        }
        unsigned w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = pack_bf16(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4 *>(s + r * lds + c) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// An f32 state (MP x W, row-major, 16-byte aligned) into shared [MP][lds] as bf16; zeros for null.
template <int W>
__device__ void load_state(bf16_t *s, int lds, const float *st) {
    for (int idx = threadIdx.x; idx < MP * (W / 8); idx += blockDim.x) {
        const int r = idx / (W / 8), c = (idx % (W / 8)) * 8;
        float v[8];
        if (st) {
            ld8(st, (long)r * W + c, v);
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = 0.f;
        }
        unsigned w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = pack_bf16(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4 *>(s + r * lds + c) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// Warp 0: dt of the chunk's steps (0 past len) and cs, the inclusive cumsum of dt A.
__device__ void chunk_cumsum(const bf16_t *dt, const bf16_t *ad, const Dims &d, int b, int h,
                             int t0, int len, float *s_cs, float *s_dt) {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    const float A = ld(ad, h);
    float dv[2], v[2];
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int t = 2 * lane + k;
        dv[k] = t < len ? dt_at(dt, ad, d, ((long)b * d.L + t0 + t) * d.H + h, h) : 0.f;
        v[k] = dv[k] * A;
    }
    const float s = v[0] + v[1];
    float incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    s_cs[2 * lane] = incl - s + v[0];
    s_cs[2 * lane + 1] = incl;
    s_dt[2 * lane] = dv[0];
    s_dt[2 * lane + 1] = dv[1];
}

// Per (chunk, head, batch): a chunk's local end state from a zero start (rev = 0):
//   S[p][n] = sum_j exp(cs_Q - cs_j) dt_j x_j[p] B_j[n],
// or (rev = 1) the reverse chain's local term R[p][n] = sum_i exp(cs_i) dy_i[p] C_i[n];
// and cs_Q, the chunk's log decay, for the chain.
template <int NS>
__device__ void mma_state(const bf16_t *xbc, const bf16_t *dt, const bf16_t *ad,
                          const bf16_t *dy, Dims d, int rev, float *states, float *logdec) {
    constexpr int LDN = NS + 8, NT = NS / 16;
    __shared__ __align__(16) bf16_t sv[MQ * LDP];
    __shared__ __align__(16) bf16_t sk[MQ * LDN];
    __shared__ float s_cs[MQ], s_dt[MQ], s_w[MQ];
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int H = d.H, N = d.N, G = d.G, grp = h / (H / G);
    const long di = (long)H * MP, cd = di + 2L * G * N;
    const int t0 = c * MQ, len = min(MQ, d.L - t0);
    const long row0 = (long)b * d.L + t0;

    chunk_cumsum(dt, ad, d, b, h, t0, len, s_cs, s_dt);
    if (rev) {
        load_rows<MP>(sv, LDP, dy, row0, di, (long)h * MP, len, nullptr);
        load_rows<NS>(sk, LDN, xbc, row0, cd, di + (long)G * N + (long)grp * N, len, nullptr);
    } else {
        load_rows<MP>(sv, LDP, xbc, row0, cd, (long)h * MP, len, nullptr);
        load_rows<NS>(sk, LDN, xbc, row0, cd, di + (long)grp * N, len, nullptr);
    }
    __syncthreads();
    const float csq = s_cs[MQ - 1];
    if (threadIdx.x < MQ) {
        const int j = threadIdx.x;
        s_w[j] = rev ? __expf(s_cs[j]) : __expf(csq - s_cs[j]) * s_dt[j];
    }
    __syncthreads();

    const int m0 = (warp & 3) * 16, nbase = (warp >> 2) * (NS / 2);
    float acc[NT][4] = {};
#pragma unroll
    for (int kt = 0; kt < MQ / 16; kt++) {
        unsigned a[4];
        frag_a_km(a, sv, LDP, m0, kt * 16, g, t, s_w);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            unsigned bb[2];
            frag_b_kn(bb, sk, LDN, kt * 16, nbase + nt * 8, g, t);
            mma(acc[nt], a, bb);
        }
    }
    float *out = states + (((long)b * H + h) * d.NC + c) * MP * NS;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            const int p = m0 + g + 8 * hi, n = nbase + nt * 8 + 2 * t;
            *reinterpret_cast<float2 *>(out + (long)p * NS + n) =
                make_float2(acc[nt][2 * hi], acc[nt][2 * hi + 1]);
        }
    if (threadIdx.x == 0) logdec[((long)b * H + h) * d.NC + c] = csq;
}

// Per (chunk, head, batch): y = the chunk's output plus D x (bf16). states: those entering each chunk (b, h, nc, P, N), null for zeros.
template <int NS>
__device__ void mma_out(const bf16_t *xbc, const bf16_t *dt, const bf16_t *ad, Dims d,
                        const float *states, bf16_t *y) {
    constexpr int LDN = NS + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t *sc = reinterpret_cast<bf16_t *>(smem);  // C rows [i][n]
    bf16_t *sb = sc + MQ * LDN;                      // B rows [j][n]
    bf16_t *ss = sb + MQ * LDN;                      // S_in [p][n]
    bf16_t *sx = ss + MP * LDN;                      // x rows [j][p]
    float *s_cs = reinterpret_cast<float *>(sx + MQ * LDP), *s_dt = s_cs + MQ;
    const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int H = d.H, N = d.N, G = d.G, grp = h / (H / G);
    const long di = (long)H * MP, cd = di + 2L * G * N;
    const int t0 = c * MQ, len = min(MQ, d.L - t0);
    const long row0 = (long)b * d.L + t0;
    const float *s_in = states ? states + (((long)b * H + h) * d.NC + c) * MP * NS : nullptr;

    chunk_cumsum(dt, ad, d, b, h, t0, len, s_cs, s_dt);
    load_rows<NS>(sc, LDN, xbc, row0, cd, di + (long)G * N + (long)grp * N, len, nullptr);
    load_rows<NS>(sb, LDN, xbc, row0, cd, di + (long)grp * N, len, nullptr);
    load_rows<MP>(sx, LDP, xbc, row0, cd, (long)h * MP, len, nullptr);
    if (s_in) load_state<NS>(ss, LDN, s_in);
    __syncthreads();

    const int m0 = (warp & 3) * 16, pbase = (warp >> 2) * (MP / 2);
    // C B^T for the warp's 16 rows, all 64 columns.
    float cb[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < NS / 16; kk++) {
        unsigned a[4];
        frag_a(a, sc, LDN, m0, kk * 16, g, t);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            unsigned bb[2];
            frag_b_nk(bb, sb, LDN, kk * 16, nt * 8, g, t);
            mma(cb[nt], a, bb);
        }
    }
    // exp(cs_i) S_in C_i, then the intra-chunk part on top.
    float acc[4][4] = {};
    if (s_in) {
#pragma unroll
        for (int kk = 0; kk < NS / 16; kk++) {
            unsigned a[4];
            frag_a(a, sc, LDN, m0, kk * 16, g, t);
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                unsigned bb[2];
                frag_b_nk(bb, ss, LDN, kk * 16, pbase + nt * 8, g, t);
                mma(acc[nt], a, bb);
            }
        }
        const float e0 = __expf(s_cs[m0 + g]), e1 = __expf(s_cs[m0 + g + 8]);
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            acc[nt][0] *= e0, acc[nt][1] *= e0, acc[nt][2] *= e1, acc[nt][3] *= e1;
        }
    }
    unsigned am[4][4];
    decay(cb, m0, g, t, true, len, s_cs, s_dt);
    pack_a(cb, am);
#pragma unroll
    for (int kt = 0; kt < 4; kt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            unsigned bb[2];
            frag_b_kn(bb, sx, LDP, kt * 16, pbase + nt * 8, g, t);
            mma(acc[nt], am[kt], bb);
        }

    const float Dh = ld(ad, H + h);
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            const int i = m0 + g + 8 * hi, p = pbase + nt * 8 + 2 * t;
            if (i >= len) continue;
            const long o = (row0 + i) * di + (long)h * MP + p;
            const float v0 = acc[nt][2 * hi], v1 = acc[nt][2 * hi + 1];
            const unsigned xp = *reinterpret_cast<const unsigned *>(sx + i * LDP + p);
            *reinterpret_cast<unsigned *>(y + o) =
                pack_bf16(v0 + Dh * bf16_lo(xp), v1 + Dh * bf16_hi(xp));
        }
}

// Per (chunk, group, batch), looping over the group's heads: du (b, l, h*P) f32 and da (b, l, h)
// f32, the gradient of a_t = dt_t A, for each head, and dB, dC (b, l, G*N) f32 summed over the
// heads. fst: forward states entering each chunk, rst: gradients of each chunk's end state (both
// (b, h, nc, P, N), null for zeros).
//
// da_t = sum_{k >= t in the chunk} dcs_k, with dcs the gradient of cs (mamba_ssm's ddA_cumsum):
//   W'_ij = exp(cs_i - cs_j) (C_i . B_j) (dy_i . u_j), j <= i:   dcs_i += W'_ij, dcs_j -= W'_ij
//   dcs_i += exp(cs_i) dy_i . (S_in C_i),
//   q_j = exp(cs_Q - cs_j) u_j . (dS B_j):   dcs_j -= q_j, dcs_{Q-1} += q_j,
//   dcs_{Q-1} += exp(cs_Q) <dS, S_in>     (the last two: <dS, S_end>).
// Each W'_ij and q_j is added and subtracted as the same float, so the terms inside [t, Q)
// cancel exactly in da_t; the whole-sequence identity the sweeps use (a reverse cumsum of
// dy.y - u.du) would sum bf16-rounded terms over all of L and lose the decay gradient to
// cancellation (GPU test: 29% error on dA), and <dS, S_end> from the f32 chained state against
// the bf16 q_j still lost 2%.
template <int NS>
__device__ void mma_bwd(const bf16_t *xbc, const bf16_t *dt, const bf16_t *ad, const bf16_t *dy,
                        Dims d, const float *fst, const float *rst, float *du, float *da,
                        float *db, float *dc) {
    constexpr int LDN = NS + 8, NT = NS / 16;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t *sb = reinterpret_cast<bf16_t *>(smem);  // B rows [j][n]
    bf16_t *sc = sb + MQ * LDN;                      // C rows [i][n]
    bf16_t *sds = sc + MQ * LDN;                     // dS [p][n]
    bf16_t *ssi = sds + MP * LDN;                    // S_in [p][n]
    bf16_t *sdy = ssi + MP * LDN;                    // dy rows [i][p]
    bf16_t *su = sdy + MQ * LDP;                     // u = dt x rows [j][p]
    float *s_cs = reinterpret_cast<float *>(su + MQ * LDP);
    float *s_dt = s_cs + MQ, *s_e = s_dt + MQ, *s_f = s_e + MQ, *s_dcs = s_f + MQ;
    const int c = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int H = d.H, N = d.N, G = d.G, hpg = H / G;
    const long di = (long)H * MP, gn = (long)G * N, cd = di + 2 * gn;
    const int t0 = c * MQ, len = min(MQ, d.L - t0);
    const long row0 = (long)b * d.L + t0;
    const int m0 = (warp & 3) * 16, half = warp >> 2;
    const int pbase = half * (MP / 2), nbase = half * (NS / 2);

    load_rows<NS>(sb, LDN, xbc, row0, cd, di + (long)grp * N, len, nullptr);
    load_rows<NS>(sc, LDN, xbc, row0, cd, di + gn + (long)grp * N, len, nullptr);
    __syncthreads();
    // B_j . C_i for the warp's rows j, all columns i: shared by the group's heads.
    float cbt[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < NS / 16; kk++) {
        unsigned a[4];
        frag_a(a, sb, LDN, m0, kk * 16, g, t);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            unsigned bb[2];
            frag_b_nk(bb, sc, LDN, kk * 16, nt * 8, g, t);
            mma(cbt[nt], a, bb);
        }
    }
    float acc_db[NT][4] = {}, acc_dc[NT][4] = {};

    for (int h = grp * hpg; h < (grp + 1) * hpg; h++) {
        __syncthreads();  // the previous head's operands and s_dcs are no longer read
        const long st_off = (((long)b * H + h) * d.NC + c) * MP * NS;
        const float *ds_g = rst ? rst + st_off : nullptr;
        chunk_cumsum(dt, ad, d, b, h, t0, len, s_cs, s_dt);
        load_rows<MP>(sdy, LDP, dy, row0, di, (long)h * MP, len, nullptr);
        load_state<NS>(sds, LDN, ds_g);
        load_state<NS>(ssi, LDN, fst ? fst + st_off : nullptr);
        // <dS, S_in> in f32 from global.
        float ds_sin = 0.f;
        if (ds_g && fst) {
            const float *s_in = fst + st_off;
            for (int e = threadIdx.x; e < MP * NS; e += blockDim.x) ds_sin += ds_g[e] * s_in[e];
        }
        for (int o = 16; o > 0; o >>= 1) ds_sin += __shfl_xor_sync(0xffffffffu, ds_sin, o);
        __syncthreads();
        if (threadIdx.x < MQ) {
            const int j = threadIdx.x;
            s_e[j] = __expf(s_cs[MQ - 1] - s_cs[j]);
            s_f[j] = __expf(s_cs[j]);
            s_dcs[j] = 0.f;
        }
        load_rows<MP>(su, LDP, xbc, row0, cd, (long)h * MP, len, s_dt);
        __syncthreads();
        if (lane == 0) atomicAdd(&s_dcs[MQ - 1], ds_sin * __expf(s_cs[MQ - 1]));
        const float e_lo = s_e[m0 + g], e_hi = s_e[m0 + g + 8];

        // du = exp(cs_Q - cs_j) dS B_j + sum_{i>=j} decay (B_j . C_i) dy_i.
        {
            float acc[4][4] = {};
#pragma unroll
            for (int kk = 0; kk < NS / 16; kk++) {
                unsigned a[4];
                frag_a(a, sb, LDN, m0, kk * 16, g, t);
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    unsigned bb[2];
                    frag_b_nk(bb, sds, LDN, kk * 16, pbase + nt * 8, g, t);
                    mma(acc[nt], a, bb);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                acc[nt][0] *= e_lo, acc[nt][1] *= e_lo, acc[nt][2] *= e_hi, acc[nt][3] *= e_hi;
            }
            rows_dot_into<4>(acc, su, LDP, pbase, m0, g, t, -1.f, s_dcs, &s_dcs[MQ - 1]);
            float m[8][4];
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) m[nt][e] = cbt[nt][e];
            decay(m, m0, g, t, false, len, s_cs, nullptr);
            unsigned am[4][4];
            pack_a(m, am);
#pragma unroll
            for (int kt = 0; kt < 4; kt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) {
                    unsigned bb[2];
                    frag_b_kn(bb, sdy, LDP, kt * 16, pbase + nt * 8, g, t);
                    mma(acc[nt], am[kt], bb);
                }
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int hi = 0; hi < 2; hi++) {
                    const int j = m0 + g + 8 * hi, p = pbase + nt * 8 + 2 * t;
                    if (j < len)
                        *reinterpret_cast<float2 *>(du + (row0 + j) * di + (long)h * MP + p) =
                            make_float2(acc[nt][2 * hi], acc[nt][2 * hi + 1]);
                }
        }
        // dC_i += sum_{j<=i} decay (dy_i . u_j) B_j + exp(cs_i) S_in^T dy_i.
        {
            float w[8][4] = {};
#pragma unroll
            for (int kk = 0; kk < MP / 16; kk++) {
                unsigned a[4];
                frag_a(a, sdy, LDP, m0, kk * 16, g, t);
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    unsigned bb[2];
                    frag_b_nk(bb, su, LDP, kk * 16, nt * 8, g, t);
                    mma(w[nt], a, bb);
                }
            }
            decay(w, m0, g, t, true, len, s_cs, nullptr);
            unsigned aw[4][4];
            pack_a(w, aw);
#pragma unroll
            for (int kt = 0; kt < 4; kt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    unsigned bb[2];
                    frag_b_kn(bb, sb, LDN, kt * 16, nbase + nt * 8, g, t);
                    mma(acc_dc[nt], aw[kt], bb);
                }
            // The S_in part apart first: dcs_i += C_i . (its row i).
            float off[NT][4] = {};
            const float f_lo = s_f[m0 + g], f_hi = s_f[m0 + g + 8];
#pragma unroll
            for (int kk = 0; kk < MP / 16; kk++) {
                unsigned a[4];
                frag_a_rows(a, sdy, LDP, m0, kk * 16, g, t, f_lo, f_hi);
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    unsigned bb[2];
                    frag_b_kn(bb, ssi, LDN, kk * 16, nbase + nt * 8, g, t);
                    mma(off[nt], a, bb);
                }
            }
            rows_dot_into<NT>(off, sc, LDN, nbase, m0, g, t, 1.f, s_dcs, nullptr);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc_dc[nt][e] += off[nt][e];
        }
        // dB_j += sum_{i>=j} decay (u_j . dy_i) C_i + exp(cs_Q - cs_j) dS^T u_j, and the W'
        // terms of dcs (rows j, columns i: the same layout as cbt).
        {
            float w[8][4] = {};
#pragma unroll
            for (int kk = 0; kk < MP / 16; kk++) {
                unsigned a[4];
                frag_a(a, su, LDP, m0, kk * 16, g, t);
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    unsigned bb[2];
                    frag_b_nk(bb, sdy, LDP, kk * 16, nt * 8, g, t);
                    mma(w[nt], a, bb);
                }
            }
            decay(w, m0, g, t, false, len, s_cs, nullptr);
            if (half == 0) {  // both halves hold the whole tile; one adds it
                float wp[8][4], col[8][2];
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) wp[nt][e] = w[nt][e] * cbt[nt][e];
                rows_dot_into<8>(wp, nullptr, 0, 0, m0, g, t, -1.f, s_dcs, nullptr);
                // Column sums over the warp's 16 rows: lanes of equal t hold the same columns.
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int k = 0; k < 2; k++) {
                        float v = wp[nt][k] + wp[nt][2 + k];
                        v += __shfl_xor_sync(0xffffffffu, v, 4);
                        v += __shfl_xor_sync(0xffffffffu, v, 8);
                        v += __shfl_xor_sync(0xffffffffu, v, 16);
                        col[nt][k] = v;
                    }
                if (g == 0)
#pragma unroll
                    for (int nt = 0; nt < 8; nt++)
#pragma unroll
                        for (int k = 0; k < 2; k++) atomicAdd(&s_dcs[nt * 8 + 2 * t + k], col[nt][k]);
            }
            unsigned aw[4][4];
            pack_a(w, aw);
#pragma unroll
            for (int kt = 0; kt < 4; kt++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    unsigned bb[2];
                    frag_b_kn(bb, sc, LDN, kt * 16, nbase + nt * 8, g, t);
                    mma(acc_db[nt], aw[kt], bb);
                }
#pragma unroll
            for (int kk = 0; kk < MP / 16; kk++) {
                unsigned a[4];
                frag_a_rows(a, su, LDP, m0, kk * 16, g, t, e_lo, e_hi);
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    unsigned bb[2];
                    frag_b_kn(bb, sds, LDN, kk * 16, nbase + nt * 8, g, t);
                    mma(acc_db[nt], a, bb);
                }
            }
        }
        // da_t = sum_{k >= t} dcs_k: a reverse scan over the chunk by warp 0.
        __syncthreads();
        if (warp == 0) {
            const int k0 = MQ - 1 - 2 * lane;  // this lane's two steps, k0 and k0 - 1
            const float v0 = s_dcs[k0], v1 = s_dcs[k0 - 1], s2 = v0 + v1;
            float incl = s2;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float n = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += n;
            }
            const float excl = incl - s2;
            if (k0 < len) da[(row0 + k0) * H + h] = excl + v0;
            if (k0 - 1 < len) da[(row0 + k0 - 1) * H + h] = incl;
        }
    }

#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            const int r = m0 + g + 8 * hi, n = nbase + nt * 8 + 2 * t;
            if (r >= len) continue;
            const long o = (row0 + r) * gn + (long)grp * N + n;
            *reinterpret_cast<float2 *>(db + o) =
                make_float2(acc_db[nt][2 * hi], acc_db[nt][2 * hi + 1]);
            *reinterpret_cast<float2 *>(dc + o) =
                make_float2(acc_dc[nt][2 * hi], acc_dc[nt][2 * hi + 1]);
        }
}

#define INSTANTIATE_MMA(NS)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        ssd_mma_state_n##NS(const bf16_t *xbc, const bf16_t *dt, const bf16_t *ad,               \
                            const bf16_t *dy, Dims d, int rev, float *states, float *logdec) {   \
        mma_state<NS>(xbc, dt, ad, dy, d, rev, states, logdec);                                  \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        ssd_mma_out_n##NS(const bf16_t *xbc, const bf16_t *dt, const bf16_t *ad, Dims d,         \
                          const float *states, bf16_t *y) {                                      \
        mma_out<NS>(xbc, dt, ad, d, states, y);                                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1)                                         \
        ssd_mma_bwd_n##NS(const bf16_t *xbc, const bf16_t *dt, const bf16_t *ad,                 \
                          const bf16_t *dy, Dims d, const float *fst, const float *rst,          \
                          float *du, float *da, float *db, float *dc) {                          \
        mma_bwd<NS>(xbc, dt, ad, dy, d, fst, rst, du, da, db, dc);                                   \
    }

INSTANTIATE_MMA(64)
INSTANTIATE_MMA(128)
