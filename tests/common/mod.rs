//! Helpers shared by the integration tests.
// Each test binary uses a subset of these.
#![allow(dead_code)]
use moz_lab::lab::jobs::RunEvent;
use moz_lab::lab::runner::spawn_run;
use moz_lab::lab::spec::RunSpec;
use moz_lab::model::{ModelConfig, Projection, SparsityConfig};

/// A tiny model of the given layer pattern (d_model 8, 2 groups, every layer kind possible).
pub fn tiny(
    pattern: &str,
    projections: Vec<Projection>,
    experts: usize,
    top_k: usize,
) -> ModelConfig {
    ModelConfig {
        d_model: 8,
        n_layer: pattern.len(),
        layer_pattern: pattern.into(),
        expand: 2,
        headdim: 4,
        d_state: 3,
        ngroups: 2,
        d_conv: 3,
        chunk_size: 4,
        vocab_size: 256,
        norm_eps: 1e-5,
        mlp_hidden: 6,
        attn_heads: 2,
        moe_experts: 3,
        sparsity: SparsityConfig {
            projections,
            experts,
            top_k,
            aux_loss_coef: 0.01,
            z_loss_coef: 1e-3,
        },
        mamba1: Default::default(),
    }
}

/// Runs to completion on a job thread and returns every event.
pub fn run_to_end(run: RunSpec, resume: bool) -> Vec<RunEvent> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = spawn_run(0, run, resume, tx).unwrap();
    let mut events = Vec::new();
    for m in rx.iter() {
        let done = m.event.is_terminal();
        events.push(m.event);
        if done {
            break;
        }
    }
    // A job thread that does not exit after its terminal event fails the test, not hangs it.
    assert!(
        h.join_within(std::time::Duration::from_secs(60)),
        "the job thread did not exit within 60 s of {:?}",
        events.last()
    );
    events
}

/// (step, training loss) of every step event.
pub fn step_losses(events: &[RunEvent]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Step { step, loss, .. } => Some((*step, *loss)),
            _ => None,
        })
        .collect()
}
