//! Stable-Diffusion-family models in candle, with an attention hook in every attention layer.

pub mod checkpoint;
pub mod clip;
pub mod discovery;
pub mod error;
pub mod inversion;
pub mod limits;
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
