//! S-Mamba (Mamba-1 mixer with diagonal, controllable or observable canonical A): Kalman ranks,
//! the eigenbasis scan against a slow matrix-exponential reference, the fused scan against the
//! composed one, gradients against finite differences, parameter counts, specs.
use candle_core::{DType, Device, Tensor, Var};
use moz_lab::data::Batch;
use moz_lab::lab::spec::ExperimentSpec;
use moz_lab::model::canonical::{
    coefficients_from_roots, eigen_condition, free_basis, free_canonical_basis, AForm, Spectrum,
    C64,
};
use moz_lab::model::count::ParamCount;
use moz_lab::model::lm::Mixer;
use moz_lab::model::mamba1::{
    basis_bc, eigenbasis_bc, selective_scan_composed, selective_scan_rot_composed, AInit,
    Mamba1Config, Mamba1Mixer,
};
use moz_lab::model::{MambaLm, ModelConfig};
use moz_lab::ops::selective_scan::{selective_scan_fused, selective_scan_rot_fused, BcLayout};
use moz_lab::train::loss::forward_loss;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
mod common;

const FORMS: [AForm; 3] = [AForm::Diagonal, AForm::Controllable, AForm::Observable];

fn cfg(pattern: &str, n: usize, form: AForm) -> ModelConfig {
    let mut c = common::tiny(pattern, vec![], 1, 1);
    c.d_state = n;
    c.mamba1 = Mamba1Config {
        a_form: form,
        a_init: AInit::default_for(form),
        ..Mamba1Config::default()
    };
    c
}

fn mixer(model: &MambaLm) -> &Mamba1Mixer {
    match &model.blocks[0].mixer {
        Mixer::Mamba1(m) => m,
        _ => panic!("layer 0 is not an S layer"),
    }
}

fn rand_vec(rng: &mut ChaCha8Rng, k: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..k).map(|_| rng.gen_range(lo..hi)).collect()
}

/// Sets the model's A parameter to random roots -exp(theta), theta ~ U(-spread, spread).
fn randomise_roots(model: &MambaLm, form: AForm, rng: &mut ChaCha8Rng, spread: f64) {
    let name = format!(
        "backbone.layers.0.mixer.{}",
        if form == AForm::Diagonal {
            "A_log"
        } else {
            "A_root_log"
        }
    );
    let p = model.store.get(&name).expect("A parameter");
    let v = rand_vec(rng, p.numel(), -spread, spread);
    let t = Tensor::from_vec(v, p.var.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(model.dtype())
        .unwrap();
    p.var.set(&t).unwrap();
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

// ---------- an independent f64 reference: explicit A, expm, step-by-step recurrence ----------

/// Coefficients a_0..a_{n-1} of prod_i (s - r_i) = s^n + sum_k a_k s^k.
fn poly_from_roots(roots: &[f64]) -> Vec<f64> {
    let mut p = vec![1.0]; // ascending powers
    for &r in roots {
        let mut q = vec![0.0; p.len() + 1];
        for (k, &c) in p.iter().enumerate() {
            q[k + 1] += c;
            q[k] -= r * c;
        }
        p = q;
    }
    p.truncate(roots.len());
    p
}

/// The explicit n x n state matrix of a form with the given roots (row-major).
fn state_matrix(roots: &[f64], form: AForm) -> Vec<f64> {
    let n = roots.len();
    match form {
        AForm::Diagonal => {
            let mut a = vec![0.0; n * n];
            (0..n).for_each(|i| a[i * n + i] = roots[i]);
            a
        }
        _ => companion(&poly_from_roots(roots), form),
    }
}

/// The companion matrix (SC) of s^n + sum_k coef_k s^k, or its transpose (SO).
fn companion(coef: &[f64], form: AForm) -> Vec<f64> {
    let n = coef.len();
    let mut a = vec![0.0; n * n];
    match form {
        AForm::Diagonal => panic!("no companion matrix for the diagonal form"),
        _ => {
            for i in 0..n - 1 {
                a[i * n + i + 1] = 1.0;
            }
            for k in 0..n {
                a[(n - 1) * n + k] = -coef[k];
            }
            if form == AForm::Observable {
                let c = a.clone();
                for i in 0..n {
                    for j in 0..n {
                        a[i * n + j] = c[j * n + i];
                    }
                }
            }
        }
    }
    a
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            for j in 0..n {
                c[i * n + j] += a[i * n + k] * b[k * n + j];
            }
        }
    }
    c
}

/// expm by scaling and squaring of a degree-24 Taylor polynomial (f64, ||M/2^s||_1 <= 0.5).
fn expm(m: &[f64], n: usize) -> Vec<f64> {
    let norm = (0..n)
        .map(|j| (0..n).map(|i| m[i * n + j].abs()).sum::<f64>())
        .fold(0.0, f64::max);
    let s = if norm > 0.5 {
        (norm / 0.5).log2().ceil() as i32
    } else {
        0
    };
    let scaled: Vec<f64> = m.iter().map(|v| v / 2f64.powi(s)).collect();
    let mut term = vec![0.0; n * n];
    (0..n).for_each(|i| term[i * n + i] = 1.0);
    let mut sum = term.clone();
    for k in 1..=24 {
        term = matmul(&term, &scaled, n)
            .into_iter()
            .map(|v| v / k as f64)
            .collect();
        sum.iter_mut().zip(&term).for_each(|(a, b)| *a += b);
    }
    for _ in 0..s {
        sum = matmul(&sum, &sum, n);
    }
    sum
}

/// y (b, l, di) of h_t = expm(dt A_c) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t, with
/// A_c = mats[c] (n x n row-major).
fn reference_scan(
    x: &[f64],
    dt: &[f64],
    x_dbl: &[f64],
    mats: &[Vec<f64>],
    d_skip: &[f64],
    (bs, l, di, n, r): (usize, usize, usize, usize, usize),
) -> Vec<f64> {
    let w = r + 2 * n;
    let mut y = vec![0.0; bs * l * di];
    for (c, a) in mats.iter().enumerate().take(di) {
        for b in 0..bs {
            let mut h = vec![0.0; n];
            for t in 0..l {
                let o = (b * l + t) * di + c;
                let dta: Vec<f64> = a.iter().map(|v| v * dt[o]).collect();
                let abar = expm(&dta, n);
                let row = &x_dbl[(b * l + t) * w..][..w];
                let mut hn = vec![0.0; n];
                for i in 0..n {
                    hn[i] = (0..n).map(|j| abar[i * n + j] * h[j]).sum::<f64>()
                        + dt[o] * row[r + i] * x[o];
                }
                h = hn;
                y[o] = (0..n).map(|i| row[r + n + i] * h[i]).sum::<f64>() + d_skip[c] * x[o];
            }
        }
    }
    y
}

/// Random scan inputs x, dt, x_dbl (B and C after the dt rank) and D for layer 0 of `model`,
/// as host vectors and CPU f64 tensors; D is also set on the model.
struct ScanInputs {
    x: Vec<f64>,
    dt: Vec<f64>,
    x_dbl: Vec<f64>,
    d_skip: Vec<f64>,
    xt: Tensor,
    dtt: Tensor,
    xdt: Tensor,
    dsk: Tensor,
}

fn scan_inputs(
    rng: &mut ChaCha8Rng,
    model: &MambaLm,
    (bs, l, di, n, r): (usize, usize, usize, usize, usize),
) -> ScanInputs {
    let x = rand_vec(rng, bs * l * di, -1.0, 1.0);
    let dt = rand_vec(rng, bs * l * di, 0.01, 0.6);
    let x_dbl = rand_vec(rng, bs * l * (r + 2 * n), -1.0, 1.0);
    let d_skip = rand_vec(rng, di, -1.0, 1.0);
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x.clone(), (bs, l, di), &dev).unwrap();
    let dtt = Tensor::from_vec(dt.clone(), (bs, l, di), &dev).unwrap();
    let xdt = Tensor::from_vec(x_dbl.clone(), (bs, l, r + 2 * n), &dev).unwrap();
    let dsk = Tensor::from_vec(d_skip.clone(), di, &dev).unwrap();
    model
        .store
        .get("backbone.layers.0.mixer.D")
        .unwrap()
        .var
        .set(&dsk)
        .unwrap();
    ScanInputs {
        x,
        dt,
        x_dbl,
        d_skip,
        xt,
        dtt,
        xdt,
        dsk,
    }
}

/// Every output is within (1e-12 + `cond_tol`) x the output scale of the reference, at most.
fn assert_near_reference(what: &str, want: &[f64], outputs: &[(&str, &Vec<f64>)], cond_tol: f64) {
    let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
    for (name, got) in outputs {
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < (1e-12 + cond_tol) * scale,
            "{what} {name}: max error {err} (scale {scale}, tolerance {cond_tol:.3e} + 1e-12)"
        );
    }
}

/// Rank by Gaussian elimination with full pivoting after scaling every column to unit norm
/// (rank does not depend on column scales; Krylov columns A^k b differ by orders of
/// magnitude), pivots below `tol` counting as zero.
fn rank(m: &[f64], n: usize, tol: f64) -> usize {
    let mut a = m.to_vec();
    for j in 0..n {
        let norm = (0..n).map(|i| a[i * n + j].powi(2)).sum::<f64>().sqrt();
        (0..n).for_each(|i| a[i * n + j] /= norm);
    }
    let scale = 1.0;
    let mut r = 0;
    let mut rows: Vec<usize> = (0..n).collect();
    let mut cols: Vec<usize> = (0..n).collect();
    while r < n {
        let (mut bi, mut bj, mut best) = (r, r, 0.0);
        for i in r..n {
            for j in r..n {
                let v = a[rows[i] * n + cols[j]].abs();
                if v > best {
                    (bi, bj, best) = (i, j, v);
                }
            }
        }
        if best <= tol * scale {
            break;
        }
        rows.swap(r, bi);
        cols.swap(r, bj);
        let p = a[rows[r] * n + cols[r]];
        for i in r + 1..n {
            let f = a[rows[i] * n + cols[r]] / p;
            for j in r..n {
                a[rows[i] * n + cols[j]] -= f * a[rows[r] * n + cols[j]];
            }
        }
        r += 1;
    }
    r
}

/// Kalman controllability matrix [b, Ab, ..., A^{n-1} b] (columns), row-major.
fn controllability(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut k = vec![0.0; n * n];
    let mut v = b.to_vec();
    for col in 0..n {
        (0..n).for_each(|i| k[i * n + col] = v[i]);
        v = (0..n)
            .map(|i| (0..n).map(|j| a[i * n + j] * v[j]).sum())
            .collect();
    }
    k
}

/// Kalman observability matrix [c; cA; ...; cA^{n-1}] (rows).
fn observability(a: &[f64], c: &[f64], n: usize) -> Vec<f64> {
    let mut o = vec![0.0; n * n];
    let mut v = c.to_vec();
    for row in 0..n {
        o[row * n..(row + 1) * n].copy_from_slice(&v);
        v = (0..n)
            .map(|j| (0..n).map(|i| v[i] * a[i * n + j]).sum())
            .collect();
    }
    o
}

// ----------------------------------------- tests -----------------------------------------

/// SC is controllable from its canonical input e_n and from random B; SO is observable from
/// e_n^T and random C; a diagonal A with a zero input entry is not (the check can fail).
/// Krylov matrices are exponentially ill-conditioned in n, so a floating-point rank is only
/// decisive for small n: checked up to n = 6.
#[test]
fn kalman_ranks_are_full_for_random_parameters() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for n in [2, 3, 4, 6] {
        for form in [AForm::Controllable, AForm::Observable] {
            let model = MambaLm::new(&cfg("S", n, form), &Device::Cpu, DType::F64, 1).unwrap();
            randomise_roots(&model, form, &mut rng, 1.0);
            let roots = to_vec(&mixer(&model).roots().unwrap());
            let di = roots.len() / n;
            for c in 0..di {
                let a = state_matrix(&roots[c * n..(c + 1) * n], form);
                let mut e_n = vec![0.0; n];
                e_n[n - 1] = 1.0;
                let random = rand_vec(&mut rng, n, -1.0, 1.0);
                for v in [&e_n, &random] {
                    let k = match form {
                        AForm::Controllable => controllability(&a, v, n),
                        _ => observability(&a, v, n),
                    };
                    assert_eq!(rank(&k, n, 1e-10), n, "{form:?} n = {n} channel {c}");
                }
                // SC and SO are each other's dual: the same pair in the other test is full too.
                let at: Vec<f64> = (0..n * n).map(|i| a[(i % n) * n + i / n]).collect();
                let dual = match form {
                    AForm::Controllable => observability(&at, &e_n, n),
                    _ => controllability(&at, &e_n, n),
                };
                assert_eq!(rank(&dual, n, 1e-10), n);
            }
        }
        let roots: Vec<f64> = (0..n).map(|i| -1.0 - i as f64).collect();
        let a = state_matrix(&roots, AForm::Diagonal);
        let mut b = vec![1.0; n];
        b[0] = 0.0;
        assert_eq!(rank(&controllability(&a, &b, n), n, 1e-10), n - 1);
    }
}

/// Random (x, dt, x_dbl) through the mixer's scan (fused CPU op, and the eigenbasis maps plus
/// the composed scan) against expm(dt A) stepped one token at a time, all three forms.
#[test]
fn scan_matches_matrix_exponential_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for form in FORMS {
        for (n, l) in [(3, 1), (3, 6), (5, 33), (8, 17)] {
            let c = cfg("S", n, form);
            let model = MambaLm::new(&c, &Device::Cpu, DType::F64, 2).unwrap();
            randomise_roots(&model, form, &mut rng, 1.5);
            let m = mixer(&model);
            let (bs, di, r) = (2, c.d_inner(), c.mamba1.dt_rank(c.d_model));
            let ScanInputs {
                x,
                dt,
                x_dbl,
                d_skip,
                xt,
                dtt,
                xdt,
                dsk,
            } = scan_inputs(&mut rng, &model, (bs, l, di, n, r));
            let roots = to_vec(&m.roots().unwrap());
            let mats: Vec<Vec<f64>> = (0..di)
                .map(|ch| state_matrix(&roots[ch * n..(ch + 1) * n], form))
                .collect();
            let want = reference_scan(&x, &dt, &x_dbl, &mats, &d_skip, (bs, l, di, n, r));
            let fused = to_vec(&m.ssm(&xt, &xdt, &dtt).unwrap());
            let lam = m.roots().unwrap();
            let composed = if form == AForm::Diagonal {
                let b = xdt.narrow(2, r, n).unwrap();
                let cm = xdt.narrow(2, r + n, n).unwrap();
                selective_scan_composed(&xt, &dtt, &lam, &b, &cm, &dsk).unwrap()
            } else {
                let (b, cm) = eigenbasis_bc(&lam, form, &xdt, r).unwrap();
                selective_scan_composed(&xt, &dtt, &lam, &b, &cm, &dsk).unwrap()
            };
            let composed = to_vec(&composed);
            let kappa = (0..di)
                .map(|ch| eigen_condition(&roots[ch * n..(ch + 1) * n]))
                .fold(0.0, f64::max);
            // Exact method, so only rounding remains: it grows with the eigenbasis condition.
            let what = format!("{form:?} n {n} l {l}");
            assert_near_reference(
                &what,
                &want,
                &[("fused", &fused), ("composed", &composed)],
                1e-15 * kappa,
            );
            assert!(want.iter().any(|v| v.abs() > 1e-3));
        }
    }
}

/// In f32 at d_state 8 with the geometric root init the eigenbasis scan stays within 1e-3
/// (relative to the output scale) of the f64 result; S4D-real roots make it far worse
/// conditioned (why canonical forms default to geometric).
#[test]
fn f32_canonical_scan_is_accurate_at_d_state_8() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for form in [AForm::Controllable, AForm::Observable] {
        let c = cfg("S", 8, form);
        let m64 = MambaLm::new(&c, &Device::Cpu, DType::F64, 3).unwrap();
        let m32 = MambaLm::new(&c, &Device::Cpu, DType::F32, 3).unwrap();
        let (bs, l, di, r, n) = (2, 40, c.d_inner(), c.mamba1.dt_rank(c.d_model), 8);
        let x = rand_vec(&mut rng, bs * l * di, -1.0, 1.0);
        let dt = rand_vec(&mut rng, bs * l * di, 0.001, 0.1);
        let x_dbl = rand_vec(&mut rng, bs * l * (r + 2 * n), -1.0, 1.0);
        let run = |m: &MambaLm, dtype: DType| {
            let t = |v: &Vec<f64>, s: (usize, usize, usize)| {
                Tensor::from_vec(v.clone(), s, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let y = mixer(m)
                .ssm(
                    &t(&x, (bs, l, di)),
                    &t(&x_dbl, (bs, l, r + 2 * n)),
                    &t(&dt, (bs, l, di)),
                )
                .unwrap();
            to_vec(&y)
        };
        let (y64, y32) = (run(&m64, DType::F64), run(&m32, DType::F32));
        let scale = y64.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        let err = y64
            .iter()
            .zip(&y32)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{form:?} n = 8 f32: max error / scale = {:.2e}",
            err / scale
        );
        assert!(err < 1e-3 * scale, "{form:?}: f32 error {err} of {scale}");
    }
    let geo = eigen_condition(&AInit::Geometric.roots(8));
    let s4d = eigen_condition(&AInit::S4dReal.roots(8));
    assert!(
        geo < 1e4 && s4d > 1e7,
        "kappa geometric {geo:.3e}, s4d-real {s4d:.3e}"
    );
}

/// The fused CPU scan and the composed candle scan agree in value and in every gradient (f64),
/// with B/C shared by the channels and per channel.
#[test]
fn fused_scan_matches_composed_values_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (bs, l, di, n, r) = (2, 23, 20, 4, 3);
    let dev = Device::Cpu;
    let var = |rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64| {
        let k = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(rand_vec(rng, k, lo, hi), shape, &dev).unwrap()).unwrap()
    };
    for shared in [true, false] {
        let x = var(&mut rng, &[bs, l, di], -1.0, 1.0);
        let dt = var(&mut rng, &[bs, l, di], 0.01, 0.8);
        let a = var(&mut rng, &[di, n], -3.0, -0.1);
        let d = var(&mut rng, &[di], -1.0, 1.0);
        let bc = if shared {
            var(&mut rng, &[bs, l, r + 2 * n], -1.0, 1.0)
        } else {
            var(&mut rng, &[bs, l, di, 2 * n], -1.0, 1.0)
        };
        let w = Tensor::from_vec(
            rand_vec(&mut rng, bs * l * di, -1.0, 1.0),
            (bs, l, di),
            &dev,
        )
        .unwrap();
        let (layout, b, c) = if shared {
            (
                BcLayout::shared(r + 2 * n, r, n),
                bc.narrow(2, r, n).unwrap(),
                bc.narrow(2, r + n, n).unwrap(),
            )
        } else {
            (
                BcLayout::per_channel(di, n),
                bc.narrow(3, 0, n).unwrap(),
                bc.narrow(3, n, n).unwrap(),
            )
        };
        let yf = selective_scan_fused(&x, &dt, &a, &bc, layout, &d).unwrap();
        let yc = selective_scan_composed(&x, &dt, &a, &b, &c, &d).unwrap();
        let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = |p: &Tensor, q: &Tensor| {
            to_vec(p)
                .iter()
                .zip(to_vec(q))
                .map(|(u, v)| (u - v).abs())
                .fold(0.0, f64::max)
        };
        assert!(diff(&yf, &yc) < 1e-12, "shared {shared}: y");
        for (name, v) in [("x", &x), ("dt", &dt), ("A", &a), ("D", &d), ("bc", &bc)] {
            let (p, q) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(
                diff(p, q) < 1e-11,
                "shared {shared}: d{name} differs by {}",
                diff(p, q)
            );
            assert!(
                to_vec(p).iter().any(|g| g.abs() > 1e-6),
                "d{name} is all zero"
            );
        }
    }
}

fn random_batch(seed: u64, b: usize, l: usize) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Batch {
        inputs: (0..b * l).map(|_| rng.gen_range(0..256)).collect(),
        targets: (0..b * l).map(|_| rng.gen_range(0..256)).collect(),
        mask: vec![1.0; b * l],
        batch_size: b,
        seq_len: l,
    }
}

/// Central differences on entries of every parameter of a two-layer S model (f64), A_log /
/// A_root_log included (the canonical forms' gradient runs through the Vandermonde maps).
#[test]
fn gradients_match_finite_differences_for_every_form() {
    for form in FORMS {
        let c = cfg("SS", 4, form);
        let model = MambaLm::new(&c, &Device::Cpu, DType::F64, 4).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // Random, larger-than-init steps and roots so every path carries gradient.
        let batch = random_batch(5, 2, 9);
        let checked = check_gradients_by_finite_differences(
            &model,
            &batch,
            &mut rng,
            form,
            |name| name.contains(".A_"),
            8,
        );
        assert!(checked > 30);
    }
}

/// Autograd vs central finite differences (f64) on random entries of every parameter of
/// `model`: `a_samples` entries of each A parameter (`is_a(name)`, which must also get a
/// nonzero gradient), 3 of every other. Returns the number of entries checked.
fn check_gradients_by_finite_differences(
    model: &MambaLm,
    batch: &Batch,
    rng: &mut ChaCha8Rng,
    form: impl std::fmt::Debug,
    is_a: impl Fn(&str) -> bool,
    a_samples: usize,
) -> usize {
    let loss = |m: &MambaLm| {
        forward_loss(m, batch)
            .unwrap()
            .total()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = forward_loss(model, batch)
        .unwrap()
        .total()
        .unwrap()
        .backward()
        .unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for p in model.store.params() {
        let g = to_vec(grads.get(p.var.as_tensor()).expect("gradient"));
        let orig = to_vec(p.var.as_tensor());
        let is_a = is_a(&p.name);
        for _ in 0..if is_a { a_samples } else { 3 } {
            let i = rng.gen_range(0..orig.len());
            let set = |delta: f64| {
                let mut v = orig.clone();
                v[i] += delta;
                p.var
                    .set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            };
            set(eps);
            let up = loss(model);
            set(-eps);
            let down = loss(model);
            set(0.0);
            let fd = (up - down) / (2.0 * eps);
            let err = (fd - g[i]).abs();
            assert!(
                err <= 1e-8 + 1e-5 * fd.abs().max(g[i].abs()),
                "{form:?} {}[{i}]: autograd {} vs finite difference {fd}",
                p.name,
                g[i]
            );
            checked += 1;
        }
        if is_a {
            assert!(
                g.iter().any(|v| v.abs() > 1e-7),
                "{}: zero gradient",
                p.name
            );
        }
    }
    checked
}

/// Parameters of S layers: the closed form of mamba_ssm's Mamba, the instantiated model, and
/// `ParamCount` agree, for every form and in a hybrid with Mamba2 layers.
#[test]
fn parameter_counts_match_closed_form() {
    for form in FORMS {
        for pattern in ["S", "SS", "MS"] {
            let c = cfg(pattern, 5, form);
            let (d, di, n, k) = (c.d_model, c.d_inner(), c.d_state, c.d_conv);
            let r = d.div_ceil(16);
            let s_block = 2 * di * d          // in_proj (x, z)
                + di * (k + 1)                 // conv1d weight + bias
                + (r + 2 * n) * di             // x_proj
                + r * di + di                  // dt_proj weight + bias
                + di * n + di                  // A_log / A_root_log, D
                + di * d                       // out_proj
                + d; // pre-norm
            let mut m_only = c.clone();
            m_only.layer_pattern = "M".into();
            m_only.n_layer = 1;
            let m_block = ParamCount::of(&m_only).total() - 256 * d - d;
            let s_layers = pattern.matches('S').count();
            let m_layers = pattern.matches('M').count();
            let want = 256 * d + d + s_layers * s_block + m_layers * m_block;
            let model = MambaLm::new(&c, &Device::Cpu, DType::F32, 0).unwrap();
            assert_eq!(model.store.total_params(), want, "{form:?} {pattern}");
            assert_eq!(
                ParamCount::of(&c).total(),
                want,
                "{form:?} {pattern} closed form"
            );
            assert_eq!(ParamCount::of(&c).active(), want);
        }
    }
}

/// Checkpoint names follow mamba_ssm / HF Mamba-1; the canonical forms store A_root_log.
#[test]
fn parameter_names_follow_mamba_ssm() {
    for form in FORMS {
        let model = MambaLm::new(&cfg("S", 4, form), &Device::Cpu, DType::F32, 0).unwrap();
        let a = if form == AForm::Diagonal {
            "A_log"
        } else {
            "A_root_log"
        };
        let p = "backbone.layers.0.mixer";
        for (name, shape) in [
            ("in_proj.weight", vec![32, 8]),
            ("conv1d.weight", vec![16, 1, 3]),
            ("conv1d.bias", vec![16]),
            ("x_proj.weight", vec![1 + 8, 16]),
            ("dt_proj.weight", vec![16, 1]),
            ("dt_proj.bias", vec![16]),
            (a, vec![16, 4]),
            ("D", vec![16]),
            ("out_proj.weight", vec![8, 16]),
        ] {
            let t = model
                .store
                .get(&format!("{p}.{name}"))
                .unwrap_or_else(|| panic!("{form:?}: no {name}"));
            assert_eq!(t.var.dims(), shape.as_slice(), "{name}");
        }
        assert_eq!(model.store.params().len(), 9 + 3); // + embedding, norm, norm_f
    }
}

const SPEC: &str = r#"
seeds = [0]
device = "cpu"

[model]
d_model = 32
n_layer = 2
pattern = "S"
d_state = 8

[train]
steps = 10
batch_size = 2
seq_len = 32

[[variants]]
name = "mamba1"
preset = "dense"

[[variants]]
name = "sc"
preset = "dense"
a_form = "controllable"

[[variants]]
name = "so"
preset = "dense"
a_form = "observable"
a_init = "s4d-real"
"#;

fn parse(text: &str) -> Result<ExperimentSpec, moz_lab::lab::spec::SpecError> {
    ExperimentSpec::parse(Path::new("experiments/s.toml"), text, &[])
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn spec_with_s_layers_resolves_forms_per_variant() {
    let spec = parse(SPEC).unwrap();
    let runs = spec.runs(Path::new("runs")).unwrap();
    let got: Vec<(AForm, AInit)> = runs
        .iter()
        .map(|r| (r.model.mamba1.a_form, r.model.mamba1.a_init))
        .collect();
    assert_eq!(
        got,
        vec![
            (AForm::Diagonal, AInit::S4dReal),
            (AForm::Controllable, AInit::Geometric),
            (AForm::Observable, AInit::S4dReal)
        ]
    );
    assert_eq!(runs[0].model.layer_pattern, "SS");
    // The resolved config survives config.json.
    let json = serde_json::to_string(&runs[1].model).unwrap();
    let back: ModelConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, runs[1].model);
}

#[test]
fn bad_a_form_is_a_located_error() {
    let text = SPEC.replace("a_form = \"observable\"", "a_form = \"jordan\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "variants[2].a_form");
    assert_eq!(e.line, line_of(&text, "jordan"));
    assert!(
        e.message.contains("diagonal, controllable, observable"),
        "{e}"
    );
    let text = SPEC.replace("d_state = 8", "d_state = 8\na_form = \"companion\"");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "model.a_form");
    assert_eq!(e.line, line_of(&text, "companion"));
}

#[test]
fn ill_conditioned_settings_are_rejected() {
    let e = parse(&SPEC.replace("d_state = 8", "d_state = 24")).unwrap_err();
    assert_eq!(e.field, "model.d_state");
    assert!(e.message.contains("<= 16"), "{e}");
    let e = parse(&SPEC.replace("a_init = \"s4d-real\"", "a_init = \"hippo\"")).unwrap_err();
    assert_eq!(e.field, "variants[2].a_init");
}

/// bf16 training (the GPU's mixed precision) reaches the canonical basis, which the host builds
/// in f32: the loss and the roots' gradient are finite and close to the f32 model's.
#[test]
fn bf16_canonical_forms_train_through_an_f32_basis() {
    for form in [AForm::Controllable, AForm::Observable] {
        let c = cfg("S", 8, form);
        let batch = random_batch(6, 2, 12);
        let m32 = MambaLm::new(&c, &Device::Cpu, DType::F32, 5).unwrap();
        let m16 = MambaLm::new(&c, &Device::Cpu, DType::BF16, 5).unwrap();
        let l32 = forward_loss(&m32, &batch)
            .unwrap()
            .ce
            .to_dtype(DType::F64)
            .unwrap();
        let parts = forward_loss(&m16, &batch).unwrap();
        let l16 = parts.ce.to_dtype(DType::F64).unwrap();
        let (a, b) = (
            l32.to_scalar::<f64>().unwrap(),
            l16.to_scalar::<f64>().unwrap(),
        );
        assert!(
            b.is_finite() && (a - b).abs() < 0.1,
            "{form:?}: f32 {a} bf16 {b}"
        );
        let grads = parts.total().unwrap().backward().unwrap();
        let root = m16
            .store
            .params()
            .iter()
            .find(|p| p.name.ends_with("A_root_log"))
            .expect("a root parameter");
        let g = grads
            .get(root.var.as_tensor())
            .expect("roots get a gradient");
        assert!(
            to_vec(g).iter().all(|v| v.is_finite()),
            "{form:?}: non-finite gradient"
        );
    }
}

// ------------------------- free coefficients (a_stable = false) -------------------------

fn free_cfg(pattern: &str, n: usize, form: AForm) -> ModelConfig {
    let mut c = cfg(pattern, n, form);
    c.mamba1.a_stable = false;
    c
}

/// Coefficients of a real polynomial with `pairs` complex-conjugate root pairs (Re in
/// [-2, -0.1], Im in [0.3, 2.5]) and n - 2 pairs real roots spread over [-3, -0.1], returned
/// with the roots (pairs with Im > 0 first, then the reals).
fn mixed_coefficients(rng: &mut ChaCha8Rng, n: usize, pairs: usize) -> (Vec<f64>, Vec<C64>) {
    // Multiply out prod (s^2 - 2 re s + |mu|^2) prod (s - r).
    let mut p = vec![1.0];
    let mut roots = Vec::new();
    let mul = |p: &[f64], f: &[f64]| {
        let mut q = vec![0.0; p.len() + f.len() - 1];
        for (i, a) in p.iter().enumerate() {
            for (j, b) in f.iter().enumerate() {
                q[i + j] += a * b;
            }
        }
        q
    };
    for _ in 0..pairs {
        let mu = C64::new(-rng.gen_range(0.1..2.0), rng.gen_range(0.3..2.5));
        p = mul(&p, &[mu.norm_sqr(), -2.0 * mu.re, 1.0]);
        roots.push(mu);
    }
    for k in 0..n - 2 * pairs {
        // One real root per sub-interval keeps them apart (distinct).
        let span = 2.9 / (n - 2 * pairs) as f64;
        let r = -(0.1 + span * (k as f64 + rng.gen_range(0.2..0.8)));
        p = mul(&p, &[-r, 1.0]);
        roots.push(C64::real(r));
    }
    p.truncate(n);
    (p, roots)
}

/// Sets layer `layer`'s A_coef to the same coefficients in every channel, or per channel.
fn set_coefficients(model: &MambaLm, layer: usize, coef: &[f64]) {
    let p = model
        .store
        .get(&format!("backbone.layers.{layer}.mixer.A_coef"))
        .expect("A_coef");
    let v = if coef.len() == p.numel() {
        coef.to_vec()
    } else {
        coef.repeat(p.numel() / coef.len())
    };
    let t = Tensor::from_vec(v, p.var.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(model.dtype())
        .unwrap();
    p.var.set(&t).unwrap();
}

/// The root finder and the slot order: complex pairs (one root with Im > 0 each) and reals
/// come back from the coefficients, and every root satisfies p(root) = 0.
#[test]
fn free_coefficient_roots_are_recovered() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (n, pairs) in [(2, 1), (3, 1), (4, 2), (5, 2), (8, 3), (8, 0), (7, 3)] {
        let (coef, mut want) = mixed_coefficients(&mut rng, n, pairs);
        let sp = Spectrum::of(&coef).unwrap();
        assert_eq!(sp.pairs.len(), pairs, "n {n}: {sp:?}");
        assert_eq!(sp.reals.len(), n - 2 * pairs);
        let mut got = sp.pairs.clone();
        got.extend(sp.reals.iter().map(|&r| C64::real(r)));
        for g in &got {
            let (k, d) = want
                .iter()
                .enumerate()
                .map(|(k, w)| (k, (*w - *g).abs()))
                .fold((0, f64::INFINITY), |b, c| if c.1 < b.1 { c } else { b });
            assert!(
                d < 1e-9,
                "n {n}: root {g:?} is {d} from the nearest true root"
            );
            want.remove(k);
        }
        // Roots of a polynomial with positive-real-part roots (unstable) come back too.
        let unstable = coefficients_from_roots(&[0.5, -1.0, 2.0]);
        let sp = Spectrum::of(&unstable).unwrap();
        assert_eq!(sp.reals.len(), 3);
        assert!((sp.reals[2] - 2.0).abs() < 1e-12 && (sp.reals[1] - 0.5).abs() < 1e-12);
    }
}

/// The free-coefficient scan (fused CPU op, and the basis maps plus the composed rotation
/// scan) against expm(dt A) stepped one token at a time, A the companion matrix (SC) or its
/// transpose (SO) built straight from the coefficients; roots complex pairs and real, odd and
/// even n, different coefficients per channel.
#[test]
fn free_coefficient_scan_matches_matrix_exponential_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for form in [AForm::Controllable, AForm::Observable] {
        for (n, pairs, l) in [(2, 1, 5), (3, 1, 9), (4, 2, 17), (5, 1, 12), (6, 3, 20)] {
            let c = free_cfg("S", n, form);
            let model = MambaLm::new(&c, &Device::Cpu, DType::F64, 2).unwrap();
            let m = mixer(&model);
            let (bs, di, r) = (2, c.d_inner(), c.mamba1.dt_rank(c.d_model));
            let mut all = Vec::new();
            let mut mats = Vec::new();
            for _ in 0..di {
                let (coef, _) = mixed_coefficients(&mut rng, n, pairs);
                mats.push(companion(&coef, form));
                all.extend(coef);
            }
            set_coefficients(&model, 0, &all);
            let ScanInputs {
                x,
                dt,
                x_dbl,
                d_skip,
                xt,
                dtt,
                xdt,
                dsk,
            } = scan_inputs(&mut rng, &model, (bs, l, di, n, r));
            let want = reference_scan(&x, &dt, &x_dbl, &mats, &d_skip, (bs, l, di, n, r));
            let fused = to_vec(&m.ssm(&xt, &xdt, &dtt).unwrap());
            let basis = free_canonical_basis(m.a_param(), form).unwrap();
            let (a_re, a_im) = (
                basis.narrow(1, 0, 1).unwrap(),
                basis.narrow(1, 1, 1).unwrap(),
            );
            let (a_re, a_im) = (a_re.squeeze(1).unwrap(), a_im.squeeze(1).unwrap());
            let p = basis
                .narrow(1, 2, 2 * n)
                .unwrap()
                .reshape((di, 2, n, n))
                .unwrap();
            let (b, cm) = basis_bc(&p, &xdt, r).unwrap();
            let composed = to_vec(
                &selective_scan_rot_composed(&xt, &dtt, &a_re, &a_im, &b, &cm, &dsk).unwrap(),
            );
            assert!(
                to_vec(&a_im).iter().any(|v| v.abs() > 0.1),
                "complex roots reach the scan"
            );
            let coefs = to_vec(m.a_param());
            let kappa = (0..di)
                .map(|ch| {
                    free_basis(&coefs[ch * n..(ch + 1) * n], form)
                        .unwrap()
                        .kappa
                })
                .fold(0.0, f64::max);
            let what = format!("{form:?} n {n} l {l}");
            assert_near_reference(
                &what,
                &want,
                &[("fused", &fused), ("composed", &composed)],
                1e-14 * kappa,
            );
            assert!(want.iter().any(|v| v.abs() > 1e-3));
        }
    }
}

/// The fused rotation-mode scan and the composed one agree in value and in every gradient
/// (f64), for arbitrary per-slot (a_re, a_im), odd and even n.
#[test]
fn fused_rotation_scan_matches_composed_values_and_gradients() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let dev = Device::Cpu;
    let var = |rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64| {
        let k = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(rand_vec(rng, k, lo, hi), shape, &dev).unwrap()).unwrap()
    };
    for n in [4, 5] {
        let (bs, l, di) = (2, 19, 18);
        let x = var(&mut rng, &[bs, l, di], -1.0, 1.0);
        let dt = var(&mut rng, &[bs, l, di], 0.01, 0.8);
        let a_re = var(&mut rng, &[di, n], -3.0, -0.1);
        let a_im = var(&mut rng, &[di, n], -2.0, 2.0);
        let d = var(&mut rng, &[di], -1.0, 1.0);
        let bc = var(&mut rng, &[bs, l, di, 2 * n], -1.0, 1.0);
        let w = Tensor::from_vec(
            rand_vec(&mut rng, bs * l * di, -1.0, 1.0),
            (bs, l, di),
            &dev,
        )
        .unwrap();
        let (b, c) = (bc.narrow(3, 0, n).unwrap(), bc.narrow(3, n, n).unwrap());
        let layout = BcLayout::per_channel(di, n);
        let yf = selective_scan_rot_fused(&x, &dt, &a_re, &a_im, &bc, layout, &d).unwrap();
        let yc = selective_scan_rot_composed(&x, &dt, &a_re, &a_im, &b, &c, &d).unwrap();
        let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = |p: &Tensor, q: &Tensor| {
            to_vec(p)
                .iter()
                .zip(to_vec(q))
                .map(|(u, v)| (u - v).abs())
                .fold(0.0, f64::max)
        };
        assert!(diff(&yf, &yc) < 1e-12, "n {n}: y");
        for (name, v) in [
            ("x", &x),
            ("dt", &dt),
            ("a_re", &a_re),
            ("a_im", &a_im),
            ("D", &d),
            ("bc", &bc),
        ] {
            let (p, q) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(
                diff(p, q) < 1e-11,
                "n {n}: d{name} differs by {}",
                diff(p, q)
            );
            assert!(
                to_vec(p).iter().any(|g| g.abs() > 1e-6),
                "d{name} is all zero"
            );
        }
        // With a_im = 0 the rotation scan is the real diagonal one.
        let zero = a_im.zeros_like().unwrap();
        let yr = selective_scan_rot_fused(&x, &dt, &a_re, &zero, &bc, layout, &d).unwrap();
        let yd = selective_scan_fused(&x, &dt, &a_re, &bc, layout, &d).unwrap();
        assert!(diff(&yr, &yd) < 1e-13);
    }
}

/// The basis op's hand-written backward (implicit root derivative, complex Vandermonde,
/// real-block extraction) against central differences, every coefficient of every channel,
/// through a scan (the basis itself depends on the balancing scales the backward holds fixed;
/// the scan's output does not), complex and real roots, both forms, odd and even n.
#[test]
fn free_basis_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let dev = Device::Cpu;
    for form in [AForm::Controllable, AForm::Observable] {
        for (n, pairs) in [(2, 1), (3, 1), (4, 2), (5, 2), (6, 1)] {
            let c = free_cfg("S", n, form);
            let model = MambaLm::new(&c, &dev, DType::F64, 2).unwrap();
            let m = mixer(&model);
            let (bs, l, di, r) = (1, 7, c.d_inner(), c.mamba1.dt_rank(c.d_model));
            let mut all = Vec::new();
            for _ in 0..di {
                all.extend(mixed_coefficients(&mut rng, n, pairs).0);
            }
            set_coefficients(&model, 0, &all);
            let t = |v: Vec<f64>, s: (usize, usize, usize)| Tensor::from_vec(v, s, &dev).unwrap();
            let x = t(rand_vec(&mut rng, bs * l * di, -1.0, 1.0), (bs, l, di));
            let dt = t(rand_vec(&mut rng, bs * l * di, 0.05, 0.5), (bs, l, di));
            let x_dbl = t(
                rand_vec(&mut rng, bs * l * (r + 2 * n), -1.0, 1.0),
                (bs, l, r + 2 * n),
            );
            let w = t(rand_vec(&mut rng, bs * l * di, -1.0, 1.0), (bs, l, di));
            let f = || {
                (m.ssm(&x, &x_dbl, &dt).unwrap() * &w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let p = model.store.get("backbone.layers.0.mixer.A_coef").unwrap();
            let g = to_vec(f().backward().unwrap().get(p.var.as_tensor()).unwrap());
            let eps = 1e-6;
            // Rounding in the loss, amplified by the eigenbasis condition, limits the finite
            // difference: errors are measured against the gradient's largest entry too.
            let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for i in 0..all.len() {
                let at = |delta: f64| {
                    let mut v = all.clone();
                    v[i] += delta;
                    set_coefficients(&model, 0, &v);
                    f().to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() <= 1e-6 * gmax + 1e-5 * fd.abs().max(g[i].abs()),
                    "{form:?} n {n} a[{i}]: autograd {} vs finite difference {fd}",
                    g[i]
                );
            }
            set_coefficients(&model, 0, &all);
            assert!(g.iter().any(|v| v.abs() > 1e-3));
        }
    }
}

/// Central differences on entries of every parameter of a two-layer free-coefficient model
/// (f64) whose layers have complex-pair and real roots, A_coef included.
#[test]
fn free_coefficient_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    for form in [AForm::Controllable, AForm::Observable] {
        let n = 5;
        let c = free_cfg("SS", n, form);
        let model = MambaLm::new(&c, &Device::Cpu, DType::F64, 4).unwrap();
        for layer in 0..2 {
            let mut all = Vec::new();
            for _ in 0..c.d_inner() {
                all.extend(mixed_coefficients(&mut rng, n, 2 - layer).0);
            }
            set_coefficients(&model, layer, &all);
        }
        let batch = random_batch(5, 2, 9);
        let checked = check_gradients_by_finite_differences(
            &model,
            &batch,
            &mut rng,
            form,
            |name| name.ends_with(".A_coef"),
            10,
        );
        assert!(checked > 30);
    }
}

/// SC from random free coefficients (roots anywhere, complex or real, stable or not) is
/// controllable from e_n and random B; SO observable from e_n^T and random C; and the model's
/// A_coef, as trained, builds such matrices.
#[test]
fn kalman_ranks_are_full_for_random_free_coefficients() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for n in [2, 3, 4, 6] {
        for form in [AForm::Controllable, AForm::Observable] {
            let model = MambaLm::new(&free_cfg("S", n, form), &Device::Cpu, DType::F64, 1).unwrap();
            let p = model.store.get("backbone.layers.0.mixer.A_coef").unwrap();
            let coefs = rand_vec(&mut rng, p.numel(), -2.0, 2.0);
            set_coefficients(&model, 0, &coefs);
            let coefs = to_vec(mixer(&model).a_param());
            let mut complex = 0;
            for ch in 0..coefs.len() / n {
                let a_c = &coefs[ch * n..(ch + 1) * n];
                complex += Spectrum::of(a_c).unwrap().pairs.len();
                let a = companion(a_c, form);
                let mut e_n = vec![0.0; n];
                e_n[n - 1] = 1.0;
                let random = rand_vec(&mut rng, n, -1.0, 1.0);
                for v in [&e_n, &random] {
                    let k = match form {
                        AForm::Controllable => controllability(&a, v, n),
                        _ => observability(&a, v, n),
                    };
                    assert_eq!(rank(&k, n, 1e-10), n, "{form:?} n = {n} channel {ch}");
                }
            }
            assert!(complex > 0, "random coefficients give some complex roots");
        }
    }
}

/// At init the free-coefficient model is the stable one: the same roots (a_init), the same
/// other parameters, so the same loss (f64 and f32); the coefficients are those of
/// prod (s - lambda_i).
#[test]
fn free_coefficients_start_as_the_stable_model() {
    for form in [AForm::Controllable, AForm::Observable] {
        for dtype in [DType::F64, DType::F32] {
            let batch = random_batch(8, 2, 16);
            let stable = MambaLm::new(&cfg("SS", 6, form), &Device::Cpu, dtype, 7).unwrap();
            let free = MambaLm::new(&free_cfg("SS", 6, form), &Device::Cpu, dtype, 7).unwrap();
            let coef = to_vec(mixer(&free).a_param());
            let want = coefficients_from_roots(&AInit::Geometric.roots(6));
            for (g, w) in coef[..6].iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{coef:?} vs {want:?}"
                );
            }
            let l = |m: &MambaLm| {
                forward_loss(m, &batch)
                    .unwrap()
                    .ce
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let (a, b) = (l(&stable), l(&free));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            assert!(
                (a - b).abs() < tol,
                "{form:?} {dtype:?}: stable {a} free {b}"
            );
        }
    }
}

/// f32 (the default training dtype) at d_state 8 with complex roots: the free-coefficient
/// scan is within 1e-3 of the output scale of the f64 result.
#[test]
fn f32_free_coefficient_scan_is_accurate_at_d_state_8() {
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    for form in [AForm::Controllable, AForm::Observable] {
        let c = free_cfg("S", 8, form);
        let (coef, _) = mixed_coefficients(&mut rng, 8, 2);
        let m64 = MambaLm::new(&c, &Device::Cpu, DType::F64, 3).unwrap();
        let m32 = MambaLm::new(&c, &Device::Cpu, DType::F32, 3).unwrap();
        set_coefficients(&m64, 0, &coef);
        set_coefficients(&m32, 0, &coef);
        let (bs, l, di, r, n) = (2, 40, c.d_inner(), c.mamba1.dt_rank(c.d_model), 8);
        let x = rand_vec(&mut rng, bs * l * di, -1.0, 1.0);
        let dt = rand_vec(&mut rng, bs * l * di, 0.001, 0.3);
        let x_dbl = rand_vec(&mut rng, bs * l * (r + 2 * n), -1.0, 1.0);
        let run = |m: &MambaLm, dtype: DType| {
            let t = |v: &Vec<f64>, s: (usize, usize, usize)| {
                Tensor::from_vec(v.clone(), s, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            to_vec(
                &mixer(m)
                    .ssm(
                        &t(&x, (bs, l, di)),
                        &t(&x_dbl, (bs, l, r + 2 * n)),
                        &t(&dt, (bs, l, di)),
                    )
                    .unwrap(),
            )
        };
        let (y64, y32) = (run(&m64, DType::F64), run(&m32, DType::F32));
        let scale = y64.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        let err = y64
            .iter()
            .zip(&y32)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{form:?} free n = 8 f32: max error / scale = {:.2e}",
            err / scale
        );
        assert!(err < 1e-3 * scale, "{form:?}: f32 error {err} of {scale}");
    }
}

/// (Nearly) repeated roots make the eigenbasis singular: where kappa * unit roundoff exceeds
/// 0.1 the forward pass fails with an error naming the layer, the channel and the condition,
/// rather than returning garbage. A double root comes out of the root finder split by about
/// sqrt(eps_f64) = 1e-8 (kappa ~ 1e9): too much for f32, usable in f64 (scan checked against
/// the expm reference there).
#[test]
fn repeated_free_roots_fail_with_a_clear_error() {
    let c = free_cfg("S", 3, AForm::Controllable);
    let batch = random_batch(1, 1, 4);
    let roots: [&[f64]; 3] = [
        &[-1.0, -1.0, -2.0],
        &[-1.0, -1.0 - 1e-9, -2.0],
        &[-0.5, -0.5, -0.5],
    ];
    for roots in roots {
        for dtype in [DType::F32, DType::F64] {
            let model = MambaLm::new(&c, &Device::Cpu, dtype, 0).unwrap();
            set_coefficients(&model, 0, &coefficients_from_roots(roots));
            // The coefficients as the model holds them (rounded to f32 in f32).
            let coef = to_vec(mixer(&model).a_param());
            let kappa = free_basis(&coef[..3], AForm::Controllable)
                .map(|b| b.kappa)
                .unwrap_or(f64::INFINITY);
            eprintln!("roots {roots:?} {dtype:?}: kappa {kappa:.3e}");
            let limit = moz_lab::model::canonical::max_free_kappa(dtype);
            match forward_loss(&model, &batch) {
                Ok(_) => assert!(
                    kappa <= limit,
                    "{roots:?} {dtype:?}: kappa {kappa:.3e} passed"
                ),
                Err(e) => {
                    let e = e.to_string();
                    assert!(kappa > limit, "{roots:?} {dtype:?}: {e}");
                    assert!(
                        e.contains("backbone.layers.0.mixer.A_coef")
                            && e.contains("channel 0")
                            && e.contains("repeated roots"),
                        "{roots:?} {dtype:?}: {e}"
                    );
                }
            }
            if dtype == DType::F32 {
                assert!(kappa > limit, "{roots:?}: f32 accepts kappa {kappa:.3e}");
            }
        }
    }
    // f64 with an exact double root: accepted, and the scan still matches the reference.
    let model = MambaLm::new(&c, &Device::Cpu, DType::F64, 0).unwrap();
    let coef = coefficients_from_roots(&[-1.0, -1.0, -2.0]);
    set_coefficients(&model, 0, &coef);
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let (bs, l, di, r, n) = (1, 12, c.d_inner(), c.mamba1.dt_rank(c.d_model), 3);
    let x = rand_vec(&mut rng, bs * l * di, -1.0, 1.0);
    let dt = rand_vec(&mut rng, bs * l * di, 0.01, 0.6);
    let x_dbl = rand_vec(&mut rng, bs * l * (r + 2 * n), -1.0, 1.0);
    let t = |v: &Vec<f64>, s: (usize, usize, usize)| {
        Tensor::from_vec(v.clone(), s, &Device::Cpu).unwrap()
    };
    let got = to_vec(
        &mixer(&model)
            .ssm(
                &t(&x, (bs, l, di)),
                &t(&x_dbl, (bs, l, r + 2 * n)),
                &t(&dt, (bs, l, di)),
            )
            .unwrap(),
    );
    let mats = vec![companion(&coef, AForm::Controllable); di];
    let want = reference_scan(&x, &dt, &x_dbl, &mats, &vec![1.0; di], (bs, l, di, n, r));
    let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("double root in f64: max error / scale {:.2e}", err / scale);
    assert!(
        err < 1e-6 * scale,
        "double root in f64: error {err} of {scale}"
    );
}

/// bf16 reaches the free basis through f32 on the host and the composed rotation scan:
/// finite loss close to the f32 model's, finite coefficient gradients.
#[test]
fn bf16_free_coefficients_train_through_an_f32_basis() {
    for form in [AForm::Controllable, AForm::Observable] {
        let c = free_cfg("S", 6, form);
        let batch = random_batch(6, 2, 12);
        let m32 = MambaLm::new(&c, &Device::Cpu, DType::F32, 5).unwrap();
        let m16 = MambaLm::new(&c, &Device::Cpu, DType::BF16, 5).unwrap();
        let l32 = forward_loss(&m32, &batch).unwrap().ce;
        let parts = forward_loss(&m16, &batch).unwrap();
        let (a, b) = (
            l32.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            parts
                .ce
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
        );
        assert!(
            b.is_finite() && (a - b).abs() < 0.1,
            "{form:?}: f32 {a} bf16 {b}"
        );
        let grads = parts.total().unwrap().backward().unwrap();
        let coef = m16.store.get("backbone.layers.0.mixer.A_coef").unwrap();
        let g = grads
            .get(coef.var.as_tensor())
            .expect("coefficients get a gradient");
        assert!(to_vec(g).iter().all(|v| v.is_finite()), "{form:?}");
    }
}

/// Parameter counts and names of the free forms: the same n per channel as the stable form,
/// stored as A_coef.
#[test]
fn free_coefficient_counts_and_names() {
    for form in [AForm::Controllable, AForm::Observable] {
        for pattern in ["S", "MS"] {
            let stable = cfg(pattern, 5, form);
            let free = free_cfg(pattern, 5, form);
            let ms = MambaLm::new(&stable, &Device::Cpu, DType::F32, 0).unwrap();
            let mf = MambaLm::new(&free, &Device::Cpu, DType::F32, 0).unwrap();
            assert_eq!(mf.store.total_params(), ms.store.total_params());
            assert_eq!(ParamCount::of(&free).total(), mf.store.total_params());
            let layer = pattern.len() - 1;
            let p = mf
                .store
                .get(&format!("backbone.layers.{layer}.mixer.A_coef"))
                .expect("A_coef");
            assert_eq!(p.var.dims(), &[free.d_inner(), 5]);
            assert!(mf
                .store
                .get(&format!("backbone.layers.{layer}.mixer.A_root_log"))
                .is_none());
        }
    }
}

#[test]
fn spec_accepts_free_coefficients_for_canonical_forms_only() {
    let text = SPEC
        .replace(
            "a_form = \"controllable\"",
            "a_form = \"controllable\"\na_stable = false",
        )
        .replace(
            "a_init = \"s4d-real\"",
            "a_init = \"s4d-real\"\na_stable = false",
        );
    let runs = parse(&text).unwrap().runs(Path::new("runs")).unwrap();
    let got: Vec<(AForm, bool)> = runs
        .iter()
        .map(|r| (r.model.mamba1.a_form, r.model.mamba1.a_stable))
        .collect();
    assert_eq!(
        got,
        vec![
            (AForm::Diagonal, true),
            (AForm::Controllable, false),
            (AForm::Observable, false)
        ]
    );
    // The diagonal form has no free coefficients: located error.
    let text = SPEC.replace(
        "name = \"mamba1\"\npreset = \"dense\"",
        "name = \"mamba1\"\npreset = \"dense\"\na_stable = false",
    );
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "variants[0].a_stable");
    assert_eq!(e.line, line_of(&text, "a_stable"));
    assert!(e.message.contains("diagonal form"), "{e}");
    // The d_state limit applies to the free forms too.
    let text = SPEC.replace("d_state = 8", "d_state = 24").replace(
        "a_form = \"controllable\"",
        "a_form = \"controllable\"\na_stable = false",
    );
    let e = parse(&text).unwrap_err();
    assert_eq!(e.field, "model.d_state", "{e}");
    assert!(e.message.contains("<= 16"), "{e}");
}
