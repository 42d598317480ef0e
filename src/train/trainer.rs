//! One training run: model + AdamW + data, stepped by the job thread.
use super::checkpoint::{self, CheckpointFiles, TrainerState};
use super::config::TrainConfig;
use super::loss::{forward_loss, predictions, scalar};
use super::optim::{grad_sq, AdamW};
use crate::data::{accuracy_counts, Batch, DataSource};
use crate::model::{MambaLm, ModelConfig};
use crate::prune::{PruneConfig, Pruner, SparsityReport};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Tokens each expert of one router received in one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingLoad {
    pub layer: usize,
    /// Sparsified projection (z, x, B, C, dt, out) or "mlp" for an E layer.
    pub module: String,
    pub counts: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct StepResult {
    /// Optimizer steps completed after this one.
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub aux_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub routing: Vec<RoutingLoad>,
    /// Set when the masks were recomputed before this step.
    pub sparsity: Option<SparsityReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean NLL in nats per predicted byte.
    pub loss: f64,
    pub bpb: f64,
    /// Accuracy on masked positions (synthetic tasks only).
    pub accuracy: Option<f64>,
}

/// What one optimizer step needs besides the model, the optimizer and the batch.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub lr: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub grad_clip: f64,
}

/// The phases of `optimizer_step`, reported once each is queued (the benchmark's split timing
/// syncs the device there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    Forward,
    Backward,
    Optimizer,
}

/// What `optimizer_step` did.
#[derive(Debug, Clone)]
pub struct StepDone {
    pub loss: f64,
    pub aux_loss: f64,
    /// NaN when the loss was not finite.
    pub grad_norm: f64,
    pub routing: Vec<RoutingLoad>,
    /// False when a non-finite loss or gradient norm left the weights as they were.
    pub updated: bool,
}

/// Forward, backward, one host read, gradient clipping and AdamW: the step the trainer takes
/// and the benchmark times. The backward is queued before anything is read, so the GPU does
/// not wait for the host between the two; one read then brings the loss, the aux loss and the
/// gradient norm (each read is a device sync on GPU). A non-finite loss or norm discards the
/// gradients.
pub fn optimizer_step(
    model: &MambaLm,
    opt: &mut AdamW,
    batch: &Batch,
    settings: StepSettings,
    pruner: Option<&Pruner>,
    on_phase: &mut dyn FnMut(StepPhase),
) -> Result<StepDone> {
    let parts = forward_loss(model, batch)?;
    on_phase(StepPhase::Forward);
    crate::trace(|| "forward queued, backward".to_string());
    let mut grads = parts.total()?.backward()?;
    if let Some(p) = pruner {
        p.mask_grads(model, &mut grads)?;
    }
    let params = model.store.params();
    let sq = grad_sq(params, &grads)?;
    on_phase(StepPhase::Backward);
    crate::trace(|| "backward queued, reading the loss and the gradient norm".to_string());
    let mut reads = vec![
        parts.ce.to_dtype(DType::F64)?,
        parts.aux.to_dtype(DType::F64)?,
    ];
    if let Some(d) = &sq.device {
        reads.push(d.to_dtype(DType::F64)?);
    }
    let read: Vec<f64> = candle_core::Tensor::stack(&reads, 0)?.to_vec1()?;
    let (loss, aux_loss) = (read[0], read[1]);
    let mut done = StepDone {
        loss,
        aux_loss,
        grad_norm: f64::NAN,
        routing: parts
            .routing
            .iter()
            .map(|r| RoutingLoad {
                layer: r.layer,
                module: r.module.clone(),
                counts: r.stats.counts.clone(),
            })
            .collect(),
        updated: false,
    };
    if !loss.is_finite() || !aux_loss.is_finite() {
        return Ok(done);
    }
    let norm = sq.norm(read.get(2).copied().unwrap_or(0.0));
    done.grad_norm = norm;
    if !norm.is_finite() {
        return Ok(done);
    }
    let scale = if settings.grad_clip > 0.0 && norm > settings.grad_clip {
        settings.grad_clip / (norm + 1e-6)
    } else {
        1.0
    };
    crate::trace(|| "optimizer".to_string());
    opt.step(params, &grads, settings.lr, scale)?;
    on_phase(StepPhase::Optimizer);
    done.updated = true;
    Ok(done)
}

pub struct Trainer {
    pub model: MambaLm,
    pub opt: AdamW,
    pub data: Box<dyn DataSource>,
    pub cfg: TrainConfig,
    pub seed: u64,
    pub step: u64,
    pub tokens: u64,
    /// Seconds of training before a resume, so elapsed time continues.
    pub elapsed_before: f64,
    val: Vec<Batch>,
    report_accuracy: bool,
    /// Unstructured pruning, when the run's variant has a `prune` table.
    pub pruner: Option<Pruner>,
}

impl Trainer {
    pub fn new(
        model_cfg: &ModelConfig,
        cfg: &TrainConfig,
        data: Box<dyn DataSource>,
        report_accuracy: bool,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Trainer> {
        let model = MambaLm::new(model_cfg, device, dtype, seed)?;
        let opt = AdamW::new(model.store.params(), cfg)?;
        let val = data.val_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len);
        Ok(Trainer {
            model,
            opt,
            data,
            cfg: cfg.clone(),
            seed,
            step: 0,
            tokens: 0,
            elapsed_before: 0.0,
            val,
            report_accuracy,
            pruner: None,
        })
    }

    /// Prunes by `cfg` from now on (masks all-kept until its first pruning step).
    pub fn enable_pruning(&mut self, cfg: &PruneConfig) {
        self.pruner = Some(Pruner::new(cfg, self.cfg.steps, &self.model));
    }

    /// Applies the masks to the weights and zeroes the optimizer moments of pruned weights.
    fn enforce_masks(&mut self) -> Result<()> {
        if let Some(p) = &self.pruner {
            p.apply(&self.model)?;
            for (i, keep) in p.keep_masks() {
                self.opt.mask_moments(*i, keep)?;
            }
        }
        Ok(())
    }

    /// Recomputes the masks if the schedule prunes before the next step.
    fn prune_if_due(&mut self) -> Result<Option<SparsityReport>> {
        let Some(p) = &mut self.pruner else {
            return Ok(None);
        };
        let Some(s) = p.due(self.step) else {
            return Ok(None);
        };
        let shape = (self.cfg.batch_size, self.cfg.seq_len);
        p.prune(
            &self.model,
            self.data.as_ref(),
            self.seed,
            self.step,
            s,
            shape,
        )?;
        let report = p.report(&self.model);
        self.enforce_masks()?;
        Ok(Some(report))
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr_at(self.step)
    }

    /// One optimizer step. A non-finite loss is returned without updating the weights.
    pub fn train_step(&mut self) -> Result<StepResult> {
        let sparsity = self.prune_if_due()?;
        let batch =
            self.data
                .train_batch(self.seed, self.step, self.cfg.batch_size, self.cfg.seq_len);
        crate::trace(|| format!("step {}: forward", self.step));
        let lr = self.lr();
        let done = optimizer_step(
            &self.model,
            &mut self.opt,
            &batch,
            StepSettings {
                lr,
                grad_clip: self.cfg.grad_clip,
            },
            self.pruner.as_ref(),
            &mut |_| {},
        )?;
        if done.updated {
            self.enforce_masks()?;
            self.step += 1;
            self.tokens += (self.cfg.batch_size * self.cfg.seq_len) as u64;
        }
        Ok(StepResult {
            step: self.step,
            tokens: self.tokens,
            loss: done.loss,
            aux_loss: done.aux_loss,
            lr,
            grad_norm: done.grad_norm,
            routing: done.routing,
            sparsity,
        })
    }

    /// Loss on the fixed validation set.
    pub fn evaluate(&self) -> Result<EvalResult> {
        let (mut nll, mut count) = (0.0, 0.0);
        let (mut correct, mut total) = (0usize, 0usize);
        for batch in &self.val {
            let parts = forward_loss(&self.model, batch)?;
            let n = batch.num_masked() as f64;
            nll += scalar(&parts.ce)? * n;
            count += n;
            if self.report_accuracy {
                let (c, t) = accuracy_counts(batch, &predictions(&parts.logits)?);
                correct += c;
                total += t;
            }
        }
        let loss = nll / count.max(1.0);
        Ok(EvalResult {
            loss,
            bpb: loss / std::f64::consts::LN_2,
            accuracy: (self.report_accuracy && total > 0).then(|| correct as f64 / total as f64),
        })
    }

    pub fn save_checkpoint(&self, dir: &Path, elapsed_s: f64) -> Result<()> {
        let params = self.model.store.params();
        checkpoint::save(
            dir,
            CheckpointFiles {
                config: &self.model.cfg,
                model: self.model.store.tensors(),
                optimizer: self.opt.tensors(params),
                state: TrainerState {
                    step: self.step,
                    tokens: self.tokens,
                    seed: self.seed,
                    elapsed_s,
                },
                masks: match &self.pruner {
                    Some(p) => p.masks.tensors(&self.model)?,
                    None => Default::default(),
                },
            },
        )
    }

    /// Restores weights, optimizer moments and the step counter from a checkpoint.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let cfg = checkpoint::read_config(dir)?;
        if cfg != self.model.cfg {
            anyhow::bail!(
                "{}: the checkpoint's config.json differs from the run's model config",
                dir.display()
            );
        }
        let state = checkpoint::read_state(dir)?;
        self.model
            .store
            .load_safetensors(&dir.join("model.safetensors"))?;
        let device = self.model.device().clone();
        self.opt
            .load(
                self.model.store.params(),
                &dir.join("optimizer.safetensors"),
                state.step,
                &device,
            )
            .context("restoring optimizer state")?;
        if let Some(p) = &mut self.pruner {
            let path = dir.join(crate::prune::mask::MASKS_FILE);
            if path.exists() {
                p.masks.load(&path)?;
                p.last_target = p.report(&self.model).sparsity;
                p.refresh(&self.model)?;
            }
        }
        self.step = state.step;
        self.tokens = state.tokens;
        self.elapsed_before = state.elapsed_s;
        Ok(())
    }
}
