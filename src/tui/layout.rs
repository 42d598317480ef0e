//! Screen geometry, shared by the views (to draw) and by mouse handling (to hit-test), so a
//! click lands on what was drawn there.
use super::app::View;
use ratatui::layout::{Constraint, Layout, Rect};

pub const APP_NAME: &str = " moz-lab ";

pub struct Screen {
    pub header: Rect,
    pub body: Rect,
    pub status: Rect,
}

pub fn screen(area: Rect) -> Screen {
    let [header, body, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    Screen {
        header,
        body,
        status,
    }
}

pub fn tab_label(view: View) -> String {
    format!(" {} {} ", view.index() + 1, view.title())
}

/// Where each view's tab is drawn in the header.
pub fn tabs(header: Rect) -> Vec<(View, Rect)> {
    let mut x = header.x + APP_NAME.len() as u16;
    View::ALL
        .iter()
        .map(|&v| {
            let w = tab_label(v).chars().count() as u16;
            let r = Rect::new(x, header.y, w, 1).intersection(header);
            x += w;
            (v, r)
        })
        .collect()
}

pub struct ExperimentsLayout {
    pub files: Rect,
    pub variants: Rect,
    pub editor: Rect,
    pub preview: Rect,
}

/// Height of the editor box: one row per field plus borders.
pub const EDITOR_HEIGHT: u16 = super::editor::FIELDS.len() as u16 + 2;

pub fn experiments(body: Rect, n_files: usize) -> ExperimentsLayout {
    let left_w = (body.width * 35 / 100).clamp(24.min(body.width), 36);
    let [left, right] =
        Layout::horizontal([Constraint::Length(left_w), Constraint::Min(0)]).areas(body);
    let files_h = (n_files as u16 + 2).clamp(3, (body.height / 2).max(3));
    let [files, variants] =
        Layout::vertical([Constraint::Length(files_h), Constraint::Min(0)]).areas(left);
    // The preview keeps at least 7 rows; the editor scrolls when it gets fewer than its fields.
    let editor_h = EDITOR_HEIGHT.min(right.height.saturating_sub(7)).max(3);
    let [editor, preview] =
        Layout::vertical([Constraint::Length(editor_h), Constraint::Min(0)]).areas(right);
    ExperimentsLayout {
        files,
        variants,
        editor,
        preview,
    }
}

pub struct RunsLayout {
    pub table: Rect,
    pub detail: Rect,
}

pub fn runs(body: Rect) -> RunsLayout {
    let [table, detail] = Layout::vertical([Constraint::Min(0), Constraint::Length(4)]).areas(body);
    RunsLayout { table, detail }
}

pub struct ChartLayout {
    pub chart: Rect,
    pub legend: Rect,
}

pub fn chart(body: Rect, runs: usize) -> ChartLayout {
    let rows = (runs.max(1) as u16).min((body.height / 3).max(1));
    let [chart, legend] =
        Layout::vertical([Constraint::Min(0), Constraint::Length(rows + 2)]).areas(body);
    ChartLayout { chart, legend }
}

/// First visible row of a list of which `selected` must stay visible in `visible` rows.
pub fn list_offset(selected: usize, visible: usize) -> usize {
    selected.saturating_sub(visible.saturating_sub(1))
}

/// The inside of a bordered block.
pub fn inner(r: Rect) -> Rect {
    Rect::new(
        r.x.saturating_add(1),
        r.y.saturating_add(1),
        r.width.saturating_sub(2),
        r.height.saturating_sub(2),
    )
}

/// Row `index` of a bordered list whose first `skip` inner rows are headers, if (col, row)
/// hits an item.
pub fn list_hit(
    area: Rect,
    skip: u16,
    selected: usize,
    len: usize,
    col: u16,
    row: u16,
) -> Option<usize> {
    let inner = inner(area);
    let first = inner.y + skip;
    if col < inner.x || col >= inner.right() || row < first || row >= inner.bottom() {
        return None;
    }
    let visible = (inner.bottom() - first) as usize;
    let index = list_offset(selected, visible) + (row - first) as usize;
    (index < len).then_some(index)
}
