//! Top-k token routing shared by `ExpertLinear` and `MoeMlp`: softmax router, sparse
//! dispatch (tokens grouped per expert, so compute grows with k and not with E), gather back
//! weighted by the gate probability, Switch-Transformer load balancing and router z-loss.
use super::params::{Init, ParamStore};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use std::sync::{Arc, Mutex};

/// What one routed forward pass did: tokens per expert and the auxiliary losses.
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Token-slot assignments per expert (sums to tokens * top_k).
    pub counts: Vec<usize>,
    /// alpha * E * sum_e f_e * P_e (Switch Transformer), a scalar tensor in the graph.
    pub aux_loss: Tensor,
}

#[derive(Debug)]
pub struct Router {
    weight: Tensor, // (E, d_in)
    pub experts: usize,
    pub top_k: usize,
    aux_loss_coef: f64,
    z_loss_coef: f64,
    last: Mutex<Option<RoutingStats>>,
    /// The pinned host buffer the device routing's expert offsets arrive in, reused per pass.
    #[cfg(feature = "cuda")]
    pinned: Mutex<Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>>>,
}

/// A top-1 routing computed on the GPU whose expert offsets are still on their way to the host
/// (`Router::route_on_device`, completed by `Router::complete`).
#[cfg(feature = "cuda")]
pub struct DeviceRoute {
    routing: crate::ops::route_cuda::DeviceRouting,
    /// Gate probability of each slot, (S,), in the autograd graph.
    gates: Tensor,
    aux_loss: Tensor,
}

/// Where one forward pass sends its tokens: `tokens * top_k` slots sorted by expert.
pub struct Routing {
    /// Token each slot reads, slots sorted by expert (in token order within an expert).
    pub slot_tokens: Arc<Vec<u32>>,
    /// Slots of expert e: `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<usize>,
    /// Gate probability of each slot, (S,), in the autograd graph.
    pub gates: Tensor,
    /// Sorted position of the j-th choice of token t, at `t * top_k + j`.
    pub back: Vec<u32>,
}

impl Router {
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        d_in: usize,
        experts: usize,
        top_k: usize,
        aux_loss_coef: f64,
        z_loss_coef: f64,
    ) -> Result<Router> {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = store.add(name, &[experts, d_in], Init::Uniform(bound), true)?;
        Ok(Router {
            weight,
            experts,
            top_k,
            aux_loss_coef,
            z_loss_coef,
            last: Mutex::new(None),
            #[cfg(feature = "cuda")]
            pinned: Mutex::new(None),
        })
    }

    /// Router logits and softmax probabilities of `x` (T, d_in), both (T, E).
    fn probs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.probs_of(x.matmul(&self.weight.t()?)?)
    }

    /// Softmax probabilities of router logits (T, E), with the logits.
    fn probs_of(&self, logits: Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if crate::ops::fused_cuda(&logits)
            && crate::ops::cuda::kernel_enabled("MOZ_LAB_COMPOSED_SOFTMAX")
        {
            let probs = crate::ops::route_cuda::softmax_rows(&logits)?;
            return Ok((logits, probs));
        }
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        Ok((logits, probs))
    }

    /// Switch load balancing, alpha * E * sum_e f_e * P_e with `frac` f_e (the fraction of slots,
    /// constant) and P_e the mean probability, plus the router z-loss when its coefficient is set.
    fn aux_loss(&self, logits: &Tensor, probs: &Tensor, frac: &Tensor) -> Result<Tensor> {
        let e = self.experts as f64;
        let mean_p = probs.mean(0)?;
        let mut aux = ((mean_p * frac)?.sum_all()? * (self.aux_loss_coef * e))?;
        if self.z_loss_coef > 0.0 {
            let lse = logsumexp(logits)?;
            aux = (aux + (lse.sqr()?.mean_all()? * self.z_loss_coef)?)?;
        }
        Ok(aux)
    }

    /// Top-1 routing of `x` (T, d_in) on the GPU, the host not waiting for it; None where it
    /// does not apply (not on the GPU, top-k > 1, or `MOZ_LAB_HOST_ROUTING` set for
    /// comparisons), and `route` routes on the host.
    #[cfg(feature = "cuda")]
    pub fn route_on_device(&self, x: &Tensor) -> Result<Option<DeviceRoute>> {
        if !self.routes_on_device(x) {
            return Ok(None);
        }
        self.route_logits_on_device(x.matmul(&self.weight.t()?)?)
            .map(Some)
    }

    /// True when `route_on_device` routes `x` on the GPU (top-1, a kernel dtype, device
    /// routing not switched off).
    #[cfg(feature = "cuda")]
    pub fn routes_on_device(&self, x: &Tensor) -> bool {
        x.device().is_cuda()
            && self.top_k == 1
            && crate::ops::cuda::supported_dtype(x.dtype())
            && crate::ops::cuda::kernel_enabled("MOZ_LAB_HOST_ROUTING")
    }

    /// `route_on_device` from router logits (T, E) the caller computed (x times the router's
    /// weight transposed, e.g. as extra columns of another GEMM over the same x).
    #[cfg(feature = "cuda")]
    pub fn route_logits_on_device(&self, logits: Tensor) -> Result<DeviceRoute> {
        let (logits, probs) = self.probs_of(logits)?;
        let pinned = self.pinned.lock().unwrap().take();
        let granule = crate::ops::route_cuda::granule();
        let routing = crate::ops::route_cuda::route_top1(&probs, granule, pinned)?;
        let gates = crate::ops::gate_pick::gate_pick(&probs.flatten_all()?, &routing.pick)?;
        let aux_loss = if self.z_loss_coef == 0.0
            && crate::ops::cuda::kernel_enabled("MOZ_LAB_COMPOSED_AUX")
        {
            crate::ops::route_cuda::switch_aux_loss(&probs, &routing.frac, self.aux_loss_coef)?
        } else {
            let frac = routing.frac.to_dtype(probs.dtype())?;
            self.aux_loss(&logits, &probs, &frac)?
        };
        Ok(DeviceRoute {
            routing,
            gates,
            aux_loss,
        })
    }

    /// Waits for a device routing's expert offsets and keeps its statistics for `take_stats`:
    /// (gates (S,), slot_tokens | back on the device, the experts' padded slot offsets).
    #[cfg(feature = "cuda")]
    pub fn complete(
        &self,
        route: DeviceRoute,
    ) -> Result<(
        Tensor,
        candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
        Vec<usize>,
    )> {
        let r = route.routing.offsets()?;
        *self.pinned.lock().unwrap() = Some(r.pinned);
        self.record(RoutingStats {
            counts: r.offsets.windows(2).map(|w| w[1] - w[0]).collect(),
            aux_loss: route.aux_loss,
        });
        Ok((route.gates, r.idx, r.padded))
    }

    /// Routes `x` (T, d_in): softmax router, top-k on the host, the Switch load-balancing loss
    /// (and z-loss), kept with the token counts for `take_stats`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let (t, _) = x.dims2()?;
        let e = self.experts;
        let k = self.top_k;
        let (logits, probs) = self.probs(x)?;

        // Top-k selection on the host: the decision is discrete and not differentiated.
        let host: Vec<f32> = probs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut per_expert: Vec<Vec<u32>> = vec![Vec::new(); e];
        let mut slots: Vec<(usize, usize)> = Vec::with_capacity(t * k); // (expert, rank in expert)
        let mut order: Vec<usize> = (0..e).collect();
        for tok in 0..t {
            let row = &host[tok * e..(tok + 1) * e];
            if k == 1 {
                let best = (0..e).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                slots.push((best, per_expert[best].len()));
                per_expert[best].push(tok as u32);
            } else {
                order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
                for &best in &order[..k] {
                    slots.push((best, per_expert[best].len()));
                    per_expert[best].push(tok as u32);
                }
            }
        }
        let counts: Vec<usize> = per_expert.iter().map(Vec::len).collect();
        let mut offsets = vec![0usize; e + 1];
        for ei in 0..e {
            offsets[ei + 1] = offsets[ei] + counts[ei];
        }
        let back: Vec<u32> = slots
            .iter()
            .map(|&(ei, r)| (offsets[ei] + r) as u32)
            .collect();
        let mut gate_idx = Vec::with_capacity(t * k);
        for (ei, toks) in per_expert.iter().enumerate() {
            gate_idx.extend(toks.iter().map(|&tk| tk * e as u32 + ei as u32));
        }
        let dev = x.device();
        let gates = crate::ops::gate_pick::gate_pick(
            &probs.flatten_all()?,
            &Tensor::from_vec(gate_idx, t * k, dev)?,
        )?;
        let slot_tokens: Vec<u32> = per_expert.into_iter().flatten().collect();

        let frac: Vec<f64> = counts.iter().map(|&c| c as f64 / (t * k) as f64).collect();
        let frac = Tensor::from_vec(frac, e, dev)?.to_dtype(probs.dtype())?;
        let aux = self.aux_loss(&logits, &probs, &frac)?;
        *self.last.lock().unwrap() = Some(RoutingStats {
            counts,
            aux_loss: aux,
        });
        Ok(Routing {
            slot_tokens: Arc::new(slot_tokens),
            offsets,
            gates,
            back,
        })
    }

    /// Routes `x` (T, d_in), runs `expert(e, x_e)` on each expert's tokens and combines the
    /// results (T, d_out) weighted by the gate probabilities.
    pub fn route_and_combine(
        &self,
        x: &Tensor,
        mut expert: impl FnMut(usize, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let routing = self.route(x)?;
        let dev = x.device();
        // Run each expert on its tokens and stack the outputs expert after expert.
        let mut outputs = Vec::with_capacity(self.experts);
        for ei in 0..self.experts {
            let (a, b) = (routing.offsets[ei], routing.offsets[ei + 1]);
            if a == b {
                continue;
            }
            let idx = Tensor::from_slice(&routing.slot_tokens[a..b], b - a, dev)?;
            let gates = routing.gates.narrow(0, a, b - a)?.unsqueeze(1)?;
            let xe = x.index_select(&idx, 0)?;
            outputs.push(expert(ei, &xe)?.broadcast_mul(&gates)?);
        }
        let stacked = Tensor::cat(&outputs, 0)?;
        let back = Tensor::from_vec(routing.back, t * self.top_k, dev)?;
        let mut y = stacked.index_select(&back, 0)?;
        if self.top_k > 1 {
            let d_out = y.dim(1)?;
            y = y.reshape((t, self.top_k, d_out))?.sum(1)?;
        }
        Ok(y)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// (load-balancing coefficient, z-loss coefficient).
    pub fn loss_coefs(&self) -> (f64, f64) {
        (self.aux_loss_coef, self.z_loss_coef)
    }

    /// Keeps the statistics of a forward pass routed elsewhere (the fused CPU op), for
    /// `take_stats`.
    pub fn record(&self, stats: RoutingStats) {
        *self.last.lock().unwrap() = Some(stats);
    }

    /// Statistics of the most recent forward pass (taken, so each pass is reported once).
    pub fn take_stats(&self) -> Option<RoutingStats> {
        self.last.lock().unwrap().take()
    }
}

/// log(sum(exp(x))) over the last dimension, stable.
pub fn logsumexp(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    (s + m)?.squeeze(D::Minus1)
}
