//! A whole `ExpertLinear` on CPU as one op: router logits GEMM, softmax, top-k, per-expert
//! counts, the grouped expert GEMMs and the gate-weighted combine in one forward call, with a
//! hand-written backward. Composed, the router alone is a matmul, a softmax, a host copy, an
//! index_select of the gates and the load-balancing terms, each a graph node whose backward
//! zero-fills and adds its gradient, and the router's input gradient is a second full-size
//! (T, d_in) tensor added into x's.
//!
//! Inputs: x (T, d_in), the router weight wr (E, d_in), the stacked expert weights
//! w (E, d_out, d_in). Output: y (T, d_out), y_t = sum over the k experts e chosen for t of
//! p_te W_e x_t with p_t = softmax(wr x_t). The routing (a discrete decision, not
//! differentiated) is kept for the caller and for `RouterAux`, the load-balancing loss and
//! z-loss as a second small op reading the same probabilities.
//!
//! Backward: dW_e and dx through the expert GEMMs on the gathered rows (as `GroupedLinear`),
//! the gate gradient dp_t,e = dy_t . (W_e x_t) through the softmax,
//! dlogit_t = p_t * (dp_t - <p_t, dp_t>), then dwr = dlogit^T x and dx += dlogit wr.
use super::grouped_linear::GroupedLinear;
use super::{for_float, gemm_acc, gemm_into, host_slice, with_host};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::any::Any;
use std::sync::{Arc, Mutex};

/// The routing of one forward pass, shared by the expert op and its `RouterAux`.
#[derive(Default)]
struct Shared {
    /// Token-slot assignments per expert.
    counts: Vec<usize>,
    /// `Probs<T>`: the router probabilities and logsumexp of each token.
    probs: Option<Box<dyn Any + Send>>,
}

struct Probs<T> {
    /// (T, E) softmax of the router logits.
    p: Vec<T>,
    /// (T,) logsumexp of the router logits.
    lse: Vec<T>,
}

/// What the backward pass needs from the forward pass.
struct Saved<T> {
    grouped: GroupedLinear,
    /// As `Plan::choice`.
    choice: Vec<u32>,
    gates: Vec<T>,
    /// Router probabilities (T, E).
    p: Vec<T>,
    xs: Vec<T>,
    ys: Vec<T>,
}

pub struct RoutedLinear {
    top_k: usize,
    shared: Arc<Mutex<Shared>>,
    /// `Saved<T>` of the forward pass, taken by the backward pass (recomputed when absent).
    saved: Mutex<Option<Box<dyn Any + Send>>>,
}

/// (tokens, d_in, experts, d_out).
fn dims(x: &Shape, wr: &Shape, w: &Shape, k: usize) -> Result<(usize, usize, usize, usize)> {
    let (t, d_in) = x.dims2()?;
    let (e, d_in_r) = wr.dims2()?;
    let (e_w, d_out, d_in_w) = w.dims3()?;
    if d_in_r != d_in || d_in_w != d_in || e_w != e || k == 0 || k > e {
        candle_core::bail!(
            "routed-linear: x {x:?}, router {wr:?}, experts {w:?} and top-{k} do not match"
        );
    }
    Ok((t, d_in, e, d_out))
}

/// Softmax and logsumexp of each row of `logits` (T, E), as candle's softmax computes them
/// (max subtracted, exp, divided by the sum).
fn softmax_rows<T: WithDType + num_traits::Float + num_traits::NumAssign>(
    logits: &mut [T],
    e: usize,
) -> Vec<T> {
    let mut lse = vec![T::zero(); logits.len() / e];
    logits
        .par_chunks_mut(e)
        .zip(lse.par_iter_mut())
        .for_each(|(row, l)| {
            let m = row
                .iter()
                .fold(T::neg_infinity(), |a, &v| num_traits::Float::max(a, v));
            let mut sum = T::zero();
            for v in row.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
            *l = sum.ln() + m;
        });
    lse
}

/// Where one forward pass sends its tokens.
struct Plan {
    /// Expert of the j-th choice of token t, at t * k + j.
    choice: Vec<u32>,
    /// Token of each slot, slots sorted by expert (token order within an expert).
    slot_tokens: Vec<u32>,
    /// Slots of expert e: offsets[e]..offsets[e + 1].
    offsets: Vec<usize>,
    /// Slot of the j-th choice of token t, at t * k + j.
    back: Vec<u32>,
    counts: Vec<usize>,
}

/// Top-k experts of each token (ties to the lower index, as `Router::route`), slots sorted by
/// expert.
fn plan<T: WithDType + num_traits::Float>(p: &[T], e: usize, k: usize) -> Plan {
    let t = p.len() / e;
    let mut choice = vec![0u32; t * k];
    choice
        .par_chunks_mut(k)
        .zip(p.par_chunks(e))
        .for_each(|(c, row)| {
            if k == 1 {
                c[0] = (0..e).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32;
            } else {
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|&i, &j| {
                    row[j]
                        .partial_cmp(&row[i])
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(i.cmp(&j))
                });
                for (cv, &o) in c.iter_mut().zip(&order[..k]) {
                    *cv = o as u32;
                }
            }
        });
    let mut counts = vec![0usize; e];
    for &c in &choice {
        counts[c as usize] += 1;
    }
    let mut offsets = vec![0usize; e + 1];
    for i in 0..e {
        offsets[i + 1] = offsets[i] + counts[i];
    }
    // Counting sort: slots of an expert in token order.
    let mut next = offsets[..e].to_vec();
    let mut slot_tokens = vec![0u32; t * k];
    let mut back = vec![0u32; t * k];
    for (i, &c) in choice.iter().enumerate() {
        let s = next[c as usize];
        next[c as usize] += 1;
        slot_tokens[s] = (i / k) as u32;
        back[i] = s as u32;
    }
    Plan {
        choice,
        slot_tokens,
        offsets,
        back,
        counts,
    }
}

impl RoutedLinear {
    /// Routing and expert outputs: (y, probabilities, counts, saved).
    #[allow(clippy::type_complexity)]
    fn forward<T: WithDType + num_traits::Float + num_traits::NumAssign>(
        &self,
        x: &[T],
        wr: &[T],
        w: &[T],
        (t, d_in, e, d_out): (usize, usize, usize, usize),
    ) -> (Vec<T>, Probs<T>, Vec<usize>, Saved<T>) {
        let k = self.top_k;
        let mut p = vec![T::zero(); t * e];
        gemm_into(
            t,
            e,
            d_in,
            &mut p,
            (x, d_in as isize, 1),
            (wr, 1, d_in as isize),
        );
        let lse = softmax_rows(&mut p, e);
        let pl = plan(&p, e, k);
        let mut gates = vec![T::zero(); t * k];
        for (i, (&s, &c)) in pl.back.iter().zip(&pl.choice).enumerate() {
            gates[s as usize] = p[(i / k) * e + c as usize];
        }
        let grouped = GroupedLinear::new(Arc::new(pl.slot_tokens), pl.offsets, Arc::new(pl.back));
        let (y, xs, ys) = grouped.forward(x, w, &gates, t, d_in, d_out);
        let saved = Saved {
            grouped,
            choice: pl.choice,
            gates,
            p: p.clone(),
            xs,
            ys,
        };
        let counts = pl.counts;
        (y, Probs { p, lse }, counts, saved)
    }
}

impl CustomOp3 for RoutedLinear {
    fn name(&self) -> &'static str {
        "routed-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims(l1.shape(), l2.shape(), l3.shape(), self.top_k)?;
        for_float!(self.name(), s1.dtype(), T => {
            let (y, probs, counts, saved) = self.forward::<T>(
                host_slice(s1, l1)?,
                host_slice(s2, l2)?,
                host_slice(s3, l3)?,
                dm,
            );
            *self.shared.lock().unwrap() = Shared { counts, probs: Some(Box::new(probs)) };
            *self.saved.lock().unwrap() = Some(Box::new(saved));
            Ok((T::to_cpu_storage_owned(y), Shape::from((dm.0, dm.3))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        wr: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = dims(x.shape(), wr.shape(), w.shape(), self.top_k)?;
        let saved = self.saved.lock().unwrap().take();
        fn run<T: WithDType + num_traits::Float + num_traits::NumAssign>(
            op: &RoutedLinear,
            dm: (usize, usize, usize, usize),
            (x, wr, w, grad): (&Tensor, &Tensor, &Tensor, &Tensor),
            saved: Option<Box<dyn Any + Send>>,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (t, d_in, e, d_out) = dm;
            let k = op.top_k;
            let (dx, dwr, dw) = with_host::<T, _>(x, |xv| {
                with_host::<T, _>(wr, |wrv| {
                    with_host::<T, _>(w, |wv| {
                        with_host::<T, _>(grad, |dy| {
                            let s = match saved.and_then(|s| s.downcast::<Saved<T>>().ok()) {
                                Some(s) => *s,
                                // A second backward: run the forward pass again.
                                None => op.forward(xv, wrv, wv, dm).3,
                            };
                            let (mut dx, dw, dgates) = s.grouped.backward(
                                xv,
                                wv,
                                &s.gates,
                                dy,
                                (&s.xs, &s.ys),
                                d_in,
                                d_out,
                            );
                            drop((s.xs, s.ys));
                            // dp at the chosen experts, then through the softmax.
                            let back = &s.grouped.back;
                            let mut dlogit = vec![T::zero(); t * e];
                            dlogit.par_chunks_mut(e).enumerate().for_each(|(tok, dl)| {
                                for j in tok * k..(tok + 1) * k {
                                    let ex = s.choice[j] as usize;
                                    dl[ex] += dgates[back[j] as usize];
                                }
                                let pt = &s.p[tok * e..(tok + 1) * e];
                                let dot =
                                    dl.iter().zip(pt).fold(T::zero(), |a, (&g, &pv)| a + g * pv);
                                for (g, &pv) in dl.iter_mut().zip(pt) {
                                    *g = pv * (*g - dot);
                                }
                            });
                            let (dwr, ()) = router_grads(&dlogit, xv, wrv, &mut dx, t, d_in, e);
                            Ok((dx, dwr, dw))
                        })
                    })
                })
            })?;
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dwr, wr.shape(), dev)?),
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
            ))
        }
        for_float!(self.name(), x.dtype(), T => run::<T>(self, dm, (x, wr, w, grad), saved))
    }
}

/// dwr = dlogit^T x (E, d_in), and dx += dlogit wr.
fn router_grads<T: WithDType>(
    dlogit: &[T],
    x: &[T],
    wr: &[T],
    dx: &mut [T],
    t: usize,
    d_in: usize,
    e: usize,
) -> (Vec<T>, ()) {
    let mut dwr = vec![T::zero(); e * d_in];
    gemm_into(
        e,
        d_in,
        t,
        &mut dwr,
        (dlogit, 1, e as isize),
        (x, d_in as isize, 1),
    );
    gemm_acc(
        t,
        d_in,
        e,
        dx,
        (dlogit, e as isize, 1),
        (wr, d_in as isize, 1),
    );
    (dwr, ())
}

/// The Switch load-balancing loss alpha * E * sum_e f_e P_e (f_e: fraction of slots routed to
/// e, a constant; P_e: mean router probability) plus the router z-loss
/// beta * mean_t logsumexp(logits_t)^2, from the probabilities a `RoutedLinear` computed.
/// Inputs x and wr are the routed op's (the gradient flows to both).
pub struct RouterAux {
    top_k: usize,
    aux_coef: f64,
    z_coef: f64,
    shared: Arc<Mutex<Shared>>,
}

impl RouterAux {
    /// d aux / d logits (T, E), times `g`.
    fn dlogit<T: WithDType + num_traits::Float>(
        &self,
        pr: &Probs<T>,
        counts: &[usize],
        e: usize,
        g: f64,
    ) -> Vec<T> {
        let t = pr.lse.len();
        let slots = (t * self.top_k).max(1) as f64;
        let tt = t.max(1) as f64;
        // d/dP_e, spread over the tokens' probabilities.
        let a: Vec<T> = counts
            .iter()
            .map(|&c| {
                <T as WithDType>::from_f64(g * self.aux_coef * e as f64 * (c as f64 / slots) / tt)
            })
            .collect();
        let zc = <T as WithDType>::from_f64(g * self.z_coef * 2.0 / tt);
        let mut dl = vec![T::zero(); t * e];
        dl.par_chunks_mut(e)
            .zip(pr.p.par_chunks(e))
            .zip(pr.lse.par_iter())
            .for_each(|((dl, pt), &lse)| {
                let dot = pt.iter().zip(&a).fold(T::zero(), |s, (&p, &av)| s + p * av);
                for ((d, &p), &av) in dl.iter_mut().zip(pt).zip(&a) {
                    // softmax: p (a - <p, a>); z-loss: 2 beta lse p / T.
                    *d = p * (av - dot) + zc * lse * p;
                }
            });
        dl
    }
}

impl CustomOp2 for RouterAux {
    fn name(&self) -> &'static str {
        "router-aux"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (e, _) = l2.shape().dims2()?;
        let shared = self.shared.lock().unwrap();
        for_float!(self.name(), s1.dtype(), T => {
            let Some(pr) = shared.probs.as_ref().and_then(|b| b.downcast_ref::<Probs<T>>()) else {
                candle_core::bail!("router-aux: the routed op has not run");
            };
            let t = pr.lse.len();
            let slots = (t * self.top_k).max(1) as f64;
            let mut mean_p = vec![0f64; e];
            for row in pr.p.chunks(e) {
                for (m, &v) in mean_p.iter_mut().zip(row) {
                    *m += WithDType::to_f64(v);
                }
            }
            let mut aux = 0f64;
            for (m, &c) in mean_p.iter().zip(&shared.counts) {
                aux += (m / t.max(1) as f64) * (c as f64 / slots);
            }
            aux *= self.aux_coef * e as f64;
            if self.z_coef > 0.0 {
                let z = pr.lse.iter().map(|&l| WithDType::to_f64(l).powi(2)).sum::<f64>();
                aux += self.z_coef * z / t.max(1) as f64;
            }
            Ok((T::to_cpu_storage_owned(vec![<T as WithDType>::from_f64(aux)]), Shape::from(())))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        wr: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (t, d_in) = x.dims2()?;
        let (e, _) = wr.dims2()?;
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        fn run<T: WithDType + num_traits::Float>(
            op: &RouterAux,
            x: &Tensor,
            wr: &Tensor,
            (t, d_in, e, g): (usize, usize, usize, f64),
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let dlogit = {
                let shared = op.shared.lock().unwrap();
                let Some(pr) = shared
                    .probs
                    .as_ref()
                    .and_then(|b| b.downcast_ref::<Probs<T>>())
                else {
                    candle_core::bail!("router-aux: the routed op has not run");
                };
                op.dlogit(pr, &shared.counts, e, g)
            };
            let (dx, dwr) = with_host::<T, _>(x, |xv| {
                with_host::<T, _>(wr, |wrv| {
                    let mut dx = vec![T::zero(); t * d_in];
                    let (dwr, ()) = router_grads(&dlogit, xv, wrv, &mut dx, t, d_in, e);
                    Ok((dx, dwr))
                })
            })?;
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dwr, wr.shape(), dev)?),
            ))
        }
        for_float!(self.name(), x.dtype(), T => run::<T>(self, x, wr, (t, d_in, e, g)))
    }
}

/// What `routed_linear` returns besides y.
pub struct Routed {
    pub y: Tensor,
    /// Token-slot assignments per expert (sums to T * k).
    pub counts: Vec<usize>,
    /// Load-balancing loss (+ z-loss), a scalar in the graph.
    pub aux_loss: Tensor,
}

/// y (T, d_out) of a top-k Mixture of Experts linear layer for x (T, d_in), router weight
/// wr (E, d_in) and stacked expert weights w (E, d_out, d_in), routing included, with the
/// routing counts and the auxiliary loss. CPU, f32 or f64.
pub fn routed_linear(
    x: &Tensor,
    wr: &Tensor,
    w: &Tensor,
    top_k: usize,
    aux_coef: f64,
    z_coef: f64,
) -> Result<Routed> {
    let x = x.contiguous()?;
    let wr = wr.contiguous()?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let y = x.apply_op3(
        &wr,
        &w.contiguous()?,
        RoutedLinear {
            top_k,
            shared: shared.clone(),
            saved: Mutex::new(None),
        },
    )?;
    let aux_loss = x.apply_op2(
        &wr,
        RouterAux {
            top_k,
            aux_coef,
            z_coef,
            shared: shared.clone(),
        },
    )?;
    let counts = shared.lock().unwrap().counts.clone();
    Ok(Routed {
        y,
        counts,
        aux_loss,
    })
}
