//! Model configuration: the shape of the network and which projections are sparsified.
use super::mamba1::Mamba1Config;
use serde::{Deserialize, Serialize};

/// The six linear projections of a Mamba2 mixer that can become Mixture-of-Experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Projection {
    #[serde(rename = "z")]
    Z,
    #[serde(rename = "x")]
    X,
    #[serde(rename = "B")]
    B,
    #[serde(rename = "C")]
    C,
    #[serde(rename = "dt")]
    Dt,
    #[serde(rename = "out")]
    Out,
}

impl Projection {
    /// Order of the parts inside mamba_ssm's fused `in_proj` (out is separate).
    pub const IN_PROJ_ORDER: [Projection; 5] = [
        Projection::Z,
        Projection::X,
        Projection::B,
        Projection::C,
        Projection::Dt,
    ];
    pub const ALL: [Projection; 6] = [
        Projection::Z,
        Projection::X,
        Projection::B,
        Projection::C,
        Projection::Dt,
        Projection::Out,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Projection::Z => "z",
            Projection::X => "x",
            Projection::B => "B",
            Projection::C => "C",
            Projection::Dt => "dt",
            Projection::Out => "out",
        }
    }

    pub fn parse(s: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == s)
    }

    /// (d_in, d_out) of this projection for a given model shape.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let d = cfg.d_model;
        match self {
            Projection::Z | Projection::X => (d, cfg.d_inner()),
            Projection::B | Projection::C => (d, cfg.ngroups * cfg.d_state),
            Projection::Dt => (d, cfg.nheads()),
            Projection::Out => (cfg.d_inner(), d),
        }
    }
}

/// One residual layer's kind, from Megatron-style pattern letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `M`: Mamba2 mixer (with the variant's sparsified projections).
    Mamba,
    /// `F`: gated MLP (SwiGLU).
    Mlp,
    /// `E`: top-k Switch MoE MLP.
    MoeMlp,
    /// `A`: causal multi-head attention with RoPE.
    Attention,
    /// `S`: Mamba-1 mixer; its A diagonal or in S-Mamba's canonical forms (`mamba1.a_form`).
    Mamba1,
}

impl LayerKind {
    pub fn from_letter(c: char) -> Option<LayerKind> {
        match c {
            'M' => Some(LayerKind::Mamba),
            'F' | '-' => Some(LayerKind::Mlp),
            'E' => Some(LayerKind::MoeMlp),
            'A' | '*' => Some(LayerKind::Attention),
            'S' => Some(LayerKind::Mamba1),
            _ => None,
        }
    }
}

/// Which projections are Mixture-of-Experts and how they route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparsityConfig {
    pub projections: Vec<Projection>,
    /// Experts per sparsified projection.
    pub experts: usize,
    pub top_k: usize,
    /// Switch-Transformer load-balancing coefficient (alpha).
    pub aux_loss_coef: f64,
    /// Router z-loss coefficient (0 disables it).
    pub z_loss_coef: f64,
}

impl Default for SparsityConfig {
    fn default() -> Self {
        SparsityConfig {
            projections: vec![],
            experts: 1,
            top_k: 1,
            aux_loss_coef: 0.01,
            z_loss_coef: 0.0,
        }
    }
}

impl SparsityConfig {
    pub fn is_sparse(&self, p: Projection) -> bool {
        self.projections.contains(&p)
    }
}

/// The fully resolved model shape; written as `config.json` beside every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_layer: usize,
    /// One letter per layer (M, F, E, A), already expanded to `n_layer` letters.
    pub layer_pattern: String,
    pub expand: usize,
    pub headdim: usize,
    pub d_state: usize,
    pub ngroups: usize,
    pub d_conv: usize,
    pub chunk_size: usize,
    pub vocab_size: usize,
    pub norm_eps: f64,
    /// Hidden width of `F` and `E` layers.
    pub mlp_hidden: usize,
    pub attn_heads: usize,
    /// Experts of `E` (MoE MLP) layers.
    pub moe_experts: usize,
    pub sparsity: SparsityConfig,
    /// Settings of `S` (Mamba-1 / S-Mamba) layers; absent in configs written before them.
    #[serde(default)]
    pub mamba1: Mamba1Config,
}

impl ModelConfig {
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }
    pub fn nheads(&self) -> usize {
        self.d_inner() / self.headdim
    }
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.ngroups * self.d_state
    }
    pub fn layers(&self) -> Vec<LayerKind> {
        self.layer_pattern
            .chars()
            .map(|c| LayerKind::from_letter(c).expect("pattern validated"))
            .collect()
    }

    /// The "lab-small" benchmark shape of the engine issue.
    pub fn lab_small() -> ModelConfig {
        ModelConfig {
            d_model: 256,
            n_layer: 4,
            layer_pattern: "MMMM".into(),
            expand: 2,
            headdim: 64,
            d_state: 64,
            ngroups: 1,
            d_conv: 4,
            chunk_size: 64,
            vocab_size: 256,
            norm_eps: 1e-5,
            mlp_hidden: 512,
            attn_heads: 4,
            moe_experts: 4,
            sparsity: SparsityConfig::default(),
            mamba1: Mamba1Config::default(),
        }
    }

    /// Checks the shape is buildable; returns (field, message) for the first problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let pos = |name: &'static str, v: usize| {
            if v == 0 {
                Err((name, "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        pos("d_model", self.d_model)?;
        pos("n_layer", self.n_layer)?;
        pos("expand", self.expand)?;
        pos("headdim", self.headdim)?;
        pos("d_state", self.d_state)?;
        pos("ngroups", self.ngroups)?;
        pos("d_conv", self.d_conv)?;
        pos("chunk_size", self.chunk_size)?;
        if self.vocab_size != 256 {
            return Err((
                "vocab_size",
                "only the byte vocabulary (256) is supported".into(),
            ));
        }
        if !self.d_inner().is_multiple_of(self.headdim) {
            return Err((
                "headdim",
                format!(
                    "d_inner = expand * d_model = {} is not divisible by headdim = {}",
                    self.d_inner(),
                    self.headdim
                ),
            ));
        }
        if !self.nheads().is_multiple_of(self.ngroups) {
            return Err((
                "ngroups",
                format!(
                    "nheads = {} must be divisible by ngroups = {}",
                    self.nheads(),
                    self.ngroups
                ),
            ));
        }
        if self.layer_pattern.chars().count() != self.n_layer {
            return Err((
                "pattern",
                format!(
                    "expanded pattern {:?} has {} letters, n_layer is {}",
                    self.layer_pattern,
                    self.layer_pattern.chars().count(),
                    self.n_layer
                ),
            ));
        }
        if let Some(c) = self
            .layer_pattern
            .chars()
            .find(|c| LayerKind::from_letter(*c).is_none())
        {
            return Err((
                "pattern",
                format!("unknown layer letter {c:?}; allowed: M (Mamba2), F (MLP), E (MoE MLP), A (attention), S (Mamba-1 / S-Mamba)"),
            ));
        }
        let layers = self.layers();
        if layers.contains(&LayerKind::Attention) {
            pos("attn_heads", self.attn_heads)?;
            if !self.d_model.is_multiple_of(self.attn_heads)
                || !(self.d_model / self.attn_heads).is_multiple_of(2)
            {
                return Err((
                    "attn_heads",
                    format!(
                        "d_model = {} must split into attn_heads = {} heads of even size (RoPE)",
                        self.d_model, self.attn_heads
                    ),
                ));
            }
        }
        if layers.contains(&LayerKind::Mlp) || layers.contains(&LayerKind::MoeMlp) {
            pos("mlp_hidden", self.mlp_hidden)?;
        }
        if layers.contains(&LayerKind::Mamba1) {
            self.mamba1.check(self.d_state)?;
        }
        if layers.contains(&LayerKind::MoeMlp) {
            if self.moe_experts < 2 {
                return Err(("moe_experts", "an E layer needs at least 2 experts".into()));
            }
            if self.sparsity.top_k > self.moe_experts {
                return Err((
                    "top_k",
                    format!(
                        "top_k = {} is larger than moe_experts = {}",
                        self.sparsity.top_k, self.moe_experts
                    ),
                ));
            }
        }
        let s = &self.sparsity;
        if s.top_k == 0 {
            return Err(("top_k", "must be at least 1".into()));
        }
        if !s.projections.is_empty() {
            if s.experts < 2 {
                return Err((
                    "experts",
                    "a sparsified projection needs at least 2 experts".into(),
                ));
            }
            if s.top_k > s.experts {
                return Err((
                    "top_k",
                    format!("top_k = {} is larger than experts = {}", s.top_k, s.experts),
                ));
            }
        }
        if !(s.aux_loss_coef >= 0.0 && s.aux_loss_coef.is_finite()) {
            return Err(("aux_loss_coef", "must be a finite number >= 0".into()));
        }
        if !(s.z_loss_coef >= 0.0 && s.z_loss_coef.is_finite()) {
            return Err(("z_loss_coef", "must be a finite number >= 0".into()));
        }
        Ok(())
    }
}

/// Expands a short pattern ("ME") to `n_layer` letters by repetition.
pub fn expand_pattern(pattern: &str, n_layer: usize) -> Result<String, String> {
    let len = pattern.chars().count();
    if len == 0 {
        return Err("pattern is empty".into());
    }
    if len == n_layer {
        return Ok(pattern.to_string());
    }
    if !n_layer.is_multiple_of(len) {
        return Err(format!(
            "pattern {pattern:?} ({len} letters) does not tile n_layer = {n_layer}: give {n_layer} letters or a divisor"
        ));
    }
    Ok(pattern.repeat(n_layer / len))
}
