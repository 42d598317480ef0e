//! Byte-level data sources: a text corpus and synthetic recall tasks.
//!
//! Every source is stateless: a training batch is a pure function of
//! `(seed, step, batch_size, seq_len)` so that resumed runs see exactly the batches an
//! uninterrupted run sees, and the validation set is a pure function of
//! `(n_batches, batch_size, seq_len)`.
//!
//! Token ids are bytes (`< 256`). The synthetic tasks reserve the ids below [`NUM_SPECIAL`]:
//! [`PAD`] (blank / noise), [`DELIM`] (selective-copy marker) and [`TRIGGER`]
//! (induction-heads trigger). Their content tokens start at [`NUM_SPECIAL`].

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub mod synthetic;
pub mod text;

pub use synthetic::{InductionHeads, Mqar, SelectiveCopy, SyntheticSource, SyntheticTask};
pub use text::TextSource;

/// Blank / noise token of selective copying (never a content token).
pub const PAD: u32 = 0;
/// Delimiter / marker token of selective copying: the answer positions hold it as input.
pub const DELIM: u32 = 1;
/// Trigger token of induction heads.
pub const TRIGGER: u32 = 2;
/// Number of reserved ids; synthetic content tokens are `NUM_SPECIAL..`.
pub const NUM_SPECIAL: u32 = 3;
/// Size of the byte vocabulary; every token id is below this.
pub const BYTE_VOCAB: usize = 256;

/// One batch of byte-level examples, row-major [batch_size, seq_len].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids < 256.
    pub inputs: Vec<u32>,
    /// Next-token targets, < 256.
    pub targets: Vec<u32>,
    /// 1.0 where the loss counts, 0.0 elsewhere.
    pub mask: Vec<f32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    pub(crate) fn with_capacity(batch_size: usize, seq_len: usize) -> Self {
        let n = batch_size * seq_len;
        Batch {
            inputs: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            mask: Vec::with_capacity(n),
            batch_size,
            seq_len,
        }
    }

    /// Number of positions where the loss counts.
    pub fn num_masked(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// The `[data]` table of a spec. Internally tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataConfig {
    /// Byte-level language modelling on a text file (or the embedded tinyshakespeare).
    Text {
        /// Corpus file; relative paths resolve against the project root. None = embedded
        /// tinyshakespeare.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
        /// Fraction of the bytes (taken from the end) used for validation, in (0, 0.5].
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
    /// Multi-query associative recall (Zoology). See [`synthetic::Mqar`].
    Mqar {
        #[serde(default = "default_num_kv_pairs")]
        num_kv_pairs: usize,
        /// Total id range: ids `NUM_SPECIAL..vocab_size` are split into key / value halves.
        #[serde(default = "default_mqar_vocab")]
        vocab_size: usize,
        /// Power-law exponent of the query-gap distribution (1.0 = uniform).
        #[serde(default = "default_power_a")]
        power_a: f64,
    },
    /// Selective copying (Mamba). See [`synthetic::SelectiveCopy`].
    SelectiveCopy {
        /// Number of content tokens to memorize and reproduce.
        #[serde(default = "default_num_tokens")]
        num_tokens: usize,
        /// Number of distinct content tokens.
        #[serde(default = "default_small_vocab")]
        vocab_size: usize,
    },
    /// Induction heads (Mamba). See [`synthetic::InductionHeads`].
    InductionHeads {
        /// Number of distinct content tokens.
        #[serde(default = "default_small_vocab")]
        vocab_size: usize,
    },
}

fn default_val_fraction() -> f64 {
    0.1
}
fn default_num_kv_pairs() -> usize {
    8
}
fn default_mqar_vocab() -> usize {
    256
}
fn default_power_a() -> f64 {
    0.01
}
fn default_num_tokens() -> usize {
    16
}
fn default_small_vocab() -> usize {
    16
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig::Text {
            path: None,
            val_fraction: default_val_fraction(),
        }
    }
}

impl DataConfig {
    /// The `kind` tag as written in TOML.
    pub fn kind(&self) -> &'static str {
        match self {
            DataConfig::Text { .. } => "text",
            DataConfig::Mqar { .. } => "mqar",
            DataConfig::SelectiveCopy { .. } => "selective-copy",
            DataConfig::InductionHeads { .. } => "induction-heads",
        }
    }
}

pub trait DataSource: Send + Sync {
    /// Deterministic: a pure function of (seed, step, batch_size, seq_len).
    fn train_batch(&self, seed: u64, step: u64, batch_size: usize, seq_len: usize) -> Batch;
    /// The fixed validation set: `n_batches` batches, identical on every call and independent
    /// of the training seed. Batch `i` does not depend on `n_batches`.
    fn val_batches(&self, n_batches: usize, batch_size: usize, seq_len: usize) -> Vec<Batch>;
    /// Short human-readable description.
    fn describe(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read corpus file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corpus {0} is empty")]
    EmptyCorpus(String),
    #[error(
        "seq_len {seq_len} is too large for the {split} split of {corpus}: windows need {} bytes \
         but the split has only {available}",
        seq_len + 1
    )]
    SeqLenTooLarge {
        corpus: String,
        split: &'static str,
        seq_len: usize,
        available: usize,
    },
    #[error("invalid data setting for kind = \"{kind}\": `{field}` {message}")]
    InvalidParam {
        kind: &'static str,
        field: &'static str,
        message: String,
    },
}

/// Validate `cfg` for sequences of `seq_len` tokens and build the source. Relative corpus
/// paths are joined onto `base_dir`.
pub fn build(
    cfg: &DataConfig,
    base_dir: &Path,
    seq_len: usize,
) -> Result<Box<dyn DataSource>, DataError> {
    if seq_len == 0 {
        return Err(DataError::InvalidParam {
            kind: cfg.kind(),
            field: "seq_len",
            message: "must be at least 1".into(),
        });
    }
    match cfg {
        DataConfig::Text { path, val_fraction } => {
            let src = match path {
                None => TextSource::embedded(*val_fraction)?,
                Some(p) => TextSource::from_file(&base_dir.join(p), *val_fraction)?,
            };
            src.check_seq_len(seq_len)?;
            Ok(Box::new(src))
        }
        DataConfig::Mqar {
            num_kv_pairs,
            vocab_size,
            power_a,
        } => boxed(
            Mqar {
                num_kv_pairs: *num_kv_pairs,
                vocab_size: *vocab_size,
                power_a: *power_a,
            },
            seq_len,
        ),
        DataConfig::SelectiveCopy {
            num_tokens,
            vocab_size,
        } => boxed(
            SelectiveCopy {
                num_tokens: *num_tokens,
                vocab_size: *vocab_size,
            },
            seq_len,
        ),
        DataConfig::InductionHeads { vocab_size } => boxed(
            InductionHeads {
                vocab_size: *vocab_size,
            },
            seq_len,
        ),
    }
}

fn boxed<T: SyntheticTask + 'static>(
    task: T,
    seq_len: usize,
) -> Result<Box<dyn DataSource>, DataError> {
    task.check(seq_len)?;
    Ok(Box::new(SyntheticSource::new(task)))
}

/// (correct, total) over the masked positions of `batch`; `predictions` is row-major like
/// `batch.targets`.
pub fn accuracy_counts(batch: &Batch, predictions: &[u32]) -> (usize, usize) {
    assert_eq!(
        predictions.len(),
        batch.targets.len(),
        "accuracy_counts: {} predictions for a batch of {} positions",
        predictions.len(),
        batch.targets.len()
    );
    let mut correct = 0;
    let mut total = 0;
    for ((&p, &t), &m) in predictions.iter().zip(&batch.targets).zip(&batch.mask) {
        if m > 0.0 {
            total += 1;
            correct += usize::from(p == t);
        }
    }
    (correct, total)
}

/// Seed used for every validation stream; the stream tag keeps it apart from training streams
/// even when a run uses the same numeric seed.
const VAL_SEED: u64 = 0x5EED_F00D_7A11_DA7A;
const TRAIN_STREAM: u64 = 0;
const VAL_STREAM: u64 = 1;

/// A fresh RNG keyed by the full (seed, step, stream) triple. ChaCha is a PRF of its key, so
/// distinct triples give independent streams with no hash collisions to worry about.
fn keyed_rng(seed: u64, step: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(&stream.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

pub(crate) fn train_rng(seed: u64, step: u64) -> ChaCha8Rng {
    keyed_rng(seed, step, TRAIN_STREAM)
}

pub(crate) fn val_rng(batch_index: u64) -> ChaCha8Rng {
    keyed_rng(VAL_SEED, batch_index, VAL_STREAM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_embedded_text() {
        assert_eq!(
            DataConfig::default(),
            DataConfig::Text {
                path: None,
                val_fraction: 0.1
            }
        );
        let src = build(&DataConfig::default(), Path::new("."), 128).unwrap();
        assert!(src.describe().contains("tinyshakespeare"));
    }

    #[test]
    fn accuracy_counts_only_masked() {
        let batch = Batch {
            inputs: vec![0; 4],
            targets: vec![5, 6, 7, 8],
            mask: vec![1.0, 0.0, 1.0, 1.0],
            batch_size: 1,
            seq_len: 4,
        };
        assert_eq!(accuracy_counts(&batch, &[5, 0, 0, 8]), (2, 3));
        assert_eq!(batch.num_masked(), 3);
    }

    #[test]
    fn zero_seq_len_rejected() {
        let err = build(&DataConfig::default(), Path::new("."), 0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("seq_len"), "{err}");
    }

    #[test]
    fn rng_streams_differ() {
        use rand::RngCore;
        let a = train_rng(1, 2).next_u64();
        assert_eq!(a, train_rng(1, 2).next_u64());
        assert_ne!(a, train_rng(2, 1).next_u64());
        assert_ne!(a, train_rng(1, 3).next_u64());
        assert_ne!(
            keyed_rng(VAL_SEED, 0, TRAIN_STREAM).next_u64(),
            val_rng(0).next_u64()
        );
    }
}
