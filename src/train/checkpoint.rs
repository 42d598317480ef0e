//! Checkpoints: `model.safetensors` (mamba_ssm / HF Mamba2 names), `config.json`,
//! `optimizer.safetensors` (AdamW moments), `state.json` and, for pruned runs,
//! `masks.safetensors`. Every file is written to a
//! temporary name and renamed, and the directory itself is swapped in whole, so a crash never
//! leaves a half-written checkpoint.
use crate::model::ModelConfig;
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens: u64,
    pub seed: u64,
    pub elapsed_s: f64,
}

/// Writes bytes to `path` atomically (temp file in the same directory + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub struct CheckpointFiles<'a> {
    pub config: &'a ModelConfig,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainerState,
    /// Pruning masks (`masks.safetensors`, `{param}.prune_mask` u8, 1 kept); empty: no file.
    pub masks: HashMap<String, Tensor>,
}

/// Saves into `dir` by writing `dir.tmp/` completely and then swapping it in.
pub fn save(dir: &Path, files: CheckpointFiles) -> Result<()> {
    let staging = tmp_path(dir);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    save_tensors(&files.model, &staging.join("model.safetensors"))?;
    save_tensors(&files.optimizer, &staging.join("optimizer.safetensors"))?;
    if !files.masks.is_empty() {
        save_tensors(&files.masks, &staging.join(crate::prune::mask::MASKS_FILE))?;
    }
    write_atomic(
        &staging.join("config.json"),
        serde_json::to_string_pretty(files.config)?.as_bytes(),
    )?;
    write_atomic(
        &staging.join("state.json"),
        serde_json::to_string_pretty(&files.state)?.as_bytes(),
    )?;
    // Swap: old -> .old, staging -> dir, remove .old. A crash in between leaves either the
    // old or the new checkpoint complete under a known name.
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&staging, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Finds the checkpoint directory given either it or a run directory containing `checkpoint/`.
pub fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if path.join("model.safetensors").exists() {
        return Ok(path.to_path_buf());
    }
    let inner = path.join("checkpoint");
    if inner.join("model.safetensors").exists() {
        return Ok(inner);
    }
    anyhow::bail!(
        "{}: no model.safetensors here or in {}/checkpoint",
        path.display(),
        path.display()
    )
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}
