//! The eframe window: prompt and settings panels, the canvas with the heat map blended over the
//! image (drawn by `shaders/heatmap.wgsl`), the token strip, the timeline and exports.
//! The only module that uses egui; it holds no tensors (it talks to [`crate::worker`] in plain data).
//!
//! | module | what it is |
//! |---|---|
//! | `app` | [`EditorApp`]: state, worker events, actions, frame layout |
//! | `panels` | menu bar, controls, view/aggregation/probe panel, progress, timeline, status |
//! | `canvas` | zoomable canvas, probe input, GPU or CPU drawing |
//! | `token_strip` | one live thumbnail per prompt word (with word weights in edit mode) |
//! | `edit_mode` | Prompt-to-Prompt edits: edited prompt, alignment, windows, local blend, source and edited images compared |
//! | `heatmap_renderer` | the wgpu pipeline behind `shaders/heatmap.wgsl` |
//! | `exports` | image / heat map / attention / session exports |
//! | `segments_view` | the Segments view: segment overlay, list, selection, mask, exports |
//! | `settings`, `session` | persisted settings and session files |
//! | `dialogs`, `frame_times` | rfd dialogs on a helper thread; frame build-time log |

mod app;
mod canvas;
mod dialogs;
mod edit_mode;
mod exports;
mod frame_times;
pub mod heatmap_renderer;
mod panels;
mod run_view;
mod segments_view;
mod session;
mod settings;
mod token_strip;

use std::path::PathBuf;
use std::sync::Arc;

pub use app::{EditorApp, ScreenshotPlan, StatusLevel, StatusMessage};
pub use dialogs::{DialogOverride, DialogPurpose};
pub use edit_mode::{CompareMode, EditBranchView, EditSession};
pub use frame_times::FrameTimeSummary;
pub use run_view::{RunOutcome, RunView};
pub use segments_view::CanvasView;
pub use session::{Session, SessionError, SESSION_FORMAT};
pub use settings::{AggregationChoice, EditorSettings, ViewSettings, SETTINGS_STORAGE_KEY};

use crate::worker::{EngineFactory, FakeEngine, FakeEngineConfig};

/// Which engine the editor drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// The real engine over [`crate::pipeline`] (real models).
    #[default]
    Pipeline,
    /// The synthetic engine (no model needed; for demos of the UI and tests).
    Fake,
}

/// How the editor starts (from the command line).
#[derive(Clone, Debug, Default)]
pub struct EditorOptions {
    /// Prompt to put in the prompt box.
    pub prompt: Option<String>,
    /// Negative prompt.
    pub negative_prompt: Option<String>,
    /// Seed.
    pub seed: Option<u64>,
    /// Number of steps.
    pub steps: Option<usize>,
    /// Model folder to load instead of the bundled (or last used) model.
    pub model: Option<PathBuf>,
    /// Generate as soon as the model is loaded.
    pub generate: bool,
    /// A session file to open (and regenerate).
    pub session: Option<PathBuf>,
    /// Which engine to use.
    pub engine: EngineKind,
    /// Log every frame's build time to this file (`ATTEND_FRAME_TIMES`).
    pub frame_times_path: Option<PathBuf>,
    /// Take a screenshot after the first run and quit (`ATTEND_SCREENSHOT`).
    pub screenshot: Option<ScreenshotPlan>,
}

impl EditorOptions {
    /// Fills the developer options from the environment when not set:
    /// `ATTEND_FRAME_TIMES=file.csv`, `ATTEND_SCREENSHOT=file.png` (with `ATTEND_SCREENSHOT_WORD=word`
    /// and `ATTEND_SCREENSHOT_PROBE=y,x` in 0..1, or `ATTEND_SCREENSHOT_SEGMENTS=y,x`: the Segments
    /// view with the segment at that point selected), `ATTEND_ENGINE=fake`;
    /// `ATTEND_SCREENSHOT_EDIT=prompt` enters edit mode with that edited prompt and takes the
    /// screenshot once the edit finished; `ATTEND_SCREENSHOT_AT_STEP=n` takes it during the run,
    /// once n steps have arrived.
    pub fn with_environment(mut self) -> Self {
        if self.frame_times_path.is_none() {
            self.frame_times_path = std::env::var_os("ATTEND_FRAME_TIMES").map(PathBuf::from);
        }
        if self.screenshot.is_none() {
            self.screenshot = std::env::var_os("ATTEND_SCREENSHOT").map(|path| ScreenshotPlan {
                path: PathBuf::from(path),
                select_word: std::env::var("ATTEND_SCREENSHOT_WORD").ok(),
                probe_point: std::env::var("ATTEND_SCREENSHOT_PROBE")
                    .ok()
                    .and_then(|text| {
                        let (y, x) = text.split_once(',')?;
                        Some((y.trim().parse().ok()?, x.trim().parse().ok()?))
                    }),
                settle_frames: 10,
                edit_prompt: std::env::var("ATTEND_SCREENSHOT_EDIT").ok(),
                segments_point: std::env::var("ATTEND_SCREENSHOT_SEGMENTS")
                    .ok()
                    .and_then(|text| {
                        let (y, x) = text.split_once(',')?;
                        Some((y.trim().parse().ok()?, x.trim().parse().ok()?))
                    }),
                at_step: std::env::var("ATTEND_SCREENSHOT_AT_STEP")
                    .ok()
                    .and_then(|text| text.trim().parse().ok()),
            });
        }
        if std::env::var("ATTEND_ENGINE").is_ok_and(|value| value == "fake") {
            self.engine = EngineKind::Fake;
        }
        self
    }
}

/// The engine factory for `kind`.
pub fn engine_factory(kind: EngineKind) -> EngineFactory {
    match kind {
        EngineKind::Fake => Arc::new(|| {
            Box::new(FakeEngine::new(FakeEngineConfig {
                step_delay: std::time::Duration::from_millis(60),
                ..FakeEngineConfig::default()
            }))
        }),
        EngineKind::Pipeline => crate::worker::pipeline_engine_factory(),
    }
}

/// Opens the editor window and runs until it is closed.
pub fn run_editor(options: EditorOptions) -> anyhow::Result<()> {
    let options = options.with_environment();
    let native_options = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: egui::ViewportBuilder::default()
            .with_title("attend")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 500.0]),
        ..eframe::NativeOptions::default()
    };
    let factory = engine_factory(options.engine);
    eframe::run_native(
        "attend",
        native_options,
        Box::new(move |creation_context| {
            let settings = creation_context
                .storage
                .and_then(|storage| eframe::get_value(storage, SETTINGS_STORAGE_KEY));
            let app = EditorApp::new(
                options,
                settings,
                creation_context.wgpu_render_state.as_ref(),
                factory,
            )?;
            Ok(Box::new(app))
        }),
    )
    .map_err(|error| anyhow::anyhow!("the editor window failed: {error}"))
}
