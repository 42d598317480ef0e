//! Experiments view: spec files (with their errors), the variants of the selected one, the
//! variant editor and its live parameter counts.
use super::{grouped, Palette};
use crate::tui::app::{App, ExpFocus};
use crate::tui::editor::{Draft, Field, FIELDS};
use crate::tui::layout::{self, list_offset};
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::Frame;

pub fn render(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let l = layout::experiments(area, app.experiments.len());
    render_files(app, p, frame, l.files);
    render_variants(app, p, frame, l.variants);
    let right = Rect::new(
        l.editor.x,
        l.editor.y,
        l.editor.width,
        l.editor.height + l.preview.height,
    );
    match app.selected_entry().map(|e| &e.spec) {
        None => {
            let text = format!(
                "No experiment specs yet. Put a *.toml file in {}/ (see experiments/quickstart.toml \
                 in the moz-lab repository); it appears here as soon as it is saved.",
                app.config.experiments_dir.display()
            );
            frame.render_widget(
                Paragraph::new(text)
                    .style(p.muted)
                    .wrap(Wrap { trim: true })
                    .block(p.block(" Variant ", false)),
                right,
            );
        }
        Some(Err(e)) => {
            let name = app
                .selected_entry()
                .map(|e| e.file_name())
                .unwrap_or_default();
            let lines = vec![
                Line::from(Span::styled(e.to_string(), p.error)),
                Line::from(""),
                Line::from(Span::styled(
                    "Fix the file and save it: the lab reloads it and this message goes.",
                    p.muted,
                )),
            ];
            frame.render_widget(
                Paragraph::new(lines)
                    .wrap(Wrap { trim: false })
                    .block(p.block(Line::styled(format!(" {name}: error "), p.error), true)),
                right,
            );
        }
        Some(Ok(_)) => {
            render_editor(app, p, frame, l.editor);
            render_preview(app, p, frame, l.preview);
        }
    }
}

fn render_files(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let focused = app.exp_focus == ExpFocus::Files;
    let title = format!(" Specs in {}/ ", app.config.experiments_dir.display());
    let visible = area.height.saturating_sub(2) as usize;
    let offset = list_offset(app.selected_experiment, visible);
    let lines: Vec<Line> = app
        .experiments
        .iter()
        .enumerate()
        .skip(offset)
        .take(visible)
        .map(|(i, e)| {
            let (mark, style) = if e.is_ok() {
                ("✓ ", p.ok)
            } else {
                ("✗ ", p.error)
            };
            let row = if i == app.selected_experiment {
                p.selected
            } else {
                p.base
            };
            Line::from(vec![
                Span::styled(mark, style.bg(row.bg.unwrap_or_default())),
                Span::styled(e.file_name(), row),
            ])
            .style(row)
        })
        .collect();
    let body = if lines.is_empty() {
        vec![Line::styled("(no *.toml files)", p.muted)]
    } else {
        lines
    };
    frame.render_widget(Paragraph::new(body).block(p.block(title, focused)), area);
}

fn variant_summary(d: &Draft) -> String {
    let proj: Vec<&str> = d.projections().iter().map(|p| p.name()).collect();
    if proj.is_empty() {
        "dense".into()
    } else {
        proj.join(",")
    }
}

fn render_variants(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let focused = app.exp_focus == ExpFocus::Variants;
    let mut lines = Vec::new();
    match (app.selected_entry(), app.selected_spec()) {
        (Some(entry), Some(spec)) => {
            let visible = area.height.saturating_sub(2) as usize;
            let offset = list_offset(app.selected_variant, visible);
            for (i, v) in spec
                .file
                .variants
                .iter()
                .enumerate()
                .skip(offset)
                .take(visible)
            {
                let draft = app
                    .drafts
                    .get(&(entry.path.clone(), i))
                    .cloned()
                    .unwrap_or_else(|| Draft::of(spec, i));
                let edited = app.drafts.contains_key(&(entry.path.clone(), i));
                let row = if i == app.selected_variant {
                    p.selected
                } else {
                    p.base
                };
                lines.push(
                    Line::from(vec![
                        Span::styled(format!("{}{} ", v.name, if edited { "*" } else { "" }), row),
                        Span::styled(
                            variant_summary(&draft),
                            p.muted.bg(row.bg.unwrap_or_default()),
                        ),
                    ])
                    .style(row),
                );
            }
        }
        (Some(_), None) => lines.push(Line::styled("(the spec has errors)", p.error)),
        _ => {}
    }
    let title = match app.selected_spec() {
        Some(s) => format!(" Variants of {} ", s.name),
        None => " Variants ".into(),
    };
    frame.render_widget(Paragraph::new(lines).block(p.block(title, focused)), area);
}

fn render_editor(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let focused = app.exp_focus == ExpFocus::Editor;
    let Some(draft) = app.draft() else {
        frame.render_widget(p.block(" Variant ", focused), area);
        return;
    };
    let name = &draft.variant.name;
    let modified = app.draft_modified();
    let title = Line::from(vec![
        Span::raw(format!(" Variant {name} ")),
        if modified {
            Span::styled("(unsaved: s saves, u reverts) ", p.warning)
        } else {
            Span::raw("")
        },
    ]);
    let solved = app
        .preview
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .map(|pv| pv.experts);
    let lines: Vec<Line> = FIELDS
        .iter()
        .enumerate()
        .map(|(i, &field)| {
            let row = if focused && i == app.editor_row {
                p.selected
            } else {
                p.base
            };
            let bg = row.bg.unwrap_or_default();
            let (mark, value): (Span, Span) = match field {
                Field::Sparsify(proj) => {
                    let on = draft.is_sparse(proj);
                    (
                        Span::styled(
                            if on { "[x] " } else { "[ ] " },
                            if on { p.accent.bg(bg) } else { p.muted.bg(bg) },
                        ),
                        Span::styled(if on { "top-k experts" } else { "dense" }, p.muted.bg(bg)),
                    )
                }
                _ => (
                    Span::styled("    ", row),
                    field_value(app, &draft, field, solved, p, bg),
                ),
            };
            let editing = app.text_input.as_ref().is_some_and(|t| t.field == field);
            let label_style = if editing { p.accent.bg(bg) } else { row };
            Line::from(vec![
                mark,
                Span::styled(format!("{:<13}", field.label()), label_style),
                value,
            ])
            .style(row)
        })
        .collect();
    // Short terminals scroll the fields so the selected one stays visible.
    let visible = area.height.saturating_sub(2) as usize;
    let offset = crate::tui::layout::list_offset(app.editor_row, visible) as u16;
    frame.render_widget(
        Paragraph::new(lines)
            .scroll((offset, 0))
            .block(p.block(title, focused)),
        area,
    );
}

fn field_value<'a>(
    app: &App,
    d: &Draft,
    field: Field,
    solved: Option<usize>,
    p: &Palette,
    bg: ratatui::style::Color,
) -> Span<'a> {
    let v = &d.variant;
    let value = |s: String| Span::styled(s, p.base.bg(bg).add_modifier(Modifier::BOLD));
    let default = |s: String| Span::styled(s, p.muted.bg(bg));
    let dense = d.projections().is_empty();
    if let Some(input) = app.text_input.as_ref().filter(|t| t.field == field) {
        return Span::styled(format!("{}_", input.buffer), p.accent.bg(bg));
    }
    match field {
        Field::Experts => match (v.experts, v.match_total, solved) {
            _ if dense => default("- (dense)".into()),
            (Some(e), _, _) => value(e.to_string()),
            (None, Some(_), Some(s)) => default(format!("{s} (solved for match_total)")),
            _ => default("4 (default)".into()),
        },
        Field::MatchTotal => match v.match_total {
            Some(r) => value(format!("{r}x dense")),
            None => default("- (experts set directly)".into()),
        },
        Field::TopK => match v.top_k {
            Some(k) => value(k.to_string()),
            None => default("1 (default)".into()),
        },
        Field::Pattern => match (&v.pattern, app.selected_spec()) {
            (Some(pat), _) => value(pat.clone()),
            (None, Some(s)) => default(format!("{} (model)", s.file.model.pattern)),
            _ => default("-".into()),
        },
        Field::PruneMethod => match &v.prune {
            Some(pr) => value(pr.method.name().into()),
            None => default("off (dense training)".into()),
        },
        Field::PruneTarget => match &v.prune {
            Some(pr) => value(format!("{:.0}% of prunable weights", pr.target * 100.0)),
            None => default("-".into()),
        },
        Field::PruneSchedule => match (&v.prune, app.selected_spec()) {
            (Some(pr), Some(s)) => {
                let steps = s.file.train.steps;
                value(match pr.schedule {
                    crate::prune::PruneSchedule::Cubic => format!(
                        "cubic, steps {}..{} every {}",
                        pr.start_step,
                        pr.end(steps),
                        pr.interval
                    ),
                    crate::prune::PruneSchedule::OneShot => {
                        format!("one-shot at step {}", pr.start_step)
                    }
                })
            }
            (Some(pr), None) => value(pr.schedule.name().into()),
            (None, _) => default("-".into()),
        },
        Field::PruneScope => match &v.prune {
            Some(pr) if pr.method == crate::prune::Method::Wanda => {
                default("per output row (wanda)".into())
            }
            Some(pr) => value(pr.scope.name().into()),
            None => default("-".into()),
        },
        Field::AForm => match (&v.a_form, app.selected_spec()) {
            (Some(f), _) => value(f.clone()),
            (None, Some(s)) => default(format!("{} (model)", s.file.model.a_form)),
            _ => default("-".into()),
        },
        Field::Seeds => value(
            d.seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Field::Sparsify(_) => Span::styled("", Style::default()),
    }
}

fn render_preview(app: &App, p: &Palette, frame: &mut Frame, area: Rect) {
    let lines: Vec<Line> = match &app.preview {
        Some(Ok(pv)) => {
            let ratio = |n: usize| n as f64 / pv.dense_total.max(1) as f64;
            let sparse = !pv.projections.is_empty();
            let mut lines = vec![
                Line::from(vec![
                    Span::styled("total   ", p.muted),
                    Span::styled(format!("{:>12}", grouped(pv.total)), p.accent),
                    Span::styled(format!("  {:.2}x dense", ratio(pv.total)), p.muted),
                ]),
                Line::from(vec![
                    Span::styled("active  ", p.muted),
                    Span::styled(format!("{:>12}", grouped(pv.active)), p.accent),
                    Span::styled(format!("  {:.2}x dense", ratio(pv.active)), p.muted),
                ]),
                Line::from(vec![
                    Span::styled("dense   ", p.muted),
                    Span::styled(format!("{:>12}", grouped(pv.dense_total)), p.base),
                ]),
            ];
            let routing = if sparse {
                let names: Vec<&str> = pv.projections.iter().map(|x| x.name()).collect();
                format!(
                    "{} experts, top-{} on {}",
                    pv.experts,
                    pv.top_k,
                    names.join(", ")
                )
            } else {
                "no experts (dense Mamba2)".into()
            };
            lines.push(Line::styled(
                format!("{routing} · layers {}", pv.layer_pattern),
                p.muted,
            ));
            lines.push(Line::from(""));
            lines.push(Line::styled(
                format!("{:<26} {:>10} {:>10}", "component", "total", "active"),
                p.muted,
            ));
            for (name, total, active) in &pv.components {
                lines.push(Line::styled(
                    format!(
                        "{name:<26} {:>10} {:>10}",
                        grouped(*total),
                        grouped(*active)
                    ),
                    p.base,
                ));
            }
            lines
        }
        Some(Err(e)) => vec![Line::styled(e.clone(), p.error)],
        None => vec![],
    };
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(p.block(" Parameters (live) ", false)),
        area,
    );
}
