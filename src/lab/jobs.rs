//! Training jobs on background threads. A job publishes `RunEvent`s over a channel (the
//! headless runner and the TUI consume the same stream) and appends each one to its run's
//! `metrics.jsonl`. A `JobControl` pauses, resumes or stops it between steps. Errors and
//! panics inside a job become `Failed` events; they never take the process down.
use crate::prune::ComponentSparsity;
use crate::train::RoutingLoad;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    Started {
        run: String,
        variant: String,
        seed: u64,
        device: String,
        total_params: usize,
        active_params: usize,
        steps: u64,
        tokens_per_step: u64,
        /// Step the run resumed from, if it continued a checkpoint.
        resumed_from: Option<u64>,
    },
    Step {
        step: u64,
        tokens: u64,
        loss: f64,
        aux_loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
        /// Bytes of GPU memory in use after the step (GPU runs only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpu_mem: Option<u64>,
    },
    Eval {
        step: u64,
        tokens: u64,
        val_loss: f64,
        val_bpb: f64,
        val_acc: Option<f64>,
        elapsed_s: f64,
    },
    Routing {
        step: u64,
        loads: Vec<RoutingLoad>,
    },
    Checkpoint {
        step: u64,
        path: String,
    },
    /// The pruning masks after a pruning step (or after a resume restored them).
    Sparsity {
        step: u64,
        /// Scheduled sparsity of the prunable weights.
        target: f64,
        /// Measured: pruned share of the prunable weights.
        sparsity: f64,
        /// Pruned share of all parameters.
        model_sparsity: f64,
        components: Vec<ComponentSparsity>,
    },
    Paused {
        step: u64,
    },
    Resumed {
        step: u64,
    },
    Finished {
        step: u64,
        tokens: u64,
        val_loss: Option<f64>,
        elapsed_s: f64,
    },
    Stopped {
        step: u64,
    },
    /// The loss became NaN or infinite; the run was stopped.
    Diverged {
        step: u64,
        detail: String,
    },
    Failed {
        step: Option<u64>,
        error: String,
    },
}

impl RunEvent {
    /// True for the events after which a job sends nothing more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunEvent::Finished { .. }
                | RunEvent::Stopped { .. }
                | RunEvent::Diverged { .. }
                | RunEvent::Failed { .. }
        )
    }

    pub fn step(&self) -> Option<u64> {
        match self {
            RunEvent::Started { resumed_from, .. } => *resumed_from,
            RunEvent::Step { step, .. }
            | RunEvent::Eval { step, .. }
            | RunEvent::Routing { step, .. }
            | RunEvent::Checkpoint { step, .. }
            | RunEvent::Sparsity { step, .. }
            | RunEvent::Paused { step }
            | RunEvent::Resumed { step }
            | RunEvent::Finished { step, .. }
            | RunEvent::Stopped { step }
            | RunEvent::Diverged { step, .. } => Some(*step),
            RunEvent::Failed { step, .. } => *step,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// Unix time in seconds.
    pub time: f64,
    #[serde(flatten)]
    pub event: RunEvent,
}

/// An event tagged with the job that sent it.
#[derive(Debug, Clone)]
pub struct RunMessage {
    pub job: usize,
    pub event: RunEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlState {
    Running,
    Paused,
    Stopping,
}

/// Pause / resume / stop, observed by the job between steps.
#[derive(Debug)]
pub struct JobControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

/// What the job should do at a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    Continue,
    Stop,
}

impl Default for JobControl {
    fn default() -> Self {
        JobControl {
            state: Mutex::new(ControlState::Running),
            changed: Condvar::new(),
        }
    }
}

impl JobControl {
    pub fn pause(&self) {
        let mut s = self.state.lock().unwrap();
        if *s == ControlState::Running {
            *s = ControlState::Paused;
        }
    }
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        if *s == ControlState::Paused {
            *s = ControlState::Running;
            self.changed.notify_all();
        }
    }
    pub fn stop(&self) {
        *self.state.lock().unwrap() = ControlState::Stopping;
        self.changed.notify_all();
    }
    pub fn is_paused(&self) -> bool {
        *self.state.lock().unwrap() == ControlState::Paused
    }

    /// Called between steps: blocks while paused. `on_change(true)` runs when the pause is
    /// observed, `on_change(false)` when the job resumes.
    pub fn wait(&self, mut on_change: impl FnMut(bool)) -> Directive {
        let mut s = self.state.lock().unwrap();
        if *s == ControlState::Paused {
            drop(s);
            on_change(true);
            s = self.state.lock().unwrap();
            while *s == ControlState::Paused {
                s = self.changed.wait(s).unwrap();
            }
            if *s == ControlState::Running {
                drop(s);
                on_change(false);
                return Directive::Continue;
            }
        }
        match *s {
            ControlState::Stopping => Directive::Stop,
            _ => Directive::Continue,
        }
    }
}

/// Append-only `metrics.jsonl`: one JSON object per line, each written with a single write so
/// a crash never leaves a torn line behind a complete one.
pub struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(path: &Path) -> std::io::Result<MetricsLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(MetricsLog { file })
    }

    pub fn append(&mut self, event: &RunEvent) -> std::io::Result<()> {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut line = serde_json::to_string(&LoggedEvent {
            time,
            event: event.clone(),
        })
        .map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())
    }
}

/// Reads a run's `metrics.jsonl` (skipping a torn last line).
pub fn read_metrics(path: &Path) -> std::io::Result<Vec<LoggedEvent>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// What a job body gets: a way to publish events and its control.
pub struct JobContext {
    pub job: usize,
    pub control: Arc<JobControl>,
    tx: Sender<RunMessage>,
    log: Option<MetricsLog>,
    last_step: Option<u64>,
}

impl JobContext {
    /// Starts (or switches) appending events to `path`.
    pub fn log_to(&mut self, path: &Path) -> std::io::Result<()> {
        self.log = Some(MetricsLog::open(path)?);
        Ok(())
    }

    pub fn emit(&mut self, event: RunEvent) {
        if let Some(s) = event.step() {
            self.last_step = Some(s);
        }
        if let Some(log) = &mut self.log {
            // A full disk must not kill the run's event stream; the TUI still sees it.
            let _ = log.append(&event);
        }
        // The receiver may be gone (headless runner exited): nothing to do then.
        let _ = self.tx.send(RunMessage {
            job: self.job,
            event,
        });
    }
}

pub struct JobHandle {
    pub job: usize,
    pub control: Arc<JobControl>,
    pub log_path: Option<PathBuf>,
    thread: Option<JoinHandle<()>>,
}

impl JobHandle {
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .map(|t| t.is_finished())
            .unwrap_or(true)
    }
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Joins the job's thread if it exits within `limit` (true), else leaves it detached
    /// (false): a thread stuck in a driver's teardown after its run ended must not hang the
    /// caller, whose run has already reported its end.
    pub fn join_within(self, limit: std::time::Duration) -> bool {
        let t0 = std::time::Instant::now();
        while !self.is_finished() {
            if t0.elapsed() > limit {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.join();
        true
    }
}

/// A job's error as the user reads it: a CUDA out-of-memory error says so first (the raw
/// driver error follows), so a run too large for the GPU is recognisable in the runs table.
pub fn describe_error(raw: &str) -> String {
    if raw.contains("OUT_OF_MEMORY") || raw.to_ascii_lowercase().contains("out of memory") {
        format!("GPU out of memory (reduce batch_size, seq_len or the model, or run fewer GPU jobs at once): {raw}")
    } else {
        raw.to_string()
    }
}

/// Runs `body` on a new thread. If it returns an error or panics, a `Failed` event is sent
/// (and logged); the process and the other jobs carry on.
pub fn spawn_job<F>(
    job: usize,
    tx: Sender<RunMessage>,
    log_path: Option<PathBuf>,
    body: F,
) -> JobHandle
where
    F: FnOnce(&mut JobContext) -> anyhow::Result<()> + Send + 'static,
{
    let control = Arc::new(JobControl::default());
    let ctl = control.clone();
    let path = log_path.clone();
    let thread = std::thread::Builder::new()
        .name(format!("moz-lab-job-{job}"))
        .spawn(move || {
            let mut ctx = JobContext {
                job,
                control: ctl,
                tx,
                log: None,
                last_step: None,
            };
            if let Some(p) = &path {
                if let Err(e) = ctx.log_to(p) {
                    ctx.emit(RunEvent::Failed {
                        step: None,
                        error: format!("cannot open {}: {e}", p.display()),
                    });
                    return;
                }
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut ctx)));
            crate::trace(|| {
                format!(
                    "job {job} returned (its state dropped): ok {}",
                    matches!(outcome, Ok(Ok(())))
                )
            });
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(describe_error(&format!("{e:#}"))),
                Err(panic) => Some(format!("panic: {}", panic_message(&panic))),
            };
            if let Some(error) = error {
                let step = ctx.last_step;
                ctx.emit(RunEvent::Failed { step, error });
            }
        })
        .expect("spawning a job thread");
    JobHandle {
        job,
        control,
        log_path,
        thread: Some(thread),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

#[cfg(test)]
mod describe_error_tests {
    use super::describe_error;

    #[test]
    fn cuda_out_of_memory_is_named_first() {
        let raw = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        let msg = describe_error(raw);
        assert!(msg.starts_with("GPU out of memory"), "{msg}");
        assert!(msg.ends_with(raw));
        assert_eq!(describe_error("shape mismatch"), "shape mismatch");
    }
}
