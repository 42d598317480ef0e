//! mamba_ssm's RMSNormGated (norm_before_gate = False) as one fused CPU op:
//! out = rmsnorm_group(y * silu(z)) * weight, normalised over groups of `group` channels.
//! Without the gate (z = None) it is the plain RMSNorm of the residual stream.
use super::{dot, for_float, host_slice, simd_kernel, with_host, KernelFloat};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 64;

#[inline(always)]
fn sigmoid<T: KernelFloat>(z: T) -> T {
    z.sigmoid()
}

#[inline(always)]
fn forward_task_impl<T: KernelFloat>(
    y: &[T],
    z: Option<&[T]>,
    w: &[T],
    oc: &mut [T],
    group: usize,
    eps: f64,
) {
    let d = w.len();
    let eps = T::from_f64(eps).unwrap();
    let inv = T::one() / T::from_usize(group).unwrap();
    for (ri, orow) in oc.chunks_mut(d).enumerate() {
        let o = ri * d;
        for g0 in (0..d).step_by(group) {
            match z {
                Some(z) => {
                    for i in g0..g0 + group {
                        orow[i] = y[o + i] * z[o + i] * sigmoid(z[o + i]);
                    }
                }
                None => orow[g0..g0 + group].copy_from_slice(&y[o + g0..o + g0 + group]),
            }
            let gs = &orow[g0..g0 + group];
            let r = T::one() / (dot(gs, gs) * inv + eps).sqrt();
            for i in g0..g0 + group {
                orow[i] = orow[i] * r * w[i];
            }
        }
    }
}

simd_kernel!(fn forward_task<T>(y: &[T], z: Option<&[T]>, w: &[T], oc: &mut [T], group: usize, eps: f64) -> () = forward_task_impl);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_task_impl<T: KernelFloat>(
    y: &[T],
    z: Option<&[T]>,
    w: &[T],
    dout: &[T],
    dyc: &mut [T],
    mut dzc: Option<&mut [T]>,
    group: usize,
    eps: f64,
) -> Vec<T> {
    let d = w.len();
    let eps = T::from_f64(eps).unwrap();
    let inv = T::one() / T::from_usize(group).unwrap();
    let mut dw = vec![T::zero(); d];
    let mut gh = vec![T::zero(); group];
    let mut sg = vec![T::zero(); group];
    let mut dgh = vec![T::zero(); group];
    for ri in 0..dyc.len() / d {
        for g0 in (0..d).step_by(group) {
            let o = ri * d + g0;
            // Equal-length slices (no bounds checks) and the gate test hoisted out of the
            // element loops, so each loop vectorises.
            let yg = &y[o..o + group];
            let dog = &dout[o..o + group];
            let wg = &w[g0..g0 + group];
            let dwg = &mut dw[g0..g0 + group];
            match z {
                Some(z) => {
                    let zg = &z[o..o + group];
                    for i in 0..group {
                        sg[i] = sigmoid(zg[i]);
                        gh[i] = yg[i] * zg[i] * sg[i];
                    }
                }
                None => gh.copy_from_slice(yg),
            }
            let r = T::one() / (dot(&gh, &gh) * inv + eps).sqrt();
            for i in 0..group {
                gh[i] *= r; // normalised g
                dgh[i] = dog[i] * wg[i];
                dwg[i] = dog[i].mul_add(gh[i], dwg[i]);
            }
            let m = dot(&dgh, &gh) * inv;
            let dyg = &mut dyc[o..o + group];
            match (z, dzc.as_deref_mut()) {
                (Some(z), Some(dzc)) => {
                    let zg = &z[o..o + group];
                    let dzg = &mut dzc[o..o + group];
                    for i in 0..group {
                        let dg = r * (dgh[i] - gh[i] * m);
                        let (zi, si) = (zg[i], sg[i]);
                        dyg[i] = dg * zi * si;
                        dzg[i] = dg * yg[i] * si * (T::one() + zi * (T::one() - si));
                    }
                }
                _ => {
                    for i in 0..group {
                        dyg[i] = r * (dgh[i] - gh[i] * m);
                    }
                }
            }
        }
    }
    dw
}

simd_kernel!(fn backward_task<T>(y: &[T], z: Option<&[T]>, w: &[T], dout: &[T], dyc: &mut [T], dzc: Option<&mut [T]>, group: usize, eps: f64) -> Vec<T> = backward_task_impl);

pub(super) fn forward<T: KernelFloat>(
    y: &[T],
    z: Option<&[T]>,
    w: &[T],
    group: usize,
    eps: f64,
) -> Vec<T> {
    let d = w.len();
    let span = d * ROWS_PER_TASK;
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(span).enumerate().for_each(|(ci, oc)| {
        let r = ci * span..ci * span + oc.len();
        forward_task(&y[r.clone()], z.map(|z| &z[r]), w, oc, group, eps)
    });
    out
}

#[allow(clippy::type_complexity)]
pub(super) fn backward<T: KernelFloat>(
    y: &[T],
    z: Option<&[T]>,
    w: &[T],
    dout: &[T],
    group: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len();
    let span = d * ROWS_PER_TASK;
    let mut dy = vec![T::zero(); y.len()];
    let mut dz = vec![T::zero(); if z.is_some() { y.len() } else { 0 }];
    let task = |ci: usize, dyc: &mut [T], dzc: Option<&mut [T]>| {
        let r = ci * span..ci * span + dyc.len();
        backward_task(
            &y[r.clone()],
            z.map(|z| &z[r.clone()]),
            w,
            &dout[r],
            dyc,
            dzc,
            group,
            eps,
        )
    };
    let dws: Vec<Vec<T>> = if z.is_some() {
        dy.par_chunks_mut(span)
            .zip(dz.par_chunks_mut(span))
            .enumerate()
            .map(|(ci, (dyc, dzc))| task(ci, dyc, Some(dzc)))
            .collect()
    } else {
        dy.par_chunks_mut(span)
            .enumerate()
            .map(|(ci, dyc)| task(ci, dyc, None))
            .collect()
    };
    let mut dw = vec![T::zero(); d];
    for part in &dws {
        for i in 0..d {
            dw[i] += part[i];
        }
    }
    (dy, dz, dw)
}

pub struct GatedRmsNorm {
    pub group: usize,
    pub eps: f64,
    /// False: plain RMSNorm; the second input is ignored and gets no gradient.
    pub gated: bool,
}

impl CustomOp3 for GatedRmsNorm {
    fn name(&self) -> &'static str {
        "gated-rmsnorm"
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
        let shape = l1.shape().clone();
        for_float!(self.name(), s1.dtype(), T => {
            let z = if self.gated { Some(host_slice(s2, l2)?) } else { None };
            let y = forward::<T>(host_slice(s1, l1)?, z, host_slice(s3, l3)?, self.group, self.eps);
            Ok((T::to_cpu_storage_owned(y), shape))
        })
    }

    fn bwd(
        &self,
        y: &Tensor,
        z: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: KernelFloat + WithDType>(
            op: &GatedRmsNorm,
            y: &Tensor,
            z: &Tensor,
            w: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (group, eps) = (op.group, op.eps);
            let (dy, dz, dw) = with_host::<T, _>(y, |yv| {
                with_host::<T, _>(w, |wv| {
                    with_host::<T, _>(grad, |gv| {
                        if op.gated {
                            with_host::<T, _>(z, |zv| {
                                Ok(backward::<T>(yv, Some(zv), wv, gv, group, eps))
                            })
                        } else {
                            Ok(backward::<T>(yv, None, wv, gv, group, eps))
                        }
                    })
                })
            })?;
            let dev = y.device();
            Ok((
                Some(Tensor::from_vec(dy, y.shape(), dev)?),
                if op.gated {
                    Some(Tensor::from_vec(dz, z.shape(), dev)?)
                } else {
                    None
                },
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
            ))
        }
        for_float!(self.name(), y.dtype(), T => run::<T>(self, y, z, w, grad))
    }
}

/// y, z (..., d), weight (d) -> rmsnorm over groups of `group` of y * silu(z), times weight.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group: usize,
    eps: f64,
) -> Result<Tensor> {
    y.contiguous()?.apply_op3(
        &z.contiguous()?,
        &weight.contiguous()?,
        GatedRmsNorm {
            group,
            eps,
            gated: true,
        },
    )
}

/// Plain RMSNorm over the last dimension: x * rsqrt(mean(x^2) + eps) * weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let group = weight.dim(0)?;
    x.apply_op3(
        &x,
        &weight.contiguous()?,
        GatedRmsNorm {
            group,
            eps,
            gated: false,
        },
    )
}
