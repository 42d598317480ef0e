//! Sparsity vs validation loss: one line with markers per pruning method and architecture,
//! x = measured sparsity of the prunable weights (%), y = final validation loss.
use super::render::{
    color, draw_err, linear_ticks, text_style, write_png, Area, Scale, TickFormat,
};
use super::Ticked;
use crate::theme::Theme;
use anyhow::Result;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

/// A named series of (sparsity in [0, 1], validation loss) points.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsitySeries {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

pub fn write_sparsity_chart(
    path: &Path,
    series: &[SparsitySeries],
    title: &str,
    theme: &Theme,
    size: (u32, u32),
) -> Result<()> {
    // Non-finite points would draw garbage; drop them.
    let series: Vec<SparsitySeries> = series
        .iter()
        .map(|s| {
            let mut points: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|p| (p.0 * 100.0, p.1))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            SparsitySeries {
                label: s.label.clone(),
                points,
            }
        })
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let (mut y0, mut y1) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(*v), b.max(*v))
        });
    if !(y0.is_finite() && y1.is_finite()) {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let xmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(10.0, f64::max)
        .max(10.0)
        * 1.05;
    write_png(path, size, |root: &Area| {
        let (w, h) = root.dim_in_pixel();
        let s = Scale::of(w, h);
        let fg = theme.export.foreground;
        let bg = color(theme.export.background);
        root.fill(&bg).map_err(draw_err)?;
        let xt = linear_ticks(0.0, xmax, 8);
        let yt = linear_ticks(y0, y1, 8);
        let (xf, yf) = (TickFormat::for_ticks(&xt), TickFormat::for_ticks(&yt));
        let mut chart = ChartBuilder::on(root)
            .caption(title, text_style(s.font(46.0), fg))
            .margin(s.px(30.0, 8.0))
            .x_label_area_size(s.px(100.0, 30.0))
            .y_label_area_size(s.px(120.0, 40.0))
            .build_cartesian_2d(
                Ticked::new(RangedCoordf64::from(-xmax * 0.02..xmax), xt.clone()),
                Ticked::new(RangedCoordf64::from(y0..y1), yt.clone()),
            )
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("sparsity of the prunable weights (%)")
            .y_desc("final validation loss (nats/byte)")
            .axis_desc_style(text_style(s.font(32.0), fg))
            .label_style(text_style(s.font(28.0), fg))
            .x_label_formatter(&|v| xf.format(*v))
            .y_label_formatter(&|v| yf.format(*v))
            .bold_line_style(color(theme.export.grid).stroke_width(s.px(1.5, 1.0)))
            .light_line_style(TRANSPARENT)
            .axis_style(color(fg).stroke_width(s.px(2.0, 1.0)))
            .set_all_tick_mark_size(s.px(8.0, 3.0))
            .draw()
            .map_err(draw_err)?;
        let width = s.px(3.0, 2.0);
        let swatch = s.px(40.0, 16.0) as i32;
        let r = s.px(7.0, 3.0);
        for (i, sr) in series.iter().enumerate() {
            let c = color(theme.export_series(i));
            let style = c.stroke_width(width);
            chart
                .draw_series(LineSeries::new(sr.points.iter().copied(), style))
                .map_err(draw_err)?
                .label(sr.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + swatch, y)], style));
            chart
                .draw_series(sr.points.iter().map(|&p| Circle::new(p, r, c.filled())))
                .map_err(draw_err)?;
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .margin(s.px(16.0, 6.0))
                .legend_area_size(s.px(56.0, 22.0))
                .label_font(text_style(s.font(28.0), fg))
                .background_style(bg.mix(0.9).filled())
                .border_style(color(theme.export.grid).stroke_width(s.px(1.5, 1.0)))
                .draw()
                .map_err(draw_err)?;
        }
        Ok(())
    })
}
