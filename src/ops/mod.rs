//! Fused CPU kernels wrapped as candle `CustomOp`s (forward and backward), for the parts of the
//! Mamba2 mixer that are memory-bound chains of small ops when written with candle tensors:
//! the SSD recurrence, the depthwise causal conv + SiLU, and the gated RMSNorm. On other
//! devices the callers fall back to composed candle ops (and, later, CUDA kernels).
//! Each kernel is tested against the composed implementation and the f64 oracle.
pub mod adamw;
pub mod adamw_cuda;
pub mod conv;
pub mod conv_cuda;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gate_pick;
pub mod gated_norm;
pub mod gated_norm_cuda;
pub mod grouped_linear;
#[cfg(feature = "cuda")]
pub mod grouped_linear_cuda;
pub mod linear;
pub mod mixer;
#[cfg(feature = "cuda")]
pub mod route_cuda;
pub mod routed_linear;
pub mod selective_scan;
pub mod ssd;
pub mod ssd_cuda;

use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

/// The contiguous slice of a CPU storage described by `layout`.
pub(crate) fn host_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// A tensor's values on the host, row-major.
pub(crate) fn host_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Calls `f` with a tensor's values on the host: borrowed from its CPU storage when contiguous
/// (no copy of the multi-megabyte activations a backward pass reads), else copied.
pub(crate) fn with_host<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&cpu.as_slice::<T>()?[a..b]);
        }
    }
    f(&host_vec::<T>(t)?)
}

/// dst (m x n) = lhs (m x k) * rhs (k x n), each given as (pointer, row stride, column stride);
/// dst is row-major and overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    lhs: (&[T], isize, isize),
    rhs: (&[T], isize, isize),
) {
    gemm_impl(m, n, k, dst, lhs, rhs, false)
}

/// As `gemm_into`, but dst += lhs * rhs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_acc<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    lhs: (&[T], isize, isize),
    rhs: (&[T], isize, isize),
) {
    gemm_impl(m, n, k, dst, lhs, rhs, true)
}

#[allow(clippy::too_many_arguments)]
fn gemm_impl<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    lhs: (&[T], isize, isize),
    rhs: (&[T], isize, isize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller passes slices that cover every element the strides address (checked
    // by the slicing at the call sites); dst is exclusively borrowed and m x n row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// True when the project's CUDA kernels apply (CUDA build and device, f32 or bf16).
pub fn fused_cuda(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        t.device().is_cuda() && cuda::supported_dtype(t.dtype())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        false
    }
}

/// True when the fused CPU kernels apply (CPU device, f32 or f64).
pub fn fused_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32 or f64); other dtypes are an
/// error naming the op.
macro_rules! for_float {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}
pub(crate) use for_float;

/// True when the CPU has AVX2 and FMA (checked once).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name` calling the `#[inline(always)]` kernel `$kernel` compiled for AVX2+FMA when
/// the CPU has them (the kernels are plain loops that LLVM vectorises; the default x86-64
/// target only allows SSE2), else for the baseline target.
macro_rules! simd_kernel {
    (fn $name:ident <$t:ident> ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty = $kernel:ident) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<$t: $crate::ops::KernelFloat>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<$t: $crate::ops::KernelFloat>($($arg: $ty),*) -> $ret {
                    $kernel::<$t>($($arg),*)
                }
                if $crate::ops::has_avx2_fma() {
                    // SAFETY: the features were detected at run time.
                    return unsafe { fast::<$t>($($arg),*) };
                }
            }
            $kernel::<$t>($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// sum_j a[j] * b[j] with 8 independent accumulators, so it vectorises without fast-math.
#[inline(always)]
pub(crate) fn dot<T: num_traits::Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let mut acc = [T::zero(); 8];
    let full = n / 8 * 8;
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] = ca[k].mul_add(cb[k], acc[k]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for j in full..n {
        s = a[j].mul_add(b[j], s);
    }
    s
}

/// Float types the kernels run on, with an exp that vectorises (libm's is a scalar call).
pub trait KernelFloat:
    num_traits::Float + num_traits::FromPrimitive + num_traits::NumAssign + Send + Sync
{
    fn fast_exp(self) -> Self;

    /// sigmoid(x) = 1 / (1 + e^-x).
    #[inline(always)]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (-self).fast_exp())
    }
}

impl KernelFloat for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

impl KernelFloat for f32 {
    /// Cephes-style expf: e^x = 2^n e^r, |r| <= ln2/2, degree-6 polynomial; relative error
    /// ~2e-7 over the clamped range, branch-free so LLVM vectorises it.
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        let x = self.clamp(-87.3, 88.7);
        let n = (x * std::f32::consts::LOG2_E).round();
        let r = n.mul_add(-0.693_359_4, x);
        let r = n.mul_add(2.121_944_4e-4, r);
        let mut p = 1.987_569_1e-4f32;
        p = p.mul_add(r, 1.398_199_9e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 1.666_666_5e-1);
        p = p.mul_add(r, 5e-1);
        let e = p.mul_add(r * r, r) + 1.0;
        let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
        e * scale
    }
}
