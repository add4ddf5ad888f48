//! The messages between the UI and the worker thread: [`Command`]s go in, [`Event`]s come out.
//!
//! Everything here is plain data (no tensors, no egui types), so either side can be replaced or tested
//! alone. Every generation has a run id, given by [`crate::worker::WorkerHandle::generate`]; every event
//! about a run names it, so the UI can drop the events of a run it has already superseded.
//!
//! A run streams one kind of event for plain and edited images: `Started`, `Step` and `Finished`,
//! each naming the [`Branch`] it reports. Per run id:
//!
//! - [`Command::Generate`]: `Started`, `Step`s in step order, `Finished`, all of [`Branch::Source`].
//! - [`Command::GenerateEdit`]: the same for the source when it is recorded (nothing when an earlier
//!   recording is reused), then, unless only the source was asked for, `Started`, `Step`s and
//!   `Finished` of [`Branch::Edited`].
//! - [`Command::Invert`]: `InversionProgress`es in step order (per phase), then `Inverted`. Runs and
//!   edits that name the inverted image ([`GenerateParams::source_image`]) replay it: the image's
//!   latents and corrections stay in the engine's cache, only the reference crosses the channel.
//! - [`Command::GenerateStyleSet`]: `Started` of every image ([`Branch::StyleImage`], image order),
//!   then per step one `Step` per image, then one `Finished` per image; the last image's ends it.
//!
//! `Cancelled` or `Failed` can come in place of any of these events and ends the run; otherwise the
//! `Finished` of its last branch ends it. A run superseded before it starts gets only
//! `Cancelled { steps_done: 0 }`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::analysis::segment::LabelledSegmentation;
use crate::analysis::WordSpan;
use crate::worker::appearance::{AppearanceTransferParams, AppearanceUpdate};
use crate::worker::plain::{Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan, StepCross};
use crate::worker::segment::{SegmentFileExport, SegmentRequest};
use crate::worker::style_set::StyleSetParams;
// The Prompt-to-Prompt edit's description and results.
pub use crate::analysis::alignment::{EditKind, WordChange, WordPair};
pub use crate::analysis::edit_spec::{
    BlendMask, CrossWindow, EditSpec, InvertedImageSwap, LocalBlendConfig, Reweight, SelfReplace,
    StepWindow, INVERTED_IMAGE_SWAP,
};

/// Which model to load.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModelSource {
    /// The model shipped with attend (`assets/attend-shapes/`).
    #[default]
    Bundled,
    /// A diffusers-layout model folder chosen by the user.
    Folder(PathBuf),
    /// A single-file checkpoint (`.safetensors` in the original LDM / A1111 layout).
    File(PathBuf),
}

impl ModelSource {
    /// The source for a path the user picked or dropped: a file is a single-file checkpoint,
    /// anything else a model folder.
    pub fn from_path(path: PathBuf) -> Self {
        if path.is_file() {
            Self::File(path)
        } else {
            Self::Folder(path)
        }
    }

    /// The folder or file, `None` for the bundled model.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Self::Bundled => None,
            Self::Folder(path) | Self::File(path) => Some(path),
        }
    }
}

/// How the UNet's matrix products treat their operands, as the user chose it (the Models menu).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Products {
    /// The model's own default: bf16 for the bundled model (measured to keep its accuracy),
    /// f32 for every other model.
    #[default]
    ModelDefault,
    /// f32 operands: the reference, within 1e-4 of diffusers.
    F32,
    /// Operands rounded to bf16 with f32 sums, on CPUs with AVX-512 BF16 (elsewhere f32): about
    /// twice as fast on SD 1.5, maps and images within a fraction of a percent.
    Bf16,
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bundled => write!(f, "bundled model"),
            Self::Folder(path) | Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How far a model load has come: the component it is loading now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLoadProgress {
    /// The component (`"tokenizer"`, `"text encoder"`, `"UNet"`, `"VAE"`).
    pub stage: String,
    /// Its 0-based index among the load's stages.
    pub index: usize,
    /// How many stages the load has.
    pub count: usize,
}

/// What one generation needs. Together with the model this fixes the image exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerateParams {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (the unconditional half of classifier-free guidance).
    pub negative_prompt: String,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Number of denoising steps (>= 1).
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 disables guidance.
    pub guidance: f64,
    /// Scheduler name (`ddim`, `euler`, `euler-a`, `dpmpp-2m`); `None` uses the model's own.
    pub scheduler: Option<String>,
    /// Image width in pixels; `None` uses the model's default size.
    pub width_px: Option<usize>,
    /// Image height in pixels; `None` uses the model's default size.
    pub height_px: Option<usize>,
    /// A real image the run replays instead of starting from noise (its cached inversion); `None`:
    /// noise-based generation. The engine then takes the prompt, steps, guidance, size and the
    /// DDIM scheduler from the inversion.
    pub source_image: Option<Box<SourceImage>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 1,
            steps: 20,
            guidance: 7.5,
            scheduler: None,
            width_px: None,
            height_px: None,
            source_image: None,
        }
    }
}

/// The inversion methods an engine may offer, by name, in the order the editor lists them (the
/// names of [`crate::pipeline::inversion::InversionMethod`]).
pub const INVERSION_METHODS: [&str; 5] = ["ddim", "null-text", "negative-prompt", "direct", "ddpm"];

/// The method the editor starts with: exact replay without optimisation.
pub const DEFAULT_INVERSION_METHOD: &str = "direct";

/// How a real image is inverted (plain data; the engine checks the values).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct InversionParams {
    /// A description of the image: the source prompt of runs and edits that replay it (not empty).
    pub prompt: String,
    /// One of [`INVERSION_METHODS`].
    pub method: String,
    /// DDIM steps of the inversion (runs that replay it take the same count).
    pub steps: usize,
    /// The guidance scale runs replay with.
    pub guidance: f64,
    /// Seed of the method's own noise draws (`ddpm`).
    pub seed: u64,
}

impl Default for InversionParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            method: DEFAULT_INVERSION_METHOD.to_owned(),
            steps: 20,
            guidance: 7.5,
            seed: 1,
        }
    }
}

/// A reference to a real image's inversion held by the engine: the image (by its
/// [`crate::analysis::image::image_hash`]) and the settings it was inverted with. Together with the
/// loaded model it is the key of the engine's inversion cache.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceImage {
    /// Hash of the fitted image (16 hex digits).
    pub image_hash: String,
    /// How it was inverted.
    pub inversion: InversionParams,
}

/// What the UI learns about a loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Where it came from.
    pub source: ModelSource,
    /// A short name for the status line (folder name or the bundled model's name).
    pub name: String,
    /// Default image width in pixels.
    pub default_width_px: usize,
    /// Default image height in pixels.
    pub default_height_px: usize,
    /// Image sizes must be multiples of this many pixels.
    pub size_multiple_px: usize,
    /// The scheduler the model's own config asks for.
    pub default_scheduler: String,
    /// Scheduler names the engine accepts.
    pub schedulers: Vec<String>,
    /// Non-fatal remarks from loading (e.g. "PNDMScheduler not implemented, using DDIM").
    pub warnings: Vec<String>,
    /// The self-attention replacement a new edit starts with: the reference's (first 40% of the
    /// steps, layers up to 16x16) unless the model folder recommends its own.
    pub edit_self_replace: SelfReplace,
    /// Whether the UNet's matrix products round their operands to bf16 (asked for, and this CPU
    /// has AVX-512 BF16).
    pub bf16_products: bool,
    /// Whether this CPU runs bf16 products at all (AVX-512 BF16).
    pub bf16_products_available: bool,
}

/// How the prompt was tokenised for a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptInfo {
    /// One entry per prompt word, with its token positions.
    pub words: Vec<WordSpan>,
    /// The real tokens (start, prompt tokens, end), as the tokenizer spells them.
    pub tokens: Vec<String>,
    /// Warnings for the status line (prompt truncated, scheduler substituted, ...).
    pub warnings: Vec<String>,
}

/// Time spent, for the progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// Seconds this step took.
    pub step_secs: f64,
    /// Seconds since the run started (including text encoding).
    pub elapsed_secs: f64,
}

/// Everything the UI gets after one denoising step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepFrame {
    /// 0-based step index.
    pub step_index: usize,
    /// Number of steps in the run.
    pub step_count: usize,
    /// The scheduler timestep of this step.
    pub timestep: f64,
    /// A cheap preview of the current sample (`[height, width, 3]` RGB).
    pub preview: RgbImage,
    /// This step's cross-attention maps (conditional half, heads and layers averaged per group),
    /// shared with the engine's record of the run rather than copied.
    pub cross: Arc<StepCross>,
    /// Timings.
    pub timing: StepTiming,
}

/// Which branch of a run a `Started`, `Step` or `Finished` event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Branch {
    /// The image of the run's own parameters: all of a [`Command::Generate`], and the recorded
    /// source of a [`Command::GenerateEdit`].
    Source,
    /// The Prompt-to-Prompt edited image of a [`Command::GenerateEdit`].
    Edited,
    /// Image `i` of a [`Command::GenerateStyleSet`]: 0 the reference, `i` the `i`-th target
    /// prompt (see [`crate::worker::StyleSetParams`]).
    StyleImage(usize),
}

/// One request to the worker. Each variant is answered by events (see the module docs).
#[derive(Clone, Debug)]
pub enum Command {
    /// Load a model. On failure the previous model stays loaded. Supersedes a running generation.
    LoadModel {
        /// Which model.
        source: ModelSource,
        /// How its UNet's matrix products treat their operands.
        products: Products,
    },
    /// Generate an image. Supersedes (cancels) any earlier run.
    Generate {
        /// Id of this run, unique and increasing (assigned by the handle).
        run_id: u64,
        /// What to generate.
        params: GenerateParams,
    },
    /// Cancel the running generation (takes effect before the next step starts).
    Cancel,
    /// Ask for the self-attention of the latest run at one resolution, answered by
    /// [`Event::SelfAttention`].
    RequestSelfAttention {
        /// The run the UI shows (ignored if it is not the latest run).
        run_id: u64,
        /// Query grid height.
        grid_h: usize,
        /// Query grid width.
        grid_w: usize,
        /// Latest step or mean over steps.
        span: SelfAttentionSpan,
    },
    /// Write PNG files (atomically). Answered by one [`Event::Exported`] or [`Event::ExportFailed`] per file.
    ExportPngs {
        /// The files to write.
        files: Vec<PngExport>,
    },
    /// Write the raw attention maps of the latest run as safetensors (the CLI's `--attention-out` layout).
    ExportAttention {
        /// The run the UI shows; refused if it is not the latest finished run.
        run_id: u64,
        /// Destination file.
        path: PathBuf,
        /// The word heat maps shown, stored alongside as `word_heatmaps` `[words, H, W]`.
        word_heatmaps: Vec<Heatmap>,
    },
    /// Write a text file atomically (session JSON).
    ExportText {
        /// Destination file.
        path: PathBuf,
        /// The file's content.
        text: String,
    },
    /// Stop the worker thread.
    Shutdown,

    // Segments view.
    /// Segment the latest finished run from its stored self-attention and label the segments with
    /// its prompt words (no new diffusion). Answered by [`Event::Segmented`].
    Segment {
        /// The run the UI shows; refused if it is not the latest finished run.
        run_id: u64,
        /// Method, settings, resolution and step span.
        request: SegmentRequest,
    },
    /// Write segmentation files (mask PNG, label map PNG, segments JSON) atomically. Answered by one
    /// [`Event::Exported`] or [`Event::ExportFailed`] per file.
    ExportSegmentFiles {
        /// The files to write.
        files: Vec<SegmentFileExport>,
    },

    // Prompt-to-Prompt edits.
    /// A Prompt-to-Prompt edit of `params`' image (replay mode). The engine keeps the source run's
    /// recording (latents and attention): when `params` match the recorded source (prompt, negative,
    /// seed, steps, size, scheduler, guidance) only the edited branch runs; otherwise the source is
    /// recorded first and reported as [`Branch::Source`] (`Started`, `Step`s, `Finished`). The
    /// edited branch is reported as [`Branch::Edited`] (`Started`, `Step`s, then exactly one of
    /// `Finished`, `Cancelled` or `Failed`). Supersedes (cancels) any earlier run.
    GenerateEdit {
        /// Id of this run, unique and increasing (assigned by the handle).
        run_id: u64,
        /// The source run's parameters.
        params: GenerateParams,
        /// The edit; `None` only records the source (so that later edits need no source run).
        spec: Option<EditSpec>,
    },

    // Real images.
    /// Invert a real image (already fitted to a size the model takes) so that later runs and edits
    /// can replay it ([`GenerateParams::source_image`]). Answered by [`Event::InversionProgress`]s,
    /// then [`Event::Inverted`] (with the replayed reconstruction), or `Cancelled` / `Failed`. An
    /// inversion the engine still holds (same image, model and settings) is not computed again.
    /// Supersedes (cancels) any earlier run, and is cancelled like one.
    Invert {
        /// Id of this request, from the same sequence as runs (assigned by the handle).
        run_id: u64,
        /// The fitted image, `[height, width, 3]`.
        image: RgbImage,
        /// Prompt, method, steps, guidance, seed.
        params: InversionParams,
    },

    // Style sets.
    /// Generate a style set: the reference and every target prompt in one batch, the targets
    /// sharing the reference's attention. Reported per image as [`Branch::StyleImage`] (see
    /// [`crate::worker::StyleSetParams`]); a set that cannot fit in memory is refused with
    /// `Failed` before any step. Supersedes (cancels) any earlier run, and is cancelled like one.
    GenerateStyleSet {
        /// Id of this run, unique and increasing (assigned by the handle).
        run_id: u64,
        /// The reference, the target prompts and the sharing settings.
        params: StyleSetParams,
    },
    /// Make image `index` (0: the reference) of the latest style set the one whose attention the
    /// probe, the Segments view and the attention export read. Refused with a `Warning` when the
    /// set is no longer the latest run; answered by nothing otherwise.
    SelectStyleImage {
        /// The style set's run.
        run_id: u64,
        /// The image.
        index: usize,
    },
    // Appearance transfer.
    /// Put the appearance image's look on the structure image's shapes (cross-image attention).
    /// Answered by [`Event::Appearance`]s (see [`crate::worker::appearance`]), or `Cancelled` /
    /// `Failed`. Supersedes (cancels) any earlier run, and is cancelled like one.
    AppearanceTransfer {
        /// Id of this request, from the same sequence as runs (assigned by the handle).
        run_id: u64,
        /// The two images, their prompts and the settings.
        params: Box<AppearanceTransferParams>,
    },
}

/// One PNG to write.
#[derive(Clone, Debug)]
pub struct PngExport {
    /// Destination file.
    pub path: PathBuf,
    /// The pixels.
    pub image: RgbImage,
    /// A1111-style `parameters` text chunk, if any.
    pub parameters: Option<String>,
}

/// What the worker reports.
#[derive(Clone, Debug)]
pub enum Event {
    /// A model is loaded and ready.
    ModelLoaded {
        /// About the model.
        info: ModelInfo,
    },
    /// Loading failed; the previous model (if any) is still loaded.
    ModelLoadFailed {
        /// What was asked for.
        source: ModelSource,
        /// Why it failed (the full error chain).
        message: String,
    },
    /// A branch of a run started; its prompt is tokenised.
    Started {
        /// The run.
        run_id: u64,
        /// The branch that starts.
        branch: Branch,
        /// The branch's parameters, with defaults resolved (size, scheduler); for
        /// [`Branch::Edited`] the prompt is the edited prompt.
        params: GenerateParams,
        /// How the branch's prompt was tokenised (warnings of the edited prompt start with
        /// "edited").
        prompt: PromptInfo,
        /// How the edited prompt aligns with the source: `Some` exactly for [`Branch::Edited`].
        edit: Option<EditInfo>,
    },
    /// One denoising step of a branch is done.
    Step {
        /// The run.
        run_id: u64,
        /// The branch the step belongs to.
        branch: Branch,
        /// The step's preview, maps and timings.
        frame: Box<StepFrame>,
        /// The local-blend mask applied after this step (latent resolution `[h, w]`), if one was
        /// (only on [`Branch::Edited`]).
        blend_mask: Option<BlendMask>,
    },
    /// A branch of a run finished. The last branch's `Finished` ends the run; a
    /// [`Branch::Source`] `Finished` that is followed by a [`Branch::Edited`] `Started` does not.
    Finished {
        /// The run.
        run_id: u64,
        /// The branch that finished.
        branch: Branch,
        /// The branch's final image.
        image: RgbImage,
        /// Seconds the branch took (for [`Branch::Source`] including text encoding).
        elapsed_secs: f64,
        /// Resolutions `(h, w)` at which self-attention was kept, for the probe and the Segments
        /// view; empty for [`Branch::Edited`] (they read the source's).
        self_attention_grids: Vec<(usize, usize)>,
        /// The last local-blend mask applied (latent resolution `[h, w]`), if any (only on
        /// [`Branch::Edited`]).
        blend_mask: Option<BlendMask>,
    },
    /// The run was cancelled (or superseded) after `steps_done` steps.
    Cancelled {
        /// The run.
        run_id: u64,
        /// Steps of all its branches completed before it stopped.
        steps_done: usize,
    },
    /// The run (or, without a run id, some other command) failed.
    Failed {
        /// The run, if the failure belongs to one.
        run_id: Option<u64>,
        /// Why (the full error chain).
        message: String,
    },
    /// Something the user should know, not an error.
    Warning {
        /// The message.
        message: String,
    },
    /// The answer to [`Command::RequestSelfAttention`].
    SelfAttention {
        /// The run it belongs to.
        run_id: u64,
        /// The map, or `None` when the run kept none at that resolution.
        map: Option<SelfAttentionMap>,
    },
    /// A file was written.
    Exported {
        /// The file.
        path: PathBuf,
    },
    /// A file could not be written (nothing partial is left behind).
    ExportFailed {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The worker panicked; it was restarted with a fresh engine (and reloads the last model).
    WorkerRestarted {
        /// The panic message.
        message: String,
    },

    // Segments view.
    /// The answer to [`Command::Segment`].
    Segmented {
        /// The run it belongs to.
        run_id: u64,
        /// What was asked for (the UI keeps the answer to its latest request).
        request: SegmentRequest,
        /// The labelled segmentation, or why there is none.
        result: Result<LabelledSegmentation, String>,
        /// Seconds the segmentation took.
        secs: f64,
    },

    // Real images.
    /// One step of an inversion is done (for a progress bar and an estimate of the time left).
    InversionProgress {
        /// The inversion request.
        run_id: u64,
        /// What runs: `"inverting"`, `"optimising null text"`, `"reconstructing"`, ...
        phase: String,
        /// Steps done in this phase.
        steps_done: usize,
        /// Steps of this phase.
        step_count: usize,
        /// Seconds since the request started.
        elapsed_secs: f64,
    },
    /// An image is inverted: later runs may name it as their [`SourceImage`].
    Inverted {
        /// The inversion request.
        run_id: u64,
        /// What a run names to replay this inversion.
        source: SourceImage,
        /// The image regenerated from the inversion with its prompt, `[height, width, 3]`.
        reconstruction: RgbImage,
        /// Peak signal-to-noise ratio of the reconstruction against the input, in dB (infinite
        /// when they are equal).
        psnr_db: f64,
        /// Seconds the request took (inversion and reconstruction; small when cached).
        seconds: f64,
        /// True when the engine held this inversion already and did not invert again.
        cached: bool,
    },

    // Appearance transfer.
    /// How an appearance transfer goes: its inputs, preparation, steps and result.
    Appearance {
        /// The transfer request.
        run_id: u64,
        /// What happened.
        update: AppearanceUpdate,
    },
}

impl Event {
    /// The run this event belongs to, if any.
    pub fn run_id(&self) -> Option<u64> {
        match self {
            Self::Started { run_id, .. }
            | Self::Step { run_id, .. }
            | Self::Finished { run_id, .. }
            | Self::Cancelled { run_id, .. }
            | Self::SelfAttention { run_id, .. }
            | Self::Segmented { run_id, .. }
            | Self::InversionProgress { run_id, .. }
            | Self::Inverted { run_id, .. }
            | Self::Appearance { run_id, .. } => Some(*run_id),
            Self::Failed { run_id, .. } => *run_id,
            _ => None,
        }
    }

    /// The branch a `Started`, `Step` or `Finished` event reports; `None` for the other events.
    pub fn branch(&self) -> Option<Branch> {
        match self {
            Self::Started { branch, .. }
            | Self::Step { branch, .. }
            | Self::Finished { branch, .. } => Some(*branch),
            _ => None,
        }
    }
}

/// How an edit's edited prompt relates to its source, told when the edited branch starts.
#[derive(Clone, Debug, PartialEq)]
pub struct EditInfo {
    /// Word swap or refine (as given, or inferred from the word counts).
    pub kind: EditKind,
    /// The word-to-word alignment (source word -> edited word, added and removed words).
    pub words: Vec<WordPair>,
    /// True when the source's recording of an earlier run was reused (no source run this time).
    pub source_reused: bool,
    /// How many times this engine has recorded a source so far (for tests and the status line).
    pub source_recordings: u64,
}
