//! Publication figures as PNG (plotters): loss curves and routing heatmaps.
//!
//! Figures use the theme's `export` colours (paper-white by default) and an embedded DejaVu
//! Sans, so they render identically on machines without system fonts. Files are written
//! atomically (temporary file, then rename).
mod chart;
pub mod cli;
mod heatmap;
pub(crate) mod render;
mod sparsity;

pub use chart::{group_seeds, write_loss_chart, write_seed_band_chart, ChartOptions, SeedGroup};
pub(crate) use chart::{mean_band, Ticked};
pub use heatmap::write_routing_heatmap;
pub use sparsity::{write_sparsity_chart, SparsitySeries};
