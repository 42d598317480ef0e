//! The model zoo: Mamba2 mixers with sparsifiable projections, MLP / MoE MLP / attention
//! layers, and the byte-level language model that stacks them from a pattern string.
pub mod attention;
pub mod canonical;
pub mod config;
pub mod count;
pub mod expert_linear;
pub mod layers;
pub mod lm;
pub mod mamba1;
pub mod mamba2;
pub mod mlp;
pub mod params;
pub mod router;
pub mod ssd;

pub use config::{LayerKind, ModelConfig, Projection, SparsityConfig};
pub use lm::MambaLm;
