//! The messages between the UI and the worker thread: [`Command`]s go in, [`Event`]s come out.
//!
//! Everything here is plain data (no tensors, no egui types), so either side can be replaced or tested
//! alone. Every generation has a run id, given by [`crate::worker::WorkerHandle::generate`]; every event
//! about a run names it, so the UI can drop the events of a run it has already superseded.
//!
//! Protocol, per run id: `Started`, then `Step` events in step order, then exactly one of `Finished`,
//! `Cancelled` or `Failed`. A run superseded before it starts gets only `Cancelled { steps_done: 0 }`.

use std::path::PathBuf;

use crate::analysis::WordSpan;
use crate::worker::plain::{Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan, StepCross};
// Edit mode.
pub use crate::analysis::alignment::{EditKind, WordChange, WordPair};
pub use crate::analysis::edit_spec::{
    BlendMask, CrossWindow, EditSpec, LocalBlendConfig, Reweight, SelfReplace, StepWindow,
};
// Segments view.
use crate::analysis::segment::LabelledSegmentation;
use crate::worker::segment::{SegmentFileExport, SegmentRequest};

/// Which model to load.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ModelSource {
    /// The model shipped with attend (`assets/attend-shapes/`).
    #[default]
    Bundled,
    /// A diffusers-layout model folder chosen by the user.
    Folder(PathBuf),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bundled => write!(f, "bundled model"),
            Self::Folder(path) => write!(f, "{}", path.display()),
        }
    }
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
        }
    }
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
    /// This step's cross-attention maps (conditional half, heads and layers averaged per group).
    pub cross: StepCross,
    /// Timings.
    pub timing: StepTiming,
}

/// One request to the worker. Each variant is answered by events (see the module docs).
#[derive(Clone, Debug)]
pub enum Command {
    /// Load a model. On failure the previous model stays loaded. Supersedes a running generation.
    LoadModel {
        /// Which model.
        source: ModelSource,
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

    // --- Segments view (issue #6, item 2) ---------------------------------------------------
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
    // --- end Segments view ---------------------------------------------------------------------

    // --- Edit mode (issue #5, items 3 and 4) --------------------------------------------------
    /// A Prompt-to-Prompt edit of `params`' image (replay mode). The engine keeps the source run's
    /// recording (latents and attention): when `params` match the recorded source (prompt, negative,
    /// seed, steps, size, scheduler, guidance) only the edited branch runs; otherwise the source is
    /// recorded first and reported as a normal run (`Started`, `Step`s, `Finished`). The edited
    /// branch is reported by [`Event::EditStarted`], [`Event::EditStep`]s and then exactly one of
    /// [`Event::EditFinished`], `Cancelled` or `Failed`. Supersedes (cancels) any earlier run.
    GenerateEdit {
        /// Id of this run, unique and increasing (assigned by the handle).
        run_id: u64,
        /// The source run's parameters.
        params: GenerateParams,
        /// The edit; `None` only records the source (so that later edits need no source run).
        spec: Option<EditSpec>,
    },
    // --- end Edit mode -------------------------------------------------------------------------
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
    /// A run started; the prompt is tokenised.
    Started {
        /// The run.
        run_id: u64,
        /// Its parameters, with defaults resolved (size, scheduler).
        params: GenerateParams,
        /// How the prompt was tokenised.
        prompt: PromptInfo,
    },
    /// One denoising step is done.
    Step {
        /// The run.
        run_id: u64,
        /// The step's preview, maps and timings.
        frame: Box<StepFrame>,
    },
    /// The run finished.
    Finished {
        /// The run.
        run_id: u64,
        /// The final image.
        image: RgbImage,
        /// Seconds the whole run took.
        elapsed_secs: f64,
        /// Resolutions `(h, w)` at which self-attention was kept (for the probe).
        self_attention_grids: Vec<(usize, usize)>,
    },
    /// The run was cancelled (or superseded) after `steps_done` steps.
    Cancelled {
        /// The run.
        run_id: u64,
        /// Steps completed before it stopped.
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

    // --- Segments view (issue #6, item 2) ---------------------------------------------------
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
    // --- end Segments view ---------------------------------------------------------------------

    // --- Edit mode (issue #5, items 3 and 4) --------------------------------------------------
    /// The edited branch of a [`Command::GenerateEdit`] started.
    EditStarted {
        /// The run.
        run_id: u64,
        /// The edited prompt, the alignment, and whether the source was reused.
        info: EditInfo,
    },
    /// One step of the edited branch is done.
    EditStep {
        /// The run.
        run_id: u64,
        /// The edited run's preview, maps and timings.
        frame: Box<StepFrame>,
        /// The local-blend mask applied after this step (latent resolution), if one was.
        blend_mask: Option<BlendMask>,
    },
    /// The edited branch finished.
    EditFinished {
        /// The run.
        run_id: u64,
        /// The edited image.
        image: RgbImage,
        /// Seconds the edited branch took.
        elapsed_secs: f64,
        /// The last local-blend mask applied (latent resolution), if any.
        blend_mask: Option<BlendMask>,
    },
    // --- end Edit mode -------------------------------------------------------------------------
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
            | Self::EditStarted { run_id, .. }
            | Self::EditStep { run_id, .. }
            | Self::EditFinished { run_id, .. } => Some(*run_id),
            Self::Failed { run_id, .. } => *run_id,
            _ => None,
        }
    }
}

// --- Edit mode (issue #5, items 3 and 4) ----------------------------------------------------------

/// What the UI learns when an edit's edited branch starts.
#[derive(Clone, Debug, PartialEq)]
pub struct EditInfo {
    /// How the edited prompt was tokenised.
    pub edit_prompt: PromptInfo,
    /// Word swap or refine (as given, or inferred from the word counts).
    pub kind: EditKind,
    /// The word-to-word alignment (source word -> edited word, added and removed words).
    pub words: Vec<WordPair>,
    /// True when the source's recording of an earlier run was reused (no source run this time).
    pub source_reused: bool,
    /// How many times this engine has recorded a source so far (for tests and the status line).
    pub source_recordings: u64,
}
