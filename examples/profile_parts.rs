//! Times forward+backward of the mixer's pieces at lab-small shapes (development aid).
use candle_core::{DType, Device, Tensor, Var, D};
use moz_lab::model::ssd::{rms_normalize, softplus, SsdScan};
use std::time::Instant;

fn var(shape: &[usize], scale: f64) -> Var {
    Var::from_tensor(&(Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap() * scale).unwrap())
        .unwrap()
}

fn time(name: &str, f: impl Fn() -> Tensor) {
    let _ = f().backward().unwrap();
    let t = Instant::now();
    let n = 3;
    for _ in 0..n {
        let l = f();
        let _g = l.backward().unwrap();
    }
    println!(
        "{name:<28} {:>8.1} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
}

fn main() {
    let (b, l, d, di, h, p, n) = (8, 512, 256, 512, 8, 64, 64);
    let u = var(&[b, l, d], 1.0);
    let w_in = var(&[2 * di + 2 * n + h, d], 0.06);
    time("in_proj matmul", || {
        u.as_tensor()
            .reshape((b * l, d))
            .unwrap()
            .matmul(&w_in.as_tensor().t().unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
    });
    time("in_proj + 5 narrows", || {
        let y = u
            .as_tensor()
            .reshape((b * l, d))
            .unwrap()
            .matmul(&w_in.as_tensor().t().unwrap())
            .unwrap()
            .reshape((b, l, 2 * di + 2 * n + h))
            .unwrap();
        let mut acc = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        let mut off = 0;
        for w in [di, di, n, n, h] {
            acc = (acc + y.narrow(D::Minus1, off, w).unwrap().sum_all().unwrap()).unwrap();
            off += w;
        }
        acc
    });
    let xbc = var(&[b, l, di + 2 * n], 1.0);
    let cw = var(&[di + 2 * n, 4], 0.5);
    time("conv (4 taps) + silu", || {
        let padded = xbc.as_tensor().pad_with_zeros(1, 3, 0).unwrap();
        let mut acc = Tensor::zeros((b, l, di + 2 * n), DType::F32, &Device::Cpu).unwrap();
        for tap in 0..4 {
            let s = padded.narrow(1, tap, l).unwrap();
            acc = (acc
                + s.broadcast_mul(
                    &cw.as_tensor()
                        .narrow(1, tap, 1)
                        .unwrap()
                        .squeeze(1)
                        .unwrap(),
                )
                .unwrap())
            .unwrap();
        }
        acc.silu().unwrap().sum_all().unwrap()
    });
    let y = var(&[b, l, di], 1.0);
    let z = var(&[b, l, di], 1.0);
    let x = var(&[b, l, h, p], 1.0);
    let dt = var(&[b, l, h], 1.0);
    let a = var(&[h], 1.0);
    let bm = var(&[b, l, 1, n], 1.0);
    let cm = var(&[b, l, 1, n], 1.0);
    let xbc_ssd = var(&[b, l, h * p + 2 * n], 1.0);
    let dsk = Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
    time("ssd fused (x|B|C in, D skip)", || {
        let dts = softplus(dt.as_tensor()).unwrap();
        let aa = a.as_tensor().exp().unwrap().neg().unwrap();
        moz_lab::ops::ssd::ssd_fused(xbc_ssd.as_tensor(), &dts, &aa, &dsk, p, 1, n, 64)
            .unwrap()
            .sum_all()
            .unwrap()
    });
    time("ssd chunked scan", || {
        let dts = softplus(dt.as_tensor()).unwrap();
        let aa = a.as_tensor().exp().unwrap().neg().unwrap();
        SsdScan { chunk_size: 64 }
            .forward(x.as_tensor(), &dts, &aa, bm.as_tensor(), cm.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
    });
    time("fused conv+silu", || {
        moz_lab::ops::conv::causal_conv_silu(
            xbc.as_tensor(),
            cw.as_tensor(),
            &Tensor::zeros(di + 2 * n, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap()
        .sum_all()
        .unwrap()
    });
    time("fused gated norm", || {
        moz_lab::ops::gated_norm::gated_rms_norm(
            y.as_tensor(),
            z.as_tensor(),
            &Tensor::ones(di, DType::F32, &Device::Cpu).unwrap(),
            di,
            1e-5,
        )
        .unwrap()
        .sum_all()
        .unwrap()
    });
    time("gated rmsnorm", || {
        let g = (y.as_tensor() * z.as_tensor().silu().unwrap()).unwrap();
        rms_normalize(&g, 1e-5).unwrap().sum_all().unwrap()
    });
    let hdn = var(&[b * l, d], 1.0);
    let emb = var(&[256, d], 0.02);
    let tg = Tensor::from_vec(
        (0..(b * l) as u32).map(|i| i % 256).collect::<Vec<_>>(),
        b * l,
        &Device::Cpu,
    )
    .unwrap();
    time("head + log_softmax + gather", || {
        let logits = hdn
            .as_tensor()
            .matmul(&emb.as_tensor().t().unwrap())
            .unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        lp.gather(&tg.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}
