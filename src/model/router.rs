//! Top-k token routing shared by `ExpertLinear` and `MoeMlp`: softmax router, sparse
//! dispatch (tokens grouped per expert, so compute grows with k and not with E), gather back
//! weighted by the gate probability, Switch-Transformer load balancing and router z-loss.
use super::params::{Init, ParamStore};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use std::sync::Mutex;

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
}

/// The tokens one expert receives: their row indices and gate probabilities.
pub struct Dispatch {
    pub expert: usize,
    pub tokens: Tensor, // (n_e,) u32
    pub gates: Tensor,  // (n_e, 1)
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
        let e = self.experts;
        let k = self.top_k;
        let logits = x.matmul(&self.weight.t()?)?; // (T, E)
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;

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

        // Run each expert on its tokens and stack the outputs expert after expert.
        let dev = x.device();
        let flat_probs = probs.flatten_all()?;
        let mut outputs = Vec::with_capacity(e);
        let mut offsets = vec![0usize; e];
        let mut offset = 0;
        for (ei, toks) in per_expert.iter().enumerate() {
            offsets[ei] = offset;
            if toks.is_empty() {
                continue;
            }
            offset += toks.len();
            let idx = Tensor::from_slice(toks, toks.len(), dev)?;
            let gate_idx: Vec<u32> = toks.iter().map(|&tk| tk * e as u32 + ei as u32).collect();
            let gate_idx = Tensor::from_vec(gate_idx, toks.len(), dev)?;
            let gates = flat_probs.index_select(&gate_idx, 0)?.unsqueeze(1)?;
            let xe = x.index_select(&idx, 0)?;
            let ye = expert(ei, &xe)?.broadcast_mul(&gates)?;
            outputs.push(ye);
        }
        let stacked = Tensor::cat(&outputs, 0)?;
        // Gather back: row of token `tok`, slot s sits at offsets[expert] + rank.
        let back: Vec<u32> = slots
            .iter()
            .map(|&(ei, r)| (offsets[ei] + r) as u32)
            .collect();
        let back = Tensor::from_vec(back, t * k, dev)?;
        let mut y = stacked.index_select(&back, 0)?;
        if k > 1 {
            let d_out = y.dim(1)?;
            y = y.reshape((t, k, d_out))?.sum(1)?;
        }

        // Switch load balancing: f_e (fraction of slots, constant) · P_e (mean probability).
        let frac: Vec<f64> = counts.iter().map(|&c| c as f64 / (t * k) as f64).collect();
        let frac = Tensor::from_vec(frac, e, dev)?.to_dtype(probs.dtype())?;
        let mean_p = probs.mean(0)?;
        let mut aux = ((mean_p * frac)?.sum_all()? * (self.aux_loss_coef * e as f64))?;
        if self.z_loss_coef > 0.0 {
            let lse = logsumexp(&logits)?;
            aux = (aux + (lse.sqr()?.mean_all()? * self.z_loss_coef)?)?;
        }
        *self.last.lock().unwrap() = Some(RoutingStats {
            counts,
            aux_loss: aux,
        });
        Ok(y)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
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
