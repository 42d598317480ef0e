//! PNG figures: decoded and checked by pixel colour (series, text, heatmap cells), plus the
//! `moz-lab plot` command line. Set PLOT_TEST_OUT=dir to keep the figures for a look.
use image::RgbImage;
use moz_lab::lab::history::{Metric, RunHistory, XAxis};
use moz_lab::lab::jobs::{MetricsLog, RunEvent};
use moz_lab::plot::{
    group_seeds, write_loss_chart, write_routing_heatmap, write_seed_band_chart, ChartOptions,
};
use moz_lab::theme::{Rgb, Theme};
use moz_lab::train::RoutingLoad;
use std::path::{Path, PathBuf};
use std::process::Command;

fn started(label: &str, seed: u64) -> RunEvent {
    RunEvent::Started {
        run: label.into(),
        variant: label.rsplit('/').next().unwrap().into(),
        seed,
        device: "cpu".into(),
        total_params: 1000,
        active_params: 500,
        steps: 300,
        tokens_per_step: 1024,
        resumed_from: None,
    }
}

fn step(step: u64, loss: f64) -> RunEvent {
    RunEvent::Step {
        step,
        tokens: step * 1024,
        loss,
        aux_loss: 0.01,
        lr: 1e-3,
        grad_norm: 1.0,
        tokens_per_s: 5000.0,
        elapsed_s: step as f64 * 0.2,
        gpu_mem: None,
    }
}

fn eval(step: u64, val_loss: f64) -> RunEvent {
    RunEvent::Eval {
        step,
        tokens: step * 1024,
        val_loss,
        val_bpb: val_loss / std::f64::consts::LN_2,
        val_acc: None,
        elapsed_s: step as f64 * 0.2,
    }
}

fn load(layer: usize, module: &str, counts: &[usize]) -> RoutingLoad {
    RoutingLoad {
        layer,
        module: module.into(),
        counts: counts.to_vec(),
    }
}

/// Routing of 2 layers x 4 experts in `z` and `mlp`. Expert 3 of layer 1 never gets a token;
/// early on layer 0 is balanced, later expert 0 takes 70% of its tokens.
fn routing(step: u64, late: bool) -> RunEvent {
    let layer0: &[usize] = if late {
        &[70, 10, 10, 10]
    } else {
        &[25, 25, 25, 25]
    };
    RunEvent::Routing {
        step,
        loads: vec![
            load(0, "z", layer0),
            load(1, "z", &[40, 30, 30, 0]),
            load(0, "mlp", &[25, 25, 25, 25]),
            load(1, "mlp", &[20, 30, 25, 25]),
        ],
    }
}

/// Events of a run whose loss decays from `start` over `steps` steps, with evaluations every
/// 50 steps and routing every 10 when `routed`.
fn run_events(label: &str, seed: u64, start: f64, steps: u64, routed: bool) -> Vec<RunEvent> {
    let mut ev = vec![started(label, seed)];
    for s in 1..=steps {
        let noise = ((s * 7919 + seed * 104_729) % 13) as f64 * 0.01;
        ev.push(step(
            s,
            1.5 + (start - 1.5) * (-(s as f64) / 60.0).exp() + noise,
        ));
        if s % 50 == 0 {
            ev.push(eval(s, 1.6 + (start - 1.5) * (-(s as f64) / 60.0).exp()));
        }
        if routed && s % 10 == 0 {
            ev.push(routing(s, s > steps / 2));
        }
    }
    ev.push(RunEvent::Finished {
        step: steps,
        tokens: steps * 1024,
        val_loss: Some(1.7),
        elapsed_s: steps as f64 * 0.2,
    });
    ev
}

fn history(label: &str, events: &[RunEvent]) -> RunHistory {
    let mut h = RunHistory::new(label);
    for e in events {
        h.apply(e);
    }
    h
}

fn two_runs() -> (RunHistory, RunHistory) {
    (
        history("exp/dense", &run_events("exp/dense", 0, 5.0, 300, false)),
        history("exp/moz", &run_events("exp/moz", 0, 5.5, 300, true)),
    )
}

fn theme() -> Theme {
    Theme::default_theme()
}

/// Renders through `write` into a fresh file and decodes it; keeps a copy under
/// $PLOT_TEST_OUT when set.
fn render(name: &str, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.png"));
    write(&path).unwrap();
    if let Ok(out) = std::env::var("PLOT_TEST_OUT") {
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&path, Path::new(&out).join(format!("{name}.png"))).unwrap();
    }
    // Nothing but the figure is left behind (the temporary file was renamed).
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    image::open(&path).unwrap().to_rgb8()
}

fn dist(p: &image::Rgb<u8>, c: Rgb) -> f64 {
    let d = |a: u8, b: u8| (a as f64 - b as f64).powi(2);
    (d(p[0], c.0) + d(p[1], c.1) + d(p[2], c.2)).sqrt()
}

/// Pixels within `tol` of `c` inside rows `rows` (all rows when None).
fn count_near(img: &RgbImage, c: Rgb, tol: f64, rows: Option<std::ops::Range<u32>>) -> usize {
    let rows = rows.unwrap_or(0..img.height());
    img.enumerate_pixels()
        .filter(|(_, y, p)| rows.contains(y) && dist(p, c) <= tol)
        .count()
}

fn opts(width: u32, height: u32) -> ChartOptions {
    ChartOptions {
        width,
        height,
        ..ChartOptions::default()
    }
}

#[test]
fn loss_chart_has_the_size_asked_for_and_one_colour_per_run() {
    let (a, b) = two_runs();
    let t = theme();
    let img = render("loss", |p| {
        write_loss_chart(p, &[&a, &b], &opts(1600, 1000), &t)
    });
    assert_eq!(img.dimensions(), (1600, 1000));
    for i in 0..2 {
        let n = count_near(&img, t.export_series(i), 10.0, None);
        assert!(n > 200, "series {i}: {n} pixels of its colour");
    }
    // A third colour is not drawn.
    assert!(count_near(&img, t.export_series(2), 10.0, None) < 20);
    // The title is text in the foreground colour at the top: the embedded font works.
    let ink = count_near(&img, t.export.foreground, 60.0, Some(0..90));
    assert!(ink > 300, "title: {ink} dark pixels");
    // Paper-white background and grid lines.
    assert!(count_near(&img, t.export.background, 0.0, None) > 1600 * 1000 / 2);
    assert!(count_near(&img, t.export.grid, 3.0, None) > 1000);

    let small = render("loss_small", |p| {
        write_loss_chart(p, &[&a, &b], &opts(640, 400), &t)
    });
    assert_eq!(small.dimensions(), (640, 400));
}

#[test]
fn empty_runs_give_an_empty_chart_with_text_but_no_curves() {
    let t = theme();
    let empty = RunHistory::new("exp/empty");
    let img = render("empty", |p| {
        write_loss_chart(p, &[&empty], &opts(1600, 1000), &t)
    });
    assert_eq!(count_near(&img, t.export_series(0), 10.0, None), 0);
    assert!(count_near(&img, t.export.foreground, 60.0, Some(0..90)) > 300);
    let none = render("none", |p| write_loss_chart(p, &[], &opts(800, 500), &t));
    assert_eq!(none.dimensions(), (800, 500));
    // A run without evaluations has no validation curve.
    let (a, _) = two_runs();
    let mut no_eval = a.clone();
    no_eval.evals.clear();
    let o = ChartOptions {
        metric: Metric::ValLoss,
        ..opts(1600, 1000)
    };
    let img = render("no_eval", |p| write_loss_chart(p, &[&no_eval], &o, &t));
    assert_eq!(count_near(&img, t.export_series(0), 10.0, None), 0);
}

#[test]
fn single_points_nan_and_sparse_evaluations_are_drawn() {
    let t = theme();
    let one = history(
        "exp/one",
        &[started("exp/one", 0), step(1, 3.0), step(2, f64::NAN)],
    );
    let img = render("single", |p| {
        write_loss_chart(p, &[&one], &opts(1600, 1000), &t)
    });
    // The marker of the single point.
    assert!(count_near(&img, t.export_series(0), 10.0, None) > 20);

    let (a, b) = two_runs();
    let o = ChartOptions {
        metric: Metric::ValBpb,
        x: XAxis::Tokens,
        ..opts(1600, 1000)
    };
    let img = render("val_bpb", |p| write_loss_chart(p, &[&a, &b], &o, &t));
    for i in 0..2 {
        assert!(count_near(&img, t.export_series(i), 10.0, None) > 200);
    }
}

#[test]
fn log_scale_accepts_zero_and_negative_values() {
    let t = theme();
    let mut ev = vec![started("exp/neg", 0)];
    ev.extend((1..=100).map(|s| step(s, 1.0 - s as f64 / 50.0)));
    let neg = history("exp/neg", &ev);
    let all_neg = history(
        "exp/allneg",
        &[started("exp/allneg", 0), step(1, 0.0), step(2, -1.0)],
    );
    let o = ChartOptions {
        log_y: true,
        ..opts(1600, 1000)
    };
    let img = render("log_neg", |p| {
        write_loss_chart(p, &[&neg, &all_neg], &o, &t)
    });
    assert!(count_near(&img, t.export_series(0), 10.0, None) > 200);
    assert_eq!(count_near(&img, t.export_series(1), 10.0, None), 0);
    // Several decades.
    let mut ev = vec![started("exp/decades", 0)];
    ev.extend((1..=200).map(|s| step(s, 10f64.powf(2.0 - s as f64 / 40.0))));
    let dec = history("exp/decades", &ev);
    render("log_decades", |p| write_loss_chart(p, &[&dec], &o, &t));
}

#[test]
fn smoothing_zoom_and_huge_series() {
    let t = theme();
    let (a, b) = two_runs();
    let raw = render("raw", |p| {
        write_loss_chart(p, &[&a, &b], &opts(800, 500), &t)
    });
    let smooth = ChartOptions {
        smooth: 0.9,
        ..opts(800, 500)
    };
    let smoothed = render("smooth", |p| write_loss_chart(p, &[&a, &b], &smooth, &t));
    assert_ne!(raw, smoothed);
    let zoom = ChartOptions {
        x_range: Some((100.0, 200.0)),
        ..opts(800, 500)
    };
    let zoomed = render("zoom", |p| write_loss_chart(p, &[&a, &b], &zoom, &t));
    assert_ne!(raw, zoomed);
    // A zoom window without data.
    let empty_zoom = ChartOptions {
        x_range: Some((1e6, 2e6)),
        ..opts(800, 500)
    };
    render("zoom_empty", |p| {
        write_loss_chart(p, &[&a], &empty_zoom, &t)
    });

    // 300k points are downsampled to about one per pixel column before drawing.
    let mut ev = vec![started("exp/huge", 0)];
    ev.extend((1..=300_000).map(|s| step(s, 2.0 + ((s * 31) % 97) as f64 / 97.0)));
    let huge = history("exp/huge", &ev);
    let t0 = std::time::Instant::now();
    let img = render("huge", |p| {
        write_loss_chart(p, &[&huge], &opts(1600, 1000), &t)
    });
    assert!(count_near(&img, t.export_series(0), 10.0, None) > 200);
    assert!(t0.elapsed().as_secs_f64() < 5.0, "{:?}", t0.elapsed());
}

#[test]
fn seed_groups_draw_a_mean_with_a_min_max_band() {
    let t = theme();
    let seeds: Vec<RunHistory> = (0..3)
        .map(|s| {
            let label = format!("exp/moz-seed{s}");
            history(
                &label,
                &run_events(&label, s, 5.0 + s as f64 * 0.3, 300, false),
            )
        })
        .collect();
    let single = history("exp/dense", &run_events("exp/dense", 0, 5.0, 300, false));
    let mut refs: Vec<&RunHistory> = seeds.iter().collect();
    refs.push(&single);
    let groups = group_seeds(&refs);
    assert_eq!(groups.len(), 2);
    assert_eq!(
        (groups[0].label.as_str(), groups[0].runs.len()),
        ("exp/moz", 3)
    );
    let img = render("band", |p| {
        write_seed_band_chart(p, &groups, &opts(1600, 1000), &t)
    });
    // The band: the series colour at 20% over white.
    let fill = |c: Rgb| t.export.background.lerp(c, 0.2);
    let band0 = count_near(&img, fill(t.export_series(0)), 6.0, None);
    assert!(band0 > 1000, "band: {band0} pixels");
    assert!(count_near(&img, t.export_series(0), 10.0, None) > 200);
    // One seed: a line, no band (only the line's anti-aliased edge has that blend).
    assert!(count_near(&img, t.export_series(1), 10.0, None) > 200);
    let band1 = count_near(&img, fill(t.export_series(1)), 6.0, None);
    assert!(
        band1 * 10 < band0,
        "band {band0} vs line edge {band1} pixels"
    );
}

#[test]
fn routing_heatmap_shows_hot_and_dead_experts() {
    let t = theme();
    let (a, moz) = two_runs();
    let heat = |name: &str, run: &RunHistory, window| {
        render(name, |p| {
            write_routing_heatmap(p, run, window, &t, 1600, 1000)
        })
    };
    let cumulative = heat("routing", &moz, None);
    let recent = heat("routing_window", &moz, Some(5));
    assert_eq!(recent.dimensions(), (1600, 1000));
    assert_ne!(cumulative, recent);

    // Compared with the same run routed evenly everywhere, the skewed one has a hot cell
    // (70% of 4 experts is past 2/E) and a dead one (heat 0, marked).
    let mut even = moz.clone();
    for snap in &mut even.routing {
        for l in &mut snap.loads {
            l.counts = vec![25, 25, 25, 25];
        }
    }
    let balanced = heat("routing_even", &even, Some(5));
    let hot = t.heat(1.0);
    let cold = t.heat(0.0);
    let gain =
        |c| count_near(&recent, c, 10.0, None) as i64 - count_near(&balanced, c, 10.0, None) as i64;
    assert!(gain(hot) > 2000, "hot cell: {} more pixels", gain(hot));
    assert!(gain(cold) > 2000, "dead cell: {} more pixels", gain(cold));
    // The cumulative view mixes in the balanced first half: its hot cell is not at 2/E.
    assert!(count_near(&cumulative, hot, 10.0, None) < count_near(&recent, hot, 10.0, None));
    // Text (title, figures) is drawn.
    assert!(count_near(&recent, t.export.foreground, 60.0, Some(0..90)) > 300);

    let err = write_routing_heatmap(&std::env::temp_dir().join("x.png"), &a, None, &t, 800, 500)
        .unwrap_err();
    assert!(err.to_string().contains("exp/dense"), "{err}");
}

#[test]
fn bad_sizes_and_paths_are_errors_that_leave_nothing_behind() {
    let t = theme();
    let (a, _) = two_runs();
    let dir = tempfile::tempdir().unwrap();
    let err = write_loss_chart(&dir.path().join("f.png"), &[&a], &opts(0, 1000), &t).unwrap_err();
    assert!(err.to_string().contains("0x1000"), "{err}");
    // The parent folder is created.
    let nested = dir.path().join("a/b/fig.png");
    write_loss_chart(&nested, &[&a], &opts(640, 400), &t).unwrap();
    assert!(nested.is_file());
    // A folder where the file should go: the render fails and no temporary file remains.
    let blocked = dir.path().join("blocked.png");
    std::fs::create_dir(&blocked).unwrap();
    assert!(write_loss_chart(&blocked, &[&a], &opts(640, 400), &t).is_err());
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn write_run(dir: &Path, events: &[RunEvent]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut log = MetricsLog::open(&dir.join("metrics.jsonl")).unwrap();
    for e in events {
        log.append(e).unwrap();
    }
}

fn moz_lab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moz-lab"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_plots_experiment_folders_and_names_bad_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("runs/exp");
    write_run(
        &exp.join("dense"),
        &run_events("exp/dense", 0, 5.0, 120, false),
    );
    write_run(&exp.join("moz"), &run_events("exp/moz", 0, 5.5, 120, true));
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let fig = tmp.path().join("figs/loss.png");
    let out = moz_lab(&[
        "plot",
        &s(&exp),
        "-o",
        &s(&fig),
        "--metric",
        "val_loss",
        "--smooth",
        "0.5",
        "--width",
        "800",
        "--height",
        "500",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("loss.png"));
    let img = image::open(&fig).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (800, 500));
    // Both runs of the folder are drawn.
    let t = theme();
    for i in 0..2 {
        assert!(count_near(&img, t.export_series(i), 10.0, None) > 50);
    }

    let heat = tmp.path().join("figs/routing.png");
    let out = moz_lab(&[
        "plot",
        "--routing",
        &s(&exp.join("moz")),
        "-o",
        &s(&heat),
        "--window",
        "3",
        "--theme",
        "light",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        image::open(&heat).unwrap().to_rgb8().dimensions(),
        (1600, 1000)
    );

    let fail = |args: &[&str], needle: &str| {
        let out = moz_lab(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    let missing = tmp.path().join("runs/nope");
    fail(&["plot", &s(&missing), "-o", &s(&fig)], &s(&missing));
    let not_a_run = tmp.path().join("figs");
    fail(
        &["plot", &s(&not_a_run), "-o", &s(&fig)],
        "no metrics.jsonl",
    );
    let dense = exp.join("dense");
    fail(
        &["plot", "--routing", &s(&dense), "-o", &s(&heat)],
        "no routing events",
    );
    fail(&["plot", "--routing", &s(&exp), "-o", &s(&heat)], "one run");
    fail(
        &["plot", &s(&exp), "-o", &s(&fig), "--metric", "perplexity"],
        "unknown metric",
    );
    fail(
        &["plot", &s(&exp), "-o", &s(&fig), "--theme", "sepia"],
        "no theme named",
    );
    fail(
        &["plot", &s(&exp), "-o", &s(&fig), "--smooth", "1.5"],
        "--smooth",
    );
}

#[test]
fn routing_heatmap_fits_seven_projections_of_a_deep_model() {
    let t = theme();
    let modules = ["mlp", "out", "dt", "C", "B", "x", "z"];
    let loads = modules
        .iter()
        .flat_map(|m| {
            (0..24).map(move |l| {
                let counts: Vec<usize> =
                    (0..8).map(|e| if e == l % 8 { 300 } else { 50 }).collect();
                load(l, m, &counts)
            })
        })
        .collect();
    let deep = history(
        "exp/deep",
        &[
            started("exp/deep", 0),
            RunEvent::Routing { step: 10, loads },
        ],
    );
    let img = render("routing_deep", |p| {
        write_routing_heatmap(p, &deep, None, &t, 1600, 1000)
    });
    assert!(count_near(&img, t.heat(1.0), 10.0, None) > 1000);
}

#[test]
fn the_smallest_canvas_and_odd_zoom_windows_still_render() {
    let t = theme();
    let (a, moz) = two_runs();
    let img = render("tiny", |p| {
        write_loss_chart(p, &[&a, &moz], &opts(320, 200), &t)
    });
    assert_eq!(img.dimensions(), (320, 200));
    render("tiny_routing", |p| {
        write_routing_heatmap(p, &moz, None, &t, 320, 200)
    });
    for window in [(5.0, 5.0), (9.0, 1.0), (f64::NAN, 3.0)] {
        let o = ChartOptions {
            x_range: Some(window),
            ..opts(640, 400)
        };
        let img = render("odd_zoom", |p| write_loss_chart(p, &[&a], &o, &t));
        // Treated as no zoom: the whole curve is drawn.
        assert!(count_near(&img, t.export_series(0), 10.0, None) > 100);
    }
}
