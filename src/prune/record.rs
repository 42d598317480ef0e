//! Calibration activations for Wanda: while recording is on (this thread only), every linear
//! layer that calls `observe(weight, x)` adds the squared inputs per input column, keyed by the
//! weight tensor's id. Off, `observe` is one thread-local flag read.
use candle_core::{DType, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashMap;

/// Sum over tokens of x_j^2 per input column j, per weight.
pub type ColumnSquares = HashMap<TensorId, Vec<f64>>;

thread_local! {
    static RECORDER: RefCell<Option<ColumnSquares>> = const { RefCell::new(None) };
}

/// True while `record` is running on this thread.
pub fn is_recording() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// Adds the column squares of `x` (..., d_in) to `weight`'s entry. Errors are dropped: a
/// failed observation only leaves that calibration batch out.
pub fn observe(weight: &Tensor, x: &Tensor) {
    if !is_recording() {
        return;
    }
    let Ok(sq) = column_squares(x) else {
        return;
    };
    RECORDER.with(|r| {
        if let Some(map) = r.borrow_mut().as_mut() {
            let e = map
                .entry(weight.id())
                .or_insert_with(|| vec![0.0; sq.len()]);
            if e.len() == sq.len() {
                e.iter_mut().zip(&sq).for_each(|(a, b)| *a += b);
            }
        }
    });
}

fn column_squares(x: &Tensor) -> candle_core::Result<Vec<f64>> {
    let d = x.dim(candle_core::D::Minus1)?;
    let x2 = x.reshape(((), d))?.to_dtype(DType::F64)?;
    x2.sqr()?.sum(0)?.to_vec1()
}

/// Runs `f` with recording on and returns what the linear layers saw.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, ColumnSquares) {
    RECORDER.with(|r| *r.borrow_mut() = Some(HashMap::new()));
    // Recording is switched off again even if `f` panics.
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            RECORDER.with(|r| *r.borrow_mut() = None);
        }
    }
    let off = Off;
    let out = f();
    let seen = RECORDER.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(off);
    (out, seen)
}
