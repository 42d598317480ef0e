//! The SSD recurrence with its input preparation and the D skip as one fused CPU op.
//!
//! Inputs: `xbc` (b, l, h*p + 2*g*n), the conv output holding x | B | C exactly as the mixer
//! produces it; `dt` (b, l, h) after softplus; `ad` (2, h) stacking A (negative) and D.
//! Per (batch, head), with u_t = dt_t x_t and lambda_t = dt_t A:
//!   S_t = exp(lambda_t) S_{t-1} + u_t B_t^T,   y_t = S_t C_t + D x_t      (S: p x n)
//! Head h reads the B/C of group h / (h_total / g). The state lives in L1 while the sequence
//! streams past, one rayon task per (batch, head); taking xbc, dt and A directly saves the
//! slicing, x*dt, cat and D-skip tensors (and their backward) that a composed version needs.
//! The forward pass keeps the state entering every `chunk` steps; backward rebuilds each chunk's
//! states from there (falling back to replaying the sequence when there is no stash) and runs
//! the adjoint recurrence G_t = dy_t C_t^T + exp(lambda_{t+1}) G_{t+1}:
//!   dC_t = S_t^T dy_t, du_t = G_t B_t, dB_t = G_t^T u_t,
//!   dlambda_t = exp(lambda_t) <G_t, S_{t-1}> = <G_t, S_t> - u_t.du_t,
//!   dx_t = dt_t du_t + D dy_t, ddt_t = x_t.du_t + A dlambda_t, dA = sum dt_t dlambda_t,
//!   dD = sum x_t.dy_t.
use super::{for_float, host_slice, simd_kernel, with_host, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use rayon::prelude::*;
use std::any::Any;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub b: usize,
    pub l: usize,
    pub h: usize,
    pub p: usize,
    pub g: usize,
    pub n: usize,
}

impl Dims {
    fn cd(&self) -> usize {
        self.h * self.p + 2 * self.g * self.n
    }
    fn x_at(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.l + t) * self.cd() + h * self.p
    }
    fn b_at(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.l + t) * self.cd() + self.h * self.p + (h / (self.h / self.g)) * self.n
    }
    fn c_at(&self, b: usize, t: usize, h: usize) -> usize {
        self.b_at(b, t, h) + self.g * self.n
    }
    fn dt_at(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.l + t) * self.h + h
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

/// Forward for one (batch, head): y rows (l x p), D skip included, and the state entering
/// each chunk of `chunk` steps ((p x n) rows, for the backward pass).
#[inline(always)]
fn forward_task_impl<T: KernelFloat>(
    d: Dims,
    chunk: usize,
    bi: usize,
    hi: usize,
    xbc: &[T],
    dt: &[T],
    ad: &[T],
) -> (Vec<T>, Vec<T>) {
    let (p, n) = (d.p, d.n);
    let (a, dskip) = (ad[hi], ad[d.h + hi]);
    let mut s = vec![T::zero(); p * n];
    let mut y = vec![T::zero(); d.l * p];
    let mut ut = vec![T::zero(); p];
    let mut ckpt = vec![T::zero(); d.l.div_ceil(chunk) * p * n];
    for t in 0..d.l {
        if t > 0 && t % chunk == 0 {
            let dst = &mut ckpt[t / chunk * p * n..][..p * n];
            for i in 0..p {
                for j in 0..n {
                    dst[i * n + j] = s[j * p + i];
                }
            }
        }
        let dtv = dt[d.dt_at(bi, t, hi)];
        let alpha = (dtv * a).exp();
        let xt = &xbc[d.x_at(bi, t, hi)..][..p];
        for (u, &x) in ut.iter_mut().zip(xt) {
            *u = dtv * x;
        }
        let bt = &xbc[d.b_at(bi, t, hi)..][..n];
        let ct = &xbc[d.c_at(bi, t, hi)..][..n];
        let yt = &mut y[t * p..(t + 1) * p];
        for (o, w) in lane_blocks(p, W) {
            if w == W {
                step_block::<T, W>(&mut s, p, o, alpha, &ut, bt, ct, yt);
            } else {
                step_block::<T, 1>(&mut s, p, o, alpha, &ut, bt, ct, yt);
            }
        }
        for (yv, &x) in yt.iter_mut().zip(xt) {
            *yv = dskip.mul_add(x, *yv);
        }
    }
    (y, ckpt)
}

/// S_t (p x n rows) from S_{t-1}.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_state<T: KernelFloat>(
    d: Dims,
    bi: usize,
    hi: usize,
    t: usize,
    xbc: &[T],
    dt: &[T],
    a: T,
    prev: &[T],
    cur: &mut [T],
) {
    let (p, n) = (d.p, d.n);
    let dtv = dt[d.dt_at(bi, t, hi)];
    let alpha = (dtv * a).exp();
    let xt = &xbc[d.x_at(bi, t, hi)..][..p];
    let bt = &xbc[d.b_at(bi, t, hi)..][..n];
    for i in 0..p {
        let ui = dtv * xt[i];
        let (pr, cr) = (&prev[i * n..(i + 1) * n], &mut cur[i * n..(i + 1) * n]);
        for j in 0..n {
            cr[j] = ui.mul_add(bt[j], alpha * pr[j]);
        }
    }
}

/// Gradients of one (batch, head).
struct TaskGrads<T> {
    dx: Vec<T>,  // l x p
    db: Vec<T>,  // l x n
    dc: Vec<T>,  // l x n
    ddt: Vec<T>, // l
    da: T,
    dd: T,
}

/// Adjoint of one time step on rows [i0, i0 + R) and lanes [j0, j0 + W) of the state:
///   G = dy C^T + alpha_next G,  dC += S^T dy,  dB += G^T u,  dlam += G . S (per lane),
///   du += G B (per row, kept in `dup` lanes and summed once per row).
/// dlambda = alpha <G, S_prev> = <G, S> - u . du (as alpha S_prev = S - u B^T), so the tile
/// reads one state, not two.
/// R rows share each load and store of the n-vectors (dC, dB, dlam), which bounded the
/// row-at-a-time loop.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn adjoint_tile<T: KernelFloat, const R: usize, const W: usize>(
    n: usize,
    i0: usize,
    j0: usize,
    alpha_next: T,
    dy: &[T; R],
    u: &[T; R],
    ct: &[T],
    bt: &[T],
    g: &mut [T],
    s: &[T],
    dct: &mut [T],
    dbt: &mut [T],
    dlv: &mut [T],
    dup: &mut [[T; W]; R],
) {
    let mut c = [T::zero(); W];
    c.copy_from_slice(&ct[j0..j0 + W]);
    let mut b = [T::zero(); W];
    b.copy_from_slice(&bt[j0..j0 + W]);
    let mut dc = [T::zero(); W];
    dc.copy_from_slice(&dct[j0..j0 + W]);
    let mut db = [T::zero(); W];
    db.copy_from_slice(&dbt[j0..j0 + W]);
    let mut dl = [T::zero(); W];
    dl.copy_from_slice(&dlv[j0..j0 + W]);
    for r in 0..R {
        let o = (i0 + r) * n + j0;
        let gr = &mut g[o..o + W];
        let sr = &s[o..o + W];
        for k in 0..W {
            let gv = dy[r].mul_add(c[k], alpha_next * gr[k]);
            gr[k] = gv;
            dc[k] = sr[k].mul_add(dy[r], dc[k]);
            db[k] = gv.mul_add(u[r], db[k]);
            dl[k] = gv.mul_add(sr[k], dl[k]);
            dup[r][k] = gv.mul_add(b[k], dup[r][k]);
        }
    }
    dct[j0..j0 + W].copy_from_slice(&dc);
    dbt[j0..j0 + W].copy_from_slice(&db);
    dlv[j0..j0 + W].copy_from_slice(&dl);
}

const ROWS: usize = 4;
const LANES: usize = 8;

/// du_i (i in [i0, i0 + R)) of one time step; see `adjoint_tile`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn adjoint_rows<T: KernelFloat, const R: usize>(
    n: usize,
    i0: usize,
    alpha_next: T,
    dy: &[T; R],
    u: &[T; R],
    ct: &[T],
    bt: &[T],
    g: &mut [T],
    s: &[T],
    dct: &mut [T],
    dbt: &mut [T],
    dlv: &mut [T],
) -> [T; R] {
    let mut wide = [[T::zero(); LANES]; R];
    let mut narrow = [[T::zero(); 1]; R];
    for (j0, w) in lane_blocks(n, LANES) {
        if w == LANES {
            adjoint_tile::<T, R, LANES>(
                n, i0, j0, alpha_next, dy, u, ct, bt, g, s, dct, dbt, dlv, &mut wide,
            );
        } else {
            adjoint_tile::<T, R, 1>(
                n,
                i0,
                j0,
                alpha_next,
                dy,
                u,
                ct,
                bt,
                g,
                s,
                dct,
                dbt,
                dlv,
                &mut narrow,
            );
        }
    }
    let mut du = [T::zero(); R];
    for r in 0..R {
        let a = &wide[r];
        du[r] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + narrow[r][0];
    }
    du
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_task_impl<T: KernelFloat>(
    d: Dims,
    chunk: usize,
    bi: usize,
    hi: usize,
    xbc: &[T],
    dt: &[T],
    ad: &[T],
    dy: &[T],
    stash: Option<&[T]>,
) -> TaskGrads<T> {
    let (p, n, l) = (d.p, d.n, d.l);
    let (a, dskip) = (ad[hi], ad[d.h + hi]);
    let pn = p * n;
    let n_chunks = l.div_ceil(chunk);
    // State entering each chunk: stashed by the forward pass, else recomputed.
    let recomputed;
    let ckpt: &[T] = match stash {
        Some(s) => s,
        None => {
            let mut ck = vec![T::zero(); n_chunks * pn];
            let mut tmp = vec![T::zero(); pn];
            for c in 1..n_chunks {
                let (done, rest) = ck.split_at_mut(c * pn);
                let next = &mut rest[..pn];
                next.copy_from_slice(&done[(c - 1) * pn..]);
                for t in (c - 1) * chunk..c * chunk {
                    update_state(d, bi, hi, t, xbc, dt, a, next, &mut tmp);
                    next.copy_from_slice(&tmp);
                }
            }
            recomputed = ck;
            &recomputed
        }
    };
    let mut out = TaskGrads {
        dx: vec![T::zero(); l * p],
        db: vec![T::zero(); l * n],
        dc: vec![T::zero(); l * n],
        ddt: vec![T::zero(); l],
        da: T::zero(),
        dd: T::zero(),
    };
    let mut gst = vec![T::zero(); pn];
    let mut states = vec![T::zero(); (chunk + 1) * pn];
    let mut alpha_next = T::zero();
    let mut dlv = vec![T::zero(); n];
    let full_rows = p / ROWS * ROWS;
    for c in (0..n_chunks).rev() {
        let t0 = c * chunk;
        let t1 = (t0 + chunk).min(l);
        // states[k] = S_{t0 + k - 1}; states[0] is the checkpoint.
        states[..pn].copy_from_slice(&ckpt[c * pn..(c + 1) * pn]);
        for t in t0..t1 {
            let k = t - t0 + 1;
            let (prev, cur) = states.split_at_mut(k * pn);
            update_state(
                d,
                bi,
                hi,
                t,
                xbc,
                dt,
                a,
                &prev[(k - 1) * pn..],
                &mut cur[..pn],
            );
        }
        for t in (t0..t1).rev() {
            let k = t - t0 + 1;
            let s_t = &states[k * pn..(k + 1) * pn];
            let dtv = dt[d.dt_at(bi, t, hi)];
            let alpha = (dtv * a).exp();
            let xt = &xbc[d.x_at(bi, t, hi)..][..p];
            let bt = &xbc[d.b_at(bi, t, hi)..][..n];
            let ct = &xbc[d.c_at(bi, t, hi)..][..n];
            let dyt = &dy[((bi * l + t) * d.h + hi) * p..][..p];
            let dbt = &mut out.db[t * n..(t + 1) * n];
            let dct = &mut out.dc[t * n..(t + 1) * n];
            let dxt = &mut out.dx[t * p..(t + 1) * p];
            dlv.iter_mut().for_each(|v| *v = T::zero());
            let mut ddt = T::zero();
            let mut finish = |i: usize, du: T| {
                let (dyi, xi) = (dyt[i], xt[i]);
                dxt[i] = dtv.mul_add(du, dskip * dyi);
                ddt = xi.mul_add(du, ddt);
                out.dd = xi.mul_add(dyi, out.dd);
            };
            for i0 in (0..full_rows).step_by(ROWS) {
                let dyr: [T; ROWS] = std::array::from_fn(|r| dyt[i0 + r]);
                let ur: [T; ROWS] = std::array::from_fn(|r| dtv * xt[i0 + r]);
                let du = adjoint_rows::<T, ROWS>(
                    n, i0, alpha_next, &dyr, &ur, ct, bt, &mut gst, s_t, dct, dbt, &mut dlv,
                );
                for (r, &v) in du.iter().enumerate() {
                    finish(i0 + r, v);
                }
            }
            for i in full_rows..p {
                let du = adjoint_rows::<T, 1>(
                    n,
                    i,
                    alpha_next,
                    &[dyt[i]],
                    &[dtv * xt[i]],
                    ct,
                    bt,
                    &mut gst,
                    s_t,
                    dct,
                    dbt,
                    &mut dlv,
                );
                finish(i, du[0]);
            }
            // ddt holds x . du here, so u . du = dt ddt.
            let dl = dlv.iter().fold(T::zero(), |acc, &v| acc + v) - dtv * ddt;
            out.ddt[t] = a.mul_add(dl, ddt);
            out.da = dtv.mul_add(dl, out.da);
            alpha_next = alpha;
        }
    }
    out
}

simd_kernel!(fn forward_task<T>(d: Dims, chunk: usize, bi: usize, hi: usize, xbc: &[T], dt: &[T], ad: &[T]) -> (Vec<T>, Vec<T>) = forward_task_impl);
simd_kernel!(fn backward_task<T>(d: Dims, chunk: usize, bi: usize, hi: usize, xbc: &[T], dt: &[T], ad: &[T], dy: &[T], stash: Option<&[T]>) -> TaskGrads<T> = backward_task_impl);

/// y, and the per-(batch, head) chunk states the backward pass starts from.
pub(super) fn forward<T: KernelFloat + WithDType>(
    d: Dims,
    chunk: usize,
    xbc: &[T],
    dt: &[T],
    ad: &[T],
) -> (Vec<T>, Vec<Vec<T>>) {
    let (rows, ckpts): (Vec<Vec<T>>, Vec<Vec<T>>) = (0..d.b * d.h)
        .into_par_iter()
        .map(|task| forward_task(d, chunk, task / d.h, task % d.h, xbc, dt, ad))
        .unzip();
    // Each batch row block is written by one thread.
    let mut y = vec![T::zero(); d.b * d.l * d.h * d.p];
    y.par_chunks_mut(d.l * d.h * d.p)
        .enumerate()
        .for_each(|(bi, yb)| {
            for hi in 0..d.h {
                let r = &rows[bi * d.h + hi];
                for t in 0..d.l {
                    let o = (t * d.h + hi) * d.p;
                    yb[o..o + d.p].copy_from_slice(&r[t * d.p..(t + 1) * d.p]);
                }
            }
        });
    (y, ckpts)
}

/// (dxbc, ddt, dad) assembled from the per-(batch, head) gradients.
#[allow(clippy::type_complexity)]
pub(super) fn backward<T: KernelFloat + WithDType>(
    d: Dims,
    chunk: usize,
    xbc: &[T],
    dt: &[T],
    ad: &[T],
    dy: &[T],
    stash: Option<&[Vec<T>]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let parts: Vec<TaskGrads<T>> = (0..d.b * d.h)
        .into_par_iter()
        .map(|task| {
            let ck = stash.map(|s| s[task].as_slice());
            backward_task(d, chunk, task / d.h, task % d.h, xbc, dt, ad, dy, ck)
        })
        .collect();
    let mut dxbc = vec![T::zero(); xbc.len()];
    let mut ddt = vec![T::zero(); dt.len()];
    let mut dad = vec![T::zero(); ad.len()];
    for (task, g) in parts.iter().enumerate() {
        let hi = task % d.h;
        dad[hi] += g.da;
        dad[d.h + hi] += g.dd;
    }
    // Each batch row block is written by one thread; offsets below are relative to it.
    let (cd, base) = (d.cd(), |bi: usize| bi * d.l * d.cd());
    dxbc.par_chunks_mut(d.l * cd)
        .zip(ddt.par_chunks_mut(d.l * d.h))
        .enumerate()
        .for_each(|(bi, (dxb, ddb))| {
            for hi in 0..d.h {
                let g = &parts[bi * d.h + hi];
                for t in 0..d.l {
                    let xo = d.x_at(bi, t, hi) - base(bi);
                    dxb[xo..xo + d.p].copy_from_slice(&g.dx[t * d.p..(t + 1) * d.p]);
                    let (bo, co) = (d.b_at(bi, t, hi) - base(bi), d.c_at(bi, t, hi) - base(bi));
                    for j in 0..d.n {
                        dxb[bo + j] += g.db[t * d.n + j];
                        dxb[co + j] += g.dc[t * d.n + j];
                    }
                    ddb[t * d.h + hi] = g.ddt[t];
                }
            }
        });
    (dxbc, ddt, dad)
}

/// The custom op. `chunk` sets the checkpoint spacing of the backward pass.
pub struct SsdFused {
    pub heads: usize,
    pub headdim: usize,
    pub groups: usize,
    pub d_state: usize,
    pub chunk: usize,
    /// Chunk states from the forward pass (`Vec<Vec<T>>`), taken by the backward pass so it
    /// does not replay the whole sequence to rebuild them. Each forward call builds a new op,
    /// so the stash belongs to exactly one graph node.
    stash: Mutex<Option<Box<dyn Any + Send>>>,
}

impl SsdFused {
    fn dims(&self, xbc: &Shape) -> Result<Dims> {
        let (b, l, cd) = xbc.dims3()?;
        let d = Dims {
            b,
            l,
            h: self.heads,
            p: self.headdim,
            g: self.groups,
            n: self.d_state,
        };
        if cd != d.cd() {
            candle_core::bail!("ssd-fused: xbc has {cd} channels, expected {}", d.cd());
        }
        Ok(d)
    }
}

impl CustomOp3 for SsdFused {
    fn name(&self) -> &'static str {
        "ssd-fused"
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
        let d = self.dims(l1.shape())?;
        // (b, l, h*p): the mixer's layout, so it needs no reshape (a graph node) after.
        let shape = Shape::from((d.b, d.l, d.h * d.p));
        for_float!(self.name(), s1.dtype(), T => {
            let (y, ckpts) = forward::<T>(
                d,
                self.chunk,
                host_slice(s1, l1)?,
                host_slice(s2, l2)?,
                host_slice(s3, l3)?,
            );
            *self.stash.lock().unwrap() = Some(Box::new(ckpts));
            Ok((T::to_cpu_storage_owned(y), shape))
        })
    }

    fn bwd(
        &self,
        xbc: &Tensor,
        dt: &Tensor,
        ad: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(xbc.shape())?;
        let stash = self.stash.lock().unwrap().take();
        fn run<T: KernelFloat + WithDType>(
            d: Dims,
            chunk: usize,
            xbc: &Tensor,
            dt: &Tensor,
            ad: &Tensor,
            grad: &Tensor,
            stash: Option<Box<dyn Any + Send>>,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let stash = stash.and_then(|s| s.downcast::<Vec<Vec<T>>>().ok());
            let stash = stash.as_deref().map(|v| v.as_slice());
            let (dx, ddt, dad) = with_host::<T, _>(xbc, |xv| {
                with_host::<T, _>(dt, |dv| {
                    with_host::<T, _>(ad, |av| {
                        with_host::<T, _>(grad, |gv| {
                            Ok(backward::<T>(d, chunk, xv, dv, av, gv, stash))
                        })
                    })
                })
            })?;
            let dev = xbc.device();
            Ok((
                Some(Tensor::from_vec(dx, xbc.shape(), dev)?),
                Some(Tensor::from_vec(ddt, dt.shape(), dev)?),
                Some(Tensor::from_vec(dad, ad.shape(), dev)?),
            ))
        }
        for_float!(self.name(), xbc.dtype(), T => run::<T>(d, self.chunk, xbc, dt, ad, grad, stash))
    }
}

/// y (b, l, h*p) = SSD(x, dt, A, B, C) + D x, reading x | B | C from the conv output `xbc`
/// (b, l, h*p + 2*g*n). dt: (b, l, h) after softplus; a, d_skip: (h).
#[allow(clippy::too_many_arguments)]
pub fn ssd_fused(
    xbc: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    d_skip: &Tensor,
    headdim: usize,
    groups: usize,
    d_state: usize,
    chunk: usize,
) -> Result<Tensor> {
    let heads = dt.dim(2)?;
    let ad = Tensor::stack(&[a, d_skip], 0)?;
    xbc.contiguous()?.apply_op3(
        &dt.contiguous()?,
        &ad,
        // Checkpoints every <= 16 steps keep the recomputed states of a chunk in L2.
        SsdFused {
            heads,
            headdim,
            groups,
            d_state,
            chunk: chunk.clamp(1, 16),
            stash: Mutex::new(None),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backward pass gives the same gradients from the forward's stashed chunk states as
    /// from states it replays itself, for lengths that do and do not fill the last chunk.
    #[test]
    fn stashed_and_replayed_chunk_states_give_the_same_gradients() {
        for l in [16, 37] {
            let d = Dims {
                b: 2,
                l,
                h: 2,
                p: 6,
                g: 1,
                n: 11,
            };
            let mut seed = 1u64;
            let mut rnd = |k: usize, lo: f64, hi: f64| -> Vec<f64> {
                (0..k)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        lo + (hi - lo) * ((seed >> 11) as f64 / (1u64 << 53) as f64)
                    })
                    .collect()
            };
            let xbc = rnd(d.b * d.l * d.cd(), -1.0, 1.0);
            let dt = rnd(d.b * d.l * d.h, 0.01, 0.5);
            let ad = [-0.5, -2.0, 1.0, 0.5];
            let dy = rnd(d.b * d.l * d.h * d.p, -1.0, 1.0);
            let chunk = 5;
            let (_, ckpts) = forward::<f64>(d, chunk, &xbc, &dt, &ad);
            let stashed = backward::<f64>(d, chunk, &xbc, &dt, &ad, &dy, Some(&ckpts));
            let replayed = backward::<f64>(d, chunk, &xbc, &dt, &ad, &dy, None);
            for (a, b) in [
                (&stashed.0, &replayed.0),
                (&stashed.1, &replayed.1),
                (&stashed.2, &replayed.2),
            ] {
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(err < 1e-12, "l = {l}: max diff {err}");
                assert!(a.iter().any(|v| *v != 0.0));
            }
        }
    }
}
