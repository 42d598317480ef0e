//! Depthwise causal conv1d + bias + SiLU as one fused CPU op (mamba_ssm's causal_conv1d with
//! activation="silu"): y[t, c] = silu(bias[c] + sum_k w[c, k] x[t - (K-1) + k, c]).
use super::{for_float, host_slice, simd_kernel, with_host, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use rayon::prelude::*;

#[inline(always)]
fn sigmoid<T: KernelFloat>(z: T) -> T {
    z.sigmoid()
}

/// Pre-activation rows (l x c) of batch element `bi`; `wt` is the weight transposed to (k, c).
#[inline(always)]
fn preact<T: KernelFloat>(x: &[T], wt: &[T], bias: &[T], l: usize, c: usize, k: usize) -> Vec<T> {
    let mut z = vec![T::zero(); l * c];
    for t in 0..l {
        let zr = &mut z[t * c..(t + 1) * c];
        zr.copy_from_slice(bias);
        for tap in 0..k {
            let src = t as isize - (k as isize - 1) + tap as isize;
            if src < 0 {
                continue;
            }
            let xr = &x[src as usize * c..(src as usize + 1) * c];
            let wr = &wt[tap * c..(tap + 1) * c];
            for ch in 0..c {
                zr[ch] = wr[ch].mul_add(xr[ch], zr[ch]);
            }
        }
    }
    z
}

fn transpose<T: KernelFloat>(w: &[T], c: usize, k: usize) -> Vec<T> {
    let mut wt = vec![T::zero(); k * c];
    for ch in 0..c {
        for tap in 0..k {
            wt[tap * c + ch] = w[ch * k + tap];
        }
    }
    wt
}

#[inline(always)]
fn forward_task_impl<T: KernelFloat>(
    xb: &[T],
    wt: &[T],
    bias: &[T],
    out: &mut [T],
    l: usize,
    c: usize,
    k: usize,
) {
    let z = preact(xb, wt, bias, l, c, k);
    for (o, &zv) in out.iter_mut().zip(&z) {
        *o = zv * sigmoid(zv);
    }
}

simd_kernel!(fn forward_task<T>(xb: &[T], wt: &[T], bias: &[T], out: &mut [T], l: usize, c: usize, k: usize) -> () = forward_task_impl);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_task_impl<T: KernelFloat>(
    xb: &[T],
    dyb: &[T],
    wt: &[T],
    bias: &[T],
    dxb: &mut [T],
    l: usize,
    c: usize,
    k: usize,
) -> (Vec<T>, Vec<T>) {
    let mut dz = preact(xb, wt, bias, l, c, k);
    for (zv, &g) in dz.iter_mut().zip(dyb) {
        let s = sigmoid(*zv);
        *zv = g * s * (T::one() + *zv * (T::one() - s));
    }
    let mut dwt = vec![T::zero(); k * c];
    let mut db = vec![T::zero(); c];
    for t in 0..l {
        let dzr = &dz[t * c..(t + 1) * c];
        for ch in 0..c {
            db[ch] += dzr[ch];
        }
        for tap in 0..k {
            let src = t as isize - (k as isize - 1) + tap as isize;
            if src < 0 {
                continue;
            }
            let s = src as usize;
            let xr = &xb[s * c..(s + 1) * c];
            let wr = &wt[tap * c..(tap + 1) * c];
            let dwr = &mut dwt[tap * c..(tap + 1) * c];
            let dxr = &mut dxb[s * c..(s + 1) * c];
            for ch in 0..c {
                dwr[ch] = dzr[ch].mul_add(xr[ch], dwr[ch]);
                dxr[ch] = dzr[ch].mul_add(wr[ch], dxr[ch]);
            }
        }
    }
    (dwt, db)
}

simd_kernel!(fn backward_task<T>(xb: &[T], dyb: &[T], wt: &[T], bias: &[T], dxb: &mut [T], l: usize, c: usize, k: usize) -> (Vec<T>, Vec<T>) = backward_task_impl);

pub(super) fn forward<T: KernelFloat>(
    x: &[T],
    w: &[T],
    bias: &[T],
    b: usize,
    l: usize,
    c: usize,
    k: usize,
) -> Vec<T> {
    let wt = transpose(w, c, k);
    let mut y = vec![T::zero(); b * l * c];
    y.par_chunks_mut(l * c).enumerate().for_each(|(bi, out)| {
        forward_task(&x[bi * l * c..(bi + 1) * l * c], &wt, bias, out, l, c, k)
    });
    y
}

#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(super) fn backward<T: KernelFloat>(
    x: &[T],
    w: &[T],
    bias: &[T],
    dy: &[T],
    b: usize,
    l: usize,
    c: usize,
    k: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let wt = transpose(w, c, k);
    let mut dx = vec![T::zero(); b * l * c];
    let partial: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(l * c)
        .enumerate()
        .map(|(bi, dxb)| {
            let r = bi * l * c..(bi + 1) * l * c;
            backward_task(&x[r.clone()], &dy[r], &wt, bias, dxb, l, c, k)
        })
        .collect();
    let mut dw = vec![T::zero(); c * k];
    let mut db = vec![T::zero(); c];
    for (dwt, dbp) in &partial {
        for ch in 0..c {
            db[ch] += dbp[ch];
            for tap in 0..k {
                dw[ch * k + tap] += dwt[tap * c + ch];
            }
        }
    }
    (dx, dw, db)
}

pub struct CausalConvSilu;

impl CustomOp3 for CausalConvSilu {
    fn name(&self) -> &'static str {
        "causal-conv1d-silu"
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
        let (b, l, c) = l1.shape().dims3()?;
        let (_, k) = l2.shape().dims2()?;
        for_float!(self.name(), s1.dtype(), T => {
            let y = forward::<T>(host_slice(s1, l1)?, host_slice(s2, l2)?, host_slice(s3, l3)?, b, l, c, k);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: KernelFloat + WithDType>(
            x: &Tensor,
            w: &Tensor,
            bias: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (b, l, c) = x.dims3()?;
            let (_, k) = w.dims2()?;
            let (dx, dw, db) = with_host::<T, _>(x, |xv| {
                with_host::<T, _>(w, |wv| {
                    with_host::<T, _>(bias, |bv| {
                        with_host::<T, _>(grad, |gv| Ok(backward::<T>(xv, wv, bv, gv, b, l, c, k)))
                    })
                })
            })?;
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
                Some(Tensor::from_vec(db, bias.shape(), dev)?),
            ))
        }
        for_float!(self.name(), x.dtype(), T => run::<T>(x, w, bias, grad))
    }
}

/// x (b, l, c), weight (c, k), bias (c) -> silu(causal depthwise conv) (b, l, c).
pub fn causal_conv_silu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, CausalConvSilu)
}
