//! Training behaviour end to end on tiny models: the loss falls, resume is exact, a diverging
//! run and a panicking job are reported, checkpoints use the documented names.
mod common;

use common::{run_to_end, step_losses};
use moz_lab::lab::jobs::{read_metrics, spawn_job, RunEvent, RunMessage};
use moz_lab::lab::runner::spawn_run;
use moz_lab::lab::spec::{ExperimentSpec, RunSpec};
use std::path::Path;
use std::sync::mpsc;

fn spec_text(steps: u64, lr: f64, extra_variant: &str) -> String {
    format!(
        r#"
seeds = [3]
device = "cpu"
[model]
d_model = 32
n_layer = 2
headdim = 16
d_state = 8
chunk_size = 16
[train]
steps = {steps}
batch_size = 4
seq_len = 40
lr = {lr}
warmup_steps = 5
grad_clip = 1.0
eval_interval = 10
eval_batches = 2
routing_interval = 5
[[variants]]
name = "moz"
preset = "moz"
experts = 3
{extra_variant}
"#
    )
}

fn runs(text: &str, root: &Path) -> Vec<RunSpec> {
    let path = root.join("t.toml");
    std::fs::write(&path, text).unwrap();
    ExperimentSpec::load(&path)
        .unwrap()
        .runs(&root.join("runs"))
        .unwrap()
}

#[test]
fn loss_falls_and_events_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let run = runs(&spec_text(60, 3e-3, ""), dir.path()).remove(0);
    let out = run.out_dir.clone();
    let events = run_to_end(run, false);
    assert!(
        matches!(events.last(), Some(RunEvent::Finished { step: 60, .. })),
        "{:?}",
        events.last()
    );
    let losses = step_losses(&events);
    let first: f64 = losses[..5].iter().map(|l| l.1).sum::<f64>() / 5.0;
    let last: f64 = losses[55..].iter().map(|l| l.1).sum::<f64>() / 5.0;
    assert!(last < first - 1.0, "loss {first} -> {last}");
    let evals: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Eval { val_loss, .. } => Some(*val_loss),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 6);
    assert!(evals[5] < evals[0]);
    // Routing loads: one entry per MoZ layer, counts summing to the batch's tokens.
    let routing = events.iter().find_map(|e| match e {
        RunEvent::Routing { loads, .. } => Some(loads.clone()),
        _ => None,
    });
    let loads = routing.expect("routing events");
    assert_eq!(loads.len(), 2);
    assert!(loads
        .iter()
        .all(|l| l.module == "z" && l.counts.len() == 3 && l.counts.iter().sum::<usize>() == 160));
    // metrics.jsonl holds the same stream.
    let logged = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let logged: Vec<RunEvent> = logged.into_iter().map(|l| l.event).collect();
    assert!(
        logged == events,
        "metrics.jsonl differs from the event stream"
    );
    // Checkpoint with mamba_ssm names and sparsified z.
    let ck = out.join("checkpoint");
    let tensors =
        candle_core::safetensors::load(ck.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for name in [
        "backbone.embedding.weight",
        "backbone.layers.0.norm.weight",
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.0.mixer.conv1d.weight",
        "backbone.layers.0.mixer.conv1d.bias",
        "backbone.layers.0.mixer.dt_bias",
        "backbone.layers.0.mixer.A_log",
        "backbone.layers.0.mixer.D",
        "backbone.layers.0.mixer.norm.weight",
        "backbone.layers.0.mixer.out_proj.weight",
        "backbone.layers.1.mixer.z_proj.router.weight",
        "backbone.layers.1.mixer.z_proj.experts.2.weight",
        "backbone.norm_f.weight",
    ] {
        assert!(tensors.contains_key(name), "missing {name}");
    }
    // in_proj keeps x, B, C, dt: 64 + 8 + 8 + 4 rows.
    assert_eq!(
        tensors["backbone.layers.0.mixer.in_proj.weight"].dims(),
        &[84, 32]
    );
    assert!(ck.join("config.json").exists() && out.join("config.json").exists());
}

#[test]
fn same_spec_twice_gives_identical_curves() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = step_losses(&run_to_end(
        runs(&spec_text(12, 3e-3, ""), d1.path()).remove(0),
        false,
    ));
    let b = step_losses(&run_to_end(
        runs(&spec_text(12, 3e-3, ""), d2.path()).remove(0),
        false,
    ));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b);
}

#[test]
fn resume_continues_with_exactly_the_uninterrupted_losses() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = step_losses(&run_to_end(
        runs(&spec_text(24, 3e-3, ""), full_dir.path()).remove(0),
        false,
    ));

    // Interrupted: the same run stopped at step 10 by its control handle, then resumed.
    let dir = tempfile::tempdir().unwrap();
    let run = runs(&spec_text(24, 3e-3, ""), dir.path()).remove(0);
    let (tx, rx) = mpsc::channel();
    let h = spawn_run(0, run.clone(), false, tx).unwrap();
    let mut first = Vec::new();
    for m in rx.iter() {
        if let RunEvent::Step { step: 10, .. } = m.event {
            h.control.stop();
        }
        let done = m.event.is_terminal();
        first.push(m.event);
        if done {
            break;
        }
    }
    h.join();
    assert!(
        matches!(first.last(), Some(RunEvent::Stopped { .. })),
        "{:?}",
        first.last()
    );
    let stopped_at = first.last().unwrap().step().unwrap();
    assert!((10..24).contains(&stopped_at));
    let second = run_to_end(run.clone(), true);
    assert!(
        matches!(second[0], RunEvent::Started { resumed_from: Some(s), .. } if s == stopped_at)
    );
    let mut joined = step_losses(&first);
    joined.extend(step_losses(&second));
    assert_eq!(joined, full, "resumed curve differs");
    // The stored stream of the resumed run has each step exactly once.
    let logged = read_metrics(&run.out_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = logged
        .iter()
        .filter_map(|l| match l.event {
            RunEvent::Step { step, .. } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, (1..=24).collect::<Vec<_>>());
}

#[test]
fn diverging_run_is_reported_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let text = spec_text(200, 1e6, "")
        .replace("grad_clip = 1.0", "grad_clip = 0.0")
        .replace("warmup_steps = 5", "warmup_steps = 0");
    let events = run_to_end(runs(&text, dir.path()).remove(0), false);
    match events.last() {
        Some(RunEvent::Diverged { step, detail }) => {
            assert!(*step < 200);
            assert!(detail.contains("non-finite"), "{detail}");
        }
        other => panic!("expected a diverged event, got {other:?}"),
    }
}

#[test]
fn a_panicking_job_becomes_a_failed_event() {
    let (tx, rx) = mpsc::channel::<RunMessage>();
    let h = spawn_job(7, tx.clone(), None, |ctx| {
        ctx.emit(RunEvent::Paused { step: 3 });
        panic!("boom in the job");
    });
    let h2 = spawn_job(8, tx, None, |_| anyhow::bail!("a plain error"));
    let mut got: Vec<RunMessage> = rx.iter().take(3).collect();
    h.join();
    h2.join();
    got.sort_by_key(|m| (m.job, m.event.is_terminal()));
    assert!(matches!(got[0].event, RunEvent::Paused { step: 3 }));
    match &got[1].event {
        RunEvent::Failed { step, error } => {
            assert_eq!(*step, Some(3));
            assert!(error.contains("boom in the job"), "{error}");
        }
        e => panic!("{e:?}"),
    }
    assert!(
        matches!(&got[2].event, RunEvent::Failed { error, .. } if error.contains("a plain error"))
    );
}

#[test]
fn pause_and_resume_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let run = runs(&spec_text(8, 3e-3, ""), dir.path()).remove(0);
    let (tx, rx) = mpsc::channel();
    let h = spawn_run(0, run, false, tx).unwrap();
    let mut kinds = Vec::new();
    for m in rx.iter() {
        match &m.event {
            RunEvent::Step { step: 2, .. } => h.control.pause(),
            RunEvent::Paused { .. } => h.control.resume(),
            _ => {}
        }
        let done = m.event.is_terminal();
        kinds.push(m.event);
        if done {
            break;
        }
    }
    h.join();
    let paused = kinds
        .iter()
        .position(|e| matches!(e, RunEvent::Paused { .. }))
        .expect("paused");
    assert!(matches!(kinds[paused + 1], RunEvent::Resumed { .. }));
    assert!(matches!(
        kinds.last(),
        Some(RunEvent::Finished { step: 8, .. })
    ));
}
