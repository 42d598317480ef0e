//! `F` layers (gated MLP) and `E` layers (top-k Switch MoE of gated MLPs, as MoE-Mamba).
use super::config::ModelConfig;
use super::layers::{linear, Linear};
use super::params::{ExpertShare, ParamStore};
use super::router::{Router, RoutingStats};
use anyhow::Result;
use candle_core::{Module, Tensor};

/// down(silu(gate(x)) * up(x)); tensors `{prefix}.{gate_proj,up_proj,down_proj}.weight`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl GatedMlp {
    pub fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<GatedMlp> {
        let (d, hdim) = (cfg.d_model, cfg.mlp_hidden);
        let out_scale = 1.0 / (cfg.n_layer as f64).sqrt();
        Ok(GatedMlp {
            gate: Linear::new(store, &format!("{prefix}.gate_proj.weight"), d, hdim, 1.0)?,
            up: Linear::new(store, &format!("{prefix}.up_proj.weight"), d, hdim, 1.0)?,
            down: Linear::new(
                store,
                &format!("{prefix}.down_proj.weight"),
                hdim,
                d,
                out_scale,
            )?,
        })
    }
}

impl Module for GatedMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = (linear(x, &self.gate.weight)?.silu()? * linear(x, &self.up.weight)?)?;
        linear(&h, &self.down.weight)
    }
}

/// Switch MoE MLP: `{prefix}.router.weight` (E, d), experts `{prefix}.experts.{e}.*`.
#[derive(Debug)]
pub struct MoeMlp {
    pub router: Router,
    experts: Vec<GatedMlp>,
}

impl MoeMlp {
    pub fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<MoeMlp> {
        let sp = &cfg.sparsity;
        let router = Router::new(
            store,
            &format!("{prefix}.router.weight"),
            cfg.d_model,
            cfg.moe_experts,
            sp.top_k,
            sp.aux_loss_coef,
            sp.z_loss_coef,
        )?;
        store.set_expert_scope(Some(ExpertShare {
            experts: cfg.moe_experts,
            top_k: sp.top_k,
        }));
        let experts = (0..cfg.moe_experts)
            .map(|e| GatedMlp::new(store, &format!("{prefix}.experts.{e}"), cfg))
            .collect::<Result<Vec<_>>>();
        store.set_expert_scope(None);
        Ok(MoeMlp {
            router,
            experts: experts?,
        })
    }

    pub fn take_stats(&self) -> Option<RoutingStats> {
        self.router.take_stats()
    }
}

impl Module for MoeMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let x2 = x.flatten_to(dims.len() - 2)?;
        let y = self
            .router
            .route_and_combine(&x2, |e, xe| self.experts[e].forward(xe))
            .map_err(candle_core::Error::wrap)?;
        y.reshape(dims)
    }
}
