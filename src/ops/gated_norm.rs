//! mamba_ssm's RMSNormGated (norm_before_gate = False) as one fused CPU op:
//! out = rmsnorm_group(y * silu(z)) * weight, normalised over groups of `group` channels.
use super::{host_slice, host_vec, with_simd};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use num_traits::{Float, FromPrimitive};
use rayon::prelude::*;

const ROWS_PER_TASK: usize = 64;

#[inline(always)]
fn sigmoid<T: Float>(z: T) -> T {
    T::one() / (T::one() + (-z).exp())
}

fn forward<T: Float + FromPrimitive + Send + Sync>(y: &[T], z: &[T], w: &[T], group: usize, eps: f64) -> Vec<T> {
    let d = w.len();
    let eps = T::from_f64(eps).unwrap();
    let inv = T::one() / T::from_usize(group).unwrap();
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(d * ROWS_PER_TASK).enumerate().for_each(|(ci, oc)| {
        with_simd(|| {
            let base = ci * d * ROWS_PER_TASK;
            for (ri, orow) in oc.chunks_mut(d).enumerate() {
                let o = base + ri * d;
                for g0 in (0..d).step_by(group) {
                    let mut ss = T::zero();
                    for i in g0..g0 + group {
                        let gv = y[o + i] * z[o + i] * sigmoid(z[o + i]);
                        orow[i] = gv;
                        ss = ss + gv * gv;
                    }
                    let r = T::one() / (ss * inv + eps).sqrt();
                    for i in g0..g0 + group {
                        orow[i] = orow[i] * r * w[i];
                    }
                }
            }
        })
    });
    out
}

#[allow(clippy::type_complexity)]
fn backward<T: Float + FromPrimitive + Send + Sync>(
    y: &[T],
    z: &[T],
    w: &[T],
    dout: &[T],
    group: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len();
    let eps = T::from_f64(eps).unwrap();
    let inv = T::one() / T::from_usize(group).unwrap();
    let mut dy = vec![T::zero(); y.len()];
    let mut dz = vec![T::zero(); y.len()];
    let dws: Vec<Vec<T>> = dy
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(dz.par_chunks_mut(d * ROWS_PER_TASK))
        .enumerate()
        .map(|(ci, (dyc, dzc))| {
            with_simd(|| {
                let mut dw = vec![T::zero(); d];
                let mut gh = vec![T::zero(); group];
                let base = ci * d * ROWS_PER_TASK;
                for ri in 0..dyc.len() / d {
                    let o = base + ri * d;
                    for g0 in (0..d).step_by(group) {
                        let mut ss = T::zero();
                        for i in 0..group {
                            let zi = z[o + g0 + i];
                            let gv = y[o + g0 + i] * zi * sigmoid(zi);
                            gh[i] = gv;
                            ss = ss + gv * gv;
                        }
                        let r = T::one() / (ss * inv + eps).sqrt();
                        let mut m = T::zero();
                        for i in 0..group {
                            gh[i] = gh[i] * r; // normalised g
                            let dgh = dout[o + g0 + i] * w[g0 + i];
                            dw[g0 + i] = dw[g0 + i] + dout[o + g0 + i] * gh[i];
                            m = m + dgh * gh[i];
                        }
                        m = m * inv;
                        for i in 0..group {
                            let dgh = dout[o + g0 + i] * w[g0 + i];
                            let dg = r * (dgh - gh[i] * m);
                            let zi = z[o + g0 + i];
                            let s = sigmoid(zi);
                            let idx = ri * d + g0 + i;
                            dyc[idx] = dg * zi * s;
                            dzc[idx] = dg * y[o + g0 + i] * s * (T::one() + zi * (T::one() - s));
                        }
                    }
                }
                dw
            })
        })
        .collect();
    let mut dw = vec![T::zero(); d];
    for part in &dws {
        for i in 0..d {
            dw[i] = dw[i] + part[i];
        }
    }
    (dy, dz, dw)
}

pub struct GatedRmsNorm {
    pub group: usize,
    pub eps: f64,
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
        match s1.dtype() {
            DType::F32 => Ok((
                CpuStorage::F32(forward::<f32>(host_slice(s1, l1)?, host_slice(s2, l2)?, host_slice(s3, l3)?, self.group, self.eps)),
                shape,
            )),
            DType::F64 => Ok((
                CpuStorage::F64(forward::<f64>(host_slice(s1, l1)?, host_slice(s2, l2)?, host_slice(s3, l3)?, self.group, self.eps)),
                shape,
            )),
            dt => candle_core::bail!("gated-rmsnorm: unsupported dtype {dt:?}"),
        }
    }

    fn bwd(
        &self,
        y: &Tensor,
        z: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Float + FromPrimitive + WithDType + Send + Sync>(
            op: &GatedRmsNorm,
            y: &Tensor,
            z: &Tensor,
            w: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dy, dz, dw) = backward::<T>(
                &host_vec(y)?,
                &host_vec(z)?,
                &host_vec(w)?,
                &host_vec(grad)?,
                op.group,
                op.eps,
            );
            let dev = y.device();
            Ok((
                Some(Tensor::from_vec(dy, y.shape(), dev)?),
                Some(Tensor::from_vec(dz, z.shape(), dev)?),
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
            ))
        }
        match y.dtype() {
            DType::F32 => run::<f32>(self, y, z, w, grad),
            DType::F64 => run::<f64>(self, y, z, w, grad),
            dt => candle_core::bail!("gated-rmsnorm: unsupported dtype {dt:?}"),
        }
    }
}

/// y, z (..., d), weight (d) -> rmsnorm over groups of `group` of y * silu(z), times weight.
pub fn gated_rms_norm(y: &Tensor, z: &Tensor, weight: &Tensor, group: usize, eps: f64) -> Result<Tensor> {
    y.contiguous()?
        .apply_op3(&z.contiguous()?, &weight.contiguous()?, GatedRmsNorm { group, eps })
}
