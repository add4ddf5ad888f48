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

/// Whether two tensors hold the same f32 values bit for bit.
pub(crate) fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.into_iter().map(f32::to_bits).collect::<Vec<_>>()
    };
    a.dims() == b.dims() && bits(a) == bits(b)
}

/// `count` deterministic values in [-1, 1), a different sequence per `seed`.
pub(crate) fn values(count: usize, seed: u32) -> Vec<f32> {
    (0..count)
        .map(|index| {
            let x = (index as u32).wrapping_mul(2654435761).wrapping_add(seed);
            ((x >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
