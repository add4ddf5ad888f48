//! What the worker thread needs from a diffusion backend: the [`Engine`] trait, and the
//! [`RunObserver`] an engine reports a run's progress to.
//!
//! The real backend is [`crate::worker::PipelineEngine`] (candle); [`crate::worker::FakeEngine`]
//! synthesises images and maps for tests and UI work without a model.

use std::path::Path;

use crate::analysis::segment::LabelledSegmentation;
use crate::hook::CancelToken;
use crate::worker::error::{Disconnected, EngineError};
use crate::worker::plain::{Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan};
use crate::worker::protocol::{
    BlendMask, Branch, EditInfo, EditSpec, GenerateParams, ModelInfo, ModelLoadProgress,
    ModelSource, PromptInfo, StepFrame,
};
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

/// Receives a run's progress, one stream for both branches of a run ([`Branch`]). A method fails
/// only when nobody receives the reports any more ([`Disconnected`]); the engine then stops the run
/// and returns that error. Cancelling is not the observer's business: engines check the run's
/// [`CancelToken`].
pub trait RunObserver {
    /// A branch starts: its prompt is tokenised; `params` has its defaults resolved (size,
    /// scheduler) and, for [`Branch::Edited`], the edited prompt. `edit` is `Some` exactly for
    /// [`Branch::Edited`].
    fn started(
        &mut self,
        branch: Branch,
        params: &GenerateParams,
        prompt: PromptInfo,
        edit: Option<EditInfo>,
    ) -> Result<(), Disconnected>;

    /// One step of `branch` is done; `blend_mask` is the local-blend mask applied after it (edited
    /// branch only, latent resolution `[h, w]`).
    fn step(
        &mut self,
        branch: Branch,
        frame: StepFrame,
        blend_mask: Option<BlendMask>,
    ) -> Result<(), Disconnected>;

    /// A self-attention query the UI sent for this run while it generates, if one is waiting. The
    /// engine takes it after a source step and answers with [`Self::self_attention`] from the maps
    /// so far.
    fn take_self_attention_query(&mut self) -> Option<SelfAttentionQuery> {
        None
    }

    /// The answer to a query taken with [`Self::take_self_attention_query`] (`None`: no map kept at
    /// that resolution).
    fn self_attention(
        &mut self,
        query: SelfAttentionQuery,
        map: Option<SelfAttentionMap>,
    ) -> Result<(), Disconnected> {
        let _ = (query, map);
        Ok(())
    }

    /// An edit run recorded its source and the source's image is ready, before the edited branch
    /// starts. (A plain run's end is the engine's return value.)
    fn source_finished(&mut self, output: &RunOutput) -> Result<(), Disconnected> {
        let _ = output;
        Ok(())
    }
}

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

/// The result of a finished run.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// The final image.
    pub image: RgbImage,
    /// Resolutions `(h, w)` at which self-attention was kept.
    pub self_attention_grids: Vec<(usize, usize)>,
}

/// A diffusion backend driven by the worker thread. It lives on that thread only.
///
/// A run ([`Self::generate`], [`Self::generate_edit`]) checks `cancel` before every step of every
/// branch and stops with a cancelled error ([`EngineError::is_cancelled`]) once it is tripped; the
/// worker trips it when the run is cancelled or superseded.
pub trait Engine {
    /// Loads a model. On error the previously loaded model must stay usable.
    fn load_model(&mut self, source: &ModelSource) -> Result<ModelInfo, EngineError>;

    /// [`Self::load_model`], calling `progress` before each component; an error from it (a
    /// cancelled one when the user cancels) stops the load and the previous model stays. Engines
    /// without stages load at once.
    fn load_model_observed(
        &mut self,
        source: &ModelSource,
        progress: &mut dyn FnMut(ModelLoadProgress) -> Result<(), EngineError>,
    ) -> Result<ModelInfo, EngineError> {
        let _ = progress;
        self.load_model(source)
    }

    /// Runs one generation, reporting its [`Branch::Source`] to `observer` after tokenising and
    /// after every step.
    fn generate(
        &mut self,
        params: &GenerateParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
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
    /// branch of `spec` (none for `None`). The source is reported as [`Branch::Source`] (`started`,
    /// `step`s, `source_finished`), the edited branch as [`Branch::Edited`] (`started` with the
    /// [`EditInfo`], `step`s). Engines without edits leave the default, which refuses.
    fn generate_edit(
        &mut self,
        params: &GenerateParams,
        spec: Option<&EditSpec>,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<EditRunOutput, EngineError> {
        let _ = (params, spec, observer, cancel);
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
