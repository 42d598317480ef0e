//! The Mamba2 mixer with mamba_ssm semantics, any of whose six projections can be a
//! Mixture of Experts.
use super::config::{ModelConfig, Projection};
use super::expert_linear::{ExpertLinear, ExpertLinearConfig, PendingExpertOutput};
use super::layers::{linear, Linear, Projector};
use super::params::{Init, ParamStore};
use super::router::RoutingStats;
use super::ssd::{rms_normalize, softplus, SsdScan};
use anyhow::Result;
use candle_core::{Module, Tensor, D};
use rand::Rng;

#[derive(Debug)]
pub struct Mamba2Mixer {
    cfg: ModelConfig,
    /// Fused dense parts of in_proj, in the order z, x, B, C, dt (sparsified parts left out).
    in_proj: Option<Tensor>,
    dense_parts: Vec<(Projection, usize)>,
    /// Sparsified input projections.
    experts_in: Vec<(Projection, ExpertLinear)>,
    conv_weight: Tensor, // (conv_dim, 1, d_conv)
    conv_bias: Tensor,   // (conv_dim)
    dt_bias: Tensor,
    a_log: Tensor,
    d_skip: Tensor,
    norm_weight: Tensor,
    out_proj: Projector,
    scan: SsdScan,
}

impl Mamba2Mixer {
    /// `prefix` is e.g. `backbone.layers.3.mixer`.
    pub fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Mamba2Mixer> {
        let d = cfg.d_model;
        let (di, h, k) = (cfg.d_inner(), cfg.nheads(), cfg.d_conv);
        let sp = &cfg.sparsity;
        let dense_parts: Vec<(Projection, usize)> = Projection::IN_PROJ_ORDER
            .into_iter()
            .filter(|p| !sp.is_sparse(*p))
            .map(|p| (p, p.dims(cfg).1))
            .collect();
        let dense_out: usize = dense_parts.iter().map(|(_, n)| n).sum();
        let bound = 1.0 / (d as f64).sqrt();
        let in_proj = if dense_out > 0 {
            Some(store.add(
                &format!("{prefix}.in_proj.weight"),
                &[dense_out, d],
                Init::Uniform(bound),
                true,
            )?)
        } else {
            None
        };
        let expert_cfg = |p: Projection| {
            let (d_in, d_out) = p.dims(cfg);
            ExpertLinearConfig {
                d_in,
                d_out,
                experts: sp.experts,
                top_k: sp.top_k,
                aux_loss_coef: sp.aux_loss_coef,
                z_loss_coef: sp.z_loss_coef,
            }
        };
        let mut experts_in = Vec::new();
        for p in Projection::IN_PROJ_ORDER {
            if sp.is_sparse(p) {
                let name = format!("{prefix}.{}_proj", p.name());
                experts_in.push((p, ExpertLinear::new(store, &name, &expert_cfg(p), 1.0)?));
            }
        }

        let conv_dim = cfg.conv_dim();
        let cb = 1.0 / (k as f64).sqrt(); // depthwise conv: fan_in = d_conv
        let conv_weight = store.add(
            &format!("{prefix}.conv1d.weight"),
            &[conv_dim, 1, k],
            Init::Uniform(cb),
            true,
        )?;
        let conv_bias = store.add(
            &format!("{prefix}.conv1d.bias"),
            &[conv_dim],
            Init::Uniform(cb),
            false,
        )?;
        // dt ~ log-uniform in [1e-3, 0.1], floor 1e-4, stored through the inverse softplus.
        let (dt_min, dt_max): (f64, f64) = (1e-3, 0.1);
        let mut dt_init = Vec::with_capacity(h);
        let mut a_init = Vec::with_capacity(h);
        for _ in 0..h {
            let u: f64 = store.rng().gen();
            let dt = (u * (dt_max.ln() - dt_min.ln()) + dt_min.ln())
                .exp()
                .max(1e-4);
            dt_init.push(dt + (-(-dt).exp_m1()).ln());
        }
        for _ in 0..h {
            let a: f64 = store.rng().gen_range(1.0..16.0);
            a_init.push(a.ln());
        }
        let dt_bias = store.add(
            &format!("{prefix}.dt_bias"),
            &[h],
            Init::Values(dt_init),
            false,
        )?;
        let a_log = store.add(
            &format!("{prefix}.A_log"),
            &[h],
            Init::Values(a_init),
            false,
        )?;
        let d_skip = store.add(&format!("{prefix}.D"), &[h], Init::Const(1.0), false)?;
        let norm_weight = store.add(
            &format!("{prefix}.norm.weight"),
            &[di],
            Init::Const(1.0),
            false,
        )?;
        // mamba_ssm rescales out_proj by 1/sqrt(n_layer) (one residual per layer).
        let out_scale = 1.0 / (cfg.n_layer as f64).sqrt();
        let out_proj = if sp.is_sparse(Projection::Out) {
            let name = format!("{prefix}.out_proj");
            Projector::Experts(ExpertLinear::new(
                store,
                &name,
                &expert_cfg(Projection::Out),
                out_scale,
            )?)
        } else {
            Projector::Dense(Linear::new(
                store,
                &format!("{prefix}.out_proj.weight"),
                di,
                d,
                out_scale,
            )?)
        };
        Ok(Mamba2Mixer {
            cfg: cfg.clone(),
            in_proj,
            dense_parts,
            experts_in,
            conv_weight,
            conv_bias,
            dt_bias,
            a_log,
            d_skip,
            norm_weight,
            out_proj,
            scan: SsdScan {
                chunk_size: cfg.chunk_size,
            },
        })
    }

    /// Routing statistics of the last forward pass, per sparsified projection.
    pub fn take_stats(&self) -> Vec<(Projection, RoutingStats)> {
        let mut out: Vec<(Projection, RoutingStats)> = self
            .experts_in
            .iter()
            .filter_map(|(p, e)| e.take_stats().map(|s| (*p, s)))
            .collect();
        if let Projector::Experts(e) = &self.out_proj {
            if let Some(s) = e.take_stats() {
                out.push((Projection::Out, s));
            }
        }
        out
    }

    /// Expert modules, for tests.
    pub fn expert_linears(&self) -> Vec<(Projection, &ExpertLinear)> {
        let mut v: Vec<(Projection, &ExpertLinear)> =
            self.experts_in.iter().map(|(p, e)| (*p, e)).collect();
        if let Projector::Experts(e) = &self.out_proj {
            v.push((Projection::Out, e));
        }
        v
    }

    /// Row range of in_proj holding the dense parts `first..=last` (in in_proj order), if they
    /// are all dense.
    fn rows(&self, first: Projection, last: Projection) -> Option<(usize, usize)> {
        let order = Projection::IN_PROJ_ORDER;
        let pos = |p: Projection| order.iter().position(|q| *q == p).unwrap();
        let span = &order[pos(first)..=pos(last)];
        if span.iter().any(|p| self.cfg.sparsity.is_sparse(*p)) {
            return None;
        }
        let offset = self
            .dense_parts
            .iter()
            .take_while(|(p, _)| *p != first)
            .map(|(_, w)| w)
            .sum();
        let width = span.iter().map(|p| p.dims(&self.cfg).1).sum();
        Some((offset, width))
    }

    /// Depthwise causal conv as d_conv shifted slices times the taps (grouped conv1d is slow).
    fn causal_conv(&self, xbc: &Tensor) -> candle_core::Result<Tensor> {
        let (_, l, _) = xbc.dims3()?;
        let k = self.cfg.d_conv;
        let padded = xbc.pad_with_zeros(1, k - 1, 0)?;
        let w = self.conv_weight.squeeze(1)?; // (conv_dim, k)
        let mut acc = self.conv_bias.broadcast_as(xbc.shape())?.contiguous()?;
        for tap in 0..k {
            let slice = padded.narrow(1, tap, l)?;
            let wk = w.narrow(1, tap, 1)?.squeeze(1)?;
            acc = (acc + slice.broadcast_mul(&wk)?)?;
        }
        Ok(acc)
    }
}

impl Module for Mamba2Mixer {
    /// u: (b, l, d_model) -> (b, l, d_model).
    fn forward(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (bs, l, _) = u.dims3()?;
        let (di, h, p, g, n) = (
            cfg.d_inner(),
            cfg.nheads(),
            cfg.headdim,
            cfg.ngroups,
            cfg.d_state,
        );

        if let Some(w) = &self.in_proj {
            // Wanda calibration: every in_proj part reads u (the parts' GEMMs see narrowed views).
            crate::prune::record::observe(w, u);
        }
        // Each dense part is its own GEMM over a row block of in_proj: narrowing the weight is
        // free, narrowing a fused output would copy it (and its gradient) once per part.
        let part = |proj: Projection| -> candle_core::Result<Tensor> {
            match self.rows(proj, proj) {
                Some((off, width)) => {
                    linear(u, &self.in_proj.as_ref().unwrap().narrow(0, off, width)?)
                }
                None => {
                    let (_, e) = self.experts_in.iter().find(|(q, _)| *q == proj).unwrap();
                    e.forward(u)
                }
            }
        };
        // The whole mixer as one op when x, B, C, dt and out_proj are dense (z may be experts).
        // Wanda calibration takes the per-piece path, where out_proj's input is observed.
        if let (true, Some(_), Projector::Dense(out)) = (
            crate::ops::fused_cpu(u) && !crate::prune::record::is_recording(),
            self.rows(Projection::X, Projection::Dt),
            &self.out_proj,
        ) {
            let z = if cfg.sparsity.is_sparse(Projection::Z) {
                Some(part(Projection::Z)?)
            } else {
                None
            };
            let w = crate::ops::mixer::MixerWeights {
                in_proj: self.in_proj.as_ref().unwrap(),
                conv_weight: &self.conv_weight,
                conv_bias: &self.conv_bias,
                dt_bias: &self.dt_bias,
                a_log: &self.a_log,
                d_skip: &self.d_skip,
                norm_weight: &self.norm_weight,
                out_proj: &out.weight,
            };
            let shape = crate::ops::mixer::MixerShape {
                d_inner: di,
                headdim: p,
                ngroups: g,
                d_state: n,
                d_conv: cfg.d_conv,
                chunk: cfg.chunk_size,
                eps: cfg.norm_eps,
            };
            return crate::ops::mixer::mixer_fused(u, z.as_ref(), &w, shape);
        }
        // A sparse z is started first and finished after the SSD: on the GPU its routing then
        // reaches the host while the conv and scan are queued, instead of draining the queue.
        // With a device-routed sparse z and a dense dt, z's router logits are extra columns of
        // dt's GEMM: per layer a GEMM and an input-gradient GEMM fewer (N = E ran cuBLAS's
        // slowest kernels) and one sum fewer in u's gradient.
        let mut dt_raw = None;
        let z = match self.experts_in.iter().find(|(q, _)| *q == Projection::Z) {
            Some((_, e)) => match (
                e.external_router(u),
                self.rows(Projection::Dt, Projection::Dt),
            ) {
                (Some(router), Some((off, width))) => {
                    let dt_rows = self.in_proj.as_ref().unwrap().narrow(0, off, width)?;
                    let both = linear(u, &Tensor::cat(&[&dt_rows, router], 0)?)?;
                    dt_raw = Some(both.narrow(D::Minus1, 0, width)?.contiguous()?);
                    let logits = both.narrow(D::Minus1, width, router.dim(0)?)?;
                    e.start_with_logits(u, logits.flatten_to(1)?.contiguous()?)?
                }
                _ => e.start(u)?,
            },
            None => PendingExpertOutput::ready(part(Projection::Z)?),
        };
        let xbc = match self.rows(Projection::X, Projection::C) {
            Some((off, width)) => {
                linear(u, &self.in_proj.as_ref().unwrap().narrow(0, off, width)?)?
            }
            None => Tensor::cat(
                &[
                    part(Projection::X)?,
                    part(Projection::B)?,
                    part(Projection::C)?,
                ],
                D::Minus1,
            )?,
        };
        let dt_raw = match dt_raw {
            Some(dt) => dt,
            None => part(Projection::Dt)?,
        };

        let xbc = if crate::ops::fused_cpu(&xbc) {
            crate::ops::conv::causal_conv_silu(
                &xbc,
                &self.conv_weight.squeeze(1)?,
                &self.conv_bias,
            )?
        } else if crate::ops::conv_cuda::applies(&xbc, cfg.d_conv) {
            crate::ops::conv_cuda::causal_conv_silu_cuda(
                &xbc,
                &self.conv_weight.squeeze(1)?,
                &self.conv_bias,
            )?
        } else {
            self.causal_conv(&xbc)?.silu()?
        };
        let dt = || softplus(&dt_raw.broadcast_add(&self.dt_bias)?); // (b, l, h)
        let a = self.a_log.exp()?.neg()?;
        let y = if crate::ops::fused_cpu(&xbc) {
            crate::ops::ssd::ssd_fused(&xbc, &dt()?, &a, &self.d_skip, p, g, n, cfg.chunk_size)?
        } else if crate::ops::ssd_cuda::applies(&xbc, p, n) {
            // The kernels apply softplus(dt_raw + dt_bias) as they load dt.
            let bias = Some(&self.dt_bias);
            let chunk = cfg.chunk_size;
            crate::ops::ssd_cuda::ssd_cuda(&xbc, &dt_raw, bias, &a, &self.d_skip, p, g, n, chunk)?
        } else {
            let dt = dt()?;
            let xh = xbc.narrow(D::Minus1, 0, di)?.reshape((bs, l, h, p))?;
            let b_mat = xbc.narrow(D::Minus1, di, g * n)?.reshape((bs, l, g, n))?;
            let c_mat = xbc
                .narrow(D::Minus1, di + g * n, g * n)?
                .reshape((bs, l, g, n))?;
            let y = self.scan.forward(&xh, &dt, &a, &b_mat, &c_mat)?;
            (y + xh.broadcast_mul(&self.d_skip.reshape((h, 1))?)?)?.reshape((bs, l, di))?
        };

        let z = z.finish()?;
        // Gated RMSNorm (mamba_ssm RMSNormGated, norm_before_gate=False): norm(y * silu(z)) per group.
        let normed = if crate::ops::fused_cpu(&y) {
            crate::ops::gated_norm::gated_rms_norm(&y, &z, &self.norm_weight, di / g, cfg.norm_eps)?
        } else if crate::ops::gated_norm_cuda::applies(&y, di / g) {
            let w = &self.norm_weight;
            crate::ops::gated_norm_cuda::gated_rms_norm_cuda(&y, &z, w, di / g, cfg.norm_eps)?
        } else {
            let gated = (y * z.silu()?)?;
            rms_normalize(&gated.reshape((bs, l, g, di / g))?, cfg.norm_eps)?
                .reshape((bs, l, di))?
                .broadcast_mul(&self.norm_weight)?
        };
        self.out_proj.forward(&normed)
    }
}
