//! Helpers shared by the integration tests.
use moz_lab::model::{ModelConfig, Projection, SparsityConfig};

/// A tiny model of the given layer pattern (d_model 8, 2 groups, every layer kind possible).
pub fn tiny(
    pattern: &str,
    projections: Vec<Projection>,
    experts: usize,
    top_k: usize,
) -> ModelConfig {
    ModelConfig {
        d_model: 8,
        n_layer: pattern.len(),
        layer_pattern: pattern.into(),
        expand: 2,
        headdim: 4,
        d_state: 3,
        ngroups: 2,
        d_conv: 3,
        chunk_size: 4,
        vocab_size: 256,
        norm_eps: 1e-5,
        mlp_hidden: 6,
        attn_heads: 2,
        moe_experts: 3,
        sparsity: SparsityConfig {
            projections,
            experts,
            top_k,
            aux_loss_coef: 0.01,
            z_loss_coef: 1e-3,
        },
        mamba1: Default::default(),
    }
}
