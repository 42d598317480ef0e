//! The SSD scan on the GPU as a candle CustomOp with the inputs of the CPU op
//! (`ops::ssd::ssd_fused`): xbc (b, l, h*p + 2*g*n) = x | B | C from the conv, dt (b, l, h)
//! after softplus, ad (2, h) = [A; D]. Output y (b, l, h*p) = SSD + D x. bf16 with headdim 64
//! and d_state 64 or 128 runs the chunked matmul form on tensor cores (kernels/ssd_mma.cu: bf16
//! operands, f32 accumulation); everything else runs the register sweeps (kernels/ssd_scan.cu,
//! f32 arithmetic on f32 or bf16 storage). The forward keeps the state entering each chunk for
//! the backward pass.
//! Given dt_bias, dt is the raw projection and the kernels apply dt = softplus(dt + dt_bias)
//! where they load it (ad = [A; D; dt_bias]), so the mixer launches no softplus ops.
use candle_core::{Result, Tensor};

/// Largest head and state sizes the kernel holds in registers.
pub const MAX_HEADDIM: usize = 64;
pub const MAX_STATE: usize = 128;

/// True when the GPU kernel handles this input: a CUDA build, a CUDA tensor of f32 or bf16,
/// headdim <= 64 and d_state <= 128, unless MOZ_LAB_COMPOSED_SSD is set (for comparisons).
pub fn applies(xbc: &Tensor, headdim: usize, d_state: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        xbc.device().is_cuda()
            && super::cuda::supported_dtype(xbc.dtype())
            && headdim <= MAX_HEADDIM
            && d_state <= MAX_STATE
            && std::env::var_os("MOZ_LAB_COMPOSED_SSD").is_none()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xbc, headdim, d_state);
        false
    }
}

/// True when `ssd_cuda` runs this input on tensor cores (kernels/ssd_mma.cu): bf16, headdim 64,
/// d_state 64 or 128, compute capability 8.0+, MOZ_LAB_SSD_SWEEP unset.
pub fn uses_tensor_cores(xbc: &Tensor, headdim: usize, d_state: usize) -> bool {
    #[cfg(feature = "cuda")]
    {
        applies(xbc, headdim, d_state) && imp::mma_applies(xbc, headdim, d_state)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xbc, headdim, d_state);
        false
    }
}

/// Longest chunk a block of the kernel walks: 128, or MOZ_LAB_SSD_KERNEL_CHUNK.
#[cfg(feature = "cuda")]
fn kernel_chunk() -> usize {
    static C: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *C.get_or_init(|| {
        std::env::var("MOZ_LAB_SSD_KERNEL_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&c| c >= 1)
            .unwrap_or(128)
    })
}

/// y (b, l, h*p) = SSD(x, dt, A, B, C) + D x on the GPU; shapes as `ops::ssd::ssd_fused`.
/// With `dt_bias` (h), `dt` is the raw projection and the scan uses softplus(dt + dt_bias).
#[allow(clippy::too_many_arguments)]
pub fn ssd_cuda(
    xbc: &Tensor,
    dt: &Tensor,
    dt_bias: Option<&Tensor>,
    a: &Tensor,
    d_skip: &Tensor,
    headdim: usize,
    groups: usize,
    d_state: usize,
    chunk: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let heads = dt.dim(2)?;
        let ad = match dt_bias {
            Some(bias) => Tensor::stack(
                &[
                    &a.to_dtype(xbc.dtype())?,
                    &d_skip.to_dtype(xbc.dtype())?,
                    &bias.to_dtype(xbc.dtype())?,
                ],
                0,
            )?,
            None => Tensor::stack(&[a, d_skip], 0)?.to_dtype(xbc.dtype())?,
        };
        let tensor_cores = imp::mma_applies(xbc, headdim, d_state);
        xbc.contiguous()?.apply_op3(
            &dt.contiguous()?.to_dtype(xbc.dtype())?,
            &ad,
            imp::SsdCuda {
                tensor_cores,
                heads,
                headdim,
                groups,
                d_state,
                // The sweeps are exact for any chunking, so the kernel's chunk length only sets
                // parallelism against chunk-state work: 128 measured fastest at paper-block
                // (16: 96k, 32: 123k, 64: 141k, 128: 150k tokens/s on an H200).
                // MOZ_LAB_SSD_KERNEL_CHUNK=n overrides it (for measuring).
                chunk: chunk.clamp(1, kernel_chunk()),
                softplus: dt_bias.is_some(),
                stash: std::sync::Mutex::new(None),
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xbc, dt, dt_bias, a, d_skip, headdim, groups, d_state, chunk);
        candle_core::bail!("ssd-cuda: this binary was built without the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{
        dtype_suffix, func, func_with_smem, grid, launch, output, view, MMA_MODULE,
    };
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
    use std::sync::Mutex;

    const MODULE: &str = "moz_ssd_scan";

    /// Mirrors `struct Dims` in ssd_scan.cu.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct Dims {
        b: i32,
        l: i32,
        h: i32,
        p: i32,
        g: i32,
        n: i32,
        q: i32,
        nc: i32,
        /// 1: dt is raw and ad's third row is dt_bias (softplus in the kernels).
        sp: i32,
    }
    // SAFETY: plain old data with the C layout of the kernel's struct.
    unsafe impl DeviceRepr for Dims {}

    /// The tensor-core path (kernels/ssd_mma.cu) takes bf16 with headdim 64 and d_state 64 or
    /// 128 on compute capability 8.0+, unless MOZ_LAB_SSD_SWEEP is set; it walks chunks of
    /// `MMA_CHUNK` steps whatever the spec's chunk.
    pub fn mma_applies(xbc: &Tensor, headdim: usize, d_state: usize) -> bool {
        xbc.dtype() == DType::BF16
            && headdim == MMA_HEADDIM
            && matches!(d_state, 64 | 128)
            && super::super::cuda::kernel_enabled("MOZ_LAB_SSD_SWEEP")
            && match xbc.device() {
                candle_core::Device::Cuda(dev) => super::super::cuda::has_bf16_mma(dev),
                _ => false,
            }
    }

    /// MQ and MP of ssd_mma.cu.
    const MMA_CHUNK: usize = 64;
    const MMA_HEADDIM: usize = 64;

    pub struct SsdCuda {
        /// Run kernels/ssd_mma.cu (see `mma_applies`) instead of the sweeps.
        pub tensor_cores: bool,
        pub heads: usize,
        pub headdim: usize,
        pub groups: usize,
        pub d_state: usize,
        pub chunk: usize,
        /// dt is the raw projection, ad = [A; D; dt_bias].
        pub softplus: bool,
        /// States entering each chunk (b, h, nc, p, n) f32 from the forward pass; taken by the
        /// backward (each forward builds a new op, so this belongs to one graph node).
        pub stash: Mutex<Option<CudaSlice<f32>>>,
    }

    /// A null pointer argument.
    const NULL: u64 = 0;

    /// Pushes a buffer argument, or the kernel's null pointer for None.
    fn arg_or_null<'a, A>(b: &mut LaunchArgs<'a>, v: Option<A>)
    where
        LaunchArgs<'a>: PushKernelArg<A> + PushKernelArg<&'static u64>,
    {
        match v {
            Some(v) => b.arg(v),
            None => b.arg(&NULL),
        };
    }

    impl SsdCuda {
        fn dims(&self, xbc: &Shape, dt: &Shape, ad: &Shape) -> Result<Dims> {
            let (b, l, cd) = xbc.dims3()?;
            let (h, p, g, n) = (self.heads, self.headdim, self.groups, self.d_state);
            let ad_rows = 2 + self.softplus as usize;
            if dt.dims() != [b, l, h]
                || ad.dims() != [ad_rows, h]
                || cd != h * p + 2 * g * n
                || g == 0
                || h % g != 0
                || p > super::MAX_HEADDIM
                || n > super::MAX_STATE
            {
                candle_core::bail!(
                    "ssd-cuda: xbc {xbc:?}, dt {dt:?}, ad {ad:?} do not fit heads {h} x headdim {p}, groups {g}, d_state {n} (headdim <= {}, d_state <= {})",
                    super::MAX_HEADDIM,
                    super::MAX_STATE
                );
            }
            let q = if self.tensor_cores {
                MMA_CHUNK
            } else {
                self.chunk.min(l.max(1))
            };
            Ok(Dims {
                b: b as i32,
                l: l as i32,
                h: h as i32,
                p: p as i32,
                g: g as i32,
                n: n as i32,
                q: q as i32,
                nc: l.div_ceil(q).max(1) as i32,
                sp: self.softplus as i32,
            })
        }
    }

    fn sweep_cfg(d: &Dims) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (d.nc as u32, d.h as u32, d.b as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Where a sweep's outputs go; None means the kernel's null.
    struct SweepOut<'a, T> {
        init: Option<&'a CudaSlice<f32>>,
        final_state: Option<&'a mut CudaSlice<f32>>,
        logdec: Option<&'a mut CudaSlice<f32>>,
        row_f32: Option<&'a mut CudaSlice<f32>>,
        row_t: Option<&'a mut CudaSlice<T>>,
        col_acc: Option<&'a mut CudaSlice<f32>>,
    }

    impl<T> Default for SweepOut<'_, T> {
        fn default() -> Self {
            SweepOut {
                init: None,
                final_state: None,
                logdec: None,
                row_f32: None,
                row_t: None,
                col_acc: None,
            }
        }
    }

    struct Inputs<'a, T> {
        xbc: CudaView<'a, T>,
        dt: CudaView<'a, T>,
        ad: CudaView<'a, T>,
    }

    #[allow(clippy::too_many_arguments)]
    fn sweep<T: DeviceRepr>(
        dev: &CudaDevice,
        sfx: &str,
        x: &Inputs<T>,
        dy: Option<&CudaView<T>>,
        d: Dims,
        reverse: bool,
        out: SweepOut<T>,
    ) -> Result<()> {
        let f = func(dev, MODULE, &format!("ssd_sweep_{sfx}"))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x.xbc);
        b.arg(&x.dt);
        b.arg(&x.ad);
        arg_or_null(&mut b, dy);
        b.arg(&d);
        let rev = reverse as i32;
        b.arg(&rev);
        arg_or_null(&mut b, out.init);
        arg_or_null(&mut b, out.final_state);
        arg_or_null(&mut b, out.logdec);
        arg_or_null(&mut b, out.row_f32);
        arg_or_null(&mut b, out.row_t);
        arg_or_null(&mut b, out.col_acc);
        // SAFETY: argument order and types follow ssd_sweep in ssd_scan.cu; every buffer has
        // the size the dims imply (checked by `SsdCuda::dims` and the allocations here).
        unsafe { b.launch(sweep_cfg(&d)).w()? };
        Ok(())
    }

    /// States entering each chunk (b, h, nc, p, n): one sweep for each chunk's local end state,
    /// then the chain over chunks. None for a single chunk (the kernel starts from zero).
    fn chunk_states<T: DeviceRepr>(
        dev: &CudaDevice,
        sfx: &str,
        x: &Inputs<T>,
        dy: Option<&CudaView<T>>,
        d: Dims,
        reverse: bool,
    ) -> Result<Option<CudaSlice<f32>>> {
        if d.nc <= 1 {
            return Ok(None);
        }
        let pn = (d.p * d.n) as usize;
        let bh = (d.b * d.h) as usize;
        let mut states = output::<f32>(dev, bh * d.nc as usize * pn)?;
        let mut logdec = output::<f32>(dev, bh * d.nc as usize)?;
        sweep(
            dev,
            sfx,
            x,
            dy,
            d,
            reverse,
            SweepOut {
                final_state: Some(&mut states),
                logdec: Some(&mut logdec),
                ..Default::default()
            },
        )?;
        chain(dev, &mut states, &logdec, d, reverse)?;
        Ok(Some(states))
    }

    /// Chains chunk states in place (ssd_chunk_chain): each chunk's local term in, the state
    /// entering each chunk from the left (or with `reverse` from the right) out.
    fn chain(
        dev: &CudaDevice,
        states: &mut CudaSlice<f32>,
        logdec: &CudaSlice<f32>,
        d: Dims,
        reverse: bool,
    ) -> Result<()> {
        let (nc, pn, rev) = (d.nc, d.p * d.n, reverse as i32);
        // Four elements per thread where they fit (a fresh buffer is 256-byte aligned).
        let (name, per_thread) = if pn % 4 == 0 {
            ("ssd_chunk_chain4", 4)
        } else {
            ("ssd_chunk_chain", 1)
        };
        let cfg = LaunchConfig {
            grid_dim: (
                (pn as u32 / per_thread).div_ceil(256),
                (d.b * d.h) as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ssd_chunk_chain[4](states, logdec, NC, PN, reverse); states holds
        // b * h * nc * pn floats (from `output`, so 16-byte aligned), logdec b * h * nc.
        unsafe { launch!(dev, MODULE, name, cfg, [states, logdec, &nc, &pn, &rev]) }
    }

    fn wrap<T: CudaDType + DeviceRepr>(s: CudaSlice<T>, dev: &CudaDevice, shape: &Shape) -> Tensor {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
        Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false)
    }

    /// The sweeps' part of the backward pass, from the forward pass's chunk states.
    fn sweep_backward<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        sfx: &str,
        x: &Inputs<T>,
        dy: &CudaView<T>,
        d: Dims,
        stash: Option<CudaSlice<f32>>,
    ) -> Result<Grads> {
        let fwd_states = match stash {
            Some(s) => Some(s),
            None => chunk_states(dev, sfx, x, None, d, false)?,
        };
        let (b, l, h, p, g, n) = (
            d.b as usize,
            d.l as usize,
            d.h as usize,
            d.p as usize,
            d.g as usize,
            d.n as usize,
        );
        // Reverse sweep: du = G B, dB = G^T (dt x).
        let rev_states = chunk_states(dev, sfx, x, Some(dy), d, true)?;
        let mut du = output::<f32>(dev, b * l * h * p)?;
        let mut db = dev.alloc_zeros::<f32>(b * l * g * n)?;
        sweep(
            dev,
            sfx,
            x,
            Some(dy),
            d,
            true,
            SweepOut {
                init: rev_states.as_ref(),
                row_f32: Some(&mut du),
                col_acc: Some(&mut db),
                ..Default::default()
            },
        )?;
        // Forward sweep again: y (without D) and dC = S^T dy.
        let mut ys = output::<f32>(dev, b * l * h * p)?;
        let mut dc = dev.alloc_zeros::<f32>(b * l * g * n)?;
        sweep(
            dev,
            sfx,
            x,
            Some(dy),
            d,
            false,
            SweepOut {
                init: fwd_states.as_ref(),
                row_f32: Some(&mut ys),
                col_acc: Some(&mut dc),
                ..Default::default()
            },
        )?;
        Ok(Grads {
            du,
            ys: Some(ys),
            da: None,
            db,
            dc,
        })
    }

    /// What the backward pass's last kernels (ssd_bwd_rows / _scalars / _bc) take, all f32.
    struct Grads {
        /// Gradient of u = dt x (b, l, h*p).
        du: CudaSlice<f32>,
        /// The sweeps' y without D (b, l, h*p), for the decay gradient's reverse cumsum.
        ys: Option<CudaSlice<f32>>,
        /// The tensor-core path's decay gradient d(dt A) (b, l, h), in place of that cumsum.
        da: Option<CudaSlice<f32>>,
        /// dB, dC (b, l, g*n).
        db: CudaSlice<f32>,
        dc: CudaSlice<f32>,
    }

    /// A launch of the tensor-core kernels: one block of 8 warps per (chunk, `ys`, batch).
    fn mma_cfg(d: &Dims, ys: i32, shared_mem_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (d.nc as u32, ys as u32, d.b as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes,
        }
    }

    /// Dynamic shared memory of ssd_mma_out / ssd_mma_bwd: bf16 tiles with rows padded by 8
    /// elements, then f32 rows of the chunk (as the kernels carve it).
    fn mma_smem(d: &Dims, backward: bool) -> u32 {
        let (q, p) = (MMA_CHUNK, MMA_HEADDIM);
        let (ldn, ldp) = (d.n as usize + 8, p + 8);
        let bytes = if backward {
            (2 * q * ldn + 2 * p * ldn + 2 * q * ldp) * 2 + 5 * q * 4
        } else {
            (2 * q * ldn + p * ldn + q * ldp) * 2 + 2 * q * 4
        };
        bytes as u32
    }

    /// States entering each chunk (no `dy`), or with `dy` the gradients of each chunk's end
    /// state, (b, h, nc, p, n): the chunks' local terms on tensor cores, then the chain. None
    /// for a single chunk (the kernels read zeros).
    fn mma_chunk_states<T: DeviceRepr>(
        dev: &CudaDevice,
        x: &Inputs<T>,
        dy: Option<&CudaView<T>>,
        d: Dims,
    ) -> Result<Option<CudaSlice<f32>>> {
        if d.nc <= 1 {
            return Ok(None);
        }
        let pn = (d.p * d.n) as usize;
        let bh = (d.b * d.h) as usize;
        let mut states = output::<f32>(dev, bh * d.nc as usize * pn)?;
        let mut logdec = output::<f32>(dev, bh * d.nc as usize)?;
        let rev = dy.is_some() as i32;
        let f = func(dev, MMA_MODULE, &format!("ssd_mma_state_n{}", d.n))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x.xbc);
        b.arg(&x.dt);
        b.arg(&x.ad);
        arg_or_null(&mut b, dy);
        b.arg(&d);
        b.arg(&rev);
        b.arg(&mut states);
        b.arg(&mut logdec);
        // SAFETY: ssd_mma_state(xbc, dt, ad, dy, d, rev, states, logdec) as in ssd_mma.cu; bf16
        // inputs of the shapes `SsdCuda::dims` checked, states bh * nc * p * n, logdec bh * nc.
        unsafe { b.launch(mma_cfg(&d, d.h, 0)).w()? };
        chain(dev, &mut states, &logdec, d, dy.is_some())?;
        Ok(Some(states))
    }

    /// y = SSD + D x on tensor cores, from the states entering each chunk.
    fn mma_out<T: DeviceRepr>(
        dev: &CudaDevice,
        x: &Inputs<T>,
        d: Dims,
        states: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<T>,
    ) -> Result<()> {
        let smem = mma_smem(&d, false);
        let f = func_with_smem(dev, MMA_MODULE, &format!("ssd_mma_out_n{}", d.n), smem)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x.xbc);
        b.arg(&x.dt);
        b.arg(&x.ad);
        b.arg(&d);
        arg_or_null(&mut b, states);
        b.arg(y);
        // SAFETY: ssd_mma_out(xbc, dt, ad, d, states, y); y holds b * l * h * p elements, states b * h * nc * p * n; the shared memory is the kernel's carve-up.
        unsafe { b.launch(mma_cfg(&d, d.h, smem)).w()? };
        Ok(())
    }

    /// The tensor-core part of the backward pass, from the forward pass's chunk states.
    fn mma_backward<T: DeviceRepr>(
        dev: &CudaDevice,
        x: &Inputs<T>,
        dy: &CudaView<T>,
        d: Dims,
        stash: Option<CudaSlice<f32>>,
    ) -> Result<Grads> {
        let fwd_states = match stash {
            Some(s) => Some(s),
            None => mma_chunk_states(dev, x, None, d)?,
        };
        let rev_states = mma_chunk_states(dev, x, Some(dy), d)?;
        let (b, l, h, p, g, n) = (
            d.b as usize,
            d.l as usize,
            d.h as usize,
            d.p as usize,
            d.g as usize,
            d.n as usize,
        );
        let mut du = output::<f32>(dev, b * l * h * p)?;
        let mut da = output::<f32>(dev, b * l * h)?;
        let mut db = output::<f32>(dev, b * l * g * n)?;
        let mut dc = output::<f32>(dev, b * l * g * n)?;
        let smem = mma_smem(&d, true);
        let f = func_with_smem(dev, MMA_MODULE, &format!("ssd_mma_bwd_n{}", d.n), smem)?;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&x.xbc);
        lb.arg(&x.dt);
        lb.arg(&x.ad);
        lb.arg(dy);
        lb.arg(&d);
        for s in [&fwd_states, &rev_states] {
            arg_or_null(&mut lb, s.as_ref());
        }
        lb.arg(&mut du);
        lb.arg(&mut da);
        lb.arg(&mut db);
        lb.arg(&mut dc);
        // SAFETY: ssd_mma_bwd(xbc, dt, ad, dy, d, fst, rst, du, da, db, dc); both state sets
        // hold b * h * nc * p * n floats, du b * l * h * p, da b * l * h, dB and dC b * l * g * n;
        // one block per (chunk, group, batch) with the kernel's shared memory.
        unsafe { lb.launch(mma_cfg(&d, d.g, smem)).w()? };
        Ok(Grads {
            du,
            ys: None,
            da: Some(da),
            db,
            dc,
        })
    }

    impl SsdCuda {
        fn fwd<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            x: &Inputs<T>,
            d: Dims,
            sfx: &str,
        ) -> Result<CudaSlice<T>> {
            if self.tensor_cores {
                let states = mma_chunk_states(dev, x, None, d)?;
                let mut y = output::<T>(dev, (d.b * d.l * d.h * d.p) as usize)?;
                mma_out(dev, x, d, states.as_ref(), &mut y)?;
                *self.stash.lock().unwrap() = states;
                return Ok(y);
            }
            let states = chunk_states(dev, sfx, x, None, d, false)?;
            let mut y = output::<T>(dev, (d.b * d.l * d.h * d.p) as usize)?;
            sweep(
                dev,
                sfx,
                x,
                None,
                d,
                false,
                SweepOut {
                    init: states.as_ref(),
                    row_t: Some(&mut y),
                    ..Default::default()
                },
            )?;
            *self.stash.lock().unwrap() = states;
            Ok(y)
        }

        /// (dxbc, ddt, dad as f32) for the upstream gradient `dy`.
        fn bwd_t<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
            &self,
            dev: &CudaDevice,
            x: &Inputs<T>,
            dy: &CudaView<T>,
            d: Dims,
            sfx: &str,
        ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<f32>)> {
            let stash = self.stash.lock().unwrap().take();
            let gr = if self.tensor_cores {
                mma_backward(dev, x, dy, d, stash)?
            } else {
                sweep_backward(dev, sfx, x, dy, d, stash)?
            };
            let (b, l, h, p, g, n) = (
                d.b as usize,
                d.l as usize,
                d.h as usize,
                d.p as usize,
                d.g as usize,
                d.n as usize,
            );
            let mut dxbc = output::<T>(dev, b * l * (h * p + 2 * g * n))?;
            let mut scal = output::<f32>(dev, b * l * h * 3)?;
            let stream = dev.cuda_stream();
            let f = func(dev, MODULE, &format!("ssd_bwd_rows_{sfx}"))?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&x.xbc);
            lb.arg(&x.dt);
            lb.arg(&x.ad);
            lb.arg(dy);
            lb.arg(&gr.du);
            arg_or_null(&mut lb, gr.ys.as_ref());
            lb.arg(&d);
            lb.arg(&mut dxbc);
            lb.arg(&mut scal);
            // SAFETY: ssd_bwd_rows(xbc, dt, ad, dy, du, ys, d, dxbc, scal); one warp per
            // (b, t, h); buffers sized above (du and ys b * l * h * p floats).
            unsafe { lb.launch(grid(b * l * h * 32, 256)?).w()? };
            let mut ddt = output::<T>(dev, b * l * h)?;
            let mut dad = dev.alloc_zeros::<f32>((2 + d.sp as usize) * h)?;
            let cfg = LaunchConfig {
                grid_dim: ((b * h) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = func(dev, MODULE, &format!("ssd_bwd_scalars_{sfx}"))?;
            let mut lb = stream.launch_builder(&f);
            lb.arg(&x.dt);
            lb.arg(&x.ad);
            lb.arg(&scal);
            arg_or_null(&mut lb, gr.da.as_ref());
            lb.arg(&d);
            lb.arg(&mut ddt);
            lb.arg(&mut dad);
            // SAFETY: ssd_bwd_scalars(dt, ad, scal, da, d, ddt, dad_acc); one block of 256
            // threads per (b, h) (the kernel's segment array); da holds b * l * h floats, dad
            // (2 + sp) * h.
            unsafe { lb.launch(cfg).w()? };
            // SAFETY: ssd_bwd_bc(db, dc, d, dxbc); one thread per element of dB / dC.
            unsafe {
                launch!(
                    dev,
                    MODULE,
                    &format!("ssd_bwd_bc_{sfx}"),
                    grid(b * l * g * n, 256)?,
                    [&gr.db, &gr.dc, &d, &mut dxbc]
                )?
            };
            Ok((dxbc, ddt, dad))
        }
    }

    impl CustomOp3 for SsdCuda {
        fn name(&self) -> &'static str {
            "ssd-cuda"
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
            candle_core::bail!("ssd-cuda: CPU tensors go through ops::ssd::ssd_fused")
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
            let d = self.dims(l1.shape(), l2.shape(), l3.shape())?;
            let dev = s1.device().clone();
            let shape = Shape::from((d.b as usize, d.l as usize, (d.h * d.p) as usize));
            let op = self.name();
            let storage = match s1.dtype() {
                DType::F32 => {
                    let x = Inputs::<f32> {
                        xbc: view(s1, l1, op)?,
                        dt: view(s2, l2, op)?,
                        ad: view(s3, l3, op)?,
                    };
                    CudaStorage::wrap_cuda_slice(
                        self.fwd(&dev, &x, d, dtype_suffix(s1.dtype(), "ssd-cuda")?)?,
                        dev.clone(),
                    )
                }
                DType::BF16 => {
                    let x = Inputs::<half::bf16> {
                        xbc: view(s1, l1, op)?,
                        dt: view(s2, l2, op)?,
                        ad: view(s3, l3, op)?,
                    };
                    CudaStorage::wrap_cuda_slice(
                        self.fwd(&dev, &x, d, dtype_suffix(s1.dtype(), "ssd-cuda")?)?,
                        dev.clone(),
                    )
                }
                dt => candle_core::bail!("ssd-cuda: unsupported dtype {dt:?}"),
            };
            Ok((storage, shape))
        }

        fn bwd(
            &self,
            xbc: &Tensor,
            dt: &Tensor,
            ad: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let d = self.dims(xbc.shape(), dt.shape(), ad.shape())?;
            let grad = grad.contiguous()?.to_dtype(xbc.dtype())?;
            let (sx, lx) = xbc.storage_and_layout();
            let (st, lt) = dt.storage_and_layout();
            let (sa, la) = ad.storage_and_layout();
            let (sg, lg) = grad.storage_and_layout();
            let (Storage::Cuda(sx), Storage::Cuda(st), Storage::Cuda(sa), Storage::Cuda(sg)) =
                (&*sx, &*st, &*sa, &*sg)
            else {
                candle_core::bail!("ssd-cuda: backward inputs are not on the GPU")
            };
            let dev = sx.device().clone();
            let op = self.name();
            macro_rules! run {
                ($t:ty) => {{
                    let x = Inputs::<$t> {
                        xbc: view(sx, lx, op)?,
                        dt: view(st, lt, op)?,
                        ad: view(sa, la, op)?,
                    };
                    let dy: CudaView<$t> = view(sg, lg, op)?;
                    let (dxbc, ddt, dad) =
                        self.bwd_t(&dev, &x, &dy, d, dtype_suffix(xbc.dtype(), "ssd-cuda")?)?;
                    (
                        wrap(dxbc, &dev, xbc.shape()),
                        wrap(ddt, &dev, dt.shape()),
                        wrap(dad, &dev, ad.shape()),
                    )
                }};
            }
            let (dxbc, ddt, dad) = match xbc.dtype() {
                DType::F32 => run!(f32),
                DType::BF16 => run!(half::bf16),
                dt => candle_core::bail!("ssd-cuda: unsupported dtype {dt:?}"),
            };
            let dad = dad.to_dtype(ad.dtype())?;
            Ok((Some(dxbc), Some(ddt), Some(dad)))
        }
    }
}
