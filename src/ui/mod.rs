//! The eframe window: prompt and settings panels, the canvas with the heat map blended over the
//! image (drawn by `shaders/heatmap.wgsl`), the token strip, the timeline and exports.
//! The only module that uses egui; it holds no tensors (it talks to [`crate::worker`] in plain data).
//!
//! Views are components: each view owns its state, draws from a read-only [`context::ViewContext`]
//! (the shared [`state::AppState`] and facts of the frame) and asks for changes with
//! [`command::UiCommand`]s, which [`EditorApp`] applies in one place. No view calls another; the app
//! lays them out, and each worker event is routed once (`events`).
//!
//! | module | what it is |
//! |---|---|
//! | `app` | [`EditorApp`]: holds the shared state and the views' states, lays out the frame, applies commands, sends to the worker |
//! | `state` | [`state::AppState`]: what the views share (settings, model, run, selection, timeline, probe, heat maps, status, modes) |
//! | `context` | [`context::ViewContext`]: the read-only view of the state a view draws from |
//! | `command` | [`command::UiCommand`]: every change a view can ask for |
//! | `checks` | the generation parameters' checks before a run (the command line's ranges) |
//! | `events` | the worker's events, each routed once to the state it belongs to |
//! | `mode` | the editor modes ([`ModeKind`]) and their state: plain generation, Prompt-to-Prompt edit |
//! | `run_view` | [`RunView`]: one run (or an edit's branch) as received: previews, maps, outcome |
//! | `panels` | menu bar, generation controls, view / aggregation / probe panel, progress, timeline, status |
//! | `canvas` | zoomable canvas, probe input, GPU or CPU drawing |
//! | `token_strip` | one live thumbnail per prompt word (with word weights in edit mode) |
//! | `edit` | edit mode: its state and events, spec helpers, the edit panel, the source / edited comparison |
//! | `style_set` | style set mode: target prompts, sharing options, the grid filling in live, each image's maps, export of all |
//! | `image_input` | real images: open / drop, fit, invert with progress, the preview pane, the image in sessions |
//! | `segments` | the Segments view: state and requests, panel (list, mask, exports), canvas overlay |
//! | `appearance` | the appearance transfer mode: slots, settings, run, output, masks, correspondence probe, exports |
//! | `exports` | image / heat map / attention / session exports as worker commands |
//! | `heatmap_renderer` | the wgpu pipeline behind `shaders/heatmap.wgsl` |
//! | `screenshot` | `ATTEND_SCREENSHOT` automation: select, probe, capture, quit |
//! | `settings`, `session` | persisted settings; session files (with the edit's part) |
//! | `dialogs`, `frame_times` | rfd dialogs on a helper thread (and the path field where none can open); frame build-time log |

mod app;
mod appearance;
mod canvas;
mod checks;
mod command;
mod context;
mod dialogs;
mod edit;
mod events;
mod exports;
mod frame_times;
pub mod heatmap_renderer;
mod image_input;
mod mode;
mod models_menu;
mod panels;
mod run_view;
mod screenshot;
mod segments;
mod session;
mod settings;
mod state;
mod style_set;
mod token_strip;

use std::path::PathBuf;
use std::sync::Arc;

pub use app::EditorApp;
pub use appearance::view::AppearancePane;
pub use appearance::{
    AppearanceSlotState, AppearanceTransfer, SlotSource, TransferOutcome, TransferRun,
};
pub use dialogs::{DialogOverride, DialogPurpose};
pub use frame_times::FrameTimeSummary;
pub use image_input::{SessionImage, SessionImageError};
pub use mode::ModeKind;
pub use run_view::{RunKey, RunOutcome, RunView};
pub use screenshot::{AppearanceShot, ScreenshotPlan};
pub use session::{
    CompareMode, EditBranchView, EditSession, Session, SessionError, SESSION_FORMAT,
};
pub use settings::{AggregationChoice, EditorSettings, ViewSettings, SETTINGS_STORAGE_KEY};
pub use state::{CanvasView, StatusLevel, StatusMessage};

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
    /// A real image to open at start (`ATTEND_IMAGE`): Generate inverts it, then replays it.
    pub image: Option<PathBuf>,
}

impl EditorOptions {
    /// Fills the developer options from the environment when not set:
    /// `ATTEND_FRAME_TIMES=file.csv`, `ATTEND_SCREENSHOT=file.png` (with `ATTEND_SCREENSHOT_WORD=word`
    /// and `ATTEND_SCREENSHOT_PROBE=y,x` in 0..1, or `ATTEND_SCREENSHOT_SEGMENTS=y,x`: the Segments
    /// view with the segment at that point selected), `ATTEND_ENGINE=fake`;
    /// `ATTEND_IMAGE=file` opens a real image at start (Generate inverts it, then replays it);
    /// `ATTEND_SCREENSHOT_EDIT=prompt` enters edit mode with that edited prompt and takes the
    /// screenshot once the edit finished; `ATTEND_SCREENSHOT_AT_STEP=n` takes it during the run,
    /// once n steps have arrived.
    pub fn with_environment(mut self) -> Self {
        if self.frame_times_path.is_none() {
            self.frame_times_path = std::env::var_os("ATTEND_FRAME_TIMES").map(PathBuf::from);
        }
        if self.screenshot.is_none() {
            self.screenshot = ScreenshotPlan::from_environment();
        }
        if self.image.is_none() {
            self.image = std::env::var_os("ATTEND_IMAGE").map(PathBuf::from);
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
            let mut app = EditorApp::new(
                options,
                settings,
                creation_context.wgpu_render_state.as_ref(),
                factory,
            )?;
            app.restore_models_menu(creation_context.storage);
            Ok(Box::new(app))
        }),
    )
    .map_err(|error| anyhow::anyhow!("the editor window failed: {error}"))
}
