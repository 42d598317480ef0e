//! Named, trainable parameters with deterministic host-side initialisation.
//!
//! Every tensor is drawn on the host from one seeded ChaCha stream in creation order and then
//! copied to the device, so the same seed gives bit-identical weights on CPU and GPU.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// How a parameter is initialised.
#[derive(Debug, Clone)]
pub enum Init {
    /// U(-bound, bound): PyTorch's default for nn.Linear / nn.Conv1d (bound = 1/sqrt(fan_in)).
    Uniform(f64),
    Normal(f64),
    Const(f64),
    /// Explicit values (dt_bias, A_log).
    Values(Vec<f64>),
}

/// Set on parameters that belong to one expert of a top-k group, so active counts can be derived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertShare {
    pub experts: usize,
    pub top_k: usize,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// AdamW weight decay applies (matrices); norms, biases, dt_bias, A_log and D are exempt.
    pub decay: bool,
    pub expert: Option<ExpertShare>,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.var.elem_count()
    }
    /// Parameters a token touches: an expert counts top_k/E of its group.
    pub fn active(&self) -> f64 {
        match self.expert {
            Some(s) => self.numel() as f64 * s.top_k as f64 / s.experts as f64,
            None => self.numel() as f64,
        }
    }
}

#[derive(Debug)]
pub struct ParamStore {
    device: Device,
    dtype: DType,
    rng: ChaCha8Rng,
    params: Vec<Param>,
    index: HashMap<String, usize>,
    /// Set while building an expert so its tensors are tagged.
    expert_scope: Option<ExpertShare>,
}

impl ParamStore {
    pub fn new(device: &Device, dtype: DType, seed: u64) -> ParamStore {
        ParamStore {
            device: device.clone(),
            dtype,
            rng: ChaCha8Rng::seed_from_u64(seed),
            params: Vec::new(),
            index: HashMap::new(),
            expert_scope: None,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn params(&self) -> &[Param] {
        &self.params
    }
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }
    pub fn set_expert_scope(&mut self, scope: Option<ExpertShare>) {
        self.expert_scope = scope;
    }

    /// Creates a parameter; returns the tensor the module keeps (it shares the Var's storage).
    pub fn add(&mut self, name: &str, shape: &[usize], init: Init, decay: bool) -> Result<Tensor> {
        if self.index.contains_key(name) {
            bail!("duplicate parameter name {name}");
        }
        let n: usize = shape.iter().product();
        let values: Vec<f64> = match init {
            Init::Uniform(b) => (0..n).map(|_| self.rng.gen_range(-b..b)).collect(),
            Init::Normal(std) => (0..n)
                .map(|_| std * standard_normal(&mut self.rng))
                .collect(),
            Init::Const(c) => vec![c; n],
            Init::Values(v) => {
                if v.len() != n {
                    bail!("{name}: {} init values for {n} elements", v.len());
                }
                v
            }
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        self.index.insert(name.to_string(), self.params.len());
        self.params.push(Param {
            name: name.to_string(),
            var,
            decay,
            expert: self.expert_scope,
        });
        Ok(tensor)
    }

    pub fn total_params(&self) -> usize {
        self.params.iter().map(Param::numel).sum()
    }
    pub fn active_params(&self) -> usize {
        self.params.iter().map(Param::active).sum::<f64>().round() as usize
    }

    /// Tensors by name, for safetensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    /// Overwrites every parameter from a safetensors file; names and shapes must match exactly.
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("reading {}", path.display()))?;
        for p in &self.params {
            let t = loaded
                .get(&p.name)
                .with_context(|| format!("{}: tensor {} missing", path.display(), p.name))?;
            if t.dims() != p.var.dims() {
                bail!(
                    "{}: tensor {} has shape {:?}, the model expects {:?}",
                    path.display(),
                    p.name,
                    t.dims(),
                    p.var.dims()
                );
            }
            p.var.set(&t.to_dtype(self.dtype)?)?;
        }
        if let Some(extra) = loaded.keys().find(|k| !self.index.contains_key(*k)) {
            bail!(
                "{}: unexpected tensor {extra} (does config.json match the checkpoint?)",
                path.display()
            );
        }
        Ok(())
    }
}

/// Box-Muller; kept local so initialisation does not depend on rand_distr's algorithm choices.
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
