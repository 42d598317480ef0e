//! Performs the effects `update` returns: training jobs on background threads (their
//! `JobHandle`s live here), spec writes, PNG exports on a thread.
use super::effect::{Effect, ExportRequest};
use super::event::AppEvent;
use crate::lab::jobs::{JobHandle, RunEvent, RunMessage};
use crate::lab::runner::spawn_run;
use crate::plot::{
    group_seeds, write_loss_chart, write_routing_heatmap, write_seed_band_chart, ChartOptions,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, SyncSender};

pub struct Runtime {
    handles: HashMap<usize, JobHandle>,
    /// Jobs publish here (unbounded, so training never waits on the UI); a forwarding
    /// thread moves the messages into the app channel.
    run_tx: Sender<RunMessage>,
    app_tx: SyncSender<AppEvent>,
}

impl Runtime {
    pub fn new(run_tx: Sender<RunMessage>, app_tx: SyncSender<AppEvent>) -> Runtime {
        Runtime {
            handles: HashMap::new(),
            run_tx,
            app_tx,
        }
    }

    /// Performs one effect; returns events to feed straight back into `update`.
    pub fn execute(&mut self, effect: Effect) -> Vec<AppEvent> {
        match effect {
            Effect::Spawn { job, run } => match spawn_run(job, *run, false, self.run_tx.clone()) {
                Ok(handle) => {
                    self.handles.insert(job, handle);
                    vec![]
                }
                Err(e) => vec![AppEvent::Run(RunMessage {
                    job,
                    event: RunEvent::Failed {
                        step: None,
                        error: format!("{e:#}"),
                    },
                })],
            },
            Effect::Pause(job) => {
                if let Some(h) = self.handles.get(&job) {
                    h.control.pause();
                }
                vec![]
            }
            Effect::Resume(job) => {
                if let Some(h) = self.handles.get(&job) {
                    h.control.resume();
                }
                vec![]
            }
            Effect::Stop(job) => {
                if let Some(h) = self.handles.get(&job) {
                    h.control.stop();
                }
                vec![]
            }
            Effect::WriteFile { path, contents } => match std::fs::write(&path, contents) {
                // Reload now rather than wait for the watcher (which then sees no change).
                Ok(()) => vec![
                    AppEvent::FilesChanged(vec![path.clone()]),
                    AppEvent::EffectDone(format!("saved {}", path.display())),
                ],
                Err(e) => vec![AppEvent::EffectFailed(format!(
                    "cannot write {}: {e}",
                    path.display()
                ))],
            },
            Effect::Export(request) => {
                let tx = self.app_tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("moz-lab-export".into())
                    .spawn(move || {
                        let outcome = std::panic::catch_unwind(|| export_png(&request));
                        let result = match outcome {
                            Ok(r) => r.map_err(|e| format!("{e:#}")),
                            Err(_) => Err("the PNG writer panicked".to_string()),
                        };
                        let _ = tx.send(AppEvent::ExportFinished(result));
                    });
                match spawned {
                    Ok(_) => vec![],
                    Err(e) => vec![AppEvent::ExportFinished(Err(e.to_string()))],
                }
            }
            Effect::Quit => vec![],
        }
    }

    /// Joins job threads that have ended.
    pub fn reap(&mut self) {
        let done: Vec<usize> = self
            .handles
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(&j, _)| j)
            .collect();
        for job in done {
            if let Some(h) = self.handles.remove(&job) {
                h.join();
            }
        }
    }

    /// Stops every job; joins them when `wait` (a forced quit does not wait).
    pub fn shutdown(&mut self, wait: bool) {
        for h in self.handles.values() {
            h.control.stop();
        }
        if wait {
            for (_, h) in self.handles.drain() {
                // A stopped job ends at its next step; a thread stuck past its end is left.
                h.join_within(std::time::Duration::from_secs(10));
            }
        }
    }
}

/// `dir/<stem>-NNN.png` for the first NNN where neither export of that number exists, so a
/// chart and its heatmap share a number and nothing is overwritten.
fn next_export_paths(dir: &Path) -> (PathBuf, PathBuf) {
    for n in 1.. {
        let loss = dir.join(format!("loss-{n:03}.png"));
        let routing = dir.join(format!("routing-{n:03}.png"));
        if !loss.exists() && !routing.exists() {
            return (loss, routing);
        }
    }
    unreachable!("some number is free")
}

/// Writes the loss chart (and the routing heatmap when a run has routing data).
pub fn export_png(req: &ExportRequest) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&req.dir)?;
    let (loss_path, routing_path) = next_export_paths(&req.dir);
    let runs: Vec<&crate::lab::history::RunHistory> = req.runs.iter().collect();
    let opts = ChartOptions {
        metric: req.metric,
        x: req.x,
        smooth: req.smooth,
        log_y: req.log_y,
        x_range: req.x_range,
        ..ChartOptions::default()
    };
    // Seeds of one variant are exported as the live chart shows them: mean with a min-max band.
    let groups = group_seeds(&runs);
    if groups.iter().any(|g| g.runs.len() > 1) {
        write_seed_band_chart(&loss_path, &groups, &opts, &req.theme)?;
    } else {
        write_loss_chart(&loss_path, &runs, &opts, &req.theme)?;
    }
    let mut written = vec![loss_path];
    if let Some(run) = &req.routing_run {
        write_routing_heatmap(
            &routing_path,
            run,
            req.routing_window,
            &req.theme,
            1600,
            1000,
        )?;
        written.push(routing_path);
    }
    Ok(written)
}
