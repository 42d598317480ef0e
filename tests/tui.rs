//! The lab's screens (insta snapshots of a `TestBackend`, plus style checks where the theme
//! matters) and its update logic, driven by synthetic key presses and `RunEvent`s.
use crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyEventState, KeyModifiers, MouseButton, MouseEvent,
    MouseEventKind,
};
use moz_lab::lab::history::RunStatus;
use moz_lab::lab::jobs::{RunEvent, RunMessage};
use moz_lab::model::Projection;
use moz_lab::tui::app::{Curves, ExpFocus, Overlay, View};
use moz_lab::tui::demo::SyntheticRun;
use moz_lab::tui::editor::{Field, FIELDS};
use moz_lab::tui::effect::Effect;
use moz_lab::tui::experiments::ExperimentEntry;
use moz_lab::tui::view::{color, render};
use moz_lab::tui::{update, App, AppEvent, LabConfig};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::path::{Path, PathBuf};

const SPEC: &str = r#"# Quick comparison: dense vs MoZ (this comment survives saves)
description = "tiny models for the lab's tests"
seeds = [0]
device = "cpu"

[model]
d_model = 16
n_layer = 2
pattern = "M"
expand = 2
headdim = 8
d_state = 8
chunk_size = 8

[train]
steps = 600
batch_size = 2
seq_len = 16
eval_interval = 50

[[variants]]
name = "mamba2"
preset = "mamba2"

[[variants]]
name = "moz"
preset = "moz"
experts = 4   # four experts
top_k = 1
"#;

fn broken_spec() -> String {
    SPEC.replace("top_k = 1", "top_k = 5")
}

fn key(code: KeyCode) -> AppEvent {
    AppEvent::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ch(c: char) -> AppEvent {
    key(KeyCode::Char(c))
}

fn press(app: &mut App, events: &[AppEvent]) -> Vec<Effect> {
    events.iter().flat_map(|e| update(app, e.clone())).collect()
}

fn entry(path: &str, text: &str) -> ExperimentEntry {
    ExperimentEntry::parse(Path::new(path), text.to_string())
}

/// A lab with the fixture specs (no disk: fixed relative paths keep snapshots stable).
fn lab() -> App {
    let mut app = App::new(LabConfig::default(), 0);
    app.set_experiments(vec![
        entry("experiments/broken.toml", &broken_spec()),
        entry("experiments/quick.toml", SPEC),
    ]);
    app.selected_experiment = 1;
    app.refresh_preview();
    app
}

fn spawned_jobs(effects: &[Effect]) -> Vec<usize> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Spawn { job, .. } => Some(*job),
            _ => None,
        })
        .collect()
}

fn send(app: &mut App, job: usize, events: Vec<RunEvent>) -> Vec<Effect> {
    events
        .into_iter()
        .flat_map(|event| update(app, AppEvent::Run(RunMessage { job, event })))
        .collect()
}

/// Launches both variants of the quick spec (two CPU slots) and streams synthetic events:
/// the dense run finished, the MoZ run half way with routing data.
fn lab_with_runs() -> App {
    let mut app = lab();
    app.queue.max_cpu = 2;
    let effects = press(&mut app, &[ch('R')]);
    assert_eq!(spawned_jobs(&effects), vec![0, 1]);
    send(
        &mut app,
        0,
        SyntheticRun::new("quick/mamba2", 0, 600, 600).events(),
    );
    send(
        &mut app,
        1,
        SyntheticRun::new("quick/moz", 1, 300, 600)
            .with_experts(4)
            .events(),
    );
    app.status = None;
    app
}

fn draw(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(app, f)).unwrap();
    t
}

fn snapshot(name: &str, app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let t = draw(app, w, h);
    insta::with_settings!({
        snapshot_path => "../snapshots/tui",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!(name, t.backend().to_string());
    });
    t
}

/// The text of row `y`.
fn row(t: &Terminal<TestBackend>, y: u16) -> String {
    let b = t.backend().buffer();
    (0..b.area.width).map(|x| b[(x, y)].symbol()).collect()
}

fn find(t: &Terminal<TestBackend>, needle: &str) -> Option<(u16, u16)> {
    let b = t.backend().buffer();
    (0..b.area.height).find_map(|y| {
        let r = row(t, y);
        r.find(needle)
            .map(|byte| (r[..byte].chars().count() as u16, y))
    })
}

// ---- screens ----------------------------------------------------------------------------

#[test]
fn screen_experiments_editor() {
    let mut app = lab();
    press(
        &mut app,
        &[
            ch('l'),
            key(KeyCode::Down),
            ch('l'),
            key(KeyCode::Down),
            ch(' '),
        ],
    );
    assert_eq!(app.exp_focus, ExpFocus::Editor);
    snapshot("experiments_editor", &app, 110, 30);
}

#[test]
fn screen_experiments_80x24() {
    let mut app = lab();
    press(&mut app, &[ch('l'), key(KeyCode::Down)]);
    snapshot("experiments_80x24", &app, 80, 24);
}

#[test]
fn screen_broken_spec() {
    let mut app = lab();
    app.selected_experiment = 0;
    app.refresh_preview();
    let t = snapshot("broken_spec", &app, 100, 24);
    // file:line:col and the field are on screen, in the theme's error colour.
    let (x, y) = find(&t, "experiments/broken.toml:").expect("error shown");
    let line = row(&t, y);
    assert!(line.contains("variants[1].top_k"), "{line}");
    let error = color(app.theme().ui.error);
    assert_eq!(t.backend().buffer()[(x, y)].fg, error);
}

#[test]
fn screen_runs_table() {
    let mut app = lab_with_runs();
    press(&mut app, &[ch('2'), key(KeyCode::Down)]);
    let t = snapshot("runs_table", &app, 110, 20);
    // The selected row has the theme's selection background.
    let (_, y) = find(&t, "quick/moz").unwrap();
    let selection = color(app.theme().ui.selection);
    assert_eq!(t.backend().buffer()[(5, y)].bg, selection);
    let (_, y0) = find(&t, "quick/mamba2").unwrap();
    assert_ne!(t.backend().buffer()[(5, y0)].bg, selection);
}

#[test]
fn runs_table_shows_the_sparsity_of_pruned_runs() {
    let mut app = lab_with_runs();
    let pruned = RunEvent::Sparsity {
        step: 100,
        target: 0.5,
        sparsity: 0.4321,
        model_sparsity: 0.3,
        components: vec![],
    };
    send(&mut app, 1, vec![pruned]);
    press(&mut app, &[ch('2')]);
    let t = draw(&app, 110, 20);
    let (x, _) = find(&t, "sparse").expect("a sparsity column");
    let (_, y_moz) = find(&t, "quick/moz").unwrap();
    let (_, y_dense) = find(&t, "quick/mamba2").unwrap();
    let cell = |y: u16| {
        row(&t, y)
            .chars()
            .skip(x as usize)
            .take(6)
            .collect::<String>()
    };
    assert_eq!(cell(y_moz).trim(), "43.2%", "{}", row(&t, y_moz));
    assert_eq!(cell(y_dense).trim(), "-", "{}", row(&t, y_dense));
    // No run is on a GPU: no memory column.
    assert!(find(&t, "gpu mem").is_none());
}

#[test]
fn optional_columns_stay_out_until_a_run_needs_them() {
    let mut app = lab_with_runs();
    press(&mut app, &[ch('2')]);
    let t = draw(&app, 80, 20);
    assert!(find(&t, "sparse").is_none() && find(&t, "gpu mem").is_none());
    // At 80 columns the status words fit whole.
    assert!(find(&t, "running").is_some(), "{}", row(&t, 3));
    let mut step = SyntheticRun::new("quick/moz", 1, 121, 600).events();
    step.retain(|e| matches!(e, RunEvent::Step { .. }));
    let mut last = step.pop().unwrap();
    if let RunEvent::Step { gpu_mem, .. } = &mut last {
        *gpu_mem = Some(3_200_000_000);
    }
    send(&mut app, 1, vec![last]);
    let t = draw(&app, 110, 20);
    let (x, _) = find(&t, "gpu mem").expect("a gpu memory column");
    let (_, y) = find(&t, "quick/moz").unwrap();
    let cell: String = row(&t, y).chars().skip(x as usize).take(7).collect();
    assert_eq!(cell.trim(), "3.20GB", "{}", row(&t, y));
}

#[test]
fn screen_loss_chart() {
    let mut app = lab_with_runs();
    press(&mut app, &[ch('3'), ch('v'), ch('v')]);
    assert_eq!(app.chart.curves, Curves::Both);
    let t = snapshot("loss_chart", &app, 110, 30);
    // Legend entries are drawn in each run's series colour, and so are the curves.
    let theme = app.theme().clone();
    for (label, i) in [("quick/mamba2", 0), ("quick/moz", 1)] {
        let (x, y) = find(&t, label).unwrap();
        assert_eq!(t.backend().buffer()[(x, y)].fg, color(theme.series(i)));
    }
    let b = t.backend().buffer();
    let curve_colour = color(theme.series(1));
    let braille_in_colour = b.content.iter().any(|c| {
        c.fg == curve_colour
            && ('\u{2801}'..='\u{28ff}').contains(&c.symbol().chars().next().unwrap_or(' '))
    });
    assert!(braille_in_colour, "MoZ curve drawn in its series colour");
}

#[test]
fn screen_loss_chart_log_zoomed_by_tokens() {
    let mut app = lab_with_runs();
    press(
        &mut app,
        &[ch('3'), ch('l'), ch('x'), ch('z'), ch('z'), ch('z')],
    );
    assert!(app.chart.log_y);
    snapshot("loss_chart_log_zoom", &app, 100, 24);
}

#[test]
fn screen_routing_heatmap() {
    let mut app = lab_with_runs();
    press(&mut app, &[ch('4')]);
    let t = snapshot("routing_heatmap", &app, 110, 24);
    // The dead expert (layer 0, last expert) is drawn in the error colour.
    let (x, y) = find(&t, "×").expect("dead expert marked");
    assert_eq!(t.backend().buffer()[(x, y)].fg, color(app.theme().ui.error));
    press(&mut app, &[ch('w')]);
    assert!(app.routing.cumulative);
    let t = draw(&app, 110, 24);
    assert!(find(&t, "cumulative").is_some());
}

#[test]
fn screen_help_80x24() {
    let mut app = lab();
    press(&mut app, &[ch('?')]);
    assert_eq!(app.overlay, Some(Overlay::Help));
    snapshot("help_80x24", &app, 80, 24);
    press(&mut app, &[ch('x')]);
    assert_eq!(app.overlay, None);
}

#[test]
fn screen_quit_confirm() {
    let mut app = lab_with_runs();
    press(&mut app, &[ch('2'), ch('q')]);
    assert_eq!(app.overlay, Some(Overlay::ConfirmQuit));
    snapshot("quit_confirm", &app, 90, 20);
}

#[test]
fn tiny_terminal_and_resize_do_not_panic() {
    let mut app = lab_with_runs();
    for view in ['1', '2', '3', '4'] {
        press(&mut app, &[ch(view)]);
        for (w, h) in [(20, 5), (80, 24), (1, 1), (200, 60)] {
            update(&mut app, AppEvent::Resize(w, h));
            draw(&app, w, h);
        }
    }
    press(&mut app, &[ch('?')]);
    draw(&app, 30, 10);
}

#[test]
fn theme_key_cycles_colours() {
    let mut app = lab_with_runs();
    press(&mut app, &[ch('2')]);
    let before = app.theme().ui.background;
    press(&mut app, &[ch('t')]);
    assert_eq!(app.theme().name, "light");
    let t = draw(&app, 100, 20);
    assert_ne!(app.theme().ui.background, before);
    assert_eq!(
        t.backend().buffer()[(50, 10)].bg,
        color(app.theme().ui.background)
    );
}

// ---- update logic -----------------------------------------------------------------------

#[test]
fn toggling_a_projection_updates_param_counts() {
    let mut app = lab();
    press(&mut app, &[ch('l'), key(KeyCode::Down), ch('l')]);
    let moz = app.preview.clone().unwrap().unwrap();
    assert_eq!(moz.projections, vec![Projection::Z]);
    assert!(moz.total > moz.dense_total);
    // top-1 of E experts: active = the dense model plus the routers (E x d_model per layer).
    let routers = moz.experts * 16 * 2;
    assert_eq!(moz.active, moz.dense_total + routers);
    // Toggle x (row 1): more experts, more parameters; the active count grows by x's router.
    press(&mut app, &[key(KeyCode::Down), ch(' ')]);
    assert_eq!(app.editor_field(), Field::Sparsify(Projection::X));
    let zx = app.preview.clone().unwrap().unwrap();
    assert_eq!(zx.projections, vec![Projection::Z, Projection::X]);
    assert!(zx.total > moz.total);
    assert_eq!(zx.active, zx.dense_total + 2 * routers);
    assert!(app.draft_modified());
    // experts + and - change the total, not the active count.
    press(&mut app, &vec![key(KeyCode::Down); 5]);
    assert_eq!(app.editor_field(), Field::Experts);
    press(&mut app, &[ch('+')]);
    let more = app.preview.clone().unwrap().unwrap();
    assert_eq!(more.experts, 5);
    assert!(more.total > zx.total);
    // Typed values: match_total replaces experts.
    app.editor_row = FIELDS.iter().position(|f| *f == Field::MatchTotal).unwrap();
    press(&mut app, &[key(KeyCode::Enter)]);
    assert!(app.text_input.is_some());
    press(&mut app, &vec![key(KeyCode::Backspace); 8]);
    press(&mut app, &[ch('2'), key(KeyCode::Enter)]);
    let d = app.draft().unwrap();
    assert_eq!(
        (d.variant.match_total, d.variant.experts),
        (Some(2.0), None)
    );
    // u reverts to the file.
    press(&mut app, &[ch('u')]);
    assert!(!app.draft_modified());
    assert_eq!(app.preview.clone().unwrap().unwrap(), moz);
}

/// Performs the effects a test cares about, as the runtime would.
fn perform(app: &mut App, effects: Vec<Effect>) {
    for e in effects {
        if let Effect::WriteFile { path, contents } = e {
            std::fs::write(&path, contents).unwrap();
            update(app, AppEvent::FilesChanged(vec![path]));
        }
    }
}

fn disk_lab(dir: &Path) -> App {
    let experiments = dir.join("experiments");
    std::fs::create_dir_all(&experiments).unwrap();
    std::fs::write(experiments.join("quick.toml"), SPEC).unwrap();
    let mut app = App::new(
        LabConfig {
            experiments_dir: experiments,
            runs_dir: dir.join("runs"),
            themes_dir: dir.join("themes"),
            exports_dir: dir.join("exports"),
            ..LabConfig::default()
        },
        0,
    );
    app.load_from_disk();
    app
}

#[test]
fn editor_sets_pruning_with_keys_and_scrolls_on_a_short_terminal() {
    let mut app = lab();
    press(&mut app, &[ch('l'), ch('l')]);
    assert_eq!(app.exp_focus, ExpFocus::Editor);
    while app.editor_field() != Field::PruneMethod {
        press(&mut app, &[key(KeyCode::Down)]);
    }
    press(&mut app, &[ch(' ')]);
    press(&mut app, &[key(KeyCode::Down), ch('+')]);
    assert!(app.draft_modified());
    let pr = app.draft().unwrap().variant.prune.unwrap();
    assert_eq!((pr.method.name(), pr.target), ("gradient", 0.6));
    // 80 x 24 cannot show all fields: the selected one (sparsity) must still be on screen.
    let t = draw(&app, 80, 24);
    let (_, y) = find(&t, "60% of prunable").expect("the selected field is visible");
    assert!(row(&t, y).contains("sparsity"), "{}", row(&t, y));
    assert!(find(&t, "gradient").is_some());
}

#[test]
fn saving_a_variant_keeps_comments_and_reloads_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = disk_lab(dir.path());
    assert!(app.experiments[0].is_ok());
    // moz: sparsify out too, and a second seed.
    press(&mut app, &[ch('l'), key(KeyCode::Down), ch('l')]);
    app.editor_row = 5;
    press(&mut app, &[ch(' ')]);
    app.editor_row = FIELDS.iter().position(|f| *f == Field::Seeds).unwrap();
    press(
        &mut app,
        &[key(KeyCode::Enter), ch(','), ch('1'), key(KeyCode::Enter)],
    );
    assert!(app.draft_modified());
    let effects = press(&mut app, &[ch('s')]);
    assert!(matches!(effects.as_slice(), [Effect::WriteFile { .. }]));
    perform(&mut app, effects);
    let text = std::fs::read_to_string(dir.path().join("experiments/quick.toml")).unwrap();
    assert!(text.contains("# Quick comparison: dense vs MoZ (this comment survives saves)"));
    assert!(text.contains("experts = 4   # four experts"), "{text}");
    assert!(text.contains("sparsify = [\"z\", \"out\"]"), "{text}");
    assert!(text.contains("seeds = [0, 1]"), "{text}");
    let spec = app.experiments[0]
        .spec
        .as_ref()
        .expect("reloads without error");
    assert_eq!(spec.file.seeds, vec![0, 1]);
    assert!(!app.draft_modified(), "the saved draft is now the file");
    assert!(app.drafts.is_empty());
}

#[test]
fn broken_spec_shows_its_error_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = disk_lab(dir.path());
    let path = dir.path().join("experiments/quick.toml");
    std::fs::write(&path, broken_spec()).unwrap();
    update(&mut app, AppEvent::FilesChanged(vec![path.clone()]));
    let err = app.experiments[0].spec.as_ref().unwrap_err();
    assert_eq!(err.field, "variants[1].top_k");
    assert!(err.line > 0);
    assert!(err.to_string().contains("quick.toml:"), "{err}");
    // Launching a broken spec is refused, not a crash.
    assert!(press(&mut app, &[ch('R')]).is_empty());
    // A new file appears, and the fixed file clears the error.
    std::fs::write(dir.path().join("experiments/other.toml"), SPEC).unwrap();
    std::fs::write(&path, SPEC).unwrap();
    update(&mut app, AppEvent::FilesChanged(vec![path.clone()]));
    assert_eq!(app.experiments.len(), 2);
    assert!(app.experiments.iter().all(|e| e.is_ok()));
    // Removing a file removes its entry.
    std::fs::remove_file(dir.path().join("experiments/other.toml")).unwrap();
    update(&mut app, AppEvent::FilesChanged(vec![path]));
    assert_eq!(app.experiments.len(), 1);
}

#[test]
fn run_events_update_the_runs_table() {
    let mut app = lab();
    app.queue.max_cpu = 2;
    let effects = press(&mut app, &[ch('R')]);
    let Effect::Spawn { run, .. } = &effects[1] else {
        panic!("{effects:?}")
    };
    assert_eq!(run.device, "cpu");
    assert_eq!(run.out_dir, PathBuf::from("runs/quick/moz"));
    assert_eq!(app.runs[1].status(), RunStatus::Running);
    let moz = SyntheticRun::new("quick/moz", 1, 120, 600).with_experts(4);
    send(&mut app, 1, moz.events());
    let h = &app.runs[1].history;
    assert_eq!((h.last_step(), h.target_steps), (120, 600));
    assert_eq!(h.evals.len(), 2);
    assert_eq!(h.routing.len(), 12);
    assert_eq!(h.eta_s(), Some(480.0 * 1024.0 / 2048.0));
    send(&mut app, 1, vec![RunEvent::Paused { step: 120 }]);
    assert_eq!(app.runs[1].status(), RunStatus::Paused);
    send(
        &mut app,
        1,
        vec![RunEvent::Diverged {
            step: 121,
            detail: "loss is NaN".into(),
        }],
    );
    assert_eq!(app.runs[1].status(), RunStatus::Diverged);
    assert!(app.status.as_ref().unwrap().text.contains("loss is NaN"));
    // Events of unknown jobs are ignored.
    assert!(send(&mut app, 99, vec![RunEvent::Stopped { step: 1 }]).is_empty());
    let t = draw(&app, 110, 12);
    assert!(find(&t, "diverged").is_some());
}

#[test]
fn queue_respects_the_concurrency_limit() {
    let mut app = lab();
    app.queue.max_cpu = 1;
    // Three seeds of moz and both variants: six runs, one at a time on the CPU.
    app.set_experiments(vec![entry(
        "experiments/quick.toml",
        &SPEC.replace("seeds = [0]", "seeds = [0, 1, 2]"),
    )]);
    let effects = press(&mut app, &[ch('R')]);
    assert_eq!(spawned_jobs(&effects), vec![0]);
    assert_eq!(app.queue.pending(), 5);
    assert_eq!(app.count_status(RunStatus::Queued), 5);
    let started = send(
        &mut app,
        0,
        SyntheticRun::new("quick/mamba2-seed0", 0, 3, 3).events(),
    );
    assert_eq!(spawned_jobs(&started), vec![1]);
    // Stopping a queued run takes it out of the queue without starting anything.
    app.view = View::Runs;
    app.selected_run = 3;
    assert!(press(&mut app, &[ch('s')]).is_empty());
    assert_eq!(app.runs[3].status(), RunStatus::Stopped);
    assert_eq!(app.queue.pending(), 3);
    // Pause / resume / stop of the running job go to its control.
    app.selected_run = 1;
    assert!(matches!(
        press(&mut app, &[ch('p')]).as_slice(),
        [Effect::Pause(1)]
    ));
    send(&mut app, 1, vec![RunEvent::Paused { step: 1 }]);
    assert!(matches!(
        press(&mut app, &[ch('p')]).as_slice(),
        [Effect::Resume(1)]
    ));
    assert!(matches!(
        press(&mut app, &[ch('s')]).as_slice(),
        [Effect::Stop(1)]
    ));
    let next = send(&mut app, 1, vec![RunEvent::Stopped { step: 1 }]);
    assert_eq!(spawned_jobs(&next), vec![2]);
    // Launching again: the live runs are refused, the ended ones queue again.
    app.view = View::Experiments;
    let again = press(&mut app, &[ch('R')]);
    assert_eq!(spawned_jobs(&again), Vec::<usize>::new());
    assert_eq!(app.runs.len(), 6);
    assert!(app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("already running"));
}

#[test]
fn quitting_with_live_runs_asks_then_stops_them() {
    let mut app = lab();
    app.queue.max_cpu = 1;
    press(&mut app, &[ch('R')]); // mamba2 runs, moz queued
    assert_eq!(app.live_runs(), 2);
    press(&mut app, &[ch('q')]);
    assert_eq!(app.overlay, Some(Overlay::ConfirmQuit));
    press(&mut app, &[ch('n')]);
    assert_eq!(app.overlay, None);
    let ctrl_c = AppEvent::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
    press(&mut app, std::slice::from_ref(&ctrl_c));
    assert_eq!(app.overlay, Some(Overlay::ConfirmQuit));
    let effects = press(&mut app, &[ch('y')]);
    assert!(
        matches!(effects.as_slice(), [Effect::Stop(0)]),
        "{effects:?}"
    );
    assert_eq!(app.overlay, Some(Overlay::Stopping));
    assert_eq!(
        app.runs[1].status(),
        RunStatus::Stopped,
        "queued run cancelled"
    );
    assert!(!app.should_quit);
    // The stop completes: nothing new starts, the lab quits.
    let effects = send(&mut app, 0, vec![RunEvent::Stopped { step: 4 }]);
    assert!(matches!(effects.as_slice(), [Effect::Quit]), "{effects:?}");
    assert!(app.should_quit);
}

#[test]
fn quitting_without_live_runs_is_immediate() {
    let mut app = lab_with_runs();
    send(&mut app, 1, vec![RunEvent::Stopped { step: 300 }]);
    assert!(matches!(
        press(&mut app, &[ch('q')]).as_slice(),
        [Effect::Quit]
    ));
}

#[test]
fn key_releases_are_ignored_and_mouse_clicks_tabs() {
    let mut app = lab();
    let release = AppEvent::Key(KeyEvent {
        code: KeyCode::Char('2'),
        modifiers: KeyModifiers::NONE,
        kind: KeyEventKind::Release,
        state: KeyEventState::NONE,
    });
    update(&mut app, release);
    assert_eq!(app.view, View::Experiments);
    update(&mut app, AppEvent::Resize(100, 30));
    let t = draw(&app, 100, 30);
    let (x, y) = find(&t, "3 Loss").unwrap();
    let click = |column, row| {
        AppEvent::Mouse(MouseEvent {
            kind: MouseEventKind::Down(MouseButton::Left),
            column,
            row,
            modifiers: KeyModifiers::NONE,
        })
    };
    update(&mut app, click(x + 1, y));
    assert_eq!(app.view, View::Chart);
    // Clicking a spec in the list selects it.
    update(&mut app, ch('1'));
    let (x, y) = find(&t, "broken.toml").unwrap();
    update(&mut app, click(x, y));
    assert_eq!(app.selected_experiment, 0);
    assert_eq!(app.exp_focus, ExpFocus::Files);
}

#[test]
fn export_asks_for_the_chart_and_heatmap() {
    let mut app = lab_with_runs();
    let effects = press(&mut app, &[ch('3'), ch('z'), ch('e')]);
    let [Effect::Export(req)] = effects.as_slice() else {
        panic!("{effects:?}")
    };
    assert_eq!(req.runs.len(), 2);
    assert_eq!(req.routing_run.as_ref().unwrap().label, "quick/moz");
    let (lo, hi) = req.x_range.expect("zoomed");
    assert!(lo >= 0.0 && hi == 600.0, "{lo} {hi}");
    assert_eq!(req.dir, PathBuf::from("exports"));
}

#[test]
fn export_writes_pngs_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = lab_with_runs();
    app.config.exports_dir = dir.path().join("exports");
    let effects = press(&mut app, &[ch('e')]);
    let [Effect::Export(req)] = effects.as_slice() else {
        panic!("{effects:?}")
    };
    let written = moz_lab::tui::runtime::export_png(req).unwrap();
    assert_eq!(written.len(), 2);
    assert!(written[0].ends_with("loss-001.png") && written[1].ends_with("routing-001.png"));
    for p in &written {
        assert!(std::fs::metadata(p).unwrap().len() > 1000);
    }
    update(&mut app, AppEvent::ExportFinished(Ok(written)));
    assert!(app
        .status
        .as_ref()
        .unwrap()
        .text
        .contains("routing-001.png"));
    let again = moz_lab::tui::runtime::export_png(req).unwrap();
    assert!(again[0].ends_with("loss-002.png"), "never overwrites");
}

#[test]
fn loaded_histories_join_the_table_without_duplicates() {
    let mut app = lab_with_runs();
    let old = SyntheticRun::new("older/dense", 3, 50, 50).history();
    let mut same_dir = SyntheticRun::new("quick/moz", 1, 10, 10).history();
    same_dir.dir = app.runs[1].history.dir.clone();
    update(&mut app, AppEvent::HistoriesLoaded(vec![old, same_dir]));
    assert_eq!(app.runs.len(), 3);
    assert_eq!(app.runs[2].history.label, "older/dense");
    assert!(
        !app.runs[2].shown,
        "earlier runs are not charted until marked"
    );
    assert_eq!(app.runs[1].history.last_step(), 300, "the live run is kept");
}

#[test]
fn watcher_reports_toml_changes_in_watched_folders() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let (watch, errors) = moz_lab::tui::watch::watch(&[dir.path()], tx);
    assert!(watch.is_some() && errors.is_empty(), "{errors:?}");
    std::fs::write(dir.path().join("notes.txt"), "not a spec").unwrap();
    std::fs::write(dir.path().join("a.toml"), "x = 1").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left).expect("a FilesChanged event") {
            AppEvent::FilesChanged(paths) => {
                assert!(paths
                    .iter()
                    .all(|p| p.extension().is_some_and(|x| x == "toml")));
                if paths.iter().any(|p| p.ends_with("a.toml")) {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
