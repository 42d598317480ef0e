//! The project's own CUDA kernels (kernels/*.cu): embedded in the binary, compiled once per
//! process with NVRTC and loaded into candle's CUDA context, so they run on candle's stream and
//! read and write candle's buffers directly.
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Prepended to every module's source: the bf16 load/store helpers they all use.
const COMMON_CUH: &str = include_str!("../../kernels/common.cuh");
const SSD_COMMON_CUH: &str = include_str!("../../kernels/ssd_common.cuh");
const SSD_SCAN_CU: &str = include_str!("../../kernels/ssd_scan.cu");
const SSD_MMA_CU: &str = include_str!("../../kernels/ssd_mma.cu");
const MOE_CU: &str = include_str!("../../kernels/moe.cu");
const CONV_CU: &str = include_str!("../../kernels/conv.cu");
const GATED_NORM_CU: &str = include_str!("../../kernels/gated_norm.cu");
const ADAMW_CU: &str = include_str!("../../kernels/adamw.cu");

/// One NVRTC module: its name, its sources in order (after common.cuh) and the virtual
/// architecture it needs beyond NVRTC's default.
struct Module {
    name: &'static str,
    sources: &'static [&'static str],
    arch: Option<&'static str>,
}

/// The module of tensor-core kernels: mma.sync on bf16 needs compute capability 8.0.
pub const MMA_MODULE: &str = "moz_ssd_mma";

const MODULES: [Module; 6] = [
    Module {
        name: "moz_ssd_scan",
        sources: &[SSD_COMMON_CUH, SSD_SCAN_CU],
        arch: None,
    },
    Module {
        name: MMA_MODULE,
        sources: &[SSD_COMMON_CUH, SSD_MMA_CU],
        arch: Some("compute_80"),
    },
    Module {
        name: "moz_moe",
        sources: &[MOE_CU],
        arch: None,
    },
    Module {
        name: "moz_conv",
        sources: &[CONV_CU],
        arch: None,
    },
    Module {
        name: "moz_gated_norm",
        sources: &[GATED_NORM_CU],
        arch: None,
    },
    Module {
        name: "moz_adamw",
        sources: &[ADAMW_CU],
        arch: None,
    },
];

/// True when `dev` runs the tensor-core module (compute capability 8.0 or newer).
pub fn has_bf16_mma(dev: &CudaDevice) -> bool {
    static CAP: OnceLock<bool> = OnceLock::new();
    *CAP.get_or_init(|| {
        dev.cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8)
    })
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Tests set this so every output buffer of the kernels starts as NaN: an element a kernel
/// forgets to write then fails the comparison instead of passing as a stale zero.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::SeqCst);
}

/// PTX of a module, compiled on first use (NVRTC errors carry the compiler log).
fn ptx(module: &str) -> Result<&'static str> {
    static PTX: OnceLock<Vec<(String, std::result::Result<String, String>)>> = OnceLock::new();
    let all = PTX.get_or_init(|| {
        MODULES
            .iter()
            .map(|m| {
                let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
                    name: Some(format!("{}.cu", m.name)),
                    arch: m.arch,
                    ..Default::default()
                };
                let src = format!("{COMMON_CUH}\n{}", m.sources.join("\n"));
                let r = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(src, opts)
                    .map(|p| p.to_src())
                    .map_err(|e| format!("{e:?}"));
                (m.name.to_string(), r)
            })
            .collect()
    });
    let (_, r) = all
        .iter()
        .find(|(n, _)| n == module)
        .ok_or_else(|| candle_core::Error::Msg(format!("no kernel module {module}")))?;
    r.as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("NVRTC compiling {module}.cu: {e}")))
}

/// A kernel of one of the modules, on candle's stream of `dev`.
pub fn func(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module, ptx(module)?)?
        .into_cuda_function())
}

/// A kernel that takes `smem_bytes` of dynamic shared memory (the driver caps it at 48 KiB
/// unless the function's limit is raised first).
pub fn func_with_smem(
    dev: &CudaDevice,
    module: &str,
    name: &str,
    smem_bytes: u32,
) -> Result<CudaFunction> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
    let f = func(dev, module, name)?;
    if smem_bytes > 48 * 1024 {
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_bytes as i32,
        )
        .w()?;
    }
    Ok(f)
}

/// Launches kernel `$name` of `$module` on candle's stream of `$dev` with `$cfg` and the
/// arguments in the kernel's order; evaluates to `Result<()>`. The launch is unsafe, so the
/// macro must be used inside an `unsafe` block whose SAFETY comment vouches for the argument
/// types, their order and the buffer sizes.
macro_rules! launch {
    ($dev:expr, $module:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        match $crate::ops::cuda::func($dev, $module, $name) {
            Err(e) => Err(e),
            Ok(f) => {
                use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
                let stream = $dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                $( b.arg($arg); )*
                $crate::ops::cuda::launched(b.launch($cfg))
            }
        }
    }};
}
pub(crate) use launch;

/// A launch's driver result as a candle error.
pub fn launched<T>(
    r: std::result::Result<T, candle_core::cuda_backend::cudarc::driver::DriverError>,
) -> Result<()> {
    r.map(|_| ()).w()
}

/// True unless the environment variable `var` is set (the MOZ_LAB_COMPOSED_* switches that
/// put composed candle ops back for comparisons).
pub fn kernel_enabled(var: &str) -> bool {
    std::env::var_os(var).is_none()
}

/// A 1-D launch of `n` threads in blocks of `block`; an error past the grid's 2^31 - 1 blocks
/// (a silent wrap would leave elements unwritten).
pub fn grid(n: usize, block: u32) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(block as usize).max(1);
    if blocks > i32::MAX as usize {
        candle_core::bail!("kernel launch of {n} threads exceeds the GPU's grid limit");
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// An output buffer of `len` elements whose every element the kernels write (NaN-filled first
/// when poisoning is on).
pub fn output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: callers launch kernels that write every element before anything reads it.
    let mut buf = unsafe { dev.alloc::<T>(len.max(1))? };
    if POISON.load(Ordering::SeqCst) {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let f = func(dev, "moz_ssd_scan", "moz_fill_ff")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut buf);
        let n = bytes as i64;
        b.arg(&n);
        // SAFETY: the kernel writes n bytes of a buffer of n bytes.
        unsafe { b.launch(grid(bytes, 256)?).w()? };
    }
    Ok(buf)
}

/// The contiguous elements of a storage described by `layout`.
pub fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// True when the kernels support this dtype (compute is f32 inside; storage f32 or bf16).
pub fn supported_dtype(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16)
}

/// Runs `$body` with `$t` the storage type of a kernel dtype (f32 or bf16); an error naming `$op`
/// for any other dtype (the GPU counterpart of `ops::for_float!`).
macro_rules! for_kernel_dtype {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}
pub(crate) use for_kernel_dtype;

/// The kernel-name suffix of a storage dtype (`f32`, `bf16`); an error naming `op` otherwise.
pub fn dtype_suffix(dt: DType, op: &str) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        d => candle_core::bail!("{op}: unsupported dtype {d:?} on the GPU"),
    })
}

/// A tensor (no gradient history) over a kernel's output buffer.
pub fn tensor<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    s: CudaSlice<T>,
    dev: &CudaDevice,
    shape: &candle_core::Shape,
) -> candle_core::Tensor {
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    candle_core::Tensor::from_storage(
        storage,
        shape.clone(),
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// An f32 accumulator of `len` zeros (kernels add partial sums into it with atomics).
pub fn zeros_f32(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    dev.alloc_zeros::<f32>(len.max(1))
}

#[cfg(test)]
mod tests {
    /// Every kernels/*.cu compiles under NVRTC with the shared header prepended. Needs libnvrtc
    /// and a loadable libcuda.so.1 (the link stub will do), not a GPU: `cargo test --release
    /// --features cuda --lib ops::cuda` with both on LD_LIBRARY_PATH.
    #[test]
    fn every_kernel_module_compiles_with_nvrtc() {
        for m in super::MODULES {
            let name = m.name;
            let ptx = super::ptx(name).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(".entry"), "{name}: no kernels in the PTX");
        }
    }
}
