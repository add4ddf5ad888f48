//! Stable-Diffusion-family models in candle, with an attention hook in every attention layer.

pub mod clip;
pub mod error;
pub mod model;
pub mod profile;
pub mod rng;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{PipelineError, PipelineResult};

/// Largest absolute difference between two tensors of the same shape (unit tests' parity checks).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
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
