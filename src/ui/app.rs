//! The editor application: it holds the shared state ([`AppState`]) and each view's own state,
//! lays out the frame, and applies the views' [`UiCommand`]s in one place. Each frame it pulls the
//! worker's events (never blocking) and hands each to [`route_event`], draws the views from a
//! read-only [`ViewContext`], then applies what they asked for.

use std::path::{Path, PathBuf};

use crate::analysis::heatmap::Heatmap;
use crate::analysis::png_parameters::PngParameters;
use crate::analysis::segment::{LabelledSegmentation, Mask, SegmentMethod};
use crate::ui::appearance::panel::{appearance_panel_ui, appearance_side_panel_ui, mode_switch_ui};
use crate::ui::appearance::view::{appearance_view_ui, AppearancePane, AppearanceView};
use crate::ui::appearance::{self, AppearanceTransfer};
use crate::ui::canvas::{canvas_ui, CanvasState};
use crate::ui::checks::check_params;
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::dialogs::{
    path_field_ui, DialogAnswer, DialogOverride, DialogPurpose, Dialogs, PathField,
};
use crate::ui::edit::compare::{compare_panes_ui, compare_ui, compares, CompareView};
use crate::ui::edit::panel::{edit_panel_ui, EditPanel};
use crate::ui::edit::NOTHING_TO_EDIT;
use crate::ui::events::{route_event, AfterEvent};
use crate::ui::exports::{current_session, default_file_name, export_command, ExportSources};
use crate::ui::frame_times::{FrameTimeSummary, FrameTimes};
use crate::ui::image_input::{self, ImageCommand, ImagePane, SessionImage};
use crate::ui::mode::ModeKind;
use crate::ui::models_menu::{dropped_model_paths, ModelsMenu, MODELS_MENU_STORAGE_KEY};
use crate::ui::panels;
use crate::ui::run_view::RunView;
use crate::ui::screenshot::{Screenshot, ScreenshotWatch};
use crate::ui::segments::overlay::segments_overlay_ui;
use crate::ui::segments::panel::segments_panel_ui;
use crate::ui::segments::SegmentsState;
use crate::ui::session::{CompareMode, Session};
use crate::ui::settings::{EditorSettings, ViewSettings, SETTINGS_STORAGE_KEY};
use crate::ui::state::{AppState, CanvasView, StatusLevel, StatusMessage};
use crate::ui::style_set::panel::style_set_panel_ui;
use crate::ui::style_set::view::{style_set_grid_ui, StyleSetView};
use crate::ui::style_set::StyleSetCommand;
use crate::ui::token_strip::{token_strip_ui, TokenStrip};
use crate::ui::EditorOptions;
use crate::worker::{
    BlendMask, Command, EditInfo, EditSpec, EngineFactory, Event, GenerateParams, ModelInfo,
    ModelSource, Products, WorkerHandle,
};

/// Each view's own state (what no other view reads).
struct Views {
    canvas: CanvasState,
    token_strip: TokenStrip,
    segments: SegmentsState,
    edit_panel: EditPanel,
    compare: CompareView,
    /// The path field, open when a file dialog could not.
    path_field: Option<PathField>,
    /// The Models menu (discovered models, added folders, recent models).
    models_menu: ModelsMenu,
    /// The open real image's preview.
    image_pane: ImagePane,
    /// Style set mode's grid and word maps.
    style_set: StyleSetView,
    /// The appearance transfer's panes.
    appearance: AppearanceView,
}

/// The editor.
pub struct EditorApp {
    /// What the views share; changed only here.
    state: AppState,
    /// Each view's own state.
    views: Views,
    /// The commands the views asked for this frame.
    commands: UiCommands,
    worker: WorkerHandle,
    dialogs: Dialogs,
    frame_times: FrameTimes,
    screenshot: Option<Screenshot>,
    /// The egui context, once the first frame ran (the worker's waker is installed then).
    egui_ctx: Option<egui::Context>,
}

/// The read-only context of this frame's views (a free function, so that the views' own state can
/// be borrowed mutably beside it).
fn view_context<'a>(
    state: &'a AppState,
    views: &Views,
    dialogs: &Dialogs,
    screenshot: Option<&Screenshot>,
) -> ViewContext<'a> {
    ViewContext {
        state,
        dialog_open: dialogs.is_open() || views.path_field.is_some(),
        taking_screenshot: screenshot.is_some(),
        heat_shown: views.canvas.heat().version != 0,
    }
}

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
            state: AppState::new(settings.unwrap_or_default()),
            views: Views {
                canvas: CanvasState::new(gpu_canvas),
                token_strip: TokenStrip::default(),
                segments: SegmentsState::default(),
                edit_panel: EditPanel::default(),
                compare: CompareView::default(),
                path_field: None,
                models_menu: ModelsMenu::default(),
                image_pane: ImagePane::default(),
                style_set: StyleSetView::default(),
                appearance: AppearanceView::default(),
            },
            commands: UiCommands::default(),
            worker,
            dialogs: Dialogs::default(),
            frame_times: FrameTimes::new(options.frame_times_path.clone()),
            screenshot: options.screenshot.clone().map(Screenshot::new),
            egui_ctx: None,
        };
        app.apply_options(options);
        if let Some(shot) = app
            .screenshot
            .as_ref()
            .and_then(Screenshot::appearance)
            .cloned()
        {
            appearance::prepare_shot(&mut app.state, &shot);
        }
        if let Some(prompt) = app
            .screenshot
            .as_ref()
            .and_then(Screenshot::edit_prompt)
            .map(str::to_owned)
        {
            // The picture shows both images as they are (no heat map) and the blend mask.
            let state = &mut app.state;
            state.settings.view.show_heatmap = false;
            let source_prompt = state.settings.params.prompt.clone();
            state.modes.edit.enter(&prompt, &source_prompt);
        }
        if let Some(targets) = app
            .screenshot
            .as_ref()
            .and_then(Screenshot::style_targets)
            .map(<[String]>::to_vec)
        {
            let style = &mut app.state.modes;
            style.set_active(ModeKind::StyleSet);
            let settings = crate::ui::style_set::StyleSetSettings {
                targets,
                ..style.style_set.settings().clone()
            };
            style.style_set.set_settings(settings);
        }
        Ok(app)
    }

    /// Applies the CLI options: session, prompt, seed, model, generate. The model named on the
    /// command line (or in the session) is remembered only once it has loaded; the model
    /// remembered from the last launch falls back to the bundled one when it fails.
    fn apply_options(&mut self, options: EditorOptions) {
        let mut generate = options.generate;
        let mut model = None;
        if let Some(path) = &options.session {
            match Session::load(path) {
                Ok(session) => {
                    model = Some(self.apply_session_settings(session));
                    generate = true;
                }
                Err(error) => self.status(StatusLevel::Error, error.to_string()),
            }
        }
        let params = &mut self.state.settings.params;
        if let Some(prompt) = options.prompt {
            params.prompt = prompt;
        }
        if let Some(negative_prompt) = options.negative_prompt {
            params.negative_prompt = negative_prompt;
        }
        if let Some(seed) = options.seed {
            params.seed = seed;
        }
        if let Some(steps) = options.steps {
            params.steps = steps;
        }
        if let Some(folder) = options.model {
            model = Some(ModelSource::from_path(folder));
        }
        if let Some(path) = &options.image {
            self.open_image(path);
        }
        let remembered = model.is_none();
        self.load_model(model.unwrap_or_else(|| self.state.settings.model.clone()));
        self.state.model.bundled_if_remembered_fails = remembered;
        self.state.generate_after_load = generate;
    }

    /// Takes a session's settings (not yet generating); returns its model, to load.
    fn apply_session_settings(&mut self, session: Session) -> ModelSource {
        self.apply_session_image(session.image.as_ref());
        let state = &mut self.state;
        state.settings.products = session.products;
        // The image is the session's own (checked by its hash); it is inverted again on Generate.
        state.settings.params = GenerateParams {
            source_image: None,
            ..session.params
        };
        state.settings.view = session.view;
        state.settings.aggregation = session.aggregation;
        state.selected_word = session.selected_word;
        state.modes.edit.apply_session(session.edit);
        state.follow_edit_recommendation();
        session.model
    }

    /// Opens a session: settings, model (reloaded if different) and a fresh generation.
    fn open_session(&mut self, session: Session) {
        let model_changed = self
            .state
            .model
            .loaded
            .as_ref()
            .is_none_or(|info| info.source != session.model)
            || self.state.settings.products != session.products;
        let model = self.apply_session_settings(session);
        if model_changed {
            self.load_model(model);
            self.state.generate_after_load = true;
        } else {
            self.generate();
        }
    }

    /// Opens a session's image (or closes the open one when the session has none).
    fn apply_session_image(&mut self, saved: Option<&SessionImage>) {
        if self.state.image.is_inverting() {
            let _ = self.worker.cancel();
        }
        let Some(saved) = saved else {
            self.state.image.close();
            return;
        };
        if let Err(error) = self.state.image.open_session_image(saved) {
            self.state.image.close();
            self.status(
                StatusLevel::Error,
                format!("The session's image is left out: {error}"),
            );
        }
    }

    fn status(&mut self, level: StatusLevel, text: impl Into<String>) {
        self.state.status.push(level, text);
    }

    // ---------------------------------------------------------------------------------------------
    // Read access (tests, scripts)
    // ---------------------------------------------------------------------------------------------

    /// The settings (for persistence and tests).
    pub fn settings(&self) -> &EditorSettings {
        &self.state.settings
    }

    /// The status messages, oldest first.
    pub fn status_messages(&self) -> &[StatusMessage] {
        self.state.status.messages()
    }

    /// The loaded model, if any.
    pub fn loaded_model(&self) -> Option<&ModelInfo> {
        self.state.model.loaded.as_ref()
    }

    /// The run on screen (a plain run, or an edit's source), if any.
    pub fn run_view(&self) -> Option<&RunView> {
        self.state.run.as_ref()
    }

    /// True while a generation is asked for or running.
    pub fn is_generating(&self) -> bool {
        self.state.is_generating()
    }

    /// The word heat maps on screen.
    pub fn word_heatmaps(&self) -> &[Heatmap] {
        &self.state.derived.heatmaps
    }

    /// The selected word (index into the prompt's words).
    pub fn selected_word(&self) -> Option<usize> {
        self.state.selected_word
    }

    /// The view settings, to change them from outside the UI (tests, scripts).
    pub fn view_settings_mut(&mut self) -> &mut ViewSettings {
        &mut self.state.settings.view
    }

    /// Where the image was drawn last frame, in points.
    pub fn canvas_image_rect(&self) -> Option<egui::Rect> {
        self.views.canvas.image_rect
    }

    /// The heat grid on the canvas: `(width, height, values)`, values in 0..1; `None` when no heat
    /// map is shown.
    pub fn canvas_heat(&self) -> Option<(usize, usize, &[f32])> {
        let heat = self.views.canvas.heat();
        (heat.version != 0).then_some((
            heat.width as usize,
            heat.height as usize,
            heat.values.as_slice(),
        ))
    }

    /// The probe's point `(y, x)` in 0..1 image coordinates, when probing.
    pub fn probe_point(&self) -> Option<(f32, f32)> {
        (self.state.canvas_view == CanvasView::Probe)
            .then_some(self.state.probe.point)
            .flatten()
    }

    /// The step the canvas and heat maps show (the timeline's position), if any step arrived.
    pub fn timeline_step(&self) -> Option<usize> {
        self.state.visible_steps().map(|(_, last)| last)
    }

    /// Number of word thumbnails in the token strip.
    pub fn thumbnail_count(&self) -> usize {
        self.views.token_strip.len()
    }

    /// Frame build-time percentiles so far.
    pub fn frame_time_summary(&self) -> Option<FrameTimeSummary> {
        self.frame_times.summary()
    }

    /// Answers file dialogs with `answer` instead of showing them (tests, scripted use).
    pub fn answer_dialogs_with(&mut self, answer: DialogOverride) {
        self.dialogs.set_override(answer);
    }

    /// Behaves as on a machine where no file dialog can open (no portal, no zenity): every dialog
    /// is answered by the path field (tests).
    pub fn without_file_dialogs(&mut self) {
        self.dialogs.set_unavailable();
    }

    /// The purpose of the open path field, if one is open.
    pub fn path_field_purpose(&self) -> Option<&DialogPurpose> {
        self.views.path_field.as_ref().map(PathField::purpose)
    }

    /// The session of what is on screen: the run's resolved parameters, or the panel's.
    pub fn current_session(&self) -> Session {
        current_session(&self.state)
    }

    /// The editor mode that is on.
    pub fn mode(&self) -> ModeKind {
        self.state.modes.active()
    }

    /// True in edit mode.
    pub fn edit_mode(&self) -> bool {
        self.mode() == ModeKind::Edit
    }

    /// The edit as the panel describes it.
    pub fn edit_spec(&self) -> &EditSpec {
        self.state.modes.edit.spec()
    }

    /// The edited run on screen, if any.
    pub fn edit_run_view(&self) -> Option<&RunView> {
        self.state.modes.edit.run()
    }

    /// What the engine reported about the latest edit (alignment, source reuse).
    pub fn edit_info(&self) -> Option<&EditInfo> {
        self.state.modes.edit.info()
    }

    /// The local-blend mask of the latest edited step, if one was applied.
    pub fn edit_blend_mask(&self) -> Option<&BlendMask> {
        self.state.modes.edit.blend_mask()
    }

    /// How source and edited images are compared.
    pub fn edit_compare_mode(&self) -> CompareMode {
        self.state.modes.edit.session().compare
    }

    /// The swipe divider's position, 0..1 of the image width.
    pub fn edit_swipe_position(&self) -> f32 {
        self.state.modes.edit.session().swipe
    }

    /// Style set mode: the images of the latest set as received (`None`: not started yet),
    /// reference first.
    pub fn style_set_images(&self) -> &[Option<RunView>] {
        self.state.modes.style_set.images()
    }

    /// Style set mode: the image on screen (0: the reference).
    pub fn style_set_selected(&self) -> usize {
        self.state.modes.style_set.selected()
    }

    /// Style set mode: every image of the latest set finished.
    pub fn style_set_finished(&self) -> bool {
        self.state.modes.style_set.finished()
    }

    /// Style set mode: why the latest set could not run, if it could not.
    pub fn style_set_error(&self) -> Option<&str> {
        self.state.modes.style_set.error()
    }

    /// What the canvas shows over the image.
    pub fn canvas_view(&self) -> CanvasView {
        self.state.canvas_view
    }

    /// Switches what the canvas shows.
    pub fn set_canvas_view(&mut self, view: CanvasView) {
        self.state.canvas_view = view;
    }

    /// The segmentation shown in the Segments view, if one has arrived for the run on screen.
    pub fn segmentation(&self) -> Option<&LabelledSegmentation> {
        self.views.segments.segmentation_of(self.current_run_id())
    }

    /// True while a segmentation is asked for and not yet answered.
    pub fn is_segmenting(&self) -> bool {
        self.views.segments.is_segmenting()
    }

    /// The selected segment ids, in the order they were picked.
    pub fn selected_segments(&self) -> &[usize] {
        self.views.segments.selected()
    }

    /// The selected segments' mask at image resolution (`None` without a selection).
    pub fn selected_segments_mask(&self) -> Option<&Mask> {
        self.views.segments.mask()
    }

    /// Picks the segment at `(y, x)` (0..1 image coordinates) as a canvas click does: selects it,
    /// adds it with `add` (Shift), or removes it when it is already selected.
    pub fn click_segment_at(&mut self, point: (f32, f32), add: bool) {
        let run_id = self.current_run_id();
        self.views.segments.click_at(run_id, point, add);
    }

    /// The last mask handed to the edit mode's local blend by "Use as local-blend mask".
    pub fn local_blend_mask(&self) -> Option<&Mask> {
        self.views.segments.local_blend_mask()
    }

    /// Chooses the segmentation method (the view re-segments).
    pub fn set_segment_method(&mut self, method: SegmentMethod) {
        self.views.segments.set_method(method);
    }

    // Real images.

    /// Opens a real image file (as File > Open image... and dropping do): it is read on a helper
    /// thread and opened on a later frame; a file that cannot be read is an error on the status
    /// line and in the image panel, and nothing else changes.
    pub fn open_image(&mut self, path: &Path) {
        self.state.status.acknowledge();
        let repaint = self.egui_ctx.clone();
        let started = self.state.image.start_reading(path, move || {
            if let Some(ctx) = &repaint {
                ctx.request_repaint();
            }
        });
        match started {
            Ok(()) => self.status(StatusLevel::Info, format!("Reading {}...", path.display())),
            Err(message) => self.image_read_failed(message),
        }
    }

    /// Opens an image file into a slot of the appearance transfer (read on a helper thread); a
    /// file that cannot be read is an error under the slot and on the status line.
    pub fn open_appearance_image(&mut self, slot: crate::worker::AppearanceSlot, path: &Path) {
        let repaint = self.egui_ctx.clone();
        appearance::open_file(&mut self.state, slot, path, move || {
            if let Some(ctx) = &repaint {
                ctx.request_repaint();
            }
        });
    }

    /// A file dropped in appearance transfer mode: onto the slot under the pointer, else the first
    /// empty slot.
    fn appearance_dropped(&mut self, ui: &egui::Ui, path: &Path) {
        let slot = ui
            .ctx()
            .input(|input| input.pointer.hover_pos())
            .and_then(|pos| self.views.appearance.slot_at(pos))
            .unwrap_or_else(|| self.state.modes.appearance.slot_for_drop());
        self.open_appearance_image(slot, path);
    }

    /// Takes the answer of the image being read, once it is ready (each frame).
    fn poll_image_reading(&mut self) {
        let was_inverting = self.state.image.is_inverting();
        match self.state.image.poll_reading() {
            None => {}
            Some(Ok((path, parameters))) => {
                // The new image replaces the open one: an inversion of that one is no longer wanted.
                if was_inverting {
                    let _ = self.worker.cancel();
                }
                let message = match parameters.and_then(|png| self.take_png_parameters(&png)) {
                    Some(taken) => format!(
                        "Opened image {} with its parameters ({taken}): check the description, \
                         then Invert",
                        path.display()
                    ),
                    None => format!(
                        "Opened image {}: describe it in the prompt box, then Invert",
                        path.display()
                    ),
                };
                self.status(StatusLevel::Info, message);
                if std::mem::take(&mut self.state.image.generate_after_invert) {
                    self.generate();
                }
            }
            Some(Err(message)) => {
                self.state.image.generate_after_invert = false;
                self.image_read_failed(message);
            }
        }
    }

    /// An attend or A1111 PNG carries its prompt and settings in a `parameters` text chunk (read
    /// with the image): they become the description (prompt), negative prompt, seed, steps and
    /// guidance. The image keeps the run's size (it is fitted to it). Returns what was taken, or
    /// `None` when nothing was.
    fn take_png_parameters(&mut self, png: &PngParameters) -> Option<String> {
        let params = &mut self.state.settings.params;
        let mut taken = Vec::new();
        if !png.prompt.trim().is_empty() {
            params.prompt.clone_from(&png.prompt);
            taken.push("prompt");
        }
        if !png.negative_prompt.is_empty() {
            params.negative_prompt.clone_from(&png.negative_prompt);
            taken.push("negative prompt");
        }
        if let Some(seed) = png.seed {
            params.seed = seed;
            taken.push("seed");
        }
        if let Some(steps) = png.steps.filter(|&steps| steps > 0) {
            params.steps = steps;
            taken.push("steps");
        }
        if let Some(guidance) = png.cfg_scale.filter(|guidance| guidance.is_finite()) {
            params.guidance = guidance;
            taken.push("guidance");
        }
        (!taken.is_empty()).then(|| taken.join(", "))
    }

    /// An image could not be read: the open image (if any) stays, the panel and status line say why.
    fn image_read_failed(&mut self, message: String) {
        if self.state.image.is_open() {
            self.state.image.error = Some(message.clone());
        }
        self.status(StatusLevel::Error, message);
    }

    /// True while an image file is being read.
    pub fn is_reading_image(&self) -> bool {
        self.state.image.is_reading()
    }

    /// True when a real image is open.
    pub fn image_open(&self) -> bool {
        self.state.image.is_open()
    }

    /// The open image fitted to the run's size, and its hash (once the size is known).
    pub fn fitted_image(&self) -> Option<(&crate::worker::RgbImage, &str)> {
        self.state
            .image
            .fitted()
            .map(|(fitted, hash)| (&fitted.image, hash))
    }

    /// True while the worker inverts the open image.
    pub fn is_inverting(&self) -> bool {
        self.state.image.is_inverting()
    }

    /// The finished inversion of the open image: what runs name to replay it, its reconstruction
    /// and PSNR (dB).
    pub fn inversion(
        &self,
    ) -> Option<(&crate::worker::SourceImage, &crate::worker::RgbImage, f64)> {
        self.state
            .image
            .done()
            .map(|(source, reconstruction, psnr)| (source, reconstruction.as_ref(), psnr))
    }

    /// The image panel's error (red), if any.
    pub fn image_error(&self) -> Option<&str> {
        self.state.image.error.as_deref()
    }

    // Appearance transfer.

    /// The appearance transfer mode's state (slots, settings, latest transfer, probe).
    pub fn appearance_transfer(&self) -> &AppearanceTransfer {
        &self.state.modes.appearance
    }

    /// Where the appearance transfer's `pane` drew its image last frame (its empty square when it
    /// has none), in points.
    pub fn appearance_image_rect(&self, pane: AppearancePane) -> Option<egui::Rect> {
        self.views.appearance.image_rect(pane)
    }

    fn current_run_id(&self) -> Option<u64> {
        self.state.run.as_ref().map(|run| run.run_id)
    }

    // ---------------------------------------------------------------------------------------------
    // Actions
    // ---------------------------------------------------------------------------------------------

    /// Starts a generation with the current parameters (superseding a running one); in edit mode
    /// an edit of them.
    fn generate(&mut self) {
        if self.state.model.loaded.is_none() {
            if self.state.model.loading.is_some() {
                self.state.generate_after_load = true;
                self.status(StatusLevel::Info, "Will generate once the model is loaded");
            } else {
                self.status(
                    StatusLevel::Error,
                    "No model is loaded: open a model folder first",
                );
            }
            return;
        }
        let mut params = self.state.settings.params.clone();
        if self.state.modes.active() == ModeKind::StyleSet {
            self.generate_style_set(params);
            return;
        }
        if self.state.image.is_open() || self.state.image.is_reading() {
            match self.image_run_params(params) {
                Some(replaying) => params = replaying,
                // (Inverting first, or why not.)
                None => return,
            }
        }
        if let Err(problem) = check_params(&params, self.size_multiple()) {
            self.status(StatusLevel::Error, format!("Not generating: {problem}"));
            return;
        }
        if self.state.modes.active() == ModeKind::Edit {
            self.generate_edit_run(params);
            return;
        }
        match self.worker.generate(params) {
            // The run on screen is superseded; its own late events will be dropped.
            Ok(run_id) => self.state.supersede_runs(run_id),
            Err(error) => self.status(StatusLevel::Error, format!("Cannot generate: {error}")),
        }
    }

    /// Starts a style set with `reference` as its reference and the style panel's targets and
    /// options (superseding a running run); a set that cannot run says why in the panel.
    fn generate_style_set(&mut self, reference: GenerateParams) {
        // An open image is the reference (described by the prompt).
        image_input::keep_fitted(&mut self.state);
        let image = &self.state.image;
        let reference_image = if image.is_reading() {
            Err("the reference image is still being read".to_owned())
        } else if image.is_open() {
            image
                .fitted()
                .map(|(fitted, _)| Some(fitted.image.clone()))
                .ok_or_else(|| "the reference image is not fitted to the run's size yet".to_owned())
        } else {
            Ok(None)
        };
        let checked = check_params(&reference, self.size_multiple())
            .and(reference_image)
            .and_then(|image| self.state.modes.style_set.params_to_send(reference, image));
        let params = match checked {
            Ok(params) => params,
            Err(problem) => {
                self.state.modes.style_set.refused(problem.clone());
                self.status(
                    StatusLevel::Error,
                    format!("Not running the style set: {problem}"),
                );
                return;
            }
        };
        let image_count = params.image_count();
        match self.worker.generate_style_set(params) {
            Ok(run_id) => {
                self.state.supersede_runs(run_id);
                self.state.modes.style_set.sent(run_id, image_count);
            }
            Err(error) => {
                let message = format!("Cannot run the style set: {error}");
                self.state.modes.style_set.refused(message.clone());
                self.status(StatusLevel::Error, message);
            }
        }
    }

    /// Applies a command of the style set panel or grid.
    fn apply_style_set(&mut self, command: StyleSetCommand) {
        let state = &mut self.state;
        match command {
            StyleSetCommand::SetEnabled(on) => {
                state.modes.set_active(if on {
                    ModeKind::StyleSet
                } else {
                    ModeKind::Plain
                });
                state.selected_word = None;
            }
            StyleSetCommand::SetSettings(settings) => state.modes.style_set.set_settings(*settings),
            StyleSetCommand::Select(index) => {
                let Some(run_id) = crate::ui::style_set::select_image(state, index) else {
                    return;
                };
                self.views.segments.forget_run();
                if let Err(error) = self
                    .worker
                    .send(Command::SelectStyleImage { run_id, index })
                {
                    self.status(
                        StatusLevel::Error,
                        format!("Cannot select the image: {error}"),
                    );
                }
            }
            StyleSetCommand::ExportAll => {
                let model_name = state
                    .model
                    .loaded
                    .as_ref()
                    .map_or_else(String::new, |info| info.name.clone());
                let files = state
                    .modes
                    .style_set
                    .export_files(&model_name)
                    .and_then(|files| {
                        let folder =
                            PathBuf::from(state.modes.style_set.settings().export_folder.trim());
                        crate::ui::style_set::prepare_export_folder(&folder).map(|()| files)
                    });
                match files {
                    Ok(files) => self.send_export(Command::ExportPngs { files }),
                    Err(problem) => self.status(StatusLevel::Error, problem),
                }
            }
        }
    }

    /// `params` for a run that replays the open image's inversion; when the image is not inverted
    /// with the panel's settings yet, starts the inversion (the run follows it) and returns `None`.
    fn image_run_params(&mut self, params: GenerateParams) -> Option<GenerateParams> {
        // (A model that just loaded tells the size: fitted before the frame does it.)
        image_input::keep_fitted(&mut self.state);
        let image = &mut self.state.image;
        if image.is_reading() {
            image.generate_after_invert = true;
            self.status(StatusLevel::Info, "Will generate once the image is read");
            return None;
        }
        if image.is_inverting() {
            image.generate_after_invert = true;
            self.status(
                StatusLevel::Info,
                "Will generate once the image is inverted",
            );
            return None;
        }
        let Some((fitted, _)) = image.fitted() else {
            self.status(
                StatusLevel::Error,
                "Not generating: the image is not fitted to the run's size yet (no model loaded)",
            );
            return None;
        };
        let size_px = (fitted.image.width, fitted.image.height);
        if let Some(source) = image.replay_source(&params) {
            return Some(GenerateParams {
                source_image: Some(Box::new(source.clone())),
                width_px: Some(size_px.0),
                height_px: Some(size_px.1),
                ..params
            });
        }
        if self.invert_image() {
            self.state.image.generate_after_invert = true;
        }
        None
    }

    /// Sends the open image to the worker to invert with the panel's description, steps,
    /// guidance, seed and method. Returns false (with a red error naming the value) when it cannot.
    fn invert_image(&mut self) -> bool {
        let wanted = self
            .state
            .image
            .wanted_inversion(&self.state.settings.params);
        let Some((fitted, _)) = self.state.image.fitted() else {
            self.image_problem(
                "Cannot invert: the image is not fitted to the run's size yet (no model loaded)"
                    .to_owned(),
            );
            return false;
        };
        let image = fitted.image.clone();
        if self.state.model.loaded.is_none() {
            self.image_problem("Cannot invert: no model is loaded".to_owned());
            return false;
        }
        if let Err(error) = crate::worker::check_inversion_request(&image, &wanted) {
            self.image_problem(format!("Cannot invert the image: {error}"));
            return false;
        }
        match self.worker.invert(image, wanted.clone()) {
            Ok(run_id) => {
                // Runs on screen are superseded; an inversion is no run the views wait for.
                self.state.supersede_runs(run_id);
                self.state.pending_run = None;
                self.state.image.inversion_sent(run_id, wanted);
                self.status(StatusLevel::Info, "Inverting the image...");
                true
            }
            Err(error) => {
                self.image_problem(format!("Cannot invert: {error}"));
                false
            }
        }
    }

    /// A problem with the image: red in the image panel and on the status line.
    fn image_problem(&mut self, message: String) {
        self.state.image.error = Some(message.clone());
        self.status(StatusLevel::Error, message);
    }

    /// Applies a command of the image panel.
    fn apply_image(&mut self, command: ImageCommand) {
        let image = &mut self.state.image;
        match command {
            ImageCommand::SetFit(fit) => image.fit = fit,
            ImageCommand::SetMethod(method) => image.method = method,
            ImageCommand::Invert => {
                image.generate_after_invert = false;
                self.invert_image();
            }
            ImageCommand::Cancel => {
                if let image_input::InversionState::Running { cancelling, .. } =
                    &mut image.inversion
                {
                    *cancelling = true;
                    image.generate_after_invert = false;
                    if let Err(error) = self.worker.cancel() {
                        self.status(StatusLevel::Error, format!("Cannot cancel: {error}"));
                    }
                }
            }
            ImageCommand::ShowReconstruction(show) => image.show_reconstruction = show,
            ImageCommand::Close => {
                if image.is_inverting() {
                    let _ = self.worker.cancel();
                }
                image.close();
                self.status(
                    StatusLevel::Info,
                    "Image closed: runs start from noise again",
                );
            }
        }
    }

    /// Starts an edit of `params`' image (the worker records the source when needed).
    fn generate_edit_run(&mut self, params: GenerateParams) {
        if let Err(problem) = check_params(&params, self.size_multiple()) {
            self.status(StatusLevel::Error, format!("Not editing: {problem}"));
            return;
        }
        let spec = self.state.modes.edit.spec_to_send(&params.prompt);
        match self.worker.generate_edit(params, spec.clone()) {
            Ok(run_id) => {
                self.state.supersede_runs(run_id);
                self.state.modes.edit.sent(run_id, spec);
            }
            Err(error) => self.status(StatusLevel::Error, format!("Cannot edit: {error}")),
        }
    }

    /// Re-runs the edited branch when the edit changed (not while the source is being made or the
    /// edited prompt is being typed; while a slider is dragged, once the running edit showed a step).
    fn edit_auto_run(&mut self, egui_ctx: &egui::Context) {
        let state = &self.state;
        let Some(source) = state.run.as_ref().filter(|_| state.run_finished()) else {
            return;
        };
        if state.pending_run.is_some()
            || state
                .modes
                .edit
                .changed_spec(&source.params.prompt)
                .is_none()
        {
            return;
        }
        let typing = self.views.edit_panel.is_typing(egui_ctx);
        let dragging = egui_ctx.input(|input| input.pointer.any_down());
        if typing || (dragging && !self.state.modes.edit.may_send_while_dragging()) {
            return;
        }
        let params = source.params.clone();
        if check_params(&params, self.size_multiple()).is_err() {
            // (The source no longer fits the loaded model: "Run edit" says why, once.)
            return;
        }
        self.generate_edit_run(params);
    }

    /// The loaded model's image sizes are multiples of this many pixels.
    fn size_multiple(&self) -> usize {
        self.state
            .model
            .loaded
            .as_ref()
            .map_or(8, |info| info.size_multiple_px)
    }

    /// Cancels the running generation; the progress bar says "cancelling..." at once, until the
    /// run ends.
    fn cancel(&mut self) {
        if !self.state.is_generating() {
            return;
        }
        match self.worker.cancel() {
            Ok(()) => {
                self.state.cancel_requested = true;
                self.status(StatusLevel::Info, "Cancelling...");
            }
            Err(error) => self.status(StatusLevel::Error, format!("Cannot cancel: {error}")),
        }
    }

    /// Loads a model; the current one stays until the new one is ready.
    fn load_model(&mut self, source: ModelSource) {
        let products = self.state.settings.products;
        match self.worker.load_model_with(source.clone(), products) {
            Ok(()) => {
                self.status(StatusLevel::Info, format!("Loading {source}..."));
                self.state.model.loading = Some(source);
                self.state.pending_run = None;
            }
            Err(error) => self.status(StatusLevel::Error, format!("Cannot load {source}: {error}")),
        }
    }

    /// Takes the products choice and loads the model again with it (the one loading, else the
    /// one loaded): its runs and recorded edit sources were made with the old products.
    fn set_products(&mut self, products: Products) {
        if self.state.settings.products == products {
            return;
        }
        self.state.settings.products = products;
        let model = self.state.model.loading.clone().or_else(|| {
            self.state
                .model
                .loaded
                .as_ref()
                .map(|info| info.source.clone())
        });
        if let Some(source) = model {
            self.load_model(source);
            // What is on screen was made with the old products: make it again with the new.
            self.state.generate_after_load = self.state.run.is_some();
        }
    }

    /// Asks the worker for self-attention when the probe needs a map it does not have.
    fn request_probe_map(&mut self) {
        let Some((command, wanted)) = self.state.probe_request() else {
            return;
        };
        match self.worker.send(command) {
            Ok(()) => {
                self.state.probe.requested = Some(wanted);
                self.state.probe.awaiting = true;
            }
            Err(error) => self.status(StatusLevel::Error, format!("Cannot probe: {error}")),
        }
    }

    /// Sends a command whose answer is an `Exported` / `ExportFailed` event.
    fn send_export(&mut self, command: Command) {
        if let Err(error) = self.worker.send(command) {
            self.status(StatusLevel::Error, format!("Cannot export: {error}"));
        }
    }

    /// The folder a dialog for `purpose` opens in and the file name it proposes.
    fn dialog_start(&self, purpose: &DialogPurpose) -> (Option<PathBuf>, String) {
        let file_name = self
            .views
            .segments
            .file_name(
                purpose,
                self.current_run_id(),
                self.state.source_params().seed,
            )
            .or_else(|| appearance::file_name(&self.state, purpose))
            .unwrap_or_else(|| default_file_name(&self.state, purpose));
        (self.state.settings.export_folder.clone(), file_name)
    }

    /// Opens a dialog; its answer is handled in [`Self::dialog_answered`] on a later frame.
    fn open_dialog(&mut self, purpose: DialogPurpose) {
        if self.views.path_field.is_some() {
            self.status(StatusLevel::Warning, "A path field is already open");
            return;
        }
        let (start_folder, file_name) = self.dialog_start(&purpose);
        let repaint = self.egui_ctx.clone();
        let opened = self
            .dialogs
            .open(purpose, start_folder, file_name, move || {
                if let Some(ctx) = &repaint {
                    ctx.request_repaint();
                }
            });
        if !opened {
            self.status(StatusLevel::Warning, "A file dialog is already open");
        }
    }

    /// A dialog ended: a chosen path is used; when no dialog could open, the path field is offered
    /// (starting with what the dialog would have proposed).
    fn dialog_answered(&mut self, purpose: DialogPurpose, answer: DialogAnswer) {
        match answer {
            DialogAnswer::Chosen(path) => self.handle_dialog_answer(purpose, Some(path)),
            DialogAnswer::Cancelled => {}
            DialogAnswer::Unavailable => {
                self.status(
                    StatusLevel::Warning,
                    "No file dialog could open (it needs xdg-desktop-portal or zenity): \
                     type the path instead",
                );
                let (start_folder, file_name) = self.dialog_start(&purpose);
                let start = path_field_start(&purpose, start_folder, &file_name);
                self.views.path_field = Some(PathField::new(purpose, start));
            }
        }
    }

    fn handle_dialog_answer(&mut self, purpose: DialogPurpose, path: Option<PathBuf>) {
        let Some(path) = path else {
            return;
        };
        if !matches!(
            purpose,
            DialogPurpose::OpenModelFolder
                | DialogPurpose::OpenModelFile
                | DialogPurpose::AddModelFolder
        ) {
            self.state.settings.export_folder = if purpose == DialogPurpose::ExportAllHeatmaps {
                Some(path.clone())
            } else {
                path.parent().map(PathBuf::from)
            };
        }
        let command = match purpose {
            DialogPurpose::OpenModelFolder | DialogPurpose::OpenModelFile => {
                self.load_model(ModelSource::from_path(path));
                return;
            }
            DialogPurpose::AddModelFolder => {
                self.views.models_menu.add_folder(path);
                return;
            }
            DialogPurpose::OpenImage => {
                self.open_image(&path);
                return;
            }
            DialogPurpose::OpenAppearanceImage(slot) => {
                self.open_appearance_image(slot, &path);
                return;
            }
            DialogPurpose::ExportAppearanceOutput | DialogPurpose::ExportAppearanceAll => {
                match appearance::export_command(&self.state, &purpose, path) {
                    Ok(commands) => commands
                        .into_iter()
                        .for_each(|command| self.send_export(command)),
                    Err(warning) => self.status(StatusLevel::Warning, warning),
                }
                return;
            }
            DialogPurpose::OpenSession => {
                match Session::load(&path) {
                    Ok(session) => self.open_session(session),
                    Err(error) => self.status(StatusLevel::Error, error.to_string()),
                }
                return;
            }
            DialogPurpose::ExportSegmentMask
            | DialogPurpose::ExportSegmentLabels
            | DialogPurpose::ExportSegmentsJson => {
                let prompt = self.state.run.as_ref().map(|run| run.params.prompt.clone());
                self.views
                    .segments
                    .export_file(&purpose, path, self.current_run_id(), prompt)
                    .map(|file| Command::ExportSegmentFiles { files: vec![file] })
            }
            _ => export_command(
                &ExportSources {
                    state: &self.state,
                    image: self.views.canvas.image(),
                    heat: self.views.canvas.heat(),
                },
                &purpose,
                path,
            ),
        };
        match command {
            Ok(command) => self.send_export(command),
            Err(warning) => self.status(StatusLevel::Warning, warning),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The views' commands
    // ---------------------------------------------------------------------------------------------

    /// Applies the commands the views asked for this frame, in order. When there were any, this
    /// pass drew the state before them: egui runs another pass at once (its input already taken),
    /// so the frame shows the state as changed.
    fn apply_commands(&mut self, egui_ctx: &egui::Context) {
        let commands = self.commands.take();
        if commands.is_empty() {
            return;
        }
        for command in commands {
            self.apply(command);
        }
        egui_ctx.request_discard("a view changed the editor's state");
    }

    /// Applies one command.
    fn apply(&mut self, command: UiCommand) {
        if command.is_user_action() {
            self.state.status.acknowledge();
        }
        let state = &mut self.state;
        match command {
            UiCommand::Generate => self.generate(),
            UiCommand::Cancel => self.cancel(),
            UiCommand::LoadModel(source) => self.load_model(source),
            UiCommand::SetProducts(products) => self.set_products(products),
            UiCommand::CancelModelLoad => {
                self.worker.cancel_load();
                self.status(StatusLevel::Info, "Cancelling the model load...");
            }
            UiCommand::OpenDialog(purpose) => self.open_dialog(purpose),
            UiCommand::PathChosen { purpose, path } => {
                self.views.path_field = None;
                self.handle_dialog_answer(purpose, Some(path));
            }
            UiCommand::ClosePathField => self.views.path_field = None,
            UiCommand::DismissError => {}
            UiCommand::SetParams(params) => state.settings.params = params,
            UiCommand::SetView(view) => state.settings.view = view,
            UiCommand::SetAggregation(aggregation) => state.settings.aggregation = aggregation,
            UiCommand::SetCanvasView(view) => state.canvas_view = view,
            UiCommand::SelectWord(index) => {
                state.selected_word = Some(index);
                if state.canvas_view == CanvasView::Probe {
                    state.canvas_view = CanvasView::WordHeatmap;
                }
            }
            UiCommand::SetTimeline(timeline) => state.timeline = timeline,
            UiCommand::ResetZoom => self.views.canvas.reset_zoom(),
            UiCommand::SetProbeGrid(grid) => state.probe.grid = Some(grid),
            UiCommand::SetProbeSpan(span) => state.settings.probe_span = span,
            UiCommand::SetProbePoint(point) => state.probe.point = Some(point),
            UiCommand::SetEditMode(on) => {
                state
                    .modes
                    .set_active(if on { ModeKind::Edit } else { ModeKind::Plain });
                if on {
                    let source_prompt = state.source_params().prompt.clone();
                    state.modes.edit.start_from(&source_prompt);
                }
                state.selected_word = None;
            }
            UiCommand::SetEditSession(session) => {
                let viewing_before = state.modes.edit.session().viewing;
                state.modes.edit.set_session(*session);
                if state.modes.edit.session().viewing != viewing_before {
                    state.selected_word = None;
                    state.timeline.cursor = None;
                }
            }
            UiCommand::SetSwipe(position) => state.modes.edit.set_swipe(position),
            UiCommand::SetWordWeight { word, weight } => {
                state.modes.edit.set_word_weight(&word, weight);
            }
            UiCommand::RunEdit => {
                let params = state.source_params().clone();
                if state.modes.edit.is_no_op(&params.prompt) {
                    self.status(StatusLevel::Warning, NOTHING_TO_EDIT);
                } else {
                    self.generate_edit_run(params);
                }
            }
            UiCommand::ResetEdit => state.reset_edit(),
            UiCommand::UseMaskAsLocalBlend(mask) => {
                let source_prompt = state.run.as_ref().map(|run| run.params.prompt.clone());
                state.modes.edit.use_mask(*mask, source_prompt.as_deref());
                self.status(
                    StatusLevel::Info,
                    "The edit's local blend now uses the chosen mask",
                );
            }
            UiCommand::Segment { run_id, request } => {
                let command = Command::Segment {
                    run_id,
                    request: request.clone(),
                };
                match self.worker.send(command) {
                    Ok(()) => self.views.segments.request_sent(run_id, request),
                    Err(error) => {
                        self.status(StatusLevel::Error, format!("Cannot segment: {error}"));
                    }
                }
            }
            UiCommand::Image(command) => self.apply_image(command),
            UiCommand::StyleSet(command) => self.apply_style_set(command),
            UiCommand::Appearance(command) => {
                appearance::apply_command(state, &mut self.worker, command);
            }
            UiCommand::ClickSegment { point, add } => {
                let run_id = state.run.as_ref().map(|run| run.run_id);
                self.views.segments.click_at(run_id, point, add);
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Events from the worker
    // ---------------------------------------------------------------------------------------------

    /// Hands one worker event to [`route_event`] (which routes it once), then generates when a
    /// model that was waited for arrived, or loads the bundled model when the model remembered
    /// from the last launch failed.
    fn handle_event(&mut self, event: Event) {
        let appearance = &mut self.state.modes.appearance;
        if appearance.takes(&event) {
            appearance.event(event, &mut self.state.status);
            return;
        }
        match route_event(&mut self.state, &mut self.views.segments, event) {
            AfterEvent::Nothing => {}
            AfterEvent::Generate => self.generate(),
            AfterEvent::LoadBundledModel => self.load_model(ModelSource::Bundled),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The frame
    // ---------------------------------------------------------------------------------------------

    /// Takes the worker's events and finished dialogs (never blocks). Runs before every frame, and
    /// also while the window is hidden, so the worker is never held up by a full event queue.
    fn pump(&mut self, egui_ctx: &egui::Context) {
        if self.egui_ctx.is_none() {
            let waker_ctx = egui_ctx.clone();
            self.worker.set_waker(move || waker_ctx.request_repaint());
            self.egui_ctx = Some(egui_ctx.clone());
        }
        while let Some(event) = self.worker.try_recv() {
            self.handle_event(event);
        }
        while let Some((purpose, answer)) = self.dialogs.poll() {
            self.dialog_answered(purpose, answer);
        }
    }

    /// Builds one frame. Called by eframe (through [`eframe::App::ui`]) and by tests.
    pub fn frame_ui(&mut self, ui: &mut egui::Ui) {
        self.frame_times.begin_frame();
        let egui_ctx = ui.ctx().clone();
        self.pump(&egui_ctx);
        for path in dropped_model_paths(&egui_ctx) {
            self.load_model(ModelSource::from_path(path));
        }
        let loaded = self.state.model.loaded.as_ref().map(|info| &info.source);
        self.views.models_menu.note_loaded(loaded);
        self.views.models_menu.load_progress = self
            .state
            .model
            .loading
            .as_ref()
            .and(self.worker.load_progress());
        if let Some(path) = image_input::dropped_file(ui) {
            if self.state.modes.active() == ModeKind::AppearanceTransfer {
                self.appearance_dropped(ui, &path);
            } else {
                self.open_image(&path);
            }
        }
        appearance::update(&mut self.state, &mut self.worker);
        if appearance::is_reading(&self.state) {
            egui_ctx.request_repaint_after(std::time::Duration::from_millis(50));
        }
        self.poll_image_reading();
        if self.state.image.is_reading() {
            // (The reader wakes the window when it is done; this covers a read started before
            // the window existed.)
            egui_ctx.request_repaint_after(std::time::Duration::from_millis(50));
        }
        image_input::keep_fitted(&mut self.state);
        if self.state.modes.active() == ModeKind::Edit {
            self.edit_auto_run(&egui_ctx);
        }
        if ui.input_mut(|input| input.consume_key(egui::Modifiers::COMMAND, egui::Key::Enter)) {
            self.state.status.acknowledge();
            if self.state.modes.active() == ModeKind::AppearanceTransfer {
                let run = appearance::AppearanceCommand::Run;
                appearance::apply_command(&mut self.state, &mut self.worker, run);
            } else {
                self.generate();
            }
        }
        self.state.update_derived_maps();
        self.request_probe_map();
        {
            let ctx = view_context(
                &self.state,
                &self.views,
                &self.dialogs,
                self.screenshot.as_ref(),
            );
            self.views.segments.update(&ctx, &mut self.commands);
        }
        self.views_ui(ui);
        self.apply_commands(&egui_ctx);
        if self.state.modes.active() == ModeKind::Edit {
            // The edited prompt may have changed: an unchosen self-attention replacement follows.
            self.state.follow_edit_recommendation();
        }

        if let Some(screenshot) = &mut self.screenshot {
            let segments = &self.views.segments;
            let run_id = self.state.run.as_ref().map(|run| run.run_id);
            let watch = ScreenshotWatch {
                segmented: segments.segmentation_of(run_id).is_some(),
                segmentation_failed: segments.failed(),
                segment_selected: !segments.selected().is_empty(),
            };
            screenshot.step(&egui_ctx, &self.state, &watch, &mut self.commands);
            self.apply_commands(&egui_ctx);
        }
        self.frame_times.end_frame();
    }

    /// Lays out the views: menu bar, bottom (progress, timeline, token strip, status), left
    /// (controls and the edit panel), right (canvas view, settings or segments) and the canvas.
    fn views_ui(&mut self, ui: &mut egui::Ui) {
        let Self {
            state,
            views,
            commands,
            dialogs,
            screenshot,
            ..
        } = self;
        let ctx = view_context(state, views, dialogs, screenshot.as_ref());
        panels::menu_bar_ui(&ctx, ui, commands, &mut views.models_menu);
        if ctx.state.modes.active() == ModeKind::AppearanceTransfer {
            appearance_layout_ui(&ctx, ui, views, commands);
            return;
        }
        if let Some(field) = &mut views.path_field {
            path_field_ui(ui, field, commands);
        }
        egui::Panel::bottom("attend.bottom")
            .resizable(false)
            .show(ui, |ui| {
                ui.add_space(4.0);
                panels::progress_ui(&ctx, ui);
                panels::timeline_ui(&ctx, ui, commands);
                ui.separator();
                token_strip_ui(&ctx, ui, &mut views.token_strip, commands);
                ui.separator();
                panels::status_line_ui(&ctx, ui, commands);
            });
        egui::Panel::left("attend.controls")
            .resizable(true)
            .default_size(280.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("attend.controls.scroll")
                    .show(ui, |ui| {
                        mode_switch_ui(&ctx, ui, commands);
                        panels::controls_ui(&ctx, ui, commands);
                        image_input::image_panel_ui(&ctx, ui, commands);
                        edit_panel_ui(&ctx, ui, &mut views.edit_panel, commands);
                        style_set_panel_ui(&ctx, ui, commands);
                    });
            });
        egui::Panel::right("attend.view")
            .resizable(true)
            .default_size(250.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .id_salt("attend.view.scroll")
                    .show(ui, |ui| {
                        panels::canvas_view_switch_ui(&ctx, ui, commands);
                        ui.separator();
                        if ctx.state.canvas_view == CanvasView::Segments {
                            segments_panel_ui(&ctx, ui, &mut views.segments, commands);
                        } else {
                            panels::view_panel_ui(&ctx, ui, commands);
                        }
                    });
            });
        egui::CentralPanel::default().show(ui, |ui| {
            // An open image is previewed until a run replays it.
            let style_set = ctx.state.modes.active() == ModeKind::StyleSet;
            if ctx.state.image.is_open() && !image_input::run_shows_image(ctx.state) && !style_set {
                image_input::image_pane_ui(&ctx, ui, &mut views.image_pane);
                return;
            }
            if ctx.state.modes.active() == ModeKind::StyleSet {
                style_set_grid_ui(&ctx, ui, &mut views.style_set, commands);
            }
            // Edit mode compares source and edited images; otherwise the plain canvas.
            let canvas = if compares(&ctx) {
                let panes = compare_panes_ui(&ctx, ui);
                let mut child = ui.new_child(egui::UiBuilder::new().max_rect(panes.canvas));
                let canvas = canvas_ui(&ctx, &mut child, &mut views.canvas, commands);
                let image_size_px = views
                    .canvas
                    .image()
                    .map(|image| (image.width, image.height));
                compare_ui(
                    &ctx,
                    ui,
                    &mut views.compare,
                    &panes,
                    views.canvas.image_rect,
                    image_size_px,
                    commands,
                );
                canvas
            } else {
                canvas_ui(&ctx, ui, &mut views.canvas, commands)
            };
            if let Some(canvas) = canvas.filter(|_| ctx.state.canvas_view == CanvasView::Segments) {
                segments_overlay_ui(&ctx, ui, &mut views.segments, &canvas);
            }
        });
        image_input::drop_highlight_ui(ui);
    }

    /// Restores the Models menu's added folders and recent models from eframe storage.
    pub fn restore_models_menu(&mut self, storage: Option<&dyn eframe::Storage>) {
        if let Some(menu) =
            storage.and_then(|storage| eframe::get_value(storage, MODELS_MENU_STORAGE_KEY))
        {
            self.views.models_menu = menu;
        }
    }

    /// Saves settings to eframe storage.
    fn save_settings(&self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_STORAGE_KEY, &self.state.settings);
    }
}

/// The appearance transfer mode's layout: its controls (left), exports, masks and probe (right),
/// progress and status (bottom) around its three panes.
fn appearance_layout_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    views: &mut Views,
    commands: &mut UiCommands,
) {
    egui::Panel::bottom("attend.bottom")
        .resizable(false)
        .show(ui, |ui| {
            ui.add_space(4.0);
            panels::status_line_ui(ctx, ui, commands);
        });
    egui::Panel::left("attend.controls")
        .resizable(true)
        .default_size(280.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("attend.controls.scroll")
                .show(ui, |ui| {
                    mode_switch_ui(ctx, ui, commands);
                    appearance_panel_ui(ctx, ui, commands);
                });
        });
    egui::Panel::right("attend.view")
        .resizable(true)
        .default_size(250.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("attend.view.scroll")
                .show(ui, |ui| appearance_side_panel_ui(ctx, ui, commands));
        });
    egui::CentralPanel::default().show(ui, |ui| {
        appearance_view_ui(ctx, ui, &mut views.appearance, commands);
    });
}

/// What the path field starts with: the folder a dialog would open in, with the proposed file name
/// for the purposes that write a file.
fn path_field_start(
    purpose: &DialogPurpose,
    start_folder: Option<PathBuf>,
    file_name: &str,
) -> String {
    let folder = start_folder.unwrap_or_default();
    let start = match purpose {
        DialogPurpose::OpenModelFolder
        | DialogPurpose::OpenModelFile
        | DialogPurpose::AddModelFolder
        | DialogPurpose::OpenSession
        | DialogPurpose::OpenImage
        | DialogPurpose::OpenAppearanceImage(_)
        | DialogPurpose::ExportAppearanceAll
        | DialogPurpose::ExportAllHeatmaps => folder,
        _ => folder.join(file_name),
    };
    start.display().to_string()
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
        eframe::set_value(storage, MODELS_MENU_STORAGE_KEY, &self.views.models_menu);
    }

    fn on_exit(&mut self) {
        self.frame_times.finish();
    }
}
