//! Deterministic synthetic `RunEvent` streams: the frame-time benchmark and the UI tests
//! drive the lab with them (no training, no wall clock).
use super::app::{App, LabConfig, View};
use crate::lab::history::RunHistory;
use crate::lab::jobs::RunEvent;
use crate::train::RoutingLoad;

/// A reproducible value in [-0.5, 0.5).
fn noise(seed: u64, i: u64) -> f64 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
}

/// Shape of a synthetic run.
#[derive(Debug, Clone)]
pub struct SyntheticRun {
    /// `experiment/variant`.
    pub label: String,
    pub seed: u64,
    /// Steps already taken (events up to here are produced).
    pub steps: u64,
    pub target_steps: u64,
    /// Experts per sparsified projection; 0 for a dense run (no routing events).
    pub experts: usize,
    pub layers: usize,
    pub eval_interval: u64,
    pub routing_interval: u64,
    /// End with `Finished` when `steps == target_steps`.
    pub finish: bool,
}

impl SyntheticRun {
    pub fn new(label: &str, seed: u64, steps: u64, target_steps: u64) -> SyntheticRun {
        SyntheticRun {
            label: label.into(),
            seed,
            steps,
            target_steps,
            experts: 0,
            layers: 2,
            eval_interval: 50,
            routing_interval: 10,
            finish: true,
        }
    }

    pub fn with_experts(mut self, experts: usize) -> SyntheticRun {
        self.experts = experts;
        self
    }

    pub fn started(&self) -> RunEvent {
        let dense = 120_000;
        let extra = self.experts.saturating_sub(1) * 40_000;
        RunEvent::Started {
            run: self.label.clone(),
            variant: self.label.rsplit('/').next().unwrap_or("").to_string(),
            seed: self.seed,
            device: "cpu (2 threads)".into(),
            total_params: dense + extra,
            active_params: dense + self.experts * 128,
            steps: self.target_steps,
            tokens_per_step: 1024,
            resumed_from: None,
        }
    }

    pub fn loss(&self, step: u64) -> f64 {
        let offset = self.seed as f64 * 0.05 + if self.experts > 0 { -0.08 } else { 0.0 };
        1.4 + offset + 4.1 * (-(step as f64) / 250.0).exp() + 0.08 * noise(self.seed, step)
    }

    fn routing(&self, step: u64) -> RunEvent {
        let e = self.experts;
        let loads = (0..self.layers)
            .map(|layer| RoutingLoad {
                layer,
                module: "z".into(),
                // Uneven on purpose; the last expert of layer 0 never gets a token.
                counts: (0..e)
                    .map(|x| {
                        if layer == 0 && x == e - 1 {
                            0
                        } else {
                            let skew = 1.0 + (x as f64 * 0.7 + layer as f64).sin().abs() * 2.0;
                            (skew * 100.0 * (1.0 + 0.3 * noise(self.seed + x as u64, step)))
                                as usize
                        }
                    })
                    .collect(),
            })
            .collect();
        RunEvent::Routing { step, loads }
    }

    /// Every event of the run so far, in order.
    pub fn events(&self) -> Vec<RunEvent> {
        let mut out = vec![self.started()];
        for step in 1..=self.steps {
            let tokens = step * 1024;
            let elapsed_s = step as f64 * 0.5;
            out.push(RunEvent::Step {
                step,
                tokens,
                loss: self.loss(step),
                aux_loss: 0.01,
                lr: 3e-3,
                grad_norm: 1.0,
                tokens_per_s: 2048.0,
                elapsed_s,
                gpu_mem: None,
            });
            if self.experts > 0 && step % self.routing_interval == 0 {
                out.push(self.routing(step));
            }
            if step % self.eval_interval == 0 {
                out.push(RunEvent::Eval {
                    step,
                    tokens,
                    val_loss: self.loss(step) + 0.05,
                    val_bpb: (self.loss(step) + 0.05) / std::f64::consts::LN_2,
                    val_acc: None,
                    elapsed_s,
                });
            }
        }
        if self.finish && self.steps >= self.target_steps {
            out.push(RunEvent::Finished {
                step: self.steps,
                tokens: self.steps * 1024,
                val_loss: Some(self.loss(self.steps) + 0.05),
                elapsed_s: self.steps as f64 * 0.5,
            });
        }
        out
    }

    pub fn history(&self) -> RunHistory {
        let mut h = RunHistory::new(self.label.clone());
        h.dir = Some(format!("runs/{}", self.label).into());
        for e in self.events() {
            h.apply(&e);
        }
        h
    }
}

/// The benchmark's dashboard: `runs` live runs of `points` steps each, all in the chart.
pub fn dashboard(runs: usize, points: u64) -> App {
    let mut app = App::new(LabConfig::default(), 0);
    for i in 0..runs {
        let mut r = SyntheticRun::new(&format!("bench/variant-{i}"), i as u64, points, points * 2);
        if i % 2 == 1 {
            r = r.with_experts(8);
        }
        app.push_run(r.history(), true);
    }
    app.view = View::Chart;
    app
}
