//! Gate probabilities in slot order on the GPU: `gates[s] = probs[idx[s]]` over the flat (T * E)
//! router probabilities, for the MoE kernels' combine. Composed, this is
//! `probs.index_select(idx, 0)`, whose CUDA backward (candle's index_add) walks every index of a
//! flat vector in one thread: 4.1 ms per router and step at paper-block on an H200 (ncu), 29 of
//! MoZ's ~50 ms extra GPU time per step. Here the backward is one scatter into zeros (the picks of
//! a routing are distinct token-expert pairs).
use candle_core::{Result, Tensor};

/// `probs.index_select(idx, 0)` for a flat `probs` (N) and u32 `idx` (S); on the GPU as one
/// kernel each way, elsewhere as the candle op.
pub fn gate_pick(probs: &Tensor, idx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if probs.device().is_cuda() && super::cuda::supported_dtype(probs.dtype()) {
        let op = imp::GatePick { scatter_len: None };
        return probs.contiguous()?.apply_op2(&idx.contiguous()?, op);
    }
    probs.index_select(idx, 0)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::cuda::{dtype_suffix, grid, launch, output, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

    const MODULE: &str = "moz_moe";

    /// gates = probs[idx] (forward) or, with `scatter_len`, a zeroed buffer of that length with
    /// grad written at idx (backward).
    fn launch_pick<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        src: &CudaStorage,
        ls: &Layout,
        idx: &CudaStorage,
        li: &Layout,
        scatter_len: Option<usize>,
    ) -> Result<(CudaStorage, Shape)> {
        let op = "gate-pick";
        let dev = src.device().clone();
        let n = li.shape().elem_count();
        let sfx = dtype_suffix(src.dtype(), op)?;
        let (src_v, idx_v) = (view::<T>(src, ls, op)?, view::<u32>(idx, li, op)?);
        let ni = n as i32;
        let (mut out, len, name) = match scatter_len {
            None => (output::<T>(&dev, n)?, n, format!("moe_pick_{sfx}")),
            Some(len) => (
                dev.alloc_zeros::<T>(len)?,
                len,
                format!("moe_pick_bwd_{sfx}"),
            ),
        };
        // SAFETY: moe_pick(probs, idx, n, gates) / moe_pick_bwd(dgates, idx, n, dprobs): n
        // threads read idx[s] < probs' (or dprobs') length (router indices token * E + expert)
        // and the n-element side.
        unsafe {
            launch!(
                &dev,
                MODULE,
                &name,
                grid(n, 256)?,
                [&src_v, &idx_v, &ni, &mut out]
            )?
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
    }

    fn dispatch(
        src: &CudaStorage,
        ls: &Layout,
        idx: &CudaStorage,
        li: &Layout,
        scatter_len: Option<usize>,
    ) -> Result<(CudaStorage, Shape)> {
        if idx.dtype() != DType::U32 {
            candle_core::bail!("gate-pick: indices must be u32, got {:?}", idx.dtype());
        }
        match src.dtype() {
            DType::F32 => launch_pick::<f32>(src, ls, idx, li, scatter_len),
            DType::BF16 => launch_pick::<half::bf16>(src, ls, idx, li, scatter_len),
            d => candle_core::bail!("gate-pick: unsupported dtype {d:?}"),
        }
    }

    /// The forward (`scatter_len` None) or, as an op of its own with no gradient, the
    /// backward's scatter into a zeroed buffer of `scatter_len` elements.
    pub struct GatePick {
        pub scatter_len: Option<usize>,
    }

    impl CustomOp2 for GatePick {
        fn name(&self) -> &'static str {
            "gate-pick"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("gate-pick: GPU op (the CPU uses index_select)")
        }

        fn cuda_fwd(
            &self,
            src: &CudaStorage,
            ls: &Layout,
            idx: &CudaStorage,
            li: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            dispatch(src, ls, idx, li, self.scatter_len)
        }

        fn bwd(
            &self,
            probs: &Tensor,
            idx: &Tensor,
            _gates: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let scatter = GatePick {
                scatter_len: Some(probs.elem_count()),
            };
            let dprobs = grad.contiguous()?.apply_op2_no_bwd(idx, &scatter)?;
            Ok((Some(dprobs), None))
        }
    }
}
