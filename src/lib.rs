//! moz-lab: sparsification experiments on Mamba language models.
//!
//! Data flows one way: experiment spec (TOML) -> validated run specs -> training job (thread)
//! -> a stream of `RunEvent`s -> stored metrics (and, later, TUI state and plots).
pub mod bench;
pub mod data;
pub mod device;
pub mod lab;
pub mod model;
pub mod ops;
pub mod plot;
pub mod prune;
pub mod theme;
pub mod train;
pub mod tui;
