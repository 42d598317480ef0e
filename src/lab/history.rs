//! What the lab knows about one run: its `RunEvent`s folded into curves, evaluation points,
//! routing snapshots and a status. Built live from a job's event stream or re-read from a run's
//! `metrics.jsonl`; the TUI and the PNG figures both read it.
use super::jobs::{read_metrics, RunEvent};
use crate::prune::ComponentSparsity;
use crate::train::trainer::RoutingLoad;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    Running,
    Paused,
    Done,
    Stopped,
    Diverged,
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Done => "done",
            RunStatus::Stopped => "stopped",
            RunStatus::Diverged => "diverged",
            RunStatus::Failed => "failed",
        }
    }

    /// The run will not send more events.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Done | RunStatus::Stopped | RunStatus::Diverged | RunStatus::Failed
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPoint {
    pub step: u64,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub loss: f64,
    pub aux_loss: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalPoint {
    pub step: u64,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub val_acc: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSnapshot {
    pub step: u64,
    pub loads: Vec<RoutingLoad>,
}

/// Which quantity a curve shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    TrainLoss,
    ValLoss,
    ValBpb,
}

impl Metric {
    pub fn parse(s: &str) -> Option<Metric> {
        match s {
            "train_loss" | "loss" | "train" => Some(Metric::TrainLoss),
            "val_loss" | "val" => Some(Metric::ValLoss),
            "val_bpb" | "bpb" => Some(Metric::ValBpb),
            _ => None,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Metric::TrainLoss => "train loss (nats/byte)",
            Metric::ValLoss => "validation loss (nats/byte)",
            Metric::ValBpb => "validation bits per byte",
        }
    }
}

/// What the x axis measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Steps,
    Tokens,
    WallTime,
}

impl XAxis {
    pub fn parse(s: &str) -> Option<XAxis> {
        match s {
            "steps" | "step" => Some(XAxis::Steps),
            "tokens" => Some(XAxis::Tokens),
            "time" | "wall" | "wall_time" => Some(XAxis::WallTime),
            _ => None,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            XAxis::Steps => "step",
            XAxis::Tokens => "tokens",
            XAxis::WallTime => "wall time (s)",
        }
    }
}

/// Sparsity of the prunable weights after one pruning step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparsityPoint {
    pub step: u64,
    pub target: f64,
    pub sparsity: f64,
    pub model_sparsity: f64,
}

/// One run as the lab sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunHistory {
    /// `experiment/variant[-seedS]`.
    pub label: String,
    pub dir: Option<PathBuf>,
    pub variant: String,
    pub seed: u64,
    pub device: String,
    pub total_params: usize,
    pub active_params: usize,
    /// Target number of steps.
    pub target_steps: u64,
    pub tokens_per_step: u64,
    pub status: RunStatus,
    pub steps: Vec<StepPoint>,
    pub evals: Vec<EvalPoint>,
    pub routing: Vec<RoutingSnapshot>,
    /// One point per pruning step (empty for unpruned runs).
    pub sparsity: Vec<SparsityPoint>,
    /// Per-(layer, component) sparsity after the last pruning step.
    pub components: Vec<ComponentSparsity>,
    /// Why the run diverged or failed.
    pub error: Option<String>,
    /// Bytes of GPU memory in use at the last step that reported it (GPU runs).
    pub gpu_mem: Option<u64>,
}

impl RunHistory {
    pub fn new(label: impl Into<String>) -> RunHistory {
        RunHistory {
            label: label.into(),
            dir: None,
            variant: String::new(),
            seed: 0,
            device: String::new(),
            total_params: 0,
            active_params: 0,
            target_steps: 0,
            tokens_per_step: 0,
            status: RunStatus::Queued,
            steps: Vec::new(),
            evals: Vec::new(),
            routing: Vec::new(),
            gpu_mem: None,
            sparsity: Vec::new(),
            components: Vec::new(),
            error: None,
        }
    }

    /// Folds one event in. A `Started` with `resumed_from` drops points past the checkpoint,
    /// as the resumed run redoes them.
    pub fn apply(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Started {
                variant,
                seed,
                device,
                total_params,
                active_params,
                steps,
                tokens_per_step,
                resumed_from,
                ..
            } => {
                self.variant = variant.clone();
                self.seed = *seed;
                self.device = device.clone();
                self.total_params = *total_params;
                self.active_params = *active_params;
                self.target_steps = *steps;
                self.tokens_per_step = *tokens_per_step;
                self.status = RunStatus::Running;
                self.error = None;
                let keep = resumed_from.unwrap_or(0);
                self.steps.retain(|p| p.step <= keep);
                self.evals.retain(|p| p.step <= keep);
                self.routing.retain(|p| p.step <= keep);
                self.sparsity.retain(|p| p.step <= keep);
            }
            RunEvent::Step {
                step,
                tokens,
                loss,
                aux_loss,
                tokens_per_s,
                elapsed_s,
                gpu_mem,
                ..
            } => {
                self.gpu_mem = gpu_mem.or(self.gpu_mem);
                self.steps.push(StepPoint {
                    step: *step,
                    tokens: *tokens,
                    elapsed_s: *elapsed_s,
                    loss: *loss,
                    aux_loss: *aux_loss,
                    tokens_per_s: *tokens_per_s,
                })
            }
            RunEvent::Eval {
                step,
                tokens,
                val_loss,
                val_bpb,
                val_acc,
                elapsed_s,
            } => self.evals.push(EvalPoint {
                step: *step,
                tokens: *tokens,
                elapsed_s: *elapsed_s,
                val_loss: *val_loss,
                val_bpb: *val_bpb,
                val_acc: *val_acc,
            }),
            RunEvent::Routing { step, loads } => self.routing.push(RoutingSnapshot {
                step: *step,
                loads: loads.clone(),
            }),
            RunEvent::Sparsity {
                step,
                target,
                sparsity,
                model_sparsity,
                components,
            } => {
                self.sparsity.push(SparsityPoint {
                    step: *step,
                    target: *target,
                    sparsity: *sparsity,
                    model_sparsity: *model_sparsity,
                });
                self.components = components.clone();
            }
            RunEvent::Checkpoint { .. } => {}
            RunEvent::Paused { .. } => self.status = RunStatus::Paused,
            RunEvent::Resumed { .. } => self.status = RunStatus::Running,
            RunEvent::Finished { .. } => self.status = RunStatus::Done,
            RunEvent::Stopped { .. } => self.status = RunStatus::Stopped,
            RunEvent::Diverged { detail, .. } => {
                self.status = RunStatus::Diverged;
                self.error = Some(detail.clone());
            }
            RunEvent::Failed { error, .. } => {
                self.status = RunStatus::Failed;
                self.error = Some(error.clone());
            }
        }
    }

    /// Re-reads a run directory's `metrics.jsonl`. A run whose log ends without a terminal
    /// event (the process died) is reported as stopped, not running.
    pub fn load(run_dir: &Path) -> std::io::Result<RunHistory> {
        let events = read_metrics(&run_dir.join("metrics.jsonl"))?;
        let mut h = RunHistory::new(run_label(run_dir));
        h.dir = Some(run_dir.to_path_buf());
        for e in &events {
            h.apply(&e.event);
        }
        if !h.status.is_terminal() && !events.is_empty() {
            h.status = RunStatus::Stopped;
        }
        Ok(h)
    }

    /// Measured sparsity of the prunable weights after the last pruning step.
    pub fn last_sparsity(&self) -> Option<f64> {
        self.sparsity.last().map(|p| p.sparsity)
    }

    pub fn last_step(&self) -> u64 {
        self.steps.last().map(|p| p.step).unwrap_or(0)
    }
    pub fn last_tokens(&self) -> u64 {
        self.steps.last().map(|p| p.tokens).unwrap_or(0)
    }
    pub fn last_train_loss(&self) -> Option<f64> {
        self.steps.last().map(|p| p.loss)
    }
    pub fn last_val_loss(&self) -> Option<f64> {
        self.evals.last().map(|p| p.val_loss)
    }
    /// Mean throughput over the last `n` steps.
    pub fn tokens_per_s(&self, n: usize) -> Option<f64> {
        let tail = &self.steps[self.steps.len().saturating_sub(n)..];
        let v: Vec<f64> = tail
            .iter()
            .map(|p| p.tokens_per_s)
            .filter(|x| x.is_finite() && *x > 0.0)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
    /// Seconds left at the recent throughput.
    pub fn eta_s(&self) -> Option<f64> {
        let left = self.target_steps.saturating_sub(self.last_step()) * self.tokens_per_step;
        if self.status.is_terminal() {
            return None;
        }
        self.tokens_per_s(20).map(|r| left as f64 / r)
    }

    /// `(x, y)` points of a metric; non-finite values are dropped (charts cannot draw them).
    pub fn series(&self, metric: Metric, x: XAxis) -> Vec<(f64, f64)> {
        let pick = |step: u64, tokens: u64, t: f64| match x {
            XAxis::Steps => step as f64,
            XAxis::Tokens => tokens as f64,
            XAxis::WallTime => t,
        };
        let pts: Vec<(f64, f64)> = match metric {
            Metric::TrainLoss => self
                .steps
                .iter()
                .map(|p| (pick(p.step, p.tokens, p.elapsed_s), p.loss))
                .collect(),
            Metric::ValLoss => self
                .evals
                .iter()
                .map(|p| (pick(p.step, p.tokens, p.elapsed_s), p.val_loss))
                .collect(),
            Metric::ValBpb => self
                .evals
                .iter()
                .map(|p| (pick(p.step, p.tokens, p.elapsed_s), p.val_bpb))
                .collect(),
        };
        pts.into_iter()
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .collect()
    }

    /// Routing matrices per (projection, layer) over the last `window` snapshots (all when
    /// `None`).
    pub fn routing_matrix(&self, window: Option<usize>) -> Vec<RoutingMatrix> {
        let snaps = match window {
            Some(n) => &self.routing[self.routing.len().saturating_sub(n)..],
            None => &self.routing[..],
        };
        let mut out: Vec<RoutingMatrix> = Vec::new();
        for snap in snaps {
            for load in &snap.loads {
                let m = match out.iter_mut().position(|m| m.module == load.module) {
                    Some(i) => &mut out[i],
                    None => {
                        out.push(RoutingMatrix {
                            module: load.module.clone(),
                            layers: Vec::new(),
                            counts: Vec::new(),
                        });
                        out.last_mut().unwrap()
                    }
                };
                let row = match m.layers.iter().position(|&l| l == load.layer) {
                    Some(r) => r,
                    None => {
                        m.layers.push(load.layer);
                        m.counts.push(vec![0; load.counts.len()]);
                        m.layers.len() - 1
                    }
                };
                let acc = &mut m.counts[row];
                if acc.len() < load.counts.len() {
                    acc.resize(load.counts.len(), 0);
                }
                for (a, c) in acc.iter_mut().zip(&load.counts) {
                    *a += *c as u64;
                }
            }
        }
        for m in &mut out {
            // Layers in depth order.
            let mut order: Vec<usize> = (0..m.layers.len()).collect();
            order.sort_by_key(|&i| m.layers[i]);
            m.layers = order.iter().map(|&i| m.layers[i]).collect();
            m.counts = order.iter().map(|&i| m.counts[i].clone()).collect();
        }
        out
    }
}

/// `experiment/variant` from a run directory `.../<experiment>/<variant>`.
pub fn run_label(run_dir: &Path) -> String {
    let name = |p: Option<&Path>| {
        p.and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let variant = name(Some(run_dir));
    let experiment = name(run_dir.parent());
    if experiment.is_empty() {
        variant
    } else {
        format!("{experiment}/{variant}")
    }
}

/// Every run directory (one holding `metrics.jsonl`) under `runs_root`, two levels deep
/// (`runs/<experiment>/<variant>`), sorted.
pub fn find_run_dirs(runs_root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(exps) = std::fs::read_dir(runs_root) else {
        return out;
    };
    for exp in exps.flatten() {
        let Ok(vars) = std::fs::read_dir(exp.path()) else {
            continue;
        };
        for v in vars.flatten() {
            if v.path().join("metrics.jsonl").is_file() {
                out.push(v.path());
            }
        }
    }
    out.sort();
    out
}

/// Token counts of one sparsified projection: rows are layers, columns experts.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingMatrix {
    /// z, x, B, C, dt, out, or mlp (an E layer).
    pub module: String,
    pub layers: Vec<usize>,
    pub counts: Vec<Vec<u64>>,
}

/// Load imbalance of one router.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Imbalance {
    /// Largest expert share over the mean share (1 = perfectly balanced, E = all on one).
    pub max_over_mean: f64,
    /// Coefficient of variation of the shares (std / mean; 0 = balanced).
    pub cv: f64,
    /// Experts that received no token.
    pub dead: usize,
}

impl RoutingMatrix {
    /// Share of the layer's tokens each expert received (rows sum to 1; zeros when no token).
    pub fn fractions(&self, row: usize) -> Vec<f64> {
        let c = &self.counts[row];
        let total: u64 = c.iter().sum();
        c.iter()
            .map(|&x| {
                if total == 0 {
                    0.0
                } else {
                    x as f64 / total as f64
                }
            })
            .collect()
    }

    pub fn imbalance(&self, row: usize) -> Imbalance {
        imbalance(&self.counts[row])
    }
}

pub fn imbalance(counts: &[u64]) -> Imbalance {
    let n = counts.len().max(1) as f64;
    let total: u64 = counts.iter().sum();
    let mean = total as f64 / n;
    let dead = counts.iter().filter(|&&c| c == 0).count();
    if total == 0 {
        return Imbalance {
            max_over_mean: 0.0,
            cv: 0.0,
            dead,
        };
    }
    let max = *counts.iter().max().unwrap_or(&0) as f64;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    Imbalance {
        max_over_mean: max / mean,
        cv: var.sqrt() / mean,
        dead,
    }
}

/// Exponential moving average with TensorBoard's debiasing (the first points are not pulled
/// towards zero). `weight` in [0, 1): 0 = no smoothing.
pub fn ema(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let w = if weight.is_finite() {
        weight.clamp(0.0, 0.999)
    } else {
        0.0
    };
    let mut acc = 0.0;
    let mut norm = 0.0;
    points
        .iter()
        .map(|&(x, y)| {
            acc = acc * w + (1.0 - w) * y;
            norm = norm * w + (1.0 - w);
            (x, acc / norm)
        })
        .collect()
}

/// At most about `buckets * 2` points: per bucket of consecutive points, the minimum and the
/// maximum in x order, so spikes survive (dropping every other point would hide them).
pub fn downsample_minmax(points: &[(f64, f64)], buckets: usize) -> Vec<(f64, f64)> {
    if buckets == 0 || points.len() <= buckets * 2 {
        return points.to_vec();
    }
    let size = points.len().div_ceil(buckets);
    let mut out = Vec::with_capacity(buckets * 2);
    for chunk in points.chunks(size) {
        let (mut lo, mut hi) = (0, 0);
        for (i, p) in chunk.iter().enumerate() {
            if p.1 < chunk[lo].1 {
                lo = i;
            }
            if p.1 > chunk[hi].1 {
                hi = i;
            }
        }
        let (a, b) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        out.push(chunk[a]);
        if b != a {
            out.push(chunk[b]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64) -> RunEvent {
        RunEvent::Step {
            step,
            tokens: step * 100,
            loss,
            aux_loss: 0.0,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_s: 50.0,
            elapsed_s: step as f64 * 2.0,
            gpu_mem: (step == 2).then_some(3 << 30),
        }
    }

    fn started(resumed_from: Option<u64>) -> RunEvent {
        RunEvent::Started {
            run: "e/v".into(),
            variant: "v".into(),
            seed: 0,
            device: "cpu".into(),
            total_params: 10,
            active_params: 5,
            steps: 10,
            tokens_per_step: 100,
            resumed_from,
        }
    }

    #[test]
    fn folds_events_and_resume_drops_redone_points() {
        let mut h = RunHistory::new("e/v");
        h.apply(&started(None));
        for s in 1..=5 {
            h.apply(&step(s, 3.0 - s as f64 * 0.1));
        }
        assert_eq!(h.status, RunStatus::Running);
        assert_eq!(h.last_step(), 5);
        // The GPU memory of the last step that reported it.
        assert_eq!(h.gpu_mem, Some(3 << 30));
        // eta: 5 steps * 100 tokens at 50 tokens/s
        assert_eq!(h.eta_s(), Some(10.0));
        h.apply(&started(Some(3)));
        assert_eq!(h.last_step(), 3);
        h.apply(&step(4, f64::NAN));
        assert_eq!(h.series(Metric::TrainLoss, XAxis::Tokens).len(), 3);
        assert_eq!(
            h.series(Metric::TrainLoss, XAxis::WallTime)[2],
            (6.0, 3.0 - 0.3)
        );
        h.apply(&RunEvent::Diverged {
            step: 4,
            detail: "nan".into(),
        });
        assert_eq!(h.status, RunStatus::Diverged);
        assert_eq!(h.eta_s(), None);
    }

    #[test]
    fn routing_matrix_accumulates_per_module_and_layer() {
        let mut h = RunHistory::new("x");
        let load = |layer, module: &str, counts: Vec<usize>| RoutingLoad {
            layer,
            module: module.into(),
            counts,
        };
        h.apply(&RunEvent::Routing {
            step: 1,
            loads: vec![load(1, "z", vec![3, 1]), load(0, "z", vec![2, 2])],
        });
        h.apply(&RunEvent::Routing {
            step: 2,
            loads: vec![load(1, "z", vec![4, 0]), load(0, "z", vec![0, 4])],
        });
        let all = h.routing_matrix(None);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].layers, vec![0, 1]);
        assert_eq!(all[0].counts, vec![vec![2, 6], vec![7, 1]]);
        let recent = h.routing_matrix(Some(1));
        assert_eq!(recent[0].counts, vec![vec![0, 4], vec![4, 0]]);
        assert_eq!(recent[0].fractions(1), vec![1.0, 0.0]);
        let imb = recent[0].imbalance(1);
        assert_eq!((imb.max_over_mean, imb.cv, imb.dead), (2.0, 1.0, 1));
    }

    #[test]
    fn ema_is_debiased_and_downsampling_keeps_spikes() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 2.0)).collect();
        assert!(ema(&pts, 0.9).iter().all(|p| (p.1 - 2.0).abs() < 1e-12));
        let mut long: Vec<(f64, f64)> = (0..1000).map(|i| (i as f64, 1.0)).collect();
        long[537].1 = 9.0;
        long[100].1 = -3.0;
        let d = downsample_minmax(&long, 50);
        assert!(d.len() <= 100);
        assert!(d.contains(&(537.0, 9.0)) && d.contains(&(100.0, -3.0)));
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
