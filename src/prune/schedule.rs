//! When to prune and to what sparsity.
use super::config::{PruneConfig, PruneSchedule};

/// Cubic sparsity (Zhu & Gupta 2017) at step t: s_0 before t0, s_f from T on.
pub fn cubic(s0: f64, sf: f64, t0: u64, t_end: u64, t: u64) -> f64 {
    if t <= t0 {
        return s0;
    }
    if t >= t_end {
        return sf;
    }
    let frac = (t - t0) as f64 / (t_end - t0) as f64;
    sf + (s0 - sf) * (1.0 - frac).powi(3)
}

/// Target sparsity when pruning at `step` (after `step` optimizer steps), or None when no
/// pruning happens then. The cubic schedule prunes at t0, t0 + dt, ... and always at T.
pub fn sparsity_at(cfg: &PruneConfig, train_steps: u64, step: u64) -> Option<f64> {
    let t0 = cfg.start_step;
    match cfg.schedule {
        PruneSchedule::OneShot => (step == t0).then_some(cfg.target),
        PruneSchedule::Cubic => {
            let t_end = cfg.end(train_steps);
            let due = step >= t0
                && step <= t_end
                && ((step - t0).is_multiple_of(cfg.interval.max(1)) || step == t_end);
            due.then(|| cubic(cfg.initial, cfg.target, t0, t_end, step))
        }
    }
}

/// Every (step, sparsity) pruning event of a run.
pub fn events(cfg: &PruneConfig, train_steps: u64) -> Vec<(u64, f64)> {
    (0..train_steps)
        .filter_map(|s| sparsity_at(cfg, train_steps, s).map(|v| (s, v)))
        .collect()
}
