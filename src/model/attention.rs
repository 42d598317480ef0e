//! `A` layers: causal multi-head self-attention with rotary position embeddings (GPT-NeoX
//! rotate-half convention, base 10000), no biases.
use super::config::ModelConfig;
use super::layers::{linear, Linear};
use super::params::ParamStore;
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};

#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
}

impl CausalSelfAttention {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        cfg: &ModelConfig,
    ) -> Result<CausalSelfAttention> {
        let d = cfg.d_model;
        let out_scale = 1.0 / (cfg.n_layer as f64).sqrt();
        Ok(CausalSelfAttention {
            q: Linear::new(store, &format!("{prefix}.q_proj.weight"), d, d, 1.0)?,
            k: Linear::new(store, &format!("{prefix}.k_proj.weight"), d, d, 1.0)?,
            v: Linear::new(store, &format!("{prefix}.v_proj.weight"), d, d, 1.0)?,
            o: Linear::new(store, &format!("{prefix}.o_proj.weight"), d, d, out_scale)?,
            heads: cfg.attn_heads,
        })
    }
}

/// cos and sin tables (l, hd/2).
fn rope_tables(
    l: usize,
    hd: usize,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(l * half);
    let mut sin = Vec::with_capacity(l * half);
    for pos in 0..l {
        for i in 0..half {
            let freq = 10000f64.powf(-(2.0 * i as f64) / hd as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (l, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (l, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// x: (b, heads, l, hd).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

impl Module for CausalSelfAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |w: &Linear| -> candle_core::Result<Tensor> {
            linear(x, &w.weight)?
                .reshape((b, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope_tables(l, hd, x.dtype(), x.device())?;
        let q = apply_rope(&split(&self.q)?, &cos, &sin)?;
        let k = apply_rope(&split(&self.k)?, &cos, &sin)?;
        let v = split(&self.v)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (l, l), x.device())?.to_dtype(x.dtype())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        linear(&y, &self.o.weight)
    }
}
