//! What the worker thread needs from a diffusion backend: the [`Engine`] trait, and the
//! [`RunObserver`] an engine reports a run's progress to.
//!
//! The real backend is [`crate::worker::PipelineEngine`] (candle); [`crate::worker::FakeEngine`]
//! synthesises images and maps for tests and UI work without a model.

use std::path::Path;

use crate::analysis::image::image_difference;
use crate::analysis::segment::LabelledSegmentation;
use crate::hook::CancelToken;
use crate::worker::appearance::{AppearanceResult, AppearanceTransferParams, AppearanceUpdate};
use crate::worker::error::{Disconnected, EngineError};
use crate::worker::plain::{Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan};
use crate::worker::protocol::{
    BlendMask, Branch, EditInfo, EditSpec, GenerateParams, InversionParams, ModelInfo,
    ModelLoadProgress, ModelSource, Products, PromptInfo, SourceImage, StepFrame,
    INVERSION_METHODS,
};
use crate::worker::segment::SegmentRequest;
use crate::worker::style_set::{StyleSetOutput, StyleSetParams};

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

    /// One step of an inversion ([`Engine::invert`]) is done: `steps_done` of `step_count` in
    /// `phase` (`"inverting"`, `"reconstructing"`, ...).
    fn inversion_progress(
        &mut self,
        phase: &str,
        steps_done: usize,
        step_count: usize,
    ) -> Result<(), Disconnected> {
        let _ = (phase, steps_done, step_count);
        Ok(())
    }

    /// An appearance transfer ([`Engine::appearance_transfer`]) reports its inputs, preparation or
    /// a step (its result is the engine's return value).
    fn appearance(&mut self, update: AppearanceUpdate) -> Result<(), Disconnected> {
        let _ = update;
        Ok(())
    }
}

/// The result of [`Engine::invert`].
#[derive(Clone, Debug)]
pub struct InversionOutput {
    /// What a run names to replay the inversion.
    pub source: SourceImage,
    /// The image regenerated from the inversion, `[height, width, 3]`.
    pub reconstruction: RgbImage,
    /// PSNR of the reconstruction against the input, in dB.
    pub psnr_db: f64,
    /// The engine held the inversion already (nothing was inverted).
    pub cached: bool,
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
    /// Loads a model with its default products ([`Products::ModelDefault`]). On error the
    /// previously loaded model must stay usable.
    fn load_model(&mut self, source: &ModelSource) -> Result<ModelInfo, EngineError> {
        self.load_model_observed(source, Products::ModelDefault, &mut |_| Ok(()))
    }

    /// Loads a model whose UNet multiplies as `products` says, calling `progress` before each
    /// component; an error from it (a cancelled one when the user cancels) stops the load and the
    /// previous model stays. Engines without stages load at once.
    fn load_model_observed(
        &mut self,
        source: &ModelSource,
        products: Products,
        progress: &mut dyn FnMut(ModelLoadProgress) -> Result<(), EngineError>,
    ) -> Result<ModelInfo, EngineError>;

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

    /// Inverts a real image (already fitted to a size the model takes) with `params` and keeps the
    /// inversion for runs that name it ([`crate::worker::GenerateParams::source_image`]); an
    /// inversion already held for the same image, model and settings is reused. Reports each step
    /// with [`RunObserver::inversion_progress`], checks `cancel` before every step, and returns the
    /// image regenerated from the inversion. Engines without inversion leave the default, which
    /// refuses.
    fn invert(
        &mut self,
        image: &RgbImage,
        params: &InversionParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<InversionOutput, EngineError> {
        let _ = (image, params, observer, cancel);
        Err(EngineError::Unavailable(
            "this engine cannot invert images".to_owned(),
        ))
    }

    /// Runs a style set (see [`crate::worker::Command::GenerateStyleSet`]): checks it (memory
    /// included) before any step, reports every image as [`Branch::StyleImage`] (`started` for
    /// each image before the first step, then per step one `step` per image), checks `cancel`
    /// before every step and keeps every image's attention; image 0's becomes the latest run's
    /// (probe, Segments view, attention export). Engines without style sets leave the default,
    /// which refuses.
    fn generate_style_set(
        &mut self,
        params: &StyleSetParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<StyleSetOutput, EngineError> {
        let _ = (params, observer, cancel);
        Err(EngineError::Unavailable(
            "this engine cannot generate style sets".to_owned(),
        ))
    }

    /// Makes image `index` of the latest style set the latest run's attention (what
    /// [`Self::self_attention`], [`Self::segment`] and [`Self::write_attention`] read).
    fn select_style_image(&mut self, index: usize) -> Result<(), EngineError> {
        let _ = index;
        Err(EngineError::Unavailable(
            "this engine holds no style set".to_owned(),
        ))
    }

    /// Runs an appearance transfer (see [`crate::worker::Command::AppearanceTransfer`]): checks the
    /// request, generates the inputs that ask for it, fits both images to the model's size, reports
    /// them ([`AppearanceUpdate::Inputs`]), prepares (inverts) them, then reports every denoising
    /// step of the output with a preview; checks `cancel` before every step. Engines without
    /// transfers leave the default, which refuses.
    fn appearance_transfer(
        &mut self,
        params: &AppearanceTransferParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<AppearanceResult, EngineError> {
        let _ = (params, observer, cancel);
        Err(EngineError::Unavailable(
            "this engine cannot run appearance transfers".to_owned(),
        ))
    }
}

/// Peak signal-to-noise ratio of `actual` against `expected` (8-bit), in dB: infinite for equal
/// images, `None` when their sizes differ (see [`image_difference`]).
pub fn psnr_db(expected: &RgbImage, actual: &RgbImage) -> Option<f64> {
    image_difference(actual, expected)
        .ok()
        .map(|difference| difference.psnr_db)
}

/// Checks what an inversion needs before any work: a description, a known method, steps in
/// 1..=1000, a finite guidance, an image of consistent size.
pub fn check_inversion_request(
    image: &RgbImage,
    params: &InversionParams,
) -> Result<(), EngineError> {
    let invalid =
        |name: &'static str, reason: String| EngineError::InvalidArgument { name, reason };
    if params.prompt.trim().is_empty() {
        return Err(invalid(
            "image description",
            "it is empty: describe the image (the prompt it is inverted with)".to_owned(),
        ));
    }
    if !INVERSION_METHODS.contains(&params.method.as_str()) {
        return Err(invalid(
            "inversion method",
            format!(
                "unknown method {:?}; accepted: {}",
                params.method,
                INVERSION_METHODS.join(", ")
            ),
        ));
    }
    if params.steps == 0 || params.steps > 1000 {
        return Err(invalid(
            "inversion steps",
            format!("{} is not in 1..=1000", params.steps),
        ));
    }
    if !params.guidance.is_finite() {
        return Err(invalid(
            "inversion guidance",
            format!("{} is not a finite number", params.guidance),
        ));
    }
    if image.width == 0 || image.height == 0 || !image.is_consistent() {
        return Err(invalid(
            "image",
            format!(
                "{}x{} with {} bytes is not an RGB image",
                image.width,
                image.height,
                image.pixels.len()
            ),
        ));
    }
    Ok(())
}

/// A small cache of an engine's inversions: keyed by the image's hash, the model's name and the
/// settings; the oldest goes when it is full.
#[derive(Debug)]
pub(crate) struct InversionCache<T> {
    entries: std::collections::VecDeque<(InversionCacheKey, T)>,
}

/// What an inversion is cached by.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InversionCacheKey {
    /// The fitted image's hash.
    pub(crate) image_hash: String,
    /// The model's name.
    pub(crate) model_name: String,
    /// The settings.
    pub(crate) params: InversionParams,
}

/// How many inversions an engine keeps.
pub(crate) const INVERSION_CACHE_SIZE: usize = 4;

impl<T> Default for InversionCache<T> {
    fn default() -> Self {
        Self {
            entries: std::collections::VecDeque::new(),
        }
    }
}

impl<T> InversionCache<T> {
    /// The entry for `key`, if held.
    pub(crate) fn get(&self, key: &InversionCacheKey) -> Option<&T> {
        self.entries
            .iter()
            .find(|(entry_key, _)| entry_key == key)
            .map(|(_, value)| value)
    }

    /// Keeps `value` for `key` (replacing an entry of the same key; dropping the oldest when full).
    pub(crate) fn insert(&mut self, key: InversionCacheKey, value: T) {
        self.entries.retain(|(entry_key, _)| *entry_key != key);
        if self.entries.len() == INVERSION_CACHE_SIZE {
            self.entries.pop_front();
        }
        self.entries.push_back((key, value));
    }

    /// Forgets every inversion (another model was loaded).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}
