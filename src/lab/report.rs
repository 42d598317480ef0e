//! `moz-lab report`: trains what a spec's runs are missing, then writes a Table-1-style
//! markdown report with figures.
//!
//! A run is missing when its `metrics.jsonl` has no `finished` event, or when its `run.json`
//! says it was trained with a different model, training, data, seed or dtype than the spec now
//! asks for (an outdated run would silently mix two experiments). Missing runs are trained one
//! after another through the same job body as `moz-lab run` (`runner::spawn_run`); with
//! `--no-run` they are listed as missing instead.
//!
//! `DIR/report.md` holds, per variant, total / active parameters, expert counts, tokens, the
//! final validation loss and bits per byte as mean ± sample standard deviation over seeds, the
//! validation accuracy when the task has one (synthetic tasks), tokens/s, and zero-shot
//! multiple-choice accuracies (`--mc TASK=FILE`); then a "what it shows" paragraph computed
//! from those numbers and the figures beside it: `loss.png` and `train_loss.png` (mean over
//! seeds with a min-max band), `routing-<variant>.png` (seed 0's expert load) and `params.png`
//! (parameters per component). The report carries no timestamps, so regenerating it from the
//! same runs gives the same file.
use crate::device;
use crate::lab::history::{Metric, RunHistory, XAxis};
use crate::lab::jobs::{read_metrics, RunEvent};
use crate::lab::runner::spawn_run;
use crate::lab::spec::{ExperimentSpec, RunSpec};
use crate::model::config::LayerKind;
use crate::model::count::ParamCount;
use crate::model::ModelConfig;
use crate::plot::render::{color, draw_err, linear_ticks, text_style, write_png, Area, Scale};
use crate::plot::{
    write_routing_heatmap, write_seed_band_chart, write_sparsity_chart, ChartOptions, SeedGroup,
    SparsitySeries, Ticked,
};
use crate::theme::{Rgb, Theme};
use crate::train::mc::{self, McTask};
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

/// Figure size (the plot module's default).
pub const FIGURE_SIZE: (u32, u32) = (1600, 1000);

/// `moz-lab report`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReportArgs {
    /// The experiment spec (experiments/*.toml).
    pub spec: PathBuf,
    /// Folder for report.md and the figures (default: reports/<spec name>).
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Train nothing: collect the finished runs and list the missing ones.
    #[arg(long)]
    pub no_run: bool,
    /// Where runs are stored.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Override any spec field: --set model.d_model=512 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Override train.steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Zero-shot multiple choice on every run's checkpoint: TASK=FILE with TASK arc,
    /// hellaswag or siqa and FILE the task's jsonl (repeatable).
    #[arg(long = "mc", value_name = "TASK=FILE", value_parser = parse_mc)]
    pub mc: Vec<(McTask, PathBuf)>,
}

fn parse_mc(s: &str) -> Result<(McTask, PathBuf), String> {
    let (task, file) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected TASK=FILE, e.g. arc=arc_easy.jsonl"))?;
    let task: McTask = task.parse().map_err(|e| format!("{e}"))?;
    if file.is_empty() {
        return Err(format!("{s:?}: no file after '='"));
    }
    Ok((task, PathBuf::from(file)))
}

impl ReportArgs {
    /// The overrides applied to the spec: `--set`s, then `--steps`.
    pub fn overrides(&self) -> Vec<String> {
        let mut sets = self.sets.clone();
        if let Some(s) = self.steps {
            sets.push(format!("train.steps={s}"));
        }
        sets
    }

    /// The command line that reproduces this report (only options that differ from the
    /// defaults), written into it.
    pub fn command_line(&self) -> String {
        let mut c = format!(
            "moz-lab report {}",
            shell_quote(&self.spec.to_string_lossy())
        );
        if let Some(o) = &self.out {
            let _ = write!(c, " -o {}", shell_quote(&o.to_string_lossy()));
        }
        if self.no_run {
            c.push_str(" --no-run");
        }
        if self.runs_dir != Path::new("runs") {
            let _ = write!(
                c,
                " --runs-dir {}",
                shell_quote(&self.runs_dir.to_string_lossy())
            );
        }
        for s in &self.sets {
            let _ = write!(c, " --set {}", shell_quote(s));
        }
        if let Some(s) = self.steps {
            let _ = write!(c, " --steps {s}");
        }
        for (t, f) in &self.mc {
            let _ = write!(c, " --mc {}", shell_quote(&format!("{t}={}", f.display())));
        }
        c
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// Finished with the spec as it is now.
    Finished,
    /// Needs training; the reason is shown in the report.
    Missing(String),
}

/// Whether `run` finished with the settings it has now (see the module docs).
pub fn run_state(run: &RunSpec) -> RunState {
    let log = run.out_dir.join("metrics.jsonl");
    if !log.is_file() {
        return RunState::Missing("not trained".into());
    }
    let events = match read_metrics(&log) {
        Ok(e) => e,
        Err(e) => return RunState::Missing(format!("unreadable metrics.jsonl: {e}")),
    };
    if !events
        .iter()
        .any(|e| matches!(e.event, RunEvent::Finished { .. }))
    {
        let last = events.iter().rev().find_map(|e| match &e.event {
            RunEvent::Stopped { step } => Some(format!("stopped at step {step}")),
            RunEvent::Diverged { step, .. } => Some(format!("diverged at step {step}")),
            RunEvent::Failed { error, .. } => Some(format!("failed: {}", first_line(error))),
            _ => None,
        });
        let step = events.iter().filter_map(|e| e.event.step()).max();
        return RunState::Missing(match (last, step) {
            (Some(l), _) => l,
            (None, Some(s)) => format!("unfinished (step {s})"),
            (None, None) => "unfinished".into(),
        });
    }
    // A run.json we cannot read (an older format) does not make a finished run outdated.
    if let Some(old) = std::fs::read_to_string(run.out_dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<RunSpec>(&t).ok())
    {
        let mut changed = Vec::new();
        if old.model != run.model {
            changed.push("model");
        }
        if old.train != run.train {
            changed.push("train");
        }
        if old.data != run.data {
            changed.push("data");
        }
        if old.seed != run.seed {
            changed.push("seed");
        }
        if old.dtype != run.dtype {
            changed.push("dtype");
        }
        if !changed.is_empty() {
            return RunState::Missing(format!(
                "outdated: trained with another {} than the spec gives now",
                changed.join(", ")
            ));
        }
    }
    RunState::Finished
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The whole command: train what is missing (unless `--no-run`), collect, write. Prints the
/// path of report.md on stdout, progress on stderr.
pub fn run(args: &ReportArgs) -> Result<()> {
    let overrides = args.overrides();
    let spec = ExperimentSpec::load_with(&args.spec, &overrides).map_err(|e| anyhow!("{e}"))?;
    let runs = spec.runs(&args.runs_dir).map_err(|e| anyhow!("{e}"))?;
    let todo: Vec<(&RunSpec, String)> = runs
        .iter()
        .filter_map(|r| match run_state(r) {
            RunState::Finished => None,
            RunState::Missing(why) => Some((r, why)),
        })
        .collect();
    let mut failed = Vec::new();
    if args.no_run {
        eprintln!(
            "--no-run: {} of {} runs missing, not training",
            todo.len(),
            runs.len()
        );
    } else {
        eprintln!(
            "{} runs to train ({} of {} finished)",
            todo.len(),
            runs.len() - todo.len(),
            runs.len()
        );
        if !todo.is_empty() {
            device::resolve(&spec.file.device)
                .map_err(|e| anyhow!("{}: device: {e:#}", args.spec.display()))?;
        }
        for (k, (run, why)) in todo.iter().enumerate() {
            eprintln!(
                "[{}/{}] {}: {} steps ({why})",
                k + 1,
                todo.len(),
                run.label(),
                run.train.steps
            );
            if let Some(err) = train_one(k, run)? {
                eprintln!("  {}: {err}", run.label());
                failed.push(run.label());
            }
        }
    }
    let report = collect(&spec, &runs, &args.runs_dir, &overrides, &args.mc)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(&spec.name));
    let path = write_report(&report, &out, &args.command_line(), &Theme::default_theme())?;
    println!("{}", path.display());
    if !failed.is_empty() {
        bail!(
            "{} runs did not finish: {} (the report lists them as missing)",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Trains one run and waits for it; `Some(reason)` when it did not finish.
fn train_one(job: usize, run: &RunSpec) -> Result<Option<String>> {
    let (tx, rx) = mpsc::channel();
    let label = run.label();
    let steps = run.train.steps;
    let t0 = Instant::now();
    let handle = spawn_run(job, run.clone(), false, tx)?;
    let mut last_loss = None;
    let mut outcome = None;
    for msg in rx.iter() {
        match msg.event {
            RunEvent::Step { loss, .. } => last_loss = Some(loss),
            RunEvent::Eval {
                step,
                val_loss,
                val_acc,
                ..
            } => {
                let train = last_loss
                    .map(|l| format!(" train {l:.4}"))
                    .unwrap_or_default();
                let acc = val_acc.map(|a| format!(" acc {a:.3}")).unwrap_or_default();
                eprintln!(
                    "  {label} step {step}/{steps}{train} val {val_loss:.4}{acc} ({:.0} s)",
                    t0.elapsed().as_secs_f64()
                );
            }
            RunEvent::Finished { .. } => {
                eprintln!("  {label}: done in {:.1} s", t0.elapsed().as_secs_f64());
                outcome = Some(None);
            }
            RunEvent::Stopped { step } => outcome = Some(Some(format!("stopped at step {step}"))),
            RunEvent::Diverged { detail, .. } => {
                outcome = Some(Some(format!("diverged: {detail}")))
            }
            RunEvent::Failed { error, .. } => outcome = Some(Some(format!("failed: {error}"))),
            _ => {}
        }
        if outcome.is_some() {
            break;
        }
    }
    handle.join_within(std::time::Duration::from_secs(30));
    Ok(outcome.unwrap_or_else(|| Some("the job ended without a final event".into())))
}

// ---------------------------------------------------------------------------------------------
// Collecting
// ---------------------------------------------------------------------------------------------

/// Mean, sample standard deviation (n - 1; None for one value), min and max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub std: Option<f64>,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// None for no values.
    pub fn of(values: &[f64]) -> Option<Stats> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = (n >= 2).then(|| {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        });
        Some(Stats {
            n,
            mean,
            std,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    /// `mean ± std (n=N)` with `prec` decimals; `mean (n=1)` for one value.
    pub fn format(&self, prec: usize) -> String {
        match self.std {
            Some(s) => format!("{:.prec$} ± {:.prec$} (n={})", self.mean, s, self.n),
            None => format!("{:.prec$} (n={})", self.mean, self.n),
        }
    }
}

/// Zero-shot accuracy of one run on one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct McScore {
    pub task: McTask,
    pub items: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// One variant: its model, its finished runs (in seed order) and their scores.
#[derive(Debug, Clone)]
pub struct VariantReport {
    pub name: String,
    pub model: ModelConfig,
    pub counts: ParamCount,
    pub total_params: usize,
    pub active_params: usize,
    pub runs: Vec<RunHistory>,
    /// Per task, one score per finished run (same order as `runs`).
    pub mc: Vec<(McTask, Vec<McScore>)>,
}

impl VariantReport {
    /// The last evaluation of each finished run.
    fn last_evals(&self) -> Vec<&crate::lab::history::EvalPoint> {
        self.runs.iter().filter_map(|r| r.evals.last()).collect()
    }
    pub fn val_loss(&self) -> Option<Stats> {
        Stats::of(
            &self
                .last_evals()
                .iter()
                .map(|e| e.val_loss)
                .collect::<Vec<_>>(),
        )
    }
    pub fn val_bpb(&self) -> Option<Stats> {
        Stats::of(
            &self
                .last_evals()
                .iter()
                .map(|e| e.val_bpb)
                .collect::<Vec<_>>(),
        )
    }
    pub fn val_acc(&self) -> Option<Stats> {
        Stats::of(
            &self
                .last_evals()
                .iter()
                .filter_map(|e| e.val_acc)
                .collect::<Vec<_>>(),
        )
    }
    /// Mean over runs of each run's training throughput (its last step's running average).
    pub fn tokens_per_s(&self) -> Option<f64> {
        Stats::of(
            &self
                .runs
                .iter()
                .filter_map(|r| r.steps.last().map(|p| p.tokens_per_s))
                .filter(|v| v.is_finite() && *v > 0.0)
                .collect::<Vec<_>>(),
        )
        .map(|s| s.mean)
    }
    /// Training tokens of the finished runs (min, max).
    pub fn tokens(&self) -> Option<(u64, u64)> {
        let t: Vec<u64> = self.runs.iter().map(|r| r.last_tokens()).collect();
        Some((*t.iter().min()?, *t.iter().max()?))
    }
    /// Validation loss of each run at its last evaluation with at most `tokens` tokens.
    fn val_loss_at(&self, tokens: u64) -> Option<Stats> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| r.evals.iter().rev().find(|e| e.tokens <= tokens))
            .map(|e| e.val_loss)
            .collect();
        Stats::of(&v)
    }
    /// Sparsified projections / MoE layers and their expert counts, e.g. `z ×5`.
    pub fn experts(&self) -> String {
        let m = &self.model;
        let mut parts = Vec::new();
        let has_mamba = m.layers().contains(&LayerKind::Mamba);
        if has_mamba && !m.sparsity.projections.is_empty() {
            let names: Vec<&str> = m.sparsity.projections.iter().map(|p| p.name()).collect();
            parts.push(format!("{} ×{}", names.join(","), m.sparsity.experts));
        }
        if m.layers().contains(&LayerKind::MoeMlp) {
            parts.push(format!("MoE MLP ×{}", m.moe_experts));
        }
        if parts.is_empty() {
            "–".into()
        } else {
            format!("{} (top-{})", parts.join(", "), m.sparsity.top_k)
        }
    }
    pub fn is_sparse(&self) -> bool {
        self.experts() != "–"
    }
}

/// A run the report does not use.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingRun {
    pub label: String,
    pub dir: PathBuf,
    pub reason: String,
}

/// Everything the report shows.
#[derive(Debug, Clone)]
pub struct Report {
    pub spec_path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// The spec file's text (before overrides).
    pub spec_text: String,
    pub overrides: Vec<String>,
    /// `runs_dir/<spec name>`.
    pub runs_dir: PathBuf,
    pub seeds: Vec<u64>,
    pub spec: ExperimentSpec,
    pub variants: Vec<VariantReport>,
    pub missing: Vec<MissingRun>,
    pub mc_tasks: Vec<McTask>,
}

/// Reads the runs of `spec` (resolved under `runs_dir`) and scores their checkpoints on the
/// multiple-choice tasks.
pub fn collect(
    spec: &ExperimentSpec,
    runs: &[RunSpec],
    runs_dir: &Path,
    overrides: &[String],
    mc_tasks: &[(McTask, PathBuf)],
) -> Result<Report> {
    let mc_items: Vec<(McTask, PathBuf, Vec<mc::McItem>)> = mc_tasks
        .iter()
        .map(|(t, f)| {
            let items = mc::load_items(*t, f)?;
            if items.is_empty() {
                bail!("{}: no items", f.display());
            }
            Ok((*t, f.clone(), items))
        })
        .collect::<Result<_>>()?;
    let mut variants = Vec::new();
    let mut missing = Vec::new();
    for (i, v) in spec.file.variants.iter().enumerate() {
        let model = spec.resolve_model(i).map_err(|e| anyhow!("{e}"))?;
        let counts = ParamCount::of(&model);
        let mut vr = VariantReport {
            name: v.name.clone(),
            total_params: counts.total(),
            active_params: counts.active(),
            model,
            counts,
            runs: Vec::new(),
            mc: mc_items.iter().map(|(t, _, _)| (*t, Vec::new())).collect(),
        };
        for run in runs.iter().filter(|r| r.variant == v.name) {
            match run_state(run) {
                RunState::Missing(reason) => missing.push(MissingRun {
                    label: run.label(),
                    dir: run.out_dir.clone(),
                    reason,
                }),
                RunState::Finished => {
                    let h = RunHistory::load(&run.out_dir).with_context(|| {
                        format!("reading {}", run.out_dir.join("metrics.jsonl").display())
                    })?;
                    for (k, (task, file, items)) in mc_items.iter().enumerate() {
                        let score = mc_score(run, *task, file, items)?;
                        vr.mc[k].1.push(score);
                    }
                    vr.runs.push(h);
                }
            }
        }
        // The real parameter counts of the trained models when there are some.
        if let Some(h) = vr.runs.iter().find(|h| h.total_params > 0) {
            vr.total_params = h.total_params;
            vr.active_params = h.active_params;
        }
        variants.push(vr);
    }
    Ok(Report {
        spec_path: spec.path.clone(),
        name: spec.name.clone(),
        description: spec.file.description.clone(),
        spec_text: std::fs::read_to_string(&spec.path).unwrap_or_default(),
        overrides: overrides.to_vec(),
        runs_dir: runs_dir.join(&spec.name),
        seeds: spec.file.seeds.clone(),
        spec: spec.clone(),
        variants,
        missing,
        mc_tasks: mc_items.iter().map(|(t, _, _)| *t).collect(),
    })
}

/// Cached next to the checkpoint, keyed on the task file and the checkpoint's weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct McCache {
    task: String,
    file: String,
    file_bytes: u64,
    weights_mtime: f64,
    items: usize,
    acc: f64,
    acc_norm: f64,
}

fn mtime(p: &Path) -> f64 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Scores one run's checkpoint (or reads the cached score).
fn mc_score(run: &RunSpec, task: McTask, file: &Path, items: &[mc::McItem]) -> Result<McScore> {
    let weights = run.out_dir.join("checkpoint").join("model.safetensors");
    let key = McCache {
        task: task.name().into(),
        file: file.display().to_string(),
        file_bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        weights_mtime: mtime(&weights),
        items: items.len(),
        acc: 0.0,
        acc_norm: 0.0,
    };
    let cache_path = run.out_dir.join(format!("mc-{}.json", task.name()));
    if let Some(c) = std::fs::read_to_string(&cache_path)
        .ok()
        .and_then(|t| serde_json::from_str::<McCache>(&t).ok())
    {
        let same = McCache {
            acc: 0.0,
            acc_norm: 0.0,
            ..c.clone()
        } == key;
        if same {
            return Ok(McScore {
                task,
                items: c.items,
                acc: c.acc,
                acc_norm: c.acc_norm,
            });
        }
    }
    let t0 = Instant::now();
    let model = mc::load_checkpoint_model(&run.out_dir, &run.device, "f32")
        .with_context(|| format!("{}: loading the checkpoint", run.label()))?;
    let r = mc::evaluate(&model, items)
        .with_context(|| format!("{}: {task} on {}", run.label(), file.display()))?;
    eprintln!(
        "  {task}: {} acc {:.4} acc_norm {:.4} ({} items, {:.1} s)",
        run.label(),
        r.acc,
        r.acc_norm,
        r.items,
        t0.elapsed().as_secs_f64()
    );
    let c = McCache {
        items: r.items,
        acc: r.acc,
        acc_norm: r.acc_norm,
        ..key
    };
    // A cache that cannot be written only costs a re-evaluation next time.
    let _ = std::fs::write(&cache_path, serde_json::to_string_pretty(&c)?);
    Ok(McScore {
        task,
        items: r.items,
        acc: r.acc,
        acc_norm: r.acc_norm,
    })
}

// ---------------------------------------------------------------------------------------------
// What it shows
// ---------------------------------------------------------------------------------------------

/// The comparison the report's paragraph states.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Tokens every compared run was trained on (the common count).
    pub tokens: u64,
    /// (variant, validation loss at `tokens`), lowest mean first.
    pub ranking: Vec<(String, Stats)>,
    /// Whether the final token counts differed (the comparison then uses `tokens`).
    pub unequal_tokens: bool,
}

impl Finding {
    /// Variants with at least one finished run, ranked by mean validation loss at the token
    /// count all of them reached. None when no run finished.
    pub fn of(variants: &[VariantReport]) -> Option<Finding> {
        let with_runs: Vec<&VariantReport> =
            variants.iter().filter(|v| !v.runs.is_empty()).collect();
        let ranges: Vec<(u64, u64)> = with_runs.iter().filter_map(|v| v.tokens()).collect();
        let tokens = ranges.iter().map(|r| r.0).min()?;
        let unequal_tokens = ranges.iter().any(|r| r.0 != tokens || r.1 != tokens);
        let mut ranking: Vec<(String, Stats)> = with_runs
            .iter()
            .filter_map(|v| v.val_loss_at(tokens).map(|s| (v.name.clone(), s)))
            .collect();
        ranking.sort_by(|a, b| a.1.mean.total_cmp(&b.1.mean));
        (!ranking.is_empty()).then_some(Finding {
            tokens,
            ranking,
            unequal_tokens,
        })
    }

    /// The best variant's lead is larger than the seed noise: gap > std_best + std_runner_up
    /// (sample standard deviations). None when there is no runner-up or either has one seed.
    pub fn gap_exceeds_spread(&self) -> Option<bool> {
        let [(_, a), (_, b), ..] = &self.ranking[..] else {
            return None;
        };
        Some(b.mean - a.mean > a.std? + b.std?)
    }

    /// The min-max ranges over seeds of the best two overlap.
    pub fn ranges_overlap(&self) -> Option<bool> {
        let [(_, a), (_, b), ..] = &self.ranking[..] else {
            return None;
        };
        Some(b.min <= a.max)
    }

    /// One paragraph in words.
    pub fn paragraph(&self) -> String {
        let f4 = |v: f64| format!("{v:.4}");
        let mut p = String::new();
        let (best, a) = &self.ranking[0];
        let _ = write!(
            p,
            "At {} training tokens, **{best}** has the lowest mean final validation loss \
             ({} nats/byte, n = {})",
            thousands(self.tokens),
            f4(a.mean),
            a.n
        );
        let Some((second, b)) = self.ranking.get(1) else {
            p.push_str("; it is the only variant with finished runs, so there is nothing to compare it with.");
            return p;
        };
        let gap = b.mean - a.mean;
        let _ = write!(
            p,
            ", ahead of the runner-up **{second}** ({}, n = {}) by {} nats/byte.",
            f4(b.mean),
            b.n,
            f4(gap)
        );
        match (a.std, b.std) {
            (Some(sa), Some(sb)) => {
                let overlap = b.min <= a.max;
                let exceeds = gap > sa + sb;
                // The second rule, joined by whether it agrees with the first.
                let overlap = match (exceeds, overlap) {
                    (true, false) => "and their min–max ranges over seeds do not overlap",
                    (true, true) => "although their min–max ranges over seeds overlap",
                    (false, true) => "and their min–max ranges over seeds overlap",
                    (false, false) => "although their min–max ranges over seeds do not overlap",
                };
                if exceeds {
                    let _ = write!(
                        p,
                        " The gap exceeds the seed spread: it is larger than the sum of the two \
                         sample standard deviations ({} > {} + {} = {}; rule: gap > std_a + std_b), \
                         {overlap}.",
                        f4(gap),
                        f4(sa),
                        f4(sb),
                        f4(sa + sb)
                    );
                } else {
                    let _ = write!(
                        p,
                        " The gap is within the seed spread: it is not larger than the sum of the \
                         two sample standard deviations ({} ≤ {} + {} = {}; rule: gap > std_a + \
                         std_b), {overlap}; more seeds or tokens are needed to separate them.",
                        f4(gap),
                        f4(sa),
                        f4(sb),
                        f4(sa + sb)
                    );
                }
            }
            _ => p.push_str(
                " With a single seed on one side there is no seed spread to judge the gap \
                 against (rule: gap > std_a + std_b needs two seeds or more each).",
            ),
        }
        if self.ranking.len() > 2 {
            let rest: Vec<String> = self.ranking[2..]
                .iter()
                .map(|(n, s)| format!("{n} {}", f4(s.mean)))
                .collect();
            let _ = write!(p, " Then: {}.", rest.join(", "));
        }
        if self.unequal_tokens {
            p.push_str(
                " The runs did not all reach the same number of tokens; each is compared at its \
                 last evaluation within the common count.",
            );
        }
        p
    }
}

/// Sentence on the validation accuracy (synthetic tasks), if any variant has one.
fn accuracy_sentence(variants: &[VariantReport]) -> Option<String> {
    let mut acc: Vec<(&str, Stats)> = variants
        .iter()
        .filter_map(|v| v.val_acc().map(|s| (v.name.as_str(), s)))
        .collect();
    acc.sort_by(|a, b| b.1.mean.total_cmp(&a.1.mean));
    let (best, s) = acc.first()?;
    let others: Vec<String> = acc[1..]
        .iter()
        .map(|(n, s)| format!("{n} {:.3}", s.mean))
        .collect();
    Some(format!(
        "The highest mean validation accuracy is **{best}**'s ({}){}.",
        s.format(3),
        if others.is_empty() {
            String::new()
        } else {
            format!(", then {}", others.join(", "))
        }
    ))
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Parameter groups of the breakdown (table and `params.png`), in stacking order.
const GROUPS: [&str; 6] = [
    "embedding",
    "mixer dense parts & norms",
    "experts (active)",
    "experts (inactive)",
    "routers",
    "MLP / attention",
];

/// Parameters per group (`GROUPS` order) of a count.
pub fn breakdown(c: &ParamCount) -> [f64; 6] {
    let mut g = [0.0; 6];
    for (name, (total, active)) in &c.components {
        let total = *total as f64;
        if name == "embedding" {
            g[0] += total;
        } else if name.starts_with("experts.") || name == "moe_mlp.experts" {
            g[2] += active;
            g[3] += total - active;
        } else if name.starts_with("router.") || name == "moe_mlp.router" {
            g[4] += total;
        } else if name == "mlp" || name == "attention" {
            g[5] += total;
        } else {
            g[1] += total;
        }
    }
    g
}

/// Writes `report.md` and the figures into `out`; returns the path of report.md.
pub fn write_report(report: &Report, out: &Path, command: &str, theme: &Theme) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let figures = write_figures(report, out, theme)?;
    let md = markdown(report, command, &figures);
    let path = out.join("report.md");
    crate::train::checkpoint::write_atomic(&path, md.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// (file name, caption) of each figure written.
fn write_figures(report: &Report, out: &Path, theme: &Theme) -> Result<Vec<(String, String)>> {
    let (width, height) = FIGURE_SIZE;
    let mut figures = Vec::new();
    let groups: Vec<SeedGroup> = report
        .variants
        .iter()
        .filter(|v| !v.runs.is_empty())
        .map(|v| SeedGroup {
            label: v.name.clone(),
            runs: v.runs.iter().collect(),
        })
        .collect();
    let seeds_note = if report.seeds.len() > 1 {
        " (mean over seeds, min–max band)"
    } else {
        ""
    };
    for (file, metric, smooth, what) in [
        ("loss.png", Metric::ValLoss, 0.0, "Validation loss"),
        (
            "train_loss.png",
            Metric::TrainLoss,
            0.9,
            "Training loss (EMA 0.9)",
        ),
    ] {
        let title = format!("{what} — {}{seeds_note}", report.name);
        let opts = ChartOptions {
            metric,
            x: XAxis::Tokens,
            smooth,
            log_y: false,
            x_range: None,
            width,
            height,
            title: Some(title.clone()),
        };
        write_seed_band_chart(&out.join(file), &groups, &opts, theme)
            .with_context(|| format!("writing {}", out.join(file).display()))?;
        figures.push((file.to_string(), title));
    }
    for v in report.variants.iter().filter(|v| v.is_sparse()) {
        let Some(run) = v
            .runs
            .iter()
            .find(|r| r.seed == 0)
            .or(v.runs.first())
            .filter(|r| !r.routing.is_empty())
        else {
            continue;
        };
        let file = format!("routing-{}.png", v.name);
        write_routing_heatmap(&out.join(&file), run, None, theme, width, height)
            .with_context(|| format!("writing {}", out.join(&file).display()))?;
        figures.push((
            file,
            format!(
                "Expert load of {} (seed {}, all routing snapshots)",
                v.name, run.seed
            ),
        ));
    }
    let title = format!("Parameters per component — {}", report.name);
    write_params_chart(
        &out.join("params.png"),
        report,
        &title,
        theme,
        (width, height),
    )
    .with_context(|| format!("writing {}", out.join("params.png").display()))?;
    figures.push(("params.png".into(), title));
    let series = sparsity_series(report);
    if !series.is_empty() {
        let title = format!("Sparsity vs validation loss — {}", report.name);
        let path = out.join("sparsity.png");
        write_sparsity_chart(&path, &series, &title, theme, (width, height))
            .with_context(|| format!("writing {}", path.display()))?;
        figures.push(("sparsity.png".into(), title));
    }
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// Pruning (issue 7): sparsity vs validation loss
// ---------------------------------------------------------------------------------------------

/// (variant, method, target, mean measured sparsity, val loss) of one pruned variant.
pub type PruningRow = (String, String, f64, Option<f64>, Option<Stats>);

/// One row per pruned variant.
pub fn pruning_rows(report: &Report) -> Vec<PruningRow> {
    report
        .spec
        .file
        .variants
        .iter()
        .zip(&report.variants)
        .filter_map(|(spec_v, v)| {
            let p = spec_v.prune.as_ref()?;
            let measured: Vec<f64> = v.runs.iter().filter_map(|r| r.last_sparsity()).collect();
            Some((
                v.name.clone(),
                p.method.name().to_string(),
                p.target,
                Stats::of(&measured).map(|s| s.mean),
                v.val_loss(),
            ))
        })
        .collect()
}

/// One series per (architecture, pruning method): the unpruned variant of the same model as
/// the 0 % point, then each pruned variant at its measured sparsity.
pub fn sparsity_series(report: &Report) -> Vec<SparsitySeries> {
    let spec_vs = &report.spec.file.variants;
    let mut out: Vec<(ModelConfig, String, SparsitySeries)> = Vec::new();
    for (spec_v, v) in spec_vs.iter().zip(&report.variants) {
        let Some(p) = &spec_v.prune else { continue };
        let (Some(loss), Some(sp)) = (
            v.val_loss(),
            Stats::of(
                &v.runs
                    .iter()
                    .filter_map(|r| r.last_sparsity())
                    .collect::<Vec<_>>(),
            ),
        ) else {
            continue;
        };
        let method = p.method.name().to_string();
        let idx = match out
            .iter()
            .position(|(m, k, _)| *m == v.model && *k == method)
        {
            Some(i) => i,
            None => {
                let dense = spec_vs
                    .iter()
                    .zip(&report.variants)
                    .find(|(sv, d)| sv.prune.is_none() && d.model == v.model);
                let arch = dense
                    .map(|(_, d)| d.name.clone())
                    .unwrap_or_else(|| v.experts());
                let mut points = Vec::new();
                if let Some(l) = dense.and_then(|(_, d)| d.val_loss()) {
                    points.push((0.0, l.mean));
                }
                out.push((
                    v.model.clone(),
                    method.clone(),
                    SparsitySeries {
                        label: format!("{arch} {method}"),
                        points,
                    },
                ));
                out.len() - 1
            }
        };
        out[idx].2.points.push((sp.mean, loss.mean));
    }
    out.into_iter().map(|(_, _, s)| s).collect()
}

fn markdown(r: &Report, command: &str, figures: &[(String, String)]) -> String {
    let mut m = String::new();
    let spec_file = r.spec_path.display();
    let _ = writeln!(m, "# Report: {}\n", r.name);
    if let Some(d) = &r.description {
        let _ = writeln!(m, "{d}\n");
    }
    let t = &r.spec.file.train;
    let tokens_per_run = t.steps * (t.batch_size * t.seq_len) as u64;
    let _ = writeln!(m, "- Spec: `{spec_file}`");
    if !r.overrides.is_empty() {
        let o: Vec<String> = r.overrides.iter().map(|o| format!("`{o}`")).collect();
        let _ = writeln!(m, "- Overrides: {}", o.join(", "));
    }
    let _ = writeln!(m, "- Produced by: `{command}`");
    let _ = writeln!(m, "- Runs: `{}`", r.runs_dir.display());
    let seeds: Vec<String> = r.seeds.iter().map(|s| s.to_string()).collect();
    let schedule = format!("{:?}", t.schedule).to_lowercase();
    let _ = writeln!(
        m,
        "- Training: {} steps x {} sequences x {} tokens = {} tokens per run, lr {}, {schedule} \
         schedule, seeds {}",
        t.steps,
        t.batch_size,
        t.seq_len,
        thousands(tokens_per_run),
        t.lr,
        seeds.join(", ")
    );
    let _ = writeln!(m, "- Data: `{}`", data_summary(&r.spec));
    let _ = writeln!(m);

    // The table.
    let has_acc = r.variants.iter().any(|v| v.val_acc().is_some());
    let mut head = vec![
        "variant",
        "layers",
        "experts",
        "total params",
        "active params",
        "tokens",
        "val loss (nats/byte)",
        "val bits/byte",
    ];
    if has_acc {
        head.push("val accuracy");
    }
    head.push("tokens/s");
    let mc_heads: Vec<String> = r
        .mc_tasks
        .iter()
        .flat_map(|t| [format!("{t} acc"), format!("{t} acc_norm")])
        .collect();
    let mut heads: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    heads.extend(mc_heads);
    if r.mc_tasks.len() > 1 {
        heads.push("mean acc".into());
    }
    let _ = writeln!(m, "## Results\n");
    let _ = writeln!(m, "| {} |", heads.join(" | "));
    let _ = writeln!(
        m,
        "|{}|",
        heads
            .iter()
            .enumerate()
            .map(|(i, _)| if i < 3 { "---" } else { "---:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    let dash = || "–".to_string();
    for v in &r.variants {
        let fmt = |s: Option<Stats>, p: usize| s.map(|s| s.format(p)).unwrap_or_else(dash);
        let tokens = match v.tokens() {
            Some((a, b)) if a == b => thousands(a),
            Some((a, b)) => format!("{}–{}", thousands(a), thousands(b)),
            None => dash(),
        };
        let mut row = vec![
            format!("**{}**", v.name),
            format!("`{}`", v.model.layer_pattern),
            v.experts(),
            thousands(v.total_params as u64),
            thousands(v.active_params as u64),
            tokens,
            fmt(v.val_loss(), 4),
            fmt(v.val_bpb(), 4),
        ];
        if has_acc {
            row.push(fmt(v.val_acc(), 3));
        }
        row.push(
            v.tokens_per_s()
                .map(|x| thousands(x.round() as u64))
                .unwrap_or_else(dash),
        );
        let mut accs = Vec::new();
        for (_, scores) in &v.mc {
            let acc = Stats::of(&scores.iter().map(|s| s.acc).collect::<Vec<_>>());
            let norm = Stats::of(&scores.iter().map(|s| s.acc_norm).collect::<Vec<_>>());
            if let Some(a) = acc {
                accs.push(a.mean);
            }
            row.push(fmt(acc, 4));
            row.push(fmt(norm, 4));
        }
        if r.mc_tasks.len() > 1 {
            row.push(if accs.len() == r.mc_tasks.len() {
                format!("{:.4}", accs.iter().sum::<f64>() / accs.len() as f64)
            } else {
                dash()
            });
        }
        let _ = writeln!(m, "| {} |", row.join(" | "));
    }
    let _ = writeln!(
        m,
        "\nLosses are the last evaluation of each run (validation split, {} batches), as \
         mean ± sample standard deviation over the seeds that finished (n). Active parameters \
         count top-k of E experts plus the routers. tokens/s is the mean over runs of each \
         run's average training throughput.",
        r.spec.file.train.eval_batches
    );
    if !r.mc_tasks.is_empty() {
        let _ = writeln!(
            m,
            "Zero-shot accuracies (acc, and acc_norm: per-character normalised) are scored on \
             each run's final checkpoint as lm-evaluation-harness scores multiple choice."
        );
    }
    let _ = writeln!(m);

    // Missing runs.
    if !r.missing.is_empty() {
        let _ = writeln!(m, "### Missing runs\n");
        let _ = writeln!(
            m,
            "{} of {} runs are not in the table:\n",
            r.missing.len(),
            r.missing.len() + r.variants.iter().map(|v| v.runs.len()).sum::<usize>()
        );
        for x in &r.missing {
            let _ = writeln!(m, "- missing: `{}` — {}", x.label, x.reason);
        }
        let _ = writeln!(m);
    }

    // What it shows.
    let _ = writeln!(m, "## What it shows\n");
    match Finding::of(&r.variants) {
        Some(f) => {
            let _ = write!(m, "{}", f.paragraph());
            if let Some(s) = accuracy_sentence(&r.variants) {
                let _ = write!(m, " {s}");
            }
            let _ = writeln!(m, "\n");
        }
        None => {
            let _ = writeln!(m, "No run has finished yet: nothing to compare.\n");
        }
    }

    // Parameters.
    let pruning = pruning_rows(r);
    if !pruning.is_empty() {
        let _ = writeln!(m, "## Pruning\n");
        let _ = writeln!(
            m,
            "| variant | method | target | measured sparsity | val loss (nats/byte) |"
        );
        let _ = writeln!(m, "|---|---|---:|---:|---:|");
        for (name, method, target, measured, loss) in &pruning {
            let _ = writeln!(
                m,
                "| {name} | {method} | {:.0}% | {} | {} |",
                target * 100.0,
                measured
                    .map(|v| format!("{:.2}%", v * 100.0))
                    .unwrap_or_else(|| "–".into()),
                loss.as_ref()
                    .map(|l| l.format(3))
                    .unwrap_or_else(|| "–".into())
            );
        }
        let _ = writeln!(
            m,
            "\nMeasured sparsity: pruned share of the prunable weights after the last pruning \
             step (mean over seeds).\n"
        );
    }
    let _ = writeln!(m, "## Parameters\n");
    let _ = writeln!(m, "| variant | {} | total | active |", GROUPS.join(" | "));
    let _ = writeln!(m, "|---|{}---:|---:|", "---:|".repeat(GROUPS.len()));
    for v in &r.variants {
        let g = breakdown(&v.counts);
        let cells: Vec<String> = g.iter().map(|x| thousands(x.round() as u64)).collect();
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            v.name,
            cells.join(" | "),
            thousands(v.counts.total() as u64),
            thousands(v.counts.active() as u64)
        );
    }
    let _ = writeln!(
        m,
        "\nFrom the closed-form counts (`moz-lab params {spec_file}` lists every component).\n"
    );

    // Figures.
    let _ = writeln!(m, "## Figures\n");
    for (file, caption) in figures {
        let _ = writeln!(m, "![{caption}]({file})\n");
    }

    // The spec itself.
    let _ = writeln!(m, "## Spec\n");
    let _ = writeln!(
        m,
        "<details><summary><code>{spec_file}</code></summary>\n\n```toml\n{}\n```\n\n</details>",
        r.spec_text.trim_end()
    );
    m
}

fn data_summary(spec: &ExperimentSpec) -> String {
    let text = toml::to_string(&spec.file.data).unwrap_or_default();
    let parts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    let s = parts.join(", ");
    if s.contains("kind = \"text\"") && !s.contains("path") {
        format!("{s} (the embedded tinyshakespeare)")
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// params.png
// ---------------------------------------------------------------------------------------------

/// `1.5M`, `250k`, `900`.
fn short_count(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if a >= 1e9 {
        format!("{}G", trim(format!("{:.2}", v / 1e9)))
    } else if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e3 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else {
        format!("{v:.0}")
    }
}

/// Stacked bars, one per variant: the parameter groups of `GROUPS`, inactive experts drawn
/// lighter; each bar labelled with its total and active counts; the legend in a column on the
/// right (top of the stack first), so it never covers a bar.
fn write_params_chart(
    path: &Path,
    report: &Report,
    title: &str,
    theme: &Theme,
    size: (u32, u32),
) -> Result<()> {
    let names: Vec<String> = report.variants.iter().map(|v| v.name.clone()).collect();
    let stacks: Vec<[f64; 6]> = report
        .variants
        .iter()
        .map(|v| breakdown(&v.counts))
        .collect();
    let totals: Vec<(f64, f64)> = report
        .variants
        .iter()
        .map(|v| (v.counts.total() as f64, v.counts.active() as f64))
        .collect();
    // Headroom above the tallest bar for its two label lines.
    let ymax = totals.iter().map(|t| t.0).fold(1.0, f64::max) * 1.15;
    let n = names.len().max(1);
    let colours: [Rgb; 6] = {
        let s = |i| theme.export_series(i);
        let experts = s(2);
        [
            s(0),
            s(1),
            experts,
            experts.lerp(theme.export.background, 0.6),
            s(3),
            s(4),
        ]
    };
    // Groups some variant has, in stacking order.
    let present: Vec<usize> = (0..GROUPS.len())
        .filter(|&g| stacks.iter().any(|st| st[g] > 0.0))
        .collect();
    write_png(path, size, |root: &Area| {
        let (w, h) = root.dim_in_pixel();
        let s = Scale::of(w, h);
        let fg = theme.export.foreground;
        root.fill(&color(theme.export.background))
            .map_err(draw_err)?;
        let root = root
            .margin(s.px(20.0, 6.0), 0, 0, 0)
            .titled(title, text_style(s.font(46.0), fg))
            .map_err(draw_err)?;
        let legend_w = s.px(420.0, 140.0);
        let (plot_area, legend_area) = root.split_horizontally(w.saturating_sub(legend_w));
        // Fixed ticks: the variants' bar centres, round counts.
        let x = Ticked::new(
            RangedCoordf64::from(-0.5..n as f64 - 0.5),
            (0..n).map(|i| i as f64).collect(),
        );
        let y = Ticked::new(RangedCoordf64::from(0.0..ymax), linear_ticks(0.0, ymax, 8));
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(s.px(30.0, 8.0))
            .x_label_area_size(s.px(80.0, 30.0))
            .y_label_area_size(s.px(120.0, 40.0))
            .build_cartesian_2d(x, y)
            .map_err(draw_err)?;
        let label_of = |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("parameters")
            .axis_desc_style(text_style(s.font(32.0), fg))
            .label_style(text_style(s.font(28.0), fg))
            .x_label_formatter(&label_of)
            .y_label_formatter(&|v| short_count(*v))
            .bold_line_style(color(theme.export.grid).stroke_width(s.px(1.5, 1.0)))
            .light_line_style(TRANSPARENT)
            .axis_style(color(fg).stroke_width(s.px(2.0, 1.0)))
            .set_all_tick_mark_size(s.px(8.0, 3.0))
            .draw()
            .map_err(draw_err)?;
        let half = 0.3;
        for &g in &present {
            let c = color(colours[g]);
            let rects: Vec<Rectangle<(f64, f64)>> = stacks
                .iter()
                .enumerate()
                .filter(|(_, st)| st[g] > 0.0)
                .map(|(i, st)| {
                    let lo: f64 = st[..g].iter().sum();
                    let x = i as f64;
                    Rectangle::new([(x - half, lo), (x + half, lo + st[g])], c.filled())
                })
                .collect();
            chart.draw_series(rects).map_err(draw_err)?;
        }
        // Two lines above each bar: its total, then its active count.
        let gap = s.px(10.0, 4.0) as i32;
        let line = s.font(26.0).round() as i32 + gap / 2;
        let style = text_style(s.font(26.0), fg).pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(totals.iter().enumerate().map(|(i, (t, a))| {
                EmptyElement::at((i as f64, *t))
                    + Text::new(
                        format!("{} total", short_count(*t)),
                        (0, -gap - line),
                        style.clone(),
                    )
                    + Text::new(
                        format!("{} active", short_count(*a)),
                        (0, -gap),
                        style.clone(),
                    )
            }))
            .map_err(draw_err)?;
        // The legend column.
        let sw = s.px(28.0, 12.0) as i32;
        let row = s.px(46.0, 16.0) as i32;
        let x0 = s.px(10.0, 4.0) as i32;
        let top = s.px(60.0, 20.0) as i32;
        let label = text_style(s.font(26.0), fg).pos(Pos::new(HPos::Left, VPos::Center));
        for (k, &g) in present.iter().rev().enumerate() {
            let y = top + k as i32 * row;
            legend_area
                .draw(&Rectangle::new(
                    [(x0, y - sw / 2), (x0 + sw, y + sw / 2)],
                    color(colours[g]).filled(),
                ))
                .map_err(draw_err)?;
            legend_area
                .draw(&Text::new(GROUPS[g], (x0 + sw + x0, y), label.clone()))
                .map_err(draw_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_the_sample_std() {
        let s = Stats::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.mean, 2.5);
        assert!((s.std.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.n), (1.0, 4.0, 4));
        assert_eq!(Stats::of(&[2.0]).unwrap().std, None);
        assert!(Stats::of(&[]).is_none());
        assert_eq!(Stats::of(&[2.0]).unwrap().format(2), "2.00 (n=1)");
    }

    #[test]
    fn counts_are_grouped_and_formatted() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(short_count(1_500_000.0), "1.5M");
        assert_eq!(short_count(250_000.0), "250k");
        assert_eq!(short_count(0.0), "0");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("model.d_model=16"), "model.d_model=16");
        assert_eq!(shell_quote("seeds=[0,1]"), "'seeds=[0,1]'");
    }

    #[test]
    fn mc_arguments_parse() {
        let (t, f) = parse_mc("arc=data/arc.jsonl").unwrap();
        assert_eq!((t, f), (McTask::Arc, PathBuf::from("data/arc.jsonl")));
        assert!(parse_mc("arc").is_err());
        assert!(parse_mc("mmlu=x.jsonl").is_err());
    }
}
