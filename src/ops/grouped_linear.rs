//! The expert GEMMs of an `ExpertLinear` as one CPU op: tokens are gathered in expert order,
//! each expert multiplies its contiguous block with one GEMM, and the outputs are scattered back
//! weighted by their gates. Composed from candle ops the same computation needs an
//! index_select, a GEMM, a gate product and a cat per expert plus a gather back, and the
//! backward of each index_select zero-fills and scatters a tensor of all tokens.
//!
//! Inputs: x (T, d_in) in token order, w (E, d_out, d_in) the stacked expert weights, gates
//! (S,) the gate probability of each routing slot in expert order. The routing itself (which
//! token each slot reads, where each expert's slots start) is discrete and lives in the op.
use super::{for_float, gemm_into, host_slice, with_host};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::any::Any;
use std::sync::{Arc, Mutex};

pub struct GroupedLinear {
    /// Token of each slot, slots sorted by expert.
    pub(crate) slot_tokens: Arc<Vec<u32>>,
    /// Slots of expert e: offsets[e]..offsets[e + 1].
    offsets: Vec<usize>,
    /// The slots of token t: back[t * k..(t + 1) * k] (k = S / T).
    pub(crate) back: Arc<Vec<u32>>,
    /// Number of slots S (the host vectors are empty when the routing lives on the GPU).
    pub(crate) slots: usize,
    /// Choices per token of a device routing (whose padded slots are not k per token); a host
    /// routing has S = T * k.
    pub(crate) top_k: Option<usize>,
    /// slot_tokens | back on the GPU: from the device routing, or uploaded by the first CUDA
    /// forward and kept for the backward.
    #[cfg(feature = "cuda")]
    pub(crate) device_idx:
        std::sync::OnceLock<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>,
    /// The gathered inputs and ungated expert outputs of the forward pass (`(Vec<T>, Vec<T>)`,
    /// S x d_in and S x d_out), for the weight and gate gradients. Each forward call builds a
    /// new op, so this belongs to one graph node.
    pub(crate) stash: Mutex<Option<Box<dyn Any + Send>>>,
}

impl GroupedLinear {
    /// The op for one routing: slot tokens sorted by expert, expert slot ranges, and the slots
    /// of each token.
    pub(crate) fn new(
        slot_tokens: Arc<Vec<u32>>,
        offsets: Vec<usize>,
        back: Arc<Vec<u32>>,
    ) -> GroupedLinear {
        GroupedLinear {
            slots: slot_tokens.len(),
            top_k: None,
            slot_tokens,
            offsets,
            back,
            #[cfg(feature = "cuda")]
            device_idx: Default::default(),
            stash: Mutex::new(None),
        }
    }

    /// The op for a top-1 routing computed on the GPU: `idx` is slot_tokens (S) | back (T)
    /// there; expert e's (padded) slots are offsets[e]..offsets[e + 1].
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device(
        idx: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
        offsets: Vec<usize>,
        slots: usize,
    ) -> GroupedLinear {
        let op = GroupedLinear {
            slots,
            top_k: Some(1),
            slot_tokens: Arc::default(),
            offsets,
            back: Arc::default(),
            device_idx: Default::default(),
            stash: Mutex::new(None),
        };
        let _ = op.device_idx.set(idx);
        op
    }

    /// Rows of `x` in slot order (S x d_in).
    fn gather<T: WithDType>(&self, x: &[T], d_in: usize) -> Vec<T> {
        let mut xs = vec![T::zero(); self.slot_tokens.len() * d_in];
        xs.par_chunks_mut(d_in.max(1))
            .zip(self.slot_tokens.par_iter())
            .for_each(|(row, &tok)| {
                let t = tok as usize;
                row.copy_from_slice(&x[t * d_in..(t + 1) * d_in]);
            });
        xs
    }

    /// out[t] = sum over the slots s of token t of scale(s) * rows[s] (T x d), token-parallel.
    fn combine<T: WithDType + num_traits::Float>(
        &self,
        rows: &[T],
        d: usize,
        tokens: usize,
        scale: impl Fn(usize) -> T + Sync,
    ) -> Vec<T> {
        let k = self.back.len() / tokens.max(1);
        let mut out = vec![T::zero(); tokens * d];
        out.par_chunks_mut(d.max(1)).enumerate().for_each(|(t, o)| {
            for &s in &self.back[t * k..(t + 1) * k] {
                let s = s as usize;
                let g = scale(s);
                for (ov, &v) in o.iter_mut().zip(&rows[s * d..(s + 1) * d]) {
                    *ov += g * v;
                }
            }
        });
        out
    }

    /// Choices per token.
    #[cfg(feature = "cuda")]
    pub(crate) fn top_k(&self, tokens: usize) -> usize {
        self.top_k.unwrap_or(self.slots / tokens.max(1))
    }

    pub(crate) fn experts(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.offsets.len() - 1).map(|e| (e, self.offsets[e], self.offsets[e + 1]))
    }

    /// (y, gathered inputs xs, ungated expert outputs ys).
    pub(crate) fn forward<T: WithDType + num_traits::Float>(
        &self,
        x: &[T],
        w: &[T],
        gates: &[T],
        tokens: usize,
        d_in: usize,
        d_out: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let xs = self.gather(x, d_in);
        let mut ys = vec![T::zero(); self.slot_tokens.len() * d_out];
        for (e, a, b) in self.experts() {
            // ys_e = xs_e W_e^T: W_e is (d_out x d_in) row-major, so W_e^T has strides (1, d_in).
            gemm_into(
                b - a,
                d_out,
                d_in,
                &mut ys[a * d_out..b * d_out],
                (&xs[a * d_in..b * d_in], d_in as isize, 1),
                (
                    &w[e * d_out * d_in..(e + 1) * d_out * d_in],
                    1,
                    d_in as isize,
                ),
            );
        }
        let y = self.combine(&ys, d_out, tokens, |s| gates[s]);
        (y, xs, ys)
    }

    /// (dx, dw, dgates).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<T: WithDType + num_traits::Float>(
        &self,
        x: &[T],
        w: &[T],
        gates: &[T],
        dy: &[T],
        (xs, ys): (&[T], &[T]),
        d_in: usize,
        d_out: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let s = self.slot_tokens.len();
        let mut dys = vec![T::zero(); s * d_out];
        let mut dgates = vec![T::zero(); s];
        dys.par_chunks_mut(d_out.max(1))
            .zip(dgates.par_iter_mut())
            .enumerate()
            .for_each(|(r, (row, dg))| {
                let t = self.slot_tokens[r] as usize;
                let dyt = &dy[t * d_out..(t + 1) * d_out];
                // Plain products: mul_add outside the AVX2 kernels is a libm call per element.
                *dg = dyt
                    .iter()
                    .zip(&ys[r * d_out..(r + 1) * d_out])
                    .fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                let g = gates[r];
                for (o, &v) in row.iter_mut().zip(dyt) {
                    *o = g * v;
                }
            });
        let mut dxs = vec![T::zero(); s * d_in];
        let mut dw = vec![T::zero(); w.len()];
        for (e, a, b) in self.experts() {
            let we = &w[e * d_out * d_in..(e + 1) * d_out * d_in];
            // dxs_e = dys_e W_e.
            gemm_into(
                b - a,
                d_in,
                d_out,
                &mut dxs[a * d_in..b * d_in],
                (&dys[a * d_out..b * d_out], d_out as isize, 1),
                (we, d_in as isize, 1),
            );
            // dW_e = dys_e^T xs_e (dys_e^T has strides (1, d_out)).
            gemm_into(
                d_out,
                d_in,
                b - a,
                &mut dw[e * d_out * d_in..(e + 1) * d_out * d_in],
                (&dys[a * d_out..b * d_out], 1, d_out as isize),
                (&xs[a * d_in..b * d_in], d_in as isize, 1),
            );
        }
        let dx = self.combine(&dxs, d_in, x.len() / d_in.max(1), |_| T::one());
        (dx, dw, dgates)
    }

    pub(crate) fn dims(
        &self,
        x: &Shape,
        w: &Shape,
        gates: &Shape,
    ) -> Result<(usize, usize, usize)> {
        let (tokens, d_in) = x.dims2()?;
        let (e, d_out, d_in_w) = w.dims3()?;
        let s = gates.dims1()?;
        if d_in_w != d_in || e + 1 != self.offsets.len() || s != self.slots {
            candle_core::bail!(
                "grouped-linear: x {x:?}, w {w:?}, gates {gates:?} do not match {} experts and {} slots",
                self.offsets.len() - 1,
                self.slots
            );
        }
        // (A device routing's indices are written by its kernel, in range by construction.)
        if self.slot_tokens.iter().any(|&t| t as usize >= tokens) {
            candle_core::bail!("grouped-linear: a slot reads a token past {tokens}");
        }
        let consistent = match self.top_k {
            // Device routing: padded expert ranges within the slots.
            Some(_) => self.offsets[e] <= s,
            None => {
                self.back.len() == s && self.offsets[e] == s && (tokens == 0 || s % tokens == 0)
            }
        };
        if !consistent {
            candle_core::bail!("grouped-linear: {s} slots are not k per token for {tokens} tokens");
        }
        Ok((tokens, d_in, d_out))
    }
}

impl CustomOp3 for GroupedLinear {
    fn name(&self) -> &'static str {
        "grouped-linear"
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
        let (tokens, d_in, d_out) = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        for_float!(self.name(), s1.dtype(), T => {
            let (y, xs, ys) = self.forward::<T>(
                host_slice(s1, l1)?,
                host_slice(s2, l2)?,
                host_slice(s3, l3)?,
                tokens,
                d_in,
                d_out,
            );
            *self.stash.lock().unwrap() = Some(Box::new((xs, ys)));
            Ok((T::to_cpu_storage_owned(y), Shape::from((tokens, d_out))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::cuda_backend::CudaStorage,
        l1: &Layout,
        s2: &candle_core::cuda_backend::CudaStorage,
        l2: &Layout,
        s3: &candle_core::cuda_backend::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let dims = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        self.cuda_forward(s1, l1, s2, l2, s3, l3, dims)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gates: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (tokens, d_in, d_out) = self.dims(x.shape(), w.shape(), gates.shape())?;
        let stash = self.stash.lock().unwrap().take();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return self.cuda_backward(x, w, gates, grad, stash, (tokens, d_in, d_out));
        }
        let _ = tokens;
        #[allow(clippy::too_many_arguments)]
        fn run<T: WithDType + num_traits::Float>(
            op: &GroupedLinear,
            x: &Tensor,
            w: &Tensor,
            gates: &Tensor,
            grad: &Tensor,
            stash: Option<Box<dyn Any + Send>>,
            d_in: usize,
            d_out: usize,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dx, dw, dg) = with_host::<T, _>(x, |xv| {
                with_host::<T, _>(w, |wv| {
                    with_host::<T, _>(gates, |gv| {
                        with_host::<T, _>(grad, |dv| {
                            // Without the forward's outputs (a second backward), recompute them.
                            let (xs, ys) =
                                match stash.and_then(|s| s.downcast::<(Vec<T>, Vec<T>)>().ok()) {
                                    Some(saved) => *saved,
                                    None => {
                                        let (_, xs, ys) =
                                            op.forward(xv, wv, gv, xv.len() / d_in, d_in, d_out);
                                        (xs, ys)
                                    }
                                };
                            Ok(op.backward(xv, wv, gv, dv, (&xs, &ys), d_in, d_out))
                        })
                    })
                })
            })?;
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
                Some(Tensor::from_vec(dg, gates.shape(), dev)?),
            ))
        }
        for_float!(self.name(), x.dtype(), T => run::<T>(self, x, w, gates, grad, stash, d_in, d_out))
    }
}

/// y (T, d_out): for each slot r, y[slot_tokens[r]] += gates[r] * W_e x[slot_tokens[r]], where e
/// is the expert whose range `offsets[e]..offsets[e + 1]` holds r. x (T, d_in), w (E, d_out,
/// d_in), gates (S,). CPU (f32, f64) or CUDA (f32, bf16; kernels/moe.cu + cuBLAS).
pub fn grouped_linear(
    x: &Tensor,
    w: &Tensor,
    gates: &Tensor,
    slot_tokens: Arc<Vec<u32>>,
    offsets: Vec<usize>,
    back: Arc<Vec<u32>>,
) -> Result<Tensor> {
    let op = GroupedLinear::new(slot_tokens, offsets, back);
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &gates.contiguous()?, op)
}

/// `grouped_linear` for a top-1 routing computed on the GPU (`crate::ops::route_cuda`): `idx`
/// holds slot_tokens (S, the gates' length) | back (T) there, `offsets` the (padded) slot range
/// of each expert.
#[cfg(feature = "cuda")]
pub fn grouped_linear_on_device(
    x: &Tensor,
    w: &Tensor,
    gates: &Tensor,
    idx: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    offsets: Vec<usize>,
) -> Result<Tensor> {
    let op = GroupedLinear::on_device(idx, offsets, gates.elem_count());
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &gates.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Values and gradients of the op against the same computation composed from candle ops
    /// (gather, one GEMM per expert, gate product, scatter-add), top-2 with an expert that gets
    /// no token.
    #[test]
    fn matches_composed_gather_gemm_scatter() -> Result<()> {
        let dev = Device::Cpu;
        let (t, d_in, d_out, e) = (7, 5, 6, 4);
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (t, d_in), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (e, d_out, d_in), &dev)?)?;
        // Top-2: every token in two experts; expert 1 gets no token.
        let slot_tokens: Vec<u32> = vec![0, 2, 3, 6, 0, 1, 3, 4, 5, 1, 2, 4, 5, 6];
        let offsets = vec![0, 4, 4, 9, 14];
        let mut by_token: Vec<Vec<u32>> = vec![Vec::new(); t];
        for (s, &tok) in slot_tokens.iter().enumerate() {
            by_token[tok as usize].push(s as u32);
        }
        assert!(by_token.iter().all(|v| v.len() == 2));
        let back: Vec<u32> = by_token.concat();
        let gates = Var::from_tensor(&Tensor::rand(0f64, 1.0, slot_tokens.len(), &dev)?)?;
        let dy = Tensor::randn(0f64, 1.0, (t, d_out), &dev)?;

        let fused = grouped_linear(
            x.as_tensor(),
            w.as_tensor(),
            gates.as_tensor(),
            Arc::new(slot_tokens.clone()),
            offsets.clone(),
            Arc::new(back),
        )?;
        let idx = Tensor::new(slot_tokens.as_slice(), &dev)?;
        let xs = x.as_tensor().index_select(&idx, 0)?;
        let mut parts = Vec::new();
        for ei in 0..e {
            let (a, b) = (offsets[ei], offsets[ei + 1]);
            if a < b {
                let we = w.as_tensor().get(ei)?;
                parts.push(xs.narrow(0, a, b - a)?.matmul(&we.t()?)?);
            }
        }
        let ys = Tensor::cat(&parts, 0)?.broadcast_mul(&gates.as_tensor().unsqueeze(1)?)?;
        let composed = Tensor::zeros((t, d_out), DType::F64, &dev)?.index_add(&idx, &ys, 0)?;

        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
        };
        assert!(max_diff(&fused, &composed)? < 1e-12);
        let gf = (fused * &dy)?.sum_all()?.backward()?;
        let gc = (composed * &dy)?.sum_all()?.backward()?;
        for v in [&x, &w, &gates] {
            let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(max_diff(a, b)? < 1e-12, "{:?}", v.shape());
            assert!(a.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0);
        }
        // Expert 1 got no token: its weight gradient is exactly zero.
        let dw1 = gf
            .get(&w)
            .unwrap()
            .get(1)?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert_eq!(dw1, 0.0);
        Ok(())
    }
}
