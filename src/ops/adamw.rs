//! One AdamW update of a CPU parameter (f32 or f64) in a single pass over w, g, m and v.
//! Composed from tensor ops the same update is about fourteen element-wise passes, each with a
//! freshly allocated result, and the MoZ model has 1.9x the dense model's parameters. The
//! arithmetic follows the composed form operation by operation (candle's `t * c` is
//! `t * T(c) + 0`, `t / c` is `t * T(1 / c)`), so both give the same values up to rounding.
use super::{for_float, with_host};
use candle_core::{Result, Tensor, WithDType};
use rayon::prelude::*;

/// Hyper-parameters of one update (bias corrections already computed).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of this parameter (0 when it is not decayed).
    pub weight_decay: f64,
    /// 1 - beta1^t and 1 - beta2^t.
    pub bc1: f64,
    pub bc2: f64,
    /// Multiplies the gradient (clipping).
    pub grad_scale: f64,
}

fn update<T: WithDType + num_traits::Float>(
    w: &[T],
    g: &[T],
    m: &[T],
    v: &[T],
    s: AdamStep,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let c = |x: f64| <T as WithDType>::from_f64(x);
    let (gs, b1, nb1, b2, nb2) = (
        c(s.grad_scale),
        c(s.beta1),
        c(1.0 - s.beta1),
        c(s.beta2),
        c(1.0 - s.beta2),
    );
    let (ibc1, ibc2, eps, lr) = (c(1.0 / s.bc1), c(1.0 / s.bc2), c(s.eps), c(s.lr));
    let decay = (s.weight_decay > 0.0).then(|| c(1.0 - s.lr * s.weight_decay));
    let scale = s.grad_scale != 1.0;
    let n = w.len();
    let (mut wo, mut mo, mut vo) = (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
    const BLOCK: usize = 4096;
    wo.par_chunks_mut(BLOCK)
        .zip(mo.par_chunks_mut(BLOCK))
        .zip(vo.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(bi, ((wb, mb), vb))| {
            let o = bi * BLOCK;
            for i in 0..wb.len() {
                let gi = if scale { g[o + i] * gs } else { g[o + i] };
                let mi = m[o + i] * b1 + gi * nb1;
                let vi = v[o + i] * b2 + (gi * gi) * nb2;
                let wi = match decay {
                    Some(d) => w[o + i] * d,
                    None => w[o + i],
                };
                let denom = (vi * ibc2).sqrt() + eps;
                wb[i] = wi - ((mi * ibc1) / denom) * lr;
                mb[i] = mi;
                vb[i] = vi;
            }
        });
    (wo, mo, vo)
}

/// (w', m', v') of one AdamW step, as new tensors of w's shape. CPU, f32 or f64, all four
/// tensors of one dtype.
pub fn adamw_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    for t in [g, m, v] {
        if t.shape() != w.shape() || t.dtype() != w.dtype() {
            candle_core::bail!(
                "adamw: {:?} {:?} does not match the weight {:?} {:?}",
                t.shape(),
                t.dtype(),
                w.shape(),
                w.dtype()
            );
        }
    }
    fn run<T: WithDType + num_traits::Float>(
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        s: AdamStep,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (wo, mo, vo) = with_host::<T, _>(w, |wv| {
            with_host::<T, _>(g, |gv| {
                with_host::<T, _>(m, |mv| {
                    with_host::<T, _>(v, |vv| Ok(update(wv, gv, mv, vv, s)))
                })
            })
        })?;
        let dev = w.device();
        Ok((
            Tensor::from_vec(wo, w.shape(), dev)?,
            Tensor::from_vec(mo, w.shape(), dev)?,
            Tensor::from_vec(vo, w.shape(), dev)?,
        ))
    }
    for_float!("adamw", w.dtype(), T => run::<T>(w, g, m, v, s))
}

/// Sum of squares of a CPU tensor's values (f32 or f64), accumulated in f64.
pub fn sum_sq(t: &Tensor) -> Result<f64> {
    fn run<T: WithDType + num_traits::Float>(t: &Tensor) -> Result<f64> {
        with_host::<T, _>(t, |v| {
            Ok(v.par_chunks(1 << 14)
                .map(|c| {
                    c.iter().fold(0f64, |a, &x| {
                        let x = WithDType::to_f64(x);
                        a + x * x
                    })
                })
                .sum())
        })
    }
    for_float!("sum-sq", t.dtype(), T => run::<T>(t))
}
