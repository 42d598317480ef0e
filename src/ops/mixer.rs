//! The whole Mamba2 mixer (in_proj GEMMs, causal conv + SiLU, softplus(dt + dt_bias), SSD with
//! the D skip, gated RMSNorm, out_proj GEMM) as one CPU op with a hand-written backward pass.
//!
//! Composed from the per-piece ops, every intermediate activation (z, xBC before and after the
//! conv, y, the normed y) is a graph node, and candle's backward zero-fills a full-size gradient
//! for each and adds the incoming one into it, and the mixer input gets one such add per
//! projection. Here those gradients stay inside one backward call (the kernels are the same
//! functions the per-piece ops run). The weights travel as one packed 1-D tensor (a cat of
//! small parameters, whose gradient bookkeeping is cheap), since a custom op takes at most three
//! tensors. The z projection is either the op's own (dense) or an input (a Mixture of Experts
//! computed outside); x, B, C, dt and out_proj must be dense.
use super::KernelFloat;
use super::{conv, for_float, gated_norm, gemm_acc, gemm_into, host_slice, ssd, with_host};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use std::any::Any;
use std::sync::Mutex;

/// Sizes of one mixer call and the offsets of each weight in the packed tensor.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    l: usize,
    /// d_model
    d: usize,
    /// d_inner
    di: usize,
    h: usize,
    p: usize,
    g: usize,
    n: usize,
    /// conv taps
    k: usize,
    /// in_proj holds the z rows (else z is the op's second input).
    z_inside: bool,
}

impl Dims {
    fn t(&self) -> usize {
        self.b * self.l
    }
    /// Channels of xBC: x | B | C.
    fn cd(&self) -> usize {
        self.di + 2 * self.g * self.n
    }
    fn z_rows(&self) -> usize {
        if self.z_inside {
            self.di
        } else {
            0
        }
    }
    fn in_rows(&self) -> usize {
        self.z_rows() + self.cd() + self.h
    }
    fn off_conv_w(&self) -> usize {
        self.in_rows() * self.d
    }
    fn off_conv_b(&self) -> usize {
        self.off_conv_w() + self.cd() * self.k
    }
    fn off_dt_bias(&self) -> usize {
        self.off_conv_b() + self.cd()
    }
    fn off_a_log(&self) -> usize {
        self.off_dt_bias() + self.h
    }
    fn off_d_skip(&self) -> usize {
        self.off_a_log() + self.h
    }
    fn off_norm_w(&self) -> usize {
        self.off_d_skip() + self.h
    }
    fn off_out(&self) -> usize {
        self.off_norm_w() + self.di
    }
    fn packed_len(&self) -> usize {
        self.off_out() + self.d * self.di
    }
    fn ssd(&self) -> ssd::Dims {
        ssd::Dims {
            b: self.b,
            l: self.l,
            h: self.h,
            p: self.p,
            g: self.g,
            n: self.n,
        }
    }
}

/// Activations the backward pass needs, kept by the forward pass.
struct Saved<T> {
    /// z when the op computes it (else it is the op's input).
    z: Option<Vec<T>>,
    xbc: Vec<T>,
    /// conv + SiLU output
    xc: Vec<T>,
    /// dt_raw + dt_bias, before the softplus
    dt_pre: Vec<T>,
    dt: Vec<T>,
    /// A (negative) | D, as the SSD kernels take them
    ad: Vec<T>,
    y: Vec<T>,
    normed: Vec<T>,
    ssd_chunks: Vec<Vec<T>>,
}

/// x W^T for the `rows` rows of the row-major W (.., d_in) starting at `w`.
fn project<T: WithDType>(x: &[T], t: usize, d_in: usize, w: &[T], rows: usize) -> Vec<T> {
    let mut y = vec![T::zero(); t * rows];
    gemm_into(
        t,
        rows,
        d_in,
        &mut y,
        (x, d_in as isize, 1),
        (w, 1, d_in as isize),
    );
    y
}

/// dW (rows x d_in) = dy^T x, written into `dw`.
fn weight_grad<T: WithDType>(dw: &mut [T], dy: &[T], x: &[T], t: usize, rows: usize, d_in: usize) {
    gemm_into(
        rows,
        d_in,
        t,
        &mut dw[..rows * d_in],
        (dy, 1, rows as isize),
        (x, d_in as isize, 1),
    );
}

fn forward<T: KernelFloat + WithDType>(
    d: Dims,
    chunk: usize,
    eps: f64,
    u: &[T],
    z_in: Option<&[T]>,
    w: &[T],
) -> (Vec<T>, Saved<T>) {
    let (t, cd, h) = (d.t(), d.cd(), d.h);
    let zr = d.z_rows();
    let z = z_in.is_none().then(|| project(u, t, d.d, w, d.di));
    let xbc = project(u, t, d.d, &w[zr * d.d..], cd);
    let dt_raw = project(u, t, d.d, &w[(zr + cd) * d.d..], h);
    let xc = conv::forward(
        &xbc,
        &w[d.off_conv_w()..d.off_conv_b()],
        &w[d.off_conv_b()..d.off_dt_bias()],
        d.b,
        d.l,
        cd,
        d.k,
    );
    let dt_bias = &w[d.off_dt_bias()..d.off_a_log()];
    let dt_pre: Vec<T> = dt_raw
        .iter()
        .enumerate()
        .map(|(i, &v)| v + dt_bias[i % h])
        .collect();
    // softplus(x) = max(x, 0) + ln(1 + e^-|x|), as the composed mixer computes it.
    let dt: Vec<T> = dt_pre
        .iter()
        .map(|&x| num_traits::Float::max(x, T::zero()) + (T::one() + (-x.abs()).exp()).ln())
        .collect();
    let mut ad: Vec<T> = w[d.off_a_log()..d.off_d_skip()]
        .iter()
        .map(|&a| -a.exp())
        .collect();
    ad.extend_from_slice(&w[d.off_d_skip()..d.off_norm_w()]);
    let (y, ssd_chunks) = ssd::forward(d.ssd(), chunk, &xc, &dt, &ad);
    let zs = z_in.unwrap_or_else(|| z.as_deref().unwrap());
    let normed = gated_norm::forward(
        &y,
        Some(zs),
        &w[d.off_norm_w()..d.off_out()],
        d.di / d.g,
        eps,
    );
    let out = project(&normed, t, d.di, &w[d.off_out()..], d.d);
    let saved = Saved {
        z,
        xbc,
        xc,
        dt_pre,
        dt,
        ad,
        y,
        normed,
        ssd_chunks,
    };
    (out, saved)
}

/// (du, dz when z is an input, dpacked).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn backward<T: KernelFloat + WithDType>(
    d: Dims,
    chunk: usize,
    eps: f64,
    u: &[T],
    z_in: Option<&[T]>,
    w: &[T],
    dout: &[T],
    s: &Saved<T>,
) -> (Vec<T>, Option<Vec<T>>, Vec<T>) {
    let (t, cd, h, di) = (d.t(), d.cd(), d.h, d.di);
    let zr = d.z_rows();
    let mut dw = vec![T::zero(); d.packed_len()];
    // out_proj: dnormed = dout W_out, dW_out = dout^T normed.
    let w_out = &w[d.off_out()..];
    let mut dnormed = vec![T::zero(); t * di];
    gemm_into(
        t,
        di,
        d.d,
        &mut dnormed,
        (dout, d.d as isize, 1),
        (w_out, di as isize, 1),
    );
    weight_grad(&mut dw[d.off_out()..], dout, &s.normed, t, d.d, di);
    let zs = z_in.unwrap_or_else(|| s.z.as_deref().unwrap());
    let (dy, dz, dnw) = gated_norm::backward(
        &s.y,
        Some(zs),
        &w[d.off_norm_w()..d.off_out()],
        &dnormed,
        di / d.g,
        eps,
    );
    drop(dnormed);
    dw[d.off_norm_w()..d.off_out()].copy_from_slice(&dnw);
    let (dxc, ddt, dad) = ssd::backward(
        d.ssd(),
        chunk,
        &s.xc,
        &s.dt,
        &s.ad,
        &dy,
        Some(&s.ssd_chunks),
    );
    drop(dy);
    // dA -> dA_log (A = -exp(A_log)), dD as is.
    for i in 0..h {
        dw[d.off_a_log() + i] = dad[i] * s.ad[i];
        dw[d.off_d_skip() + i] = dad[h + i];
    }
    // softplus' = sigmoid; dt_bias sums over tokens.
    let ddt_raw: Vec<T> = ddt
        .iter()
        .zip(&s.dt_pre)
        .map(|(&g, &x)| g * x.sigmoid())
        .collect();
    for (i, &g) in ddt_raw.iter().enumerate() {
        dw[d.off_dt_bias() + i % h] += g;
    }
    let (dxbc, dcw, dcb) = conv::backward(
        &s.xbc,
        &w[d.off_conv_w()..d.off_conv_b()],
        &w[d.off_conv_b()..d.off_dt_bias()],
        &dxc,
        d.b,
        d.l,
        cd,
        d.k,
    );
    drop(dxc);
    dw[d.off_conv_w()..d.off_conv_b()].copy_from_slice(&dcw);
    dw[d.off_conv_b()..d.off_dt_bias()].copy_from_slice(&dcb);
    // in_proj: dW rows = dpart^T u, du = sum of dpart W_part.
    let w_xbc = &w[zr * d.d..];
    let w_dt = &w[(zr + cd) * d.d..];
    weight_grad(&mut dw[zr * d.d..], &dxbc, u, t, cd, d.d);
    weight_grad(&mut dw[(zr + cd) * d.d..], &ddt_raw, u, t, h, d.d);
    let mut du = vec![T::zero(); t * d.d];
    let dd = d.d as isize;
    gemm_into(t, d.d, cd, &mut du, (&dxbc, cd as isize, 1), (w_xbc, dd, 1));
    gemm_acc(t, d.d, h, &mut du, (&ddt_raw, h as isize, 1), (w_dt, dd, 1));
    if d.z_inside {
        weight_grad(&mut dw[..], &dz, u, t, di, d.d);
        gemm_acc(t, d.d, di, &mut du, (&dz, di as isize, 1), (w, dd, 1));
        (du, None, dw)
    } else {
        (du, Some(dz), dw)
    }
}

pub struct MixerOp {
    d_inner: usize,
    headdim: usize,
    groups: usize,
    d_state: usize,
    d_conv: usize,
    z_inside: bool,
    /// Checkpoint spacing of the SSD backward pass.
    chunk: usize,
    eps: f64,
    /// The forward pass's `Saved<T>`, taken by the backward pass (recomputed when absent).
    saved: Mutex<Option<Box<dyn Any + Send>>>,
}

impl MixerOp {
    fn dims(&self, u: &Shape, packed: &Shape) -> Result<Dims> {
        let (b, l, dm) = u.dims3()?;
        let d = Dims {
            b,
            l,
            d: dm,
            di: self.d_inner,
            h: self.d_inner / self.headdim,
            p: self.headdim,
            g: self.groups,
            n: self.d_state,
            k: self.d_conv,
            z_inside: self.z_inside,
        };
        if packed.elem_count() != d.packed_len() {
            candle_core::bail!(
                "mamba2-mixer: packed weights hold {} values, expected {}",
                packed.elem_count(),
                d.packed_len()
            );
        }
        Ok(d)
    }
}

impl CustomOp3 for MixerOp {
    fn name(&self) -> &'static str {
        "mamba2-mixer"
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
        let d = self.dims(l1.shape(), l3.shape())?;
        let shape = l1.shape().clone();
        for_float!(self.name(), s1.dtype(), T => {
            let z = if self.z_inside { None } else { Some(host_slice::<T>(s2, l2)?) };
            let (out, saved) = forward::<T>(
                d,
                self.chunk,
                self.eps,
                host_slice(s1, l1)?,
                z,
                host_slice(s3, l3)?,
            );
            *self.saved.lock().unwrap() = Some(Box::new(saved));
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(
        &self,
        u: &Tensor,
        z: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(u.shape(), packed.shape())?;
        let saved = self.saved.lock().unwrap().take();
        fn run<T: KernelFloat + WithDType>(
            op: &MixerOp,
            d: Dims,
            u: &Tensor,
            z: &Tensor,
            packed: &Tensor,
            grad: &Tensor,
            saved: Option<Box<dyn Any + Send>>,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let saved = saved.and_then(|s| s.downcast::<Saved<T>>().ok());
            let (du, dz, dw) = with_host::<T, _>(u, |uv| {
                with_host::<T, _>(packed, |wv| {
                    with_host::<T, _>(grad, |gv| {
                        let go = |zv: Option<&[T]>| {
                            let recomputed;
                            let s = match &saved {
                                Some(s) => s,
                                None => {
                                    recomputed = forward(d, op.chunk, op.eps, uv, zv, wv).1;
                                    &recomputed
                                }
                            };
                            Ok(backward(d, op.chunk, op.eps, uv, zv, wv, gv, s))
                        };
                        if op.z_inside {
                            go(None)
                        } else {
                            with_host::<T, _>(z, |zv| go(Some(zv)))
                        }
                    })
                })
            })?;
            let dev = u.device();
            Ok((
                Some(Tensor::from_vec(du, u.shape(), dev)?),
                dz.map(|v| Tensor::from_vec(v, z.shape(), dev))
                    .transpose()?,
                Some(Tensor::from_vec(dw, packed.shape(), dev)?),
            ))
        }
        for_float!(self.name(), u.dtype(), T => run::<T>(self, d, u, z, packed, grad, saved))
    }
}

/// The mixer's parameters, in the shapes `Mamba2Mixer` keeps them.
pub struct MixerWeights<'a> {
    /// (z rows when z is dense) | x | B | C | dt rows, by d_model.
    pub in_proj: &'a Tensor,
    /// (conv_dim, 1, d_conv) or (conv_dim, d_conv)
    pub conv_weight: &'a Tensor,
    pub conv_bias: &'a Tensor,
    pub dt_bias: &'a Tensor,
    pub a_log: &'a Tensor,
    pub d_skip: &'a Tensor,
    pub norm_weight: &'a Tensor,
    /// (d_model, d_inner)
    pub out_proj: &'a Tensor,
}

/// Mixer hyper-parameters the op needs besides the tensor shapes.
#[derive(Debug, Clone, Copy)]
pub struct MixerShape {
    pub d_inner: usize,
    pub headdim: usize,
    pub ngroups: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub chunk: usize,
    pub eps: f64,
}

/// out (b, l, d_model) of the Mamba2 mixer for u (b, l, d_model); `z` (b, l, d_inner) is given
/// when the z projection is sparsified (else in_proj holds its rows). CPU, f32 or f64.
pub fn mixer_fused(
    u: &Tensor,
    z: Option<&Tensor>,
    w: &MixerWeights,
    shape: MixerShape,
) -> Result<Tensor> {
    let rows = shape.d_inner + 2 * shape.ngroups * shape.d_state + shape.d_inner / shape.headdim;
    let want = rows + if z.is_none() { shape.d_inner } else { 0 };
    if w.in_proj.dim(0)? != want {
        candle_core::bail!(
            "mamba2-mixer: in_proj has {} rows, expected {want} (z {})",
            w.in_proj.dim(0)?,
            if z.is_none() { "dense" } else { "given" }
        );
    }
    let packed = Tensor::cat(
        &[
            &w.in_proj.flatten_all()?,
            &w.conv_weight.flatten_all()?,
            w.conv_bias,
            w.dt_bias,
            w.a_log,
            w.d_skip,
            w.norm_weight,
            &w.out_proj.flatten_all()?,
        ],
        0,
    )?;
    let u = u.contiguous()?;
    let z_given = z;
    let z = match z {
        Some(z) => z.contiguous()?,
        None => u.clone(),
    };
    u.apply_op3(
        &z,
        &packed,
        MixerOp {
            d_inner: shape.d_inner,
            headdim: shape.headdim,
            groups: shape.ngroups,
            d_state: shape.d_state,
            d_conv: shape.d_conv,
            z_inside: z_given.is_none(),
            // As in `ssd_fused`: checkpoints every <= 16 steps keep a chunk's states in L2.
            chunk: shape.chunk.clamp(1, 16),
            eps: shape.eps,
            saved: Mutex::new(None),
        },
    )
}
