//! AdamW of the project's own: candle_nn's keeps its moments private, and exact resume needs
//! them in the checkpoint. Matches torch.optim.AdamW (decoupled decay, bias correction).
//!
//! Mixed precision: when the model's parameters are bf16 (the compute dtype), the optimizer
//! keeps an f32 master copy of each one and f32 moments; an update is applied to the master and
//! the model's bf16 copy is refreshed from it, so small updates are not lost to bf16 rounding.
use super::config::TrainConfig;
use crate::model::params::Param;
use crate::ops::adamw::AdamStep;
use crate::ops::adamw_cuda;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
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
    /// f32 master weights, one per parameter, when the parameters are stored in a
    /// lower-precision compute dtype (bf16); None when they are f32 or f64 themselves.
    master: Option<Vec<Tensor>>,
}

/// True when parameters of this dtype train through f32 master weights.
pub fn needs_master(dtype: DType) -> bool {
    !matches!(dtype, DType::F32 | DType::F64)
}

impl AdamW {
    pub fn new(params: &[Param], cfg: &TrainConfig) -> Result<AdamW> {
        let mixed = params.iter().any(|p| needs_master(p.var.dtype()));
        let state_dtype = |p: &Param| {
            if mixed {
                DType::F32
            } else {
                p.var.dtype()
            }
        };
        let zeros = |p: &Param| p.var.as_tensor().zeros_like()?.to_dtype(state_dtype(p));
        let master = if mixed {
            Some(
                params
                    .iter()
                    .map(|p| p.var.as_tensor().to_dtype(DType::F32))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(AdamW {
            master,
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
        let shared = AdamStep {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: 0.0,
            bc1,
            bc2,
            grad_scale,
        };
        let mut on_gpu = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let hp = AdamStep {
                weight_decay: if p.decay { self.weight_decay } else { 0.0 },
                ..shared
            };
            if self.master.is_none()
                && crate::ops::fused_cpu(g)
                && std::env::var_os("MOZ_LAB_COMPOSED_ADAMW").is_none()
            {
                // One pass over w, g, m, v instead of ~14 tensor ops (same arithmetic).
                let (w, m, v) = crate::ops::adamw::adamw_update(
                    p.var.as_tensor(),
                    &g.to_dtype(self.m[i].dtype())?,
                    &self.m[i],
                    &self.v[i],
                    hp,
                )?;
                p.var.set(&w)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
            let w = match &self.master {
                Some(master) => &master[i],
                None => p.var.as_tensor(),
            };
            let param_dtype = p.var.dtype();
            if adamw_cuda::step_applies(w, g)
                && matches!(param_dtype, DType::F32 | DType::BF16)
                && self.m[i].dtype() == DType::F32
            {
                // Updated in place by one launch for all of them, after the loop.
                on_gpu.push((i, g, hp.weight_decay));
                continue;
            }
            let (w, m, v) = composed_update(w, g, &self.m[i], &self.v[i], hp)?;
            match &mut self.master {
                Some(master) => {
                    p.var.set(&w.to_dtype(p.var.dtype())?)?;
                    master[i] = w;
                }
                None => p.var.set(&w)?,
            }
            self.m[i] = m;
            self.v[i] = v;
        }
        let items: Vec<adamw_cuda::StepTensor> = on_gpu
            .into_iter()
            .map(|(i, g, weight_decay)| {
                let p = params[i].var.as_tensor();
                adamw_cuda::StepTensor {
                    w: self.master.as_ref().map_or(p, |master| &master[i]),
                    g,
                    m: &self.m[i],
                    v: &self.v[i],
                    copy: self.master.is_some().then_some(p),
                    weight_decay,
                }
            })
            .collect();
        Ok(adamw_cuda::adamw_multi_step_cuda(&items, shared)?)
    }

    /// Multiplies both moments of parameter `i` by `keep` (pruning: pruned weights' moments
    /// become zero).
    pub fn mask_moments(&mut self, i: usize, keep: &Tensor) -> Result<()> {
        // Moments (and masters) are f32 when the parameters are bf16.
        let keep = keep.to_dtype(self.m[i].dtype())?;
        self.m[i] = (&self.m[i] * &keep)?;
        self.v[i] = (&self.v[i] * &keep)?;
        if let Some(master) = &mut self.master {
            // The master is what the next update starts from: unmasked, it would bring pruned
            // weights back when it is rounded into the parameter.
            master[i] = (&master[i] * &keep)?;
        }
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
            if let Some(master) = &self.master {
                out.insert(format!("{}.master", p.name), master[i].clone());
            }
        }
        out
    }

    pub fn load(&mut self, params: &[Param], path: &Path, t: u64, device: &Device) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading {}", path.display()))?;
        for (i, p) in params.iter().enumerate() {
            let state_dtype = self.m[i].dtype();
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{}.{suffix}", p.name);
                let t = loaded
                    .get(&key)
                    .with_context(|| format!("{}: missing {key}", path.display()))?;
                Ok(t.to_dtype(state_dtype)?)
            };
            self.m[i] = get("exp_avg")?;
            self.v[i] = get("exp_avg_sq")?;
            if let Some(master) = &mut self.master {
                // A checkpoint written before master weights existed: start from the weights.
                master[i] = match get("master") {
                    Ok(t) => t,
                    Err(_) => p.var.as_tensor().to_dtype(DType::F32)?,
                };
                p.var.set(&master[i].to_dtype(p.var.dtype())?)?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// (w', m', v') of one AdamW step composed from candle tensor ops (any device and dtype; the
/// gradient is cast to the moments' dtype). The reference the fused CPU and GPU steps follow,
/// and the path taken when MOZ_LAB_COMPOSED_ADAMW is set.
pub fn composed_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = g.to_dtype(m.dtype())?;
    let g = if s.grad_scale != 1.0 {
        (g * s.grad_scale)?
    } else {
        g
    };
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let w = if s.weight_decay > 0.0 {
        (w * (1.0 - s.lr * s.weight_decay))?
    } else {
        w.clone()
    };
    let denom = ((&v / s.bc2)?.sqrt()? + s.eps)?;
    let update = ((&m / s.bc1)? / denom)?;
    let w = (w - (update * s.lr)?)?;
    Ok((w, m, v))
}

/// The squared global gradient norm: the host-summed part, and the device-summed part not
/// read yet (an f64 scalar), so the trainer reads it with the loss in one transfer.
#[derive(Debug)]
pub struct GradSq {
    pub host: f64,
    pub device: Option<Tensor>,
}

impl GradSq {
    /// The norm, given the device part's value as read (0 when there is none).
    pub fn norm(&self, device_value: f64) -> f64 {
        (self.host + device_value).sqrt()
    }

    /// The norm, reading the device part on its own.
    pub fn read_norm(&self) -> Result<f64> {
        let d = match &self.device {
            Some(t) => t.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            None => 0.0,
        };
        Ok(self.norm(d))
    }
}

/// The squares of all gradients, summed: CPU f32/f64 gradients on the host in one pass each
/// (no sqr tensor); CUDA f32/bf16 ones by one kernel into a single device accumulator; any
/// other by candle ops on the device.
pub fn grad_sq(params: &[Param], grads: &GradStore) -> Result<GradSq> {
    let mut composed: Option<Tensor> = None;
    let mut host = 0f64;
    let mut gpu: Vec<&Tensor> = Vec::new();
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            if crate::ops::fused_cpu(g) {
                host += crate::ops::adamw::sum_sq(g)?;
                continue;
            }
            if adamw_cuda::sum_sq_applies(g) {
                gpu.push(g);
                continue;
            }
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            composed = Some(match composed {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
    }
    let device = match (adamw_cuda::sum_sq_cuda(&gpu)?, composed) {
        (Some(a), Some(b)) => Some((a + b.to_device(gpu[0].device())?)?),
        (a, b) => a.or(b),
    };
    Ok(GradSq { host, device })
}

/// Global L2 norm of all gradients (one host read).
pub fn grad_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    grad_sq(params, grads)?.read_norm()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{Init, ParamStore};

    /// bf16 parameters move by updates far below bf16's resolution at 1.0 (2^-7), because the
    /// update goes to the f32 master: 100 steps of ~1e-4 take the weight to ~0.99, and the bf16
    /// copy is the master rounded. Without the master, 1 - 1e-4 rounds back to 1 every step.
    #[test]
    fn bf16_parameters_train_through_f32_masters() -> Result<()> {
        let mut store = ParamStore::new(&Device::Cpu, DType::BF16, 0);
        let w = store.add("w", &[4], Init::Const(1.0), false)?;
        let cfg = TrainConfig::default();
        let mut opt = AdamW::new(store.params(), &cfg)?;
        for _ in 0..100 {
            let grads = (w.to_dtype(DType::F32)? * 3.0)?.sum_all()?.backward()?;
            opt.step(store.params(), &grads, 1e-4, 1.0)?;
        }
        let master = opt.master.as_ref().unwrap()[0].to_vec1::<f32>()?;
        let weight = store.params()[0].var.as_tensor();
        assert_eq!(weight.dtype(), DType::BF16);
        let weight = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (m, b) in master.iter().zip(&weight) {
            assert!((m - 0.99).abs() < 1e-4, "master {m}");
            assert!((b - 0.99).abs() < 4e-3 && *b < 1.0, "bf16 copy {b}");
            assert_eq!(half::bf16::from_f32(*m).to_f32(), *b);
        }
        // Moments and masters are f32 and travel in the checkpoint.
        let t = opt.tensors(store.params());
        assert_eq!(t["w.master"].dtype(), DType::F32);
        assert_eq!(t["w.exp_avg"].dtype(), DType::F32);
        Ok(())
    }
}
