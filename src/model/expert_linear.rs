//! `ExpertLinear`: a drop-in Mixture-of-Experts replacement for a bias-free linear layer.
use super::params::{ExpertShare, Init, ParamStore};
use super::router::{Router, RoutingStats};
use anyhow::Result;
use candle_core::{Module, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertLinearConfig {
    pub d_in: usize,
    pub d_out: usize,
    pub experts: usize,
    pub top_k: usize,
    pub aux_loss_coef: f64,
    pub z_loss_coef: f64,
}

/// y = sum over the top-k experts e of p_e(x) * W_e x, with p = softmax(router(x)).
/// Tensors: `{prefix}.router.weight` (E, d_in), `{prefix}.experts.{e}.weight` (d_out, d_in).
#[derive(Debug)]
pub struct ExpertLinear {
    pub router: Router,
    experts: Vec<Tensor>,
    d_out: usize,
}

impl ExpertLinear {
    /// `init_scale` multiplies the default U(±1/sqrt(d_in)) bound (mamba_ssm rescales out_proj).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        cfg: &ExpertLinearConfig,
        init_scale: f64,
    ) -> Result<ExpertLinear> {
        let router = Router::new(
            store,
            &format!("{prefix}.router.weight"),
            cfg.d_in,
            cfg.experts,
            cfg.top_k,
            cfg.aux_loss_coef,
            cfg.z_loss_coef,
        )?;
        let bound = init_scale / (cfg.d_in as f64).sqrt();
        store.set_expert_scope(Some(ExpertShare {
            experts: cfg.experts,
            top_k: cfg.top_k,
        }));
        let experts = (0..cfg.experts)
            .map(|e| {
                store.add(
                    &format!("{prefix}.experts.{e}.weight"),
                    &[cfg.d_out, cfg.d_in],
                    Init::Uniform(bound),
                    true,
                )
            })
            .collect::<Result<Vec<_>>>();
        store.set_expert_scope(None);
        Ok(ExpertLinear {
            router,
            experts: experts?,
            d_out: cfg.d_out,
        })
    }

    pub fn take_stats(&self) -> Option<RoutingStats> {
        self.router.take_stats()
    }

    /// The dense masked computation (every expert on every token, masked by the routing):
    /// the slow reference the sparse dispatch is tested against.
    pub fn forward_dense_reference(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let x2 = x.flatten_to(dims.len() - 2)?;
        let (t, _) = x2.dims2()?;
        let logits = x2.matmul(&self.router.weight().t()?)?;
        let probs = candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?;
        let host: Vec<Vec<f64>> = probs.to_dtype(candle_core::DType::F64)?.to_vec2()?;
        let e = self.experts.len();
        let mut mask = vec![0f64; t * e];
        for (tok, row) in host.iter().enumerate() {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
            for &ei in &order[..self.router.top_k] {
                mask[tok * e + ei] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (t, e), x.device())?.to_dtype(x.dtype())?;
        let gates = (probs * mask)?;
        let mut y = Tensor::zeros((t, self.d_out), x.dtype(), x.device())?;
        for (ei, w) in self.experts.iter().enumerate() {
            let ye = x2
                .matmul(&w.t()?)?
                .broadcast_mul(&gates.narrow(1, ei, 1)?)?;
            y = (y + ye)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.d_out;
        Ok(y.reshape(out_dims)?)
    }
}

/// An `ExpertLinear` forward pass begun by `ExpertLinear::start`; `finish` gives its output.
pub struct PendingExpertOutput<'a>(Pending<'a>);

enum Pending<'a> {
    Ready(Tensor, std::marker::PhantomData<&'a Router>),
    /// Routed on the GPU, the expert GEMMs waiting for the routing's expert offsets.
    #[cfg(feature = "cuda")]
    Routed {
        router: &'a Router,
        x2: Tensor,
        w: Tensor,
        route: super::router::DeviceRoute,
        out_dims: Vec<usize>,
    },
}

impl PendingExpertOutput<'_> {
    /// An output that is already computed (a dense projection in its place).
    pub fn ready(y: Tensor) -> Self {
        PendingExpertOutput(Pending::Ready(y, std::marker::PhantomData))
    }

    /// The layer's output (..., d_out); on the GPU this waits for the routing's expert offsets
    /// (and only for the work queued before the routing).
    pub fn finish(self) -> candle_core::Result<Tensor> {
        match self.0 {
            Pending::Ready(y, _) => Ok(y),
            #[cfg(feature = "cuda")]
            Pending::Routed {
                router,
                x2,
                w,
                route,
                out_dims,
            } => {
                let (gates, idx, offsets) =
                    router.complete(route).map_err(candle_core::Error::wrap)?;
                crate::ops::grouped_linear::grouped_linear_on_device(&x2, &w, &gates, idx, offsets)?
                    .reshape(out_dims)
            }
        }
    }
}

impl ExpertLinear {
    /// Begins the forward pass of x (..., d_in). With top-1 routing on the GPU the router and
    /// routing are queued and the host does not wait for them: the caller can queue work that
    /// does not need this output (the mixer's conv and SSD for W_z) before `finish`. Elsewhere
    /// the output is computed here.
    pub fn start(&self, x: &Tensor) -> candle_core::Result<PendingExpertOutput<'_>> {
        #[cfg(feature = "cuda")]
        if self.routes_on_device(x) {
            let x2 = x.flatten_to(x.rank() - 2)?;
            let route = self
                .router
                .route_on_device(&x2)
                .map_err(candle_core::Error::wrap)?;
            if let Some(route) = route {
                return self.routed(x, x2, route);
            }
        }
        Ok(PendingExpertOutput::ready(self.forward_now(x)?))
    }

    /// The router's weight (E, d_in) when `start_with_logits` applies to `x` (top-1 routing on
    /// the GPU): the caller may then compute the router logits x W^T inside a GEMM of its own.
    pub fn external_router(&self, x: &Tensor) -> Option<&Tensor> {
        #[cfg(feature = "cuda")]
        if self.routes_on_device(x) {
            return Some(self.router.weight());
        }
        let _ = x;
        None
    }

    /// `start` with the router logits (T, E) of x already computed (see `external_router`).
    pub fn start_with_logits(
        &self,
        x: &Tensor,
        logits: Tensor,
    ) -> candle_core::Result<PendingExpertOutput<'_>> {
        #[cfg(feature = "cuda")]
        {
            let x2 = x.flatten_to(x.rank() - 2)?;
            let route = self
                .router
                .route_logits_on_device(logits)
                .map_err(candle_core::Error::wrap)?;
            self.routed(x, x2, route)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (x, logits);
            candle_core::bail!("expert linear: external router logits need the GPU routing")
        }
    }

    /// Device routing applies: top-1 on the GPU with the kernels on and no Wanda recording.
    #[cfg(feature = "cuda")]
    fn routes_on_device(&self, x: &Tensor) -> bool {
        std::env::var_os("MOZ_LAB_COMPOSED_MOE").is_none()
            && !crate::prune::record::is_recording()
            && crate::ops::fused_cuda(x)
            && self.router.routes_on_device(x)
    }

    #[cfg(feature = "cuda")]
    fn routed(
        &self,
        x: &Tensor,
        x2: Tensor,
        route: super::router::DeviceRoute,
    ) -> candle_core::Result<PendingExpertOutput<'_>> {
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().unwrap() = self.d_out;
        Ok(PendingExpertOutput(Pending::Routed {
            router: &self.router,
            w: Tensor::stack(&self.experts, 0)?,
            x2,
            route,
            out_dims,
        }))
    }

    /// The forward pass computed at once (CPU, host routing, composed ops).
    fn forward_now(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let x2 = x.flatten_to(dims.len() - 2)?;
        let recording = crate::prune::record::is_recording();
        let fused = std::env::var_os("MOZ_LAB_COMPOSED_MOE").is_none() && !recording;
        let y = if fused && crate::ops::fused_cpu(&x2) {
            // Router, routing, expert GEMMs and combine in one op; the auxiliary loss reads
            // its probabilities.
            let (aux, z) = self.router.loss_coefs();
            let w = Tensor::stack(&self.experts, 0)?;
            let r = crate::ops::routed_linear::routed_linear(
                &x2,
                self.router.weight(),
                &w,
                self.router.top_k,
                aux,
                z,
            )?;
            self.router.record(RoutingStats {
                counts: r.counts,
                aux_loss: r.aux_loss,
            });
            r.y
        } else if fused && crate::ops::fused_cuda(&x2) {
            // One op for all experts' GEMMs, gathers and the gated combine.
            let r = self.router.route(&x2).map_err(candle_core::Error::wrap)?;
            let w = Tensor::stack(&self.experts, 0)?;
            crate::ops::grouped_linear::grouped_linear(
                &x2,
                &w,
                &r.gates,
                r.slot_tokens,
                r.offsets,
                Arc::new(r.back),
            )?
        } else {
            self.router
                .route_and_combine(&x2, |e, xe| {
                    // Wanda calibration: an expert's input is the tokens routed to it.
                    crate::prune::record::observe(&self.experts[e], xe);
                    xe.matmul(&self.experts[e].t()?)
                })
                .map_err(candle_core::Error::wrap)?
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.d_out;
        y.reshape(out_dims)
    }
}

impl Module for ExpertLinear {
    /// x: (..., d_in) -> (..., d_out). Routing statistics are kept for `take_stats`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.start(x)?.finish()
    }
}
