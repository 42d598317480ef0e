//! The training objective: masked next-byte cross-entropy plus the routers' auxiliary losses.
use crate::data::Batch;
use crate::model::lm::LayerRouting;
use crate::model::MambaLm;
use anyhow::Result;
use candle_core::{DType, Module, Tensor, D};

pub struct LossParts {
    /// Mean cross-entropy over masked positions (nats per predicted byte).
    pub ce: Tensor,
    /// Sum of all routers' load-balancing (+ z) losses; zero for dense models.
    pub aux: Tensor,
    pub routing: Vec<LayerRouting>,
    pub logits: Tensor,
}

impl LossParts {
    /// What is differentiated: ce + aux.
    pub fn total(&self) -> candle_core::Result<Tensor> {
        &self.ce + &self.aux
    }
}

pub fn batch_tensors(model: &MambaLm, batch: &Batch) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = model.device();
    let shape = (batch.batch_size, batch.seq_len);
    let inputs = Tensor::from_slice(&batch.inputs, shape, dev)?;
    let targets = Tensor::from_slice(&batch.targets, batch.inputs.len(), dev)?;
    let mask =
        Tensor::from_slice(&batch.mask, batch.mask.len(), dev)?.to_dtype(loss_dtype(model))?;
    Ok((inputs, targets, mask))
}

/// The dtype the loss is computed in: f32 for a bf16 model (the softmax over the vocabulary and
/// the mean over tokens need more than bf16's 8 bits), else the model's own.
pub fn loss_dtype(model: &MambaLm) -> DType {
    match model.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

pub fn forward_loss(model: &MambaLm, batch: &Batch) -> Result<LossParts> {
    let (inputs, targets, mask) = batch_tensors(model, batch)?;
    let logits = model.forward(&inputs)?;
    let routing = model.take_routing();
    let flat = logits.flatten_to(1)?.to_dtype(loss_dtype(model))?; // (N, V)
    let logp = candle_nn::ops::log_softmax(&flat, D::Minus1)?;
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let denom = batch.mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0);
    let ce = ((nll * mask)?.sum_all()? / denom)?;
    let mut aux = Tensor::zeros((), loss_dtype(model), model.device())?;
    for r in &routing {
        aux = (aux + r.stats.aux_loss.to_dtype(loss_dtype(model))?)?;
    }
    Ok(LossParts {
        ce,
        aux,
        routing,
        logits,
    })
}

/// Argmax predictions per position, for accuracy on masked positions.
pub fn predictions(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits
        .flatten_to(1)?
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1()?)
}

pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
