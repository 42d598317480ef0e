//! The chunked SSD scan against the sequential recurrence oracle.
use candle_core::{DType, Device, Tensor};
use moz_lab::model::ssd::{ssd_sequential, SsdScan};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_tensor(rng: &mut ChaCha8Rng, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn check(
    dtype: DType,
    bs: usize,
    len: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
    chunk: usize,
    tol: f64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64((len * 31 + h * 7 + g) as u64);
    let x = rand_tensor(&mut rng, &[bs, len, h, p], -1.0, 1.0, dtype);
    // dt spans slow and fast decay so chunk boundaries matter.
    let dt = rand_tensor(&mut rng, &[bs, len, h], 0.001, 0.5, dtype);
    let a = rand_tensor(&mut rng, &[h], -8.0, -0.5, dtype);
    let b = rand_tensor(&mut rng, &[bs, len, g, n], -1.0, 1.0, dtype);
    let c = rand_tensor(&mut rng, &[bs, len, g, n], -1.0, 1.0, dtype);
    let y = SsdScan { chunk_size: chunk }
        .forward(&x, &dt, &a, &b, &c)
        .unwrap();
    assert_eq!(y.dims(), &[bs, len, h, p]);
    let got: Vec<f64> = y
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = ssd_sequential(&x, &dt, &a, &b, &c).unwrap();
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    assert!(
        err <= tol * scale.max(1.0),
        "{dtype:?} len {len} g {g}: max abs err {err:e} (scale {scale:e})"
    );
}

#[test]
fn chunked_matches_sequential_f64() {
    for &len in &[1, 7, 16, 33, 64, 100] {
        check(DType::F64, 2, len, 4, 8, 1, 6, 16, 1e-10);
    }
}

#[test]
fn chunked_matches_sequential_f64_ngroups() {
    for &len in &[5, 40, 96] {
        check(DType::F64, 1, len, 4, 4, 2, 5, 16, 1e-10);
        check(DType::F64, 2, len, 6, 3, 3, 4, 32, 1e-10);
    }
}

#[test]
fn chunked_matches_sequential_f32() {
    for &len in &[3, 50, 128, 200] {
        check(DType::F32, 2, len, 4, 8, 2, 8, 64, 2e-4);
    }
}

#[test]
fn single_chunk_and_chunk_larger_than_sequence() {
    check(DType::F64, 1, 10, 2, 4, 1, 3, 64, 1e-10);
    check(DType::F64, 1, 1, 2, 4, 1, 3, 1, 1e-10);
}
