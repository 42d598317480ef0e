//! The Mamba-1 mixer (mamba_ssm's `Mamba`, layer letter `S`) whose state matrix A is diagonal
//! (Mamba-1) or, as in S-Mamba, in controllable (SC) or observable (SO) canonical form.
//!
//! in_proj d_model -> (x, z) of d_inner each; depthwise causal conv + SiLU on x;
//! x_proj d_inner -> (dt_rank, B (n), C (n)); dt = softplus(dt_proj(dt_low) + bias);
//! y = scan(x, dt, A, B, C) + D x; y * silu(z); out_proj. No normalisation inside the mixer.
//! The canonical forms scan exactly in the eigenbasis of A (see `canonical`).
use super::canonical::{
    canonical_basis, coefficients_from_roots, free_basis_rows, free_canonical_basis, AForm,
};
use super::config::ModelConfig;
use super::layers::{linear, Linear};
use super::params::{Init, ParamStore};
use super::ssd::softplus;
use crate::ops::selective_scan::{selective_scan_fused, selective_scan_rot_fused, BcLayout};
use anyhow::Result;
use candle_core::{IndexOp, Module, Tensor, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Initial roots (eigenvalues) of A.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AInit {
    /// Mamba-1's S4D-real: lambda_i = -(i + 1), i = 0..n-1.
    S4dReal,
    /// lambda_i = -(0.1 * 100^(i / (n - 1))): geometric from -0.1 to -10; keeps the Vandermonde
    /// eigenbasis of the canonical forms far better conditioned than S4D-real.
    Geometric,
}

impl AInit {
    pub fn name(self) -> &'static str {
        match self {
            AInit::S4dReal => "s4d-real",
            AInit::Geometric => "geometric",
        }
    }
    pub fn parse(s: &str) -> Option<AInit> {
        [AInit::S4dReal, AInit::Geometric]
            .into_iter()
            .find(|i| i.name() == s)
    }
    /// The default for a form: S4D-real for Mamba-1, geometric for the canonical forms.
    pub fn default_for(form: AForm) -> AInit {
        match form {
            AForm::Diagonal => AInit::S4dReal,
            _ => AInit::Geometric,
        }
    }
    /// The n initial roots (all negative, distinct).
    pub fn roots(self, n: usize) -> Vec<f64> {
        match self {
            AInit::S4dReal => (1..=n).map(|i| -(i as f64)).collect(),
            AInit::Geometric if n == 1 => vec![-1.0],
            AInit::Geometric => (0..n)
                .map(|i| -(0.1 * 100f64.powf(i as f64 / (n - 1) as f64)))
                .collect(),
        }
    }
}

/// The `S` layers' settings (d_state, d_conv and expand are the model's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mamba1Config {
    pub a_form: AForm,
    /// Canonical forms: true = the n roots are trained as lambda = -exp(theta) (`A_root_log`,
    /// always stable); false = the n coefficients of the characteristic polynomial are trained
    /// freely (`A_coef`; roots real or complex pairs, nothing keeps them stable).
    pub a_stable: bool,
    pub a_init: AInit,
    /// 0 = ceil(d_model / 16), as mamba_ssm.
    pub dt_rank: usize,
}

impl Default for Mamba1Config {
    fn default() -> Self {
        Mamba1Config {
            a_form: AForm::Diagonal,
            a_stable: true,
            a_init: AInit::S4dReal,
            dt_rank: 0,
        }
    }
}

/// Canonical forms beyond this state size have eigenbases too ill-conditioned to scan in
/// (README "S-Mamba").
pub const MAX_CANONICAL_D_STATE: usize = 16;

impl Mamba1Config {
    pub fn dt_rank(&self, d_model: usize) -> usize {
        if self.dt_rank == 0 {
            d_model.div_ceil(16)
        } else {
            self.dt_rank
        }
    }
    /// Name of the (d_inner, n) state parameter: `A_log` (diagonal, A = -exp(A_log)),
    /// `A_root_log` (stable canonical forms, roots of A's characteristic polynomial
    /// -exp(A_root_log)) or `A_coef` (free canonical forms: its coefficients a_0..a_{n-1}).
    pub fn a_param_name(&self) -> &'static str {
        match (self.a_form, self.a_stable) {
            (AForm::Diagonal, _) => "A_log",
            (_, true) => "A_root_log",
            (_, false) => "A_coef",
        }
    }
    /// True for the free-coefficient canonical forms.
    pub fn free_coefficients(&self) -> bool {
        self.a_form != AForm::Diagonal && !self.a_stable
    }
    /// Checks the settings for a model of state size n; (field, message) on failure.
    pub fn check(&self, d_state: usize) -> Result<(), (&'static str, String)> {
        if !self.a_stable && self.a_form == AForm::Diagonal {
            return Err((
                "a_stable",
                "a_stable = false (free companion coefficients) applies to the controllable and \
                 observable forms; the diagonal form is always A = -exp(A_log)"
                    .into(),
            ));
        }
        if self.a_form != AForm::Diagonal && d_state > MAX_CANONICAL_D_STATE {
            return Err((
                "d_state",
                format!(
                    "the {} form needs d_state <= {MAX_CANONICAL_D_STATE} (its Vandermonde \
                     eigenbasis is too ill-conditioned beyond), got {d_state}",
                    self.a_form.name()
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Mamba1Mixer {
    d_inner: usize,
    d_state: usize,
    dt_rank: usize,
    d_conv: usize,
    form: AForm,
    /// `a_param` holds free coefficients (`A_coef`) rather than log-roots.
    free: bool,
    /// e.g. `backbone.layers.3.mixer`, for errors.
    name: String,
    in_proj: Tensor,     // (2 d_inner, d_model): x rows, then z rows
    conv_weight: Tensor, // (d_inner, 1, d_conv)
    conv_bias: Tensor,
    x_proj: Tensor,    // (dt_rank + 2n, d_inner)
    dt_proj_w: Tensor, // (d_inner, dt_rank)
    dt_proj_b: Tensor,
    /// A_log or A_root_log, (d_inner, n).
    a_param: Tensor,
    d_skip: Tensor,
    out_proj: Linear,
}

impl Mamba1Mixer {
    /// `prefix` is e.g. `backbone.layers.3.mixer`.
    pub fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Mamba1Mixer> {
        let m = &cfg.mamba1;
        let (d, di, n, k) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.d_conv);
        let r = m.dt_rank(d);
        let in_proj = store.add(
            &format!("{prefix}.in_proj.weight"),
            &[2 * di, d],
            Init::Uniform(1.0 / (d as f64).sqrt()),
            true,
        )?;
        let cb = 1.0 / (k as f64).sqrt();
        let conv_weight = store.add(
            &format!("{prefix}.conv1d.weight"),
            &[di, 1, k],
            Init::Uniform(cb),
            true,
        )?;
        let conv_bias = store.add(
            &format!("{prefix}.conv1d.bias"),
            &[di],
            Init::Uniform(cb),
            false,
        )?;
        let x_proj = store.add(
            &format!("{prefix}.x_proj.weight"),
            &[r + 2 * n, di],
            Init::Uniform(1.0 / (di as f64).sqrt()),
            true,
        )?;
        // mamba_ssm: dt_proj.weight ~ U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform
        // in [1e-3, 0.1], floor 1e-4.
        let dt_proj_w = store.add(
            &format!("{prefix}.dt_proj.weight"),
            &[di, r],
            Init::Uniform((r as f64).powf(-0.5)),
            true,
        )?;
        let (dt_min, dt_max): (f64, f64) = (1e-3, 0.1);
        let dt_init: Vec<f64> = (0..di)
            .map(|_| {
                let u: f64 = store.rng().gen();
                let dt = (u * (dt_max.ln() - dt_min.ln()) + dt_min.ln())
                    .exp()
                    .max(1e-4);
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        let dt_proj_b = store.add(
            &format!("{prefix}.dt_proj.bias"),
            &[di],
            Init::Values(dt_init),
            false,
        )?;
        // theta = log(-lambda) for every channel, or the coefficients of prod (s - lambda_i):
        // both parameterisations start from the same roots, i.e. the same model.
        let roots = m.a_init.roots(n);
        let a_init: Vec<f64> = if m.free_coefficients() {
            coefficients_from_roots(&roots)
        } else {
            roots.iter().map(|l| (-l).ln()).collect()
        };
        let a_param = store.add(
            &format!("{prefix}.{}", m.a_param_name()),
            &[di, n],
            Init::Values(a_init.repeat(di)),
            false,
        )?;
        let d_skip = store.add(&format!("{prefix}.D"), &[di], Init::Const(1.0), false)?;
        let out_proj = Linear::new(
            store,
            &format!("{prefix}.out_proj.weight"),
            di,
            d,
            1.0 / (cfg.n_layer as f64).sqrt(),
        )?;
        Ok(Mamba1Mixer {
            d_inner: di,
            d_state: n,
            dt_rank: r,
            d_conv: k,
            form: m.a_form,
            free: m.free_coefficients(),
            name: prefix.to_string(),
            in_proj,
            conv_weight,
            conv_bias,
            x_proj,
            dt_proj_w,
            dt_proj_b,
            a_param,
            d_skip,
            out_proj,
        })
    }

    /// The roots lambda (d_inner, n) of each channel's A (its diagonal for the diagonal form).
    /// Free coefficients have complex roots: see `canonical::Spectrum`.
    pub fn roots(&self) -> candle_core::Result<Tensor> {
        if self.free {
            candle_core::bail!(
                "{}: free coefficients (A_coef) have complex roots; use canonical::Spectrum",
                self.name
            );
        }
        self.a_param.exp()?.neg()
    }

    /// The state parameter: A_log, A_root_log or A_coef (d_inner, n).
    pub fn a_param(&self) -> &Tensor {
        &self.a_param
    }

    /// Depthwise causal conv as d_conv shifted slices times the taps (grouped conv1d is slow).
    fn causal_conv(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, l, _) = x.dims3()?;
        let k = self.d_conv;
        let padded = x.pad_with_zeros(1, k - 1, 0)?;
        let w = self.conv_weight.squeeze(1)?;
        let mut acc = self.conv_bias.broadcast_as(x.shape())?.contiguous()?;
        for tap in 0..k {
            let wk = w.narrow(1, tap, 1)?.squeeze(1)?;
            acc = (acc + padded.narrow(1, tap, l)?.broadcast_mul(&wk)?)?;
        }
        Ok(acc)
    }

    /// The SSM part: x (conv output), x_dbl (x_proj output), dt -> y (b, l, d_inner), D skip
    /// included. Public for the scan tests.
    pub fn ssm(&self, x: &Tensor, x_dbl: &Tensor, dt: &Tensor) -> candle_core::Result<Tensor> {
        let (r, n) = (self.dt_rank, self.d_state);
        let fused = crate::ops::fused_cpu(x);
        if self.free {
            return self.free_ssm(x, x_dbl, dt, fused);
        }
        let lam = self.roots()?;
        match self.form {
            AForm::Diagonal => {
                if fused {
                    let layout = BcLayout::shared(r + 2 * n, r, n);
                    selective_scan_fused(x, dt, &lam, x_dbl, layout, &self.d_skip)
                } else {
                    let b = x_dbl.narrow(D::Minus1, r, n)?;
                    let c = x_dbl.narrow(D::Minus1, r + n, n)?;
                    selective_scan_composed(x, dt, &lam, &b, &c, &self.d_skip)
                }
            }
            form => {
                let (b, c) = eigenbasis_bc(&lam, form, x_dbl, r)?;
                if fused {
                    let bc = Tensor::cat(&[&b, &c], 3)?;
                    let layout = BcLayout::per_channel(self.d_inner, n);
                    selective_scan_fused(x, dt, &lam, &bc, layout, &self.d_skip)
                } else {
                    selective_scan_composed(x, dt, &lam, &b, &c, &self.d_skip)
                }
            }
        }
    }

    /// The free-coefficient scan: roots and real block eigenbasis from `A_coef` on the host,
    /// then the rotation-mode scan (complex-diagonal in real arithmetic).
    fn free_ssm(
        &self,
        x: &Tensor,
        x_dbl: &Tensor,
        dt: &Tensor,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let (r, n, di) = (self.dt_rank, self.d_state, self.d_inner);
        let basis = free_canonical_basis(&self.a_param, self.form)
            .map_err(|e| candle_core::Error::Msg(format!("{}.A_coef: {e}", self.name)))?;
        debug_assert_eq!(basis.dim(1)?, free_basis_rows(n));
        let a_re = basis.i((.., 0))?;
        let a_im = basis.i((.., 1))?;
        let p = basis.narrow(1, 2, 2 * n)?.reshape((di, 2, n, n))?;
        let (b, c) = basis_bc(&p, x_dbl, r)?;
        if fused {
            let bc = Tensor::cat(&[&b, &c], 3)?;
            let layout = BcLayout::per_channel(di, n);
            selective_scan_rot_fused(x, dt, &a_re, &a_im, &bc, layout, &self.d_skip)
        } else {
            selective_scan_rot_composed(x, dt, &a_re, &a_im, &b, &c, &self.d_skip)
        }
    }

    /// (x after conv + SiLU, z, x_dbl, dt) of an input u (b, l, d_model).
    #[allow(clippy::type_complexity)]
    pub fn inputs(&self, u: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
        let di = self.d_inner;
        // Two GEMMs over row blocks of in_proj: narrowing the weight is free.
        let x = linear(u, &self.in_proj.narrow(0, 0, di)?)?;
        let z = linear(u, &self.in_proj.narrow(0, di, di)?)?;
        let x = if crate::ops::fused_cpu(&x) {
            crate::ops::conv::causal_conv_silu(&x, &self.conv_weight.squeeze(1)?, &self.conv_bias)?
        } else {
            self.causal_conv(&x)?.silu()?
        };
        let x_dbl = linear(&x, &self.x_proj)?;
        let dt_low = x_dbl.narrow(D::Minus1, 0, self.dt_rank)?;
        let dt = softplus(&linear(&dt_low, &self.dt_proj_w)?.broadcast_add(&self.dt_proj_b)?)?;
        Ok((x, z, x_dbl, dt))
    }
}

impl Module for Mamba1Mixer {
    /// u: (b, l, d_model) -> (b, l, d_model).
    fn forward(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        let (x, z, x_dbl, dt) = self.inputs(u)?;
        let y = self.ssm(&x, &x_dbl, &dt)?;
        self.out_proj.forward(&(y * z.silu()?)?)
    }
}

/// B' and C' (b, l, d_inner, n) of a canonical form: B_t and C_t (columns r.. and r+n.. of
/// x_dbl) mapped into each channel's eigenbasis, one GEMM each.
pub fn eigenbasis_bc(
    lam: &Tensor,
    form: AForm,
    x_dbl: &Tensor,
    r: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    basis_bc(&canonical_basis(lam, form)?, x_dbl, r)
}

/// B' and C' (b, l, d_inner, n) from per-channel maps p (d_inner, 2, n, n) = [P_in, P_out].
pub fn basis_bc(p: &Tensor, x_dbl: &Tensor, r: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (di, _, n, _) = p.dims4()?;
    let (bs, l, _) = x_dbl.dims3()?;
    let map = |which: usize, col: usize| -> candle_core::Result<Tensor> {
        // M[k, c*n + j] = P[c][which][j][k], so (B M)[c*n + j] = sum_k P_jk B_k.
        let m = p
            .i((.., which))?
            .permute((2, 0, 1))?
            .contiguous()?
            .reshape((n, di * n))?;
        let v = x_dbl
            .narrow(D::Minus1, col, n)?
            .contiguous()?
            .reshape((bs * l, n))?;
        v.matmul(&m)?.reshape((bs, l, di, n))
    };
    Ok((map(0, r)?, map(1, r + n)?))
}

/// The selective scan written with candle ops, sequentially over time (mamba_ssm's
/// `selective_scan_ref`): runs on any device, and is the fused op's check in the tests.
/// x, dt: (b, l, di); a: (di, n); b, c: (b, l, n) shared or (b, l, di, n) per channel; d: (di).
pub fn selective_scan_composed(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
) -> candle_core::Result<Tensor> {
    let (bs, l, di) = x.dims3()?;
    let n = a.dim(1)?;
    let per_channel = |t: &Tensor| -> candle_core::Result<Tensor> {
        if t.rank() == 3 {
            t.unsqueeze(2)
        } else {
            Ok(t.clone())
        }
    };
    let (b, c) = (per_channel(b)?, per_channel(c)?);
    let decay = dt.unsqueeze(3)?.broadcast_mul(a)?.exp()?; // (b, l, di, n)
    let input = (dt * x)?.unsqueeze(3)?.broadcast_mul(&b)?; // (b, l, di, n)
    let mut h = Tensor::zeros((bs, di, n), x.dtype(), x.device())?;
    let mut ys = Vec::with_capacity(l);
    for t in 0..l {
        h = ((decay.i((.., t))? * h)? + input.i((.., t))?)?;
        ys.push(h.broadcast_mul(&c.i((.., t))?)?.sum(D::Minus1)?);
    }
    Tensor::stack(&ys, 1)? + x.broadcast_mul(d)?
}

/// The rotation-mode scan (free coefficients) with candle ops, sequentially over time: as
/// `selective_scan_composed` with h_t = e^{dt a_re} (cos(dt a_im) h_{t-1} + sin(dt a_im)
/// h_{t-1}[j ^ 1]) + dt x B_t. Any device; the fused op's check in the tests.
pub fn selective_scan_rot_composed(
    x: &Tensor,
    dt: &Tensor,
    a_re: &Tensor,
    a_im: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
) -> candle_core::Result<Tensor> {
    let (bs, l, di) = x.dims3()?;
    let n = a_re.dim(1)?;
    let dt4 = dt.unsqueeze(3)?;
    let e = dt4.broadcast_mul(a_re)?.exp()?; // (b, l, di, n)
    let phi = dt4.broadcast_mul(a_im)?;
    let (ec, es) = ((&e * phi.cos()?)?, (&e * phi.sin()?)?);
    let partner: Vec<u32> = (0..n)
        .map(|j| if j ^ 1 < n { j ^ 1 } else { j } as u32)
        .collect();
    let partner = Tensor::from_vec(partner, n, x.device())?;
    let input = (dt * x)?.unsqueeze(3)?.broadcast_mul(b)?; // (b, l, di, n)
    let mut h = Tensor::zeros((bs, di, n), x.dtype(), x.device())?;
    let mut ys = Vec::with_capacity(l);
    for t in 0..l {
        let swapped = h.index_select(&partner, 2)?;
        h = (((ec.i((.., t))? * &h)? + (es.i((.., t))? * swapped)?)? + input.i((.., t))?)?;
        ys.push((&h * c.i((.., t))?)?.sum(D::Minus1)?);
    }
    Tensor::stack(&ys, 1)? + x.broadcast_mul(d)?
}
