//! The fused CPU kernels against the composed candle implementations they replace: values and
//! gradients, in f32 and f64, on random inputs.
use candle_core::{DType, Device, Tensor, Var, D};
use moz_lab::model::ssd::{rms_normalize, SsdScan};
use moz_lab::ops::{conv::causal_conv_silu, gated_norm::gated_rms_norm, ssd::ssd_fused};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn var(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Var::from_tensor(
        &Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(name: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len(), "{name}: sizes");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(a.iter().all(|v| v.is_finite()), "{name}: non-finite");
    assert!(
        err <= tol * scale,
        "{name}: max err {err:e}, scale {scale:e}"
    );
}

/// Weighted sum so every output element gets a distinct gradient.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f64> = (0..y.elem_count())
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let w = Tensor::from_vec(w, y.shape(), y.device())
        .unwrap()
        .to_dtype(y.dtype())
        .unwrap();
    (y * w).unwrap().sum_all().unwrap()
}

fn check_conv(dtype: DType, tol: f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (b, l, c, k) = (2, 37, 20, 4);
    let x = var(&mut rng, &[b, l, c], -2.0, 2.0, dtype);
    let w = var(&mut rng, &[c, k], -1.0, 1.0, dtype);
    let bias = var(&mut rng, &[c], -1.0, 1.0, dtype);
    let fused = causal_conv_silu(x.as_tensor(), w.as_tensor(), bias.as_tensor()).unwrap();
    // Composed: shifted slices times taps, + bias, SiLU.
    let padded = x.as_tensor().pad_with_zeros(1, k - 1, 0).unwrap();
    let mut acc = bias
        .as_tensor()
        .broadcast_as((b, l, c))
        .unwrap()
        .contiguous()
        .unwrap();
    for tap in 0..k {
        let s = padded.narrow(1, tap, l).unwrap();
        let wk = w.as_tensor().narrow(1, tap, 1).unwrap().squeeze(1).unwrap();
        acc = (acc + s.broadcast_mul(&wk).unwrap()).unwrap();
    }
    let composed = acc.silu().unwrap();
    close("conv forward", &fused, &composed, tol);
    let gf = probe(&fused, 5).backward().unwrap();
    let gc = probe(&composed, 5).backward().unwrap();
    for (name, v) in [("dx", &x), ("dw", &w), ("dbias", &bias)] {
        close(
            name,
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

fn check_norm(dtype: DType, tol: f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (rows, d, groups) = (70, 24, 3);
    let y = var(&mut rng, &[2, rows / 2, d], -2.0, 2.0, dtype);
    let z = var(&mut rng, &[2, rows / 2, d], -3.0, 3.0, dtype);
    let w = var(&mut rng, &[d], 0.5, 1.5, dtype);
    let fused = gated_rms_norm(
        y.as_tensor(),
        z.as_tensor(),
        w.as_tensor(),
        d / groups,
        1e-5,
    )
    .unwrap();
    let g = (y.as_tensor() * z.as_tensor().silu().unwrap()).unwrap();
    let composed = rms_normalize(&g.reshape((2, rows / 2, groups, d / groups)).unwrap(), 1e-5)
        .unwrap()
        .reshape((2, rows / 2, d))
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap();
    close("norm forward", &fused, &composed, tol);
    let gf = probe(&fused, 6).backward().unwrap();
    let gc = probe(&composed, 6).backward().unwrap();
    for (name, v) in [("dy", &y), ("dz", &z), ("dw", &w)] {
        close(
            name,
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

fn check_ssd(dtype: DType, tol: f64, chunk: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, l, h, p, g, n) = (2, 45, 4, 5, 2, 6);
    let xbc = var(&mut rng, &[b, l, h * p + 2 * g * n], -1.0, 1.0, dtype);
    let dt = var(&mut rng, &[b, l, h], 0.01, 0.6, dtype);
    let a = var(&mut rng, &[h], -4.0, -0.5, dtype);
    let dsk = var(&mut rng, &[h], 0.5, 1.5, dtype);
    let fused = ssd_fused(
        xbc.as_tensor(),
        dt.as_tensor(),
        a.as_tensor(),
        dsk.as_tensor(),
        p,
        g,
        n,
        chunk,
    )
    .unwrap();
    // Composed: slice x | B | C, chunked scan, D skip.
    let xt = xbc.as_tensor();
    let x = xt
        .narrow(2, 0, h * p)
        .unwrap()
        .reshape((b, l, h, p))
        .unwrap();
    let bm = xt
        .narrow(2, h * p, g * n)
        .unwrap()
        .reshape((b, l, g, n))
        .unwrap();
    let cm = xt
        .narrow(2, h * p + g * n, g * n)
        .unwrap()
        .reshape((b, l, g, n))
        .unwrap();
    let chunked = SsdScan { chunk_size: 16 }
        .forward(&x, dt.as_tensor(), a.as_tensor(), &bm, &cm)
        .unwrap();
    let composed = (chunked
        + x.broadcast_mul(&dsk.as_tensor().reshape((h, 1)).unwrap())
            .unwrap())
    .unwrap()
    .reshape((b, l, h * p))
    .unwrap();
    assert_eq!(fused.dims(), &[b, l, h * p]);
    close("ssd forward", &fused, &composed, tol);
    let gf = probe(&fused, 7).backward().unwrap();
    let gc = probe(&composed, 7).backward().unwrap();
    for (name, v) in [("dxbc", &xbc), ("ddt", &dt), ("da", &a), ("dD", &dsk)] {
        close(
            name,
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

fn check_plain_norm(dtype: DType, tol: f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = var(&mut rng, &[3, 11, 16], -2.0, 2.0, dtype);
    let w = var(&mut rng, &[16], 0.5, 1.5, dtype);
    let fused = moz_lab::ops::gated_norm::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let composed = rms_normalize(x.as_tensor(), 1e-5)
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap();
    close("rmsnorm forward", &fused, &composed, tol);
    let gf = probe(&fused, 8).backward().unwrap();
    let gc = probe(&composed, 8).backward().unwrap();
    for (name, v) in [("dx", &x), ("dw", &w)] {
        close(
            name,
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

#[test]
fn plain_rms_norm_matches_composed() {
    check_plain_norm(DType::F64, 1e-12);
    check_plain_norm(DType::F32, 1e-5);
}

#[test]
fn conv_matches_composed() {
    check_conv(DType::F64, 1e-12);
    check_conv(DType::F32, 1e-5);
}

#[test]
fn gated_norm_matches_composed() {
    check_norm(DType::F64, 1e-12);
    check_norm(DType::F32, 1e-5);
}

#[test]
fn ssd_recurrence_matches_chunked_scan_values_and_gradients() {
    for chunk in [1, 7, 16, 64] {
        check_ssd(DType::F64, 1e-10, chunk);
    }
    check_ssd(DType::F32, 1e-4, 16);
}

#[test]
fn fast_exp_is_accurate() {
    use moz_lab::ops::KernelFloat;
    let mut worst = 0f64;
    for i in -8000..8000 {
        let x = i as f32 * 0.01;
        let rel = ((x.fast_exp() as f64) - (x as f64).exp()).abs() / (x as f64).exp();
        worst = worst.max(rel);
    }
    assert!(worst < 1e-6, "relative error {worst:e}");
    let _ = D::Minus1;
}

/// x (b, l, d_in) W^T with plain candle ops.
fn matmul_t(x: &Tensor, w: &Tensor) -> Tensor {
    let (b, l, d_in) = x.dims3().unwrap();
    x.reshape((b * l, d_in))
        .unwrap()
        .matmul(&w.t().unwrap())
        .unwrap()
        .reshape((b, l, w.dim(0).unwrap()))
        .unwrap()
}

/// The whole mixer op against the mixer composed from plain candle ops (matmuls, shifted-slice
/// conv, softplus, the chunked SSD scan, RMSNorm): output and every gradient, with z computed
/// by the op (dense) or given (as a MoE computes it outside).
fn check_mixer(dtype: DType, tol: f64, z_given: bool) {
    use moz_lab::model::ssd::softplus;
    use moz_lab::ops::mixer::{mixer_fused, MixerShape, MixerWeights};
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (b, l, d, di, p, g, n, k) = (2, 19, 6, 8, 4, 1, 3, 4);
    let (h, cd) = (di / p, di + 2 * g * n);
    let rows = if z_given { cd + h } else { di + cd + h };
    let u = var(&mut rng, &[b, l, d], -1.0, 1.0, dtype);
    let zv = var(&mut rng, &[b, l, di], -1.5, 1.5, dtype);
    let in_proj = var(&mut rng, &[rows, d], -0.6, 0.6, dtype);
    let conv_w = var(&mut rng, &[cd, 1, k], -0.5, 0.5, dtype);
    let conv_b = var(&mut rng, &[cd], -0.3, 0.3, dtype);
    let dt_bias = var(&mut rng, &[h], -2.0, 0.5, dtype);
    let a_log = var(&mut rng, &[h], 0.0, 2.0, dtype);
    let d_skip = var(&mut rng, &[h], 0.5, 1.5, dtype);
    let norm_w = var(&mut rng, &[di], 0.5, 1.5, dtype);
    let out_w = var(&mut rng, &[d, di], -0.4, 0.4, dtype);
    let shape = MixerShape {
        d_inner: di,
        headdim: p,
        ngroups: g,
        d_state: n,
        d_conv: k,
        chunk: 5,
        eps: 1e-5,
    };
    let w = MixerWeights {
        in_proj: in_proj.as_tensor(),
        conv_weight: conv_w.as_tensor(),
        conv_bias: conv_b.as_tensor(),
        dt_bias: dt_bias.as_tensor(),
        a_log: a_log.as_tensor(),
        d_skip: d_skip.as_tensor(),
        norm_weight: norm_w.as_tensor(),
        out_proj: out_w.as_tensor(),
    };
    let zin = z_given.then(|| zv.as_tensor());
    let fused = mixer_fused(u.as_tensor(), zin, &w, shape).unwrap();

    let proj = matmul_t(u.as_tensor(), in_proj.as_tensor());
    let zoff = if z_given { 0 } else { di };
    let z = if z_given {
        zv.as_tensor().clone()
    } else {
        proj.narrow(2, 0, di).unwrap()
    };
    let xbc = proj.narrow(2, zoff, cd).unwrap();
    let dt_raw = proj.narrow(2, zoff + cd, h).unwrap();
    let padded = xbc.pad_with_zeros(1, k - 1, 0).unwrap();
    let cw = conv_w.as_tensor().squeeze(1).unwrap();
    let mut acc = conv_b.as_tensor().broadcast_as(xbc.shape()).unwrap();
    for tap in 0..k {
        let wk = cw.narrow(1, tap, 1).unwrap().squeeze(1).unwrap();
        acc = (acc
            + padded
                .narrow(1, tap, l)
                .unwrap()
                .broadcast_mul(&wk)
                .unwrap())
        .unwrap();
    }
    let xc = acc.silu().unwrap();
    let dt = softplus(&dt_raw.broadcast_add(dt_bias.as_tensor()).unwrap()).unwrap();
    let a = a_log.as_tensor().exp().unwrap().neg().unwrap();
    let x = xc.narrow(2, 0, di).unwrap().reshape((b, l, h, p)).unwrap();
    let bm = xc
        .narrow(2, di, g * n)
        .unwrap()
        .reshape((b, l, g, n))
        .unwrap();
    let cm = xc
        .narrow(2, di + g * n, g * n)
        .unwrap()
        .reshape((b, l, g, n))
        .unwrap();
    let y = SsdScan { chunk_size: 8 }
        .forward(&x, &dt, &a, &bm, &cm)
        .unwrap();
    let y = (y + x
        .broadcast_mul(&d_skip.as_tensor().reshape((h, 1)).unwrap())
        .unwrap())
    .unwrap()
    .reshape((b, l, di))
    .unwrap();
    let gated = (y * z.silu().unwrap()).unwrap();
    let normed = rms_normalize(&gated.reshape((b, l, g, di / g)).unwrap(), 1e-5)
        .unwrap()
        .reshape((b, l, di))
        .unwrap()
        .broadcast_mul(norm_w.as_tensor())
        .unwrap();
    let composed = matmul_t(&normed, out_w.as_tensor());
    assert_eq!(fused.dims(), &[b, l, d]);
    close("mixer forward", &fused, &composed, tol);
    let gf = probe(&fused, 9).backward().unwrap();
    let gc = probe(&composed, 9).backward().unwrap();
    let mut vars = vec![
        ("du", &u),
        ("din_proj", &in_proj),
        ("dconv_w", &conv_w),
        ("dconv_b", &conv_b),
        ("ddt_bias", &dt_bias),
        ("dA_log", &a_log),
        ("dD", &d_skip),
        ("dnorm_w", &norm_w),
        ("dout_w", &out_w),
    ];
    if z_given {
        vars.push(("dz", &zv));
    } else {
        assert!(gf.get(zv.as_tensor()).is_none());
    }
    for (name, v) in vars {
        close(
            name,
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

#[test]
fn whole_mixer_op_matches_composed_mixer() {
    for z_given in [false, true] {
        check_mixer(DType::F64, 1e-10, z_given);
        check_mixer(DType::F32, 1e-4, z_given);
    }
}

/// Central differences of the probe loss against the mixer op's gradients (f64), for entries of
/// every weight group, the input and a given z.
#[test]
fn whole_mixer_op_gradients_match_finite_differences() {
    use moz_lab::ops::mixer::{mixer_fused, MixerShape, MixerWeights};
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (b, l, d, di, p, g, n, k) = (1, 11, 4, 8, 4, 2, 3, 3);
    let (h, cd) = (di / p, di + 2 * g * n);
    let dt = DType::F64;
    let u = var(&mut rng, &[b, l, d], -1.0, 1.0, dt);
    let z = var(&mut rng, &[b, l, di], -1.5, 1.5, dt);
    let params = [
        var(&mut rng, &[cd + h, d], -0.6, 0.6, dt),
        var(&mut rng, &[cd, 1, k], -0.5, 0.5, dt),
        var(&mut rng, &[cd], -0.3, 0.3, dt),
        var(&mut rng, &[h], -2.0, 0.5, dt),
        var(&mut rng, &[h], 0.0, 2.0, dt),
        var(&mut rng, &[h], 0.5, 1.5, dt),
        var(&mut rng, &[di], 0.5, 1.5, dt),
        var(&mut rng, &[d, di], -0.4, 0.4, dt),
    ];
    let shape = MixerShape {
        d_inner: di,
        headdim: p,
        ngroups: g,
        d_state: n,
        d_conv: k,
        chunk: 4,
        eps: 1e-5,
    };
    let loss = |ts: &[Tensor]| -> Tensor {
        let w = MixerWeights {
            in_proj: &ts[2],
            conv_weight: &ts[3],
            conv_bias: &ts[4],
            dt_bias: &ts[5],
            a_log: &ts[6],
            d_skip: &ts[7],
            norm_weight: &ts[8],
            out_proj: &ts[9],
        };
        probe(&mixer_fused(&ts[0], Some(&ts[1]), &w, shape).unwrap(), 10)
    };
    let all: Vec<&Var> = [&u, &z].into_iter().chain(params.iter()).collect();
    let ts: Vec<Tensor> = all.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = loss(&ts).backward().unwrap();
    let eps = 1e-5;
    for (vi, v) in all.iter().enumerate() {
        let analytic = flat(grads.get(v.as_tensor()).unwrap());
        let base = flat(v.as_tensor());
        for j in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f64| -> f64 {
                let mut vals = base.clone();
                vals[j] += delta;
                let mut ts2 = ts.clone();
                ts2[vi] = Tensor::from_vec(vals, v.as_tensor().shape(), &Device::Cpu).unwrap();
                loss(&ts2).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[j]).abs();
            assert!(
                err <= 1e-6 * (1.0 + numeric.abs()),
                "input {vi} entry {j}: finite difference {numeric}, analytic {}",
                analytic[j]
            );
        }
    }
}
