//! Byte-level text corpus: the last `val_fraction` of the bytes are validation.

use std::borrow::Cow;
use std::path::Path;

use rand::Rng;

use super::{train_rng, Batch, DataError, DataSource};

const EMBEDDED: &str = include_str!("../../data/tinyshakespeare.txt");
const EMBEDDED_NAME: &str = "tinyshakespeare (embedded)";

#[derive(Debug, Clone)]
pub struct TextSource {
    name: String,
    bytes: Cow<'static, [u8]>,
    /// Bytes `[0, split)` are train, `[split, len)` are validation.
    split: usize,
}

impl TextSource {
    /// The embedded tinyshakespeare corpus.
    pub fn embedded(val_fraction: f64) -> Result<Self, DataError> {
        Self::new(
            EMBEDDED_NAME.into(),
            Cow::Borrowed(EMBEDDED.as_bytes()),
            val_fraction,
        )
    }

    pub fn from_file(path: &Path, val_fraction: f64) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(path.display().to_string(), Cow::Owned(bytes), val_fraction)
    }

    /// In-memory corpus (used by tests and tools).
    pub fn from_bytes(
        name: impl Into<String>,
        bytes: Vec<u8>,
        val_fraction: f64,
    ) -> Result<Self, DataError> {
        Self::new(name.into(), Cow::Owned(bytes), val_fraction)
    }

    fn new(name: String, bytes: Cow<'static, [u8]>, val_fraction: f64) -> Result<Self, DataError> {
        // `!(x > 0.0)` also rejects NaN.
        if !(val_fraction > 0.0 && val_fraction <= 0.5) {
            return Err(DataError::InvalidParam {
                kind: "text",
                field: "val_fraction",
                message: format!("must be in (0, 0.5], got {val_fraction}"),
            });
        }
        if bytes.is_empty() {
            return Err(DataError::EmptyCorpus(name));
        }
        // Round the validation share up so a tiny non-zero fraction still gets some bytes.
        let val_len = ((bytes.len() as f64 * val_fraction).ceil() as usize).min(bytes.len());
        let split = bytes.len() - val_len;
        Ok(TextSource { name, bytes, split })
    }

    pub fn train(&self) -> &[u8] {
        &self.bytes[..self.split]
    }

    pub fn val(&self) -> &[u8] {
        &self.bytes[self.split..]
    }

    /// Both splits must hold at least one window of `seq_len + 1` bytes.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<(), DataError> {
        for (split, len) in [("train", self.train().len()), ("val", self.val().len())] {
            if seq_len + 1 > len {
                return Err(DataError::SeqLenTooLarge {
                    corpus: self.name.clone(),
                    split,
                    seq_len,
                    available: len,
                });
            }
        }
        Ok(())
    }

    fn expect_fits(&self, seq_len: usize) {
        if let Err(e) = self.check_seq_len(seq_len) {
            panic!("{e}");
        }
    }
}

fn push_window(batch: &mut Batch, window: &[u8]) {
    let l = window.len() - 1;
    batch
        .inputs
        .extend(window[..l].iter().map(|&b| u32::from(b)));
    batch
        .targets
        .extend(window[1..].iter().map(|&b| u32::from(b)));
    batch.mask.extend(std::iter::repeat_n(1.0, l));
}

impl DataSource for TextSource {
    fn train_batch(&self, seed: u64, step: u64, batch_size: usize, seq_len: usize) -> Batch {
        self.expect_fits(seq_len);
        let train = self.train();
        let max_start = train.len() - (seq_len + 1);
        let mut rng = train_rng(seed, step);
        let mut batch = Batch::with_capacity(batch_size, seq_len);
        for _ in 0..batch_size {
            let start = rng.gen_range(0..=max_start);
            push_window(&mut batch, &train[start..start + seq_len + 1]);
        }
        batch
    }

    fn val_batches(&self, n_batches: usize, batch_size: usize, seq_len: usize) -> Vec<Batch> {
        self.expect_fits(seq_len);
        let val = self.val();
        // Windows start every seq_len bytes (inputs don't overlap); each needs one extra byte
        // for the last target.
        let n_windows = (val.len() - 1) / seq_len;
        (0..n_batches)
            .map(|b| {
                let mut batch = Batch::with_capacity(batch_size, seq_len);
                for r in 0..batch_size {
                    let start = ((b * batch_size + r) % n_windows) * seq_len;
                    push_window(&mut batch, &val[start..start + seq_len + 1]);
                }
                batch
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "text: {}, {} train / {} val bytes",
            self.name,
            self.train().len(),
            self.val().len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{build, DataConfig};
    use super::*;

    fn check_shift(batch: &Batch) {
        let (b, l) = (batch.batch_size, batch.seq_len);
        assert_eq!(batch.inputs.len(), b * l);
        assert_eq!(batch.targets.len(), b * l);
        assert_eq!(batch.mask.len(), b * l);
        for r in 0..b {
            let row = r * l;
            for t in 0..l - 1 {
                assert_eq!(batch.targets[row + t], batch.inputs[row + t + 1]);
            }
        }
        assert!(batch.mask.iter().all(|&m| m == 1.0));
        assert!(batch.inputs.iter().chain(&batch.targets).all(|&t| t < 256));
    }

    #[test]
    fn embedded_split_sizes() {
        let src = TextSource::embedded(0.1).unwrap();
        assert_eq!(src.train().len() + src.val().len(), EMBEDDED.len());
        assert_eq!(
            src.val().len(),
            (EMBEDDED.len() as f64 * 0.1).ceil() as usize
        );
        assert_eq!(
            src.describe(),
            "text: tinyshakespeare (embedded), 1003854 train / 111540 val bytes"
        );
    }

    #[test]
    fn train_deterministic_and_shifted() {
        let src = TextSource::embedded(0.1).unwrap();
        let a = src.train_batch(7, 3, 4, 64);
        assert_eq!(a, src.train_batch(7, 3, 4, 64));
        assert_ne!(a, src.train_batch(7, 4, 4, 64));
        assert_ne!(a, src.train_batch(8, 3, 4, 64));
        check_shift(&a);
        // Windows come from the train split: each row is a substring of it.
        let train = src.train();
        for r in 0..4 {
            let row: Vec<u8> = a.inputs[r * 64..(r + 1) * 64]
                .iter()
                .map(|&t| t as u8)
                .collect();
            assert!(train.windows(64).any(|w| w == row.as_slice()));
        }
    }

    #[test]
    fn val_fixed_consecutive_and_wrapping() {
        // val split = last 20 bytes: "ABCDEFGHIJKLMNOPQRST".
        let mut bytes = vec![b'x'; 80];
        bytes.extend(b"ABCDEFGHIJKLMNOPQRST");
        let src = TextSource::from_bytes("toy", bytes, 0.2).unwrap();
        assert_eq!(src.val(), b"ABCDEFGHIJKLMNOPQRST");
        let v = src.val_batches(2, 2, 6);
        assert_eq!(v, src.val_batches(2, 2, 6));
        assert_eq!(v[0], src.val_batches(1, 2, 6)[0]);
        let row = |b: &Batch, r: usize| -> String {
            b.inputs[r * 6..(r + 1) * 6]
                .iter()
                .map(|&t| t as u8 as char)
                .collect()
        };
        // (20 - 1) / 6 = 3 windows, then wrap.
        assert_eq!(row(&v[0], 0), "ABCDEF");
        assert_eq!(row(&v[0], 1), "GHIJKL");
        assert_eq!(row(&v[1], 0), "MNOPQR");
        assert_eq!(row(&v[1], 1), "ABCDEF");
        assert_eq!(v[1].targets[..6], [78, 79, 80, 81, 82, 83]); // "NOPQRS"
        for b in &v {
            check_shift(b);
        }
    }

    #[test]
    fn val_independent_of_training() {
        let src = TextSource::embedded(0.1).unwrap();
        let _ = src.train_batch(1, 1, 2, 32);
        let a = src.val_batches(3, 2, 32);
        let _ = src.train_batch(99, 5, 2, 32);
        assert_eq!(a, src.val_batches(3, 2, 32));
        let val = src.val();
        assert_eq!(a[0].inputs[0], u32::from(val[0]));
    }

    #[test]
    fn errors() {
        let dir = Path::new("/nonexistent-dir");
        let cfg = DataConfig::Text {
            path: Some("missing.txt".into()),
            val_fraction: 0.1,
        };
        let err = build(&cfg, dir, 8).err().unwrap();
        assert!(
            err.to_string().contains("/nonexistent-dir/missing.txt"),
            "{err}"
        );

        let err = TextSource::from_bytes("e", vec![], 0.1).err().unwrap();
        assert!(matches!(err, DataError::EmptyCorpus(_)), "{err}");

        for bad in [0.0, 0.6, f64::NAN, -0.1] {
            let cfg = DataConfig::Text {
                path: None,
                val_fraction: bad,
            };
            let err = build(&cfg, dir, 8).err().unwrap();
            assert!(err.to_string().contains("val_fraction"), "{err}");
        }

        let src = TextSource::from_bytes("toy", vec![b'a'; 100], 0.1).unwrap();
        assert!(src.check_seq_len(9).is_ok());
        let err = src.check_seq_len(10).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("val split") && msg.contains("only 10"),
            "{msg}"
        );

        let err = build(&DataConfig::default(), dir, 200_000).err().unwrap();
        assert!(err.to_string().contains("val split"), "{err}");
    }

    #[test]
    fn file_corpus_relative_to_base_dir() {
        let dir = std::env::temp_dir().join(format!("moz-lab-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.txt"), "hello world, hello bytes!".repeat(10)).unwrap();
        let cfg = DataConfig::Text {
            path: Some("c.txt".into()),
            val_fraction: 0.2,
        };
        let src = build(&cfg, &dir, 16).unwrap();
        check_shift(&src.train_batch(0, 0, 3, 16));
        assert!(src.describe().contains("200 train / 50 val"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
