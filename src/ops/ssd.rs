//! The SSD recurrence as one fused CPU op.
//!
//! Inputs: `u` (b, l, h, p+1) packing u_t = dt_t * x_t with the log-decay lambda_t = dt_t * a_h in
//! the last column (candle custom ops take at most three tensors), `B` and `C` (b, l, g, n).
//!   S_t = exp(lambda_t) S_{t-1} + u_t B_t^T,   y_t = S_t C_t        (S: p x n per (b, h))
//! The state lives in L1 while the sequence streams past, one rayon task per (batch, head).
//! Backward recomputes states from checkpoints taken every `chunk` steps and runs the adjoint
//! recurrence G_t = dy_t C_t^T + exp(lambda_{t+1}) G_{t+1}:
//!   dC_t = S_t^T dy_t, du_t = G_t B_t, dB_t = G_t^T u_t, dlambda_t = exp(lambda_t) <G_t, S_{t-1}>.
use super::{dot, for_float, host_slice, host_vec, simd_kernel, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    l: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
}

impl Dims {
    fn of(u: &Shape, bm: &Shape) -> Result<Dims> {
        let (b, l, h, p1) = u.dims4()?;
        let (_, _, g, n) = bm.dims4()?;
        Ok(Dims {
            b,
            l,
            h,
            p: p1 - 1,
            g,
            n,
        })
    }
    fn u_at(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.l + t) * self.h + h) * (self.p + 1)
    }
    fn bc_at(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.l + t) * self.g + h / (self.h / self.g)) * self.n
    }
}

// The forward pass stores the state transposed, (n x p): the update then runs along p with B_j
// and C_j as scalars, so a block of W lanes of y stays in registers across the n loop and no
// horizontal sum is needed. The backward pass keeps (p x n) rows and uses dot products.
const W: usize = 32;

/// Lane blocks of p: full `w`-wide blocks, then single lanes.
fn lane_blocks(p: usize, w: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = p / w * w;
    (0..full)
        .step_by(w)
        .map(move |o| (o, w))
        .chain((full..p).map(|o| (o, 1)))
}

/// One step of the forward recurrence on lanes [o, o + w) of the state.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn step_block<T: KernelFloat, const B: usize>(
    s: &mut [T],
    p: usize,
    o: usize,
    alpha: T,
    u: &[T],
    bt: &[T],
    ct: &[T],
    y: &mut [T],
) {
    let mut uu = [T::zero(); B];
    uu.copy_from_slice(&u[o..o + B]);
    let mut acc = [T::zero(); B];
    for (j, (&bj, &cj)) in bt.iter().zip(ct).enumerate() {
        let row = &mut s[j * p + o..j * p + o + B];
        for k in 0..B {
            let v = bj.mul_add(uu[k], alpha * row[k]);
            row[k] = v;
            acc[k] = v.mul_add(cj, acc[k]);
        }
    }
    y[o..o + B].copy_from_slice(&acc);
}

/// Forward for one (batch, head): returns y rows (l x p).
#[inline(always)]
fn forward_task_impl<T: KernelFloat>(
    d: Dims,
    bi: usize,
    hi: usize,
    u: &[T],
    bm: &[T],
    cm: &[T],
) -> Vec<T> {
    let (p, n) = (d.p, d.n);
    let mut s = vec![T::zero(); p * n];
    let mut y = vec![T::zero(); d.l * p];
    for t in 0..d.l {
        let uo = d.u_at(bi, t, hi);
        let bo = d.bc_at(bi, t, hi);
        let alpha = u[uo + p].exp();
        let (bt, ct) = (&bm[bo..bo + n], &cm[bo..bo + n]);
        let ut = &u[uo..uo + p];
        let yt = &mut y[t * p..(t + 1) * p];
        for (o, w) in lane_blocks(p, W) {
            if w == W {
                step_block::<T, W>(&mut s, p, o, alpha, ut, bt, ct, yt);
            } else {
                step_block::<T, 1>(&mut s, p, o, alpha, ut, bt, ct, yt);
            }
        }
    }
    y
}

/// Gradients of one (batch, head): (du packed l x (p+1), dB l x n, dC l x n).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_task_impl<T: KernelFloat>(
    d: Dims,
    chunk: usize,
    bi: usize,
    hi: usize,
    u: &[T],
    bm: &[T],
    cm: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (p, n, l) = (d.p, d.n, d.l);
    let pn = p * n;
    let n_chunks = l.div_ceil(chunk);
    // State entering each chunk.
    let mut ckpt = vec![T::zero(); n_chunks * pn];
    let mut s = vec![T::zero(); pn];
    for t in 0..l {
        if t % chunk == 0 {
            ckpt[(t / chunk) * pn..(t / chunk + 1) * pn].copy_from_slice(&s);
        }
        let uo = d.u_at(bi, t, hi);
        let bo = d.bc_at(bi, t, hi);
        let alpha = u[uo + p].exp();
        let bt = &bm[bo..bo + n];
        for i in 0..p {
            let ui = u[uo + i];
            for (sv, &bv) in s[i * n..(i + 1) * n].iter_mut().zip(bt) {
                *sv = ui.mul_add(bv, alpha * *sv);
            }
        }
    }
    let mut du = vec![T::zero(); l * (p + 1)];
    let mut db = vec![T::zero(); l * n];
    let mut dc = vec![T::zero(); l * n];
    let mut gst = vec![T::zero(); pn];
    let mut states = vec![T::zero(); (chunk + 1) * pn];
    let mut alpha_next = T::zero();
    let mut dlv = vec![T::zero(); n];
    for c in (0..n_chunks).rev() {
        let t0 = c * chunk;
        let t1 = (t0 + chunk).min(l);
        // states[k] = S_{t0 + k - 1}; states[0] is the checkpoint.
        states[..pn].copy_from_slice(&ckpt[c * pn..(c + 1) * pn]);
        for t in t0..t1 {
            let k = t - t0 + 1;
            let (prev, cur) = states.split_at_mut(k * pn);
            let prev = &prev[(k - 1) * pn..];
            let cur = &mut cur[..pn];
            let uo = d.u_at(bi, t, hi);
            let bo = d.bc_at(bi, t, hi);
            let alpha = u[uo + p].exp();
            let bt = &bm[bo..bo + n];
            for i in 0..p {
                let ui = u[uo + i];
                for ((c, &pv), &bv) in cur[i * n..(i + 1) * n]
                    .iter_mut()
                    .zip(&prev[i * n..(i + 1) * n])
                    .zip(bt)
                {
                    *c = ui.mul_add(bv, alpha * pv);
                }
            }
        }
        for t in (t0..t1).rev() {
            let k = t - t0 + 1;
            let s_t = &states[k * pn..(k + 1) * pn];
            let s_prev = &states[(k - 1) * pn..k * pn];
            let uo = d.u_at(bi, t, hi);
            let bo = d.bc_at(bi, t, hi);
            let alpha = u[uo + p].exp();
            let bt = &bm[bo..bo + n];
            let ct = &cm[bo..bo + n];
            let dyt = &dy[((bi * l + t) * d.h + hi) * p..][..p];
            let dbt = &mut db[t * n..(t + 1) * n];
            let dct = &mut dc[t * n..(t + 1) * n];
            // <G_t, S_{t-1}> accumulated per lane, summed once per step.
            dlv.iter_mut().for_each(|v| *v = T::zero());
            let ct = &ct[..n];
            let bt = &bt[..n];
            let dct = &mut dct[..n];
            let dbt = &mut dbt[..n];
            let dlv = &mut dlv[..n];
            for i in 0..p {
                let dyi = dyt[i];
                let ui = u[uo + i];
                // Equal-length slices let LLVM drop bounds checks and vectorise the j loop.
                let grow = &mut gst[i * n..(i + 1) * n];
                let srow = &s_t[i * n..(i + 1) * n];
                let prow = &s_prev[i * n..(i + 1) * n];
                for j in 0..n {
                    let gv = dyi.mul_add(ct[j], alpha_next * grow[j]);
                    grow[j] = gv;
                    dct[j] = srow[j].mul_add(dyi, dct[j]);
                    dbt[j] = gv.mul_add(ui, dbt[j]);
                    dlv[j] = gv.mul_add(prow[j], dlv[j]);
                }
                du[t * (p + 1) + i] = dot(grow, bt);
            }
            du[t * (p + 1) + p] = alpha * dlv.iter().fold(T::zero(), |a, &v| a + v);
            alpha_next = alpha;
        }
    }
    (du, db, dc)
}

simd_kernel!(fn forward_task<T>(d: Dims, bi: usize, hi: usize, u: &[T], bm: &[T], cm: &[T]) -> Vec<T> = forward_task_impl);
simd_kernel!(fn backward_task<T>(d: Dims, chunk: usize, bi: usize, hi: usize, u: &[T], bm: &[T], cm: &[T], dy: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) = backward_task_impl);

fn forward<T: KernelFloat + WithDType>(d: Dims, u: &[T], bm: &[T], cm: &[T]) -> Vec<T> {
    let rows: Vec<Vec<T>> = (0..d.b * d.h)
        .into_par_iter()
        .map(|task| forward_task(d, task / d.h, task % d.h, u, bm, cm))
        .collect();
    let mut y = vec![T::zero(); d.b * d.l * d.h * d.p];
    for (task, r) in rows.iter().enumerate() {
        let (bi, hi) = (task / d.h, task % d.h);
        for t in 0..d.l {
            let o = ((bi * d.l + t) * d.h + hi) * d.p;
            y[o..o + d.p].copy_from_slice(&r[t * d.p..(t + 1) * d.p]);
        }
    }
    y
}

#[allow(clippy::type_complexity)]
fn backward<T: KernelFloat + WithDType>(
    d: Dims,
    chunk: usize,
    u: &[T],
    bm: &[T],
    cm: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let parts: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..d.b * d.h)
        .into_par_iter()
        .map(|task| backward_task(d, chunk, task / d.h, task % d.h, u, bm, cm, dy))
        .collect();
    let mut du = vec![T::zero(); u.len()];
    let mut db = vec![T::zero(); bm.len()];
    let mut dc = vec![T::zero(); cm.len()];
    for (task, (du_t, db_t, dc_t)) in parts.iter().enumerate() {
        let (bi, hi) = (task / d.h, task % d.h);
        for t in 0..d.l {
            let uo = d.u_at(bi, t, hi);
            du[uo..uo + d.p + 1].copy_from_slice(&du_t[t * (d.p + 1)..(t + 1) * (d.p + 1)]);
            let bo = d.bc_at(bi, t, hi);
            for j in 0..d.n {
                db[bo + j] += db_t[t * d.n + j];
                dc[bo + j] += dc_t[t * d.n + j];
            }
        }
    }
    (du, db, dc)
}

/// The custom op; `chunk` sets the checkpoint spacing of the backward pass (capped at 16
/// steps so the recomputed states of a chunk stay in L2).
pub struct SsdRecurrence {
    pub chunk: usize,
}

impl CustomOp3 for SsdRecurrence {
    fn name(&self) -> &'static str {
        "ssd-recurrence"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1.shape(), l2.shape())?;
        let shape = Shape::from((d.b, d.l, d.h, d.p));
        for_float!(self.name(), s1.dtype(), T => {
            let y = forward::<T>(d, host_slice(s1, l1)?, host_slice(s2, l2)?, host_slice(s3, l3)?);
            Ok((T::to_cpu_storage_owned(y), shape))
        })
    }

    fn bwd(
        &self,
        u: &Tensor,
        bm: &Tensor,
        cm: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(u.shape(), bm.shape())?;
        fn run<T: KernelFloat + WithDType>(
            d: Dims,
            chunk: usize,
            u: &Tensor,
            bm: &Tensor,
            cm: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let uu = host_vec::<T>(u)?;
            let gg = host_vec::<T>(grad)?;
            let (du, db, dc) =
                backward::<T>(d, chunk, &uu, &host_vec::<T>(bm)?, &host_vec::<T>(cm)?, &gg);

            let dev = u.device();
            Ok((
                Some(Tensor::from_vec(du, u.shape(), dev)?),
                Some(Tensor::from_vec(db, bm.shape(), dev)?),
                Some(Tensor::from_vec(dc, cm.shape(), dev)?),
            ))
        }
        for_float!(self.name(), u.dtype(), T => run::<T>(d, self.chunk, u, bm, cm, grad))
    }
}

/// y (b, l, h, p) of the recurrence for x (b, l, h, p), dt (b, l, h), a (h), B, C (b, l, g, n).
pub fn ssd_recurrence(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b_mat: &Tensor,
    c_mat: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let u = x.broadcast_mul(&dt.unsqueeze(3)?)?;
    let lambda = dt.broadcast_mul(a)?.unsqueeze(3)?;
    let packed = Tensor::cat(&[&u, &lambda], 3)?.contiguous()?;
    packed.apply_op3(
        &b_mat.contiguous()?,
        &c_mat.contiguous()?,
        SsdRecurrence {
            chunk: chunk.max(1),
        },
    )
}
