//! AdamW of the project's own: candle_nn's keeps its moments private, and exact resume needs
//! them in the checkpoint. Matches torch.optim.AdamW (decoupled decay, bias correction).
use super::config::TrainConfig;
use crate::model::params::Param;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates taken so far.
    pub t: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[Param], cfg: &TrainConfig) -> Result<AdamW> {
        let zeros = |p: &Param| p.var.as_tensor().zeros_like();
        Ok(AdamW {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            t: 0,
            m: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update. `grad_scale` multiplies every gradient (gradient clipping).
    /// A parameter without a gradient (an expert that got no token) is left untouched, as
    /// PyTorch skips parameters whose grad is None.
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, p) in params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let w = p.var.as_tensor();
            let w = if p.decay && self.weight_decay > 0.0 {
                (w * (1.0 - lr * self.weight_decay))?
            } else {
                w.clone()
            };
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            p.var.set(&(w - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Multiplies both moments of parameter `i` by `keep` (pruning: pruned weights' moments
    /// become zero).
    pub fn mask_moments(&mut self, i: usize, keep: &Tensor) -> Result<()> {
        self.m[i] = (&self.m[i] * keep)?;
        self.v[i] = (&self.v[i] * keep)?;
        Ok(())
    }

    /// (exp_avg, exp_avg_sq) of parameter `i`.
    pub fn moments(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.m[i], &self.v[i])
    }

    /// Moments as safetensors entries `{name}.exp_avg` / `{name}.exp_avg_sq`.
    pub fn tensors(&self, params: &[Param]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            out.insert(format!("{}.exp_avg", p.name), self.m[i].clone());
            out.insert(format!("{}.exp_avg_sq", p.name), self.v[i].clone());
        }
        out
    }

    pub fn load(&mut self, params: &[Param], path: &Path, t: u64, device: &Device) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading {}", path.display()))?;
        for (i, p) in params.iter().enumerate() {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = loaded
                    .get(&key)
                    .with_context(|| format!("{}: missing {key}", path.display()))?;
                Ok(t.to_dtype(p.var.dtype())?)
            };
            self.m[i] = get("exp_avg")?;
            self.v[i] = get("exp_avg_sq")?;
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of all gradients (one host read).
pub fn grad_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    let mut sq: Option<Tensor> = None;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let s = g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()?;
            sq = Some(match sq {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
    }
    Ok(match sq {
        Some(s) => (s.to_scalar::<f32>()? as f64).sqrt(),
        None => 0.0,
    })
}
