//! S-Mamba's state matrices in canonical form and the exact eigenbasis their scan runs in.
//!
//! Per channel, A is n x n: diagonal (Mamba-1), controllable canonical (companion, SC) or
//! observable canonical (its transpose, SO). The companion matrix of
//! p(s) = s^n + a_{n-1} s^{n-1} + ... + a_0 (ones on the superdiagonal, last row -a_0..-a_{n-1})
//! has eigenvector (1, lambda, ..., lambda^{n-1}) for each root lambda of p, so with distinct
//! roots A_c = V diag(lambda) V^-1, V_ij = lambda_j^i (Vandermonde), and A_o = A_c^T =
//! V^-T diag(lambda) V^T. The stable parameterisation takes real roots lambda = -exp(theta)
//! (distinct almost surely); the coefficients a_k are the signed elementary symmetric
//! polynomials of the roots and never need to be formed. In the eigenbasis g the ZOH/Euler
//! recurrence h_t = expm(dt A) h_{t-1} + dt B_t x_t, y_t = C_t . h_t becomes a real diagonal
//! scan:
//!   SC: h = V g,     B' = V^-1 B,  C' = V^T C
//!   SO: h = V^-T g,  B' = V^T B,   C' = V^-1 C
//!   g_t = exp(dt lambda) * g_{t-1} + dt B'_t x_t,   y_t = C'_t . g_t.
//! Each eigenvector may be rescaled (g_j -> g_j / s_j): `basis` picks s_j so that row j of the
//! input map and row j of the output map have equal norms (keeps g at the scale of h).
//! y does not depend on s, so the backward pass treats s as a constant and the gradient of any
//! loss through y is exact. The rounding error of the eigenbasis scan grows with
//! sum_j |V e_j| |e_j^T V^-1| (the eigenvalue condition numbers of the companion matrix), which
//! for real roots grows exponentially in n; see README "S-Mamba" for the safe n.
use crate::ops::{for_float, host_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use serde::{Deserialize, Serialize};

/// The form of each channel's state matrix A.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AForm {
    /// Mamba-1: A diagonal, A = -exp(A_log).
    #[default]
    Diagonal,
    /// S-Mamba SC: companion matrix, n free coefficients (here: from n roots).
    Controllable,
    /// S-Mamba SO: transpose of the companion matrix.
    Observable,
}

impl AForm {
    pub const ALL: [AForm; 3] = [AForm::Diagonal, AForm::Controllable, AForm::Observable];
    pub fn name(self) -> &'static str {
        match self {
            AForm::Diagonal => "diagonal",
            AForm::Controllable => "controllable",
            AForm::Observable => "observable",
        }
    }
    pub fn parse(s: &str) -> Option<AForm> {
        AForm::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// V (n x n, row-major), V_ij = lambda_j^i.
pub fn vandermonde(lam: &[f64]) -> Vec<f64> {
    let n = lam.len();
    let mut v = vec![0.0; n * n];
    for (j, &l) in lam.iter().enumerate() {
        let mut p = 1.0;
        for i in 0..n {
            v[i * n + j] = p;
            p *= l;
        }
    }
    v
}

/// V^-1 (row-major): row j holds the coefficients (s^0 .. s^{n-1}) of the Lagrange polynomial
/// L_j(s) = prod_{m != j} (s - lambda_m) / (lambda_j - lambda_m), since sum_i W_ji lambda_k^i =
/// L_j(lambda_k) = delta_jk. More accurate than elimination on V.
pub fn vandermonde_inverse(lam: &[f64]) -> Vec<f64> {
    let n = lam.len();
    let mut w = vec![0.0; n * n];
    for j in 0..n {
        let mut poly = vec![0.0; n];
        poly[0] = 1.0;
        let mut deg = 0;
        let mut den = 1.0;
        for (m, &lm) in lam.iter().enumerate() {
            if m == j {
                continue;
            }
            // poly *= (s - lm)
            deg += 1;
            for k in (0..=deg).rev() {
                let lower = if k > 0 { poly[k - 1] } else { 0.0 };
                poly[k] = lower - lm * poly[k];
            }
            den *= lam[j] - lm;
        }
        for i in 0..n {
            w[j * n + i] = poly[i] / den;
        }
    }
    w
}

fn transpose(a: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = a[i * n + j];
        }
    }
    t
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                c[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    c
}

/// The unscaled (X, Y) of a canonical form: B' = X B, C' = Y C (row-major n x n).
fn unscaled(lam: &[f64], form: AForm) -> (Vec<f64>, Vec<f64>) {
    let n = lam.len();
    let vt = transpose(&vandermonde(lam), n);
    let w = vandermonde_inverse(lam);
    match form {
        AForm::Controllable => (w, vt),
        AForm::Observable => (vt, w),
        AForm::Diagonal => unreachable!("the diagonal form needs no basis"),
    }
}

fn row_norm(a: &[f64], n: usize, j: usize) -> f64 {
    a[j * n..(j + 1) * n]
        .iter()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
}

/// The balancing scale s_j = sqrt(|X_j| / |Y_j|) of each eigenvector.
fn scales(x: &[f64], y: &[f64], n: usize) -> Vec<f64> {
    (0..n)
        .map(|j| (row_norm(x, n, j) / row_norm(y, n, j)).sqrt())
        .collect()
}

/// (P_in, P_out) of one channel: B' = P_in B, C' = P_out C, rows balanced.
pub fn basis(lam: &[f64], form: AForm) -> (Vec<f64>, Vec<f64>) {
    let n = lam.len();
    let (mut x, mut y) = unscaled(lam, form);
    let s = scales(&x, &y, n);
    for j in 0..n {
        for i in 0..n {
            x[j * n + i] /= s[j];
            y[j * n + i] *= s[j];
        }
    }
    (x, y)
}

/// sum_j |V e_j| |e_j^T V^-1|: how much the eigenbasis scan can amplify rounding errors.
pub fn eigen_condition(lam: &[f64]) -> f64 {
    let n = lam.len();
    let (x, y) = unscaled(lam, AForm::Controllable);
    (0..n)
        .map(|j| row_norm(&x, n, j) * row_norm(&y, n, j))
        .sum()
}

/// lambda (d_inner, n) -> (d_inner, 2, n, n): [P_in, P_out] per channel, computed in f64.
struct CanonicalBasis {
    form: AForm,
}

impl CustomOp1 for CanonicalBasis {
    fn name(&self) -> &'static str {
        "canonical-basis"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (di, n) = l.shape().dims2()?;
        for_float!(self.name(), s.dtype(), T => {
            let lam: &[T] = host_slice(s, l)?;
            let mut out = Vec::with_capacity(di * 2 * n * n);
            for c in 0..di {
                let lc: Vec<f64> = lam[c * n..(c + 1) * n].iter().map(|v| v.to_f64()).collect();
                let (p_in, p_out) = basis(&lc, self.form);
                out.extend(p_in.iter().chain(&p_out).map(|&v| T::from_f64(v)));
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((di, 2, n, n))))
        })
    }

    /// With s fixed: dX = S^-1 G_in, dY = S G_out; W = V^-1 contributes -W^T dW W^T to dV;
    /// dlambda_j = sum_i dV_ij i lambda_j^{i-1}.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (di, n) = arg.dims2()?;
        let lam: Vec<f64> = arg
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let g: Vec<f64> = grad
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let nn = n * n;
        let mut dlam = vec![0.0; di * n];
        for c in 0..di {
            let lc = &lam[c * n..(c + 1) * n];
            let (x, y) = unscaled(lc, self.form);
            let s = scales(&x, &y, n);
            let mut dx = g[c * 2 * nn..c * 2 * nn + nn].to_vec();
            let mut dy = g[c * 2 * nn + nn..(c + 1) * 2 * nn].to_vec();
            for j in 0..n {
                for i in 0..n {
                    dx[j * n + i] /= s[j];
                    dy[j * n + i] *= s[j];
                }
            }
            // (gradient w.r.t. V^T, gradient w.r.t. W = V^-1)
            let (d_vt, d_w, w) = match self.form {
                AForm::Controllable => (dy, dx, x),
                AForm::Observable => (dx, dy, y),
                AForm::Diagonal => unreachable!(),
            };
            let wt = transpose(&w, n);
            let from_w = matmul(&matmul(&wt, &d_w, n), &wt, n);
            for j in 0..n {
                let mut acc = 0.0;
                let mut pow = 1.0; // lambda_j^{i-1}
                for i in 1..n {
                    let dv = d_vt[j * n + i] - from_w[i * n + j];
                    acc += dv * i as f64 * pow;
                    pow *= lc[j];
                }
                dlam[c * n + j] = acc;
            }
        }
        Ok(Some(
            Tensor::from_vec(dlam, (di, n), &candle_core::Device::Cpu)?
                .to_dtype(arg.dtype())?
                .to_device(arg.device())?,
        ))
    }
}

/// [P_in, P_out] (d_inner, 2, n, n) for roots `lam` (d_inner, n), differentiable in lam.
/// Computed on the host in f64 (n is small); other devices copy lam there and back.
pub fn canonical_basis(lam: &Tensor, form: AForm) -> Result<Tensor> {
    if form == AForm::Diagonal {
        candle_core::bail!("canonical_basis: the diagonal form has no basis change");
    }
    let (dev, dtype) = (lam.device().clone(), lam.dtype());
    // Half-precision roots (bf16 training) go through f32: the host op reads f32 and f64.
    let host_dtype = match dtype {
        candle_core::DType::BF16 | candle_core::DType::F16 => candle_core::DType::F32,
        d => d,
    };
    let host = lam
        .to_dtype(host_dtype)?
        .to_device(&candle_core::Device::Cpu)?
        .contiguous()?;
    host.apply_op1(CanonicalBasis { form })?
        .to_device(&dev)?
        .to_dtype(dtype)
}
