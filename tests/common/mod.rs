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
