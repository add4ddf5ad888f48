//! attend: make the attention layers of text-to-image diffusion models visible and editable.
//!
//! Layers, bottom up; each imports only itself and the layers listed before it (checked by
//! `tests/architecture.rs`; see README "Architecture"):
//! - [`scenes`]: the deterministic drawn-scene generator behind the bundled model (plain data).
//! - [`kernels`]: CPU kernels as candle custom ops (threads, SIMD, convolutions, attention).
//! - [`analysis`]: plain data: heat maps, aggregation, segmentation, masks, edit specs, export. No
//!   candle.
//! - [`hook`]: the attention hook every attention layer calls (sites, the processor trait with its
//!   query/key/value and probability stages).
//! - [`pipeline`]: candle models (CLIP text encoder, UNet, VAE), schedulers, loading, sampling.
//! - [`attention`]: the processors (attention store; Prompt-to-Prompt and its sampling loops).
//! - [`worker`]: the editor's background thread (typed commands and events, plain data only).
//! - [`ui`]: the eframe window.

pub mod analysis;
pub mod attention;
pub mod hook;
pub mod kernels;
pub mod pipeline;
pub mod scenes;
pub mod ui;
pub mod worker;
