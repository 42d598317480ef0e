//! The optimizer's element-wise work on the GPU (kernels/adamw.cu), one launch per step each:
//! the AdamW update of every parameter in place (the composed candle form is ~14 passes plus a
//! cast per parameter), and the sum of squares of every gradient into one f64 accumulator.
//! Launching per parameter cost ~17 us of host time each, and MoZ has ~130 parameters. Same
//! arithmetic as the CPU op (`ops::adamw`), so CPU, GPU and composed updates agree to f32
//! rounding.
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

/// One parameter of a multi-tensor AdamW step on the GPU. `w`, `m` and `v` are f32 and are
/// updated in place; so is `copy`, the tensor the model computes with when `w` is its f32
/// master (bf16 gets w' rounded to nearest even, f32 gets w').
#[derive(Debug, Clone, Copy)]
pub struct StepTensor<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub copy: Option<&'a Tensor>,
    /// Decoupled weight decay of this parameter (0 when it is not decayed).
    pub weight_decay: f64,
}

/// One AdamW step of every parameter in `items`, in one kernel launch: `s` holds the step's
/// shared constants (its `weight_decay` is unused: each item has its own). All tensors on one
/// CUDA device, of matching shapes, and contiguous except the gradients.
pub fn adamw_multi_step_cuda(items: &[StepTensor], s: AdamStep) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    for it in items {
        for (what, t) in [("gradient", it.g), ("exp_avg", it.m), ("exp_avg_sq", it.v)]
            .into_iter()
            .chain(it.copy.map(|c| ("parameter", c)))
        {
            if t.shape() != it.w.shape() {
                candle_core::bail!(
                    "adamw-cuda: {what} {:?} does not match the weight {:?}",
                    t.shape(),
                    it.w.shape()
                );
            }
        }
        for (what, t) in [("weight", it.w), ("exp_avg", it.m), ("exp_avg_sq", it.v)] {
            if t.dtype() != DType::F32 {
                candle_core::bail!("adamw-cuda: the {what} is {:?}, not f32", t.dtype());
            }
        }
    }
    #[cfg(feature = "cuda")]
    {
        imp::step(items, s)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = s;
        candle_core::bail!("adamw-cuda: this binary was built without the `cuda` feature")
    }
}

/// sum over all tensors of sum(x^2), in f64, on the GPU in one launch, as an f64 scalar
/// tensor on the device (not read yet, so the caller can read it with other values in one
/// transfer). f32 or bf16 tensors on one CUDA device; None for none.
pub fn sum_sq_cuda(ts: &[&Tensor]) -> Result<Option<Tensor>> {
    if ts.is_empty() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::sum_sq(ts).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        candle_core::bail!("sum-sq-cuda: this binary was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{launch, tensor};
    use super::{AdamStep, StepTensor};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
    use candle_core::{DType, Device, Result, Storage, Tensor};

    const MODULE: &str = "moz_adamw";
    /// MT_CHUNK and MT_BLOCK in kernels/adamw.cu.
    const CHUNK: usize = 4096;
    const BLOCK: u32 = 256;
    const DECAYED: i32 = 1;
    const G_BF16: i32 = 2;
    const COPY_BF16: i32 = 4;
    const COPY_F32: i32 = 8;

    /// `struct MtTensor` of kernels/adamw.cu.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    struct MtTensor {
        w: u64,
        g: u64,
        m: u64,
        v: u64,
        copy: u64,
        n: i64,
        first_chunk: i64,
        decay: f32,
        flags: i32,
    }

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
        scale: i32,
    }

    // SAFETY: plain #[repr(C)] structs of u64/i64/f32/i32 fields, laid out as the kernels'
    // `MtTensor` (five addresses, two 64-bit counts, a float and an int: 64 bytes) and
    // `AdamConsts` (nine floats, then an int).
    unsafe impl DeviceRepr for MtTensor {}
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
                scale: (s.grad_scale != 1.0) as i32,
            }
        }
    }

    /// The table of a multi-tensor launch, and the tensors whose buffers it addresses: holding
    /// them keeps the buffers alive until the launch is queued (`Var::set` copies into a
    /// buffer, it never swaps it, so the addresses stay valid).
    struct Tables {
        dev: CudaDevice,
        keep: Vec<Tensor>,
        entries: Vec<MtTensor>,
        chunks: i64,
    }

    /// The uploaded table, its entry count and a launch of one block per chunk.
    struct Prepared {
        table: CudaSlice<MtTensor>,
        count: i32,
        cfg: LaunchConfig,
    }

    impl Tables {
        fn new(first: &Tensor, op: &str) -> Result<Tables> {
            let dev = match first.device() {
                Device::Cuda(d) => d.clone(),
                _ => candle_core::bail!("{op}: the tensors are not on the GPU"),
            };
            Ok(Tables {
                dev,
                keep: Vec::new(),
                entries: Vec::new(),
                chunks: 0,
            })
        }

        fn stream(&self) -> std::sync::Arc<CudaStream> {
            self.dev.cuda_stream()
        }

        /// The device address of a contiguous tensor's first element; the tensor is kept.
        fn address<T: CudaDType>(&mut self, t: &Tensor, what: &str, op: &str) -> Result<u64> {
            if !t.device().same_device(&Device::Cuda(self.dev.clone())) {
                candle_core::bail!("{op}: the {what} is on another device");
            }
            let (s, l) = t.storage_and_layout();
            let Some((start, _)) = l.contiguous_offsets() else {
                candle_core::bail!("{op}: the {what} is not contiguous");
            };
            let addr = match &*s {
                Storage::Cuda(c) => slice_address::<T>(c, &self.stream())?,
                _ => candle_core::bail!("{op}: the {what} is not on the GPU"),
            };
            self.keep.push(t.clone());
            Ok(addr + (start * std::mem::size_of::<T>()) as u64)
        }

        /// The address of a gradient (f32 or bf16), copied to contiguous memory if needed
        /// (candle's `contiguous` is a clone otherwise), and its dtype flag.
        fn gradient(&mut self, g: &Tensor, op: &str) -> Result<(u64, i32)> {
            let g = g.contiguous()?;
            match g.dtype() {
                DType::F32 => Ok((self.address::<f32>(&g, "gradient", op)?, 0)),
                DType::BF16 => Ok((self.address::<half::bf16>(&g, "gradient", op)?, G_BF16)),
                d => candle_core::bail!("{op}: unsupported gradient dtype {d:?}"),
            }
        }

        fn push(&mut self, mut e: MtTensor) {
            e.first_chunk = self.chunks;
            self.chunks += (e.n as usize).div_ceil(CHUNK) as i64;
            self.entries.push(e);
        }

        /// Uploads the table; None when there is nothing to do.
        fn prepare(&self, kernel: &str) -> Result<Option<Prepared>> {
            if self.chunks == 0 {
                return Ok(None);
            }
            if self.chunks > i32::MAX as i64 {
                candle_core::bail!("{kernel}: {} chunks exceed the grid limit", self.chunks);
            }
            Ok(Some(Prepared {
                table: self.stream().clone_htod(&self.entries).w()?,
                count: self.entries.len() as i32,
                cfg: LaunchConfig {
                    grid_dim: (self.chunks as u32, 1, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                },
            }))
        }
    }

    fn slice_address<T: CudaDType>(c: &CudaStorage, stream: &CudaStream) -> Result<u64> {
        let slice = c.as_cuda_slice::<T>()?;
        let (ptr, _sync) = slice.device_ptr(stream);
        Ok(ptr)
    }

    pub fn step(items: &[StepTensor], s: AdamStep) -> Result<()> {
        const OP: &str = "adamw-cuda";
        let mut tables = Tables::new(items[0].w, OP)?;
        for it in items {
            let n = it.w.elem_count() as i64;
            if n == 0 {
                continue;
            }
            let (g, g_flag) = tables.gradient(it.g, OP)?;
            let (copy, copy_flag) = match it.copy {
                None => (0, 0),
                Some(c) => match c.dtype() {
                    DType::BF16 => (tables.address::<half::bf16>(c, "parameter", OP)?, COPY_BF16),
                    DType::F32 => (tables.address::<f32>(c, "parameter", OP)?, COPY_F32),
                    d => candle_core::bail!("{OP}: unsupported parameter dtype {d:?}"),
                },
            };
            let decayed = it.weight_decay > 0.0;
            let e = MtTensor {
                w: tables.address::<f32>(it.w, "weight", OP)?,
                g,
                m: tables.address::<f32>(it.m, "exp_avg", OP)?,
                v: tables.address::<f32>(it.v, "exp_avg_sq", OP)?,
                copy,
                n,
                first_chunk: 0,
                // Rounded from f64 as the CPU op rounds it.
                decay: (1.0 - s.lr * it.weight_decay) as f32,
                flags: g_flag | copy_flag | if decayed { DECAYED } else { 0 },
            };
            tables.push(e);
        }
        let Some(p) = tables.prepare("adamw_multi")? else {
            return Ok(());
        };
        let c = AdamConsts::new(s);
        // SAFETY: adamw_multi(table, count, consts): `count` entries whose addresses point at
        // live buffers of `n` elements of the types their flags name (w, m, v f32), one block
        // of MT_BLOCK threads per chunk, as the kernel assumes.
        unsafe {
            launch!(
                &tables.dev,
                MODULE,
                "adamw_multi",
                p.cfg,
                [&p.table, &p.count, &c]
            )
        }
    }

    pub fn sum_sq(ts: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "sum-sq-cuda";
        let mut tables = Tables::new(ts[0], OP)?;
        for t in ts {
            if !t.device().same_device(ts[0].device()) {
                candle_core::bail!("{OP}: the tensors are on different devices");
            }
            let n = t.elem_count() as i64;
            if n == 0 {
                continue;
            }
            let (g, flags) = tables.gradient(t, OP)?;
            tables.push(MtTensor {
                g,
                n,
                flags,
                ..Default::default()
            });
        }
        let mut acc = tables.dev.alloc_zeros::<f64>(1)?;
        if let Some(p) = tables.prepare("sum_sq_multi")? {
            // SAFETY: sum_sq_multi(table, count, acc): entries address live gradients of `n`
            // f32 or bf16 elements (by their flags), acc one f64; blocks of MT_BLOCK threads.
            unsafe {
                launch!(
                    &tables.dev,
                    MODULE,
                    "sum_sq_multi",
                    p.cfg,
                    [&p.table, &p.count, &mut acc]
                )?
            }
        }
        Ok(tensor(acc, &tables.dev, &candle_core::Shape::from(())))
    }
}
