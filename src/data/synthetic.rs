//! Synthetic recall tasks. Content tokens start at [`NUM_SPECIAL`]; ids below it are reserved
//! (see the constants in the parent module). Targets at unmasked positions are the next input
//! token (so they stay valid ids) but carry no loss.

use rand::seq::index;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{
    train_rng, val_rng, Batch, DataError, DataSource, BYTE_VOCAB, DELIM, NUM_SPECIAL, PAD, TRIGGER,
};

const NS: usize = NUM_SPECIAL as usize;

/// A task generating one row at a time from a caller-provided RNG.
pub trait SyntheticTask: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> &'static str;
    /// Reject settings that cannot produce rows of `seq_len` tokens.
    fn check(&self, seq_len: usize) -> Result<(), DataError>;
    /// Append one row of `seq_len` inputs / targets / mask values.
    fn gen_row(&self, rng: &mut ChaCha8Rng, seq_len: usize, batch: &mut Batch);
    fn describe(&self) -> String;
}

fn invalid(kind: &'static str, field: &'static str, message: String) -> DataError {
    DataError::InvalidParam {
        kind,
        field,
        message,
    }
}

/// Number of content tokens available after the reserved ids.
const MAX_CONTENT: usize = BYTE_VOCAB - NS;

/// Push `seq[..L]` as inputs and `seq[1..]` as targets, with the loss at `masked` positions.
fn push_shifted(batch: &mut Batch, seq: &[u32], masked: &[usize]) {
    let l = seq.len() - 1;
    batch.inputs.extend_from_slice(&seq[..l]);
    batch.targets.extend_from_slice(&seq[1..]);
    let start = batch.mask.len();
    batch.mask.resize(start + l, 0.0);
    for &p in masked {
        batch.mask[start + p] = 1.0;
    }
}

/// Multi-query associative recall (Arora et al. 2023, Zoology's `multiquery_ar`).
///
/// With `n = num_kv_pairs`, a row of `L` inputs is built from a sequence `s` of `L + 1` tokens:
/// `s[..2n] = k1 v1 k2 v2 ...` (distinct keys from the lower half of `NUM_SPECIAL..vocab_size`,
/// distinct values from the upper half), then a query region of `(L - 2n) / 2` two-token slots
/// filled with random non-special tokens. Each key is queried once: it is written into a slot
/// followed by its value. Slots are drawn without replacement with weight
/// `(g + 1)^(power_a - 1)` as in Zoology (small `power_a` favours early slots), and keys are
/// assigned to slots in random order. Inputs are `s[..L]`, targets `s[1..]`; the mask is 1
/// exactly at the query positions, whose target is the recalled value.
///
/// Unlike Zoology the value also follows the query in the inputs, so targets are a clean shift
/// of the inputs everywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Mqar {
    pub num_kv_pairs: usize,
    pub vocab_size: usize,
    pub power_a: f64,
}

impl Mqar {
    /// (keys, values) id ranges.
    pub fn key_value_ranges(&self) -> (std::ops::Range<u32>, std::ops::Range<u32>) {
        let half = (self.vocab_size - NS) / 2;
        let mid = (NS + half) as u32;
        (NUM_SPECIAL..mid, mid..self.vocab_size as u32)
    }
}

impl SyntheticTask for Mqar {
    fn kind(&self) -> &'static str {
        "mqar"
    }

    fn check(&self, seq_len: usize) -> Result<(), DataError> {
        let n = self.num_kv_pairs;
        if n == 0 {
            return Err(invalid("mqar", "num_kv_pairs", "must be at least 1".into()));
        }
        let min_vocab = NS + 2 * n;
        if self.vocab_size < min_vocab || self.vocab_size > BYTE_VOCAB {
            return Err(invalid(
                "mqar",
                "vocab_size",
                format!(
                    "must be in {min_vocab}..={BYTE_VOCAB} ({NS} reserved ids + {n} distinct keys \
                     + {n} distinct values for num_kv_pairs = {n}), got {}",
                    self.vocab_size
                ),
            ));
        }
        if !(self.power_a.is_finite() && self.power_a > 0.0) {
            return Err(invalid(
                "mqar",
                "power_a",
                format!("must be a finite number > 0, got {}", self.power_a),
            ));
        }
        // Context of 2n tokens plus at least n query slots of 2 tokens.
        if seq_len < 4 * n {
            return Err(invalid(
                "mqar",
                "num_kv_pairs",
                format!(
                    "= {n} needs seq_len >= 4 * num_kv_pairs = {}, got seq_len = {seq_len}",
                    4 * n
                ),
            ));
        }
        Ok(())
    }

    fn gen_row(&self, rng: &mut ChaCha8Rng, seq_len: usize, batch: &mut Batch) {
        let n = self.num_kv_pairs;
        let (keys_r, vals_r) = self.key_value_ranges();
        let keys = index::sample(rng, keys_r.len(), n);
        let vals = index::sample(rng, vals_r.len(), n);
        let mut seq = Vec::with_capacity(seq_len + 1);
        for (k, v) in keys.iter().zip(vals.iter()) {
            seq.push(keys_r.start + k as u32);
            seq.push(vals_r.start + v as u32);
        }
        let ctx = 2 * n;
        while seq.len() < seq_len + 1 {
            seq.push(rng.gen_range(NUM_SPECIAL..self.vocab_size as u32));
        }

        // Weighted sampling of n distinct slots, sequentially like numpy's choice(replace=False).
        let space = (seq_len - ctx) / 2;
        let mut w: Vec<f64> = (1..=space)
            .map(|g| (g as f64).powf(self.power_a - 1.0))
            .collect();
        let order = index::sample(rng, n, n);
        let mut masked = Vec::with_capacity(n);
        for pair in order.iter() {
            let total: f64 = w.iter().sum();
            let mut u = rng.gen::<f64>() * total;
            // Fall back to the last available slot if rounding runs past the end.
            let mut slot = w.iter().rposition(|&x| x > 0.0).expect("enough slots");
            for (g, &x) in w.iter().enumerate() {
                if x > 0.0 && u < x {
                    slot = g;
                    break;
                }
                u -= x;
            }
            w[slot] = 0.0;
            let q = ctx + 2 * slot;
            seq[q] = seq[2 * pair];
            seq[q + 1] = seq[2 * pair + 1];
            masked.push(q);
        }
        masked.sort_unstable();
        push_shifted(batch, &seq, &masked);
    }

    fn describe(&self) -> String {
        let (k, v) = self.key_value_ranges();
        format!(
            "mqar: {} kv pairs, keys {}..{}, values {}..{}, power_a {}",
            self.num_kv_pairs, k.start, k.end, v.start, v.end, self.power_a
        )
    }
}

/// Selective copying (Gu & Dao 2023, Mamba §3.1).
///
/// A row of `L` inputs: the first `L - num_tokens` positions are [`PAD`] (blank) except for
/// `num_tokens` content tokens (ids `NUM_SPECIAL..NUM_SPECIAL + vocab_size`, drawn with
/// replacement) at random distinct positions; the last `num_tokens` positions are [`DELIM`]
/// markers. The target at the `j`-th marker is the `j`-th content token (no teacher forcing:
/// the model never sees its own answers), and the mask is 1 only there. Elsewhere the target is
/// the next input token.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectiveCopy {
    pub num_tokens: usize,
    pub vocab_size: usize,
}

impl SyntheticTask for SelectiveCopy {
    fn kind(&self) -> &'static str {
        "selective-copy"
    }

    fn check(&self, seq_len: usize) -> Result<(), DataError> {
        if self.vocab_size == 0 || self.vocab_size > MAX_CONTENT {
            return Err(invalid(
                "selective-copy",
                "vocab_size",
                format!(
                    "(number of content tokens) must be in 1..={MAX_CONTENT}, got {}",
                    self.vocab_size
                ),
            ));
        }
        let m = self.num_tokens;
        if m == 0 {
            return Err(invalid(
                "selective-copy",
                "num_tokens",
                "must be at least 1".into(),
            ));
        }
        if seq_len < 2 * m {
            return Err(invalid(
                "selective-copy",
                "num_tokens",
                format!(
                    "= {m} needs seq_len >= 2 * num_tokens = {} ({m} to scatter + {m} markers), \
                     got seq_len = {seq_len}",
                    2 * m
                ),
            ));
        }
        Ok(())
    }

    fn gen_row(&self, rng: &mut ChaCha8Rng, seq_len: usize, batch: &mut Batch) {
        let m = self.num_tokens;
        let region = seq_len - m;
        let mut positions = index::sample(rng, region, m).into_vec();
        positions.sort_unstable();
        let mut inputs = vec![PAD; seq_len];
        let mut answers = Vec::with_capacity(m);
        for &p in &positions {
            let tok = NUM_SPECIAL + rng.gen_range(0..self.vocab_size as u32);
            inputs[p] = tok;
            answers.push(tok);
        }
        inputs[region..].fill(DELIM);
        let start = batch.targets.len();
        batch.targets.extend_from_slice(&inputs[1..region]);
        batch.targets.push(DELIM);
        batch.targets.extend_from_slice(&answers);
        debug_assert_eq!(batch.targets.len() - start, seq_len);
        batch.inputs.extend_from_slice(&inputs);
        batch.mask.extend(std::iter::repeat_n(0.0, region));
        batch.mask.extend(std::iter::repeat_n(1.0, m));
    }

    fn describe(&self) -> String {
        format!(
            "selective-copy: {} tokens to copy, {} content tokens (ids {}..{})",
            self.num_tokens,
            self.vocab_size,
            NUM_SPECIAL,
            NS + self.vocab_size
        )
    }
}

/// Induction heads (Mamba §4.1 / Olsson et al.).
///
/// A row of `L` inputs is built from `s` of `L + 1` random content tokens (ids
/// `NUM_SPECIAL..NUM_SPECIAL + vocab_size`). [`TRIGGER`] is placed once at a random position
/// `p < L/2 - 1` with a random content token `X` after it (both in the first half), and again at
/// the last input position `L - 1`; `s[L] = X`. Inputs are `s[..L]`, targets `s[1..]`; the mask
/// is 1 only at position `L - 1`, whose target is `X`.
#[derive(Debug, Clone, PartialEq)]
pub struct InductionHeads {
    pub vocab_size: usize,
}

impl SyntheticTask for InductionHeads {
    fn kind(&self) -> &'static str {
        "induction-heads"
    }

    fn check(&self, seq_len: usize) -> Result<(), DataError> {
        if self.vocab_size == 0 || self.vocab_size > MAX_CONTENT {
            return Err(invalid(
                "induction-heads",
                "vocab_size",
                format!(
                    "(number of content tokens) must be in 1..={MAX_CONTENT}, got {}",
                    self.vocab_size
                ),
            ));
        }
        if seq_len < 4 {
            return Err(invalid(
                "induction-heads",
                "seq_len",
                format!("must be at least 4, got {seq_len}"),
            ));
        }
        Ok(())
    }

    fn gen_row(&self, rng: &mut ChaCha8Rng, seq_len: usize, batch: &mut Batch) {
        let v = self.vocab_size as u32;
        let mut seq: Vec<u32> = (0..=seq_len)
            .map(|_| NUM_SPECIAL + rng.gen_range(0..v))
            .collect();
        let p = rng.gen_range(0..seq_len / 2 - 1);
        seq[p] = TRIGGER;
        seq[seq_len - 1] = TRIGGER;
        seq[seq_len] = seq[p + 1];
        push_shifted(batch, &seq, &[seq_len - 1]);
    }

    fn describe(&self) -> String {
        format!(
            "induction-heads: {} content tokens (ids {}..{}), trigger {}",
            self.vocab_size,
            NUM_SPECIAL,
            NS + self.vocab_size,
            TRIGGER
        )
    }
}

/// Wraps a task into a [`DataSource`]: one fresh RNG per training (seed, step) and per
/// validation batch index.
#[derive(Debug, Clone)]
pub struct SyntheticSource<T> {
    task: T,
}

impl<T: SyntheticTask> SyntheticSource<T> {
    pub fn new(task: T) -> Self {
        SyntheticSource { task }
    }

    pub fn task(&self) -> &T {
        &self.task
    }

    fn gen_batch(&self, rng: &mut ChaCha8Rng, batch_size: usize, seq_len: usize) -> Batch {
        if let Err(e) = self.task.check(seq_len) {
            panic!("{e}");
        }
        let mut batch = Batch::with_capacity(batch_size, seq_len);
        for _ in 0..batch_size {
            self.task.gen_row(rng, seq_len, &mut batch);
        }
        batch
    }
}

impl<T: SyntheticTask> DataSource for SyntheticSource<T> {
    fn train_batch(&self, seed: u64, step: u64, batch_size: usize, seq_len: usize) -> Batch {
        self.gen_batch(&mut train_rng(seed, step), batch_size, seq_len)
    }

    fn val_batches(&self, n_batches: usize, batch_size: usize, seq_len: usize) -> Vec<Batch> {
        (0..n_batches)
            .map(|i| self.gen_batch(&mut val_rng(i as u64), batch_size, seq_len))
            .collect()
    }

    fn describe(&self) -> String {
        self.task.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{accuracy_counts, build, DataConfig};
    use super::*;

    fn cfgs() -> Vec<DataConfig> {
        vec![
            DataConfig::Mqar {
                num_kv_pairs: 8,
                vocab_size: 256,
                power_a: 0.01,
            },
            DataConfig::SelectiveCopy {
                num_tokens: 16,
                vocab_size: 16,
            },
            DataConfig::InductionHeads { vocab_size: 16 },
        ]
    }

    fn rows(b: &Batch) -> impl Iterator<Item = (&[u32], &[u32], &[f32])> {
        let l = b.seq_len;
        (0..b.batch_size).map(move |r| {
            let s = r * l..(r + 1) * l;
            (&b.inputs[s.clone()], &b.targets[s.clone()], &b.mask[s])
        })
    }

    fn check_shape(b: &Batch, bs: usize, l: usize) {
        assert_eq!((b.batch_size, b.seq_len), (bs, l));
        assert_eq!(b.inputs.len(), bs * l);
        assert_eq!(b.targets.len(), bs * l);
        assert_eq!(b.mask.len(), bs * l);
        assert!(b.inputs.iter().chain(&b.targets).all(|&t| t < 256));
        assert!(b.mask.iter().all(|&m| m == 0.0 || m == 1.0));
    }

    #[test]
    fn deterministic_and_val_independent() {
        for cfg in cfgs() {
            let src = build(&cfg, Path::new("."), 64).unwrap();
            let a = src.train_batch(3, 10, 4, 64);
            check_shape(&a, 4, 64);
            assert_eq!(a, src.train_batch(3, 10, 4, 64), "{cfg:?}");
            assert_ne!(a, src.train_batch(3, 11, 4, 64), "{cfg:?}");
            assert_ne!(a, src.train_batch(4, 10, 4, 64), "{cfg:?}");
            let v = src.val_batches(3, 4, 64);
            assert_eq!(v.len(), 3);
            let _ = src.train_batch(123, 0, 4, 64);
            assert_eq!(v, src.val_batches(3, 4, 64));
            assert_eq!(v[..2], src.val_batches(2, 4, 64)[..]);
            assert_ne!(v[0], v[1]);
            for s in 0..3 {
                assert_ne!(v[0], src.train_batch(s, 0, 4, 64));
            }
        }
    }

    #[test]
    fn mqar_targets_recall_values() {
        let task = Mqar {
            num_kv_pairs: 8,
            vocab_size: 256,
            power_a: 0.01,
        };
        let (kr, vr) = task.key_value_ranges();
        assert_eq!((kr.start, kr.end, vr.start, vr.end), (3, 129, 129, 256));
        let src = SyntheticSource::new(task);
        for step in 0..20 {
            let b = src.train_batch(1, step, 8, 64);
            check_shape(&b, 8, 64);
            for (inp, tgt, mask) in rows(&b) {
                for t in 0..63 {
                    assert_eq!(tgt[t], inp[t + 1]);
                }
                let ctx: Vec<u32> = inp[..16].to_vec();
                let masked: Vec<usize> = (0..64).filter(|&t| mask[t] == 1.0).collect();
                assert_eq!(masked.len(), 8);
                let mut queried = Vec::new();
                for &q in &masked {
                    assert!(q >= 16 && (q - 16) % 2 == 0);
                    let key = inp[q];
                    assert!(kr.contains(&key));
                    // The first earlier occurrence of the key is in the context; its value
                    // follows it.
                    let first = inp[..q].iter().position(|&x| x == key).unwrap();
                    assert!(first < 16 && first % 2 == 0);
                    assert_eq!(tgt[q], inp[first + 1]);
                    assert!(vr.contains(&tgt[q]));
                    queried.push(key);
                }
                queried.sort_unstable();
                let mut keys: Vec<u32> = ctx.iter().step_by(2).copied().collect();
                keys.sort_unstable();
                keys.dedup();
                assert_eq!(keys.len(), 8, "distinct keys");
                assert_eq!(queried, keys, "each key queried once");
                let mut vals: Vec<u32> = ctx.iter().skip(1).step_by(2).copied().collect();
                vals.sort_unstable();
                vals.dedup();
                assert_eq!(vals.len(), 8, "distinct values");
                assert!(inp.iter().all(|&x| x >= NUM_SPECIAL));
            }
            let (c, t) = accuracy_counts(&b, &b.targets);
            assert_eq!((c, t), (64, 64));
        }
    }

    #[test]
    fn mqar_power_law_favours_early_slots() {
        let src = SyntheticSource::new(Mqar {
            num_kv_pairs: 4,
            vocab_size: 64,
            power_a: 0.01,
        });
        let uniform = SyntheticSource::new(Mqar {
            num_kv_pairs: 4,
            vocab_size: 64,
            power_a: 1.0,
        });
        let mean_pos = |s: &SyntheticSource<Mqar>| {
            let b = s.train_batch(0, 0, 256, 256);
            let idx: Vec<usize> = (0..b.mask.len()).filter(|&i| b.mask[i] == 1.0).collect();
            idx.iter().map(|&i| (i % 256) as f64).sum::<f64>() / idx.len() as f64
        };
        let (p, u) = (mean_pos(&src), mean_pos(&uniform));
        assert!(p + 30.0 < u, "power-law mean {p} vs uniform {u}");
    }

    #[test]
    fn mqar_tight_fit() {
        // seq_len == 4n: every slot is a query.
        let src = SyntheticSource::new(Mqar {
            num_kv_pairs: 4,
            vocab_size: 11,
            power_a: 0.5,
        });
        let b = src.train_batch(0, 0, 16, 16);
        check_shape(&b, 16, 16);
        assert_eq!(b.num_masked(), 16 * 4);
        assert!(b.inputs.iter().all(|&x| (3..11).contains(&x)));
    }

    #[test]
    fn selective_copy_outputs_content_in_order() {
        let src = SyntheticSource::new(SelectiveCopy {
            num_tokens: 16,
            vocab_size: 16,
        });
        for step in 0..10 {
            let b = src.train_batch(5, step, 8, 100);
            check_shape(&b, 8, 100);
            for (inp, tgt, mask) in rows(&b) {
                let content: Vec<u32> = inp[..84].iter().copied().filter(|&x| x != PAD).collect();
                assert_eq!(content.len(), 16);
                assert!(content.iter().all(|&x| (3..19).contains(&x)));
                assert!(inp[84..].iter().all(|&x| x == DELIM));
                assert_eq!(tgt[84..], content[..]);
                assert!(mask[..84].iter().all(|&m| m == 0.0));
                assert!(mask[84..].iter().all(|&m| m == 1.0));
            }
        }
    }

    #[test]
    fn induction_heads_target_follows_trigger() {
        let src = SyntheticSource::new(InductionHeads { vocab_size: 16 });
        for step in 0..10 {
            let b = src.train_batch(9, step, 16, 32);
            check_shape(&b, 16, 32);
            for (inp, tgt, mask) in rows(&b) {
                let trig: Vec<usize> = (0..32).filter(|&t| inp[t] == TRIGGER).collect();
                assert_eq!(trig.len(), 2);
                assert!(trig[0] + 1 < 16);
                assert_eq!(trig[1], 31);
                assert_eq!(tgt[31], inp[trig[0] + 1]);
                assert!((3..19).contains(&tgt[31]));
                assert_eq!(mask.iter().filter(|&&m| m == 1.0).count(), 1);
                assert_eq!(mask[31], 1.0);
                for t in 0..31 {
                    assert_eq!(tgt[t], inp[t + 1]);
                }
            }
        }
        // Smallest legal length.
        check_shape(&src.train_batch(0, 0, 4, 4), 4, 4);
    }

    fn err_field(cfg: DataConfig, seq_len: usize) -> &'static str {
        match build(&cfg, Path::new("."), seq_len) {
            Err(DataError::InvalidParam { field, .. }) => field,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("{cfg:?} with seq_len {seq_len} should be rejected"),
        }
    }

    #[test]
    fn invalid_settings_name_the_field() {
        let mqar = |n, v, a| DataConfig::Mqar {
            num_kv_pairs: n,
            vocab_size: v,
            power_a: a,
        };
        assert_eq!(err_field(mqar(8, 256, 0.01), 31), "num_kv_pairs");
        assert!(build(&mqar(8, 256, 0.01), Path::new("."), 32).is_ok());
        assert_eq!(err_field(mqar(0, 256, 0.01), 64), "num_kv_pairs");
        assert_eq!(err_field(mqar(8, 257, 0.01), 64), "vocab_size");
        assert_eq!(err_field(mqar(8, 18, 0.01), 64), "vocab_size");
        assert!(build(&mqar(8, 19, 0.01), Path::new("."), 64).is_ok());
        assert_eq!(err_field(mqar(8, 256, 0.0), 64), "power_a");
        assert_eq!(err_field(mqar(8, 256, f64::NAN), 64), "power_a");

        let sc = |n, v| DataConfig::SelectiveCopy {
            num_tokens: n,
            vocab_size: v,
        };
        assert_eq!(err_field(sc(16, 16), 31), "num_tokens");
        assert!(build(&sc(16, 16), Path::new("."), 32).is_ok());
        assert_eq!(err_field(sc(0, 16), 32), "num_tokens");
        assert_eq!(err_field(sc(4, 0), 32), "vocab_size");
        assert_eq!(err_field(sc(4, 254), 32), "vocab_size");
        assert!(build(&sc(4, 253), Path::new("."), 32).is_ok());

        let ih = |v| DataConfig::InductionHeads { vocab_size: v };
        assert_eq!(err_field(ih(0), 32), "vocab_size");
        assert_eq!(err_field(ih(254), 32), "vocab_size");
        assert_eq!(err_field(ih(16), 3), "seq_len");

        let msg = build(&mqar(8, 256, 0.01), Path::new("."), 20)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("num_kv_pairs") && msg.contains("32"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "num_tokens")]
    fn oversized_seq_len_request_panics_clearly() {
        let src = SyntheticSource::new(SelectiveCopy {
            num_tokens: 16,
            vocab_size: 16,
        });
        src.train_batch(0, 0, 1, 8);
    }

    #[test]
    fn toml_round_trip_and_defaults() {
        let parse = |s: &str| toml::from_str::<DataConfig>(s);
        assert_eq!(parse("kind = \"text\"").unwrap(), DataConfig::default());
        assert_eq!(
            parse("kind = \"mqar\"").unwrap(),
            DataConfig::Mqar {
                num_kv_pairs: 8,
                vocab_size: 256,
                power_a: 0.01
            }
        );
        assert_eq!(
            parse("kind = \"selective-copy\"\nnum_tokens = 4").unwrap(),
            DataConfig::SelectiveCopy {
                num_tokens: 4,
                vocab_size: 16
            }
        );
        assert_eq!(
            parse("kind = \"induction-heads\"").unwrap(),
            DataConfig::InductionHeads { vocab_size: 16 }
        );
        assert_eq!(
            parse("kind = \"text\"\npath = \"data/x.txt\"\nval_fraction = 0.2").unwrap(),
            DataConfig::Text {
                path: Some("data/x.txt".into()),
                val_fraction: 0.2
            }
        );
        let err = parse("kind = \"mqar\"\nnum_pairs = 3").unwrap_err();
        assert!(err.to_string().contains("num_pairs"), "{err}");
        assert!(parse("kind = \"copy\"").is_err());
        assert!(parse("val_fraction = 0.1").is_err());
        for cfg in cfgs().into_iter().chain([DataConfig::default()]) {
            let s = toml::to_string(&cfg).unwrap();
            assert_eq!(parse(&s).unwrap(), cfg, "{s}");
        }
    }
}
