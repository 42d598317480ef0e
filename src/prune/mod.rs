//! Unstructured pruning (Efficient Unstructured Pruning of Mamba SSMs): gradient-aware
//! magnitude scores, a cubic schedule, a global threshold; one-shot magnitude and Wanda as
//! baselines. The `Pruner` lives in the `Trainer`; masks are re-applied after every update.
pub mod config;
pub mod mask;
pub mod record;
pub mod schedule;
pub mod score;

pub use config::{Method, PruneConfig, PruneSchedule, Scope};
pub use mask::{ComponentSparsity, PruneMasks, PruneUnit, SparsityReport};

use crate::data::DataSource;
use crate::model::MambaLm;
use crate::train::loss::forward_loss;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Module, Tensor};

/// Scoring and calibration batches come from their own stream, so the training batches (keyed
/// by (seed, step)) are the same as in a run without pruning.
const SCORE_STREAM: u64 = 0x5c0e_ba7c_0000_0000;

#[derive(Debug)]
pub struct Pruner {
    /// With `end_step` filled in.
    pub cfg: PruneConfig,
    pub train_steps: u64,
    pub units: Vec<PruneUnit>,
    pub masks: PruneMasks,
    /// Target of the last pruning step (0 before the first).
    pub last_target: f64,
    /// (parameter index, 1 kept / 0 pruned in the parameter's dtype); empty while nothing is
    /// pruned, so the dense phase runs exactly as an unpruned run.
    keep: Vec<(usize, Tensor)>,
}

impl Pruner {
    pub fn new(cfg: &PruneConfig, train_steps: u64, model: &MambaLm) -> Pruner {
        let units = mask::prunable_units(model, cfg.conv);
        let masks = PruneMasks::new(model, &units);
        Pruner {
            cfg: cfg.resolved(train_steps),
            train_steps,
            units,
            masks,
            last_target: 0.0,
            keep: Vec::new(),
        }
    }

    /// The sparsity to prune to before the optimizer step that follows `step` completed ones.
    pub fn due(&self, step: u64) -> Option<f64> {
        schedule::sparsity_at(&self.cfg, self.train_steps, step)
    }

    /// Recomputes the masks at sparsity `s` and applies them to the weights. `batch` gives the
    /// (batch_size, seq_len) of the scoring batches.
    pub fn prune(
        &mut self,
        model: &MambaLm,
        data: &dyn DataSource,
        seed: u64,
        step: u64,
        s: f64,
        batch: (usize, usize),
    ) -> Result<()> {
        let scores = self.scores(model, data, seed, step, batch)?;
        let already: Vec<Vec<bool>> = self
            .units
            .iter()
            .map(|u| self.masks.unit_flags(u).to_vec())
            .collect();
        let cap = self.cfg.max_per_tensor;
        let chosen = match (self.cfg.method, self.cfg.scope) {
            (Method::Wanda, _) => {
                let cols: Vec<usize> = self.units.iter().map(|u| u.cols).collect();
                score::select_rows(&scores, &already, &cols, s)
            }
            (_, Scope::Global) => score::select_global(&scores, &already, s, cap),
            (_, Scope::PerLayer) => score::select_per_tensor(&scores, &already, s, cap),
        };
        for (u, flags) in self.units.iter().zip(&chosen) {
            self.masks.set_unit(u, flags);
        }
        self.last_target = s;
        self.refresh(model)?;
        self.apply(model)
    }

    /// Rebuilds the device masks from the host flags (after pruning or loading masks).
    pub fn refresh(&mut self, model: &MambaLm) -> Result<()> {
        self.keep.clear();
        if self.masks.count_pruned() == 0 {
            return Ok(());
        }
        for (i, p) in model.store.params().iter().enumerate() {
            if self.masks.pruned.contains_key(&p.name) {
                self.keep
                    .push((i, self.masks.keep_tensor(&p.name, p.var.as_tensor())?));
            }
        }
        Ok(())
    }

    /// Sets every masked weight to w * keep.
    pub fn apply(&self, model: &MambaLm) -> Result<()> {
        let params = model.store.params();
        for (i, keep) in &self.keep {
            let w = params[*i].var.as_tensor();
            params[*i].var.set(&(w * keep)?)?;
        }
        Ok(())
    }

    fn host_weights(model: &MambaLm, u: &PruneUnit) -> Result<Vec<f64>> {
        let w = model.store.params()[u.param].var.as_tensor();
        let flat: Vec<f64> = w.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        Ok(flat[u.range()].to_vec())
    }

    /// One score vector per unit.
    fn scores(
        &self,
        model: &MambaLm,
        data: &dyn DataSource,
        seed: u64,
        step: u64,
        (bs, sl): (usize, usize),
    ) -> Result<Vec<Vec<f64>>> {
        let k = self.cfg.batches as u64;
        let batch_of = |i: u64| data.train_batch(seed ^ SCORE_STREAM, step * k + i, bs, sl);
        let params = model.store.params();
        match self.cfg.method {
            Method::Magnitude => self
                .units
                .iter()
                .map(|u| Ok(score::magnitude(&Self::host_weights(model, u)?)))
                .collect(),
            Method::Gradient => {
                // Mean |g| per masked parameter over the K batches.
                let mut g_abs: Vec<Option<Vec<f64>>> = vec![None; params.len()];
                for i in 0..k {
                    let grads: GradStore =
                        forward_loss(model, &batch_of(i))?.total()?.backward()?;
                    for u in &self.units {
                        let p = &params[u.param];
                        let acc = g_abs[u.param].get_or_insert_with(|| vec![0.0; p.numel()]);
                        if let Some(g) = grads.get(p.var.as_tensor()) {
                            let gv: Vec<f64> = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                            acc.iter_mut()
                                .zip(&gv)
                                .for_each(|(a, g)| *a += g.abs() / k as f64);
                        }
                    }
                }
                self.units
                    .iter()
                    .map(|u| {
                        let g = &g_abs[u.param].as_ref().expect("accumulated")[u.range()];
                        Ok(score::gradient_magnitude(
                            &Self::host_weights(model, u)?,
                            g,
                            self.cfg.alpha,
                        ))
                    })
                    .collect()
            }
            Method::Wanda => {
                let (res, seen) = record::record(|| -> Result<()> {
                    for i in 0..k {
                        let (inputs, _, _) =
                            crate::train::loss::batch_tensors(model, &batch_of(i))?;
                        model.forward(&inputs)?;
                        model.take_routing();
                    }
                    Ok(())
                });
                res?;
                self.units
                    .iter()
                    .map(|u| {
                        let w = Self::host_weights(model, u)?;
                        let id = params[u.param].var.as_tensor().id();
                        // A weight whose input was not seen (conv1d, or an expert no
                        // calibration token reached) is scored by |w| within its rows.
                        let norms: Vec<f64> = match seen.get(&id) {
                            Some(sq) if sq.len() == u.cols => sq.iter().map(|v| v.sqrt()).collect(),
                            _ => vec![1.0; u.cols],
                        };
                        Ok(score::wanda(&w, u.cols, &norms))
                    })
                    .collect()
            }
        }
    }

    /// Zeroes the gradients of pruned weights, so clipping sees the masked model's gradient.
    pub fn mask_grads(&self, model: &MambaLm, grads: &mut GradStore) -> Result<()> {
        let params = model.store.params();
        for (i, keep) in &self.keep {
            let w = params[*i].var.as_tensor();
            if let Some(g) = grads.get(w) {
                let masked = (g * keep)?;
                grads.insert(w, masked);
            }
        }
        Ok(())
    }

    /// (parameter index, keep mask) of every masked parameter once something is pruned.
    pub fn keep_masks(&self) -> &[(usize, Tensor)] {
        &self.keep
    }

    pub fn report(&self, model: &MambaLm) -> SparsityReport {
        mask::report(model, &self.units, &self.masks, self.last_target)
    }
}
