//! Scoring a text under a trained model (`moz-lab eval`).
use super::loss::scalar;
use crate::model::MambaLm;
use anyhow::Result;
use candle_core::{Module, Tensor, D};

/// Mean next-byte NLL (nats) over a byte string, and the number of predicted bytes.
///
/// The bytes are cut into windows of `seq_len + 1` stepping by `seq_len`, so every byte but the
/// first is predicted exactly once; a final shorter window is scored at its own length.
/// Windows are independent (no state carried across them).
pub fn text_nll(
    model: &MambaLm,
    bytes: &[u8],
    seq_len: usize,
    batch: usize,
) -> Result<(f64, usize)> {
    anyhow::ensure!(
        bytes.len() >= 2,
        "text has {} bytes; need at least 2",
        bytes.len()
    );
    let mut windows: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    while start + 1 < bytes.len() {
        let end = (start + seq_len + 1).min(bytes.len());
        windows.push(&bytes[start..end]);
        start += seq_len;
    }
    let (mut total, mut count) = (0.0, 0usize);
    // Group windows of equal length into batches.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let mut j = i;
        while j < windows.len() && j - i < batch && windows[j].len() == len {
            j += 1;
        }
        let group = &windows[i..j];
        let l = len - 1;
        let inputs: Vec<u32> = group
            .iter()
            .flat_map(|w| w[..l].iter().map(|&b| b as u32))
            .collect();
        let targets: Vec<u32> = group
            .iter()
            .flat_map(|w| w[1..].iter().map(|&b| b as u32))
            .collect();
        let dev = model.device();
        let ids = Tensor::from_vec(inputs, (group.len(), l), dev)?;
        let tg = Tensor::from_vec(targets, group.len() * l, dev)?;
        let logits = model
            .forward(&ids)?
            .flatten_to(1)?
            .to_dtype(crate::train::loss::loss_dtype(model))?;
        let _ = model.take_routing();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&tg.unsqueeze(1)?, 1)?.sum_all()?.neg()?;
        total += scalar(&nll)?;
        count += group.len() * l;
        i = j;
    }
    Ok((total / count as f64, count))
}
