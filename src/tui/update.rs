//! `update(app, event) -> effects`: every state change of the lab happens here. Side effects
//! (threads, files, exports) are returned as `Effect`s for the runtime to perform.
use super::app::{
    App, Curves, ExpFocus, Overlay, TextInput, View, ROUTING_WINDOW, SMOOTHING, ZOOM,
};
use super::editor::{self, Draft, Field, FIELDS};
use super::effect::{Effect, ExportRequest};
use super::event::AppEvent;
use super::layout;
use super::queue::DeviceRequest;
use crate::lab::history::{Metric, RunHistory, RunStatus, XAxis};
use crate::lab::jobs::RunMessage;
use crate::lab::spec::RunSpec;
use crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::{Position, Rect};
use std::path::{Path, PathBuf};

pub fn update(app: &mut App, event: AppEvent) -> Vec<Effect> {
    match event {
        // Key repeat and release events would double every action on some terminals.
        AppEvent::Key(key) if key.kind == KeyEventKind::Press => on_key(app, key),
        AppEvent::Key(_) => vec![],
        AppEvent::Mouse(m) => on_mouse(app, m),
        AppEvent::Resize(w, h) => {
            app.size = (w, h);
            vec![]
        }
        AppEvent::Tick => vec![],
        AppEvent::FilesChanged(paths) => {
            on_files_changed(app, &paths);
            vec![]
        }
        AppEvent::Run(msg) => on_run_message(app, msg),
        AppEvent::HistoriesLoaded(histories) => {
            let mut added = 0;
            for h in histories {
                let known = h
                    .dir
                    .as_deref()
                    .is_some_and(|d| app.run_by_dir(d).is_some());
                if !known {
                    app.push_run(h, false);
                    added += 1;
                }
            }
            if added > 0 {
                app.set_info(format!(
                    "loaded {added} earlier run(s) from {}",
                    app.config.runs_dir.display()
                ));
            }
            vec![]
        }
        AppEvent::ExportFinished(Ok(paths)) => {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            app.set_info(format!("exported {}", names.join(", ")));
            vec![]
        }
        AppEvent::ExportFinished(Err(e)) => {
            app.set_error(format!("export failed: {e}"));
            vec![]
        }
        AppEvent::EffectFailed(e) => {
            app.set_error(e);
            vec![]
        }
        AppEvent::EffectDone(m) => {
            app.set_info(m);
            vec![]
        }
    }
}

fn on_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && key.code == KeyCode::Char('c') {
        return match app.overlay {
            // A second Ctrl-C while runs are stopping leaves at once.
            Some(Overlay::Stopping) => force_quit(app),
            Some(Overlay::ConfirmQuit) => confirm_quit(app),
            _ => request_quit(app),
        };
    }
    match app.overlay {
        Some(Overlay::Help) => {
            app.overlay = None;
            return vec![];
        }
        Some(Overlay::ConfirmQuit) => {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') | KeyCode::Enter => confirm_quit(app),
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc | KeyCode::Char('q') => {
                    app.overlay = None;
                    vec![]
                }
                _ => vec![],
            };
        }
        Some(Overlay::Stopping) => return vec![],
        None => {}
    }
    if app.text_input.is_some() {
        return on_text_key(app, key);
    }
    match key.code {
        KeyCode::Char('q') => return request_quit(app),
        KeyCode::Char('?') => {
            app.overlay = Some(Overlay::Help);
            return vec![];
        }
        KeyCode::Char(c @ '1'..='4') => {
            app.view = View::ALL[c as usize - '1' as usize];
            return vec![];
        }
        KeyCode::Tab => {
            app.view = View::ALL[(app.view.index() + 1) % View::ALL.len()];
            return vec![];
        }
        KeyCode::BackTab => {
            app.view = View::ALL[(app.view.index() + View::ALL.len() - 1) % View::ALL.len()];
            return vec![];
        }
        KeyCode::Char('t') => {
            app.theme = (app.theme + 1) % app.themes.len();
            let name = app.theme().name.clone();
            app.set_info(format!("theme: {name}"));
            return vec![];
        }
        KeyCode::Char('e') => return export(app),
        _ => {}
    }
    match app.view {
        View::Experiments => experiments_key(app, key),
        View::Runs => runs_key(app, key),
        View::Chart => chart_key(app, key),
        View::Routing => routing_key(app, key),
    }
}

fn on_text_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    let Some(input) = app.text_input.as_mut() else {
        return vec![];
    };
    match key.code {
        KeyCode::Char(c) => input.buffer.push(c),
        KeyCode::Backspace => {
            input.buffer.pop();
        }
        KeyCode::Esc => app.text_input = None,
        KeyCode::Enter => {
            let input = app.text_input.take().expect("checked above");
            if let Some(mut draft) = app.draft() {
                match draft.set_text(input.field, &input.buffer) {
                    Ok(()) => app.store_draft(draft),
                    Err(e) => app.set_error(e),
                }
            }
        }
        _ => {}
    }
    vec![]
}

// ---- experiments view -------------------------------------------------------------------

fn experiments_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    match key.code {
        KeyCode::Left | KeyCode::Char('h') => {
            app.exp_focus = match app.exp_focus {
                ExpFocus::Editor => ExpFocus::Variants,
                _ => ExpFocus::Files,
            };
        }
        KeyCode::Right | KeyCode::Char('l') => {
            app.exp_focus = match app.exp_focus {
                ExpFocus::Files => ExpFocus::Variants,
                _ => ExpFocus::Editor,
            };
        }
        KeyCode::Up | KeyCode::Char('k') => move_experiment_cursor(app, -1),
        KeyCode::Down | KeyCode::Char('j') => move_experiment_cursor(app, 1),
        KeyCode::Enter => match app.exp_focus {
            ExpFocus::Files => app.exp_focus = ExpFocus::Variants,
            ExpFocus::Variants => app.exp_focus = ExpFocus::Editor,
            ExpFocus::Editor => edit_field(app, app.editor_field(), EditAction::Enter),
        },
        KeyCode::Char(' ') if app.exp_focus == ExpFocus::Editor => {
            edit_field(app, app.editor_field(), EditAction::Toggle)
        }
        KeyCode::Char('+') | KeyCode::Char('=') if app.exp_focus == ExpFocus::Editor => {
            edit_field(app, app.editor_field(), EditAction::Up)
        }
        KeyCode::Char('-') if app.exp_focus == ExpFocus::Editor => {
            edit_field(app, app.editor_field(), EditAction::Down)
        }
        KeyCode::Delete | KeyCode::Backspace if app.exp_focus == ExpFocus::Editor => {
            edit_field(app, app.editor_field(), EditAction::Clear)
        }
        KeyCode::Char('s') => return save_draft(app),
        KeyCode::Char('u') => {
            if let Some(entry) = app.selected_entry() {
                let key = (entry.path.clone(), app.selected_variant);
                app.drafts.remove(&key);
                app.refresh_preview();
                app.set_info("edits reverted");
            }
        }
        KeyCode::Char('r') => return launch_selected_variant(app),
        KeyCode::Char('R') => return launch_selected_experiment(app),
        _ => {}
    }
    vec![]
}

fn move_experiment_cursor(app: &mut App, delta: i64) {
    let step = |i: usize, len: usize| (i as i64 + delta).clamp(0, len.max(1) as i64 - 1) as usize;
    match app.exp_focus {
        ExpFocus::Files => {
            let next = step(app.selected_experiment, app.experiments.len());
            if next != app.selected_experiment {
                app.selected_experiment = next;
                app.selected_variant = 0;
                app.refresh_preview();
            }
        }
        ExpFocus::Variants => {
            let n = app
                .selected_spec()
                .map(|s| s.file.variants.len())
                .unwrap_or(0);
            app.selected_variant = step(app.selected_variant, n);
            app.refresh_preview();
        }
        ExpFocus::Editor => app.editor_row = step(app.editor_row, FIELDS.len()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EditAction {
    Toggle,
    Enter,
    Up,
    Down,
    Clear,
}

fn edit_field(app: &mut App, field: Field, action: EditAction) {
    let Some(mut draft) = app.draft() else {
        app.set_error("no valid variant selected");
        return;
    };
    match (field, action) {
        (Field::Sparsify(p), EditAction::Toggle | EditAction::Enter) => draft.toggle(p),
        (Field::Sparsify(_), _) => return,
        // Choice fields: space steps to the next choice.
        (
            Field::PruneMethod | Field::PruneSchedule | Field::PruneScope | Field::AForm,
            EditAction::Toggle,
        ) => draft.adjust(field, true),
        (_, EditAction::Enter) => {
            app.text_input = Some(TextInput {
                field,
                buffer: draft.text_of(field),
            });
            return;
        }
        (_, EditAction::Toggle) => return,
        (_, EditAction::Up) => draft.adjust(field, true),
        (_, EditAction::Down) => draft.adjust(field, false),
        (_, EditAction::Clear) => draft.clear(field),
    }
    app.store_draft(draft);
}

fn save_draft(app: &mut App) -> Vec<Effect> {
    let (Some(entry), Some(draft)) = (app.selected_entry(), app.draft()) else {
        app.set_error("nothing to save: the selected spec has errors or no variant");
        return vec![];
    };
    if !app.draft_modified() {
        app.set_info("no unsaved edits");
        return vec![];
    }
    let spec = entry.spec.as_ref().expect("draft() implies a parsed spec");
    match editor::save_variant(&entry.source, spec, app.selected_variant, &draft) {
        Ok(contents) => vec![Effect::WriteFile {
            path: entry.path.clone(),
            contents,
        }],
        Err(e) => {
            app.set_error(format!("cannot save: {e}"));
            vec![]
        }
    }
}

fn launch_selected_variant(app: &mut App) -> Vec<Effect> {
    let (Some(spec), Some(draft)) = (app.selected_spec(), app.draft()) else {
        app.set_error("nothing to launch: the selected spec has errors or no variant");
        return vec![];
    };
    match draft.runs(spec, app.selected_variant, &app.config.runs_dir) {
        Ok(runs) => launch(app, runs),
        Err(e) => {
            app.set_error(format!("cannot launch: {e}"));
            vec![]
        }
    }
}

fn launch_selected_experiment(app: &mut App) -> Vec<Effect> {
    let Some(entry) = app.selected_entry() else {
        return vec![];
    };
    let Ok(spec) = entry.spec.as_ref() else {
        app.set_error("cannot launch: the spec has errors");
        return vec![];
    };
    let mut runs = Vec::new();
    for i in 0..spec.file.variants.len() {
        let draft = app
            .drafts
            .get(&(entry.path.clone(), i))
            .cloned()
            .unwrap_or_else(|| Draft::of(spec, i));
        match draft.runs(spec, i, &app.config.runs_dir) {
            Ok(r) => runs.extend(r),
            Err(e) => {
                let name = spec.file.variants[i].name.clone();
                app.set_error(format!("cannot launch {name}: {e}"));
                return vec![];
            }
        }
    }
    launch(app, runs)
}

/// Queues runs (a hot-reloaded spec never touches them: each keeps its resolved spec).
pub fn launch(app: &mut App, runs: Vec<RunSpec>) -> Vec<Effect> {
    let mut queued = Vec::new();
    let mut skipped = Vec::new();
    for run in runs {
        let label = run.label();
        let existing = app.run_by_dir(&run.out_dir);
        if existing.is_some_and(|i| app.runs[i].is_live()) {
            skipped.push(label);
            continue;
        }
        let job = app.next_job;
        app.next_job += 1;
        let request = DeviceRequest::from_spec(&run.device, app.queue.gpus);
        let mut history = RunHistory::new(label.clone());
        history.dir = Some(run.out_dir.clone());
        history.variant = run.variant.clone();
        history.seed = run.seed;
        history.target_steps = run.train.steps;
        let index = match existing {
            Some(i) => {
                app.runs[i].history = history;
                app.runs[i].shown = true;
                i
            }
            None => app.push_run(history, true),
        };
        let entry = &mut app.runs[index];
        entry.job = Some(job);
        entry.pending = Some(run);
        entry.device_request = request.describe();
        app.queue.push(job, request);
        queued.push(label);
    }
    match (queued.len(), skipped.is_empty()) {
        (0, false) => app.set_error(format!("already running: {}", skipped.join(", "))),
        (0, true) => app.set_error("nothing to launch"),
        (n, true) => app.set_info(format!("launched {n} run(s): {}", queued.join(", "))),
        (n, false) => app.set_info(format!(
            "launched {n} run(s); already running: {}",
            skipped.join(", ")
        )),
    }
    schedule(app)
}

/// Starts what the queue allows.
fn schedule(app: &mut App) -> Vec<Effect> {
    let mut effects = Vec::new();
    for (job, slot) in app.queue.schedule() {
        let Some(i) = app.run_of_job(job) else {
            app.queue.finish(job);
            continue;
        };
        let entry = &mut app.runs[i];
        let Some(mut run) = entry.pending.take() else {
            app.queue.finish(job);
            continue;
        };
        run.device = slot.device();
        entry.device_request = slot.device();
        entry.history.status = RunStatus::Running;
        effects.push(Effect::Spawn {
            job,
            run: Box::new(run),
        });
    }
    effects
}

// ---- runs -------------------------------------------------------------------------------

fn on_run_message(app: &mut App, msg: RunMessage) -> Vec<Effect> {
    let Some(i) = app.run_of_job(msg.job) else {
        return vec![];
    };
    let entry = &mut app.runs[i];
    entry.history.apply(&msg.event);
    if !msg.event.is_terminal() {
        return vec![];
    }
    let label = entry.history.label.clone();
    match entry.history.status {
        RunStatus::Failed | RunStatus::Diverged => {
            let why = entry.history.error.clone().unwrap_or_default();
            let status = entry.history.status.as_str();
            app.set_error(format!("{label} {status}: {why}"));
        }
        RunStatus::Done => app.set_info(format!("{label} done")),
        _ => {}
    }
    app.queue.finish(msg.job);
    if app.overlay == Some(Overlay::Stopping) {
        if app.live_runs() == 0 {
            app.should_quit = true;
            return vec![Effect::Quit];
        }
        return vec![];
    }
    schedule(app)
}

fn runs_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    if select_run_key(app, key) {
        return vec![];
    }
    match key.code {
        KeyCode::Char('a') => {
            let all = app.runs.iter().all(|r| r.shown);
            for r in &mut app.runs {
                r.shown = !all;
            }
        }
        KeyCode::Char('p') => return pause_or_resume(app),
        KeyCode::Char('s') => return stop_selected(app),
        KeyCode::Char('d') => {
            if let Some(r) = app.runs.get(app.selected_run) {
                if r.is_live() {
                    app.set_error("stop the run before removing it from the table");
                } else {
                    let label = app.runs.remove(app.selected_run).history.label;
                    app.selected_run = app.selected_run.min(app.runs.len().saturating_sub(1));
                    app.set_info(format!("removed {label} from the table (its folder stays)"));
                }
            }
        }
        KeyCode::Enter => app.view = View::Chart,
        _ => {}
    }
    vec![]
}

/// Up/down/space on the run list (runs, loss and routing views). True when handled.
fn select_run_key(app: &mut App, key: KeyEvent) -> bool {
    let n = app.runs.len();
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => app.selected_run = app.selected_run.saturating_sub(1),
        KeyCode::Down | KeyCode::Char('j') => {
            app.selected_run = (app.selected_run + 1).min(n.saturating_sub(1))
        }
        KeyCode::Home => app.selected_run = 0,
        KeyCode::End => app.selected_run = n.saturating_sub(1),
        KeyCode::Char(' ') => {
            if let Some(r) = app.runs.get_mut(app.selected_run) {
                r.shown = !r.shown;
            }
        }
        _ => return false,
    }
    true
}

fn pause_or_resume(app: &mut App) -> Vec<Effect> {
    let Some(r) = app.runs.get(app.selected_run) else {
        return vec![];
    };
    let (Some(job), label) = (r.job, r.history.label.clone()) else {
        app.set_error("this run is not running in this session");
        return vec![];
    };
    match r.status() {
        RunStatus::Running if !app.queue.is_pending(job) => {
            app.set_info(format!("pausing {label} after its current step"));
            vec![Effect::Pause(job)]
        }
        RunStatus::Paused => {
            app.set_info(format!("resuming {label}"));
            vec![Effect::Resume(job)]
        }
        _ => {
            app.set_error(format!("{label} is {}", r.status().as_str()));
            vec![]
        }
    }
}

fn stop_selected(app: &mut App) -> Vec<Effect> {
    let Some(r) = app.runs.get_mut(app.selected_run) else {
        return vec![];
    };
    let Some(job) = r.job.filter(|_| r.is_live()) else {
        let status = r.status().as_str();
        app.set_error(format!("nothing to stop: the run is {status}"));
        return vec![];
    };
    let label = r.history.label.clone();
    if app.queue.cancel(job) {
        r.pending = None;
        r.history.status = RunStatus::Stopped;
        app.set_info(format!("{label} removed from the queue"));
        return vec![];
    }
    app.set_info(format!("stopping {label} (saving a checkpoint)"));
    vec![Effect::Stop(job)]
}

// ---- loss chart and routing ------------------------------------------------------------

fn chart_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    if select_run_key(app, key) {
        return vec![];
    }
    let c = &mut app.chart;
    match key.code {
        KeyCode::Char('v') => {
            c.curves = match c.curves {
                Curves::Train => Curves::Val,
                Curves::Val => Curves::Both,
                Curves::Both => Curves::Train,
            }
        }
        KeyCode::Char(']') => c.smoothing = (c.smoothing + 1).min(SMOOTHING.len() - 1),
        KeyCode::Char('[') => c.smoothing = c.smoothing.saturating_sub(1),
        KeyCode::Char('l') => c.log_y = !c.log_y,
        KeyCode::Char('x') => {
            c.x_axis = match c.x_axis {
                XAxis::Steps => XAxis::Tokens,
                XAxis::Tokens => XAxis::WallTime,
                XAxis::WallTime => XAxis::Steps,
            }
        }
        KeyCode::Char('z') => c.zoom = (c.zoom + 1).min(ZOOM.len() - 1),
        KeyCode::Char('Z') => c.zoom = c.zoom.saturating_sub(1),
        _ => {}
    }
    vec![]
}

/// Runs with routing data, in table order.
pub fn routed_runs(app: &App) -> Vec<usize> {
    (0..app.runs.len())
        .filter(|&i| !app.runs[i].history.routing.is_empty())
        .collect()
}

fn routing_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    match key.code {
        KeyCode::Left | KeyCode::Right | KeyCode::Char('h') | KeyCode::Char('l') => {
            let routed = routed_runs(app);
            let forward = matches!(key.code, KeyCode::Right | KeyCode::Char('l'));
            let n = routed.len();
            if n > 0 {
                let next = match routed.iter().position(|&i| i == app.selected_run) {
                    Some(p) if forward => routed[(p + 1) % n],
                    Some(p) => routed[(p + n - 1) % n],
                    None => routed[0],
                };
                app.selected_run = next;
                app.routing.module = 0;
            }
        }
        KeyCode::Char('m') => app.routing.module += 1,
        KeyCode::Char('w') => app.routing.cumulative = !app.routing.cumulative,
        _ => {
            select_run_key(app, key);
        }
    }
    vec![]
}

fn export(app: &mut App) -> Vec<Effect> {
    let runs: Vec<RunHistory> = app.chart_runs().iter().map(|r| r.history.clone()).collect();
    if runs
        .iter()
        .all(|r| r.steps.is_empty() && r.evals.is_empty())
    {
        app.set_error("nothing to export: no run with points selected");
        return vec![];
    }
    let routing_run = app
        .runs
        .get(app.selected_run)
        .filter(|r| !r.history.routing.is_empty())
        .or_else(|| {
            app.chart_runs()
                .into_iter()
                .find(|r| !r.history.routing.is_empty())
        })
        .map(|r| r.history.clone());
    let request = ExportRequest {
        dir: app.config.exports_dir.clone(),
        runs,
        routing_run,
        metric: if app.chart.curves == Curves::Val {
            Metric::ValLoss
        } else {
            Metric::TrainLoss
        },
        x: app.chart.x_axis,
        smooth: app.chart.ema_weight(),
        log_y: app.chart.log_y,
        x_range: super::view::chart::x_window(app),
        routing_window: (!app.routing.cumulative).then_some(ROUTING_WINDOW),
        theme: app.theme().clone(),
    };
    app.set_info("exporting PNG...");
    vec![Effect::Export(Box::new(request))]
}

// ---- quitting ---------------------------------------------------------------------------

fn request_quit(app: &mut App) -> Vec<Effect> {
    if app.live_runs() == 0 {
        app.should_quit = true;
        return vec![Effect::Quit];
    }
    app.overlay = Some(Overlay::ConfirmQuit);
    vec![]
}

/// Stops every live run cleanly (each saves a checkpoint); the lab quits when the last one
/// has reported its end.
fn confirm_quit(app: &mut App) -> Vec<Effect> {
    let mut effects = Vec::new();
    for r in app.runs.iter_mut().filter(|r| r.is_live()) {
        let job = r.job.expect("live runs have a job");
        if app.queue.cancel(job) {
            r.pending = None;
            r.history.status = RunStatus::Stopped;
        } else {
            effects.push(Effect::Stop(job));
        }
    }
    if effects.is_empty() {
        app.should_quit = true;
        return vec![Effect::Quit];
    }
    app.overlay = Some(Overlay::Stopping);
    effects
}

fn force_quit(app: &mut App) -> Vec<Effect> {
    app.should_quit = true;
    vec![Effect::Quit]
}

// ---- files ------------------------------------------------------------------------------

fn same_dir(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn on_files_changed(app: &mut App, paths: &[PathBuf]) {
    let in_dir = |dir: &Path, p: &Path| p.parent().is_some_and(|parent| same_dir(parent, dir));
    let themes = paths.iter().any(|p| in_dir(&app.config.themes_dir, p));
    let experiments = paths.iter().any(|p| in_dir(&app.config.experiments_dir, p)) || !themes;
    if experiments && app.reload_experiments() {
        let broken = app.experiments.iter().filter(|e| !e.is_ok()).count();
        if broken == 0 {
            app.set_info("experiments reloaded");
        } else {
            app.set_error(format!("experiments reloaded: {broken} with errors"));
        }
    }
    if themes {
        app.reload_themes();
        match app.theme_errors.first() {
            Some(e) => app.set_error(format!("theme: {e}")),
            None => app.set_info(format!("themes reloaded ({} themes)", app.themes.len())),
        }
    }
}

// ---- mouse ------------------------------------------------------------------------------

fn on_mouse(app: &mut App, m: MouseEvent) -> Vec<Effect> {
    if app.overlay.is_some() || app.text_input.is_some() {
        return vec![];
    }
    let key = |code| AppEvent::Key(KeyEvent::new(code, KeyModifiers::NONE));
    match m.kind {
        MouseEventKind::ScrollUp => return update(app, key(KeyCode::Up)),
        MouseEventKind::ScrollDown => return update(app, key(KeyCode::Down)),
        MouseEventKind::Down(MouseButton::Left) => {}
        _ => return vec![],
    }
    let area = Rect::new(0, 0, app.size.0, app.size.1);
    let screen = layout::screen(area);
    let at = Position::new(m.column, m.row);
    if screen.header.contains(at) {
        if let Some((view, _)) = layout::tabs(screen.header)
            .into_iter()
            .find(|(_, r)| r.contains(at))
        {
            app.view = view;
        }
        return vec![];
    }
    match app.view {
        View::Experiments => {
            let l = layout::experiments(screen.body, app.experiments.len());
            let (col, row) = (m.column, m.row);
            if let Some(i) = layout::list_hit(
                l.files,
                0,
                app.selected_experiment,
                app.experiments.len(),
                col,
                row,
            ) {
                app.exp_focus = ExpFocus::Files;
                if i != app.selected_experiment {
                    app.selected_experiment = i;
                    app.selected_variant = 0;
                    app.refresh_preview();
                }
            } else if let Some(i) = {
                let n = app
                    .selected_spec()
                    .map(|s| s.file.variants.len())
                    .unwrap_or(0);
                layout::list_hit(l.variants, 0, app.selected_variant, n, col, row)
            } {
                app.exp_focus = ExpFocus::Variants;
                app.selected_variant = i;
                app.refresh_preview();
            } else if let Some(i) =
                layout::list_hit(l.editor, 0, app.editor_row, FIELDS.len(), col, row)
            {
                app.exp_focus = ExpFocus::Editor;
                app.editor_row = i;
                if let Field::Sparsify(p) = FIELDS[i] {
                    edit_field(app, Field::Sparsify(p), EditAction::Toggle);
                }
            }
        }
        View::Runs => {
            let l = layout::runs(screen.body);
            if let Some(i) = layout::list_hit(
                l.table,
                1,
                app.selected_run,
                app.runs.len(),
                m.column,
                m.row,
            ) {
                app.selected_run = i;
            }
        }
        View::Chart | View::Routing => {}
    }
    vec![]
}
