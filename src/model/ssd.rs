//! The SSD (state space duality) scan of Mamba2: chunked form for training, and a slow
//! sequential recurrence kept as the test oracle.
//!
//! Per head h with scalar decay `a_h < 0`, state `S` of shape (headdim, d_state):
//!   S_t = exp(dt_t * a_h) * S_{t-1} + dt_t * x_t B_t^T,    y_t = S_t C_t
//! Head h reads the B/C of group h / (nheads / ngroups), as in mamba_ssm. The D skip is added by
//! the mixer, not here.
use candle_core::{DType, Result, Tensor, D};

/// The chunked scan (ssd_minimal of the Mamba2 paper) written with candle ops, so autograd
/// differentiates it. Quadratic attention-like form inside chunks of `chunk_size`, a linear
/// recurrence over chunk states between them.
#[derive(Debug, Clone, Copy)]
pub struct SsdScan {
    pub chunk_size: usize,
}

impl SsdScan {
    /// x: (b, l, h, p), dt: (b, l, h) (after softplus), a: (h) (negative),
    /// b_mat, c_mat: (b, l, g, n). Returns y: (b, l, h, p).
    pub fn forward(
        &self,
        x: &Tensor,
        dt: &Tensor,
        a: &Tensor,
        b_mat: &Tensor,
        c_mat: &Tensor,
    ) -> Result<Tensor> {
        let (bs, len, h, p) = x.dims4()?;
        let (_, _, g, n) = b_mat.dims4()?;
        let hg = h / g;
        let q = self.chunk_size;
        let nc = len.div_ceil(q);
        let pad = nc * q - len;
        // Zero padding at the end: dt = 0 there, so padded steps neither decay nor write the
        // state, and causality keeps real outputs untouched.
        let padded = |t: &Tensor| -> Result<Tensor> {
            if pad == 0 {
                Ok(t.clone())
            } else {
                t.pad_with_zeros(1, 0, pad)
            }
        };
        let (x, dt, b_mat, c_mat) = (padded(x)?, padded(dt)?, padded(b_mat)?, padded(c_mat)?);

        let xdt = x.broadcast_mul(&dt.unsqueeze(3)?)?; // (b, L, h, p)
        let adt = dt.broadcast_mul(a)?; // (b, L, h)

        // Chunked layouts with heads (or groups) in front for batched matmuls.
        let xdt = xdt
            .reshape((bs, nc, q, h, p))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?; // (b, h, c, q, p)
        let adt = adt
            .reshape((bs, nc, q, h))?
            .permute((0, 3, 1, 2))?
            .contiguous()?; // (b, h, c, q)
        let bc = b_mat
            .reshape((bs, nc, q, g, n))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?; // (b, g, c, q, n)
        let cc = c_mat
            .reshape((bs, nc, q, g, n))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?;

        let acs = adt.cumsum(3)?; // (b, h, c, q)

        // 1. Intra-chunk (diagonal blocks): y = (C B^T ∘ L) X with L_ij = exp(acs_i - acs_j), i >= j.
        let dev = x.device();
        let tril = Tensor::tril2(q, x.dtype(), dev)?; // 1 on and below the diagonal
        let seg = acs
            .unsqueeze(4)?
            .broadcast_sub(&acs.unsqueeze(3)?)?
            .broadcast_mul(&tril)?; // zero above the diagonal: exp cannot overflow there
        let decay_in = seg.exp()?.broadcast_mul(&tril)?; // (b, h, c, q, q)
        let cb = bmm_nt(&cc, &bc)?; // (b, g, c, q, q)
        let m = decay_in
            .reshape((bs, g, hg, nc, q, q))?
            .broadcast_mul(&cb.unsqueeze(2)?)?
            .reshape((bs, h, nc, q, q))?;
        let y_diag = bmm(&m, &xdt)?; // (b, h, c, q, p)

        // 2. State written by each chunk: sum_j exp(acs_last - acs_j) B_j x_j^T -> (b, h, c, n, p).
        let acs_last = acs.narrow(3, q - 1, 1)?; // (b, h, c, 1)
        let decay_states = acs_last.broadcast_sub(&acs)?.exp()?; // (b, h, c, q)
        let b_w = bc
            .unsqueeze(2)?
            .broadcast_mul(&decay_states.reshape((bs, g, hg, nc, q, 1))?)?
            .reshape((bs, h, nc, q, n))?;
        let states = bmm_tn(&b_w, &xdt)?; // (b, h, c, n, p)

        // 3. Inter-chunk recurrence: the state entering chunk c is
        //    sum_{c' < c} exp(cs_c - cs_{c'+1}) states_{c'}, cs = exclusive cumsum of chunk decays.
        let chunk_decay = acs_last.squeeze(3)?.contiguous()?; // (b, h, c); CUDA matmul (cumsum) needs contiguous
        let cs_incl = chunk_decay.cumsum(2)?;
        let cs_excl = (&cs_incl - &chunk_decay)?;
        let strict = if nc > 1 {
            Tensor::tril2(nc, x.dtype(), dev)?.sub(&Tensor::eye(nc, x.dtype(), dev)?)?
        } else {
            Tensor::zeros((1, 1), x.dtype(), dev)?
        };
        let seg_c = cs_excl
            .unsqueeze(3)?
            .broadcast_sub(&cs_incl.unsqueeze(2)?)?
            .broadcast_mul(&strict)?;
        let w = seg_c.exp()?.broadcast_mul(&strict)?; // (b, h, c, c)
        let states_in =
            bmm(&w, &states.reshape((bs, h, nc, n * p))?)?.reshape((bs, g, hg, nc, n, p))?;

        // 4. Output of the incoming state: y_off = exp(acs_i) C_i^T S_in, grouped so C is shared
        //    by the heads of its group.
        let s_grouped = states_in
            .permute((0, 1, 3, 4, 2, 5))?
            .contiguous()?
            .reshape((bs, g, nc, n, hg * p))?;
        let y_off = bmm(&cc, &s_grouped)? // (b, g, c, q, hg*p)
            .reshape((bs, g, nc, q, hg, p))?
            .permute((0, 1, 4, 2, 3, 5))?
            .reshape((bs, h, nc, q, p))?;
        let y_off = y_off.broadcast_mul(&acs.exp()?.unsqueeze(4)?)?;

        let y = (y_diag + y_off)?
            .permute((0, 2, 3, 1, 4))?
            .reshape((bs, nc * q, h, p))?;
        if pad == 0 {
            Ok(y)
        } else {
            y.narrow(1, 0, len)
        }
    }
}

/// Batched op(a) @ op(b) over any leading dims, flattened to one batch dim (candle's CPU matmul
/// rejects some layouts with size-1 batch dims, CUDA's any non-contiguous batch; a flat 3-D
/// batch always works). `ta` / `tb` transpose the last two dims of a / b.
fn bmm_t(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    let flat = |t: &Tensor, trans: bool| -> Result<Tensor> {
        let d = t.dims();
        let r = d.len();
        let lead: usize = d[..r - 2].iter().product();
        let t3 = t.contiguous()?.reshape((lead, d[r - 2], d[r - 1]))?;
        if trans {
            t3.transpose(1, 2)
        } else {
            Ok(t3)
        }
    };
    let (a3, b3) = (flat(a, ta)?, flat(b, tb)?);
    let y = a3.matmul(&b3)?;
    let mut out = a.dims()[..a.rank() - 2].to_vec();
    out.extend([a3.dim(1)?, b3.dim(2)?]);
    y.reshape(out)
}

fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    bmm_t(a, b, false, false)
}

/// a @ b^T with a: (..., m, k), b: (..., n, k).
fn bmm_nt(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    bmm_t(a, b, false, true)
}

/// a^T @ b with a: (..., k, m), b: (..., k, n).
fn bmm_tn(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    bmm_t(a, b, true, false)
}

/// The sequential recurrence on the host in f64: the independent oracle for `SsdScan`.
/// Shapes as in `SsdScan::forward`; returns y as a flat (b, l, h, p) vector.
pub fn ssd_sequential(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b_mat: &Tensor,
    c_mat: &Tensor,
) -> Result<Vec<f64>> {
    let (bs, len, h, p) = x.dims4()?;
    let (_, _, g, n) = b_mat.dims4()?;
    let flat =
        |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.flatten_all()?.to_vec1() };
    let (xv, dtv, av, bv, cv) = (flat(x)?, flat(dt)?, flat(a)?, flat(b_mat)?, flat(c_mat)?);
    let mut y = vec![0f64; bs * len * h * p];
    for b in 0..bs {
        for hh in 0..h {
            let gi = hh / (h / g);
            let mut state = vec![0f64; p * n];
            for t in 0..len {
                let d = dtv[(b * len + t) * h + hh];
                let decay = (d * av[hh]).exp();
                let xo = ((b * len + t) * h + hh) * p;
                let bo = ((b * len + t) * g + gi) * n;
                for i in 0..p {
                    for j in 0..n {
                        state[i * n + j] = decay * state[i * n + j] + d * xv[xo + i] * bv[bo + j];
                    }
                    y[xo + i] = (0..n).map(|j| state[i * n + j] * cv[bo + j]).sum();
                }
            }
        }
    }
    Ok(y)
}

/// Numerically stable softplus, log(1 + e^x) = max(x, 0) + log(1 + e^{-|x|}), built from
/// differentiable candle ops.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    x.relu()? + tail
}

/// RMS normalisation over the last dimension (no weight).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)
}
