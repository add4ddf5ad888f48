//! The editor application: its state, the worker's events, user actions and the frame layout.
//! Panels live in sibling modules (`panels`, `canvas`, `token_strip`, `exports`) as `impl EditorApp`
//! blocks; each frame the app pulls events from the worker (never blocking) and redraws.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::analysis::heatmap::{word_heatmaps, Heatmap, SelfAttentionMap, SelfAttentionSpan};
use crate::ui::canvas::CanvasState;
use crate::ui::dialogs::{DialogOverride, DialogPurpose, Dialogs};
use crate::ui::edit_mode::EditState;
use crate::ui::frame_times::{FrameTimeSummary, FrameTimes};
use crate::ui::run_view::{RunOutcome, RunView};
use crate::ui::segments_view::SegmentsState;
use crate::ui::session::Session;
use crate::ui::settings::{AggregationChoice, EditorSettings, SETTINGS_STORAGE_KEY};
use crate::ui::token_strip::TokenStrip;
use crate::ui::EditorOptions;
use crate::worker::{EngineFactory, Event, ModelInfo, ModelSource, WorkerHandle};

/// How serious a status message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusLevel {
    /// Progress and results.
    Info,
    /// Something the user should know (prompt truncated, scheduler substituted).
    Warning,
    /// Something failed.
    Error,
}

/// One line of the status bar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMessage {
    /// How serious.
    pub level: StatusLevel,
    /// The text.
    pub text: String,
}

/// The model as the UI knows it.
#[derive(Clone, Debug, Default)]
pub(super) struct ModelState {
    /// The loaded model.
    pub(super) loaded: Option<ModelInfo>,
    /// A model being loaded.
    pub(super) loading: Option<ModelSource>,
}

/// The timeline: which step the canvas and heat maps show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct TimelineState {
    /// The step shown; `None` follows the latest step.
    pub(super) cursor: Option<usize>,
    /// Show that step's maps alone instead of everything up to it.
    pub(super) only_this_step: bool,
}

/// What the word heat maps were computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DerivedKey {
    run_id: u64,
    steps_received: usize,
    aggregation: AggregationChoice,
    visible_first: usize,
    visible_last: usize,
}

/// The word heat maps of the run on screen, recomputed only when their inputs change.
#[derive(Debug, Default)]
pub(super) struct DerivedMaps {
    key: Option<DerivedKey>,
    /// One per prompt word, at the attention grid size, min-max normalised.
    pub(super) heatmaps: Vec<Heatmap>,
    /// Grid `(h, w)` of the heat maps.
    pub(super) grid: (usize, usize),
    /// Increases on every recompute.
    pub(super) version: u64,
}

/// The self-attention probe.
#[derive(Clone, Debug, Default)]
pub(super) struct ProbeState {
    /// Probe mode: clicks on the canvas pick a query pixel.
    pub(super) enabled: bool,
    /// Query grid `(h, w)` to probe at.
    pub(super) grid: Option<(usize, usize)>,
    /// The probed point, in 0..1 image coordinates `(y, x)`.
    pub(super) point: Option<(f32, f32)>,
    /// The map received from the worker, with the run and span it belongs to.
    pub(super) map: Option<(u64, SelfAttentionSpan, SelfAttentionMap)>,
    /// The last request sent `(run, grid, span, steps received then)`: sent once per finished run,
    /// and again after each new step while the run goes on.
    pub(super) requested: Option<(u64, (usize, usize), SelfAttentionSpan, usize)>,
    /// A request is on its way to the worker (during a run, the next waits for its answer).
    pub(super) awaiting: bool,
}

/// A screenshot to take once the first run has finished (`ATTEND_SCREENSHOT`), then quit.
#[derive(Clone, Debug, PartialEq)]
pub struct ScreenshotPlan {
    /// Where to write the PNG.
    pub path: PathBuf,
    /// Select this word before taking it.
    pub select_word: Option<String>,
    /// Probe self-attention at this point `(y, x)` in 0..1 image coordinates.
    pub probe_point: Option<(f32, f32)>,
    /// Frames to wait after the run finished (lets the layout settle).
    pub settle_frames: u32,
    /// Enter edit mode with this edited prompt, and take the screenshot once the edit finished
    /// (`ATTEND_SCREENSHOT_EDIT`).
    pub edit_prompt: Option<String>,
    /// Show the Segments view and select the segment at this point `(y, x)` in 0..1 image
    /// coordinates (`ATTEND_SCREENSHOT_SEGMENTS`).
    pub segments_point: Option<(f32, f32)>,
    /// Take it during the run, once this many steps have arrived, instead of after the run
    /// (`ATTEND_SCREENSHOT_AT_STEP`).
    pub at_step: Option<usize>,
}

/// Progress of a [`ScreenshotPlan`].
#[derive(Debug, Default)]
struct ScreenshotProgress {
    prepared: bool,
    frames_after_finish: u32,
    requested: bool,
    written: Arc<AtomicBool>,
}

/// The editor.
pub struct EditorApp {
    pub(super) settings: EditorSettings,
    pub(super) worker: WorkerHandle,
    waker_installed: bool,
    pub(super) model: ModelState,
    pub(super) run: Option<RunView>,
    /// A run asked for whose `Started` has not arrived yet.
    pub(super) pending_run: Option<u64>,
    generate_after_load: bool,
    pub(super) selected_word: Option<usize>,
    pub(super) timeline: TimelineState,
    pub(super) derived: DerivedMaps,
    pub(super) canvas: CanvasState,
    pub(super) token_strip: TokenStrip,
    pub(super) probe: ProbeState,
    /// Edit mode (Prompt-to-Prompt).
    pub(super) edit: EditState,
    /// The Segments view.
    pub(super) segments: SegmentsState,
    pub(super) status: Vec<StatusMessage>,
    pub(super) dialogs: Dialogs,
    frame_times: FrameTimes,
    screenshot: Option<(ScreenshotPlan, ScreenshotProgress)>,
    pub(super) egui_ctx: Option<egui::Context>,
}

/// Status messages kept for the status bar's history.
const STATUS_HISTORY: usize = 50;

impl EditorApp {
    /// Builds the editor: starts the worker with `engine_factory`, restores `settings` (from eframe
    /// storage), applies `options` (CLI) and asks for the model. `render_state` enables the GPU
    /// canvas (without it the canvas is composed on the CPU).
    pub fn new(
        options: EditorOptions,
        settings: Option<EditorSettings>,
        render_state: Option<&egui_wgpu::RenderState>,
        engine_factory: EngineFactory,
    ) -> anyhow::Result<Self> {
        let worker = WorkerHandle::spawn(engine_factory)?;
        let gpu_canvas = render_state.is_some();
        if let Some(render_state) = render_state {
            crate::ui::heatmap_renderer::HeatmapRenderer::install(render_state);
        }
        let mut app = Self {
            settings: settings.unwrap_or_default(),
            worker,
            waker_installed: false,
            model: ModelState::default(),
            run: None,
            pending_run: None,
            generate_after_load: false,
            selected_word: None,
            timeline: TimelineState::default(),
            derived: DerivedMaps::default(),
            canvas: CanvasState::new(gpu_canvas),
            token_strip: TokenStrip::default(),
            probe: ProbeState::default(),
            edit: EditState::default(),
            segments: SegmentsState::default(),
            status: Vec::new(),
            dialogs: Dialogs::default(),
            frame_times: FrameTimes::new(options.frame_times_path.clone()),
            screenshot: options
                .screenshot
                .clone()
                .map(|plan| (plan, ScreenshotProgress::default())),
            egui_ctx: None,
        };
        app.apply_options(options);
        if let Some(prompt) = app
            .screenshot
            .as_ref()
            .and_then(|(plan, _)| plan.edit_prompt.clone())
        {
            app.enter_edit_mode(&prompt);
        }
        Ok(app)
    }

    /// Applies the CLI options: session, prompt, seed, model, generate.
    fn apply_options(&mut self, options: EditorOptions) {
        let mut generate = options.generate;
        if let Some(path) = &options.session {
            match Session::load(path) {
                Ok(session) => {
                    self.apply_session_settings(session);
                    generate = true;
                }
                Err(error) => self.push_status(StatusLevel::Error, error.to_string()),
            }
        }
        if let Some(prompt) = options.prompt {
            self.settings.params.prompt = prompt;
        }
        if let Some(negative_prompt) = options.negative_prompt {
            self.settings.params.negative_prompt = negative_prompt;
        }
        if let Some(seed) = options.seed {
            self.settings.params.seed = seed;
        }
        if let Some(steps) = options.steps {
            self.settings.params.steps = steps;
        }
        if let Some(folder) = options.model {
            self.settings.model = ModelSource::Folder(folder);
        }
        self.load_model(self.settings.model.clone());
        self.generate_after_load = generate;
    }

    /// Takes a session's settings (not yet generating).
    fn apply_session_settings(&mut self, session: Session) {
        self.settings.params = session.params;
        self.settings.model = session.model;
        self.settings.view = session.view;
        self.settings.aggregation = session.aggregation;
        self.selected_word = session.selected_word;
        self.apply_edit_session(session.edit);
    }

    /// Opens a session: settings, model (reloaded if different) and a fresh generation.
    pub(super) fn open_session(&mut self, session: Session) {
        let model_changed = self
            .model
            .loaded
            .as_ref()
            .is_none_or(|info| info.source != session.model);
        self.apply_session_settings(session);
        if model_changed {
            self.load_model(self.settings.model.clone());
            self.generate_after_load = true;
        } else {
            self.generate();
        }
    }

    /// The settings (for persistence and tests).
    pub fn settings(&self) -> &EditorSettings {
        &self.settings
    }

    /// The status messages, oldest first.
    pub fn status_messages(&self) -> &[StatusMessage] {
        &self.status
    }

    /// The loaded model, if any.
    pub fn loaded_model(&self) -> Option<&ModelInfo> {
        self.model.loaded.as_ref()
    }

    /// The run on screen, if any.
    pub fn run_view(&self) -> Option<&RunView> {
        self.run.as_ref()
    }

    /// True while a generation is asked for or running.
    pub fn is_generating(&self) -> bool {
        self.pending_run.is_some()
            || self.run.as_ref().is_some_and(RunView::is_running)
            || self.edit_is_running()
    }

    /// The word heat maps on screen.
    pub fn word_heatmaps(&self) -> &[Heatmap] {
        &self.derived.heatmaps
    }

    /// The selected word (index into the prompt's words).
    pub fn selected_word(&self) -> Option<usize> {
        self.selected_word
    }

    /// The view settings, to change them from outside the UI (tests, scripts).
    pub fn view_settings_mut(&mut self) -> &mut crate::ui::settings::ViewSettings {
        &mut self.settings.view
    }

    /// Where the image was drawn last frame, in points.
    pub fn canvas_image_rect(&self) -> Option<egui::Rect> {
        self.canvas.image_rect
    }

    /// The heat grid on the canvas: `(width, height, values)`, values in 0..1; `None` when no heat
    /// map is shown.
    pub fn canvas_heat(&self) -> Option<(usize, usize, &[f32])> {
        let heat = self.canvas.heat();
        (heat.version != 0).then_some((
            heat.width as usize,
            heat.height as usize,
            heat.values.as_slice(),
        ))
    }

    /// True while an `ATTEND_SCREENSHOT` plan is active (hover tooltips are left out of the picture).
    pub(super) fn taking_screenshot(&self) -> bool {
        self.screenshot.is_some()
    }

    /// The probe's point `(y, x)` in 0..1 image coordinates, when probing.
    pub fn probe_point(&self) -> Option<(f32, f32)> {
        self.probe.enabled.then_some(self.probe.point).flatten()
    }

    /// The step the canvas and heat maps show (the timeline's position), if any step arrived.
    pub fn timeline_step(&self) -> Option<usize> {
        self.visible_steps().map(|(_, last)| last)
    }

    /// Number of word thumbnails in the token strip.
    pub fn thumbnail_count(&self) -> usize {
        self.token_strip.len()
    }

    /// Frame build-time percentiles so far.
    pub fn frame_time_summary(&self) -> Option<FrameTimeSummary> {
        self.frame_times.summary()
    }

    /// Answers file dialogs with `answer` instead of showing them (tests, scripted use).
    pub fn answer_dialogs_with(&mut self, answer: DialogOverride) {
        self.dialogs.set_override(answer);
    }

    pub(super) fn push_status(&mut self, level: StatusLevel, text: impl Into<String>) {
        self.status.push(StatusMessage {
            level,
            text: text.into(),
        });
        if self.status.len() > STATUS_HISTORY {
            self.status.remove(0);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Actions
    // ---------------------------------------------------------------------------------------------

    /// Starts a generation with the current parameters (superseding a running one).
    pub(super) fn generate(&mut self) {
        if self.model.loaded.is_none() {
            if self.model.loading.is_some() {
                self.generate_after_load = true;
                self.push_status(StatusLevel::Info, "Will generate once the model is loaded");
            } else {
                self.push_status(
                    StatusLevel::Error,
                    "No model is loaded: open a model folder first",
                );
            }
            return;
        }
        if self.edit_mode() {
            self.generate_edit_run(self.settings.params.clone());
            return;
        }
        match self.worker.generate(self.settings.params.clone()) {
            Ok(run_id) => {
                // The run on screen is superseded; its own late events will be dropped.
                if let Some(run) = self.run.as_mut().filter(|run| run.is_running()) {
                    run.outcome = RunOutcome::Cancelled {
                        steps_done: run.steps.len(),
                    };
                }
                self.pending_run = Some(run_id);
            }
            Err(error) => self.push_status(StatusLevel::Error, format!("Cannot generate: {error}")),
        }
    }

    /// Cancels the running generation.
    pub(super) fn cancel(&mut self) {
        if let Err(error) = self.worker.cancel() {
            self.push_status(StatusLevel::Error, format!("Cannot cancel: {error}"));
        }
    }

    /// Loads a model; the current one stays until the new one is ready.
    pub(super) fn load_model(&mut self, source: ModelSource) {
        match self.worker.load_model(source.clone()) {
            Ok(()) => {
                self.push_status(StatusLevel::Info, format!("Loading {source}..."));
                self.model.loading = Some(source);
                self.pending_run = None;
            }
            Err(error) => {
                self.push_status(StatusLevel::Error, format!("Cannot load {source}: {error}"))
            }
        }
    }

    /// Opens a dialog; its answer is handled in [`Self::handle_dialog_answer`] on a later frame.
    pub(super) fn open_dialog(&mut self, purpose: DialogPurpose) {
        let file_name = self.default_file_name(&purpose);
        let start_folder = self.settings.export_folder.clone();
        let repaint = self.egui_ctx.clone();
        let opened = self
            .dialogs
            .open(purpose, start_folder, file_name, move || {
                if let Some(ctx) = &repaint {
                    ctx.request_repaint();
                }
            });
        if !opened {
            self.push_status(StatusLevel::Warning, "A file dialog is already open");
        }
    }

    fn default_file_name(&self, purpose: &DialogPurpose) -> String {
        if let Some(name) = self.segments_file_name(purpose) {
            return name;
        }
        let seed = self
            .run
            .as_ref()
            .map_or(self.settings.params.seed, |run| run.params.seed);
        let word = self
            .selected_word
            .and_then(|index| self.derived.heatmaps.get(index))
            .map_or_else(
                || "heatmap".to_owned(),
                |heatmap| sanitize_file_stem(&heatmap.word),
            );
        match purpose {
            DialogPurpose::SaveSession => format!("attend-{seed}.session.json"),
            DialogPurpose::ExportAttention => format!("attend-{seed}.attention.safetensors"),
            DialogPurpose::ExportHeatmapOverImage => format!("attend-{seed}-{word}-over.png"),
            DialogPurpose::ExportHeatmapAlone => format!("attend-{seed}-{word}.png"),
            _ => format!("attend-{seed}.png"),
        }
    }

    fn handle_dialog_answer(&mut self, purpose: DialogPurpose, path: Option<PathBuf>) {
        let Some(path) = path else {
            return;
        };
        let folder = if purpose == DialogPurpose::ExportAllHeatmaps {
            Some(path.clone())
        } else {
            path.parent().map(PathBuf::from)
        };
        if purpose != DialogPurpose::OpenModelFolder {
            self.settings.export_folder = folder;
        }
        match purpose {
            DialogPurpose::OpenModelFolder => self.load_model(ModelSource::Folder(path)),
            DialogPurpose::OpenSession => match Session::load(&path) {
                Ok(session) => self.open_session(session),
                Err(error) => self.push_status(StatusLevel::Error, error.to_string()),
            },
            DialogPurpose::SaveSession => self.save_session(path),
            DialogPurpose::ExportImage => self.export_image(path),
            DialogPurpose::ExportHeatmapOverImage => self.export_heatmap(path, true),
            DialogPurpose::ExportHeatmapAlone => self.export_heatmap(path, false),
            DialogPurpose::ExportAllHeatmaps => self.export_all_heatmaps(&path),
            DialogPurpose::ExportAttention => self.export_attention(path),
            DialogPurpose::ExportSegmentMask
            | DialogPurpose::ExportSegmentLabels
            | DialogPurpose::ExportSegmentsJson => self.export_segments_file(&purpose, path),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Events from the worker
    // ---------------------------------------------------------------------------------------------

    fn handle_event(&mut self, event: Event) {
        let Some(event) = self.take_edit_event(event) else {
            return;
        };
        let current_run = self.pending_run.or(self.run.as_ref().map(|run| run.run_id));
        if let Some(run_id) = event.run_id() {
            // The run on screen may still finish after a newer request went out (an edit that
            // superseded it mid-way reuses its finished source): its image is kept.
            let finishes_run_on_screen = matches!(event, Event::Finished { .. })
                && self.run.as_ref().is_some_and(|run| run.run_id == run_id);
            let for_shown_run = Some(run_id) == current_run || finishes_run_on_screen;
            if !for_shown_run && !matches!(event, Event::Failed { .. }) {
                // A superseded run: its late events are dropped.
                return;
            }
        }
        match event {
            Event::ModelLoaded { info } => {
                self.push_status(StatusLevel::Info, format!("Model loaded: {}", info.name));
                for warning in &info.warnings {
                    self.push_status(StatusLevel::Warning, warning.clone());
                }
                if self.model.loaded.as_ref().map(|loaded| &loaded.source) != Some(&info.source) {
                    self.settings.params.width_px = None;
                    self.settings.params.height_px = None;
                }
                self.settings.model = info.source.clone();
                self.model.loaded = Some(info);
                self.model.loading = None;
                self.follow_model_edit_defaults();
                if std::mem::take(&mut self.generate_after_load) {
                    self.generate();
                }
            }
            Event::ModelLoadFailed { source, message } => {
                self.model.loading = None;
                self.generate_after_load = false;
                let keeping = self.model.loaded.as_ref().map_or_else(
                    || "no model is loaded".to_owned(),
                    |info| format!("keeping {}", info.name),
                );
                self.push_status(
                    StatusLevel::Error,
                    format!("Could not load {source}: {message} ({keeping})"),
                );
            }
            Event::Started {
                run_id,
                params,
                prompt,
                ..
            } => {
                for warning in &prompt.warnings {
                    self.push_status(StatusLevel::Warning, warning.clone());
                }
                let word_count = prompt.words.len();
                self.pending_run = None;
                self.run = Some(RunView::new(run_id, params, prompt));
                self.timeline.cursor = None;
                if self.selected_word.is_some_and(|index| index >= word_count) {
                    self.selected_word = None;
                }
                self.probe.map = None;
                self.probe.requested = None;
                self.probe.awaiting = false;
            }
            Event::Step { frame, .. } => {
                if let Some(run) = &mut self.run {
                    run.push_step(*frame);
                }
            }
            Event::Finished {
                image,
                elapsed_secs,
                self_attention_grids,
                ..
            } => {
                if let Some(run) = &mut self.run {
                    run.final_image = Some(image);
                    run.outcome = RunOutcome::Finished { elapsed_secs };
                    run.self_attention_grids = self_attention_grids;
                }
                self.push_status(StatusLevel::Info, format!("Done in {elapsed_secs:.1} s"));
            }
            Event::Cancelled { run_id, steps_done } => {
                if self.pending_run == Some(run_id) {
                    self.pending_run = None;
                }
                // A superseded edit run may be cancelled after its source part finished: the
                // finished source stays finished (a later edit reuses it).
                if let Some(run) = self
                    .run
                    .as_mut()
                    .filter(|run| run.run_id == run_id && run.is_running())
                {
                    run.outcome = RunOutcome::Cancelled { steps_done };
                }
                self.push_status(
                    StatusLevel::Info,
                    format!("Cancelled after {steps_done} step(s)"),
                );
            }
            Event::Failed { run_id, message } => {
                if let Some(run_id) = run_id {
                    if self.pending_run == Some(run_id) {
                        self.pending_run = None;
                    }
                    if let Some(run) = self
                        .run
                        .as_mut()
                        .filter(|run| run.run_id == run_id && run.is_running())
                    {
                        run.outcome = RunOutcome::Failed(message.clone());
                    }
                }
                self.push_status(StatusLevel::Error, message);
            }
            Event::Warning { message } => self.push_status(StatusLevel::Warning, message),
            Event::SelfAttention { run_id, map } => match map {
                Some(map) => {
                    self.probe.awaiting = false;
                    let span = self
                        .probe
                        .requested
                        .map_or(self.settings.probe_span, |(_, _, span, _)| span);
                    self.probe.map = Some((run_id, span, map));
                }
                None => {
                    self.probe.awaiting = false;
                    self.push_status(
                        StatusLevel::Warning,
                        "No self-attention was kept at that resolution for this run",
                    );
                }
            },
            Event::Exported { path } => {
                self.push_status(StatusLevel::Info, format!("Wrote {}", path.display()));
            }
            Event::ExportFailed { path, message } => {
                self.push_status(
                    StatusLevel::Error,
                    format!("Could not write {}: {message}", path.display()),
                );
            }
            Event::Segmented {
                run_id,
                request,
                result,
                secs,
            } => self.handle_segmented(run_id, request, result, secs),
            Event::WorkerRestarted { message } => {
                self.pending_run = None;
                self.segments_worker_restarted();
                if self.model.loaded.take().is_some() {
                    // The worker reloads the last model on its fresh engine.
                    self.model.loading = Some(self.settings.model.clone());
                }
                self.push_status(
                    StatusLevel::Error,
                    format!("The engine crashed ({message}); it was restarted"),
                );
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Derived data
    // ---------------------------------------------------------------------------------------------

    /// The step range the heat maps cover: everything up to the timeline's step, or that step alone.
    pub(super) fn visible_steps(&self) -> Option<(usize, usize)> {
        let run = self.shown_run()?;
        let last = run.cross.len().checked_sub(1)?;
        let cursor = self.timeline.cursor.unwrap_or(last).min(last);
        Some(if self.timeline.only_this_step {
            (cursor, cursor)
        } else {
            (0, cursor)
        })
    }

    /// Recomputes the word heat maps if the run, the timeline or the aggregation changed.
    fn update_derived_maps(&mut self) {
        let shown = if self.shows_edited_run() {
            &self.edit.run
        } else {
            &self.run
        };
        let Some(run) = shown else {
            if self.derived.key.is_some() {
                self.derived = DerivedMaps::default();
            }
            return;
        };
        let Some((visible_first, visible_last)) = self.visible_steps() else {
            return;
        };
        let key = DerivedKey {
            run_id: run.run_id,
            steps_received: run.cross.len(),
            aggregation: self.settings.aggregation.clone(),
            visible_first,
            visible_last,
        };
        if self.derived.key.as_ref() == Some(&key) {
            return;
        }
        let grid = run.cross_grids().first().copied().unwrap_or((1, 1));
        let settings = self
            .settings
            .aggregation
            .to_settings(visible_first..=visible_last);
        let (first, last) = (*settings.steps.start(), *settings.steps.end());
        // One summed step instead of the whole window keeps the cost per frame independent of the
        // number of steps.
        self.derived.heatmaps = match run.summed_cross(first, last).filter(|_| first <= last) {
            Some(summed) => {
                let all_steps = crate::analysis::heatmap::AggregationSettings {
                    steps: 0..=usize::MAX,
                    ..settings
                };
                word_heatmaps(&[summed], &run.prompt.words, &all_steps, grid.0, grid.1)
            }
            None => word_heatmaps(&run.cross, &run.prompt.words, &settings, grid.0, grid.1),
        };
        self.derived.grid = grid;
        self.derived.version += 1;
        self.derived.key = Some(key);
        if self.selected_word.is_none() {
            self.selected_word = self
                .derived
                .heatmaps
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.peak.total_cmp(&b.1.peak))
                .map(|(index, _)| index);
        }
    }

    /// Asks the worker for self-attention when the probe needs a map it does not have.
    fn request_probe_map(&mut self) {
        if !self.probe.enabled {
            return;
        }
        let Some(run) = &self.run else {
            return;
        };
        if run.cross.is_empty() {
            return;
        }
        let grids = run.probe_grids();
        let Some(grid) = self
            .probe
            .grid
            .filter(|grid| grids.contains(grid))
            .or_else(|| grids.first().copied())
        else {
            return;
        };
        self.probe.grid = Some(grid);
        let wanted = (run.run_id, grid, self.settings.probe_span, run.steps.len());
        if self.probe.requested == Some(wanted) {
            return;
        }
        // While the run goes on, ask again after each step, but only once the last answer is in.
        let same_query = self
            .probe
            .requested
            .is_some_and(|(run_id, old_grid, span, _)| {
                (run_id, old_grid, span) == (wanted.0, wanted.1, wanted.2)
            });
        if same_query && self.probe.awaiting && run.is_running() {
            return;
        }
        let command = crate::worker::Command::RequestSelfAttention {
            run_id: run.run_id,
            grid_h: grid.0,
            grid_w: grid.1,
            span: self.settings.probe_span,
        };
        match self.worker.send(command) {
            Ok(()) => {
                self.probe.requested = Some(wanted);
                self.probe.awaiting = true;
            }
            Err(error) => self.push_status(StatusLevel::Error, format!("Cannot probe: {error}")),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The frame
    // ---------------------------------------------------------------------------------------------

    /// Takes the worker's events and finished dialogs (never blocks). Runs before every frame, and
    /// also while the window is hidden, so the worker is never held up by a full event queue.
    fn pump(&mut self, ctx: &egui::Context) {
        if !self.waker_installed {
            let waker_ctx = ctx.clone();
            self.worker.set_waker(move || waker_ctx.request_repaint());
            self.waker_installed = true;
            self.egui_ctx = Some(ctx.clone());
        }
        while let Some(event) = self.worker.try_recv() {
            self.handle_event(event);
        }
        while let Some((purpose, path)) = self.dialogs.poll() {
            self.handle_dialog_answer(purpose, path);
        }
    }

    /// Builds one frame. Called by eframe (through [`eframe::App::ui`]) and by tests.
    pub fn frame_ui(&mut self, ui: &mut egui::Ui) {
        self.frame_times.begin_frame();
        let ctx = ui.ctx().clone();
        self.pump(&ctx);
        self.edit_auto_run(ui);
        if ui.input_mut(|input| input.consume_key(egui::Modifiers::COMMAND, egui::Key::Enter)) {
            self.generate();
        }
        self.update_derived_maps();
        self.request_probe_map();
        self.update_segments();

        self.menu_bar_ui(ui);
        egui::Panel::bottom("attend.bottom")
            .resizable(false)
            .show(ui, |ui| self.bottom_panel_ui(ui));
        egui::Panel::left("attend.controls")
            .resizable(true)
            .default_size(280.0)
            .show(ui, |ui| self.controls_panel_ui(ui));
        egui::Panel::right("attend.view")
            .resizable(true)
            .default_size(250.0)
            .show(ui, |ui| self.view_panel_ui(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            // Edit mode compares source and edited images; otherwise the plain canvas.
            if !self.edit_canvas_ui(ui) {
                self.canvas_ui(ui);
            }
        });

        self.screenshot_step(&ctx);
        self.frame_times.end_frame();
    }

    /// Drives an `ATTEND_SCREENSHOT` plan: select, probe, wait, capture, quit.
    fn screenshot_step(&mut self, ctx: &egui::Context) {
        let wants_edit = self
            .screenshot
            .as_ref()
            .is_some_and(|(plan, _)| plan.edit_prompt.is_some());
        let at_step = self.screenshot.as_ref().and_then(|(plan, _)| plan.at_step);
        let finished = match at_step {
            Some(steps) => self
                .run
                .as_ref()
                .is_some_and(|run| run.steps.len() >= steps),
            None => {
                self.run
                    .as_ref()
                    .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
                    && (!wants_edit || self.edit_finished())
            }
        };
        let Some((plan, progress)) = &mut self.screenshot else {
            return;
        };
        if progress.written.load(Ordering::SeqCst) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        if !finished || progress.requested {
            return;
        }
        if progress.frames_after_finish == 0 && !progress.prepared {
            progress.prepared = true;
            let plan = plan.clone();
            if let Some(word) = &plan.select_word {
                self.selected_word = self
                    .derived
                    .heatmaps
                    .iter()
                    .position(|heatmap| &heatmap.word == word);
            }
            if let Some(point) = plan.probe_point {
                self.probe.enabled = true;
                self.probe.point = Some(point);
            }
            if plan.segments_point.is_some() {
                self.screenshot_show_segments();
            }
        }
        let mut probe_pending = self.probe.enabled && self.probe.map.is_none();
        let segments_point = self
            .screenshot
            .as_ref()
            .and_then(|(plan, _)| plan.segments_point);
        if let Some(point) = segments_point {
            probe_pending |= self.screenshot_segments_pending(point);
        }
        let Some((plan, progress)) = &mut self.screenshot else {
            return;
        };
        ctx.request_repaint();
        if probe_pending {
            // Wait for the self-attention map before counting frames.
            return;
        }
        progress.frames_after_finish += 1;
        if progress.frames_after_finish < plan.settle_frames {
            return;
        }
        progress.requested = true;
        let path = plan.path.clone();
        let written = Arc::clone(&progress.written);
        let repaint_ctx = ctx.clone();
        ctx.request_screenshot(move |image| {
            let rgb: Vec<u8> = image
                .pixels
                .iter()
                .flat_map(|pixel| [pixel.r(), pixel.g(), pixel.b()])
                .collect();
            let [width, height] = image.size;
            if let Err(error) =
                crate::analysis::export::write_png_rgb(&path, width, height, &rgb, None)
            {
                eprintln!("attend: screenshot: {error}");
            }
            written.store(true, Ordering::SeqCst);
            repaint_ctx.request_repaint();
        });
    }

    /// Saves settings to eframe storage.
    fn save_settings(&self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_STORAGE_KEY, &self.settings);
    }
}

impl eframe::App for EditorApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.pump(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame_ui(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        self.save_settings(storage);
    }

    fn on_exit(&mut self) {
        self.frame_times.finish();
    }
}

/// A word made safe for a file name (letters, digits, `-`, `_`).
pub(super) fn sanitize_file_stem(text: &str) -> String {
    let stem: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() {
        "word".to_owned()
    } else {
        stem
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{FakeEngine, FakeEngineConfig, GenerateParams, PromptInfo, RgbImage};

    fn app() -> EditorApp {
        let factory: EngineFactory =
            Arc::new(|| Box::new(FakeEngine::new(FakeEngineConfig::default())));
        EditorApp::new(EditorOptions::default(), None, None, factory).unwrap()
    }

    /// An edit that superseded a run mid-way may reuse that run's finished source: the worker then
    /// reports the source finished (after the newer request went out) and the old edit cancelled.
    /// The source on screen must end finished with its image, whatever order those come in.
    #[test]
    fn a_superseded_runs_finished_source_stays_finished() {
        let mut app = app();
        app.run = Some(RunView::new(
            2,
            GenerateParams::default(),
            PromptInfo::default(),
        ));
        // The newer edit (run 3) went out; sending it marked the running source cancelled.
        app.pending_run = Some(3);
        if let Some(run) = app.run.as_mut() {
            run.outcome = RunOutcome::Cancelled { steps_done: 3 };
        }
        let image = RgbImage {
            width: 1,
            height: 1,
            pixels: vec![1, 2, 3],
        };
        app.handle_event(Event::Finished {
            run_id: 2,
            branch: crate::worker::Branch::Source,
            image: image.clone(),
            elapsed_secs: 0.5,
            self_attention_grids: Vec::new(),
            blend_mask: None,
        });
        app.handle_event(Event::Cancelled {
            run_id: 2,
            steps_done: 3,
        });
        let run = app.run.as_ref().unwrap();
        assert!(matches!(run.outcome, RunOutcome::Finished { .. }));
        assert_eq!(run.final_image, Some(image));
        assert_eq!(
            app.pending_run,
            Some(3),
            "the newer request is still awaited"
        );

        // A late event of some other, superseded run is still dropped.
        app.handle_event(Event::Finished {
            run_id: 1,
            branch: crate::worker::Branch::Source,
            image: RgbImage::default(),
            elapsed_secs: 0.1,
            self_attention_grids: Vec::new(),
            blend_mask: None,
        });
        assert_eq!(app.run.as_ref().unwrap().run_id, 2);
        assert_eq!(
            app.run
                .as_ref()
                .unwrap()
                .final_image
                .as_ref()
                .unwrap()
                .pixels,
            vec![1, 2, 3]
        );
    }
}
