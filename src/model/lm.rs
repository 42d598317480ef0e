//! The byte-level language model: embedding (tied head), pre-norm residual stack from the
//! layer pattern, final RMSNorm.
use super::attention::CausalSelfAttention;
use super::config::{LayerKind, ModelConfig};
use super::layers::{linear, RmsNorm};
use super::mamba1::Mamba1Mixer;
use super::mamba2::Mamba2Mixer;
use super::mlp::{GatedMlp, MoeMlp};
use super::params::{Init, ParamStore};
use super::router::RoutingStats;
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};

/// Layers are few and long-lived, so the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Mixer {
    Mamba(Mamba2Mixer),
    Mlp(GatedMlp),
    MoeMlp(MoeMlp),
    Attention(CausalSelfAttention),
    Mamba1(Mamba1Mixer),
}

impl Module for Mixer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mixer::Mamba(m) => m.forward(x),
            Mixer::Mlp(m) => m.forward(x),
            Mixer::MoeMlp(m) => m.forward(x),
            Mixer::Attention(m) => m.forward(x),
            Mixer::Mamba1(m) => m.forward(x),
        }
    }
}

#[derive(Debug)]
pub struct Block {
    pub norm: RmsNorm,
    pub mixer: Mixer,
}

/// Routing of one router in one forward pass.
#[derive(Debug, Clone)]
pub struct LayerRouting {
    pub layer: usize,
    /// Sparsified projection name (z, x, B, C, dt, out) or "mlp" for an E layer.
    pub module: String,
    pub stats: RoutingStats,
}

#[derive(Debug)]
pub struct MambaLm {
    pub cfg: ModelConfig,
    pub store: ParamStore,
    embedding: Tensor,
    pub blocks: Vec<Block>,
    norm_f: RmsNorm,
}

impl MambaLm {
    /// Builds and initialises the model; the same seed gives the same weights on any device.
    pub fn new(cfg: &ModelConfig, device: &Device, dtype: DType, seed: u64) -> Result<MambaLm> {
        let mut store = ParamStore::new(device, dtype, seed);
        let embedding = store.add(
            "backbone.embedding.weight",
            &[cfg.vocab_size, cfg.d_model],
            Init::Normal(0.02),
            true,
        )?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for (i, kind) in cfg.layers().into_iter().enumerate() {
            let prefix = format!("backbone.layers.{i}");
            let norm = RmsNorm::new(
                &mut store,
                &format!("{prefix}.norm.weight"),
                cfg.d_model,
                cfg.norm_eps,
            )?;
            let mp = format!("{prefix}.mixer");
            let mixer = match kind {
                LayerKind::Mamba => Mixer::Mamba(Mamba2Mixer::new(&mut store, &mp, cfg)?),
                LayerKind::Mlp => Mixer::Mlp(GatedMlp::new(&mut store, &mp, cfg)?),
                LayerKind::MoeMlp => Mixer::MoeMlp(MoeMlp::new(&mut store, &mp, cfg)?),
                LayerKind::Attention => {
                    Mixer::Attention(CausalSelfAttention::new(&mut store, &mp, cfg)?)
                }
                LayerKind::Mamba1 => Mixer::Mamba1(Mamba1Mixer::new(&mut store, &mp, cfg)?),
            };
            blocks.push(Block { norm, mixer });
        }
        let norm_f = RmsNorm::new(
            &mut store,
            "backbone.norm_f.weight",
            cfg.d_model,
            cfg.norm_eps,
        )?;
        Ok(MambaLm {
            cfg: cfg.clone(),
            store,
            embedding,
            blocks,
            norm_f,
        })
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }
    pub fn dtype(&self) -> DType {
        self.store.dtype()
    }

    /// Routing statistics of the last forward pass, layer by layer.
    pub fn take_routing(&self) -> Vec<LayerRouting> {
        let mut out = Vec::new();
        for (layer, b) in self.blocks.iter().enumerate() {
            match &b.mixer {
                Mixer::Mamba(m) => {
                    out.extend(m.take_stats().into_iter().map(|(p, stats)| LayerRouting {
                        layer,
                        module: p.name().to_string(),
                        stats,
                    }))
                }
                Mixer::MoeMlp(m) => {
                    if let Some(stats) = m.take_stats() {
                        out.push(LayerRouting {
                            layer,
                            module: "mlp".into(),
                            stats,
                        })
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// Rows of `table` (vocab, d) for `ids` (n) u32. On the GPU as a one-hot product: candle's CUDA
/// index_select backward (index_add) walks all n tokens in each of d threads, 8.2 ms per step at
/// paper-block on an H200 (ncu), where the one-hot product's gradient is one GEMM. The product
/// is exact: each output sums one weight times 1.
fn embed(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    if !ids.device().is_cuda() {
        return table.index_select(ids, 0);
    }
    let vocab = table.dim(0)? as u32;
    let rows = Tensor::arange(0u32, vocab, ids.device())?.unsqueeze(0)?;
    let onehot = ids
        .unsqueeze(1)?
        .broadcast_eq(&rows)?
        .to_dtype(table.dtype())?;
    onehot.matmul(table)
}

impl Module for MambaLm {
    /// ids: (b, l) u32 -> logits (b, l, vocab).
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut h =
            embed(&self.embedding, &ids.flatten_all()?)?.reshape((b, l, self.cfg.d_model))?;
        for block in &self.blocks {
            h = (&h + block.mixer.forward(&block.norm.forward(&h)?)?)?;
        }
        let h = self.norm_f.forward(&h)?;
        linear(&h, &self.embedding)
    }
}
