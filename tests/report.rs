//! The experiment set (every spec validates; Table 1 and Figure 2 are matched as their
//! comments say) and `moz-lab report` (tables, verdicts and figures from synthetic runs; one
//! small real end-to-end through the binary).
use moz_lab::lab::jobs::{MetricsLog, RunEvent};
use moz_lab::lab::report::{self, ReportArgs};
use moz_lab::lab::spec::{ExperimentSpec, RunSpec};
use moz_lab::model::count::ParamCount;
use moz_lab::train::RoutingLoad;
use std::path::{Path, PathBuf};
use std::process::Command;

fn experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments")
}

fn load(name: &str) -> ExperimentSpec {
    ExperimentSpec::load(&experiments_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Active parameters without the routers' (top-1 of E experts = the dense projection).
fn active_without_routers(c: &ParamCount) -> f64 {
    c.components
        .iter()
        .filter(|(k, _)| !k.starts_with("router.") && k.as_str() != "moe_mlp.router")
        .map(|(_, v)| v.1)
        .sum()
}

#[test]
fn every_experiment_spec_validates_and_resolves() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(experiments_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let spec = ExperimentSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let runs = spec
            .runs(Path::new("/tmp/never-written"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            runs.len(),
            spec.file.variants.len() * spec.file.seeds.len(),
            "{}",
            path.display()
        );
        names.push(spec.name);
    }
    for want in [
        "table1",
        "fig2-moe-mamba",
        "fig4-hybrids",
        "mqar",
        "quickstart",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
}

#[test]
fn table1_is_the_papers_four_variants_at_equal_active_parameters() {
    let spec = load("table1.toml");
    assert_eq!(spec.file.seeds, vec![0, 1, 2]);
    let presets: Vec<&str> = spec
        .file
        .variants
        .iter()
        .map(|v| v.preset.as_deref().unwrap())
        .collect();
    assert_eq!(presets, ["mamba2", "mol", "mol-except-z", "moz"]);
    let dense = ParamCount::of(&spec.resolve_model(0).unwrap());
    for (i, v) in spec.file.variants.iter().enumerate().skip(1) {
        assert_eq!(v.match_total, Some(2.0), "{}", v.name);
        assert_eq!(v.top_k, Some(1), "{}", v.name);
        let cfg = spec.resolve_model(i).unwrap();
        assert_eq!(cfg.sparsity.top_k, 1);
        let c = ParamCount::of(&cfg);
        // Top-1: the active parameters are the dense model's, plus the routers.
        assert_eq!(
            active_without_routers(&c),
            dense.active() as f64,
            "{}",
            v.name
        );
        assert!(c.active() > dense.active(), "{}: routers count", v.name);
        let ratio = c.total() as f64 / dense.total() as f64;
        assert!((1.9..2.1).contains(&ratio), "{}: total {ratio}x", v.name);
    }
    // Same data, tokens and seeds for every run.
    let runs = spec.runs(Path::new("runs")).unwrap();
    assert!(runs
        .iter()
        .all(|r| r.train == runs[0].train && r.data == runs[0].data));
}

#[test]
fn fig2_matches_total_and_active_parameters() {
    let spec = load("fig2-moe-mamba.toml");
    let names: Vec<&str> = spec.file.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["moe-mamba", "moz"]);
    let moe = spec.resolve_model(0).unwrap();
    assert_eq!(moe.layer_pattern, "MEME");
    let (a, b) = (
        ParamCount::of(&moe),
        ParamCount::of(&spec.resolve_model(1).unwrap()),
    );
    // The figures the spec's comment states.
    assert_eq!((a.total(), a.active()), (1_137_968, 474_416));
    assert_eq!((b.total(), b.active()), (1_129_440, 474_080));
    assert!((a.total() as f64 / b.total() as f64 - 1.0).abs() < 0.01);
    assert!((a.active() as f64 / b.active() as f64 - 1.0).abs() < 0.002);
}

#[test]
fn fig4_hybrids_have_the_papers_layer_mix() {
    let spec = load("fig4-hybrids.toml");
    let pattern = |name: &str| {
        let i = spec
            .file
            .variants
            .iter()
            .position(|v| v.name == name)
            .unwrap();
        spec.resolve_model(i).unwrap()
    };
    assert_eq!(pattern("mamba2").layer_pattern, "MMMMMMMM");
    assert_eq!(pattern("mamba-ffn").layer_pattern, "MFMFMFMF");
    assert_eq!(pattern("mamba-att").layer_pattern, "MMMMMMAM");
    let hybrid = pattern("moz-moe-att");
    assert_eq!(hybrid.layer_pattern, "MEMEMEAE");
    // Same total budget as MoZ, fewer active parameters (the paper's claim for this hybrid).
    let (h, z) = (ParamCount::of(&hybrid), ParamCount::of(&pattern("moz")));
    assert!((h.total() as f64 / z.total() as f64 - 1.0).abs() < 0.01);
    assert!(h.active() < z.active());
}

#[test]
fn mqar_reports_accuracy() {
    let spec = load("mqar.toml");
    assert!(matches!(
        spec.file.data,
        moz_lab::data::DataConfig::Mqar { .. }
    ));
    let names: Vec<&str> = spec.file.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["mamba2", "moz", "mol"]);
}

// ---------------------------------------------------------------------------------------------
// Reports from synthetic runs
// ---------------------------------------------------------------------------------------------

const SYNTH_SPEC: &str = r#"
name = "synth"
description = "two variants, three seeds"
seeds = [0, 1, 2]
device = "cpu"

[model]
d_model = 16
n_layer = 1
expand = 2
headdim = 8
d_state = 8
chunk_size = 8

[train]
steps = 10
batch_size = 2
seq_len = 16
eval_interval = 5
eval_batches = 2

[[variants]]
name = "mamba2"
preset = "mamba2"

[[variants]]
name = "moz"
preset = "moz"
experts = 4
"#;

/// Writes a finished run's metrics.jsonl (and run.json): 10 steps, evaluations at 5 and 10,
/// the last one at `final_val`.
fn write_run(run: &RunSpec, final_val: f64, sparse: bool) {
    std::fs::create_dir_all(&run.out_dir).unwrap();
    std::fs::write(
        run.out_dir.join("run.json"),
        serde_json::to_string_pretty(run).unwrap(),
    )
    .unwrap();
    let mut log = MetricsLog::open(&run.out_dir.join("metrics.jsonl")).unwrap();
    let tokens_per_step = 32;
    log.append(&RunEvent::Started {
        run: run.label(),
        variant: run.variant.clone(),
        seed: run.seed,
        device: "cpu".into(),
        total_params: 1000 + if sparse { 500 } else { 0 },
        active_params: 1000 + if sparse { 8 } else { 0 },
        steps: 10,
        tokens_per_step,
        resumed_from: None,
    })
    .unwrap();
    for step in 1..=10u64 {
        log.append(&RunEvent::Step {
            step,
            tokens: step * tokens_per_step,
            loss: final_val + 1.0 / step as f64,
            aux_loss: 0.0,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_s: 1000.0 + run.seed as f64 * 100.0,
            elapsed_s: step as f64,
            gpu_mem: None,
        })
        .unwrap();
        if sparse && step % 5 == 0 {
            log.append(&RunEvent::Routing {
                step,
                loads: vec![RoutingLoad {
                    layer: 0,
                    module: "z".into(),
                    counts: vec![10, 20, 5, 0],
                }],
            })
            .unwrap();
        }
        if step % 5 == 0 {
            let val = if step == 10 {
                final_val
            } else {
                final_val + 0.5
            };
            log.append(&RunEvent::Eval {
                step,
                tokens: step * tokens_per_step,
                val_loss: val,
                val_bpb: val / std::f64::consts::LN_2,
                val_acc: None,
                elapsed_s: step as f64,
            })
            .unwrap();
        }
    }
    log.append(&RunEvent::Finished {
        step: 10,
        tokens: 10 * tokens_per_step,
        val_loss: Some(final_val),
        elapsed_s: 10.0,
    })
    .unwrap();
}

struct Synth {
    _dir: tempfile::TempDir,
    spec: PathBuf,
    runs_dir: PathBuf,
    out: PathBuf,
}

/// The synthetic spec with finished runs of the given final validation losses (per seed);
/// `skip` leaves one run out (variant, seed).
fn synth(mamba2: [f64; 3], moz: [f64; 3], skip: Option<(&str, u64)>) -> Synth {
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("synth.toml");
    std::fs::write(&spec_path, SYNTH_SPEC).unwrap();
    let runs_dir = dir.path().join("runs");
    let spec = ExperimentSpec::load(&spec_path).unwrap();
    for run in spec.runs(&runs_dir).unwrap() {
        if skip == Some((run.variant.as_str(), run.seed)) {
            continue;
        }
        let (vals, sparse) = match run.variant.as_str() {
            "mamba2" => (mamba2, false),
            _ => (moz, true),
        };
        write_run(&run, vals[run.seed as usize], sparse);
    }
    Synth {
        out: dir.path().join("report"),
        spec: spec_path,
        runs_dir,
        _dir: dir,
    }
}

fn report_no_run(s: &Synth) -> String {
    let args = ReportArgs {
        spec: s.spec.clone(),
        out: Some(s.out.clone()),
        no_run: true,
        runs_dir: s.runs_dir.clone(),
        ..Default::default()
    };
    report::run(&args).unwrap();
    std::fs::read_to_string(s.out.join("report.md")).unwrap()
}

/// `mean ± sample std (n=N)` computed here, independently of the report's code.
fn by_hand(values: &[f64]) -> String {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    format!("{mean:.4} ± {:.4} (n={})", var.sqrt(), values.len())
}

fn table_row<'a>(md: &'a str, variant: &str) -> &'a str {
    let prefix = format!("| **{variant}** |");
    md.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no table row for {variant} in:\n{md}"))
}

fn what_it_shows(md: &str) -> &str {
    let start = md
        .find("## What it shows")
        .expect("a what-it-shows section");
    let rest = &md[start..];
    let end = rest[3..].find("\n## ").map(|e| e + 3).unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn report_tables_mean_and_std_and_names_a_clear_winner() {
    let mamba2 = [1.90, 1.91, 1.93];
    let moz = [1.80, 1.81, 1.79];
    let s = synth(mamba2, moz, None);
    let md = report_no_run(&s);
    let row = table_row(&md, "mamba2");
    assert!(row.contains(&by_hand(&mamba2)), "{row}");
    let bpb: Vec<f64> = mamba2.iter().map(|v| v / std::f64::consts::LN_2).collect();
    assert!(row.contains(&by_hand(&bpb)), "{row}");
    // Mean of the three runs' throughput (1000, 1100, 1200 tokens/s).
    assert!(row.contains("| 1,100 |"), "{row}");
    assert!(row.contains("| 320 |"), "tokens: {row}");
    let row = table_row(&md, "moz");
    assert!(row.contains(&by_hand(&moz)), "{row}");
    assert!(row.contains("z ×4 (top-1)"), "{row}");
    // Parameter counts come from the runs' Started events.
    assert!(row.contains("| 1,500 | 1,008 |"), "{row}");

    let shows = what_it_shows(&md);
    assert!(
        shows.contains("**moz** has the lowest mean final validation loss"),
        "{shows}"
    );
    assert!(shows.contains("runner-up **mamba2**"), "{shows}");
    assert!(shows.contains("The gap exceeds the seed spread"), "{shows}");
    assert!(shows.contains("do not overlap"), "{shows}");
    assert!(!md.contains("Missing runs"), "{md}");

    // Relative links to figures that exist and decode at the figure size.
    for png in [
        "loss.png",
        "train_loss.png",
        "routing-moz.png",
        "params.png",
    ] {
        assert!(md.contains(&format!("]({png})")), "{png} not linked");
        let img = image::open(s.out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!(
            (img.width(), img.height()),
            report::FIGURE_SIZE,
            "{png} size"
        );
    }
    assert!(!s.out.join("routing-mamba2.png").exists());
    // Date-free: regenerating gives the same report.
    let again = report_no_run(&s);
    assert_eq!(md, again);
    // The spec and the command are stated.
    assert!(md.contains("moz-lab report "), "{md}");
    assert!(md.contains("--no-run"), "{md}");
    assert!(md.contains("name = \"synth\""), "spec text embedded");
}

#[test]
fn report_says_when_the_gap_is_within_the_seed_spread() {
    let mamba2 = [1.85, 1.80, 1.90];
    let moz = [1.83, 1.78, 1.86];
    let s = synth(mamba2, moz, None);
    let md = report_no_run(&s);
    let shows = what_it_shows(&md);
    assert!(
        shows.contains("**moz** has the lowest mean final validation loss"),
        "{shows}"
    );
    assert!(
        shows.contains("The gap is within the seed spread"),
        "{shows}"
    );
    assert!(shows.contains("rule: gap > std_a + std_b"), "{shows}");
    assert!(shows.contains("ranges over seeds overlap"), "{shows}");
    assert!(!shows.contains("exceeds"), "{shows}");
}

#[test]
fn no_run_lists_missing_runs_and_trains_nothing() {
    let s = synth([1.9, 1.91, 1.92], [1.8, 1.81, 1.82], Some(("moz", 2)));
    let md = report_no_run(&s);
    assert!(
        md.contains("- missing: `synth/moz-seed2` — not trained"),
        "{md}"
    );
    assert!(!s.runs_dir.join("synth/moz-seed2/metrics.jsonl").exists());
    // The other two seeds are in the table.
    let row = table_row(&md, "moz");
    assert!(row.contains(&by_hand(&[1.8, 1.81])), "{row}");
    // A changed spec makes the finished runs outdated rather than silently reused.
    let args = ReportArgs {
        spec: s.spec.clone(),
        out: Some(s.out.clone()),
        no_run: true,
        runs_dir: s.runs_dir.clone(),
        sets: vec!["train.lr=0.01".into()],
        ..Default::default()
    };
    report::run(&args).unwrap();
    let md = std::fs::read_to_string(s.out.join("report.md")).unwrap();
    assert!(
        md.contains("- missing: `synth/mamba2-seed0` — outdated: trained with another train"),
        "{md}"
    );
    assert!(md.contains("No run has finished yet"), "{md}");
}

// ---------------------------------------------------------------------------------------------
// End to end through the binary
// ---------------------------------------------------------------------------------------------

const TINY_SPEC: &str = r#"
name = "tiny"
seeds = [0, 1]
device = "cpu"

[model]
d_model = 16
n_layer = 1
expand = 2
headdim = 8
d_state = 8
chunk_size = 8

[train]
steps = 3
batch_size = 2
seq_len = 16
eval_interval = 3
eval_batches = 2
routing_interval = 1

[[variants]]
name = "mamba2"
preset = "mamba2"

[[variants]]
name = "moz"
preset = "moz"
experts = 2
"#;

fn moz_lab(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moz-lab"))
        .current_dir(dir)
        .arg("report")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stderr)
}

#[test]
fn report_trains_what_is_missing_then_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY_SPEC).unwrap();
    let (ok, stderr) = moz_lab(dir.path(), &["tiny.toml"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("4 runs to train"), "{stderr}");
    let md = std::fs::read_to_string(dir.path().join("reports/tiny/report.md")).unwrap();
    let logs: Vec<PathBuf> = ["mamba2-seed0", "mamba2-seed1", "moz-seed0", "moz-seed1"]
        .iter()
        .map(|r| dir.path().join("runs/tiny").join(r).join("metrics.jsonl"))
        .collect();
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains("\"event\":\"finished\""), "{}", log.display());
    }
    assert!(table_row(&md, "moz").contains("(n=2)"), "{md}");
    assert!(dir.path().join("reports/tiny/routing-moz.png").is_file());
    let mtimes: Vec<_> = logs
        .iter()
        .map(|l| std::fs::metadata(l).unwrap().modified().unwrap())
        .collect();

    let (ok, stderr) = moz_lab(dir.path(), &["tiny.toml", "-o", "again"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("0 runs to train"), "{stderr}");
    let after: Vec<_> = logs
        .iter()
        .map(|l| std::fs::metadata(l).unwrap().modified().unwrap())
        .collect();
    assert_eq!(mtimes, after, "nothing retrained");
    let again = std::fs::read_to_string(dir.path().join("again/report.md")).unwrap();
    assert!(
        again.contains("`moz-lab report tiny.toml -o again`"),
        "{again}"
    );

    // Zero-shot multiple choice on every run's checkpoint, cached beside it.
    let arc = r#"{"question": "Which tool measures mass?", "choices": {"text": ["a ruler", "a balance", "a clock"], "label": ["A", "B", "C"]}, "answerKey": "B"}
{"question": "What does ice become when it melts?", "choices": {"text": ["water", "stone"], "label": ["A", "B"]}, "answerKey": "A"}
"#;
    std::fs::write(dir.path().join("arc.jsonl"), arc).unwrap();
    let (ok, stderr) = moz_lab(
        dir.path(),
        &["tiny.toml", "--no-run", "--mc", "arc=arc.jsonl", "-o", "mc"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("  arc: ").count(), 4, "{stderr}");
    let md = std::fs::read_to_string(dir.path().join("mc/report.md")).unwrap();
    assert!(md.contains("| arc acc | arc acc_norm |"), "{md}");
    // Two items: each run scores 0, 0.5 or 1, so the mean over two seeds is a multiple of 1/4.
    let row = table_row(&md, "moz");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let acc: f64 = cells[cells.len() - 3]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (acc * 4.0).fract() == 0.0 && (0.0..=1.0).contains(&acc),
        "{row}"
    );
    assert!(dir.path().join("runs/tiny/moz-seed0/mc-arc.json").is_file());
    let (ok, stderr) = moz_lab(
        dir.path(),
        &["tiny.toml", "--no-run", "--mc", "arc=arc.jsonl", "-o", "mc"],
    );
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("  arc: "), "cached scores: {stderr}");
    assert_eq!(
        md,
        std::fs::read_to_string(dir.path().join("mc/report.md")).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// The lab's loss chart groups seeds (kept here with the other seed-statistics tests; the
// snapshot lives with the lab's others in snapshots/tui/)
// ---------------------------------------------------------------------------------------------

#[test]
fn loss_chart_draws_seeds_of_a_variant_as_mean_and_faint_min_max() {
    use moz_lab::tui::app::{Curves, View};
    use moz_lab::tui::demo::SyntheticRun;
    use moz_lab::tui::view::chart::{band_colour, chart_data, Role};
    use moz_lab::tui::view::{color, render};
    use moz_lab::tui::{App, LabConfig};

    let mut app = App::new(LabConfig::default(), 0);
    for variant in ["mamba2", "moz"] {
        for seed in 0..3 {
            let mut r = SyntheticRun::new(&format!("quick/{variant}-seed{seed}"), seed, 600, 600);
            if variant == "moz" {
                r = r.with_experts(4);
            }
            app.push_run(r.history(), true);
        }
    }
    app.view = View::Chart;
    app.chart.curves = Curves::Both;

    // Per variant and curve kind: one mean (over 3 seeds), one min and one max line.
    let data = chart_data(&app, 0);
    assert_eq!(data.series.len(), 2 * 2 * 3);
    let means: Vec<_> = data
        .series
        .iter()
        .filter(|s| s.role == Role::Mean { seeds: 3 })
        .collect();
    assert_eq!(means.len(), 4);
    // The mean of the train curves is the mean of the three seeds' smoothed losses.
    let train_mean = means.iter().find(|s| !s.val && s.run == 3).unwrap();
    let last = train_mean.points.last().unwrap();
    let band = |role| {
        data.series
            .iter()
            .find(|s| !s.val && s.run == 3 && s.role == role)
            .unwrap()
            .points
            .last()
            .copied()
            .unwrap()
    };
    let (lo, hi) = (band(Role::Min), band(Role::Max));
    assert!(lo.1 < last.1 && last.1 < hi.1, "{lo:?} {last:?} {hi:?}");
    // Dim band lines first, so the means are drawn over them.
    let first_mean = data
        .series
        .iter()
        .position(|s| matches!(s.role, Role::Mean { .. }))
        .unwrap();
    assert!(matches!(data.series[0].role, Role::Min | Role::Max));
    assert!(first_mean >= 4);

    let mut t = ratatui::Terminal::new(ratatui::backend::TestBackend::new(110, 30)).unwrap();
    t.draw(|f| render(&app, f)).unwrap();
    insta::with_settings!({
        snapshot_path => "../snapshots/tui",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!("loss_chart_seed_groups", t.backend().to_string());
    });
    let buf = t.backend().buffer();
    let text: String = buf.content.iter().map(|c| c.symbol()).collect();
    assert!(text.contains("quick/moz ×3 seeds"), "{text}");
    assert!(text.contains("seeds: mean, faint lines min–max"), "{text}");
    // The band lines are faint (the series colour blended into the background), the mean in
    // the group's series colour (the group's first run's).
    let series = app.theme().series(app.runs[3].color);
    let (moz, faint) = (color(series), color(band_colour(app.theme(), series)));
    assert_ne!(moz, faint);
    let braille = |c: &ratatui::buffer::Cell| {
        ('\u{2801}'..='\u{28ff}').contains(&c.symbol().chars().next().unwrap_or(' '))
    };
    assert!(buf.content.iter().any(|c| c.fg == faint && braille(c)));
    assert!(buf.content.iter().any(|c| c.fg == moz && braille(c)));
}
