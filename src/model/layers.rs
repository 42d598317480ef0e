//! Small building blocks: bias-free linear, RMSNorm, and the projection slot that is either a
//! dense matrix or an `ExpertLinear`.
use super::expert_linear::ExpertLinear;
use super::params::{Init, ParamStore};
use super::ssd::rms_normalize;
use anyhow::Result;
use candle_core::{Module, Tensor};

/// y = x W^T for x of any rank (flattened to 2-D so the matmul is one GEMM).
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    crate::prune::record::observe(w, x); // Wanda calibration; a no-op unless recording
    if crate::ops::fused_cpu(x) {
        return crate::ops::linear::linear_fused(x, w);
    }
    let dims = x.dims().to_vec();
    let x2 = x.flatten_to(dims.len() - 2)?;
    let y = x2.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// A bias-free linear layer with PyTorch's default init scaled by `init_scale`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
}

impl Linear {
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        d_in: usize,
        d_out: usize,
        init_scale: f64,
    ) -> Result<Linear> {
        let bound = init_scale / (d_in as f64).sqrt();
        let weight = store.add(name, &[d_out, d_in], Init::Uniform(bound), true)?;
        Ok(Linear { weight })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.weight)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let weight = store.add(name, &[dim], Init::Const(1.0), false)?;
        Ok(RmsNorm { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if crate::ops::fused_cpu(x) {
            return crate::ops::gated_norm::rms_norm(x, &self.weight, self.eps);
        }
        if crate::ops::gated_norm_cuda::applies(x, self.weight.dim(0)?) {
            return crate::ops::gated_norm_cuda::rms_norm_cuda(x, &self.weight, self.eps);
        }
        rms_normalize(x, self.eps)?.broadcast_mul(&self.weight)
    }
}

/// A projection that is either dense or a Mixture of Experts.
#[derive(Debug)]
pub enum Projector {
    Dense(Linear),
    Experts(ExpertLinear),
}

impl Module for Projector {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Projector::Dense(l) => l.forward(x),
            Projector::Experts(e) => e.forward(x),
        }
    }
}
