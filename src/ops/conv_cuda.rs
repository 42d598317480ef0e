//! The depthwise causal conv1d + bias + SiLU on the GPU (kernels/conv.cu) as a candle CustomOp
//! with the inputs of the CPU op (`ops::conv::causal_conv_silu`): x (b, l, c), weight (c, k),
//! bias (c). Forward and backward are one kernel each; f32 or bf16 storage, f32 arithmetic,
//! the weight and bias gradients summed in f32.
use candle_core::{Result, Tensor};

/// Largest filter length the kernel holds in registers.
pub const MAX_TAPS: usize = 8;

/// True when the GPU kernel handles this input: a CUDA build, a CUDA tensor of f32 or bf16,
/// d_conv <= 8, unless MOZ_LAB_COMPOSED_CONV is set (for comparisons).
pub fn applies(x: &Tensor, taps: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda()
            && super::cuda::supported_dtype(x.dtype())
            && (1..=MAX_TAPS).contains(&taps)
            && super::cuda::kernel_enabled("MOZ_LAB_COMPOSED_CONV")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, taps);
        false
    }
}

/// x (b, l, c), weight (c, k), bias (c) -> silu(causal depthwise conv) (b, l, c), on the GPU.
pub fn causal_conv_silu_cuda(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let dt = x.dtype();
        x.contiguous()?.apply_op3(
            &weight.contiguous()?.to_dtype(dt)?,
            &bias.contiguous()?.to_dtype(dt)?,
            imp::ConvSiluCuda,
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, weight, bias);
        candle_core::bail!("conv-cuda: this binary was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{dtype_suffix, grid, launch, output, tensor, view, zeros_f32};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

    const MODULE: &str = "moz_conv";
    /// Time steps per thread in the backward pass (each walks KMAX - 1 extra steps).
    const SEG: usize = 64;
    const BLOCK: u32 = 128;

    pub struct ConvSiluCuda;

    fn dims(x: &Shape, w: &Shape, bias: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (b, l, c) = x.dims3()?;
        let (wc, k) = w.dims2()?;
        if wc != c || bias.dims() != [c] || k == 0 || k > super::MAX_TAPS {
            candle_core::bail!(
                "conv-cuda: x {x:?}, weight {w:?}, bias {bias:?} do not fit (weight (c, k <= {}), bias (c))",
                super::MAX_TAPS
            );
        }
        Ok((b, l, c, k))
    }

    fn fwd_t<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        (x, w, bias): (CudaView<T>, CudaView<T>, CudaView<T>),
        (b, l, c, k): (usize, usize, usize, usize),
        sfx: &str,
    ) -> Result<CudaStorage> {
        let n = b * l * c;
        let mut y = output::<T>(dev, n)?;
        let (bi, li, ci, ki) = (b as i32, l as i32, c as i32, k as i32);
        let name = format!("conv_silu_fwd_{sfx}");
        // SAFETY: conv_silu_fwd(x, w, bias, B, L, C, K, y), one thread per element of y (n).
        unsafe {
            launch!(
                dev,
                MODULE,
                &name,
                grid(n, 256)?,
                [&x, &w, &bias, &bi, &li, &ci, &ki, &mut y]
            )?
        };
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    fn bwd_t<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        (x, w, bias, dy): (CudaView<T>, CudaView<T>, CudaView<T>, CudaView<T>),
        (b, l, c, k): (usize, usize, usize, usize),
        sfx: &str,
    ) -> Result<(CudaSlice<T>, Tensor, Tensor)> {
        let mut dx = output::<T>(dev, b * l * c)?;
        let mut dw = zeros_f32(dev, c * k)?;
        let mut db = zeros_f32(dev, c)?;
        let (bi, li, ci, ki, seg) = (b as i32, l as i32, c as i32, k as i32, SEG as i32);
        let cfg = LaunchConfig {
            grid_dim: (
                (c as u32).div_ceil(BLOCK),
                l.div_ceil(SEG).max(1) as u32,
                b.max(1) as u32,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("conv_silu_bwd_{sfx}");
        // SAFETY: conv_silu_bwd(x, w, bias, dy, B, L, C, K, seg, dx, dw_acc, db_acc); a thread
        // per (channel, segment of SEG steps, batch); dx holds b*l*c, dw c*k, db c elements.
        unsafe {
            launch!(
                dev,
                MODULE,
                &name,
                cfg,
                [&x, &w, &bias, &dy, &bi, &li, &ci, &ki, &seg, &mut dx, &mut dw, &mut db]
            )?
        };
        let dw = tensor(dw, dev, &Shape::from((c, k)));
        let db = tensor(db, dev, &Shape::from(c));
        Ok((dx, dw, db))
    }

    impl CustomOp3 for ConvSiluCuda {
        fn name(&self) -> &'static str {
            "causal-conv1d-silu-cuda"
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
            candle_core::bail!("conv-cuda: CPU tensors go through ops::conv::causal_conv_silu")
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
            let d = dims(l1.shape(), l2.shape(), l3.shape())?;
            let dev = s1.device().clone();
            let op = self.name();
            let sf = dtype_suffix(s1.dtype(), "conv-cuda")?;
            let storage = match s1.dtype() {
                DType::F32 => fwd_t::<f32>(
                    &dev,
                    (view(s1, l1, op)?, view(s2, l2, op)?, view(s3, l3, op)?),
                    d,
                    sf,
                )?,
                _ => fwd_t::<half::bf16>(
                    &dev,
                    (view(s1, l1, op)?, view(s2, l2, op)?, view(s3, l3, op)?),
                    d,
                    sf,
                )?,
            };
            Ok((storage, l1.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            bias: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let d = dims(x.shape(), w.shape(), bias.shape())?;
            let grad = grad.contiguous()?.to_dtype(x.dtype())?;
            let (sx, lx) = x.storage_and_layout();
            let (sw, lw) = w.storage_and_layout();
            let (sb, lb) = bias.storage_and_layout();
            let (sg, lg) = grad.storage_and_layout();
            let (Storage::Cuda(sx), Storage::Cuda(sw), Storage::Cuda(sb), Storage::Cuda(sg)) =
                (&*sx, &*sw, &*sb, &*sg)
            else {
                candle_core::bail!("conv-cuda: backward inputs are not on the GPU")
            };
            let dev = sx.device().clone();
            let op = self.name();
            let sf = dtype_suffix(x.dtype(), "conv-cuda")?;
            macro_rules! run {
                ($t:ty) => {{
                    let (dx, dw, db) = bwd_t::<$t>(
                        &dev,
                        (
                            view(sx, lx, op)?,
                            view(sw, lw, op)?,
                            view(sb, lb, op)?,
                            view(sg, lg, op)?,
                        ),
                        d,
                        sf,
                    )?;
                    (tensor(dx, &dev, x.shape()), dw, db)
                }};
            }
            let (dx, dw, db) = match x.dtype() {
                DType::F32 => run!(f32),
                _ => run!(half::bf16),
            };
            Ok((
                Some(dx),
                Some(dw.to_dtype(w.dtype())?),
                Some(db.to_dtype(bias.dtype())?),
            ))
        }
    }
}
