//! Helpers shared by the parity tests: fixture paths, reference tensors, differences.
//! (Each test binary uses a subset, hence `dead_code`.)

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// `tests/fixtures/<path>`.
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// Largest absolute element difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The reference tensors diffusers wrote for a fixture model (`<model>/reference_outputs.safetensors`).
pub fn references(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("{model}/reference_outputs.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// Small random weights (xorshift, uniform in [-0.02, 0.02)) for every `(name, shape)` of a
/// checkpoint manifest's component: values do not matter for timing, only shapes.
pub fn random_tensors<'a>(
    parameters: impl IntoIterator<Item = (&'a String, &'a Vec<usize>)>,
    seed: u64,
) -> HashMap<String, Tensor> {
    let mut state = seed | 1;
    parameters
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                })
                .collect();
            let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
            (name.clone(), tensor)
        })
        .collect()
}
