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
    /// S-Mamba SC: companion matrix, n coefficients (trained as n roots, or freely).
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

// ------------- free coefficients (a_stable = false): complex roots, real block basis -------------
//
// The trained parameters are the coefficients a_0..a_{n-1} of p(s) = s^n + a_{n-1} s^{n-1} +
// ... + a_0. Their roots are real or come in complex-conjugate pairs mu, conj(mu). For a pair,
// the complex eigenvector v = p + i q of the companion matrix gives the real invariant plane
// A_c [p q] = [p q] J with J = [[alpha, beta], [-beta, alpha]] (mu = alpha + i beta), so with
// T = [p_0 q_0 p_1 q_1 ... | real eigenvectors] the companion matrix is A_c = T J T^-1, J
// block diagonal (2 x 2 rotation-scalings, then the real roots), and
//   exp(dt J) on a pair = e^{dt alpha} [[cos dt beta, sin dt beta], [-sin dt beta, cos dt beta]].
// This is the complex-diagonal scan g_t = exp(dt mu) g_{t-1} + dt B'_t x_t, y_t = 2 Re(C'_t g_t)
// over one root of each pair, written in real arithmetic (Re g, -Im g after a factor 2): no
// complex state, n real slots per channel like the stable form. Rows of T^-1 come from the
// complex V^-1: pair k's rows are 2 Re w_k and -2 Im w_k (w_k the Lagrange row of mu_k).
//   SC: P_in = T^-1, P_out = T^T, signed beta per slot (+beta, -beta)
//   SO: P_in = T^T,  P_out = T^-1, and J^T: (-beta, +beta)
// Slot j's partner in the rotation is j ^ 1 (itself for an odd n's last slot, a real root).

/// A complex number (host-side root finding and eigenbasis in f64).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct C64 {
    pub re: f64,
    pub im: f64,
}

impl C64 {
    pub const ZERO: C64 = C64 { re: 0.0, im: 0.0 };
    pub const ONE: C64 = C64 { re: 1.0, im: 0.0 };
    pub fn new(re: f64, im: f64) -> C64 {
        C64 { re, im }
    }
    pub fn real(re: f64) -> C64 {
        C64 { re, im: 0.0 }
    }
    pub fn conj(self) -> C64 {
        C64::new(self.re, -self.im)
    }
    pub fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }
    pub fn norm_sqr(self) -> f64 {
        self.re * self.re + self.im * self.im
    }
    pub fn scale(self, s: f64) -> C64 {
        C64::new(self.re * s, self.im * s)
    }
    pub fn inv(self) -> C64 {
        let d = self.norm_sqr();
        C64::new(self.re / d, -self.im / d)
    }
    pub fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }
}

impl std::ops::Add for C64 {
    type Output = C64;
    fn add(self, o: C64) -> C64 {
        C64::new(self.re + o.re, self.im + o.im)
    }
}
impl std::ops::Sub for C64 {
    type Output = C64;
    fn sub(self, o: C64) -> C64 {
        C64::new(self.re - o.re, self.im - o.im)
    }
}
impl std::ops::Mul for C64 {
    type Output = C64;
    fn mul(self, o: C64) -> C64 {
        C64::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
}
impl std::ops::Div for C64 {
    type Output = C64;
    #[allow(clippy::suspicious_arithmetic_impl)]
    fn div(self, o: C64) -> C64 {
        self * o.inv()
    }
}
impl std::ops::AddAssign for C64 {
    fn add_assign(&mut self, o: C64) {
        *self = *self + o;
    }
}
impl std::ops::SubAssign for C64 {
    fn sub_assign(&mut self, o: C64) {
        *self = *self - o;
    }
}

/// Coefficients a_0..a_{n-1} (ascending) of prod_i (s - r_i) = s^n + sum_k a_k s^k.
pub fn coefficients_from_roots(roots: &[f64]) -> Vec<f64> {
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

/// (p(z), p'(z)) of the monic p with ascending coefficients a, by Horner.
fn eval_monic(a: &[f64], z: C64) -> (C64, C64) {
    let (mut p, mut dp) = (C64::ONE, C64::ZERO);
    for &ak in a.iter().rev() {
        dp = dp * z + p;
        p = p * z + C64::real(ak);
    }
    (p, dp)
}

/// One Newton step z - p(z)/p'(z) (z unchanged where p' vanishes).
fn newton(a: &[f64], z: C64) -> C64 {
    let (p, dp) = eval_monic(a, z);
    if dp.norm_sqr() > 0.0 {
        z - p / dp
    } else {
        z
    }
}

/// Up to two Newton steps, each kept only if it lowers |p| (near a double root p' ~ 0 and a
/// step could jump to another root); `real` keeps z on the real axis.
fn polish(a: &[f64], mut z: C64, real: bool) -> C64 {
    for _ in 0..2 {
        let mut next = newton(a, z);
        if real {
            next.im = 0.0;
        }
        if next.is_finite() && eval_monic(a, next).0.abs() < eval_monic(a, z).0.abs() {
            z = next;
        } else {
            break;
        }
    }
    z
}

/// The n complex roots of s^n + a_{n-1} s^{n-1} + ... + a_0 by the Aberth-Ehrlich iteration
/// (simultaneous, cubically convergent for simple roots), then up to two Newton steps each.
pub fn polynomial_roots(a: &[f64]) -> std::result::Result<Vec<C64>, String> {
    let n = a.len();
    if let Some(k) = a.iter().position(|v| !v.is_finite()) {
        return Err(format!("coefficient a_{k} = {} is not finite", a[k]));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    // Start on a circle of radius |a_0|^(1/n) (the geometric mean of the roots' moduli), at
    // angles off the real axis so that no start is a conjugate of another.
    let r0 = a[0].abs().powf(1.0 / n as f64);
    let radius = if r0.is_normal() { r0 } else { 1.0 };
    let mut z: Vec<C64> = (0..n)
        .map(|k| {
            let t = std::f64::consts::TAU * k as f64 / n as f64 + 0.4;
            C64::new(radius * t.cos(), radius * t.sin())
        })
        .collect();
    for _ in 0..500 {
        let mut moved = 0.0f64;
        for k in 0..n {
            let (p, dp) = eval_monic(a, z[k]);
            if p == C64::ZERO {
                continue;
            }
            let ratio = if dp.norm_sqr() > 0.0 {
                p / dp
            } else {
                C64::new(1e-8 * (1.0 + z[k].abs()), 0.0)
            };
            let mut s = C64::ZERO;
            for j in 0..n {
                if j != k {
                    s += (z[k] - z[j]).inv();
                }
            }
            let w = ratio / (C64::ONE - ratio * s);
            if w.is_finite() {
                z[k] -= w;
                moved = moved.max(w.abs() / (1.0 + z[k].abs()));
            }
        }
        if moved < 1e-15 {
            break;
        }
    }
    for zk in z.iter_mut() {
        *zk = polish(a, *zk, false);
    }
    if let Some(k) = z.iter().position(|v| !v.is_finite()) {
        return Err(format!("root finding gave a non-finite root {k}"));
    }
    Ok(z)
}

/// The roots of a real monic polynomial as the free-coefficient scan uses them: one root of each
/// complex-conjugate pair (Im > 0, sorted by real part) and the real roots (ascending).
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub pairs: Vec<C64>,
    pub reals: Vec<f64>,
}

impl Spectrum {
    /// Roots with |Im| <= 1e-10 (1 + |z|) count as real (re-polished on the axis), the smallest
    /// |Im| first until the rest can pair up; the others are matched into conjugate pairs. A
    /// near-double real root may come out as a pair with a tiny imaginary part: as exact for p
    /// (the coefficients it reproduces differ by Im^2), and its condition says how usable it is.
    /// Fails unless the roots found reproduce the coefficients.
    pub fn of(a: &[f64]) -> std::result::Result<Spectrum, String> {
        let n = a.len();
        let mut z = polynomial_roots(a)?;
        let offness = |v: &C64| v.im.abs() / (1.0 + v.abs());
        z.sort_by(|p, q| offness(p).total_cmp(&offness(q)));
        let mut n_real = z.iter().filter(|v| offness(v) <= 1e-10).count();
        if (n - n_real) % 2 == 1 {
            n_real += 1; // complex roots come in pairs
        }
        let mut reals: Vec<f64> = z[..n_real]
            .iter()
            .map(|v| polish(a, C64::real(v.re), true).re)
            .collect();
        let upper: Vec<C64> = z[n_real..].iter().copied().filter(|v| v.im > 0.0).collect();
        let mut lower: Vec<C64> = z[n_real..]
            .iter()
            .copied()
            .filter(|v| v.im <= 0.0)
            .collect();
        if upper.len() != lower.len() {
            return Err(format!(
                "roots {z:?} do not come in conjugate pairs (coefficients {a:?})"
            ));
        }
        let mut pairs = Vec::with_capacity(upper.len());
        for u in upper {
            let (best, _) = lower
                .iter()
                .enumerate()
                .map(|(i, l)| (i, (u - l.conj()).abs()))
                .fold((0, f64::INFINITY), |b, c| if c.1 < b.1 { c } else { b });
            let l = lower.swap_remove(best);
            pairs.push(polish(a, (u + l.conj()).scale(0.5), false));
        }
        pairs.sort_by(|p, q| p.re.total_cmp(&q.re).then(p.im.total_cmp(&q.im)));
        reals.sort_by(f64::total_cmp);
        let sp = Spectrum { pairs, reals };
        sp.check_reproduces(a)?;
        Ok(sp)
    }

    /// The coefficients of prod (s - lambda) over the slot roots must match a, to 1e-8 of
    /// the scale prod (s + |lambda|) gives each coefficient (rounding in the expansion).
    fn check_reproduces(&self, a: &[f64]) -> std::result::Result<(), String> {
        let lam = self.slot_roots();
        let mut p = vec![C64::ONE];
        let mut scale = vec![1.0];
        for &l in &lam {
            let mut q = vec![C64::ZERO; p.len() + 1];
            let mut qs = vec![0.0; p.len() + 1];
            for k in 0..p.len() {
                q[k + 1] += p[k];
                q[k] -= l * p[k];
                qs[k + 1] += scale[k];
                qs[k] += l.abs() * scale[k];
            }
            p = q;
            scale = qs;
        }
        for k in 0..a.len() {
            let err = (p[k].re - a[k]).abs().max(p[k].im.abs());
            if err.is_nan() || err > 1e-8 * scale[k] {
                return Err(format!(
                    "root finding failed, as it does for (nearly) repeated roots: the roots \
                     {lam:?} give a_{k} = {:?}, not {} (coefficients {a:?})",
                    p[k], a[k]
                ));
            }
        }
        Ok(())
    }

    /// All n roots in slot order: pair k's root at 2k and its conjugate at 2k + 1, then the
    /// real roots.
    pub fn slot_roots(&self) -> Vec<C64> {
        let mut v = Vec::with_capacity(2 * self.pairs.len() + self.reals.len());
        for &p in &self.pairs {
            v.push(p);
            v.push(p.conj());
        }
        v.extend(self.reals.iter().map(|&r| C64::real(r)));
        v
    }
}

/// Complex V (row-major), V_ij = lambda_j^i.
fn vandermonde_c(lam: &[C64]) -> Vec<C64> {
    let n = lam.len();
    let mut v = vec![C64::ZERO; n * n];
    for (j, &l) in lam.iter().enumerate() {
        let mut p = C64::ONE;
        for i in 0..n {
            v[i * n + j] = p;
            p = p * l;
        }
    }
    v
}

/// Complex V^-1 by Lagrange polynomials (as `vandermonde_inverse`).
fn vandermonde_inverse_c(lam: &[C64]) -> Vec<C64> {
    let n = lam.len();
    let mut w = vec![C64::ZERO; n * n];
    for j in 0..n {
        let mut poly = vec![C64::ZERO; n];
        poly[0] = C64::ONE;
        let mut deg = 0;
        let mut den = C64::ONE;
        for (m, &lm) in lam.iter().enumerate() {
            if m == j {
                continue;
            }
            deg += 1;
            for k in (0..=deg).rev() {
                let lower = if k > 0 { poly[k - 1] } else { C64::ZERO };
                poly[k] = lower - lm * poly[k];
            }
            den = den * (lam[j] - lm);
        }
        let inv = den.inv();
        for i in 0..n {
            w[j * n + i] = poly[i] * inv;
        }
    }
    w
}

/// The real block basis T and T^-1 (row-major) from the complex V, V^-1 of the slot roots.
fn real_block_basis(v: &[C64], w: &[C64], pairs: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut t = vec![0.0; n * n];
    let mut ti = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..pairs {
            t[i * n + 2 * k] = v[i * n + 2 * k].re;
            t[i * n + 2 * k + 1] = v[i * n + 2 * k].im;
            ti[2 * k * n + i] = 2.0 * w[2 * k * n + i].re;
            ti[(2 * k + 1) * n + i] = -2.0 * w[2 * k * n + i].im;
        }
        for j in 2 * pairs..n {
            t[i * n + j] = v[i * n + j].re;
            ti[j * n + i] = w[j * n + i].re;
        }
    }
    (t, ti)
}

/// The slots of each scale group: a pair's two slots share one scale (keeps J's blocks).
fn slot_groups(pairs: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    (0..pairs)
        .map(|k| 2 * k..2 * k + 2)
        .chain((2 * pairs..n).map(|j| j..j + 1))
        .collect()
}

/// Balancing scale per slot: sqrt(|X rows| / |Y rows|) over its group.
fn group_scales(x: &[f64], y: &[f64], pairs: usize, n: usize) -> Vec<f64> {
    let mut s = vec![1.0; n];
    for g in slot_groups(pairs, n) {
        let norm = |a: &[f64]| a[g.start * n..g.end * n].iter().map(|v| v * v).sum::<f64>();
        let v = (norm(x).sqrt() / norm(y).sqrt()).sqrt();
        for j in g {
            s[j] = v;
        }
    }
    s
}

/// sum_j |V e_j| |e_j^T V^-1| over complex eigenvectors (`eigen_condition` for any roots).
fn condition_c(v: &[C64], w: &[C64], n: usize) -> f64 {
    (0..n)
        .map(|j| {
            let col = (0..n).map(|i| v[i * n + j].norm_sqr()).sum::<f64>().sqrt();
            let row = (0..n).map(|i| w[j * n + i].norm_sqr()).sum::<f64>().sqrt();
            col * row
        })
        .sum()
}

/// One channel's free-coefficient scan data.
#[derive(Debug, Clone)]
pub struct FreeBasis {
    pub spectrum: Spectrum,
    /// Per slot: the real part of its root and its signed imaginary part (the rotation rate).
    pub alpha: Vec<f64>,
    pub beta: Vec<f64>,
    /// B' = P_in B, C' = P_out C (row-major n x n, balanced).
    pub p_in: Vec<f64>,
    pub p_out: Vec<f64>,
    /// sum_j |V e_j| |e_j^T V^-1| of the complex eigenbasis.
    pub kappa: f64,
}

/// Everything the basis and its gradient are built from.
struct FreeParts {
    spectrum: Spectrum,
    lam: Vec<C64>,
    w: Vec<C64>,
    x: Vec<f64>,
    y: Vec<f64>,
    scales: Vec<f64>,
    kappa: f64,
}

fn free_parts(a: &[f64], form: AForm) -> std::result::Result<FreeParts, String> {
    if form == AForm::Diagonal {
        return Err("the diagonal form has no free coefficients".into());
    }
    let n = a.len();
    let spectrum = Spectrum::of(a)?;
    let lam = spectrum.slot_roots();
    let (v, w) = (vandermonde_c(&lam), vandermonde_inverse_c(&lam));
    let kappa = condition_c(&v, &w, n);
    let pairs = spectrum.pairs.len();
    let (t, ti) = real_block_basis(&v, &w, pairs, n);
    let (x, y) = match form {
        AForm::Controllable => (ti, transpose(&t, n)),
        _ => (transpose(&t, n), ti),
    };
    let scales = group_scales(&x, &y, pairs, n);
    Ok(FreeParts {
        spectrum,
        lam,
        w,
        x,
        y,
        scales,
        kappa,
    })
}

/// The free-coefficient basis of one channel with coefficients a (ascending, monic implied).
pub fn free_basis(a: &[f64], form: AForm) -> std::result::Result<FreeBasis, String> {
    let n = a.len();
    let f = free_parts(a, form)?;
    let sign = if form == AForm::Controllable {
        1.0
    } else {
        -1.0
    };
    let (mut alpha, mut beta) = (vec![0.0; n], vec![0.0; n]);
    for (k, mu) in f.spectrum.pairs.iter().enumerate() {
        alpha[2 * k] = mu.re;
        alpha[2 * k + 1] = mu.re;
        beta[2 * k] = sign * mu.im;
        beta[2 * k + 1] = -sign * mu.im;
    }
    let np = f.spectrum.pairs.len();
    alpha[2 * np..].copy_from_slice(&f.spectrum.reals);
    let (mut p_in, mut p_out) = (f.x, f.y);
    for j in 0..n {
        for i in 0..n {
            p_in[j * n + i] /= f.scales[j];
            p_out[j * n + i] *= f.scales[j];
        }
    }
    Ok(FreeBasis {
        spectrum: f.spectrum,
        alpha,
        beta,
        p_in,
        p_out,
        kappa: f.kappa,
    })
}

/// d loss / d a of one channel, given the loss' gradients w.r.t. its (alpha, beta, P_in,
/// P_out), with the balancing scales held fixed (y does not depend on them): through the
/// real-block extraction, W = V^-1 (G_V -= W^H G_W W^H), V_ij = lambda_j^i and the roots'
/// implicit derivative d lambda / d a_k = -lambda^k / p'(lambda). Complex gradients are
/// d/d Re + i d/d Im; a holomorphic step z = f(u) maps them by G_u = conj(f'(u)) G_z.
fn free_basis_grad(
    a: &[f64],
    form: AForm,
    g_alpha: &[f64],
    g_beta: &[f64],
    g_pin: &[f64],
    g_pout: &[f64],
) -> std::result::Result<Vec<f64>, String> {
    let n = a.len();
    let f = free_parts(a, form)?;
    let np = f.spectrum.pairs.len();
    let mut gx = g_pin.to_vec();
    let mut gy = g_pout.to_vec();
    for j in 0..n {
        for i in 0..n {
            gx[j * n + i] /= f.scales[j];
            gy[j * n + i] *= f.scales[j];
        }
    }
    let (g_t, g_ti) = match form {
        AForm::Controllable => (transpose(&gy, n), gx),
        _ => (transpose(&gx, n), gy),
    };
    let mut g_v = vec![C64::ZERO; n * n];
    let mut g_w = vec![C64::ZERO; n * n];
    for i in 0..n {
        for k in 0..np {
            g_v[i * n + 2 * k] = C64::new(g_t[i * n + 2 * k], g_t[i * n + 2 * k + 1]);
            g_w[2 * k * n + i] =
                C64::new(2.0 * g_ti[2 * k * n + i], -2.0 * g_ti[(2 * k + 1) * n + i]);
        }
        for j in 2 * np..n {
            g_v[i * n + j] = C64::real(g_t[i * n + j]);
            g_w[j * n + i] = C64::real(g_ti[j * n + i]);
        }
    }
    // G_V -= W^H G_W W^H.
    let wh: Vec<C64> = (0..n * n)
        .map(|idx| f.w[(idx % n) * n + idx / n].conj())
        .collect();
    let cmul = |p: &[C64], q: &[C64]| {
        let mut r = vec![C64::ZERO; n * n];
        for i in 0..n {
            for k in 0..n {
                let pik = p[i * n + k];
                for j in 0..n {
                    r[i * n + j] += pik * q[k * n + j];
                }
            }
        }
        r
    };
    let from_w = cmul(&cmul(&wh, &g_w), &wh);
    for (gv, fw) in g_v.iter_mut().zip(&from_w) {
        *gv -= *fw;
    }
    let lam = &f.lam;
    let mut g_lam = vec![C64::ZERO; n];
    for j in 0..n {
        let mut pow = C64::ONE; // lambda_j^{i-1}
        for i in 1..n {
            g_lam[j] += (pow.scale(i as f64)).conj() * g_v[i * n + j];
            pow = pow * lam[j];
        }
    }
    let sign = if form == AForm::Controllable {
        1.0
    } else {
        -1.0
    };
    for k in 0..np {
        g_lam[2 * k] += C64::new(
            g_alpha[2 * k] + g_alpha[2 * k + 1],
            sign * (g_beta[2 * k] - g_beta[2 * k + 1]),
        );
    }
    for j in 2 * np..n {
        g_lam[j] += C64::real(g_alpha[j]);
    }
    let mut g_a = vec![0.0; n];
    for m in 0..n {
        let mut dp = C64::ONE; // p'(lambda_m) = prod_{j != m} (lambda_m - lambda_j)
        for j in 0..n {
            if j != m {
                dp = dp * (lam[m] - lam[j]);
            }
        }
        let inv = dp.inv();
        let mut pow = C64::ONE; // lambda_m^k
        for ga in g_a.iter_mut() {
            let c = C64::ZERO - pow * inv;
            *ga += (c.conj() * g_lam[m]).re;
            pow = pow * lam[m];
        }
    }
    Ok(g_a)
}

/// Rows per channel of the `free_canonical_basis` output: alpha, beta, P_in (n), P_out (n).
pub fn free_basis_rows(n: usize) -> usize {
    2 + 2 * n
}

/// coefficients (d_inner, n) -> (d_inner, 2 + 2n, n): [alpha; beta; P_in; P_out] per channel.
struct FreeCanonicalBasis {
    form: AForm,
    /// Largest eigenbasis condition accepted.
    max_kappa: f64,
}

impl FreeCanonicalBasis {
    fn channel(&self, a: &[f64], c: usize) -> Result<FreeBasis> {
        let b = free_basis(a, self.form)
            .map_err(|e| candle_core::Error::Msg(format!("channel {c}: {e}")))?;
        if b.kappa.is_nan() || b.kappa > self.max_kappa {
            candle_core::bail!(
                "channel {c}: the companion matrix of the free coefficients {a:?} has (nearly) \
                 repeated roots {:?} + real {:?}: its eigenbasis condition {:.3e} exceeds \
                 {:.3e}, so the eigenbasis scan would return garbage (README \"S-Mamba\")",
                b.spectrum.pairs,
                b.spectrum.reals,
                b.kappa,
                self.max_kappa
            );
        }
        Ok(b)
    }
}

impl CustomOp1 for FreeCanonicalBasis {
    fn name(&self) -> &'static str {
        "free-canonical-basis"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (di, n) = l.shape().dims2()?;
        for_float!(self.name(), s.dtype(), T => {
            let a: &[T] = host_slice(s, l)?;
            let mut out = Vec::with_capacity(di * free_basis_rows(n) * n);
            for c in 0..di {
                let ac: Vec<f64> = a[c * n..(c + 1) * n].iter().map(|v| v.to_f64()).collect();
                let b = self.channel(&ac, c)?;
                out.extend(
                    b.alpha.iter().chain(&b.beta).chain(&b.p_in).chain(&b.p_out)
                        .map(|&v| T::from_f64(v)),
                );
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((di, free_basis_rows(n), n))))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (di, n) = arg.dims2()?;
        let a: Vec<f64> = arg
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let g: Vec<f64> = grad
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let per = free_basis_rows(n) * n;
        let mut ga = Vec::with_capacity(di * n);
        for c in 0..di {
            let gc = &g[c * per..(c + 1) * per];
            let (g_alpha, rest) = gc.split_at(n);
            let (g_beta, rest) = rest.split_at(n);
            let (g_pin, g_pout) = rest.split_at(n * n);
            let d = free_basis_grad(
                &a[c * n..(c + 1) * n],
                self.form,
                g_alpha,
                g_beta,
                g_pin,
                g_pout,
            )
            .map_err(|e| candle_core::Error::Msg(format!("channel {c}: {e}")))?;
            ga.extend(d);
        }
        Ok(Some(
            Tensor::from_vec(ga, (di, n), &candle_core::Device::Cpu)?
                .to_dtype(arg.dtype())?
                .to_device(arg.device())?,
        ))
    }
}

/// The largest eigenbasis condition a scan in `dtype` accepts: kappa * unit roundoff <= 0.1,
/// past which the scan's rounding error bound reaches 10% of the output. Half precisions use
/// f32's bound (their basis is built in f32; their scan is not guaranteed by it).
pub fn max_free_kappa(dtype: candle_core::DType) -> f64 {
    let u = match dtype {
        candle_core::DType::F64 => f64::EPSILON / 2.0,
        _ => f32::EPSILON as f64 / 2.0,
    };
    0.1 / u
}

/// [alpha; beta; P_in; P_out] (d_inner, 2 + 2n, n) of free coefficients `coef` (d_inner, n),
/// differentiable in coef. Fails, naming the channel, when the roots are (nearly) repeated
/// (eigenbasis condition above `max_free_kappa(coef.dtype())`) or root finding fails.
pub fn free_canonical_basis(coef: &Tensor, form: AForm) -> Result<Tensor> {
    if form == AForm::Diagonal {
        candle_core::bail!("free_canonical_basis: the diagonal form has no free coefficients");
    }
    let (dev, dtype) = (coef.device().clone(), coef.dtype());
    let host_dtype = match dtype {
        candle_core::DType::BF16 | candle_core::DType::F16 => candle_core::DType::F32,
        d => d,
    };
    let host = coef
        .to_dtype(host_dtype)?
        .to_device(&candle_core::Device::Cpu)?
        .contiguous()?;
    host.apply_op1(FreeCanonicalBasis {
        form,
        max_kappa: max_free_kappa(dtype),
    })?
    .to_device(&dev)?
    .to_dtype(dtype)
}
