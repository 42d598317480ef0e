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

/// A progress line on stderr (seconds since the first trace, and the thread) when
/// MOZ_LAB_TRACE is set: for finding where a GPU run stalls without a debugger.
pub fn trace(what: impl FnOnce() -> String) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    let start = START.get_or_init(|| std::env::var_os("MOZ_LAB_TRACE").map(|_| Instant::now()));
    if let Some(t0) = start {
        let thread = std::thread::current();
        eprintln!(
            "[trace {:9.3}s {}] {}",
            t0.elapsed().as_secs_f64(),
            thread.name().unwrap_or("?"),
            what()
        );
    }
}
