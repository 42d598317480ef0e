//! Unstructured pruning: the cubic schedule, global vs per-tensor thresholds, Wanda's
//! per-row comparison, masks kept through optimizer steps, protected tensors, checkpoints and
//! spec errors, on hand-made tensors and tiny models.
mod common;

use common::{run_to_end, step_losses};

use candle_core::{DType, Device, Tensor};
use moz_lab::data::{self, DataConfig};
use moz_lab::lab::jobs::RunEvent;
use moz_lab::lab::spec::ExperimentSpec;
use moz_lab::model::Projection;
use moz_lab::prune::{mask, schedule, score, Method, PruneConfig, PruneSchedule, Pruner, Scope};
use moz_lab::train::{TrainConfig, Trainer};
use std::collections::HashMap;
use std::path::Path;

// ------------------------------------------------------------------------------------------
// Schedule
// ------------------------------------------------------------------------------------------

#[test]
fn cubic_schedule_matches_the_formula() {
    let (s0, sf, t0, t_end) = (0.1, 0.7, 20u64, 120u64);
    let formula = |t: u64| {
        let x = (t - t0) as f64 / (t_end - t0) as f64;
        sf + (s0 - sf) * (1.0 - x).powi(3)
    };
    assert_eq!(schedule::cubic(s0, sf, t0, t_end, t0), s0);
    assert_eq!(schedule::cubic(s0, sf, t0, t_end, t_end), sf);
    assert_eq!(schedule::cubic(s0, sf, t0, t_end, 5), s0, "before t0");
    assert_eq!(schedule::cubic(s0, sf, t0, t_end, 500), sf, "after T");
    for t in [21, 45, 70, 95, 119] {
        assert!((schedule::cubic(s0, sf, t0, t_end, t) - formula(t)).abs() < 1e-15);
    }
    // Halfway: s_f + (s_0 - s_f) / 8.
    assert!((schedule::cubic(s0, sf, t0, t_end, 70) - (0.7 - 0.6 / 8.0)).abs() < 1e-12);

    // Pruning steps: t0, t0 + dt, ... and always T.
    let cfg = PruneConfig {
        initial: s0,
        target: sf,
        start_step: t0,
        end_step: Some(115),
        interval: 30,
        ..PruneConfig::default()
    };
    let ev = schedule::events(&cfg, 200);
    let steps: Vec<u64> = ev.iter().map(|e| e.0).collect();
    assert_eq!(steps, vec![20, 50, 80, 110, 115]);
    assert_eq!(ev[0].1, s0);
    assert_eq!(ev.last().unwrap().1, sf);
    assert!(
        ev.windows(2).all(|w| w[0].1 < w[1].1),
        "sparsity grows: {ev:?}"
    );
    let one_shot = PruneConfig {
        schedule: PruneSchedule::OneShot,
        start_step: 40,
        target: 0.5,
        ..PruneConfig::default()
    };
    assert_eq!(schedule::events(&one_shot, 200), vec![(40, 0.5)]);
}

// ------------------------------------------------------------------------------------------
// Scores and selection on hand-made tensors
// ------------------------------------------------------------------------------------------

fn count(v: &[bool]) -> usize {
    v.iter().filter(|p| **p).count()
}

#[test]
fn global_and_per_tensor_thresholds_differ_as_designed() {
    let a = vec![1.0, 2.0, 3.0, 4.0];
    let b = vec![10.0, 20.0, 30.0, 40.0];
    let scores = vec![a, b];
    let none = vec![vec![false; 4], vec![false; 4]];
    // Global at 50%: the four lowest scores are all of A.
    let g = score::select_global(&scores, &none, 0.5, 1.0);
    assert_eq!(g[0], vec![true; 4]);
    assert_eq!(g[1], vec![false; 4]);
    // Per tensor: each loses its own two lowest.
    let p = score::select_per_tensor(&scores, &none, 0.5, 1.0);
    assert_eq!(p[0], vec![true, true, false, false]);
    assert_eq!(p[1], vec![true, true, false, false]);
    // Global with a 75% cap per tensor: A stops at 3, the budget's last weight is B's lowest.
    let c = score::select_global(&scores, &none, 0.5, 0.75);
    assert_eq!(c[0], vec![true, true, true, false]);
    assert_eq!(c[1], vec![true, false, false, false]);
}

#[test]
fn already_pruned_weights_stay_pruned() {
    let scores = vec![vec![5.0, 1.0, 2.0, 9.0], vec![3.0, 4.0]];
    // The highest score of the first tensor was pruned earlier (it may have regrown in score).
    let already = vec![vec![false, false, false, true], vec![false; 2]];
    let g = score::select_global(&scores, &already, 0.5, 1.0);
    assert!(g[0][3], "stays pruned");
    assert_eq!(count(&g[0]) + count(&g[1]), 3, "round(0.5 * 6) in all");
    assert!(g[0][1] && g[0][2], "then the lowest scores: {g:?}");
    let p = score::select_per_tensor(&scores, &already, 0.5, 1.0);
    assert_eq!(p[0], vec![false, true, false, true]);
    let r = score::select_per_row(&[5.0, 1.0, 2.0, 9.0], &[false, false, false, true], 2, 0.5);
    assert_eq!(r, vec![false, true, false, true]);
}

#[test]
fn wanda_compares_within_each_output_row() {
    // W (2 x 3), input column norms: the middle input is large, the last tiny.
    let w = [4.0, 1.0, 2.0, 1.0, -1.0, 3.0];
    let x_norm = [1.0, 10.0, 0.1];
    let s = score::wanda(&w, 3, &x_norm);
    let want = [4.0, 10.0, 0.2, 1.0, 10.0, 0.3];
    assert!(
        s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{s:?}"
    );
    let none = [false; 6];
    // One of three per row: the smallest |W_ij| ||X_j|| of that row.
    let m = score::select_per_row(&s, &none, 3, 1.0 / 3.0);
    assert_eq!(m, vec![false, false, true, false, false, true]);
    // Magnitude alone would prune column 1 of row 0 and column 0 or 1 of row 1.
    let mag = score::select_per_row(&score::magnitude(&w), &none, 3, 1.0 / 3.0);
    assert_eq!(mag, vec![false, true, false, true, false, false]);
    // A global threshold over the same scores would take both from row 0 and row 1's 0.3 ...
    // per row, every row loses exactly round(s * cols).
    let m2 = score::select_per_row(&s, &none, 3, 2.0 / 3.0);
    assert_eq!(count(&m2[..3]), 2);
    assert_eq!(count(&m2[3..]), 2);
}

#[test]
fn per_row_selection_meets_the_budget_exactly() {
    // Rows of 64 at 30%: rounding each row alone gives 19 of 64 = 29.69%. Over two tensors
    // (10 rows of 64, 3 rows of 10) the total must be round(0.3 * 670) = 201, each row within
    // one weight of its share, and every row's pruned weights its lowest scores.
    let a: Vec<f64> = (0..640).map(|i| ((i * 37) % 101) as f64).collect();
    let b: Vec<f64> = (0..30).map(|i| ((i * 13) % 17) as f64).collect();
    let none = vec![vec![false; 640], vec![false; 30]];
    let m = score::select_rows(&[a.clone(), b.clone()], &none, &[64, 10], 0.3);
    assert_eq!(count(&m[0]) + count(&m[1]), 201);
    for (flags, scores, cols) in [(&m[0], &a, 64usize), (&m[1], &b, 10)] {
        for (row, sc) in flags.chunks(cols).zip(scores.chunks(cols)) {
            let k = count(row);
            let share = 0.3 * cols as f64;
            assert!((k as f64 - share).abs() < 1.0, "{k} of {cols}");
            let kept_min = sc.iter().zip(row).filter(|(_, p)| !**p).map(|(v, _)| *v);
            let pruned_max = sc.iter().zip(row).filter(|(_, p)| **p).map(|(v, _)| *v);
            assert!(pruned_max.fold(f64::MIN, f64::max) <= kept_min.fold(f64::MAX, f64::min));
        }
    }
}

#[test]
fn gradient_score_with_alpha_zero_is_magnitude() {
    let w = [0.5, -2.0, 0.0, 3.0];
    let g = [0.0, 1e-3, 5.0, 2.0];
    assert_eq!(score::gradient_magnitude(&w, &g, 0.0), score::magnitude(&w));
    assert_eq!(
        score::gradient_magnitude(&w, &g, 1.0),
        vec![0.0, 2e-3, 0.0, 6.0]
    );
    assert_eq!(score::gradient_magnitude(&w, &g, 2.0)[3], 12.0);
}

// ------------------------------------------------------------------------------------------
// On tiny models
// ------------------------------------------------------------------------------------------

fn trainer(pattern: &str, projections: Vec<Projection>, steps: u64) -> Trainer {
    let cfg = common::tiny(pattern, projections, 3, 1);
    let tc = TrainConfig {
        steps,
        batch_size: 2,
        seq_len: 16,
        lr: 3e-3,
        warmup_steps: 0,
        eval_batches: 1,
        ..TrainConfig::default()
    };
    let data = data::build(&DataConfig::default(), Path::new("."), tc.seq_len).unwrap();
    Trainer::new(&cfg, &tc, data, false, 7, &Device::Cpu, DType::F32).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn prunable_tensors_are_the_projections() {
    let t = trainer("MFEA", vec![Projection::Z, Projection::Out], 10);
    let units = mask::prunable_units(&t.model, false);
    let names: Vec<String> = units
        .iter()
        .map(|u| format!("{}:{}", u.layer, u.component))
        .collect();
    // Layer 0 (MoZ Mamba2): in_proj parts x, B, C, dt, z experts, out experts.
    for c in [
        "0:x", "0:B", "0:C", "0:dt", "0:z", "0:out", "1:gate", "1:up", "1:down", "2:gate", "3:q",
        "3:o",
    ] {
        assert!(names.contains(&c.to_string()), "{c} missing from {names:?}");
    }
    let prunable: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    for p in t.model.store.params() {
        let protected = [
            "embedding",
            "norm",
            "bias",
            "dt_bias",
            "A_log",
            ".D",
            "router",
            "conv1d",
        ]
        .iter()
        .any(|k| p.name.contains(k));
        assert_eq!(
            !protected,
            prunable.contains(&p.name.as_str()),
            "{}",
            p.name
        );
    }
    // The in_proj parts tile in_proj's rows exactly.
    let in_rows: usize = units
        .iter()
        .filter(|u| u.name.ends_with("0.mixer.in_proj.weight"))
        .map(|u| u.rows)
        .sum();
    let in_proj = t
        .model
        .store
        .get("backbone.layers.0.mixer.in_proj.weight")
        .unwrap();
    assert_eq!(in_rows, in_proj.var.dims()[0]);
    // conv = true adds the conv1d weights.
    let with_conv = mask::prunable_units(&t.model, true);
    assert!(with_conv.iter().any(|u| u.component == "conv"));
}

fn masks_with(method: Method, alpha: f64) -> HashMap<String, Vec<bool>> {
    let t = trainer("MF", vec![], 10);
    let cfg = PruneConfig {
        method,
        alpha,
        target: 0.5,
        schedule: PruneSchedule::OneShot,
        ..PruneConfig::default()
    };
    let mut p = Pruner::new(&cfg, 10, &t.model);
    p.prune(&t.model, t.data.as_ref(), 7, 0, 0.5, (2, 16))
        .unwrap();
    p.masks.pruned
}

#[test]
fn alpha_zero_gives_the_magnitude_masks_and_alpha_one_does_not() {
    let mag = masks_with(Method::Magnitude, 0.0);
    assert_eq!(masks_with(Method::Gradient, 0.0), mag);
    assert_ne!(
        masks_with(Method::Gradient, 1.0),
        mag,
        "the gradient must change the masks"
    );
}

#[test]
fn wanda_sees_every_prunable_input() {
    // Wanda on a model with experts and every layer kind: every unit gets recorded norms
    // (a unit without them would fall back to |w|, i.e. the magnitude masks).
    let t = trainer("MFA", vec![Projection::Z], 10);
    let units = mask::prunable_units(&t.model, false);
    let (_, seen) = moz_lab::prune::record::record(|| {
        let (inputs, _, _) =
            moz_lab::train::loss::batch_tensors(&t.model, &t.data.train_batch(0, 0, 2, 16))
                .unwrap();
        candle_core::Module::forward(&t.model, &inputs).unwrap();
    });
    for u in &units {
        let id = t.model.store.params()[u.param].var.as_tensor().id();
        let norms = seen.get(&id);
        // Experts that got no token of this batch have nothing recorded; all others must.
        let is_expert = u.name.contains("experts");
        assert!(
            is_expert || norms.map(|n| n.len()) == Some(u.cols),
            "{} has no recorded input",
            u.name
        );
    }
    assert!(units
        .iter()
        .filter(|u| u.name.contains("experts"))
        .any(|u| seen.contains_key(&t.model.store.params()[u.param].var.as_tensor().id())));
    assert!(!moz_lab::prune::record::is_recording());
    // Wanda masks: every row of every unit loses the same count.
    let cfg = PruneConfig {
        method: Method::Wanda,
        schedule: PruneSchedule::OneShot,
        ..PruneConfig::default()
    };
    let mut p = Pruner::new(&cfg, 10, &t.model);
    p.prune(&t.model, t.data.as_ref(), 7, 0, 0.5, (2, 16))
        .unwrap();
    for u in &p.units {
        let k = (0.5 * u.cols as f64).round() as usize;
        for row in p.masks.unit_flags(u).chunks(u.cols) {
            assert_eq!(count(row), k, "{}", u.name);
        }
    }
}

#[test]
fn masks_hold_through_optimizer_steps_and_pruned_moments_are_zero() {
    let mut t = trainer("ME", vec![Projection::Out], 12);
    let params_before: HashMap<String, Vec<f32>> = t
        .model
        .store
        .params()
        .iter()
        .map(|p| (p.name.clone(), host(p.var.as_tensor())))
        .collect();
    t.enable_pruning(&PruneConfig {
        target: 0.6,
        initial: 0.2,
        start_step: 2,
        end_step: Some(8),
        interval: 2,
        batches: 2,
        ..PruneConfig::default()
    });
    let mut reports = Vec::new();
    for _ in 0..12 {
        let r = t.train_step().unwrap();
        if let Some(s) = r.sparsity {
            reports.push((r.step - 1, s));
        }
        let p = t.pruner.as_ref().unwrap();
        for (i, param) in t.model.store.params().iter().enumerate() {
            let Some(flags) = p.masks.pruned.get(&param.name) else {
                continue;
            };
            let w = host(param.var.as_tensor());
            let (m, v) = t.opt.moments(i);
            let (m, v) = (host(m), host(v));
            for (j, pruned) in flags.iter().enumerate() {
                if *pruned {
                    assert_eq!((w[j], m[j], v[j]), (0.0, 0.0, 0.0), "{} [{j}]", param.name);
                }
            }
        }
    }
    let steps: Vec<u64> = reports.iter().map(|r| r.0).collect();
    assert_eq!(steps, vec![2, 4, 6, 8]);
    let last = &reports.last().unwrap().1;
    let p = t.pruner.as_ref().unwrap();
    let total: usize = p.units.iter().map(|u| u.numel()).sum();
    assert_eq!(
        p.masks.count_pruned(),
        (0.6 * total as f64).round() as usize
    );
    assert!(
        (last.sparsity - 0.6).abs() <= 0.5 / total as f64,
        "{}",
        last.sparsity
    );
    assert_eq!(last.target, 0.6);
    let pruned_sum: u64 = last.components.iter().map(|c| c.pruned).sum();
    assert_eq!(pruned_sum as usize, p.masks.count_pruned());
    // Unpruned weights kept training; protected tensors were never masked (no exact zeros).
    for param in t.model.store.params() {
        let w = host(param.var.as_tensor());
        match p.masks.pruned.get(&param.name) {
            Some(flags) => {
                let kept_moved = flags
                    .iter()
                    .zip(w.iter().zip(&params_before[&param.name]))
                    .any(|(pr, (a, b))| !pr && a != b);
                assert!(
                    kept_moved || param.expert.is_some(),
                    "{} did not train",
                    param.name
                );
            }
            None => assert!(
                !w.contains(&0.0) || param.name.contains("experts"),
                "{} protected but has zeros",
                param.name
            ),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Runs, checkpoints, specs
// ------------------------------------------------------------------------------------------

fn spec_text(prune: &str) -> String {
    format!(
        r#"
seeds = [1]
device = "cpu"
[model]
d_model = 16
n_layer = 2
headdim = 8
d_state = 4
chunk_size = 8
[train]
steps = 24
batch_size = 2
seq_len = 16
warmup_steps = 2
eval_interval = 12
eval_batches = 1
[[variants]]
name = "dense"
preset = "mamba2"
[[variants]]
name = "pruned"
preset = "moz"
experts = 2
[variants.prune]
{prune}
"#
    )
}

fn parse(text: &str) -> Result<ExperimentSpec, moz_lab::lab::spec::SpecError> {
    ExperimentSpec::parse(Path::new("experiments/p.toml"), text, &[])
}

#[test]
fn pruned_run_checkpoint_holds_zeros_and_masks_at_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let text = spec_text("target = 0.7\nstart_step = 6\nend_step = 16\ninterval = 5\nbatches = 2");
    let path = dir.path().join("p.toml");
    std::fs::write(&path, &text).unwrap();
    let runs = ExperimentSpec::load(&path)
        .unwrap()
        .runs(&dir.path().join("runs"))
        .unwrap();
    assert_eq!(runs[1].prune.as_ref().unwrap().end_step, Some(16));
    let events = run_to_end(runs[1].clone(), false);
    assert!(
        matches!(events.last(), Some(RunEvent::Finished { .. })),
        "{:?}",
        events.last()
    );
    let sp: Vec<(u64, f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Sparsity {
                step,
                target,
                sparsity,
                ..
            } => Some((*step, *target, *sparsity)),
            _ => None,
        })
        .collect();
    assert_eq!(sp.iter().map(|s| s.0).collect::<Vec<_>>(), vec![6, 11, 16]);
    assert_eq!(sp[2].1, 0.7);
    let ckpt = runs[1].out_dir.join("checkpoint");
    let (pruned, zeros, total) = mask::checkpoint_sparsity(&ckpt).unwrap();
    assert_eq!(pruned, (0.7 * total as f64).round() as usize);
    assert_eq!(
        zeros, pruned,
        "the saved weights are zero exactly where the masks prune"
    );
    assert!((pruned as f64 / total as f64 - 0.7).abs() <= 0.5 / total as f64);
    // Optimizer moments of pruned weights are zero in the checkpoint too.
    let opt =
        candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    let masks =
        candle_core::safetensors::load(ckpt.join("masks.safetensors"), &Device::Cpu).unwrap();
    for (key, m) in &masks {
        let name = key.strip_suffix(".prune_mask").unwrap();
        let keep: Vec<u8> = m.flatten_all().unwrap().to_vec1().unwrap();
        let ea = host(&opt[&format!("{name}.exp_avg")]);
        for (k, e) in keep.iter().zip(&ea) {
            assert!(*k == 1 || *e == 0.0, "{name}");
        }
    }
    // The dense phase is the unpruned run's, step for step: the first pruning step (6) prunes
    // to s_0 = 0, the second (11) to the cubic value, so losses agree up to step 11 and differ
    // from step 12 on.
    let mut unpruned = runs[1].clone();
    unpruned.prune = None;
    unpruned.out_dir = dir.path().join("unpruned");
    let base = step_losses(&run_to_end(unpruned, false));
    let with = step_losses(&events);
    assert_eq!(sp[0].2, 0.0, "s_0 = 0 prunes nothing");
    assert_eq!(&base[..11], &with[..11]);
    assert_ne!(
        base[11], with[11],
        "pruning at step 11 changes step 12's loss"
    );
}

#[test]
fn resume_restores_the_masks_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let text = spec_text("target = 0.5\nstart_step = 4\nend_step = 14\ninterval = 4\nbatches = 1\nmethod = \"wanda\"")
        .replace("steps = 24", "steps = 20");
    let path = dir.path().join("p.toml");
    std::fs::write(&path, &text).unwrap();
    let spec = ExperimentSpec::load(&path).unwrap();
    let full = spec.runs(&dir.path().join("a")).unwrap().remove(1);
    let whole = step_losses(&run_to_end(full.clone(), false));
    // Stop after 10 steps (past two pruning steps), then resume to the end.
    let mut part = spec.runs(&dir.path().join("b")).unwrap().remove(1);
    part.train.steps = 10;
    run_to_end(part.clone(), false);
    part.train.steps = 20;
    let resumed = step_losses(&run_to_end(part.clone(), true));
    assert_eq!(resumed.first().unwrap().0, 11);
    assert_eq!(
        &whole[10..],
        &resumed[..],
        "resumed losses equal the uninterrupted run's"
    );
    let a = mask::checkpoint_sparsity(&full.out_dir.join("checkpoint")).unwrap();
    let b = mask::checkpoint_sparsity(&part.out_dir.join("checkpoint")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_prune_fields_are_located() {
    let cases = [
        ("target = 1.5", "variants[1].prune.target", "target = 1.5"),
        (
            "target = 0.3\ninitial = 0.5",
            "variants[1].prune.initial",
            "initial = 0.5",
        ),
        (
            "end_step = 30",
            "variants[1].prune.end_step",
            "end_step = 30",
        ),
        (
            "start_step = 12\nend_step = 10",
            "variants[1].prune.end_step",
            "end_step = 10",
        ),
        (
            "max_per_tensor = 0.4",
            "variants[1].prune.max_per_tensor",
            "max_per_tensor",
        ),
        ("alpha = -1.0", "variants[1].prune.alpha", "alpha"),
        ("batches = 0", "variants[1].prune.batches", "batches = 0"),
        (
            "schedule = \"one-shot\"\nstart_step = 24",
            "variants[1].prune.start_step",
            "start_step",
        ),
    ];
    for (prune, field, needle) in cases {
        let text = spec_text(prune);
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, field, "{prune}: {e}");
        let line = text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert_eq!(e.line, line, "{prune}: {e}");
    }
    // Unknown keys and values are rejected by the parser, with their line.
    for (prune, needle) in [
        ("treshold = 0.5", "treshold"),
        ("method = \"random\"", "random"),
        ("scope = \"layer\"", "scope = \"layer\""),
    ] {
        let text = spec_text(prune);
        let e = parse(&text).unwrap_err();
        let line = text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert_eq!(e.line, line, "{prune}: {e}");
        assert!(e.to_string().starts_with("experiments/p.toml:"), "{e}");
    }
    let ok = parse(&spec_text(
        "method = \"magnitude\"\nscope = \"per-layer\"\nschedule = \"one-shot\"\nstart_step = 12",
    ))
    .unwrap();
    let r = ok.runs(Path::new("runs")).unwrap();
    assert_eq!(r[1].prune.as_ref().unwrap().scope, Scope::PerLayer);
    assert!(r[0].prune.is_none());
}
