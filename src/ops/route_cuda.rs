//! Top-1 routing on the GPU (kernels/moe.cu `moe_route_count`, `_scan`, `_place`): the expert of
//! each token, the slots sorted by expert, each token's slot and the gate picks, all written on
//! the device. Only the E + 1 offsets travel to the host, which needs them as the row counts of
//! the expert GEMMs; they are copied into pinned memory behind an event, so the host can queue
//! more work (the mixer's conv and SSD) before it waits for them. The host routing it replaces
//! copied the (T, E) probabilities to the host and three index arrays back, each copy a stall of
//! the queue. Each expert's slots start at a multiple of a granule (padding slots read no
//! token): cuBLAS plans each GEMM shape it has not seen on the host, 0.23-0.35 ms per call on the
//! H200 against 10 us for a repeated one, and exact row counts change at every step.
use super::cuda::{dtype_suffix, for_kernel_dtype, launch, output, tensor, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PinnedHostSlice};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Shape, Storage, Tensor};

const MODULE: &str = "moz_moe";

/// The count kernel keeps 32 words of shared memory per expert.
pub const MAX_EXPERTS: usize = 384;

/// Nanoseconds the host has waited for routings' expert offsets (see `take_wait_ns`).
static WAIT_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Nanoseconds the host spent waiting for device routings since the last call (benchmarks'
/// split of a step).
pub fn take_wait_ns() -> u64 {
    WAIT_NS.swap(0, std::sync::atomic::Ordering::Relaxed)
}

/// The granule of the expert GEMMs' row counts in the model's routing (at most 255 padding
/// rows per expert, 6% of paper-block's 16,384 tokens with 4 experts).
pub const GRANULE: usize = 256;

/// The granule in use: GRANULE, or MOZ_LAB_ROUTE_GRANULE (for measuring; >= 1).
pub fn granule() -> usize {
    static G: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *G.get_or_init(|| {
        std::env::var("MOZ_LAB_ROUTE_GRANULE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&g| g >= 1)
            .unwrap_or(GRANULE)
    })
}

/// One routing on the device; `offsets` completes it.
pub struct DeviceRouting {
    /// slot_tokens (S) | back (T), as the grouped linear's CUDA path reads them; S = T + E *
    /// (granule - 1) slots, the padding ones reading no token.
    pub idx: CudaSlice<u32>,
    /// token * E + expert of each slot ((S,) u32, none for padding), for `gate_pick`.
    pub pick: Tensor,
    /// Fraction of the slots per expert ((E,) f32), for the load-balancing loss.
    pub frac: Tensor,
    /// offsets (E + 1) on their way to the host.
    pending: PinnedHostSlice<u32>,
    /// Recorded after the copy (the pinned buffer's own event is only recorded when cudarc
    /// tracks events, which moz-lab turns off).
    copied: candle_core::cuda_backend::cudarc::driver::CudaEvent,
    experts: usize,
    granule: usize,
}

/// The first slot of each expert (E + 1 values) given the cumulative token counts: every
/// expert's slots rounded up to a multiple of `granule`, as the routing kernels lay them out.
pub fn padded_offsets(offsets: &[usize], granule: usize) -> Vec<usize> {
    let mut out = vec![0];
    for w in offsets.windows(2) {
        let last = *out.last().unwrap();
        out.push(last + (w[1] - w[0]).div_ceil(granule) * granule);
    }
    out
}

/// A finished device routing: cumulative token counts per expert, the padded slot offsets the
/// GEMMs use, the pinned buffer for reuse and slot_tokens | back.
pub struct RoutingOffsets {
    pub offsets: Vec<usize>,
    pub padded: Vec<usize>,
    pub pinned: PinnedHostSlice<u32>,
    pub idx: CudaSlice<u32>,
}

impl DeviceRouting {
    /// Waits for the offsets (the host is not blocked on the rest of the queue, only on the
    /// work queued before the routing) and hands back the pinned buffer for reuse.
    pub fn offsets(self) -> Result<RoutingOffsets> {
        let t0 = std::time::Instant::now();
        self.copied.synchronize().w()?;
        let waited = t0.elapsed().as_nanos() as u64;
        WAIT_NS.fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
        let offsets: Vec<usize> = self.pending.as_slice().w()?[..self.experts + 1]
            .iter()
            .map(|&o| o as usize)
            .collect();
        Ok(RoutingOffsets {
            padded: padded_offsets(&offsets, self.granule),
            offsets,
            pinned: self.pending,
            idx: self.idx,
        })
    }
}

/// Routes each row of `probs` (T, E) to its most probable expert, each expert's slots starting
/// at a multiple of `granule` (1: no padding). `pinned`: a buffer from an earlier routing of at
/// least E + 1 elements (allocated when None or too small).
pub fn route_top1(
    probs: &Tensor,
    granule: usize,
    pinned: Option<PinnedHostSlice<u32>>,
) -> Result<DeviceRouting> {
    let op = "route-top1";
    let (t, e) = probs.dims2()?;
    if t > u32::MAX as usize / e.max(1) {
        candle_core::bail!("{op}: {t} tokens x {e} experts overflow the u32 gate picks");
    }
    let probs = probs.contiguous()?;
    let (storage, layout) = probs.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("{op}: the probabilities are not on the GPU")
    };
    if e > MAX_EXPERTS {
        candle_core::bail!("{op}: {e} experts; the routing kernel takes at most {MAX_EXPERTS}");
    }
    let dev = s.device().clone();
    let sfx = dtype_suffix(s.dtype(), op)?;
    let blocks = t.div_ceil(1024).max(1);
    let granule = granule.max(1);
    let slots = t + e * (granule - 1);
    if slots > u32::MAX as usize {
        candle_core::bail!("{op}: {slots} slots overflow the u32 indices");
    }
    let mut offsets = output::<u32>(&dev, e + 1)?;
    let mut idx = output::<u32>(&dev, slots + t)?; // slot_tokens | back
    let mut pick = output::<u32>(&dev, slots)?;
    let mut frac = output::<f32>(&dev, e)?;
    let mut eid = output::<u32>(&dev, t)?;
    let mut rank = output::<u32>(&dev, t)?;
    let mut counts = output::<u32>(&dev, blocks * e)?;
    let (ti, ei, bi) = (t as i32, e as i32, blocks as i32);
    let (gi, si) = (granule as i32, slots as i32);
    let grid = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: (e * 32 * 4) as u32,
    };
    for_kernel_dtype!(op, s.dtype(), T => {
        let probs_v = view::<T>(s, layout, op)?;
        // SAFETY: moe_route_count(probs, tokens, experts, eid, rank, counts): blocks of
        // 1024 threads (32 full warps for the ballots) over T tokens, E * 32 words of
        // shared memory; probs holds T * E elements, eid and rank T, counts blocks * E.
        unsafe {
            launch!(
                &dev,
                MODULE,
                &format!("moe_route_count_{sfx}"),
                grid,
                [&probs_v, &ti, &ei, &mut eid, &mut rank, &mut counts]
            )?
        }
    });
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    {
        let (mut slot_tokens, _) = idx.split_at_mut(slots);
        // SAFETY: moe_route_scan(tokens, experts, blocks, granule, slots, counts, offsets, frac,
        // slot_tokens, pick), one block of 1024 threads; counts holds blocks * E, offsets E + 1,
        // frac E, slot_tokens and pick S = T + E * (granule - 1) (the padding slots it writes
        // end before S).
        unsafe {
            launch!(
                &dev,
                MODULE,
                "moe_route_scan",
                one_block,
                [
                    &ti,
                    &ei,
                    &bi,
                    &gi,
                    &si,
                    &mut counts,
                    &mut offsets,
                    &mut frac,
                    &mut slot_tokens,
                    &mut pick
                ]
            )?
        };
    }
    {
        let (mut slot_tokens, mut back) = idx.split_at_mut(slots);
        let place = LaunchConfig {
            shared_mem_bytes: 0,
            ..grid
        };
        // SAFETY: moe_route_place(tokens, experts, eid, rank, base, slot_tokens, back, pick):
        // the count kernel's grid; each token writes its slot (< S, distinct) and back[t].
        unsafe {
            launch!(
                &dev,
                MODULE,
                "moe_route_place",
                place,
                [
                    &ti,
                    &ei,
                    &eid,
                    &rank,
                    &counts,
                    &mut slot_tokens,
                    &mut back,
                    &mut pick
                ]
            )?
        };
    }
    let stream = dev.cuda_stream();
    let mut pending = match pinned {
        Some(p) if p.len() > e => p,
        // SAFETY: the copy below writes the E + 1 elements before anything reads them.
        _ => unsafe { stream.context().alloc_pinned::<u32>(e + 1) }.w()?,
    };
    // Asynchronous into pinned memory.
    stream.memcpy_dtoh(&offsets, &mut pending).w()?;
    let copied = stream.record_event(None).w()?;
    Ok(DeviceRouting {
        copied,
        idx,
        pick: tensor(pick, &dev, &Shape::from(slots)),
        frac: tensor(frac, &dev, &Shape::from(e)),
        pending,
        experts: e,
        granule,
    })
}

/// Row softmax of the router logits (T, E) on the GPU, one kernel each way. Composed
/// (`candle_nn::ops::softmax`) it is five ops forward and about twice as many backward (the
/// row max is differentiated too), each a launch the host pays for at every router.
pub fn softmax_rows(logits: &Tensor) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(RouterSoftmax)
}

struct RouterSoftmax;

/// The backward's dx = p * (dy - sum_j dy_j p_j), as an op without a gradient of its own.
struct RouterSoftmaxBwd;

/// Launches `moe_softmax_{sfx}` (inputs x) or `moe_softmax_bwd_{sfx}` (inputs p, dy): one warp
/// per row of a (rows, cols) matrix.
fn launch_softmax(
    name: &str,
    inputs: &[(
        &candle_core::cuda_backend::CudaStorage,
        &candle_core::Layout,
    )],
) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
    let op = "router-softmax";
    let (s0, l0) = inputs[0];
    let (rows, cols) = l0.shape().dims2()?;
    let dev = s0.device().clone();
    let sfx = dtype_suffix(s0.dtype(), op)?;
    let cfg = super::cuda::grid(rows * 32, 256)?;
    let (ri, ci) = (rows as i32, cols as i32);
    let out = for_kernel_dtype!(op, s0.dtype(), T => {
        let mut out = output::<T>(&dev, rows * cols)?;
        let a = view::<T>(s0, l0, op)?;
        let f = format!("{name}_{sfx}");
        match inputs.get(1) {
            // SAFETY: moe_softmax(x, rows, cols, y): rows * cols elements each, one warp
            // per row, every element of y written.
            None => unsafe { launch!(&dev, MODULE, &f, cfg, [&a, &ri, &ci, &mut out])? },
            Some((s1, l1)) => {
                let b = view::<T>(s1, l1, op)?;
                // SAFETY: moe_softmax_bwd(p, dy, rows, cols, dx), as above.
                unsafe { launch!(&dev, MODULE, &f, cfg, [&a, &b, &ri, &ci, &mut out])? }
            }
        }
        candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((out, l0.shape().clone()))
}

impl candle_core::CustomOp1 for RouterSoftmax {
    fn name(&self) -> &'static str {
        "router-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("router-softmax: GPU op (the CPU uses candle_nn's softmax)")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        launch_softmax("moe_softmax", &[(s, l)])
    }

    fn bwd(&self, _logits: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(probs.apply_op2_no_bwd(
            &grad.contiguous()?,
            &RouterSoftmaxBwd,
        )?))
    }
}

impl candle_core::CustomOp2 for RouterSoftmaxBwd {
    fn name(&self) -> &'static str {
        "router-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("router-softmax-bwd: GPU op")
    }

    fn cuda_fwd(
        &self,
        p: &candle_core::cuda_backend::CudaStorage,
        lp: &candle_core::Layout,
        dy: &candle_core::cuda_backend::CudaStorage,
        ld: &candle_core::Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        launch_softmax("moe_softmax_bwd", &[(p, lp), (dy, ld)])
    }
}

/// The Switch load-balancing loss alpha * E * sum_e frac_e * mean_t probs[t, e] (a scalar in the
/// probabilities' dtype) as one kernel each way: composed (mean, product, sum, scale) it is
/// five launches forward and four backward per router. `frac` (E,) f32 is constant.
pub fn switch_aux_loss(probs: &Tensor, frac: &Tensor, alpha: f64) -> Result<Tensor> {
    let (_, e) = probs.dims2()?;
    let op = SwitchAuxLoss {
        scale: (alpha * e as f64) as f32,
        probs_shape: None,
    };
    probs.contiguous()?.apply_op2(&frac.contiguous()?, op)
}

/// Forward (`probs_shape` None: inputs probs, frac) or, as an op without a gradient, the
/// backward (inputs the scalar's gradient and frac, output `probs_shape`).
struct SwitchAuxLoss {
    scale: f32,
    probs_shape: Option<Shape>,
}

impl candle_core::CustomOp2 for SwitchAuxLoss {
    fn name(&self) -> &'static str {
        "switch-aux-loss"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("switch-aux-loss: GPU op (the CPU composes it)")
    }

    fn cuda_fwd(
        &self,
        a: &candle_core::cuda_backend::CudaStorage,
        la: &candle_core::Layout,
        frac: &candle_core::cuda_backend::CudaStorage,
        lf: &candle_core::Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let op = "switch-aux-loss";
        let dev = a.device().clone();
        let sfx = dtype_suffix(a.dtype(), op)?;
        let (shape, cfg, name) = match &self.probs_shape {
            None => (
                Shape::from(()),
                LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                },
                format!("moe_aux_loss_{sfx}"),
            ),
            Some(s) => (
                s.clone(),
                super::cuda::grid(s.elem_count(), 256)?,
                format!("moe_aux_loss_bwd_{sfx}"),
            ),
        };
        let (t, e) = match &self.probs_shape {
            None => la.shape().dims2()?,
            Some(s) => s.dims2()?,
        };
        let (ti, ei, scale) = (t as i32, e as i32, self.scale);
        let frac_v = view::<f32>(frac, lf, op)?;
        let out = for_kernel_dtype!(op, a.dtype(), T => {
            let a_v = view::<T>(a, la, op)?;
            let mut out = output::<T>(&dev, shape.elem_count())?;
            // SAFETY: moe_aux_loss(p, frac, tokens, experts, scale, out) in one block over
            // T * E probabilities into one element, or moe_aux_loss_bwd(g, frac, ...,
            // dp) with a thread per element of the T * E gradient; frac holds E values.
            unsafe {
                launch!(
                    &dev,
                    MODULE,
                    &name,
                    cfg,
                    [&a_v, &frac_v, &ti, &ei, &scale, &mut out]
                )?
            };
            candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, shape))
    }

    fn bwd(
        &self,
        probs: &Tensor,
        frac: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = SwitchAuxLoss {
            scale: self.scale,
            probs_shape: Some(probs.shape().clone()),
        };
        let dprobs = grad.contiguous()?.apply_op2_no_bwd(frac, &back)?;
        Ok((Some(dprobs), None))
    }
}
