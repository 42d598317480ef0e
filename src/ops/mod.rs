//! Fused CPU kernels wrapped as candle `CustomOp`s (forward and backward), for the parts of the
//! Mamba2 mixer that are memory-bound chains of small ops when written with candle tensors:
//! the SSD recurrence, the depthwise causal conv + SiLU, and the gated RMSNorm. On other
//! devices the callers fall back to composed candle ops (and, later, CUDA kernels).
//! Each kernel is tested against the composed implementation and the f64 oracle.
pub mod conv;
pub mod gated_norm;
pub mod ssd;

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

/// True when the fused CPU kernels apply (CPU device, f32 or f64).
pub fn fused_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// Runs `f` compiled for AVX2+FMA when the CPU has them (the kernels are plain loops that
/// LLVM vectorises; the default x86-64 target only allows SSE2).
#[inline(always)]
pub(crate) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { avx2(f) };
        }
    }
    f()
}
