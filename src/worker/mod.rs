//! The editor's background thread: owns the diffusion engine, runs typed [`Command`]s and reports
//! [`Event`]s over bounded channels. No egui here and no tensors in any message (plain `Vec`s with
//! shapes), so the UI stays free of candle and the worker free of egui.
//!
//! | module | what it is |
//! |---|---|
//! | `protocol` | [`Command`], [`Event`] and their plain-data payloads |
//! | `plain` | images and attention maps as `Vec`s with shapes |
//! | `backend` | the [`Engine`] trait the thread drives and the [`RunObserver`] it reports to |
//! | `thread` | [`WorkerHandle`] and the worker loop (supersede, cancel, panic recovery) |
//! | `engine` | [`PipelineEngine`]: the real engine over the candle pipeline and the attention store |
//! | `fake` | [`FakeEngine`]: synthetic images and maps, for tests |
//! | `export` | atomic file writes for exports |
//! | `segment` | segmenting a finished run for the Segments view; segmentation file exports |
//! | `style_set` | style sets (Style Aligned): their parameters, checks and output |
//! | `appearance` | appearance transfer: its request, streamed updates, result and correspondence |

mod appearance;
mod backend;
mod engine;
mod error;
mod export;
mod fake;
mod plain;
mod protocol;
mod segment;
mod style_set;
mod thread;

pub use backend::{
    check_inversion_request, psnr_db, EditRunOutput, Engine, InversionOutput, RunObserver,
    RunOutput, SelfAttentionQuery,
};
pub use engine::{
    bundled_model_dir, pipeline_engine_factory, product_precision_for, PipelineEngine,
    BUNDLED_MODEL_FOLDER, BUNDLED_MODEL_PRODUCTS,
};
pub use error::{Disconnected, EngineError, SendCommandError};
pub use export::{write_png_file, write_text_file};
pub use fake::{FakeEngine, FakeEngineConfig, StepGate, FAKE_SET_MAX_PIXELS};
pub use plain::{CrossGroup, Heatmap, RgbImage, SelfAttentionMap, SelfAttentionSpan, StepCross};
pub use protocol::{
    Branch, Command, Event, GenerateParams, ModelInfo, ModelLoadProgress, ModelSource, PngExport,
    Products, PromptInfo, StepFrame, StepTiming,
};
pub use segment::{SegmentFileExport, SegmentRequest};
pub use thread::{EngineFactory, Waker, WorkerHandle, COMMAND_CAPACITY, EVENT_CAPACITY};
// Prompt-to-Prompt edits.
pub use protocol::{
    BlendMask, CrossWindow, EditInfo, EditKind, EditSpec, LocalBlendConfig, Reweight, SelfReplace,
    StepWindow, WordChange, WordPair,
};
// Real images.
pub use protocol::{
    InversionParams, InvertedImageSwap, SourceImage, DEFAULT_INVERSION_METHOD, INVERSION_METHODS,
    INVERTED_IMAGE_SWAP,
};
// Style sets.
pub use style_set::{check_style_set_params, StyleAlignedConfig, StyleSetOutput, StyleSetParams};
// Appearance transfer.
pub use appearance::{
    check_appearance_params, AppearanceInput, AppearanceMasks, AppearanceResult,
    AppearanceSettings, AppearanceSlot, AppearanceTransferParams, AppearanceUpdate, Correspondence,
    LabelledMask,
};
