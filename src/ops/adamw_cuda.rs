//! The optimizer's element-wise work on the GPU (kernels/adamw.cu): one AdamW step of a
//! parameter in one pass (the composed candle form is ~14 passes plus a cast), and the sum of
//! squares of many gradients into one f64 accumulator read once (candle's `sum_all` reduces
//! in a single block and the composed norm reads nothing until the end anyway, but costs three
//! passes and a launch-bound reduce per parameter). Same arithmetic as the CPU op
//! (`ops::adamw`), so CPU, GPU and composed updates agree to f32 rounding.
use super::adamw::AdamStep;
use candle_core::{DType, Result, Tensor};

/// True when the GPU step applies to a parameter: a CUDA build and tensor, f32 weights and
/// moments (the master copy when the parameter is bf16), a gradient of f32 or bf16, unless
/// MOZ_LAB_COMPOSED_ADAMW is set (for comparisons).
pub fn step_applies(w: &Tensor, g: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        w.device().is_cuda()
            && w.dtype() == DType::F32
            && super::cuda::supported_dtype(g.dtype())
            && super::cuda::kernel_enabled("MOZ_LAB_COMPOSED_ADAMW")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (w, g);
        false
    }
}

/// True when the GPU sum of squares applies to a gradient: a CUDA build and tensor of f32 or
/// bf16, unless MOZ_LAB_COMPOSED_ADAMW is set.
pub fn sum_sq_applies(g: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        g.device().is_cuda()
            && super::cuda::supported_dtype(g.dtype())
            && super::cuda::kernel_enabled("MOZ_LAB_COMPOSED_ADAMW")
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = g;
        false
    }
}

/// The result of one GPU AdamW step: new f32 weights (the master when the parameter is
/// bf16), moments, and the weights rounded to bf16 when asked for.
#[derive(Debug)]
pub struct StepOut {
    pub w: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub w_bf16: Option<Tensor>,
}

/// One AdamW step on the GPU: w, m, v f32, g f32 or bf16, all of one shape on one device;
/// `bf16_copy` also returns w' rounded to bf16 (round to nearest even).
pub fn adamw_step_cuda(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: AdamStep,
    bf16_copy: bool,
) -> Result<StepOut> {
    for (what, t) in [("gradient", g), ("exp_avg", m), ("exp_avg_sq", v)] {
        if t.shape() != w.shape() {
            candle_core::bail!(
                "adamw-cuda: {what} {:?} does not match the weight {:?}",
                t.shape(),
                w.shape()
            );
        }
    }
    for (what, t) in [("weight", w), ("exp_avg", m), ("exp_avg_sq", v)] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("adamw-cuda: the {what} is {:?}, not f32", t.dtype());
        }
    }
    #[cfg(feature = "cuda")]
    {
        imp::step(
            &w.contiguous()?,
            &g.contiguous()?,
            &m.contiguous()?,
            &v.contiguous()?,
            s,
            bf16_copy,
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (s, bf16_copy);
        candle_core::bail!("adamw-cuda: this binary was built without the `cuda` feature")
    }
}

/// sum over all tensors of sum(x^2), in f64, on the GPU: every tensor adds into one device
/// accumulator, read back once. f32 or bf16 tensors on one CUDA device; 0 for none.
pub fn sum_sq_cuda(ts: &[&Tensor]) -> Result<f64> {
    if ts.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    {
        imp::sum_sq(ts)
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::bail!("sum-sq-cuda: this binary was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{grid, launch, output, tensor, view};
    use super::{AdamStep, StepOut};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{DType, Layout, Result, Storage, Tensor};

    const MODULE: &str = "moz_adamw";
    const BLOCK: u32 = 256;
    /// Blocks of a grid-stride launch: enough to fill an H200 (132 SMs) several times over.
    const MAX_BLOCKS: usize = 2048;
    /// SUM_SQ_BLOCK in kernels/adamw.cu.
    const SUM_SQ_BLOCK: u32 = 256;

    /// `struct AdamConsts` of kernels/adamw.cu, passed by value.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct AdamConsts {
        grad_scale: f32,
        b1: f32,
        nb1: f32,
        b2: f32,
        nb2: f32,
        ibc1: f32,
        ibc2: f32,
        eps: f32,
        lr: f32,
        decay: f32,
        scale: i32,
        decayed: i32,
    }

    // SAFETY: a plain #[repr(C)] struct of f32 and i32 fields, laid out as the kernels'
    // `AdamConsts` (ten floats, then two ints).
    unsafe impl DeviceRepr for AdamConsts {}

    impl AdamConsts {
        /// The constants rounded to f32 from f64 exactly as the CPU op computes them.
        fn new(s: AdamStep) -> AdamConsts {
            let c = |x: f64| x as f32;
            AdamConsts {
                grad_scale: c(s.grad_scale),
                b1: c(s.beta1),
                nb1: c(1.0 - s.beta1),
                b2: c(s.beta2),
                nb2: c(1.0 - s.beta2),
                ibc1: c(1.0 / s.bc1),
                ibc2: c(1.0 / s.bc2),
                eps: c(s.eps),
                lr: c(s.lr),
                decay: c(1.0 - s.lr * s.weight_decay),
                scale: (s.grad_scale != 1.0) as i32,
                decayed: (s.weight_decay > 0.0) as i32,
            }
        }
    }

    /// A grid-stride launch over n elements.
    fn strided(n: usize, block: u32) -> Result<LaunchConfig> {
        let mut cfg = grid(n, block)?;
        cfg.grid_dim.0 = cfg.grid_dim.0.min(MAX_BLOCKS as u32);
        Ok(cfg)
    }

    fn cuda<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("adamw-cuda: the {what} is not on the GPU"),
        }
    }

    pub fn step(
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        s: AdamStep,
        bf16_copy: bool,
    ) -> Result<StepOut> {
        const OP: &str = "adamw-cuda";
        let (sw, lw) = w.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (sm, lm) = m.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sw, sg, sm, sv) = (
            cuda(&sw, "weight")?,
            cuda(&sg, "gradient")?,
            cuda(&sm, "exp_avg")?,
            cuda(&sv, "exp_avg_sq")?,
        );
        let dev: CudaDevice = sw.device().clone();
        let n = w.elem_count();
        let (vw, vm, vv) = (
            view::<f32>(sw, lw, OP)?,
            view::<f32>(sm, lm, OP)?,
            view::<f32>(sv, lv, OP)?,
        );
        let mut wo = output::<f32>(&dev, n)?;
        let mut mo = output::<f32>(&dev, n)?;
        let mut vo = output::<f32>(&dev, n)?;
        let c = AdamConsts::new(s);
        let nl = n as i64;
        let cfg = strided(n, BLOCK)?;
        let sfx = match g.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            d => candle_core::bail!("adamw-cuda: unsupported gradient dtype {d:?}"),
        };
        let mut wb = None;
        macro_rules! run {
            ($gt:ty) => {{
                let vg = view::<$gt>(sg, lg, OP)?;
                if bf16_copy {
                    let mut b = output::<half::bf16>(&dev, n)?;
                    let name = format!("adamw_step_{sfx}_copy");
                    // SAFETY: adamw_step_*_copy(w, g, m, v, n, consts, wo, mo, vo, wb): every
                    // buffer holds n elements (w, m, v, wo, mo, vo f32, g $gt, wb bf16).
                    unsafe {
                        launch!(
                            &dev,
                            MODULE,
                            &name,
                            cfg,
                            [&vw, &vg, &vm, &vv, &nl, &c, &mut wo, &mut mo, &mut vo, &mut b]
                        )?
                    };
                    wb = Some(b);
                } else {
                    let name = format!("adamw_step_{sfx}");
                    // SAFETY: adamw_step_*(w, g, m, v, n, consts, wo, mo, vo): every buffer
                    // holds n elements (f32, g $gt).
                    unsafe {
                        launch!(
                            &dev,
                            MODULE,
                            &name,
                            cfg,
                            [&vw, &vg, &vm, &vv, &nl, &c, &mut wo, &mut mo, &mut vo]
                        )?
                    };
                }
            }};
        }
        match g.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        }
        let shape = w.shape();
        Ok(StepOut {
            w: tensor(wo, &dev, shape),
            m: tensor(mo, &dev, shape),
            v: tensor(vo, &dev, shape),
            w_bf16: wb.map(|b| tensor(b, &dev, shape)),
        })
    }

    fn add_sum_sq(
        dev: &CudaDevice,
        s: &CudaStorage,
        l: &Layout,
        acc: &mut CudaSlice<f64>,
    ) -> Result<()> {
        const OP: &str = "sum-sq-cuda";
        let n = l.shape().elem_count();
        if n == 0 {
            return Ok(());
        }
        let nl = n as i64;
        let cfg = strided(n, SUM_SQ_BLOCK)?;
        match s.dtype() {
            DType::F32 => {
                let x = view::<f32>(s, l, OP)?;
                // SAFETY: sum_sq_f32(x, n, acc): x holds n f32, acc one f64; blocks of
                // SUM_SQ_BLOCK threads, as the kernel's shared array assumes.
                unsafe { launch!(dev, MODULE, "sum_sq_f32", cfg, [&x, &nl, acc])? }
            }
            DType::BF16 => {
                let x = view::<half::bf16>(s, l, OP)?;
                // SAFETY: as above with n bf16.
                unsafe { launch!(dev, MODULE, "sum_sq_bf16", cfg, [&x, &nl, acc])? }
            }
            d => candle_core::bail!("sum-sq-cuda: unsupported dtype {d:?}"),
        }
        Ok(())
    }

    pub fn sum_sq(ts: &[&Tensor]) -> Result<f64> {
        let dev = match ts[0].device() {
            candle_core::Device::Cuda(d) => d.clone(),
            _ => candle_core::bail!("sum-sq-cuda: the tensors are not on the GPU"),
        };
        let mut acc = dev.alloc_zeros::<f64>(1)?;
        for t in ts {
            if !t.device().same_device(ts[0].device()) {
                candle_core::bail!("sum-sq-cuda: the tensors are on different devices");
            }
            let t = t.contiguous()?;
            let (st, lt) = t.storage_and_layout();
            add_sum_sq(&dev, cuda(&st, "tensor")?, lt, &mut acc)?;
        }
        tensor(acc, &dev, &candle_core::Shape::from(())).to_scalar::<f64>()
    }
}
