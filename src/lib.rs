//! attend: make the attention layers of text-to-image diffusion models visible and editable.
//!
//! Layers (dependencies point downwards only; see README "Architecture"):
//! - [`kernels`]: CPU kernels (convolutions, norms, softmax, products, attention) on candle tensors,
//!   used by the pipeline and the attention store; imports no other layer.
//! - [`pipeline`]: candle models (CLIP text encoder, UNet, VAE), schedulers, model-folder loading, sampling.
//! - [`attention`]: the processor hook every attention layer calls, and processors (store, edit controls).
//! - [`analysis`]: plain-data heatmaps, DAAM aggregation, segmentation, masks, export. No candle tensors
//!   in its public types.
//! - [`scenes`]: the deterministic drawn-scene generator behind the bundled model (plain data).
//! - `worker` / `ui`: the editor's background thread and the eframe window.

pub mod analysis;
pub mod attention;
pub mod kernels;
pub mod pipeline;
pub mod scenes;
pub mod ui;
pub mod worker;
