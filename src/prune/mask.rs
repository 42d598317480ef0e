//! Which tensors are prunable, the masks over them, and the sparsity they give.
use crate::model::{LayerKind, MambaLm, ModelConfig, Projection};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Suffix of a mask's name in `masks.safetensors`: `{param}.prune_mask`, u8, 1 kept, 0 pruned.
pub const MASK_SUFFIX: &str = ".prune_mask";
pub const MASKS_FILE: &str = "masks.safetensors";

/// A block of rows of one parameter pruned as one tensor (an in_proj part is its own unit).
#[derive(Debug, Clone, PartialEq)]
pub struct PruneUnit {
    /// Index into `ParamStore::params()`.
    pub param: usize,
    pub name: String,
    pub layer: usize,
    /// z, x, B, C, dt, out, conv, gate, up, down, q, k, v, o, ... (experts share their
    /// projection's name).
    pub component: String,
    pub row_start: usize,
    pub rows: usize,
    /// Elements per row (d_in; d_conv for conv1d).
    pub cols: usize,
}

impl PruneUnit {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
    /// Range of the unit in its parameter's flat (row-major) data.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.row_start * self.cols..(self.row_start + self.rows) * self.cols
    }
}

/// (layer, component) of a prunable parameter name; None for protected tensors: embedding
/// (tied head), norms, biases, dt_bias, A_log, D, routers, and conv1d unless `conv`.
pub fn classify(name: &str, rank: usize, conv: bool) -> Option<(usize, String)> {
    let rest = name.strip_prefix("backbone.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let stem = rest.strip_suffix(".weight")?;
    let segs: Vec<&str> = stem.split('.').collect();
    if segs.iter().any(|s| *s == "router" || s.contains("norm")) {
        return None;
    }
    if segs.last() == Some(&"conv1d") {
        return (conv && rank == 3).then(|| (layer, "conv".to_string()));
    }
    if rank != 2 {
        return None;
    }
    // `mixer.z_proj.experts.3` -> z_proj; `mixer.experts.1.gate_proj` -> gate_proj.
    let key = match segs.iter().position(|s| *s == "experts") {
        Some(i) if i + 2 == segs.len() => segs[i - 1],
        _ => segs.last()?,
    };
    let component = key.strip_suffix("_proj").unwrap_or(key);
    Some((layer, component.to_string()))
}

/// Every prunable unit of `model`, in parameter order.
pub fn prunable_units(model: &MambaLm, conv: bool) -> Vec<PruneUnit> {
    let cfg = &model.cfg;
    let kinds = cfg.layers();
    let mut out = Vec::new();
    for (i, p) in model.store.params().iter().enumerate() {
        let dims = p.var.dims();
        let Some((layer, component)) = classify(&p.name, dims.len(), conv) else {
            continue;
        };
        let rows = dims[0];
        let cols = p.numel() / rows.max(1);
        let unit = |component: String, row_start: usize, rows: usize| PruneUnit {
            param: i,
            name: p.name.clone(),
            layer,
            component,
            row_start,
            rows,
            cols,
        };
        let parts = in_proj_parts(cfg);
        let splits = component == "in"
            && kinds.get(layer) == Some(&LayerKind::Mamba)
            && parts.iter().map(|(_, n)| n).sum::<usize>() == rows;
        if splits {
            let mut start = 0;
            for (proj, n) in parts {
                out.push(unit(proj.name().to_string(), start, n));
                start += n;
            }
        } else {
            out.push(unit(component, 0, rows));
        }
    }
    out
}

/// The dense parts of a Mamba2 in_proj and their row counts, in the stored order.
fn in_proj_parts(cfg: &ModelConfig) -> Vec<(Projection, usize)> {
    Projection::IN_PROJ_ORDER
        .into_iter()
        .filter(|p| !cfg.sparsity.is_sparse(*p))
        .map(|p| (p, p.dims(cfg).1))
        .collect()
}

/// Pruned (true) / kept flags per masked parameter, over its whole flat data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneMasks {
    pub pruned: HashMap<String, Vec<bool>>,
}

impl PruneMasks {
    /// All-kept masks over the parameters the units live in.
    pub fn new(model: &MambaLm, units: &[PruneUnit]) -> PruneMasks {
        let params = model.store.params();
        let mut pruned = HashMap::new();
        for u in units {
            pruned
                .entry(u.name.clone())
                .or_insert_with(|| vec![false; params[u.param].numel()]);
        }
        PruneMasks { pruned }
    }

    pub fn unit_flags(&self, u: &PruneUnit) -> &[bool] {
        &self.pruned[&u.name][u.range()]
    }

    pub fn set_unit(&mut self, u: &PruneUnit, flags: &[bool]) {
        self.pruned
            .get_mut(&u.name)
            .expect("unit of a masked param")[u.range()]
        .copy_from_slice(flags);
    }

    /// 1 kept / 0 pruned in `dtype`, shaped like the parameter.
    pub fn keep_tensor(&self, name: &str, like: &Tensor) -> Result<Tensor> {
        let flags = &self.pruned[name];
        let keep: Vec<u8> = flags.iter().map(|p| u8::from(!p)).collect();
        Ok(Tensor::from_vec(keep, like.shape(), like.device())?.to_dtype(like.dtype())?)
    }

    pub fn count_pruned(&self) -> usize {
        self.pruned.values().flatten().filter(|p| **p).count()
    }

    /// Sets every masked parameter to w * keep.
    pub fn apply(&self, model: &MambaLm) -> Result<()> {
        for (name, _) in self.pruned.iter() {
            let p = model.store.get(name).context("masked parameter")?;
            let w = p.var.as_tensor();
            p.var.set(&(w * self.keep_tensor(name, w)?)?)?;
        }
        Ok(())
    }

    /// `{param}.prune_mask` u8 tensors (1 kept, 0 pruned) for `masks.safetensors`.
    pub fn tensors(&self, model: &MambaLm) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, flags) in &self.pruned {
            let p = model.store.get(name).context("masked parameter")?;
            let keep: Vec<u8> = flags.iter().map(|p| u8::from(!p)).collect();
            let t = Tensor::from_vec(keep, p.var.dims(), &candle_core::Device::Cpu)?;
            out.insert(format!("{name}{MASK_SUFFIX}"), t);
        }
        Ok(out)
    }

    /// Reads `masks.safetensors`; every mask must belong to a masked parameter of this model.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        for (key, t) in loaded {
            let Some(name) = key.strip_suffix(MASK_SUFFIX) else {
                bail!("{}: unexpected tensor {key}", path.display());
            };
            let Some(flags) = self.pruned.get_mut(name) else {
                bail!(
                    "{}: mask for {name}, which this run does not prune",
                    path.display()
                );
            };
            let keep: Vec<u8> = t.flatten_all()?.to_dtype(DType::U8)?.to_vec1()?;
            if keep.len() != flags.len() {
                bail!(
                    "{}: mask {key} has {} entries, the parameter {}",
                    path.display(),
                    keep.len(),
                    flags.len()
                );
            }
            *flags = keep.iter().map(|k| *k == 0).collect();
        }
        Ok(())
    }
}

/// Pruned / total weights of one component of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentSparsity {
    pub layer: usize,
    pub component: String,
    pub pruned: u64,
    pub total: u64,
}

impl ComponentSparsity {
    pub fn sparsity(&self) -> f64 {
        self.pruned as f64 / self.total.max(1) as f64
    }
}

/// Sparsity after a pruning step, as sent in `RunEvent::Sparsity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparsityReport {
    /// Scheduled sparsity of this pruning step.
    pub target: f64,
    /// Pruned share of the prunable weights.
    pub sparsity: f64,
    /// Pruned share of all parameters (embedding, norms, ... included).
    pub model_sparsity: f64,
    pub components: Vec<ComponentSparsity>,
}

/// Per-(layer, component) counts of the masks (experts of one projection summed).
pub fn report(
    model: &MambaLm,
    units: &[PruneUnit],
    masks: &PruneMasks,
    target: f64,
) -> SparsityReport {
    let mut components: Vec<ComponentSparsity> = Vec::new();
    for u in units {
        let pruned = masks.unit_flags(u).iter().filter(|p| **p).count() as u64;
        match components
            .iter_mut()
            .find(|c| c.layer == u.layer && c.component == u.component)
        {
            Some(c) => {
                c.pruned += pruned;
                c.total += u.numel() as u64;
            }
            None => components.push(ComponentSparsity {
                layer: u.layer,
                component: u.component.clone(),
                pruned,
                total: u.numel() as u64,
            }),
        }
    }
    let pruned: u64 = components.iter().map(|c| c.pruned).sum();
    let total: u64 = components.iter().map(|c| c.total).sum();
    SparsityReport {
        target,
        sparsity: pruned as f64 / total.max(1) as f64,
        model_sparsity: pruned as f64 / model.store.total_params().max(1) as f64,
        components,
    }
}

/// Measured from a checkpoint directory: (pruned by the masks, exact zeros among the masked
/// parameters' weights, elements of the masked parameters).
pub fn checkpoint_sparsity(dir: &Path) -> Result<(usize, usize, usize)> {
    let masks = candle_core::safetensors::load(dir.join(MASKS_FILE), &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", dir.join(MASKS_FILE).display()))?;
    let model =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)?;
    let (mut pruned, mut zeros, mut total) = (0, 0, 0);
    for (key, m) in &masks {
        let name = key.strip_suffix(MASK_SUFFIX).unwrap_or(key);
        let w = model
            .get(name)
            .with_context(|| format!("mask {key} without weight {name}"))?;
        let keep: Vec<u8> = m.flatten_all()?.to_vec1()?;
        let wv: Vec<f64> = w.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        pruned += keep.iter().filter(|k| **k == 0).count();
        zeros += wv.iter().filter(|v| **v == 0.0).count();
        total += keep.len();
    }
    Ok((pruned, zeros, total))
}
