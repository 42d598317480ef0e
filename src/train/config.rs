//! Training hyper-parameters (the `[train]` table of an experiment spec).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Linear warm-up, then constant (the paper's choice).
    Constant,
    /// Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last step.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Evaluate on the fixed validation set every N steps (and at the end).
    pub eval_interval: u64,
    pub eval_batches: usize,
    /// Write a checkpoint every N steps (0: only at the end).
    pub checkpoint_interval: u64,
    /// Emit routing loads every N steps.
    pub routing_interval: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 200,
            batch_size: 8,
            seq_len: 128,
            lr: 2e-3,
            warmup_steps: 20,
            schedule: Schedule::Constant,
            min_lr_ratio: 0.1,
            weight_decay: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 50,
            eval_batches: 4,
            checkpoint_interval: 0,
            routing_interval: 10,
        }
    }
}

impl TrainConfig {
    /// Learning rate at (0-based) `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = if self.warmup_steps > 0 && step < self.warmup_steps {
            (step + 1) as f64 / self.warmup_steps as f64
        } else {
            1.0
        };
        let decay = match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Cosine => {
                if step < self.warmup_steps || self.steps <= self.warmup_steps {
                    1.0
                } else {
                    let t = (step - self.warmup_steps) as f64
                        / (self.steps - self.warmup_steps).max(1) as f64;
                    let cos = 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos());
                    self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos
                }
            }
        };
        self.lr * warm * decay
    }

    /// First problem found, as (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let pos = |f: &'static str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err((f, format!("must be a finite number > 0, got {v}")))
            }
        };
        if self.steps == 0 {
            return Err(("steps", "must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1".into()));
        }
        if self.seq_len == 0 {
            return Err(("seq_len", "must be at least 1".into()));
        }
        pos("lr", self.lr)?;
        pos("eps", self.eps)?;
        for (f, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err((f, format!("must be in [0, 1), got {v}")));
            }
        }
        for (f, v) in [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("min_lr_ratio", self.min_lr_ratio),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err((f, format!("must be a finite number >= 0, got {v}")));
            }
        }
        if self.eval_interval == 0 {
            return Err(("eval_interval", "must be at least 1".into()));
        }
        if self.eval_batches == 0 {
            return Err(("eval_batches", "must be at least 1".into()));
        }
        if self.routing_interval == 0 {
            return Err(("routing_interval", "must be at least 1".into()));
        }
        Ok(())
    }
}
