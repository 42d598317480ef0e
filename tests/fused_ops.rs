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

/// The routed expert linear composed from candle ops: router matmul, softmax, top-k mask from
/// the host, gates, one matmul per expert masked by its gates, and the load-balancing loss and
/// z-loss as `Router::route` composes them. Returns (y, aux, counts).
fn composed_routed(
    x: &Tensor,
    wr: &Tensor,
    w: &Tensor,
    k: usize,
    aux_coef: f64,
    z_coef: f64,
) -> (Tensor, Tensor, Vec<usize>) {
    let (t, _) = x.dims2().unwrap();
    let e = wr.dim(0).unwrap();
    let logits = x.matmul(&wr.t().unwrap()).unwrap();
    let probs = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
    let host: Vec<Vec<f64>> = probs.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
    let mut mask = vec![0f64; t * e];
    let mut counts = vec![0usize; e];
    for (tok, row) in host.iter().enumerate() {
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        for &ei in &order[..k] {
            mask[tok * e + ei] = 1.0;
            counts[ei] += 1;
        }
    }
    let mask = Tensor::from_vec(mask, (t, e), x.device())
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    let gates = (&probs * mask).unwrap();
    let mut y = Tensor::zeros((t, w.dim(1).unwrap()), x.dtype(), x.device()).unwrap();
    for ei in 0..e {
        let ye = x
            .matmul(&w.get(ei).unwrap().t().unwrap())
            .unwrap()
            .broadcast_mul(&gates.narrow(1, ei, 1).unwrap())
            .unwrap();
        y = (y + ye).unwrap();
    }
    let frac: Vec<f64> = counts.iter().map(|&c| c as f64 / (t * k) as f64).collect();
    let frac = Tensor::from_vec(frac, e, x.device())
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    let mean_p = probs.mean(0).unwrap();
    let mut aux = ((mean_p * frac).unwrap().sum_all().unwrap() * (aux_coef * e as f64)).unwrap();
    if z_coef > 0.0 {
        let lse = moz_lab::model::router::logsumexp(&logits).unwrap();
        aux = (aux + (lse.sqr().unwrap().mean_all().unwrap() * z_coef).unwrap()).unwrap();
    }
    (y, aux, counts)
}

/// Router inputs where expert 2 never wins: column 0 of x is 1 and expert 2's router row has
/// -50 there (a bias), so the op meets an expert with no token.
fn routed_inputs(
    rng: &mut ChaCha8Rng,
    dtype: DType,
    t: usize,
    d_in: usize,
    d_out: usize,
    e: usize,
) -> (Var, Var, Var) {
    let mut xv: Vec<f64> = (0..t * d_in).map(|_| rng.gen_range(-1.0..1.0)).collect();
    for tok in 0..t {
        xv[tok * d_in] = 1.0;
    }
    let mut wrv: Vec<f64> = (0..e * d_in).map(|_| rng.gen_range(-1.5..1.5)).collect();
    wrv[2 * d_in] = -50.0;
    let mk = |v: Vec<f64>, s: &[usize]| {
        Var::from_tensor(
            &Tensor::from_vec(v, s, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    let w = var(rng, &[e, d_out, d_in], -0.5, 0.5, dtype);
    (mk(xv, &[t, d_in]), mk(wrv, &[e, d_in]), w)
}

fn check_routed(dtype: DType, tol: f64, k: usize, z_coef: f64) {
    use moz_lab::ops::routed_linear::routed_linear;
    let mut rng = ChaCha8Rng::seed_from_u64(11 + k as u64);
    let (t, d_in, d_out, e) = (37, 6, 5, 4);
    let (x, wr, w) = routed_inputs(&mut rng, dtype, t, d_in, d_out, e);
    let aux_coef = 0.3; // large, so its gradient is visible next to the probe's
    let r = routed_linear(
        x.as_tensor(),
        wr.as_tensor(),
        w.as_tensor(),
        k,
        aux_coef,
        z_coef,
    )
    .unwrap();
    let (yc, auxc, countsc) = composed_routed(
        x.as_tensor(),
        wr.as_tensor(),
        w.as_tensor(),
        k,
        aux_coef,
        z_coef,
    );
    assert_eq!(r.counts, countsc);
    assert_eq!(r.counts[2], 0, "expert 2 gets no token");
    assert_eq!(r.counts.iter().sum::<usize>(), t * k);
    close("routed y", &r.y, &yc, tol);
    close("routed aux", &r.aux_loss, &auxc, tol);
    let lf = (probe(&r.y, 3) + &r.aux_loss).unwrap();
    let lc = (probe(&yc, 3) + &auxc).unwrap();
    let (gf, gc) = (lf.backward().unwrap(), lc.backward().unwrap());
    for (name, v) in [("dx", &x), ("dwr", &wr), ("dw", &w)] {
        close(
            name,
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
    // The empty expert's weights get exactly zero gradient.
    let dw2 = gf.get(w.as_tensor()).unwrap().get(2).unwrap();
    assert_eq!(flat(&dw2).iter().fold(0f64, |m, v| m.max(v.abs())), 0.0);
    // The auxiliary loss alone reaches the router (and x) through its own backward.
    let ga = (&r.aux_loss * 2.0).unwrap().backward().unwrap();
    let gca = (&auxc * 2.0).unwrap().backward().unwrap();
    for (name, v) in [("aux dx", &x), ("aux dwr", &wr)] {
        close(
            name,
            ga.get(v.as_tensor()).unwrap(),
            gca.get(v.as_tensor()).unwrap(),
            tol,
        );
    }
}

#[test]
fn routed_linear_matches_composed_router_and_experts() {
    for (k, z) in [(1, 0.0), (1, 0.05), (2, 0.05)] {
        check_routed(DType::F64, 1e-10, k, z);
        check_routed(DType::F32, 1e-4, k, z);
    }
}

/// Central differences of probe(y) + aux (load balancing and z-loss) against the routed op's
/// gradients (f64); the steps are small enough not to change any routing decision.
#[test]
fn routed_linear_gradients_match_finite_differences() {
    use moz_lab::ops::routed_linear::routed_linear;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (t, d_in, d_out, e) = (13, 4, 3, 4);
    let (x, wr, w) = routed_inputs(&mut rng, DType::F64, t, d_in, d_out, e);
    let loss = |xs: &Tensor, wrs: &Tensor, ws: &Tensor| -> Tensor {
        let r = routed_linear(xs, wrs, ws, 1, 0.3, 0.05).unwrap();
        (probe(&r.y, 4) + r.aux_loss).unwrap()
    };
    let grads = loss(x.as_tensor(), wr.as_tensor(), w.as_tensor())
        .backward()
        .unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    for which in 0..3 {
        let base = [x.as_tensor(), wr.as_tensor(), w.as_tensor()][which].clone();
        let g = flat(grads.get([&x, &wr, &w][which].as_tensor()).unwrap());
        let v = flat(&base);
        for i in (0..v.len()).step_by(3) {
            let at = |delta: f64| {
                let mut vv = v.clone();
                vv[i] += delta;
                let p = Tensor::from_vec(vv, base.shape(), &Device::Cpu).unwrap();
                let mut ts = [
                    x.as_tensor().clone(),
                    wr.as_tensor().clone(),
                    w.as_tensor().clone(),
                ];
                ts[which] = p;
                loss(&ts[0], &ts[1], &ts[2]).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
        }
    }
    assert!(worst < 1e-6, "relative error {worst:e}");
}

/// The one-pass AdamW update against the composed tensor-op form of `AdamW::step` (decay on
/// and off, a clipping scale, a late step's bias corrections).
#[test]
fn adamw_update_matches_composed() {
    use moz_lab::ops::adamw::{adamw_update, sum_sq, AdamStep};
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let n = [7, 1300];
        let w = var(&mut rng, &n, -1.0, 1.0, dtype).as_tensor().clone();
        let g = var(&mut rng, &n, -2.0, 2.0, dtype).as_tensor().clone();
        let m = var(&mut rng, &n, -0.5, 0.5, dtype).as_tensor().clone();
        let v = var(&mut rng, &n, 0.0, 0.3, dtype).as_tensor().clone();
        for (wd, scale) in [(0.1, 0.37), (0.0, 1.0)] {
            let (lr, b1, b2, eps, t) = (3e-3, 0.9, 0.95, 1e-8, 5);
            let bc1 = 1.0 - f64::powi(b1, t);
            let bc2 = 1.0 - f64::powi(b2, t);
            let s = AdamStep {
                lr,
                beta1: b1,
                beta2: b2,
                eps,
                weight_decay: wd,
                bc1,
                bc2,
                grad_scale: scale,
            };
            let (wf, mf, vf) = adamw_update(&w, &g, &m, &v, s).unwrap();
            let gs = if scale != 1.0 {
                (&g * scale).unwrap()
            } else {
                g.clone()
            };
            let mc = ((&m * b1).unwrap() + (&gs * (1.0 - b1)).unwrap()).unwrap();
            let vc = ((&v * b2).unwrap() + (gs.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let wd_w = if wd > 0.0 {
                (&w * (1.0 - lr * wd)).unwrap()
            } else {
                w.clone()
            };
            let denom = ((&vc / bc2).unwrap().sqrt().unwrap() + eps).unwrap();
            let upd = ((&mc / bc1).unwrap() / denom).unwrap();
            let wc = (wd_w - (upd * lr).unwrap()).unwrap();
            close("adamw m", &mf, &mc, tol);
            close("adamw v", &vf, &vc, tol);
            close("adamw w", &wf, &wc, tol);
            // The library's composed form (the MOZ_LAB_COMPOSED_ADAMW path) is this one.
            let (wl, ml, vl) =
                moz_lab::train::optim::composed_update(&w, &g, &m, &v, s).unwrap();
            close("composed_update m", &ml, &mc, 0.0);
            close("composed_update v", &vl, &vc, 0.0);
            close("composed_update w", &wl, &wc, 0.0);
            // The step moved w (the test would pass for a no-op otherwise).
            assert!(flat(&(&wf - &w).unwrap()).iter().any(|d| d.abs() > 1e-4));
        }
        let sq = flat(&g).iter().map(|x| x * x).sum::<f64>();
        assert!((sum_sq(&g).unwrap() - sq).abs() <= 1e-12 * sq);
    }
}
