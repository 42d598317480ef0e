//! GPU tests: the project's CUDA kernels against the CPU reference on random inputs (outputs
//! poisoned with NaN before every launch, so an unwritten element fails), and CPU-vs-GPU
//! training agreement. Built with `cargo test --release --features cuda --test gpu --no-run`
//! (bench/gpu.sh ships it to a GPU machine). Every test skips with a message when no GPU is
//! present, so the CPU-only CI build runs them as no-ops.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use moz_lab::model::{MambaLm, Projection};
use moz_lab::ops::ssd::ssd_fused;
use moz_lab::ops::ssd_cuda::{ssd_cuda, uses_tensor_cores};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU, or None (and a SKIP line) without one.
fn gpu(test: &str) -> Option<Device> {
    if !moz_lab::device::cuda_available() {
        eprintln!("SKIP {test}: no CUDA device (or a build without the `cuda` feature)");
        return None;
    }
    #[cfg(feature = "cuda")]
    moz_lab::ops::cuda::set_poison_outputs(true);
    Some(moz_lab::device::resolve("cuda:0").unwrap())
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b|; infinite when `a` holds a NaN or infinity (NaN never passes).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// Random values in [lo, hi) rounded to `dtype`, as (host f64 copy, GPU tensor of `dtype`).
fn input(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    lo: f64,
    hi: f64,
    dtype: DType,
    dev: &Device,
) -> (Tensor, Tensor) {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    let rounded = Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (
        rounded.to_dtype(DType::F64).unwrap(),
        rounded.to_device(dev).unwrap(),
    )
}

/// The SSD kernel's output and its gradients for xbc, dt, A and D against the CPU fused op in
/// f64 on the same (dtype-rounded) inputs.
#[allow(clippy::too_many_arguments)]
fn check_ssd(dtype: DType, b: usize, l: usize, h: usize, p: usize, g: usize, n: usize, q: usize) {
    let Some(dev) = gpu("ssd") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64((l * 1000 + p * 10 + n) as u64);
    let cd = h * p + 2 * g * n;
    let (xbc_c, xbc_g) = input(&mut rng, &[b, l, cd], -1.0, 1.0, dtype, &dev);
    let (dt_c, dt_g) = input(&mut rng, &[b, l, h], 0.001, 0.2, dtype, &dev);
    let (a_c, a_g) = input(&mut rng, &[h], -4.0, -0.5, dtype, &dev);
    let (d_c, d_g) = input(&mut rng, &[h], 0.5, 1.5, dtype, &dev);
    let (dy_c, dy_g) = input(&mut rng, &[b, l, h * p], -1.0, 1.0, dtype, &dev);

    let vars_c: Vec<Var> = [&xbc_c, &dt_c, &a_c, &d_c]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let vars_g: Vec<Var> = [&xbc_g, &dt_g, &a_g, &d_g]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let y_c = ssd_fused(
        vars_c[0].as_tensor(),
        vars_c[1].as_tensor(),
        vars_c[2].as_tensor(),
        vars_c[3].as_tensor(),
        p,
        g,
        n,
        q,
    )
    .unwrap();
    let y_g = ssd_cuda(
        vars_g[0].as_tensor(),
        vars_g[1].as_tensor(),
        None,
        vars_g[2].as_tensor(),
        vars_g[3].as_tensor(),
        p,
        g,
        n,
        q,
    )
    .unwrap();
    assert_eq!(y_g.dtype(), dtype);
    let e = rel_err(&y_g, &y_c);
    let path = if uses_tensor_cores(&xbc_g, p, n) {
        "tensor cores"
    } else {
        "sweeps"
    };
    println!("ssd {dtype:?} b{b} l{l} h{h} p{p} g{g} n{n} q{q} ({path}): y rel err {e:.2e}");
    assert!(e < tol(dtype), "y: rel err {e:e}");
    let gc = (y_c * &dy_c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gg = (y_g.to_dtype(DType::F32).unwrap() * dy_g.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, (vc, vg)) in ["dxbc", "ddt", "dA", "dD"]
        .iter()
        .zip(vars_c.iter().zip(&vars_g))
    {
        let (a, r) = (gg.get(vg).unwrap(), gc.get(vc).unwrap());
        let e = rel_err(a, r);
        println!("  {name} rel err {e:.2e}");
        assert!(e < tol(dtype), "{name}: rel err {e:e}");
    }
}

#[test]
fn ssd_kernel_f32_small_heads_partial_chunk() {
    check_ssd(DType::F32, 2, 77, 4, 16, 2, 24, 16);
}

#[test]
fn ssd_kernel_f32_single_chunk() {
    check_ssd(DType::F32, 1, 40, 2, 8, 1, 8, 64);
}

#[test]
fn ssd_kernel_f32_full_tile() {
    check_ssd(DType::F32, 2, 600, 2, 64, 1, 128, 256);
}

#[test]
fn ssd_kernel_bf16_full_tile() {
    check_ssd(DType::BF16, 2, 600, 2, 64, 1, 128, 256);
}

/// The tensor-core path (kernels/ssd_mma.cu) on a GPU of compute capability 8.0+: two groups
/// of two heads with d_state 64 and a partial last chunk, then a single short chunk.
#[test]
fn ssd_kernel_bf16_tensor_cores() {
    let Some(dev) = gpu("ssd_tensor_cores") else {
        return;
    };
    let probe = Tensor::zeros((1, 8, 2 * 64 + 2 * 128), DType::BF16, &dev).unwrap();
    assert!(
        uses_tensor_cores(&probe, 64, 128),
        "bf16, headdim 64, d_state 128 should run on tensor cores here"
    );
    check_ssd(DType::BF16, 2, 200, 4, 64, 2, 64, 64);
    check_ssd(DType::BF16, 1, 40, 2, 64, 1, 128, 64);
}

#[test]
fn ssd_kernel_bf16_small() {
    check_ssd(DType::BF16, 2, 77, 4, 16, 2, 24, 16);
}

/// Losses of `steps` training steps of a model on `dev` / `dtype` (synthetic bytes, fixed
/// seeds), through the same trainer code the lab runs.
/// Largest |a_i - b_i|; infinite as soon as `a` holds a non-finite value (NaN never passes).
fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (x, y)| {
        if x.is_finite() {
            m.max((x - y).abs())
        } else {
            f64::INFINITY
        }
    })
}

/// A learnable stream of `bs` rows of `l` tokens: each byte repeats the byte 3 positions back
/// with noise.
fn learnable_batch(rng: &mut ChaCha8Rng, bs: usize, l: usize) -> moz_lab::data::Batch {
    let mut seq: Vec<u32> = Vec::with_capacity(bs * (l + 1));
    for _ in 0..bs {
        let mut s: Vec<u32> = (0..3).map(|_| rng.gen_range(0..16)).collect();
        while s.len() < l + 1 {
            let v = if rng.gen_bool(0.8) {
                s[s.len() - 3]
            } else {
                rng.gen_range(0..16)
            };
            s.push(v);
        }
        seq.extend(s);
    }
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for r in 0..bs {
        inputs.extend_from_slice(&seq[r * (l + 1)..r * (l + 1) + l]);
        targets.extend_from_slice(&seq[r * (l + 1) + 1..(r + 1) * (l + 1)]);
    }
    moz_lab::data::Batch {
        inputs,
        targets,
        mask: vec![1.0; bs * l],
        batch_size: bs,
        seq_len: l,
    }
}

fn losses(cfg: &moz_lab::model::ModelConfig, dev: &Device, dtype: DType, steps: usize) -> Vec<f64> {
    losses_of_batches(cfg, dev, dtype, steps, (4, 64))
}

/// `losses` with batches of (batch size, length) `shape`.
fn losses_of_batches(
    cfg: &moz_lab::model::ModelConfig,
    dev: &Device,
    dtype: DType,
    steps: usize,
    shape: (usize, usize),
) -> Vec<f64> {
    use moz_lab::train::loss::forward_loss;
    use moz_lab::train::optim::{grad_norm, AdamW};
    let model = MambaLm::new(cfg, dev, dtype, 7).unwrap();
    let tc = moz_lab::train::TrainConfig::default();
    let mut opt = AdamW::new(model.store.params(), &tc).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (bs, l) = shape;
    let mut out = Vec::new();
    for _ in 0..steps {
        let batch = learnable_batch(&mut rng, bs, l);
        let parts = forward_loss(&model, &batch).unwrap();
        out.push(
            parts
                .ce
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
        );
        let grads = parts.total().unwrap().backward().unwrap();
        let norm = grad_norm(model.store.params(), &grads).unwrap();
        let scale = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        opt.step(model.store.params(), &grads, 3e-3, scale).unwrap();
    }
    out
}

/// The same model and data trained 100 steps on the CPU (f32) and the GPU (f32, and bf16 with
/// f32 master weights): loss curves agree (f32 to float noise, bf16 to bf16 noise), and the
/// model learns (the last losses are well below the first).
#[test]
fn cpu_and_gpu_training_agree_every_layer_kind() {
    let Some(dev) = gpu("cpu_and_gpu_training_agree") else {
        return;
    };
    let mut cfg = common::tiny("MEAF", vec![Projection::Z], 3, 1);
    cfg.d_model = 32;
    cfg.headdim = 8;
    cfg.d_state = 16;
    cfg.chunk_size = 16;
    cfg.mlp_hidden = 48;
    let steps = 100;
    let cpu = losses(&cfg, &Device::Cpu, DType::F32, steps);
    let g32 = losses(&cfg, &dev, DType::F32, steps);
    let g16 = losses(&cfg, &dev, DType::BF16, steps);
    let (d32, d16) = (max_abs_diff(&g32, &cpu), max_abs_diff(&g16, &cpu));
    println!(
        "training MEAF+moz {steps} steps: cpu f32 loss {:.4} -> {:.4}; max |gpu f32 - cpu| {d32:.2e}, max |gpu bf16 - cpu| {d16:.2e}",
        cpu[0],
        cpu[steps - 1]
    );
    for (i, ((c, a), b)) in cpu.iter().zip(&g32).zip(&g16).enumerate() {
        if i % 10 == 0 || i == steps - 1 {
            println!("  step {i:3}: cpu {c:.5} gpu-f32 {a:.5} gpu-bf16 {b:.5}");
        }
    }
    assert!(cpu[steps - 1] < cpu[0] - 0.5, "the model did not learn");
    assert!(d32 < 2e-2, "gpu f32 vs cpu: {d32}");
    assert!(d16 < 0.15, "gpu bf16 vs cpu: {d16}");
}

/// The same with headdim 64 and d_state 64, where bf16 runs the SSD on tensor cores
/// (kernels/ssd_mma.cu), over sequences of four chunks of its 64 steps (the last partial), and a
/// MoZ mixer whose router logits come out of dt's GEMM.
#[test]
fn cpu_and_gpu_training_agree_tensor_core_ssd() {
    let Some(dev) = gpu("cpu_and_gpu_training_agree_tensor_core_ssd") else {
        return;
    };
    let mut cfg = common::tiny("MM", vec![Projection::Z], 3, 1);
    cfg.d_model = 64;
    cfg.headdim = 64;
    cfg.d_state = 64;
    cfg.chunk_size = 64;
    let width = cfg.d_inner() + 2 * cfg.ngroups * cfg.d_state;
    let probe = Tensor::zeros((1, 8, width), DType::BF16, &dev).unwrap();
    assert!(
        uses_tensor_cores(&probe, 64, 64),
        "this shape should run on tensor cores"
    );
    let (steps, shape) = (100, (2, 200));
    let cpu = losses_of_batches(&cfg, &Device::Cpu, DType::F32, steps, shape);
    let g16 = losses_of_batches(&cfg, &dev, DType::BF16, steps, shape);
    let d16 = max_abs_diff(&g16, &cpu);
    println!(
        "training MM+moz headdim 64 d_state 64, {steps} steps of {shape:?}: cpu f32 loss {:.4} -> {:.4}; max |gpu bf16 (tensor cores) - cpu| {d16:.2e}",
        cpu[0],
        cpu[steps - 1]
    );
    for (i, (c, b)) in cpu.iter().zip(&g16).enumerate() {
        if i % 10 == 0 || i == steps - 1 {
            println!("  step {i:3}: cpu {c:.5} gpu-bf16 {b:.5}");
        }
    }
    assert!(cpu[steps - 1] < cpu[0] - 0.5, "the model did not learn");
    assert!(d16 < 0.15, "gpu bf16 vs cpu: {d16}");
}

/// S layers (Mamba-1 mixer, A in controllable canonical form, stable roots) train on the GPU
/// through the composed scan and agree with the CPU's fused selective scan.
#[test]
fn cpu_and_gpu_training_agree_s_mamba() {
    use moz_lab::model::canonical::AForm;
    use moz_lab::model::mamba1::AInit;
    let Some(dev) = gpu("cpu_and_gpu_training_agree_s_mamba") else {
        return;
    };
    let mut cfg = common::tiny("SM", vec![Projection::Z], 3, 1);
    cfg.d_model = 32;
    cfg.headdim = 8;
    cfg.d_state = 8;
    cfg.chunk_size = 16;
    cfg.mamba1.a_form = AForm::Controllable;
    cfg.mamba1.a_init = AInit::Geometric;
    let steps = 60;
    let cpu = losses(&cfg, &Device::Cpu, DType::F32, steps);
    let g32 = losses(&cfg, &dev, DType::F32, steps);
    let g16 = losses(&cfg, &dev, DType::BF16, steps);
    let (d32, d16) = (max_abs_diff(&g32, &cpu), max_abs_diff(&g16, &cpu));
    println!(
        "training SM (SC) {steps} steps: cpu f32 loss {:.4} -> {:.4}; max |gpu f32 - cpu| {d32:.2e}, max |gpu bf16 - cpu| {d16:.2e}",
        cpu[0],
        cpu[steps - 1]
    );
    assert!(cpu[steps - 1] < cpu[0] - 0.5, "the model did not learn");
    assert!(d32 < 2e-2, "gpu f32 vs cpu: {d32}");
    assert!(d16 < 0.15, "gpu bf16 vs cpu: {d16}");
}

/// The grouped expert GEMM (dispatch, per-expert cuBLAS GEMMs, gated combine) and its
/// gradients on the GPU against the CPU op in f64: top-2 routing with an expert that gets no
/// token (its weight gradient must be exactly zero).
fn check_grouped_linear(dtype: DType, t: usize, d_in: usize, d_out: usize, e: usize) {
    use moz_lab::ops::grouped_linear::grouped_linear;
    use std::sync::Arc;
    let Some(dev) = gpu("grouped_linear") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let k = 2;
    // Each token picks two distinct experts among 0, 2, 3, .. (expert 1 stays empty).
    let allowed: Vec<usize> = (0..e).filter(|&x| x != 1).collect();
    let mut per_expert: Vec<Vec<u32>> = vec![Vec::new(); e];
    for tok in 0..t {
        let a = allowed[rng.gen_range(0..allowed.len())];
        let mut b = allowed[rng.gen_range(0..allowed.len())];
        while b == a {
            b = allowed[rng.gen_range(0..allowed.len())];
        }
        per_expert[a].push(tok as u32);
        per_expert[b].push(tok as u32);
    }
    let mut offsets = vec![0usize];
    for v in &per_expert {
        offsets.push(offsets.last().unwrap() + v.len());
    }
    let slot_tokens: Vec<u32> = per_expert.concat();
    let mut by_token: Vec<Vec<u32>> = vec![Vec::new(); t];
    for (s, &tok) in slot_tokens.iter().enumerate() {
        by_token[tok as usize].push(s as u32);
    }
    let back: Vec<u32> = by_token.concat();
    let s = slot_tokens.len();
    assert_eq!(s, t * k);
    let (x_c, x_g) = input(&mut rng, &[t, d_in], -1.0, 1.0, dtype, &dev);
    let (w_c, w_g) = input(&mut rng, &[e, d_out, d_in], -0.3, 0.3, dtype, &dev);
    let (g_c, g_g) = input(&mut rng, &[s], 0.0, 1.0, dtype, &dev);
    let (dy_c, dy_g) = input(&mut rng, &[t, d_out], -1.0, 1.0, dtype, &dev);
    let run = |x: &Tensor, w: &Tensor, g: &Tensor, dy: &Tensor| {
        let vars: Vec<Var> = [x, w, g]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let y = grouped_linear(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            Arc::new(slot_tokens.clone()),
            offsets.clone(),
            Arc::new(back.clone()),
        )
        .unwrap();
        let grads = (y.to_dtype(DType::F64).unwrap() * dy.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
        (y, gs)
    };
    let (y_c, gr_c) = run(&x_c, &w_c, &g_c, &dy_c);
    let (y_g, gr_g) = run(&x_g, &w_g, &g_g, &dy_g);
    assert!(y_g.device().is_cuda() && y_g.dtype() == dtype);
    let e_y = rel_err(&y_g, &y_c);
    println!("grouped-linear {dtype:?} t{t} {d_in}->{d_out} E{e} top-{k}: y rel err {e_y:.2e}");
    assert!(e_y < tol(dtype), "y: {e_y:e}");
    for (name, (a, r)) in ["dx", "dw", "dgates"].iter().zip(gr_g.iter().zip(&gr_c)) {
        let err = rel_err(a, r);
        println!("  {name} rel err {err:.2e}");
        assert!(err < tol(dtype), "{name}: {err:e}");
    }
    let empty = gr_g[1].get(1).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(
        empty
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
}

// Rows of multiples of 8 elements take the kernels' 16-byte path, the others the scalar one.
#[test]
fn grouped_linear_kernel_f32() {
    check_grouped_linear(DType::F32, 300, 48, 40, 5);
    check_grouped_linear(DType::F32, 300, 45, 37, 5);
}

#[test]
fn grouped_linear_kernel_bf16() {
    check_grouped_linear(DType::BF16, 300, 64, 96, 4);
    check_grouped_linear(DType::BF16, 300, 36, 20, 4);
}

/// The gate pick (gates in slot order from the flat router probabilities) and its scatter
/// backward against index_select on the CPU, exactly (it only moves values).
#[test]
fn gate_pick_kernel_matches_index_select() {
    let Some(dev) = gpu("gate_pick") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (t, e) = (1000, 5);
    // Top-1 of each token in expert order, as the router builds them.
    let best: Vec<u32> = (0..t).map(|_| rng.gen_range(0..e as u32)).collect();
    let mut idx = Vec::new();
    for ex in 0..e as u32 {
        idx.extend(
            (0..t as u32)
                .filter(|&tk| best[tk as usize] == ex)
                .map(|tk| tk * e as u32 + ex),
        );
    }
    for dtype in [DType::F32, DType::BF16] {
        let (probs_c, probs_g) = input(&mut rng, &[t * e], 0.0, 1.0, dtype, &dev);
        let (dg_c, dg_g) = input(&mut rng, &[t], -1.0, 1.0, dtype, &dev);
        let idx_c = Tensor::from_vec(idx.clone(), t, &Device::Cpu).unwrap();
        let idx_g = idx_c.to_device(&dev).unwrap();
        let vc = Var::from_tensor(&probs_c).unwrap();
        let vg = Var::from_tensor(&probs_g).unwrap();
        let yc = vc.as_tensor().index_select(&idx_c, 0).unwrap();
        let yg = moz_lab::ops::gate_pick::gate_pick(vg.as_tensor(), &idx_g).unwrap();
        let dc = grads_of(&yc, &dg_c, &[vc])[0].clone();
        let dgr = (yg.clone() * dg_g.clone())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dgv = dgr.get(vg.as_tensor()).unwrap().clone();
        assert_eq!(yg.dtype(), dtype);
        let (e_y, e_d) = (
            rel_err(&yg, &yc),
            rel_err(&dgv, &dc.to_dtype(dtype).unwrap()),
        );
        println!("gate pick {dtype:?}: y rel err {e_y:.1e}, dprobs rel err {e_d:.1e}");
        assert!(e_y == 0.0 && e_d == 0.0, "gate pick {dtype:?}: {e_y} {e_d}");
    }
}

/// Top-1 routing on the GPU against the host routing's rules, exactly: the first maximum wins
/// (the probabilities take few values, so ties are common), slots are sorted by expert with
/// tokens in order (also with each expert padded to a multiple of 64 slots that read no token),
/// one expert gets no token, token counts that are not a multiple of the
/// kernels' 1024-token blocks (up to 40 blocks), and more experts than a warp's 32 lanes.
#[cfg(feature = "cuda")]
#[test]
fn device_routing_matches_host_routing() {
    let Some(dev) = gpu("device_routing") else {
        return;
    };
    let Device::Cuda(cuda) = &dev else {
        unreachable!()
    };
    let stream = cuda.cuda_stream();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (t, e) in [(5003, 6), (700, 3), (1, 4), (40_000, 37)] {
        // Expert e - 1 is never the maximum (probability 0 against values >= 0.25).
        let probs: Vec<f32> = (0..t * e)
            .map(|i| {
                if i % e == e - 1 {
                    0.0
                } else {
                    rng.gen_range(1..4) as f32 / 4.0
                }
            })
            .collect();
        let mut per_expert: Vec<Vec<u32>> = vec![Vec::new(); e];
        for tok in 0..t {
            let row = &probs[tok * e..(tok + 1) * e];
            let best = (0..e).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            per_expert[best].push(tok as u32);
        }
        let frac: Vec<f32> = per_expert
            .iter()
            .map(|v| v.len() as f32 / t as f32)
            .collect();
        assert!(per_expert[e - 1].is_empty());
        for granule in [1, 64] {
            // Expected layout: expert ex's slots start at a multiple of the granule; padding
            // slots (and the unused tail of the T + E * (granule - 1) slots) read no token.
            let n_slots = t + e * (granule - 1);
            let (mut offsets, mut padded) = (vec![0usize], vec![0usize]);
            let mut slot_tokens = vec![u32::MAX; n_slots];
            let (mut pick, mut back) = (vec![u32::MAX; n_slots], vec![0u32; t]);
            for (ex, toks) in per_expert.iter().enumerate() {
                let first = *padded.last().unwrap();
                for (r, &tk) in toks.iter().enumerate() {
                    back[tk as usize] = (first + r) as u32;
                    slot_tokens[first + r] = tk;
                    pick[first + r] = tk * e as u32 + ex as u32;
                }
                offsets.push(offsets.last().unwrap() + toks.len());
                padded.push(first + toks.len().div_ceil(granule) * granule);
            }
            for dtype in [DType::F32, DType::BF16] {
                let p = Tensor::from_vec(probs.clone(), (t, e), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap();
                let r = moz_lab::ops::route_cuda::route_top1(&p, granule, None).unwrap();
                // The offsets first: nothing else has synchronized with the stream yet.
                let pick_t = r.pick.clone();
                let frac_t = r.frac.clone();
                let got = r.offsets().unwrap();
                let got_pick: Vec<u32> = pick_t.to_vec1().unwrap();
                let got_frac: Vec<f32> = frac_t.to_vec1().unwrap();
                let idx = stream.clone_dtoh(&got.idx).unwrap();
                let what = format!("t {t} e {e} granule {granule} {dtype:?}");
                assert_eq!(got.offsets, offsets, "offsets, {what}");
                assert_eq!(got.padded, padded, "padded offsets, {what}");
                assert_eq!(&idx[..n_slots], &slot_tokens[..], "slot tokens, {what}");
                assert_eq!(&idx[n_slots..], &back[..], "back, {what}");
                assert_eq!(got_pick, pick, "gate picks, {what}");
                assert_eq!(got_frac, frac, "slot fractions, {what}");
            }
        }
        println!(
            "device routing t {t} e {e}: exact, counts {:?}",
            per_expert.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}

/// The router's row softmax kernel (values and the logits' gradient) against candle_nn's
/// composed softmax on the CPU in f64; experts fewer and more than a warp's 32 lanes.
#[cfg(feature = "cuda")]
#[test]
fn router_softmax_kernel_matches_composed_softmax() {
    let Some(dev) = gpu("router_softmax") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for dtype in [DType::F32, DType::BF16] {
        for (t, e) in [(777, 7), (50, 40)] {
            let (x_c, x_g) = input(&mut rng, &[t, e], -4.0, 4.0, dtype, &dev);
            let (dy_c, dy_g) = input(&mut rng, &[t, e], -1.0, 1.0, dtype, &dev);
            let (vc, vg) = (vars(&[&x_c]), vars(&[&x_g]));
            let y_c = candle_nn::ops::softmax(vc[0].as_tensor(), 1).unwrap();
            let y_g = moz_lab::ops::route_cuda::softmax_rows(vg[0].as_tensor()).unwrap();
            let (gc, gg) = (grads_of(&y_c, &dy_c, &vc), grads_of(&y_g, &dy_g, &vg));
            compare(
                &format!("router softmax {dtype:?} t{t} e{e}"),
                dtype,
                (&y_g, &y_c),
                (&gg, &gc),
                &["dlogits"],
            );
        }
    }
}

/// The fused Switch load-balancing loss (value and the probabilities' gradient) against the
/// composed alpha * E * sum_e frac_e * mean_t p[t, e] on the CPU in f64.
#[cfg(feature = "cuda")]
#[test]
fn switch_aux_loss_kernel_matches_composed_loss() {
    let Some(dev) = gpu("switch_aux_loss") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for dtype in [DType::F32, DType::BF16] {
        for (t, e) in [(4099, 4), (300, 40)] {
            let (p_c, p_g) = input(&mut rng, &[t, e], 0.0, 1.0, dtype, &dev);
            let (frac_c, frac_g) = input(&mut rng, &[e], 0.0, 0.5, DType::F32, &dev);
            let (dy_c, dy_g) = input(&mut rng, &[], -1.0, 1.0, dtype, &dev);
            let alpha = 0.01;
            let (vc, vg) = (vars(&[&p_c]), vars(&[&p_g]));
            let y_c = ((vc[0].as_tensor().mean(0).unwrap() * &frac_c)
                .unwrap()
                .sum_all()
                .unwrap()
                * (alpha * e as f64))
                .unwrap();
            let y_g = moz_lab::ops::route_cuda::switch_aux_loss(vg[0].as_tensor(), &frac_g, alpha)
                .unwrap();
            let (gc, gg) = (grads_of(&y_c, &dy_c, &vc), grads_of(&y_g, &dy_g, &vg));
            compare(
                &format!("switch aux loss {dtype:?} t{t} e{e}"),
                dtype,
                (&y_g, &y_c),
                (&gg, &gc),
                &["dprobs"],
            );
        }
    }
}

/// Gradients of sum(y * dy) for `vars`, in f64.
fn grads_of(y: &Tensor, dy: &Tensor, vars: &[Var]) -> Vec<Tensor> {
    let g = (y.to_dtype(DType::F64).unwrap() * dy.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter().map(|v| g.get(v).unwrap().clone()).collect()
}

fn vars(ts: &[&Tensor]) -> Vec<Var> {
    ts.iter().map(|t| Var::from_tensor(t).unwrap()).collect()
}

/// Output and gradients of a GPU op against the CPU op on the same (dtype-rounded) inputs.
fn compare(
    what: &str,
    dtype: DType,
    y: (&Tensor, &Tensor),
    grads: (&[Tensor], &[Tensor]),
    names: &[&str],
) {
    let (y_g, y_c) = y;
    assert!(
        y_g.device().is_cuda() && y_g.dtype() == dtype,
        "{what}: output on {:?} {:?}",
        y_g.device(),
        y_g.dtype()
    );
    let e = rel_err(y_g, y_c);
    println!("{what}: y rel err {e:.2e}");
    assert!(e < tol(dtype), "{what} y: rel err {e:e}");
    for (name, (a, r)) in names.iter().zip(grads.0.iter().zip(grads.1)) {
        let e = rel_err(a, r);
        println!("  {name} rel err {e:.2e}");
        assert!(e < tol(dtype), "{what} {name}: rel err {e:e}");
    }
}

/// The causal depthwise conv + SiLU kernel (forward, dx, dw, db) against the CPU op in f64.
fn check_conv(dtype: DType, b: usize, l: usize, c: usize, k: usize) {
    use moz_lab::ops::conv::causal_conv_silu;
    use moz_lab::ops::conv_cuda::{applies, causal_conv_silu_cuda};
    let Some(dev) = gpu("conv") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64((b * 7 + l * 13 + c * 17 + k) as u64);
    let (x_c, x_g) = input(&mut rng, &[b, l, c], -2.0, 2.0, dtype, &dev);
    let (w_c, w_g) = input(&mut rng, &[c, k], -0.8, 0.8, dtype, &dev);
    let (bias_c, bias_g) = input(&mut rng, &[c], -0.5, 0.5, dtype, &dev);
    let (dy_c, dy_g) = input(&mut rng, &[b, l, c], -1.0, 1.0, dtype, &dev);
    assert!(applies(&x_g, k));
    let vc = vars(&[&x_c, &w_c, &bias_c]);
    let vg = vars(&[&x_g, &w_g, &bias_g]);
    let y_c = causal_conv_silu(vc[0].as_tensor(), vc[1].as_tensor(), vc[2].as_tensor()).unwrap();
    let y_g =
        causal_conv_silu_cuda(vg[0].as_tensor(), vg[1].as_tensor(), vg[2].as_tensor()).unwrap();
    let (gc, gg) = (grads_of(&y_c, &dy_c, &vc), grads_of(&y_g, &dy_g, &vg));
    compare(
        &format!("conv-silu {dtype:?} b{b} l{l} c{c} k{k}"),
        dtype,
        (&y_g, &y_c),
        (&gg, &gc),
        &["dx", "dw", "dbias"],
    );
}

#[test]
fn conv_kernel_f32_odd_shapes() {
    check_conv(DType::F32, 2, 77, 37, 4); // two time segments, the last partial; odd channels
    check_conv(DType::F32, 3, 3, 5, 4); // shorter than the filter
    check_conv(DType::F32, 1, 130, 300, 8); // longest filter, more channels than a block
    check_conv(DType::F32, 2, 65, 16, 1); // one tap
}

#[test]
fn conv_kernel_bf16() {
    check_conv(DType::BF16, 2, 300, 1280, 4);
    check_conv(DType::BF16, 1, 7, 33, 3);
}

/// The gated RMSNorm kernel (and the plain RMSNorm without a gate) against the CPU op in f64.
fn check_norm(dtype: DType, shape: &[usize], group: usize, gated: bool) {
    use moz_lab::ops::gated_norm::{gated_rms_norm, rms_norm};
    use moz_lab::ops::gated_norm_cuda::{applies, gated_rms_norm_cuda, rms_norm_cuda};
    let Some(dev) = gpu("gated_norm") else { return };
    let d = *shape.last().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64((d * 31 + group + gated as usize) as u64);
    let (y_c, y_g) = input(&mut rng, shape, -2.0, 2.0, dtype, &dev);
    let (z_c, z_g) = input(&mut rng, shape, -3.0, 3.0, dtype, &dev);
    let (w_c, w_g) = input(&mut rng, &[d], 0.5, 1.5, dtype, &dev);
    let (dy_c, dy_g) = input(&mut rng, shape, -1.0, 1.0, dtype, &dev);
    assert!(applies(&y_g, group));
    let eps = 1e-5;
    let what = format!(
        "{} {dtype:?} {shape:?} group {group}",
        if gated { "gated-rmsnorm" } else { "rmsnorm" }
    );
    if gated {
        let vc = vars(&[&y_c, &z_c, &w_c]);
        let vg = vars(&[&y_g, &z_g, &w_g]);
        let o_c = gated_rms_norm(
            vc[0].as_tensor(),
            vc[1].as_tensor(),
            vc[2].as_tensor(),
            group,
            eps,
        )
        .unwrap();
        let o_g = gated_rms_norm_cuda(
            vg[0].as_tensor(),
            vg[1].as_tensor(),
            vg[2].as_tensor(),
            group,
            eps,
        )
        .unwrap();
        let (gc, gg) = (grads_of(&o_c, &dy_c, &vc), grads_of(&o_g, &dy_g, &vg));
        compare(&what, dtype, (&o_g, &o_c), (&gg, &gc), &["dy", "dz", "dw"]);
    } else {
        assert_eq!(group, d);
        let vc = vars(&[&y_c, &w_c]);
        let vg = vars(&[&y_g, &w_g]);
        let o_c = rms_norm(vc[0].as_tensor(), vc[1].as_tensor(), eps).unwrap();
        let o_g = rms_norm_cuda(vg[0].as_tensor(), vg[1].as_tensor(), eps).unwrap();
        let (gc, gg) = (grads_of(&o_c, &dy_c, &vc), grads_of(&o_g, &dy_g, &vg));
        compare(&what, dtype, (&o_g, &o_c), (&gg, &gc), &["dx", "dw"]);
    }
}

#[test]
fn gated_norm_kernel_f32() {
    check_norm(DType::F32, &[2, 33, 96], 32, true); // three groups per row, 66 rows (partial block)
    check_norm(DType::F32, &[7, 4096], 4096, true); // the largest group: every register slot
    check_norm(DType::F32, &[3, 5, 200], 200, false); // plain RMSNorm, a group of partial warps
}

#[test]
fn gated_norm_kernel_bf16() {
    check_norm(DType::BF16, &[2, 50, 1024], 1024, true);
    check_norm(DType::BF16, &[2, 9, 1024], 1024, false);
}

/// The SSD kernel with dt = softplus(dt_raw + dt_bias) folded into its loads, against the CPU
/// op fed the composed softplus: output and the gradients of xbc, dt_raw, dt_bias, A and D.
#[allow(clippy::too_many_arguments)]
fn check_ssd_softplus(
    dtype: DType,
    b: usize,
    l: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
    q: usize,
) {
    use moz_lab::model::ssd::softplus;
    let Some(dev) = gpu("ssd_softplus") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64((l * 1000 + p * 10 + n + 5) as u64);
    let cd = h * p + 2 * g * n;
    let (xbc_c, xbc_g) = input(&mut rng, &[b, l, cd], -1.0, 1.0, dtype, &dev);
    let (raw_c, raw_g) = input(&mut rng, &[b, l, h], -4.0, 1.5, dtype, &dev);
    let (bias_c, bias_g) = input(&mut rng, &[h], -2.5, 0.0, dtype, &dev);
    let (a_c, a_g) = input(&mut rng, &[h], -4.0, -0.5, dtype, &dev);
    let (d_c, d_g) = input(&mut rng, &[h], 0.5, 1.5, dtype, &dev);
    let (dy_c, dy_g) = input(&mut rng, &[b, l, h * p], -1.0, 1.0, dtype, &dev);
    let vc = vars(&[&xbc_c, &raw_c, &bias_c, &a_c, &d_c]);
    let vg = vars(&[&xbc_g, &raw_g, &bias_g, &a_g, &d_g]);
    let t = |v: &[Var], i: usize| v[i].as_tensor().clone();
    let dt_c = softplus(&t(&vc, 1).broadcast_add(&t(&vc, 2)).unwrap()).unwrap();
    let y_c = ssd_fused(&t(&vc, 0), &dt_c, &t(&vc, 3), &t(&vc, 4), p, g, n, q).unwrap();
    let y_g = ssd_cuda(
        &t(&vg, 0),
        &t(&vg, 1),
        Some(&t(&vg, 2)),
        &t(&vg, 3),
        &t(&vg, 4),
        p,
        g,
        n,
        q,
    )
    .unwrap();
    let (gc, gg) = (grads_of(&y_c, &dy_c, &vc), grads_of(&y_g, &dy_g, &vg));
    compare(
        &format!("ssd+softplus {dtype:?} b{b} l{l} h{h} p{p} g{g} n{n} q{q}"),
        dtype,
        (&y_g, &y_c),
        (&gg, &gc),
        &["dxbc", "ddt_raw", "ddt_bias", "dA", "dD"],
    );
}

#[test]
fn ssd_kernel_softplus_f32() {
    check_ssd_softplus(DType::F32, 2, 77, 4, 16, 2, 24, 16);
    check_ssd_softplus(DType::F32, 1, 300, 2, 64, 1, 128, 256);
}

#[test]
fn ssd_kernel_softplus_bf16() {
    check_ssd_softplus(DType::BF16, 2, 200, 4, 64, 1, 128, 64);
}

/// The runs of a spec on the GPU (bf16), written to `root`.
fn gpu_runs(
    root: &std::path::Path,
    model: &str,
    batch: usize,
    seq_len: usize,
    steps: u64,
) -> Vec<moz_lab::lab::spec::RunSpec> {
    let text = format!(
        "seeds = [1]\ndevice = \"cuda:0\"\ndtype = \"bf16\"\n[model]\n{model}\n[train]\nsteps = {steps}\nbatch_size = {batch}\nseq_len = {seq_len}\nlr = 3e-3\nwarmup_steps = 2\neval_interval = 1000\neval_batches = 1\n[[variants]]\nname = \"dense\"\npreset = \"mamba2\"\n"
    );
    let path = root.join("oom.toml");
    std::fs::write(&path, text).unwrap();
    moz_lab::lab::spec::ExperimentSpec::load(&path)
        .unwrap()
        .runs(&root.join("runs"))
        .unwrap()
}

/// A run that needs more GPU memory than is free fails with "GPU out of memory" first in its
/// failed event (the process and the job machinery survive), and a small run on the same GPU
/// afterwards trains. The test first takes all but about 1 GiB of the GPU's free memory with
/// ballast buffers, so a paper-block-sized run (~3 GB of activations in its first forward)
/// runs out within its first step on any GPU; then the ballast is given back. Both job threads
/// must exit (`run_to_end`).
#[test]
fn gpu_out_of_memory_fails_the_run_and_the_next_run_trains() {
    use moz_lab::lab::jobs::RunEvent;
    let Some(dev) = gpu("gpu_out_of_memory") else {
        return;
    };
    const GIB: u64 = 1 << 30;
    let mut ballast = Vec::new();
    loop {
        let (free, _) = moz_lab::device::gpu_memory(&dev).unwrap();
        if free < 3 * GIB / 2 {
            break;
        }
        let chunk = if free > 12 * GIB { 8 * GIB } else { GIB / 4 };
        ballast.push(Tensor::zeros(chunk as usize, DType::U8, &dev).unwrap());
    }
    dev.synchronize().unwrap();
    let (free, total) = moz_lab::device::gpu_memory(&dev).unwrap();
    println!(
        "ballast: {} buffers, {:.1} GiB free of {:.1} GiB",
        ballast.len(),
        free as f64 / GIB as f64,
        total as f64 / GIB as f64
    );
    let dir = tempfile::tempdir().unwrap();
    let big = gpu_runs(
        dir.path(),
        "d_model = 1024\nn_layer = 8\nexpand = 1\nheaddim = 64\nd_state = 128",
        8,
        2048,
        2,
    )
    .remove(0);
    let events = common::run_to_end(big, false);
    let failed = events.iter().find_map(|e| match e {
        RunEvent::Failed { error, .. } => Some(error.clone()),
        _ => None,
    });
    let msg =
        failed.unwrap_or_else(|| panic!("the oversized run did not fail: {:?}", events.last()));
    println!("oversized run: {}", &msg[..msg.len().min(200)]);
    assert!(msg.starts_with("GPU out of memory"), "{msg}");
    drop(ballast);
    let small_dir = tempfile::tempdir().unwrap();
    let small = gpu_runs(
        small_dir.path(),
        "d_model = 32\nn_layer = 2\nheaddim = 16\nd_state = 8\nchunk_size = 16",
        4,
        40,
        30,
    )
    .remove(0);
    let events = common::run_to_end(small, false);
    assert!(
        matches!(events.last(), Some(RunEvent::Finished { step: 30, .. })),
        "{:?}",
        events.last()
    );
    let losses = common::step_losses(&events);
    let mem = events.iter().find_map(|e| match e {
        RunEvent::Step { gpu_mem, .. } => *gpu_mem,
        _ => None,
    });
    println!(
        "small run after it: loss {:.3} -> {:.3}, gpu memory in use {mem:?} bytes",
        losses[0].1, losses[29].1
    );
    assert!(
        losses[29].1 < losses[0].1 - 0.5,
        "the small run did not learn"
    );
    assert!(
        mem.is_some_and(|b| b > 0),
        "GPU runs report the memory in use"
    );
}

/// Uniform random f32 values in [lo, hi) on the CPU.
fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bits_f32(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

/// One tensor of a multi-tensor AdamW check: shape, weight decay, gradient dtype, and the
/// dtype of the model's copy of the weights (None: the f32 weights are the parameter).
type AdamCase<'a> = (&'a [usize], f64, DType, Option<DType>);

/// The GPU's multi-tensor AdamW step (kernels/adamw.cu, one launch for all `cases`) against
/// the CPU op `adamw_update` on the same random w, g, m, v per tensor: w', m', v' to f32
/// rounding (rel < 1e-6), updated in place. A bf16 gradient is compared with the CPU step on
/// its exact f32 value; a bf16 copy must be the f32 result rounded to nearest even, an f32
/// copy the result itself.
fn check_adamw_multi(cases: &[AdamCase], grad_scale: f64, t: i32) {
    use moz_lab::ops::adamw::{adamw_update, AdamStep};
    use moz_lab::ops::adamw_cuda::{adamw_multi_step_cuda, StepTensor};
    let Some(dev) = gpu("adamw_step") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(cases.len() as u64 * 31 + t as u64);
    let (beta1, beta2) = (0.9f64, 0.95f64);
    let shared = AdamStep {
        lr: 3e-3,
        beta1,
        beta2,
        eps: 1e-8,
        weight_decay: 0.0,
        bc1: 1.0 - beta1.powi(t),
        bc2: 1.0 - beta2.powi(t),
        grad_scale,
    };
    let on = |x: &Tensor| x.to_device(&dev).unwrap();
    struct Case {
        cpu: (Tensor, Tensor, Tensor),
        before: Tensor,
        gpu: [Tensor; 4],
        copy: Option<Tensor>,
        weight_decay: f64,
    }
    let mut all = Vec::new();
    for &(shape, weight_decay, gdt, copy) in cases {
        let w = uniform(&mut rng, shape, -1.0, 1.0);
        // The gradient as the GPU sees it (rounded to bf16 when it is bf16), exactly, in f32.
        let g = uniform(&mut rng, shape, -2.0, 2.0)
            .to_dtype(gdt)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let m = uniform(&mut rng, shape, -0.1, 0.1);
        let v = uniform(&mut rng, shape, 0.0, 0.01);
        let s = AdamStep {
            weight_decay,
            ..shared
        };
        all.push(Case {
            cpu: adamw_update(&w, &g, &m, &v, s).unwrap(),
            gpu: [on(&w), on(&g.to_dtype(gdt).unwrap()), on(&m), on(&v)],
            // Poisoned, so an element the kernel skips cannot pass.
            copy: copy.map(|dt| {
                on(&Tensor::full(f32::NAN, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap())
            }),
            before: w,
            weight_decay,
        });
    }
    let items: Vec<StepTensor> = all
        .iter()
        .map(|c| StepTensor {
            w: &c.gpu[0],
            g: &c.gpu[1],
            m: &c.gpu[2],
            v: &c.gpu[3],
            copy: c.copy.as_ref(),
            weight_decay: c.weight_decay,
        })
        .collect();
    adamw_multi_step_cuda(&items, shared).unwrap();
    for (c, &(shape, _, gdt, copy_dt)) in all.iter().zip(cases) {
        let (wc, mc, vc) = &c.cpu;
        let [w, _, m, v] = &c.gpu;
        let (ew, em, ev) = (rel_err(w, wc), rel_err(m, mc), rel_err(v, vc));
        let gw = w.to_device(&Device::Cpu).unwrap();
        let differing = bits_f32(&gw)
            .iter()
            .zip(bits_f32(wc))
            .filter(|(a, b)| **a != *b)
            .count();
        println!(
            "adamw step {shape:?} wd {} scale {grad_scale} t {t} grad {gdt:?} copy {copy_dt:?}: rel err w {ew:.1e} m {em:.1e} v {ev:.1e}; {differing} of {} weights differ from the CPU's in any bit",
            c.weight_decay,
            gw.elem_count()
        );
        // The step moved the weights by far more than the tolerance (the test can fail).
        assert!(
            rel_err(wc, &c.before) > 1e-4,
            "the update is too small to test"
        );
        assert!(ew < 1e-6 && em < 1e-6 && ev < 1e-6, "w {ew} m {em} v {ev}");
        let gw: Vec<f32> = gw.flatten_all().unwrap().to_vec1().unwrap();
        match (&c.copy, copy_dt) {
            (Some(copy), Some(DType::BF16)) => {
                let wb: Vec<half::bf16> = copy.flatten_all().unwrap().to_vec1().unwrap();
                for (i, (b, f)) in wb.iter().zip(&gw).enumerate() {
                    assert_eq!(
                        b.to_bits(),
                        half::bf16::from_f32(*f).to_bits(),
                        "element {i}: bf16 copy {b} of {f}"
                    );
                }
            }
            (Some(copy), Some(_)) => {
                let wf: Vec<f32> = copy.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(wf, gw, "the f32 copy");
            }
            _ => {}
        }
    }
}

#[test]
fn adamw_kernel_f32_matches_cpu_update() {
    let cases: [AdamCase; 4] = [
        (&[37, 141], 0.1, DType::F32, None),
        (&[37, 141], 0.0, DType::F32, Some(DType::F32)),
        (&[7], 0.1, DType::F32, None),
        // Many chunks (MT_CHUNK 4096) in one tensor, one of them partial.
        (&[1100, 613], 0.1, DType::F32, None),
    ];
    check_adamw_multi(&cases, 1.0, 1);
    check_adamw_multi(&cases, 0.37, 5);
    check_adamw_multi(&cases[2..3], 0.5, 2);
}

#[test]
fn adamw_kernel_bf16_grad_master_matches_cpu() {
    let cases: [AdamCase; 4] = [
        (&[37, 141], 0.1, DType::BF16, Some(DType::BF16)),
        (&[1100, 613], 0.0, DType::BF16, Some(DType::BF16)),
        // A chunk-sized tensor, then one of a single element, between the others.
        (&[4096], 0.1, DType::F32, Some(DType::BF16)),
        (&[1], 0.0, DType::BF16, Some(DType::BF16)),
    ];
    check_adamw_multi(&cases, 1.0, 1);
    check_adamw_multi(&cases, 0.7, 4);
}

/// The global gradient norm with the GPU's one-accumulator sum of squares against an f64 sum
/// on the host, for a mix of f32 and bf16 gradients (one larger than a grid-stride launch, one
/// of 3 elements) and a parameter without a gradient.
#[test]
fn grad_norm_on_gpu_matches_host_sum() {
    use moz_lab::model::params::Param;
    use moz_lab::train::optim::grad_norm;
    let Some(dev) = gpu("grad_norm") else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let specs: [(&[usize], DType, bool); 5] = [
        (&[300, 70], DType::F32, true),
        (&[1200, 700], DType::BF16, true),
        (&[3], DType::BF16, true),
        (&[5], DType::F32, true),
        (&[64, 9], DType::F32, false),
    ];
    let mut params = Vec::new();
    let mut grads = candle_core::backprop::GradStore::default();
    let mut host_sq = 0f64;
    for (i, (shape, dt, has_grad)) in specs.iter().enumerate() {
        let var = Var::from_tensor(&Tensor::zeros(*shape, *dt, &dev).unwrap()).unwrap();
        if *has_grad {
            let g = uniform(&mut rng, shape, -3.0, 3.0).to_dtype(*dt).unwrap();
            host_sq += flat(&g).iter().map(|x| x * x).sum::<f64>();
            grads.insert(var.as_tensor(), g.to_device(&dev).unwrap());
        }
        params.push(Param {
            name: format!("p{i}"),
            var,
            decay: true,
            expert: None,
        });
    }
    let norm = grad_norm(&params, &grads).unwrap();
    let want = host_sq.sqrt();
    let rel = (norm - want).abs() / want;
    println!("grad norm on the GPU {norm:.9e}, host f64 {want:.9e}, rel err {rel:.1e}");
    assert!(rel < 1e-5, "{norm} vs {want}");
    assert!(
        moz_lab::ops::adamw_cuda::sum_sq_cuda(&[])
            .unwrap()
            .is_none(),
        "no gradients, no sum"
    );
}

/// A few AdamW steps of a tiny model on the GPU through `AdamW::step` (the kernel path; f32
/// parameters, and bf16 ones with f32 masters) leave the same weights, masters and moments as
/// the composed candle update (`composed_update`, the MOZ_LAB_COMPOSED_ADAMW path) applied to
/// the same gradients, to f32 rounding.
#[test]
fn adamw_steps_on_gpu_match_composed_update() {
    use moz_lab::ops::adamw::AdamStep;
    use moz_lab::ops::adamw_cuda::step_applies;
    use moz_lab::train::loss::forward_loss;
    use moz_lab::train::optim::{composed_update, grad_norm, AdamW};
    let Some(dev) = gpu("adamw_steps") else {
        return;
    };
    let mut cfg = common::tiny("MF", vec![Projection::Z], 3, 1);
    cfg.d_model = 16;
    for dtype in [DType::F32, DType::BF16] {
        let model = MambaLm::new(&cfg, &dev, dtype, 5).unwrap();
        let params = model.store.params();
        let tc = moz_lab::train::TrainConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(params, &tc).unwrap();
        // The reference state: f32 weights (masters for bf16) and moments.
        let mut w: Vec<Tensor> = params
            .iter()
            .map(|p| p.var.as_tensor().to_dtype(DType::F32).unwrap())
            .collect();
        let mut m: Vec<Tensor> = w.iter().map(|t| t.zeros_like().unwrap()).collect();
        let mut v = m.clone();
        assert!(params.iter().any(|p| p.decay) && params.iter().any(|p| !p.decay));
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let lr = 3e-3;
        for t in 1..=4 {
            let batch = learnable_batch(&mut rng, 2, 16);
            let grads = forward_loss(&model, &batch)
                .unwrap()
                .total()
                .unwrap()
                .backward()
                .unwrap();
            let norm = grad_norm(params, &grads).unwrap();
            // Clip hard so grad_scale != 1 in every step.
            let scale = 0.5 / norm;
            for (i, p) in params.iter().enumerate() {
                let Some(g) = grads.get(p.var.as_tensor()) else {
                    continue;
                };
                assert!(
                    step_applies(&w[i], g),
                    "{}: the GPU step does not apply",
                    p.name
                );
                let s = AdamStep {
                    lr,
                    beta1: tc.beta1,
                    beta2: tc.beta2,
                    eps: tc.eps,
                    weight_decay: if p.decay { tc.weight_decay } else { 0.0 },
                    bc1: 1.0 - tc.beta1.powi(t),
                    bc2: 1.0 - tc.beta2.powi(t),
                    grad_scale: scale,
                };
                (w[i], m[i], v[i]) = composed_update(&w[i], g, &m[i], &v[i], s).unwrap();
            }
            opt.step(params, &grads, lr, scale).unwrap();
        }
        let state = opt.tensors(params);
        let mut worst = (0f64, 0f64, 0f64);
        for (i, p) in params.iter().enumerate() {
            let weight = p.var.as_tensor();
            assert_eq!(weight.dtype(), dtype);
            let (om, ov) = opt.moments(i);
            let (em, ev) = (rel_err(om, &m[i]), rel_err(ov, &v[i]));
            let ew = match dtype {
                DType::F32 => rel_err(weight, &w[i]),
                _ => {
                    // The bf16 weight is its master rounded; the master follows the reference.
                    let master = &state[&format!("{}.master", p.name)];
                    let rounded = master.to_dtype(DType::BF16).unwrap();
                    assert_eq!(flat(weight), flat(&rounded), "{}: bf16 copy", p.name);
                    rel_err(master, &w[i])
                }
            };
            assert!(
                ew < 1e-6 && em < 1e-6 && ev < 1e-6,
                "{} ({dtype:?}): w {ew} m {em} v {ev}",
                p.name
            );
            worst = (worst.0.max(ew), worst.1.max(em), worst.2.max(ev));
        }
        println!(
            "4 AdamW steps of a tiny MF model, {dtype:?} on the GPU vs composed: max rel err w {:.1e} m {:.1e} v {:.1e} over {} parameters",
            worst.0,
            worst.1,
            worst.2,
            params.len()
        );
    }
}
