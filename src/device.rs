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
    let d = Device::new_cuda(ordinal)?;
    // candle runs every op of a device on one stream, and so do the project's kernels: the
    // per-buffer CUDA events that guard cross-stream use only add two driver calls per launch.
    // MOZ_LAB_CUDA_EVENTS=1 keeps them (for comparisons).
    if std::env::var_os("MOZ_LAB_CUDA_EVENTS").is_none() {
        if let Device::Cuda(c) = &d {
            // SAFETY: single stream per device (see above); tensors are created after this.
            unsafe { c.disable_event_tracking() };
        }
    }
    map.insert(ordinal, d.clone());
    Ok(d)
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

pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}
