//! Runs view: one row per run (live or loaded from runs/), and details of the selected one.
use super::{color, duration, grouped, si, Palette};
use crate::tui::app::{App, RunEntry};
use crate::tui::layout::{self, list_offset};
use ratatui::layout::{Constraint, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

fn opt(v: Option<f64>, prec: usize) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// The device column: the run's own report once started (first word: "cpu (2 threads)").
fn device(r: &RunEntry) -> String {
    let d = if r.history.device.is_empty() {
        &r.device_request
    } else {
        &r.history.device
    };
    d.split_whitespace().next().unwrap_or("-").to_string()
}

pub fn render(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let l = layout::runs(area);
    // The sparsity and GPU-memory columns appear only when some run has them, so the table
    // keeps its width for everything else on an 80-column terminal.
    let show_sparse = app.runs.iter().any(|r| !r.history.sparsity.is_empty());
    let show_gpu = app
        .runs
        .iter()
        .any(|r| r.history.gpu_mem.is_some() || device(r).starts_with("cuda"));
    let shown = |col: &str| match col {
        "sparse" => show_sparse,
        "gpu mem" => show_gpu,
        _ => true,
    };
    let columns: [(&str, Constraint); 12] = [
        ("", Constraint::Length(1)),
        ("run", Constraint::Min(12)),
        ("status", Constraint::Length(8)),
        ("step", Constraint::Length(11)),
        ("tokens", Constraint::Length(7)),
        ("train", Constraint::Length(6)),
        ("val", Constraint::Length(6)),
        ("sparse", Constraint::Length(6)),
        ("tok/s", Constraint::Length(6)),
        ("ETA", Constraint::Length(6)),
        ("device", Constraint::Length(6)),
        ("gpu mem", Constraint::Length(7)),
    ];
    let header = Row::new(
        columns
            .iter()
            .filter(|(h, _)| shown(h))
            .map(|(h, _)| Cell::from(*h).style(p.muted)),
    );
    let rows: Vec<Row> = app
        .runs
        .iter()
        .map(|r| {
            let h = &r.history;
            let step = if h.target_steps > 0 {
                format!("{}/{}", h.last_step(), h.target_steps)
            } else {
                h.last_step().to_string()
            };
            let mark = if r.shown { "■" } else { "□" };
            let cells = [
                Cell::from(mark).style(p.base.fg(color(app.theme().series(r.color)))),
                Cell::from(h.label.clone()),
                Cell::from(h.status.as_str()).style(p.status(h.status)),
                Cell::from(step),
                Cell::from(si(h.last_tokens() as f64)),
                Cell::from(opt(h.last_train_loss(), 3)),
                Cell::from(opt(h.last_val_loss(), 3)),
                Cell::from(sparsity_cell(h)),
                Cell::from(h.tokens_per_s(20).map(si).unwrap_or_else(|| "-".into())),
                Cell::from(h.eta_s().map(duration).unwrap_or_else(|| "-".into())),
                Cell::from(device(r)),
                Cell::from(
                    h.gpu_mem
                        .map(|b| si(b as f64) + "B")
                        .unwrap_or_else(|| "-".into()),
                ),
            ];
            Row::new(
                cells
                    .into_iter()
                    .zip(&columns)
                    .filter(|(_, (h, _))| shown(h))
                    .map(|(c, _)| c),
            )
        })
        .collect();
    let widths: Vec<Constraint> = columns
        .iter()
        .filter(|(h, _)| shown(h))
        .map(|(_, w)| *w)
        .collect();
    let title = format!(
        " Runs ({} live, queue {}, cpu limit {}) ",
        app.live_runs(),
        app.queue.pending(),
        app.queue.max_cpu
    );
    let empty = rows.is_empty();
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(p.selected)
        .style(p.base)
        .block(p.block(title, true));
    let visible = l.table.height.saturating_sub(3) as usize;
    let mut state = TableState::default()
        .with_offset(list_offset(app.selected_run, visible))
        .with_selected((!empty).then_some(app.selected_run));
    frame.render_stateful_widget(table, l.table, &mut state);
    if empty {
        let inner = layout::inner(l.table);
        if inner.height > 2 {
            frame.render_widget(
                Paragraph::new("No runs yet: launch one from the Experiments view (r / R).")
                    .style(p.muted),
                Rect::new(inner.x, inner.y + 2, inner.width, 1),
            );
        }
    }
    render_detail(app, p, frame, l.detail);
}

fn render_detail(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let Some(r) = app.runs.get(app.selected_run) else {
        frame.render_widget(p.block(" Run ", false), area);
        return;
    };
    let h = &r.history;
    let dir = h
        .dir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "-".into());
    let mut lines = vec![Line::from(vec![
        Span::styled(dir, p.base),
        Span::styled(
            format!(
                "  params {} total / {} active · seed {}",
                grouped(h.total_params),
                grouped(h.active_params),
                h.seed
            ),
            p.muted,
        ),
    ])];
    if let Some(e) = &h.error {
        lines.push(Line::styled(e.clone(), p.error));
    } else if let Some(e) = h.evals.last() {
        lines.push(Line::styled(
            format!(
                "last eval at step {}: val loss {:.4}, {:.4} bits/byte{}",
                e.step,
                e.val_loss,
                e.val_bpb,
                e.val_acc
                    .map(|a| format!(", accuracy {:.1}%", a * 100.0))
                    .unwrap_or_default()
            ),
            p.muted,
        ));
    }
    if let Some(line) = sparsity_line(h) {
        lines.push(Line::styled(line, p.muted));
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(p.block(format!(" {} ", h.label), false)),
        area,
    );
}

/// The sparsity column: pruned share of the prunable weights now ("-" for unpruned runs).
fn sparsity_cell(h: &crate::lab::history::RunHistory) -> String {
    h.sparsity
        .last()
        .map(|s| format!("{:.1}%", s.sparsity * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// Pruned runs: overall sparsity of the prunable weights and its split over components
/// (summed over layers), from the last `sparsity` event.
pub fn sparsity_line(h: &crate::lab::history::RunHistory) -> Option<String> {
    let last = h.sparsity.last()?;
    let mut parts: Vec<(String, u64, u64)> = Vec::new();
    for c in &h.components {
        match parts.iter_mut().find(|p| p.0 == c.component) {
            Some(p) => {
                p.1 += c.pruned;
                p.2 += c.total;
            }
            None => parts.push((c.component.clone(), c.pruned, c.total)),
        }
    }
    let split: Vec<String> = parts
        .iter()
        .map(|(n, pr, t)| format!("{n} {:.0}%", *pr as f64 * 100.0 / (*t).max(1) as f64))
        .collect();
    Some(format!(
        "sparsity {:.1}% of prunable weights at step {} (target {:.0}%, {:.1}% of all params): {}",
        last.sparsity * 100.0,
        last.step,
        last.target * 100.0,
        last.model_sparsity * 100.0,
        split.join(", ")
    ))
}
