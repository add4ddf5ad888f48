//! What the worker thread needs from a diffusion backend: the [`Engine`] trait.
//!
//! The real backend is [`crate::worker::PipelineEngine`] (candle); [`crate::worker::FakeEngine`]
//! synthesises images and maps for tests and UI work without a model.

use std::path::Path;

use crate::worker::error::EngineError;
use crate::worker::plain::{Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan};
use crate::worker::protocol::{GenerateParams, ModelInfo, ModelSource, PromptInfo, StepFrame};
// Edit mode.
use crate::worker::protocol::{BlendMask, EditInfo, EditSpec};
// Segments view.
use crate::analysis::segment::LabelledSegmentation;
use crate::worker::segment::SegmentRequest;

/// A request for the self-attention of a running generation at one query grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfAttentionQuery {
    /// Query grid height.
    pub grid_h: usize,
    /// Query grid width.
    pub grid_w: usize,
    /// Latest step or mean over the steps so far.
    pub span: SelfAttentionSpan,
}

/// Receives a run's progress. Returning `Err` from either method stops the run with that error
/// (the worker returns [`EngineError::Cancelled`] to cancel).
pub trait RunObserver {
    /// The prompt is tokenised; `params` has its defaults resolved (size, scheduler).
    fn started(&mut self, params: &GenerateParams, prompt: PromptInfo) -> Result<(), EngineError>;

    /// One step is done.
    fn step(&mut self, frame: StepFrame) -> Result<(), EngineError>;

    /// A self-attention query the UI sent for this run while it generates, if one is waiting. The
    /// engine takes it after a step and answers with [`Self::self_attention`] from the maps so far.
    fn take_self_attention_query(&mut self) -> Option<SelfAttentionQuery> {
        None
    }

    /// The answer to a query taken with [`Self::take_self_attention_query`] (`None`: no map kept at
    /// that resolution).
    fn self_attention(
        &mut self,
        query: SelfAttentionQuery,
        map: Option<SelfAttentionMap>,
    ) -> Result<(), EngineError> {
        let _ = (query, map);
        Ok(())
    }

    // --- Edit mode ---
    /// An edit run recorded its source and the source's image is ready (before the edited branch).
    fn source_finished(&mut self, output: &RunOutput) -> Result<(), EngineError> {
        let _ = output;
        Ok(())
    }

    /// An edit's edited branch starts.
    fn edit_started(&mut self, info: EditInfo) -> Result<(), EngineError> {
        let _ = info;
        Ok(())
    }

    /// One step of an edit's edited branch is done.
    fn edit_step(
        &mut self,
        frame: StepFrame,
        blend_mask: Option<BlendMask>,
    ) -> Result<(), EngineError> {
        let _ = (frame, blend_mask);
        Ok(())
    }
    // --- end Edit mode ---
}

// --- Edit mode ---
/// The result of [`Engine::generate_edit`].
#[derive(Clone, Debug)]
pub struct EditRunOutput {
    /// The source run, when it was recorded by this call (`None`: an earlier recording was reused).
    pub source: Option<RunOutput>,
    /// The edited image, unless only the source was asked for.
    pub edited: Option<RgbImage>,
    /// The last local-blend mask applied to the edited branch, if any.
    pub blend_mask: Option<BlendMask>,
}
// --- end Edit mode ---

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

    /// Runs a Prompt-to-Prompt edit (see [`crate::worker::Command::GenerateEdit`]): records the
    /// source unless the engine holds a recording made with the same `params`, then runs the edited
    /// branch of `spec` (none for `None`). The source run is reported through `started`, `step` and
    /// `source_finished`, the edited branch through `edit_started` and `edit_step`. Engines without
    /// edits leave the default, which refuses.
    fn generate_edit(
        &mut self,
        params: &GenerateParams,
        spec: Option<&EditSpec>,
        observer: &mut dyn RunObserver,
    ) -> Result<EditRunOutput, EngineError> {
        let _ = (params, spec, observer);
        Err(EngineError::Unavailable(
            "this engine cannot run Prompt-to-Prompt edits".to_owned(),
        ))
    }

    /// Segments the latest run from its stored self-attention and labels the segments with its
    /// prompt words (the Segments view). Engines that keep no attention leave the default, which
    /// refuses.
    fn segment(&self, request: &SegmentRequest) -> Result<LabelledSegmentation, EngineError> {
        let _ = request;
        Err(EngineError::Unavailable(
            "this engine cannot segment its runs".to_owned(),
        ))
    }
}
