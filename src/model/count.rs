//! Closed-form parameter counts per component, the expert-count solver and variant presets.
//! Counting needs no tensors, so `moz-lab params` works for paper-size models instantly.
use super::config::{LayerKind, ModelConfig, Projection};
use std::collections::BTreeMap;

/// Total and active (touched by one token) parameters per component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamCount {
    pub components: BTreeMap<String, (usize, f64)>,
}

impl ParamCount {
    fn add(&mut self, component: &str, total: usize, active: f64) {
        let e = self
            .components
            .entry(component.to_string())
            .or_insert((0, 0.0));
        e.0 += total;
        e.1 += active;
    }
    pub fn total(&self) -> usize {
        self.components.values().map(|c| c.0).sum()
    }
    pub fn active(&self) -> usize {
        self.components.values().map(|c| c.1).sum::<f64>().round() as usize
    }

    pub fn of(cfg: &ModelConfig) -> ParamCount {
        let mut c = ParamCount::default();
        let d = cfg.d_model;
        let sp = &cfg.sparsity;
        c.add("embedding", cfg.vocab_size * d, (cfg.vocab_size * d) as f64);
        c.add("norms", d, d as f64); // norm_f
        for kind in cfg.layers() {
            c.add("norms", d, d as f64);
            match kind {
                LayerKind::Mamba => {
                    let mut dense_in = 0;
                    for p in Projection::ALL {
                        let (din, dout) = p.dims(cfg);
                        if sp.is_sparse(p) {
                            let e = sp.experts;
                            let per = din * dout;
                            let active = per as f64 * sp.top_k as f64;
                            c.add(&format!("experts.{}", p.name()), e * per, active);
                            c.add(&format!("router.{}", p.name()), e * din, (e * din) as f64);
                        } else if p == Projection::Out {
                            c.add("out_proj", din * dout, (din * dout) as f64);
                        } else {
                            dense_in += din * dout;
                        }
                    }
                    if dense_in > 0 {
                        c.add("in_proj", dense_in, dense_in as f64);
                    }
                    let conv = cfg.conv_dim() * (cfg.d_conv + 1);
                    c.add("conv1d", conv, conv as f64);
                    let h = cfg.nheads();
                    c.add("ssm (dt_bias, A_log, D)", 3 * h, (3 * h) as f64);
                    c.add("gated_norm", cfg.d_inner(), cfg.d_inner() as f64);
                }
                LayerKind::Mlp => {
                    let n = 3 * d * cfg.mlp_hidden;
                    c.add("mlp", n, n as f64);
                }
                LayerKind::MoeMlp => {
                    let e = cfg.moe_experts;
                    let per = 3 * d * cfg.mlp_hidden;
                    c.add("moe_mlp.experts", e * per, (per * sp.top_k) as f64);
                    c.add("moe_mlp.router", e * d, (e * d) as f64);
                }
                LayerKind::Attention => {
                    let n = 4 * d * d;
                    c.add("attention", n, n as f64);
                }
                LayerKind::Mamba1 => {
                    // Same count for every A form: n roots (or diagonal entries) per channel.
                    let (di, n, r) = (cfg.d_inner(), cfg.d_state, cfg.mamba1.dt_rank(d));
                    let mut add = |name: &str, v: usize| c.add(name, v, v as f64);
                    add("in_proj", 2 * di * d);
                    add("conv1d", di * (cfg.d_conv + 1));
                    add("x_proj", (r + 2 * n) * di);
                    add("dt_proj", r * di + di);
                    add("ssm (A, D)", di * n + di);
                    add("out_proj", di * d);
                }
            }
        }
        c
    }
}

/// Projections a named preset sparsifies.
pub fn preset(name: &str) -> Option<Vec<Projection>> {
    use Projection::*;
    match name {
        "mamba2" | "dense" => Some(vec![]),
        "mol" => Some(vec![B, C, Dt, Z]),
        "mol-except-z" => Some(vec![B, C, Dt]),
        "moz" => Some(vec![Z]),
        _ => None,
    }
}

pub const PRESETS: [&str; 4] = ["mamba2", "mol", "mol-except-z", "moz"];

/// The expert count E >= 2 whose total parameter count is closest to `ratio` x the dense
/// model's (same config without sparsified projections). Ties go to the smaller E.
pub fn solve_experts(cfg: &ModelConfig, ratio: f64) -> usize {
    let mut dense_cfg = cfg.clone();
    dense_cfg.sparsity.projections.clear();
    let target = ratio * ParamCount::of(&dense_cfg).total() as f64;
    let mut best = (2usize, f64::INFINITY);
    for e in 2..=1024 {
        let mut c = cfg.clone();
        c.sparsity.experts = e;
        let diff = (ParamCount::of(&c).total() as f64 - target).abs();
        if diff < best.1 {
            best = (e, diff);
        }
    }
    best.0
}
