//! Helpers shared by the library's unit tests (the kernels are the lowest layer, so every layer's
//! tests can use them).

use candle_core::Tensor;

/// The largest absolute difference between two tensors of the same shape.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
