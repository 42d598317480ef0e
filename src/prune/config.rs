//! The `prune` table of a variant: which scores, which schedule, which scope.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// |w| * mean_k |g_k|^alpha (the paper's gradient-aware magnitude score).
    Gradient,
    /// |w| (gradient = alpha 0, without the gradient batches).
    Magnitude,
    /// |W_ij| * ||X_j||_2 from calibration activations, compared per output row.
    Wanda,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Gradient, Method::Magnitude, Method::Wanda];
    pub fn name(self) -> &'static str {
        match self {
            Method::Gradient => "gradient",
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneSchedule {
    /// Zhu & Gupta: s_t = s_f + (s_0 - s_f) (1 - (t - t0)/(T - t0))^3, every `interval` steps.
    Cubic,
    /// Straight to `target` at `start_step`, then fine-tune with the mask.
    OneShot,
}

impl PruneSchedule {
    pub const ALL: [PruneSchedule; 2] = [PruneSchedule::Cubic, PruneSchedule::OneShot];
    /// The spec's spelling.
    pub fn name(self) -> &'static str {
        match self {
            PruneSchedule::Cubic => "cubic",
            PruneSchedule::OneShot => "one-shot",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// One threshold over all prunable tensors (the paper's choice).
    Global,
    /// Every prunable tensor pruned to the same sparsity (ablation).
    PerLayer,
}

impl Scope {
    pub const ALL: [Scope; 2] = [Scope::Global, Scope::PerLayer];
    /// The spec's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::PerLayer => "per-layer",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruneConfig {
    pub method: Method,
    /// Final sparsity s_f of the prunable weights.
    pub target: f64,
    /// s_0: sparsity of the first cubic pruning step.
    pub initial: f64,
    pub schedule: PruneSchedule,
    /// t0: optimizer steps of dense training before the first pruning.
    pub start_step: u64,
    /// T: the cubic schedule reaches `target` here (default: 3/4 of train.steps).
    pub end_step: Option<u64>,
    /// dt: steps between pruning events of the cubic schedule.
    pub interval: u64,
    /// Exponent of |g| in the gradient score.
    pub alpha: f64,
    /// K: batches |g| is averaged over (gradient) or calibration batches (wanda).
    pub batches: usize,
    pub scope: Scope,
    /// No prunable tensor gets a sparsity above this (1.0: no cap).
    pub max_per_tensor: f64,
    /// Also prune the depthwise conv1d weights.
    pub conv: bool,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            method: Method::Gradient,
            target: 0.5,
            initial: 0.0,
            schedule: PruneSchedule::Cubic,
            start_step: 0,
            end_step: None,
            interval: 10,
            alpha: 1.0,
            batches: 4,
            scope: Scope::Global,
            max_per_tensor: 1.0,
            conv: false,
        }
    }
}

impl PruneConfig {
    /// T with the default filled in.
    pub fn end(&self, train_steps: u64) -> u64 {
        self.end_step.unwrap_or(train_steps * 3 / 4)
    }

    /// Fills in defaults that depend on the training length (stored so run.json is explicit).
    pub fn resolved(&self, train_steps: u64) -> PruneConfig {
        let mut c = self.clone();
        c.end_step = Some(self.end(train_steps));
        c
    }

    /// First problem found, as (field, message).
    pub fn check(&self, train_steps: u64) -> Result<(), (&'static str, String)> {
        let frac = |f: &'static str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err((f, format!("must be in [0, 1), got {v}")))
            }
        };
        frac("target", self.target)?;
        frac("initial", self.initial)?;
        if self.initial > self.target {
            return Err((
                "initial",
                format!(
                    "initial = {} is above target = {}: sparsity only grows",
                    self.initial, self.target
                ),
            ));
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err((
                "alpha",
                format!("must be a finite number >= 0, got {}", self.alpha),
            ));
        }
        if self.batches == 0 {
            return Err(("batches", "must be at least 1".into()));
        }
        if !(self.max_per_tensor > 0.0 && self.max_per_tensor <= 1.0) {
            return Err((
                "max_per_tensor",
                format!("must be in (0, 1], got {}", self.max_per_tensor),
            ));
        }
        if self.max_per_tensor < self.target {
            return Err((
                "max_per_tensor",
                format!(
                    "a cap of {} cannot reach target = {}",
                    self.max_per_tensor, self.target
                ),
            ));
        }
        if self.start_step >= train_steps {
            return Err((
                "start_step",
                format!(
                    "start_step = {} leaves no step to train with the mask (train.steps = {train_steps})",
                    self.start_step
                ),
            ));
        }
        if self.schedule == PruneSchedule::Cubic {
            if self.interval == 0 {
                return Err(("interval", "must be at least 1".into()));
            }
            let end = self.end(train_steps);
            if end <= self.start_step {
                return Err((
                    "end_step",
                    format!(
                        "end_step = {end} must be after start_step = {}",
                        self.start_step
                    ),
                ));
            }
            if end >= train_steps {
                return Err((
                    "end_step",
                    format!(
                        "end_step = {end} leaves no step to train with the final mask (train.steps = {train_steps})"
                    ),
                ));
            }
        }
        Ok(())
    }
}
