//! What the worker thread needs from a diffusion backend: the [`Engine`] trait.
//!
//! The real backend is [`crate::worker::PipelineEngine`] (candle); [`crate::worker::FakeEngine`]
//! synthesises images and maps for tests and UI work without a model.

use std::path::Path;

use crate::worker::error::EngineError;
use crate::worker::plain::{Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan};
use crate::worker::protocol::{GenerateParams, ModelInfo, ModelSource, PromptInfo, StepFrame};

/// Receives a run's progress. Returning `Err` from either method stops the run with that error
/// (the worker returns [`EngineError::Cancelled`] to cancel).
pub trait RunObserver {
    /// The prompt is tokenised; `params` has its defaults resolved (size, scheduler).
    fn started(&mut self, params: &GenerateParams, prompt: PromptInfo) -> Result<(), EngineError>;

    /// One step is done.
    fn step(&mut self, frame: StepFrame) -> Result<(), EngineError>;
}

/// The result of a finished run.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// The final image.
    pub image: RgbImage,
    /// Resolutions `(h, w)` at which self-attention was kept.
    pub self_attention_grids: Vec<(usize, usize)>,
}

/// A diffusion backend driven by the worker thread. It lives on that thread only.
pub trait Engine {
    /// Loads a model. On error the previously loaded model must stay usable.
    fn load_model(&mut self, source: &ModelSource) -> Result<ModelInfo, EngineError>;

    /// Runs one generation, reporting to `observer` after tokenising and after every step.
    fn generate(
        &mut self,
        params: &GenerateParams,
        observer: &mut dyn RunObserver,
    ) -> Result<RunOutput, EngineError>;

    /// Self-attention of the latest run at `(grid_h, grid_w)`, or `None` if it was not kept.
    fn self_attention(
        &self,
        grid_h: usize,
        grid_w: usize,
        span: SelfAttentionSpan,
    ) -> Result<Option<SelfAttentionMap>, EngineError>;

    /// Writes the latest run's raw cross-attention (`cross.<h>x<w>` `[steps, tokens, h, w]`), the
    /// given word heat maps and the run's words and tokens to a safetensors file, atomically
    /// ([`crate::analysis::export::write_attention_safetensors`], the CLI's `--attention-out` layout).
    fn write_attention(&self, path: &Path, word_heatmaps: &[Heatmap]) -> Result<(), EngineError>;
}
