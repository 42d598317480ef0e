//! RMSNormGated on the GPU (kernels/gated_norm.cu) as a candle CustomOp with the inputs of the
//! CPU op (`ops::gated_norm::gated_rms_norm`): y, z (..., d), weight (d); out =
//! rmsnorm over groups of `group` channels of y * silu(z), times weight. Without the gate it is
//! the plain RMSNorm. Forward and backward are one kernel each; f32 or bf16 storage, f32
//! arithmetic, the weight gradient summed in f32.
use candle_core::{Result, Tensor};

/// Largest group the kernel holds in registers (256 threads x 16).
pub const MAX_GROUP: usize = 4096;

/// True when the GPU kernel handles this input: a CUDA build, a CUDA tensor of f32 or bf16,
/// group <= 4096, unless MOZ_LAB_COMPOSED_NORM is set (for comparisons).
pub fn applies(y: &Tensor, group: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        y.device().is_cuda()
            && super::cuda::supported_dtype(y.dtype())
            && (1..=MAX_GROUP).contains(&group)
            && super::cuda::kernel_enabled("MOZ_LAB_COMPOSED_NORM")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (y, group);
        false
    }
}

/// rmsnorm_group(y * silu(z)) * weight on the GPU; shapes as `ops::gated_norm::gated_rms_norm`.
pub fn gated_rms_norm_cuda(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group: usize,
    eps: f64,
) -> Result<Tensor> {
    apply(y, Some(z), weight, group, eps)
}

/// Plain RMSNorm over the last dimension on the GPU: x * rsqrt(mean(x^2) + eps) * weight.
pub fn rms_norm_cuda(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    apply(x, None, weight, weight.dim(0)?, eps)
}

fn apply(
    y: &Tensor,
    z: Option<&Tensor>,
    weight: &Tensor,
    group: usize,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let y = y.contiguous()?;
        let gated = z.is_some();
        // Without a gate the second input is y itself (ignored by the kernel, no gradient).
        let z = match z {
            Some(z) => z.contiguous()?.to_dtype(y.dtype())?,
            None => y.clone(),
        };
        y.apply_op3(
            &z,
            &weight.contiguous()?.to_dtype(y.dtype())?,
            imp::GatedNormCuda { group, eps, gated },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (y, z, weight, group, eps);
        candle_core::bail!("gated-norm-cuda: this binary was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{dtype_suffix, launch, output, tensor, view, zeros_f32};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

    const MODULE: &str = "moz_gated_norm";
    /// Rows per block: the backward adds each block's dw once.
    const RPB: usize = 16;
    const NT: u32 = 256;
    /// A null pointer argument (no gate).
    const NULL: u64 = 0;

    pub struct GatedNormCuda {
        pub group: usize,
        pub eps: f64,
        /// False: plain RMSNorm; the second input is ignored and gets no gradient.
        pub gated: bool,
    }

    impl GatedNormCuda {
        /// (rows, d) of y (..., d) with weight (d), d a multiple of the group.
        fn dims(&self, y: &Shape, z: &Shape, w: &Shape) -> Result<(usize, usize)> {
            let d = y.dims().last().copied().unwrap_or(0);
            let rows = y.elem_count() / d.max(1);
            if w.dims() != [d]
                || (self.gated && z != y)
                || self.group == 0
                || self.group > super::MAX_GROUP
                || d % self.group != 0
            {
                candle_core::bail!(
                    "gated-norm-cuda: y {y:?}, z {z:?}, weight {w:?} do not fit group {} (<= {}, dividing d)",
                    self.group,
                    super::MAX_GROUP
                );
            }
            Ok((rows, d))
        }

        /// Register slots per thread of the kernel variant that holds the group.
        fn slots(&self) -> usize {
            if self.group <= 4 * NT as usize {
                4
            } else {
                16
            }
        }

        fn cfg(&self, rows: usize, d: usize) -> LaunchConfig {
            LaunchConfig {
                grid_dim: (rows.div_ceil(RPB).max(1) as u32, (d / self.group) as u32, 1),
                block_dim: (NT, 1, 1),
                shared_mem_bytes: 0,
            }
        }

        fn fwd_t<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            (y, z, w): (CudaView<T>, CudaView<T>, CudaView<T>),
            (rows, d): (usize, usize),
            sfx: &str,
        ) -> Result<CudaSlice<T>> {
            let mut out = output::<T>(dev, rows * d)?;
            let (rows_i, d_i, g_i, eps, rpb) = (
                rows as i64,
                d as i32,
                self.group as i32,
                self.eps as f32,
                RPB as i32,
            );
            let name = format!("gated_norm_fwd_{sfx}_m{}", self.slots());
            // SAFETY: gated_norm_fwd(y, z|null, w, rows, d, group, eps, rpb, out); y, z and out
            // hold rows*d elements, w d; NT threads per (RPB rows, group) block.
            unsafe {
                if self.gated {
                    launch!(
                        dev,
                        MODULE,
                        &name,
                        self.cfg(rows, d),
                        [&y, &z, &w, &rows_i, &d_i, &g_i, &eps, &rpb, &mut out]
                    )?
                } else {
                    launch!(
                        dev,
                        MODULE,
                        &name,
                        self.cfg(rows, d),
                        [&y, &NULL, &w, &rows_i, &d_i, &g_i, &eps, &rpb, &mut out]
                    )?
                }
            };
            Ok(out)
        }

        #[allow(clippy::type_complexity)]
        fn bwd_t<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            (y, z, w, dout): (CudaView<T>, CudaView<T>, CudaView<T>, CudaView<T>),
            (rows, d): (usize, usize),
            sfx: &str,
        ) -> Result<(CudaSlice<T>, Option<CudaSlice<T>>, CudaSlice<f32>)> {
            let mut dy = output::<T>(dev, rows * d)?;
            let mut dw = zeros_f32(dev, d)?;
            let (rows_i, d_i, g_i, eps, rpb) = (
                rows as i64,
                d as i32,
                self.group as i32,
                self.eps as f32,
                RPB as i32,
            );
            let name = format!("gated_norm_bwd_{sfx}_m{}", self.slots());
            let cfg = self.cfg(rows, d);
            if self.gated {
                let mut dz = output::<T>(dev, rows * d)?;
                // SAFETY: gated_norm_bwd(y, z, w, dout, rows, d, group, eps, rpb, dy, dz,
                // dw_acc); dy and dz hold rows*d elements, dw d floats.
                unsafe {
                    launch!(
                        dev,
                        MODULE,
                        &name,
                        cfg,
                        [
                            &y, &z, &w, &dout, &rows_i, &d_i, &g_i, &eps, &rpb, &mut dy, &mut dz,
                            &mut dw
                        ]
                    )?
                };
                Ok((dy, Some(dz), dw))
            } else {
                // SAFETY: as above with no gate (z and dz null).
                unsafe {
                    launch!(
                        dev,
                        MODULE,
                        &name,
                        cfg,
                        [
                            &y, &NULL, &w, &dout, &rows_i, &d_i, &g_i, &eps, &rpb, &mut dy, &NULL,
                            &mut dw
                        ]
                    )?
                };
                Ok((dy, None, dw))
            }
        }
    }

    impl CustomOp3 for GatedNormCuda {
        fn name(&self) -> &'static str {
            "gated-rmsnorm-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("gated-norm-cuda: CPU tensors go through ops::gated_norm")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dims = self.dims(l1.shape(), l2.shape(), l3.shape())?;
            let dev = s1.device().clone();
            let op = self.name();
            let sf = dtype_suffix(s1.dtype(), "gated-norm-cuda")?;
            let storage = match s1.dtype() {
                DType::F32 => {
                    let v = (view(s1, l1, op)?, view(s2, l2, op)?, view(s3, l3, op)?);
                    CudaStorage::wrap_cuda_slice(self.fwd_t::<f32>(&dev, v, dims, sf)?, dev.clone())
                }
                _ => {
                    let v = (view(s1, l1, op)?, view(s2, l2, op)?, view(s3, l3, op)?);
                    CudaStorage::wrap_cuda_slice(
                        self.fwd_t::<half::bf16>(&dev, v, dims, sf)?,
                        dev.clone(),
                    )
                }
            };
            Ok((storage, l1.shape().clone()))
        }

        fn bwd(
            &self,
            y: &Tensor,
            z: &Tensor,
            w: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dims = self.dims(y.shape(), z.shape(), w.shape())?;
            let grad = grad.contiguous()?.to_dtype(y.dtype())?;
            let (sy, ly) = y.storage_and_layout();
            let (sz, lz) = z.storage_and_layout();
            let (sw, lw) = w.storage_and_layout();
            let (sg, lg) = grad.storage_and_layout();
            let (Storage::Cuda(sy), Storage::Cuda(sz), Storage::Cuda(sw), Storage::Cuda(sg)) =
                (&*sy, &*sz, &*sw, &*sg)
            else {
                candle_core::bail!("gated-norm-cuda: backward inputs are not on the GPU")
            };
            let dev = sy.device().clone();
            let op = self.name();
            let sf = dtype_suffix(y.dtype(), "gated-norm-cuda")?;
            macro_rules! run {
                ($t:ty) => {{
                    let v = (
                        view::<$t>(sy, ly, op)?,
                        view::<$t>(sz, lz, op)?,
                        view::<$t>(sw, lw, op)?,
                        view::<$t>(sg, lg, op)?,
                    );
                    let (dy, dz, dw) = self.bwd_t::<$t>(&dev, v, dims, sf)?;
                    (
                        tensor(dy, &dev, y.shape()),
                        dz.map(|dz| tensor(dz, &dev, z.shape())),
                        tensor(dw, &dev, w.shape()),
                    )
                }};
            }
            let (dy, dz, dw) = match y.dtype() {
                DType::F32 => run!(f32),
                _ => run!(half::bf16),
            };
            Ok((Some(dy), dz, Some(dw.to_dtype(w.dtype())?)))
        }
    }
}
