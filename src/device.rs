//! Device selection. One `Device` per GPU, created once and shared: every
//! `Device::new_cuda(i)` is a new device id whose tensors do not mix with another's.
use anyhow::{bail, Result};
use candle_core::{DType, Device};

pub fn dtype_of(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f64" => DType::F64,
        "bf16" => DType::BF16,
        _ => bail!("unknown dtype {s:?}; allowed: f32, f64, bf16"),
    })
}

/// True when this binary was built with the `cuda` feature and a GPU is present.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        candle_core::utils::cuda_is_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap();
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    // One stream of its own for the device, shared by every thread: candle's default is the
    // per-thread default stream, so tensors made on one thread (a test's, the TUI's) and used
    // on a job's thread would live on two streams with no ordering between them.
    // MOZ_LAB_CUDA_PER_THREAD_STREAM=1 keeps candle's default (for comparisons).
    let d = if std::env::var_os("MOZ_LAB_CUDA_PER_THREAD_STREAM").is_some() {
        Device::new_cuda(ordinal)?
    } else {
        Device::new_cuda_with_stream(ordinal)?
    };
    // Every op of a device runs on that one stream, and so do the project's kernels: the
    // per-buffer CUDA events that guard cross-stream use only add two driver calls per launch.
    // MOZ_LAB_CUDA_EVENTS=1 keeps them (for comparisons).
    if std::env::var_os("MOZ_LAB_CUDA_EVENTS").is_none() {
        if let Device::Cuda(c) = &d {
            // SAFETY: single stream per device (see above); tensors are created after this.
            unsafe { c.disable_event_tracking() };
        }
    }
    if std::env::var_os("MOZ_LAB_CUDA_POOL_RELEASE").is_none() {
        if let Device::Cuda(c) = &d {
            // A GPU without stream-ordered pools allocates synchronously: nothing to keep.
            if let Err(e) = keep_pool_memory(c) {
                crate::trace(|| format!("cuda:{ordinal}: pool left at CUDA's default ({e})"));
            }
        }
    }
    map.insert(ordinal, d.clone());
    Ok(d)
}

/// The default memory pool of a CUDA device (the one candle's stream-ordered allocations use).
#[cfg(feature = "cuda")]
fn default_pool(
    c: &candle_core::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = c.cuda_stream().context().clone();
    ctx.bind_to_thread()?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: a valid device handle and an out pointer to one pool handle.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuDeviceGetDefaultMemPool: {r:?}");
    }
    Ok(pool)
}

/// Lets the pool keep the memory its freed blocks hold across synchronisations (CUDA's default
/// release threshold, 0, hands it all back to the driver at every sync, and a training step
/// syncs at least once to read its loss, so each step re-maps its buffers); `release_freed`
/// trims it at run boundaries. MOZ_LAB_CUDA_POOL_RELEASE=1 keeps CUDA's default.
#[cfg(feature = "cuda")]
fn keep_pool_memory(c: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(c)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a u64.
    let r = unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("setting the CUDA pool's release threshold: {r:?}");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    bail!("device cuda:{ordinal} requested, but this binary was built without the `cuda` feature (cargo build --release --features cuda)")
}

/// Resolves `cpu`, `auto`, `cuda` or `cuda:N`.
pub fn resolve(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cuda_available() {
                cuda_device(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => cuda_device(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda_device(n),
            None => bail!("unknown device {s:?}; allowed: cpu, auto, cuda, cuda:N"),
        },
    }
}

/// Bytes of GPU memory in use on `d`'s GPU (total - free, as the driver reports it: this process's
/// tensors plus candle's cached buffers and any other process on that GPU); None on the CPU.
/// The lab runs one job per GPU, so on a GPU run this is that run's footprint.
pub fn gpu_memory_used(d: &Device) -> Option<u64> {
    gpu_memory(d).map(|(free, total)| total.saturating_sub(free))
}

/// (free, total) bytes of `d`'s GPU as the driver reports them; None on the CPU.
pub fn gpu_memory(d: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    {
        if let Device::Cuda(c) = d {
            let (free, total) = c.cuda_stream().context().mem_get_info().ok()?;
            return Some((free as u64, total as u64));
        }
    }
    let _ = d;
    None
}

/// Returns the memory freed on `d`'s GPU to the driver: a synchronisation, then the pool
/// trimmed to the blocks in use. Nothing on the CPU.
pub fn release_freed(d: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = d {
        d.synchronize()?;
        // Without a pool (see keep_pool_memory) the synchronisation is all there is to do.
        if let Ok(pool) = default_pool(c) {
            // SAFETY: a pool handle from the driver; trimming keeps the blocks in use.
            let r =
                unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) };
            if r != candle_core::cuda_backend::cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                bail!("trimming the CUDA memory pool: {r:?}");
            }
        }
    }
    let _ = d;
    Ok(())
}

pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}
