//! `moz-lab bench`: training tokens/s (forward + backward + AdamW) of fixed configs.
use crate::data::Batch;
use crate::device;
use crate::model::count::{preset, solve_experts};
use crate::model::{MambaLm, ModelConfig};
use crate::train::optim::AdamW;
use crate::train::trainer::{optimizer_step, StepPhase, StepSettings};
use crate::train::TrainConfig;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// (model, batch, seq_len) of a named benchmark config.
pub fn config(name: &str) -> Result<(ModelConfig, usize, usize)> {
    match name {
        "lab-small" => Ok((ModelConfig::lab_small(), 8, 512)),
        "tiny" => {
            let mut c = ModelConfig::lab_small();
            c.d_model = 64;
            c.n_layer = 2;
            c.layer_pattern = "MM".into();
            c.headdim = 16;
            c.d_state = 16;
            c.chunk_size = 32;
            Ok((c, 4, 128))
        }
        // The GPU benchmark: one Mamba2 block of the paper's shape, 8 layers.
        "paper-block" => {
            let mut c = ModelConfig::lab_small();
            c.d_model = 1024;
            c.n_layer = 8;
            c.layer_pattern = "M".repeat(8);
            c.expand = 1;
            c.headdim = 64;
            c.d_state = 128;
            c.ngroups = 1;
            c.d_conv = 4;
            c.chunk_size = 256;
            Ok((c, 8, 2048))
        }
        _ => bail!("unknown bench config {name:?}; allowed: lab-small, paper-block, tiny"),
    }
}

/// The variant's model: preset projections, experts solved for 2.0x total, top-1.
pub fn variant(base: &ModelConfig, name: &str) -> Result<ModelConfig> {
    let mut cfg = base.clone();
    let name = if name == "dense" { "mamba2" } else { name };
    cfg.sparsity.projections =
        preset(name).ok_or_else(|| anyhow::anyhow!("unknown variant {name:?}"))?;
    if !cfg.sparsity.projections.is_empty() {
        cfg.sparsity.experts = solve_experts(&cfg, 2.0);
    }
    Ok(cfg)
}

/// Model FLOPs of one training token (forward + backward): 6 per active parameter (every
/// parameter is one multiply-add in a matmul: the tied embedding counts once, as the head), plus
/// the SSD scan's state update and readout (2 x 2 d_inner d_state per Mamba layer, x3 for the
/// backward). Attention's score FLOPs are not counted (paper-block has none).
pub fn flops_per_token(cfg: &ModelConfig, active_params: usize) -> f64 {
    let mamba_layers = cfg
        .layers()
        .iter()
        .filter(|k| matches!(k, crate::model::config::LayerKind::Mamba))
        .count();
    6.0 * active_params as f64 + 12.0 * (cfg.d_inner() * cfg.d_state) as f64 * mamba_layers as f64
}

/// Measured dense matmul throughput (FLOP/s) of `dtype` on `dev`: the MFU ceiling. Square
/// 8192 GEMMs on a GPU (2048 on the CPU), best of several.
pub fn matmul_ceiling(dev: &str, dtype: &str) -> Result<f64> {
    let device = device::resolve(dev)?;
    let dt = device::dtype_of(dtype)?;
    let n = if device.is_cpu() { 2048 } else { 8192 };
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(dt)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(dt)?;
    let mut best = f64::INFINITY;
    for i in 0..6 {
        device.synchronize()?;
        let t = Instant::now();
        let reps = 5;
        for _ in 0..reps {
            let _ = a.matmul(&b)?;
        }
        device.synchronize()?;
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// Seconds of one SSD scan forward + backward at a config's shapes (the op the Mamba2 mixer
/// calls on this device), averaged over 10 runs after 2 warm-up runs.
pub fn time_ssd(
    cfg: &ModelConfig,
    batch: usize,
    seq_len: usize,
    dev: &str,
    dtype: &str,
) -> Result<f64> {
    use candle_core::{Tensor, Var};
    let device = device::resolve(dev)?;
    let dt = device::dtype_of(dtype)?;
    let (h, p, g, n) = (cfg.nheads(), cfg.headdim, cfg.ngroups, cfg.d_state);
    let var = |shape: &[usize], lo: f32, hi: f32| -> Result<Var> {
        Ok(Var::from_tensor(
            &Tensor::rand(lo, hi, shape, &device)?.to_dtype(dt)?,
        )?)
    };
    let xbc = var(&[batch, seq_len, h * p + 2 * g * n], -1.0, 1.0)?;
    let dtv = var(&[batch, seq_len, h], 0.001, 0.1)?;
    let a = var(&[h], -4.0, -1.0)?;
    let d = var(&[h], 0.5, 1.5)?;
    let mut total = 0.0;
    for i in 0..12 {
        device.synchronize()?;
        let t = Instant::now();
        let y = if crate::ops::ssd_cuda::applies(xbc.as_tensor(), p, n) {
            crate::ops::ssd_cuda::ssd_cuda(
                xbc.as_tensor(),
                dtv.as_tensor(),
                None,
                a.as_tensor(),
                d.as_tensor(),
                p,
                g,
                n,
                cfg.chunk_size,
            )?
        } else if crate::ops::fused_cpu(xbc.as_tensor()) {
            crate::ops::ssd::ssd_fused(
                xbc.as_tensor(),
                dtv.as_tensor(),
                a.as_tensor(),
                d.as_tensor(),
                p,
                g,
                n,
                cfg.chunk_size,
            )?
        } else {
            bail!("no SSD op to time on {dev} {dtype}");
        };
        let _ = y.sum_all()?.backward()?;
        device.synchronize()?;
        if i >= 2 {
            total += t.elapsed().as_secs_f64();
        }
    }
    Ok(total / 10.0)
}

/// Host time to issue one (m x 1024) x (1024 x 1024) GEMM when every call has the same m and
/// when each has a new one (the expert GEMMs' row counts change every step), the device
/// synchronised around each batch of 64.
fn gemm_probe(dev: &str, dtype: &str) -> Result<()> {
    let dev = device::resolve(dev)?;
    let dt = device::dtype_of(dtype)?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (1024, 1024), &dev)?.to_dtype(dt)?;
    let x = candle_core::Tensor::randn(0f32, 1.0, (5000, 1024), &dev)?.to_dtype(dt)?;
    for (label, distinct) in [("same m", false), ("new m", true), ("same m", false)] {
        for m_of in [|i: usize| 3000 + 7 * i, |i: usize| 3001 + 11 * i] {
            dev.synchronize()?;
            let t = Instant::now();
            for i in 0..64 {
                let m = if distinct { m_of(i) } else { 4096 };
                let _ = x.narrow(0, 0, m)?.matmul(&w)?;
            }
            let issued = t.elapsed().as_secs_f64();
            dev.synchronize()?;
            println!(
                "gemm probe, {label}: {:.1} us per call issued, {:.1} us per call done",
                issued / 64.0 * 1e6,
                t.elapsed().as_secs_f64() / 64.0 * 1e6
            );
        }
    }
    Ok(())
}

pub struct BenchResult {
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub total: usize,
    pub active: usize,
    pub experts: usize,
}

pub fn measure(
    cfg: &ModelConfig,
    batch: usize,
    seq_len: usize,
    steps: usize,
    warmup: usize,
    dev: &str,
    dtype: &str,
) -> Result<BenchResult> {
    let dev = device::resolve(dev)?;
    let model = MambaLm::new(cfg, &dev, device::dtype_of(dtype)?, 0)?;
    let tc = TrainConfig::default();
    let mut opt = AdamW::new(model.store.params(), &tc)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = batch * seq_len;
    let mut timed = None;
    for i in 0..warmup + steps {
        let b = Batch {
            inputs: (0..n).map(|_| rng.gen_range(0..256)).collect(),
            targets: (0..n).map(|_| rng.gen_range(0..256)).collect(),
            mask: vec![1.0; n],
            batch_size: batch,
            seq_len,
        };
        if i == warmup {
            // Timed from an idle device over all timed steps: each step's AdamW overlaps the
            // next step's forward as it does in training.
            dev.synchronize()?;
            timed = Some(Instant::now());
        }
        let split = std::env::var_os("MOZ_LAB_BENCH_SPLIT").is_some();
        let t = Instant::now();
        // (issued, done) seconds of each phase; done is only measured in a split run.
        let mut marks = [(0.0, 0.0); 3];
        let mut on_phase = |phase: StepPhase| {
            let issued = t.elapsed().as_secs_f64();
            if split {
                let _ = dev.synchronize();
            }
            marks[phase as usize] = (issued, t.elapsed().as_secs_f64());
        };
        let settings = StepSettings {
            lr: 1e-3,
            grad_clip: 1.0,
        };
        optimizer_step(&model, &mut opt, &b, settings, None, &mut on_phase)?;
        if split {
            #[cfg(feature = "cuda")]
            let routing_wait = crate::ops::route_cuda::take_wait_ns() as f64 * 1e-9;
            #[cfg(not(feature = "cuda"))]
            let routing_wait = 0.0;
            let [(f_issued, f_done), (b_issued, b_done), (_, o_done)] = marks;
            eprintln!(
                "  forward {f_done:.3} s (issued in {f_issued:.3} s, of it routing waits {routing_wait:.3} s), backward {:.3} s (issued in {:.3} s), read+clip+AdamW {:.3} s",
                b_done - f_done,
                b_issued - f_done,
                o_done - b_done
            );
        }
    }
    // The last AdamW is only queued when its step returns.
    dev.synchronize()?;
    let step_s = timed.map_or(0.0, |t0| t0.elapsed().as_secs_f64()) / steps as f64;
    Ok(BenchResult {
        tokens_per_s: n as f64 / step_s,
        step_s,
        total: model.store.total_params(),
        active: model.store.active_params(),
        experts: cfg.sparsity.experts,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    config_name: &str,
    variants: &str,
    steps: usize,
    warmup: usize,
    dev: &str,
    dtype: &str,
    ceiling: bool,
    seq_sweep: &str,
) -> Result<()> {
    if std::env::var_os("MOZ_LAB_BENCH_GEMM_PROBE").is_some() {
        gemm_probe(dev, dtype)?;
    }
    let (base, batch, seq_len) = config(config_name)?;
    let peak = if ceiling {
        let c = matmul_ceiling(dev, dtype)?;
        println!(
            "matmul ceiling {dtype}: {:.1} TFLOP/s (square GEMM, best of 5)",
            c / 1e12
        );
        Some(c)
    } else {
        None
    };
    let ssd = if base.headdim <= crate::ops::ssd_cuda::MAX_HEADDIM
        && base.d_state <= crate::ops::ssd_cuda::MAX_STATE
        && cfg!(feature = "cuda")
        && !device::resolve(dev)?.is_cpu()
        && std::env::var_os("MOZ_LAB_COMPOSED_SSD").is_none()
    {
        "SSD: CUDA kernel"
    } else if device::resolve(dev)?.is_cpu() {
        "SSD: fused CPU op"
    } else {
        "SSD: composed candle ops"
    };
    println!(
        "bench {config_name}: d_model {} n_layer {} expand {} headdim {} d_state {} chunk {} seq_len {seq_len} batch {batch} {dtype} on {} ({} steps after {} warm-up; {ssd})",
        base.d_model,
        base.n_layer,
        base.expand,
        base.headdim,
        base.d_state,
        base.chunk_size,
        device::describe(&device::resolve(dev)?),
        steps,
        warmup
    );
    let mut first: Option<(String, f64)> = None;
    for v in variants.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let cfg = variant(&base, v)?;
        let r = measure(&cfg, batch, seq_len, steps, warmup, dev, dtype)?;
        let ratio = match &first {
            Some((name, s)) => format!("  step time {:.3}x {name}", r.step_s / s),
            None => String::new(),
        };
        let mfu = match peak {
            Some(c) => format!(
                ", MFU {:.1}%",
                100.0 * r.tokens_per_s * flops_per_token(&cfg, r.active) / c
            ),
            None => String::new(),
        };
        println!(
            "moz-lab {config_name} {v}: {:.1} tokens/s (step {:.3} s, experts {}, params total {} active {}{mfu}){ratio}",
            r.tokens_per_s, r.step_s, r.experts, r.total, r.active
        );
        if first.is_none() {
            first = Some((v.to_string(), r.step_s));
        }
    }
    if std::env::var_os("MOZ_LAB_BENCH_SPLIT").is_some() {
        if let Ok(s) = time_ssd(&base, batch, seq_len, dev, dtype) {
            println!(
                "SSD op forward + backward, one layer ({ssd}): {:.3} ms",
                s * 1e3
            );
        }
    }
    // Sequence-length sweep at fixed tokens per batch: linear cost keeps tokens/s flat.
    let tokens = batch * seq_len;
    for l in seq_sweep
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let l: usize = l
            .parse()
            .map_err(|_| anyhow::anyhow!("--seq-sweep: {l:?} is not a length"))?;
        if l == 0 || tokens % l != 0 {
            bail!("--seq-sweep: {l} does not divide {tokens} tokens per batch");
        }
        let v = variants.split(',').next().unwrap_or("dense").trim();
        let cfg = variant(&base, v)?;
        let r = measure(&cfg, tokens / l, l, steps, warmup, dev, dtype)?;
        println!(
            "moz-lab {config_name} {v} seq_len {l} batch {}: {:.1} tokens/s (step {:.3} s)",
            tokens / l,
            r.tokens_per_s,
            r.step_s
        );
    }
    Ok(())
}
