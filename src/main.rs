//! `moz-lab`: the headless command line of the lab.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moz_lab::bench;
use moz_lab::device;
use moz_lab::lab::jobs::RunEvent;
use moz_lab::lab::runner::spawn_run;
use moz_lab::lab::spec::{ExperimentSpec, RunSpec};
use moz_lab::model::count::ParamCount;
use moz_lab::model::MambaLm;
use moz_lab::train::{checkpoint, eval::text_nll};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Training allocates and frees tensors of megabytes in every op. By default glibc serves those
/// with mmap and unmaps them on free, so every reuse page-faults and the kernel zeroes the
/// pages again (a quarter of a CPU training step). Keep them in the heap instead.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[derive(Parser)]
#[command(
    name = "moz-lab",
    version,
    about = "Sparsification experiments on Mamba language models"
)]
struct Cli {
    /// No subcommand: the interactive lab (same as `moz-lab lab`).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train the variants of an experiment spec (one run after another), with progress and a final table.
    Run {
        spec: PathBuf,
        /// Only these variants (repeatable).
        #[arg(long = "variant")]
        variants: Vec<String>,
        /// Override train.steps.
        #[arg(long)]
        steps: Option<u64>,
        /// cpu | cuda:N | auto (overrides the spec).
        #[arg(long)]
        device: Option<String>,
        /// Override any spec field: --set model.d_model=512 (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Continue from each run's checkpoint when there is one.
        #[arg(long)]
        resume: bool,
        /// Where runs are stored.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        /// No progress bar (for logs and CI).
        #[arg(long)]
        quiet: bool,
    },
    /// Total and active parameters per variant and per component.
    Params {
        spec: PathBuf,
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// Mean NLL (nats/byte) and bits per byte of a text under a checkpoint.
    Eval {
        /// A checkpoint directory or a run directory containing checkpoint/.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 | f64.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Zero-shot multiple choice (ARC, HellaSwag, SIQA) as lm-evaluation-harness scores it: acc and acc_norm.
    EvalMc(moz_lab::train::mc::EvalMcArgs),
    /// Training throughput (forward + backward + AdamW) of a benchmark config.
    Bench {
        /// lab-small (the engine issue's benchmark config) or tiny.
        #[arg(long, default_value = "lab-small")]
        config: String,
        /// Comma-separated variants: dense, moz, mol, mol-except-z.
        #[arg(long, default_value = "dense,moz")]
        variants: String,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Also measure the dense matmul ceiling of the dtype and report MFU against it.
        #[arg(long)]
        ceiling: bool,
        /// Comma-separated sequence lengths, timed at the config's tokens per batch (first
        /// variant only), e.g. 512,1024,2048,4096,8192.
        #[arg(long, default_value = "")]
        seq_sweep: String,
    },
    /// PNG figures: loss curves of runs (or every run of an experiment folder), or --routing
    /// for one run's expert-load heatmap.
    Plot(moz_lab::plot::cli::PlotArgs),
    /// Train what a spec's runs are missing, then write reports/<spec>/report.md: mean ± std over
    /// seeds per variant, what the numbers show, loss / routing / parameter figures.
    Report(moz_lab::lab::report::ReportArgs),
    /// The interactive lab (the default): specs, variant editor, runs, live charts, routing.
    Lab(LabArgs),
    /// Frame time of the lab's dashboard (loss chart of many live runs), rendered off-screen.
    BenchTui {
        #[arg(long, default_value_t = 8)]
        runs: usize,
        #[arg(long, default_value_t = 10_000)]
        points: u64,
        #[arg(long, default_value_t = 200)]
        width: u16,
        #[arg(long, default_value_t = 50)]
        height: u16,
        #[arg(long, default_value_t = 200)]
        frames: usize,
    },
}

#[derive(Parser)]
struct LabArgs {
    /// Folder of experiment specs (*.toml), watched for changes.
    #[arg(long, default_value = "experiments")]
    experiments: PathBuf,
    /// Where runs are stored (earlier runs there are loaded at start).
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Folder of colour themes (*.toml), watched for changes.
    #[arg(long, default_value = "themes")]
    themes: PathBuf,
    /// Theme to start with: dark, light, high-contrast, colorblind or one from --themes.
    #[arg(long)]
    theme: Option<String>,
    /// Concurrent CPU runs (each GPU trains one run at a time besides).
    #[arg(long, default_value_t = 1)]
    max_jobs: usize,
    /// Where the export key writes PNG files.
    #[arg(long, default_value = "exports")]
    exports: PathBuf,
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or_else(|| {
        // Without a subcommand clap fills no defaults: parse them as `lab` would.
        Command::Lab(LabArgs::parse_from(["lab"]))
    });
    if matches!(command, Command::Params { .. } | Command::Eval { .. }) {
        // Print-only commands end quietly when their reader does (`moz-lab params | head`),
        // as Unix tools do, instead of panicking on a broken pipe. Training commands keep Rust's
        // default so a closed pipe cannot kill a run before it writes its checkpoint.
        restore_sigpipe();
    }
    let result = match command {
        Command::Run {
            spec,
            variants,
            steps,
            device,
            mut sets,
            resume,
            runs_dir,
            quiet,
        } => {
            if let Some(s) = steps {
                sets.push(format!("train.steps={s}"));
            }
            if let Some(d) = device {
                sets.push(format!("device=\"{d}\""));
            }
            cmd_run(&spec, &variants, &sets, resume, &runs_dir, quiet)
        }
        Command::Params { spec, sets } => cmd_params(&spec, &sets),
        Command::Eval {
            checkpoint,
            text,
            seq_len,
            batch,
            device,
            dtype,
        } => cmd_eval(&checkpoint, &text, seq_len, batch, &device, &dtype),
        Command::EvalMc(args) => moz_lab::train::mc::run_cli(&args),
        Command::Bench {
            config,
            variants,
            steps,
            warmup,
            device,
            dtype,
            ceiling,
            seq_sweep,
        } => bench::run(
            &config, &variants, steps, warmup, &device, &dtype, ceiling, &seq_sweep,
        ),
        Command::Plot(args) => moz_lab::plot::cli::run(&args),
        Command::Report(args) => moz_lab::lab::report::run(&args),
        Command::Lab(args) => moz_lab::tui::run(moz_lab::tui::LabConfig {
            experiments_dir: args.experiments,
            runs_dir: args.runs_dir,
            themes_dir: args.themes,
            exports_dir: args.exports,
            theme: args.theme,
            max_jobs: args.max_jobs,
        }),
        Command::BenchTui {
            runs,
            points,
            width,
            height,
            frames,
        } => {
            moz_lab::tui::bench::run(width, height, runs, points, frames);
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(unix)]
fn restore_sigpipe() {
    // SAFETY: resetting a signal disposition to its default before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}

fn load_spec(path: &Path, sets: &[String]) -> Result<ExperimentSpec> {
    // SpecError's Display already names file:line:col and the field.
    ExperimentSpec::load_with(path, sets).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Summary of one finished run for the final table.
struct RunSummary {
    label: String,
    total: usize,
    active: usize,
    step: u64,
    tokens: u64,
    train_loss: Option<f64>,
    val_loss: Option<f64>,
    val_bpb: Option<f64>,
    tokens_per_s: Option<f64>,
    /// Bytes of GPU memory in use at the last step (GPU runs).
    gpu_mem: Option<u64>,
    status: String,
}

fn cmd_run(
    spec_path: &Path,
    variants: &[String],
    sets: &[String],
    resume: bool,
    runs_dir: &Path,
    quiet: bool,
) -> Result<()> {
    let spec = load_spec(spec_path, sets)?;
    for v in variants {
        if !spec.file.variants.iter().any(|x| &x.name == v) {
            let names: Vec<&str> = spec.file.variants.iter().map(|x| x.name.as_str()).collect();
            bail!(
                "{}: no variant named {v:?}; the spec has: {}",
                spec_path.display(),
                names.join(", ")
            );
        }
    }
    // An unusable device (cuda in a CPU-only build, a missing GPU) stops here, before any run.
    device::resolve(&spec.file.device)
        .map_err(|e| anyhow::anyhow!("{}: device: {e:#}", spec_path.display()))?;
    let runs: Vec<RunSpec> = spec
        .runs(runs_dir)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into_iter()
        .filter(|r| variants.is_empty() || variants.contains(&r.variant))
        .collect();
    let mut summaries = Vec::new();
    // CPU runs share candle's rayon pool, so the headless runner trains one run at a time.
    for (job, run) in runs.into_iter().enumerate() {
        summaries.push(run_one(job, run, resume, quiet)?);
    }
    print_table(&summaries);
    if summaries.iter().any(|s| s.status.starts_with("failed")) {
        bail!("some runs failed");
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when the bar is hidden (stderr not a terminal,
/// or --quiet), where indicatif would drop it.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn run_one(job: usize, run: RunSpec, resume: bool, quiet: bool) -> Result<RunSummary> {
    let (tx, rx) = mpsc::channel();
    let label = run.label();
    let steps = run.train.steps;
    let handle = spawn_run(job, run, resume, tx)?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_prefix(label.clone());
    let mut s = RunSummary {
        label: label.clone(),
        total: 0,
        active: 0,
        step: 0,
        tokens: 0,
        train_loss: None,
        val_loss: None,
        val_bpb: None,
        tokens_per_s: None,
        gpu_mem: None,
        status: "running".into(),
    };
    let mut recent: Vec<f64> = Vec::new();
    for msg in rx.iter() {
        match msg.event {
            RunEvent::Started {
                total_params,
                active_params,
                device,
                resumed_from,
                ..
            } => {
                s.total = total_params;
                s.active = active_params;
                if let Some(k) = resumed_from {
                    bar.set_position(k);
                }
                say(&bar, format!("{label}: started on {device}"));
            }
            RunEvent::Step {
                step,
                tokens,
                loss,
                tokens_per_s,
                gpu_mem,
                ..
            } => {
                s.step = step;
                s.tokens = tokens;
                s.tokens_per_s = Some(tokens_per_s);
                s.gpu_mem = gpu_mem.or(s.gpu_mem);
                recent.push(loss);
                if recent.len() > 20 {
                    recent.remove(0);
                }
                bar.set_position(step);
                let val = s
                    .val_loss
                    .map(|v| format!(" val {v:.4}"))
                    .unwrap_or_default();
                let mem = s
                    .gpu_mem
                    .map(|b| format!(" gpu {}", gb(b)))
                    .unwrap_or_default();
                bar.set_message(format!("loss {loss:.4}{val} {tokens_per_s:.0} tok/s{mem}"));
                if quiet && step % 50 == 0 {
                    eprintln!("{label} step {step} loss {loss:.4}{val}");
                }
            }
            RunEvent::Eval {
                val_loss, val_bpb, ..
            } => {
                s.val_loss = Some(val_loss);
                s.val_bpb = Some(val_bpb);
            }
            RunEvent::Finished { .. } => s.status = "done".into(),
            RunEvent::Stopped { .. } => s.status = "stopped".into(),
            RunEvent::Diverged { detail, .. } => {
                say(&bar, format!("{label}: diverged: {detail}"));
                s.status = "diverged".into();
            }
            RunEvent::Failed { error, .. } => {
                say(&bar, format!("{label}: failed: {error}"));
                s.status = format!("failed: {error}");
            }
            _ => {}
        }
        if s.status != "running" {
            break;
        }
    }
    bar.finish_and_clear();
    if !handle.join_within(std::time::Duration::from_secs(30)) {
        eprintln!(
            "{label}: warning: the run ended but its thread did not exit within 30 s; going on"
        );
    }
    if !recent.is_empty() {
        s.train_loss = Some(recent.iter().sum::<f64>() / recent.len() as f64);
    }
    Ok(s)
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// Bytes as GB (10^9) with one decimal ("12.3G"), as the TUI's runs table.
fn gb(b: u64) -> String {
    format!("{:.1}G", b as f64 / 1e9)
}

fn print_table(rows: &[RunSummary]) {
    println!(
        "{:<28} {:>11} {:>11} {:>6} {:>10} {:>10} {:>9} {:>8} {:>9} {:>7}  status",
        "run",
        "total",
        "active",
        "step",
        "tokens",
        "train(20)",
        "val_loss",
        "val_bpb",
        "tok/s",
        "gpu_mem"
    );
    for r in rows {
        let status = if r.status.len() > 40 {
            &r.status[..40]
        } else {
            &r.status
        };
        println!(
            "{:<28} {:>11} {:>11} {:>6} {:>10} {:>10} {:>9} {:>8} {:>9} {:>7}  {}",
            r.label,
            r.total,
            r.active,
            r.step,
            r.tokens,
            fmt_opt(r.train_loss, 4),
            fmt_opt(r.val_loss, 4),
            fmt_opt(r.val_bpb, 4),
            fmt_opt(r.tokens_per_s, 0),
            r.gpu_mem.map(gb).unwrap_or_else(|| "-".into()),
            status
        );
    }
}

fn cmd_params(spec_path: &Path, sets: &[String]) -> Result<()> {
    let spec = load_spec(spec_path, sets)?;
    let mut dense_total = None;
    println!(
        "{:<20} {:<16} {:>7} {:>12} {:>12} {:>8} {:>8}",
        "variant", "sparsified", "experts", "total", "active", "total/x", "active/x"
    );
    let mut rows = Vec::new();
    for i in 0..spec.file.variants.len() {
        let cfg = spec.resolve_model(i).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut dense_cfg = cfg.clone();
        dense_cfg.sparsity.projections.clear();
        let dense = ParamCount::of(&dense_cfg).total();
        dense_total.get_or_insert(dense);
        let c = ParamCount::of(&cfg);
        let sparsified: Vec<&str> = cfg.sparsity.projections.iter().map(|p| p.name()).collect();
        println!(
            "{:<20} {:<16} {:>7} {:>12} {:>12} {:>8.3} {:>8.3}",
            spec.file.variants[i].name,
            if sparsified.is_empty() {
                "-".to_string()
            } else {
                sparsified.join(",")
            },
            if sparsified.is_empty() {
                "-".to_string()
            } else {
                cfg.sparsity.experts.to_string()
            },
            c.total(),
            c.active(),
            c.total() as f64 / dense as f64,
            c.active() as f64 / dense as f64,
        );
        rows.push((spec.file.variants[i].name.clone(), c));
    }
    println!("\n(x = the same model with no sparsified projection; active counts top_k of E experts plus routers)");
    for (name, c) in rows {
        println!("\n{name}:");
        for (comp, (total, active)) in &c.components {
            println!("  {comp:<26} {total:>12} {:>12}", active.round() as usize);
        }
    }
    Ok(())
}

fn cmd_eval(
    ckpt: &Path,
    text: &PathBuf,
    seq_len: usize,
    batch: usize,
    dev: &str,
    dtype: &str,
) -> Result<()> {
    let dir = checkpoint::resolve_dir(ckpt)?;
    let cfg = checkpoint::read_config(&dir)?;
    let dev = device::resolve(dev)?;
    let model = MambaLm::new(&cfg, &dev, device::dtype_of(dtype)?, 0)?;
    model
        .store
        .load_safetensors(&dir.join("model.safetensors"))?;
    let bytes = std::fs::read(text).with_context(|| format!("reading {}", text.display()))?;
    let (nll, n) = text_nll(&model, &bytes, seq_len, batch)?;
    println!(
        "nll_nats_per_byte {nll:.6} bits_per_byte {:.6} bytes {n}",
        nll / std::f64::consts::LN_2
    );
    Ok(())
}
