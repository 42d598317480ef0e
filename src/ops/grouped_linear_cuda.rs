//! `GroupedLinear` on the GPU: tokens gathered in expert order (kernels/moe.cu), one cuBLAS GEMM
//! per expert on its contiguous row block, and the gate-weighted combine back to token order, so
//! an ExpertLinear with top-1 costs about one dense GEMM plus two row copies. The backward runs
//! the same pieces: gate-scaled scatter of dy (with the gate gradients), two GEMMs per expert,
//! and the combine of the input gradients.
use super::cuda::{dtype_suffix, for_kernel_dtype, launch, output, tensor, view};
use super::grouped_linear::GroupedLinear;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Shape, Storage, Tensor};

const MODULE: &str = "moz_moe";

/// The forward's gathered inputs and ungated expert outputs, for the backward.
pub(crate) struct CudaStash {
    xs: Storage,
    ys: Storage,
}

/// slot_tokens | back on the device: the device routing's, or the host routing's uploaded in
/// one copy (a copy from pageable host memory waits for the stream, so each one stalls the GPU
/// queue) and kept for the backward.
fn routing_on_device<'a>(dev: &CudaDevice, g: &'a GroupedLinear) -> Result<&'a CudaSlice<u32>> {
    if g.device_idx.get().is_none() {
        let mut idx = Vec::with_capacity(g.slot_tokens.len() + g.back.len());
        idx.extend_from_slice(&g.slot_tokens);
        idx.extend_from_slice(&g.back);
        let _ = g.device_idx.set(dev.cuda_stream().clone_htod(&idx).w()?);
    }
    Ok(g.device_idx.get().unwrap())
}

fn rows_cfg(rows: usize, d: usize) -> LaunchConfig {
    // The kernels move 8 elements per thread and access when they can (kernels/moe.cu): one
    // thread per 8 elements of a row, whole warps, 32 to 256 threads.
    let threads = (d.div_ceil(8).div_ceil(32) * 32).clamp(32, 256);
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Scalars of the GEMM for T.
trait GemmScalar: Sized + Copy {
    fn one() -> Self;
    fn zero() -> Self;
}
impl GemmScalar for f32 {
    fn one() -> Self {
        1.0
    }
    fn zero() -> Self {
        0.0
    }
}
impl GemmScalar for half::bf16 {
    fn one() -> Self {
        half::bf16::ONE
    }
    fn zero() -> Self {
        half::bf16::ZERO
    }
}

/// Row-major C (m x n) = op(A) op(B), written as cuBLAS's column-major C^T = op(B)^T op(A)^T.
/// `a_t`: A is stored transposed (A^T row-major, i.e. A is k x m given as m-major rows).
#[allow(clippy::too_many_arguments)]
fn gemm_rm<T: GemmScalar + DeviceRepr>(
    dev: &CudaDevice,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaView<T>,
    a_t: bool,
    b: &CudaView<T>,
    b_t: bool,
    c: &mut CudaSlice<T>,
    c_off: usize,
) -> Result<()>
where
    candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
{
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Column-major: C^T (n x m) = B'^T (n x k) A'^T (k x m) with B' = op(B), A' = op(A).
    // A row-major matrix R (r x c) is column-major R^T with ld c.
    let (opb, ldb) = if b_t {
        (cublasOperation_t::CUBLAS_OP_T, k) // B stored as (n x k) row-major
    } else {
        (cublasOperation_t::CUBLAS_OP_N, n) // B stored as (k x n) row-major
    };
    let (opa, lda) = if a_t {
        (cublasOperation_t::CUBLAS_OP_T, m) // A stored as (k x m) row-major
    } else {
        (cublasOperation_t::CUBLAS_OP_N, k) // A stored as (m x k) row-major
    };
    let cfg = GemmConfig {
        transa: opb,
        transb: opa,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::one(),
        lda: ldb as i32,
        ldb: lda as i32,
        beta: T::zero(),
        ldc: n as i32,
    };
    let blas = dev.cublas_handle();
    let mut cv = c.slice_mut(c_off..c_off + m * n);
    // SAFETY: the views hold m*k, k*n and m*n elements in the layouts the config describes.
    unsafe { blas.gemm(cfg, b, a, &mut cv).w()? };
    Ok(())
}

/// Largest expert row count whose GEMM shapes have been planned, per device (each has its own
/// cuBLAS handle), expert shape and dtype.
type Warmed = std::collections::HashMap<
    (
        candle_core::cuda_backend::DeviceId,
        usize,
        usize,
        std::any::TypeId,
    ),
    usize,
>;
static WARMED: std::sync::LazyLock<std::sync::Mutex<Warmed>> =
    std::sync::LazyLock::new(Default::default);

/// Runs the three expert GEMMs (forward, input and weight gradients) once for every row count a
/// device routing can give an expert (multiples of `granule` up to `max_rows`), on scratch
/// buffers. cuBLAS plans each new GEMM shape on the host, 0.23-0.61 ms per call, and the call
/// returns only once the device is idle (`MOZ_LAB_BENCH_GEMM_PROBE`); top-1 routing gives the
/// experts new row counts at random steps, each one a stall of the GPU queue. Planned up front
/// (64 counts x 3 GEMMs at paper-block, once per device), a repeated shape costs 10-16 us.
/// MOZ_LAB_NO_GEMM_WARMUP=1 skips it (for comparisons).
fn warm_gemm_shapes<
    T: CudaDType
        + DeviceRepr
        + GemmScalar
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
        + 'static,
>(
    dev: &CudaDevice,
    w: &CudaView<T>,
    (d_in, d_out): (usize, usize),
    max_rows: usize,
    granule: usize,
) -> Result<()>
where
    candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
{
    if !super::cuda::kernel_enabled("MOZ_LAB_NO_GEMM_WARMUP") || granule == 0 {
        return Ok(());
    }
    let key = (dev.id(), d_in, d_out, std::any::TypeId::of::<T>());
    let mut warmed = WARMED.lock().unwrap();
    let done = *warmed.get(&key).unwrap_or(&0);
    let max_rows = max_rows.div_ceil(granule) * granule;
    if max_rows <= done {
        return Ok(());
    }
    crate::trace(|| format!("planning expert GEMMs of {d_in} -> {d_out} up to {max_rows} rows"));
    let mut xs = dev.alloc_zeros::<T>(max_rows * d_in)?;
    let mut ys = dev.alloc_zeros::<T>(max_rows * d_out)?;
    let mut dw = dev.alloc_zeros::<T>(d_out * d_in)?;
    let we = w.slice(0..d_out * d_in);
    for m in (done / granule + 1..=max_rows / granule).map(|k| k * granule) {
        // The calls of cuda_fwd_t and cuda_bwd_t for an expert of m rows.
        gemm_rm(
            dev,
            m,
            d_out,
            d_in,
            &xs.slice(0..m * d_in),
            false,
            &we,
            true,
            &mut ys,
            0,
        )?;
        gemm_rm(
            dev,
            m,
            d_in,
            d_out,
            &ys.slice(0..m * d_out),
            false,
            &we,
            false,
            &mut xs,
            0,
        )?;
        gemm_rm(
            dev,
            d_out,
            d_in,
            m,
            &ys.slice(0..m * d_out),
            true,
            &xs.slice(0..m * d_in),
            false,
            &mut dw,
            0,
        )?;
    }
    warmed.insert(key, max_rows);
    Ok(())
}

impl GroupedLinear {
    #[allow(clippy::type_complexity)]
    fn cuda_fwd_t<
        T: CudaDType
            + DeviceRepr
            + GemmScalar
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
            + 'static,
    >(
        &self,
        dev: &CudaDevice,
        x: &CudaView<T>,
        w: &CudaView<T>,
        gates: &CudaView<T>,
        (tokens, d_in, d_out): (usize, usize, usize),
        sfx: &str,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    {
        let s = self.slots;
        let k = self.top_k(tokens);
        if self.top_k.is_some() {
            // A device routing: each expert's rows are a multiple of its granule.
            warm_gemm_shapes(dev, w, (d_in, d_out), tokens, super::route_cuda::granule())?;
        }
        let idx = routing_on_device(dev, self)?;
        let (slot_tokens, back) = (idx.slice(0..s), idx.slice(s..s + tokens * k));
        let mut xs = output::<T>(dev, s * d_in)?;
        let (si, di) = (s as i32, d_in as i32);
        // SAFETY: moe_gather(x, slot_tokens, slots, d, xs); one block per slot; slot tokens
        // are < tokens (checked by `dims`).
        unsafe {
            launch!(
                dev,
                MODULE,
                &format!("moe_gather_{sfx}"),
                rows_cfg(s, d_in),
                [x, &slot_tokens, &si, &di, &mut xs]
            )?
        };
        let mut ys = output::<T>(dev, s * d_out)?;
        for (e, a, bnd) in self.experts() {
            let xe = xs.slice(a * d_in..bnd * d_in);
            let we = w.slice(e * d_out * d_in..(e + 1) * d_out * d_in);
            // ys_e (m x d_out) = xs_e (m x d_in) W_e^T, W_e stored (d_out x d_in).
            gemm_rm(
                dev,
                bnd - a,
                d_out,
                d_in,
                &xe,
                false,
                &we,
                true,
                &mut ys,
                a * d_out,
            )?;
        }
        let mut y = output::<T>(dev, tokens * d_out)?;
        let (ti, ki, di) = (tokens as i32, k as i32, d_out as i32);
        // SAFETY: moe_combine(rows, gates, back, tokens, k, d, out); one block per token; back
        // holds tokens * k slot indices < s.
        unsafe {
            launch!(
                dev,
                MODULE,
                &format!("moe_combine_{sfx}"),
                rows_cfg(tokens, d_out),
                [&ys, gates, &back, &ti, &ki, &di, &mut y]
            )?
        };
        Ok((y, xs, ys))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cuda_forward(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        dims: (usize, usize, usize),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device().clone();
        let op = "grouped-linear";
        let (tokens, _, d_out) = dims;
        let sx = dtype_suffix(s1.dtype(), "grouped-linear")?;
        let y = for_kernel_dtype!(op, s1.dtype(), T => {
            let (y, xs, ys) = self.cuda_fwd_t::<T>(
                &dev,
                &view(s1, l1, op)?,
                &view(s2, l2, op)?,
                &view(s3, l3, op)?,
                dims,
                sx,
            )?;
            *self.stash.lock().unwrap() = Some(Box::new(CudaStash {
                xs: Storage::Cuda(CudaStorage::wrap_cuda_slice(xs, dev.clone())),
                ys: Storage::Cuda(CudaStorage::wrap_cuda_slice(ys, dev.clone())),
            }));
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((y, Shape::from((tokens, d_out))))
    }

    #[allow(clippy::too_many_arguments)]
    fn cuda_bwd_t<
        T: CudaDType
            + DeviceRepr
            + GemmScalar
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    >(
        &self,
        dev: &CudaDevice,
        x: &CudaView<T>,
        w: &CudaView<T>,
        gates: &CudaView<T>,
        dy: &CudaView<T>,
        (xs, ys): (&CudaView<T>, &CudaView<T>),
        (tokens, d_in, d_out): (usize, usize, usize),
        sfx: &str,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    {
        let _ = x;
        let s = self.slots;
        let k = self.top_k(tokens);
        let idx = routing_on_device(dev, self)?;
        let (slot_tokens, back) = (idx.slice(0..s), idx.slice(s..s + tokens * k));
        let mut dys = output::<T>(dev, s * d_out)?;
        let mut dgates = output::<T>(dev, s)?;
        let (si, di) = (s as i32, d_out as i32);
        // SAFETY: moe_combine_bwd(dy, ys, gates, slot_tokens, slots, d, dys, dgates); one
        // block of at most 256 threads per slot (the kernel's 32-warp reduction buffer).
        unsafe {
            launch!(
                dev,
                MODULE,
                &format!("moe_combine_bwd_{sfx}"),
                rows_cfg(s, d_out),
                [dy, ys, gates, &slot_tokens, &si, &di, &mut dys, &mut dgates]
            )?
        };
        let mut dxs = output::<T>(dev, s * d_in)?;
        // Experts without tokens keep a zero weight gradient.
        let mut dw = dev.alloc_zeros::<T>(w.len())?;
        for (e, a, bnd) in self.experts() {
            let m = bnd - a;
            let we = w.slice(e * d_out * d_in..(e + 1) * d_out * d_in);
            let dye = dys.slice(a * d_out..bnd * d_out);
            // dxs_e (m x d_in) = dys_e (m x d_out) W_e (d_out x d_in).
            gemm_rm(
                dev,
                m,
                d_in,
                d_out,
                &dye,
                false,
                &we,
                false,
                &mut dxs,
                a * d_in,
            )?;
            // dW_e (d_out x d_in) = dys_e^T xs_e: dys_e stored (m x d_out) = A^T.
            let xe = xs.slice(a * d_in..bnd * d_in);
            if m > 0 {
                gemm_rm(
                    dev,
                    d_out,
                    d_in,
                    m,
                    &dye,
                    true,
                    &xe,
                    false,
                    &mut dw,
                    e * d_out * d_in,
                )?;
            }
        }
        let mut dx = output::<T>(dev, tokens * d_in)?;
        let (ti, ki, di) = (tokens as i32, k as i32, d_in as i32);
        let null: u64 = 0;
        // SAFETY: moe_combine as in the forward; null gates mean weight 1.
        unsafe {
            launch!(
                dev,
                MODULE,
                &format!("moe_combine_{sfx}"),
                rows_cfg(tokens, d_in),
                [&dxs, &null, &back, &ti, &ki, &di, &mut dx]
            )?
        };
        Ok((dx, dw, dgates))
    }

    /// (dx, dw, dgates) on the GPU. Without a stash (a second backward) the forward reruns.
    pub(crate) fn cuda_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        gates: &Tensor,
        grad: &Tensor,
        stash: Option<Box<dyn std::any::Any + Send>>,
        dims: (usize, usize, usize),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stash = match stash.and_then(|s| s.downcast::<CudaStash>().ok()) {
            Some(s) => *s,
            None => {
                let (sx, lx) = x.storage_and_layout();
                let (sw, lw) = w.storage_and_layout();
                let (sg, lg) = gates.storage_and_layout();
                let (Storage::Cuda(sx), Storage::Cuda(sw), Storage::Cuda(sg)) = (&*sx, &*sw, &*sg)
                else {
                    candle_core::bail!("grouped-linear: backward inputs are not on the GPU")
                };
                self.cuda_forward(sx, lx, sw, lw, sg, lg, dims)?;
                let s = self.stash.lock().unwrap().take().unwrap();
                *s.downcast::<CudaStash>().unwrap()
            }
        };
        let grad = grad.contiguous()?;
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sg, lg) = gates.storage_and_layout();
        let (sd, ld) = grad.storage_and_layout();
        let (Storage::Cuda(sx), Storage::Cuda(sw), Storage::Cuda(sg), Storage::Cuda(sd)) =
            (&*sx, &*sw, &*sg, &*sd)
        else {
            candle_core::bail!("grouped-linear: backward inputs are not on the GPU")
        };
        let (Storage::Cuda(xs), Storage::Cuda(ys)) = (&stash.xs, &stash.ys) else {
            candle_core::bail!("grouped-linear: stash is not on the GPU")
        };
        let dev = sx.device().clone();
        let op = "grouped-linear";
        let sf = dtype_suffix(sx.dtype(), "grouped-linear")?;
        let (tokens, d_in, d_out) = dims;
        let s = self.slots;
        let (dx, dw, dg) = for_kernel_dtype!(op, sx.dtype(), T => {
            let xs_v: CudaView<T> = xs.as_cuda_slice::<T>()?.slice(0..s * d_in);
            let ys_v: CudaView<T> = ys.as_cuda_slice::<T>()?.slice(0..s * d_out);
            let (dx, dw, dg) = self.cuda_bwd_t::<T>(
                &dev,
                &view(sx, lx, op)?,
                &view(sw, lw, op)?,
                &view(sg, lg, op)?,
                &view(sd, ld, op)?,
                (&xs_v, &ys_v),
                (tokens, d_in, d_out),
                sf,
            )?;
            (
                tensor(dx, &dev, x.shape()),
                tensor(dw, &dev, w.shape()),
                tensor(dg, &dev, gates.shape()),
            )
        });
        Ok((Some(dx), Some(dw), Some(dg)))
    }
}
