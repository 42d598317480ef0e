//! The training job body: builds a `Trainer` from a `RunSpec`, steps it, and publishes
//! events. Used by the headless `moz-lab run` and (later) the TUI's job queue alike.
use super::jobs::{spawn_job, Directive, JobContext, JobHandle, RunEvent, RunMessage};
use super::spec::RunSpec;
use crate::train::checkpoint::write_atomic;
use crate::train::Trainer;
use crate::{data, device};
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Instant;

/// Starts `run` on a background thread.
pub fn spawn_run(
    job: usize,
    run: RunSpec,
    resume: bool,
    tx: Sender<RunMessage>,
) -> Result<JobHandle> {
    std::fs::create_dir_all(&run.out_dir)
        .with_context(|| format!("creating {}", run.out_dir.display()))?;
    let log = run.out_dir.join("metrics.jsonl");
    if !resume && log.exists() {
        // A fresh run replaces the previous run's stream.
        std::fs::remove_file(&log)?;
    }
    Ok(spawn_job(job, tx, Some(log), move |ctx| {
        train_run(&run, ctx, resume)
    }))
}

/// Keeps only the events a resumed run has not yet redone (step <= the checkpoint's).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<super::jobs::LoggedEvent>(l)
                .map(|e| {
                    !e.event.is_terminal() && e.event.step().map(|s| s <= step).unwrap_or(true)
                })
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

pub fn train_run(run: &RunSpec, ctx: &mut JobContext, resume: bool) -> Result<()> {
    crate::trace(|| format!("{}: resolving device {}", run.label(), run.device));
    let dev = device::resolve(&run.device)?;
    // GPU memory that tensors free stays in CUDA's stream-ordered pool until the device
    // synchronises, and allocations outside the pool (a kernel module's first load, cuBLAS
    // workspace) cannot use it: after a run that ran out of memory the next one failed so. The
    // run's tensors are all dropped when `train_on` returns, failed or not.
    device::release_freed(&dev)?;
    let outcome = train_on(run, ctx, resume, &dev);
    let released = device::release_freed(&dev);
    outcome.and(released)
}

fn train_on(run: &RunSpec, ctx: &mut JobContext, resume: bool, dev: &Device) -> Result<()> {
    let dev = dev.clone();
    let dtype = device::dtype_of(&run.dtype)?;
    let out = &run.out_dir;
    std::fs::create_dir_all(out)?;
    write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(run)?.as_bytes(),
    )?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&run.model)?.as_bytes(),
    )?;
    let source = data::build(&run.data, &run.data_base, run.train.seq_len)?;
    let report_accuracy = !matches!(run.data, data::DataConfig::Text { .. });
    crate::trace(|| format!("{}: building the model", run.label()));
    let mut trainer = Trainer::new(
        &run.model,
        &run.train,
        source,
        report_accuracy,
        run.seed,
        &dev,
        dtype,
    )?;
    if let Some(p) = &run.prune {
        trainer.enable_pruning(p);
    }
    let ckpt_dir = out.join("checkpoint");
    let mut resumed_from = None;
    if resume && ckpt_dir.join("state.json").exists() {
        trainer.load_checkpoint(&ckpt_dir)?;
        resumed_from = Some(trainer.step);
        let log = out.join("metrics.jsonl");
        truncate_metrics(&log, trainer.step)?;
        ctx.log_to(&log)?;
    }
    let cfg = run.train.clone();
    let tokens_per_step = (cfg.batch_size * cfg.seq_len) as u64;
    ctx.emit(RunEvent::Started {
        run: run.label(),
        variant: run.variant.clone(),
        seed: run.seed,
        device: device::describe(&dev),
        total_params: trainer.model.store.total_params(),
        active_params: trainer.model.store.active_params(),
        steps: cfg.steps,
        tokens_per_step,
        resumed_from,
    });
    let t0 = Instant::now();
    let elapsed = |before: f64| before + t0.elapsed().as_secs_f64();
    let session_start_tokens = trainer.tokens;
    let mut last_val = None;
    while trainer.step < cfg.steps {
        let step_now = trainer.step;
        let control = ctx.control.clone();
        let directive = control.wait(|paused| {
            ctx.emit(if paused {
                RunEvent::Paused { step: step_now }
            } else {
                RunEvent::Resumed { step: step_now }
            })
        });
        if directive == Directive::Stop {
            trainer.save_checkpoint(&ckpt_dir, elapsed(trainer.elapsed_before))?;
            ctx.emit(RunEvent::Checkpoint {
                step: trainer.step,
                path: ckpt_dir.display().to_string(),
            });
            ctx.emit(RunEvent::Stopped { step: trainer.step });
            return Ok(());
        }
        let r = trainer.train_step().inspect_err(|e| {
            crate::trace(|| format!("step failed: {e:#}; dropping the run's tensors"))
        })?;
        if !(r.loss.is_finite() && r.aux_loss.is_finite() && r.grad_norm.is_finite()) {
            ctx.emit(RunEvent::Diverged {
                step: step_now,
                detail: format!(
                    "non-finite value at step {step_now}: loss {}, aux loss {}, grad norm {}",
                    r.loss, r.aux_loss, r.grad_norm
                ),
            });
            return Ok(());
        }
        if let Some(report) = r.sparsity.clone() {
            // The masks were set before this step, after `step_now` completed steps.
            ctx.emit(sparsity_event(step_now, report));
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        ctx.emit(RunEvent::Step {
            step: r.step,
            tokens: r.tokens,
            loss: r.loss,
            aux_loss: r.aux_loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens_per_s: (trainer.tokens - session_start_tokens) as f64 / secs,
            elapsed_s: elapsed(trainer.elapsed_before),
            gpu_mem: device::gpu_memory_used(&dev),
        });
        if !r.routing.is_empty() && (r.step % cfg.routing_interval == 0 || r.step == cfg.steps) {
            ctx.emit(RunEvent::Routing {
                step: r.step,
                loads: r.routing.clone(),
            });
        }
        if r.step % cfg.eval_interval == 0 || r.step == cfg.steps {
            let ev = trainer.evaluate()?;
            last_val = Some(ev.loss);
            ctx.emit(RunEvent::Eval {
                step: r.step,
                tokens: r.tokens,
                val_loss: ev.loss,
                val_bpb: ev.bpb,
                val_acc: ev.accuracy,
                elapsed_s: elapsed(trainer.elapsed_before),
            });
        }
        let periodic = cfg.checkpoint_interval > 0 && r.step % cfg.checkpoint_interval == 0;
        if periodic || r.step == cfg.steps {
            trainer.save_checkpoint(&ckpt_dir, elapsed(trainer.elapsed_before))?;
            ctx.emit(RunEvent::Checkpoint {
                step: r.step,
                path: ckpt_dir.display().to_string(),
            });
        }
    }
    ctx.emit(RunEvent::Finished {
        step: trainer.step,
        tokens: trainer.tokens,
        val_loss: last_val,
        elapsed_s: elapsed(trainer.elapsed_before),
    });
    Ok(())
}

fn sparsity_event(step: u64, r: crate::prune::SparsityReport) -> RunEvent {
    RunEvent::Sparsity {
        step,
        target: r.target,
        sparsity: r.sparsity,
        model_sparsity: r.model_sparsity,
        components: r.components,
    }
}
