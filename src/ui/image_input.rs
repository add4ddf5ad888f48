//! Real images in the editor: an image opened from a file (File > Open image..., or dropped on the
//! window) is fitted to the run's size (crop, pad or stretch), inverted on the worker with a
//! progress bar, and then stands for the noise of every run: Generate replays its inversion (heat
//! maps, probe, timeline and segments of the real image) and edit mode edits it. "Close image" goes
//! back to noise-based generation.
//!
//! The state ([`ImageInput`]) lives in [`AppState`]; the panel ([`image_panel_ui`]) and the
//! preview pane ([`image_pane_ui`], shown until a run of the image is on screen) draw from it and
//! ask for [`ImageCommand`]s. The worker's inversion events are routed here first
//! ([`take_image_event`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use egui::{Color32, RichText};

use crate::analysis::image::{fit_image, image_hash, read_image, FittedImage, ImageFit, RgbImage};
use crate::analysis::png_parameters::{read_png_parameters, PngParameters};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::events::AfterEvent;
use crate::ui::models_menu::is_droppable_model;
use crate::ui::state::{AppState, StatusLevel};
use crate::worker::{Event, GenerateParams, InversionParams, SourceImage, INVERSION_METHODS};

/// What the image views ask for.
#[derive(Clone, Debug)]
pub(crate) enum ImageCommand {
    /// Fit the image with this choice (refits and forgets the inversion).
    SetFit(ImageFit),
    /// Invert with this method next.
    SetMethod(String),
    /// Invert the image with the panel's prompt, steps, guidance and seed.
    Invert,
    /// Cancel the running inversion.
    Cancel,
    /// Show the reconstruction (true) or the input (false) in the preview.
    ShowReconstruction(bool),
    /// Close the image: back to noise-based generation.
    Close,
}

/// The opened image.
#[derive(Clone, Debug)]
pub(crate) struct OpenedImage {
    /// What the user knows it as (the file name).
    pub(crate) name: String,
    /// The file it came from, if any.
    pub(crate) path: Option<PathBuf>,
    /// The pixels as read.
    pub(crate) original: Arc<RgbImage>,
    /// Fitted to the run's size (`None` until the size is known: no model loaded yet).
    pub(crate) fitted: Option<FittedImage>,
    /// [`image_hash`] of the fitted image.
    pub(crate) fitted_hash: Option<String>,
    /// The size `(width, height)` and fit the fitted image was made for.
    fitted_for: Option<((usize, usize), ImageFit)>,
}

/// Where an inversion is.
#[derive(Clone, Debug, Default)]
pub(crate) enum InversionState {
    /// Not inverted (or the inversion no longer matches the image).
    #[default]
    Idle,
    /// The worker inverts it.
    Running {
        /// The request's run id.
        run_id: u64,
        /// What it was asked with.
        params: InversionParams,
        /// The latest progress: phase, steps done, steps of the phase.
        progress: Option<(String, usize, usize)>,
        /// Seconds since the request started, at the latest progress.
        elapsed_secs: f64,
        /// Seconds since the request started when the current phase began.
        phase_started_secs: f64,
        /// Cancel was asked for.
        cancelling: bool,
    },
    /// Inverted: runs may replay it.
    Done {
        /// What a run names to replay it.
        source: SourceImage,
        /// The image regenerated from the inversion.
        reconstruction: Arc<RgbImage>,
        /// PSNR of the reconstruction, dB.
        psnr_db: f64,
        /// Seconds the inversion took.
        seconds: f64,
        /// The worker held it already.
        cached: bool,
    },
}

/// The editor's real image, its fit and its inversion.
#[derive(Clone, Debug)]
pub(crate) struct ImageInput {
    /// The opened image.
    pub(crate) opened: Option<OpenedImage>,
    /// How it is fitted to the run's size.
    pub(crate) fit: ImageFit,
    /// The inversion method (one of [`INVERSION_METHODS`]).
    pub(crate) method: String,
    /// The preview shows the reconstruction instead of the input.
    pub(crate) show_reconstruction: bool,
    /// The inversion.
    pub(crate) inversion: InversionState,
    /// The latest problem with the image (shown in red in the panel until the next action).
    pub(crate) error: Option<String>,
    /// Generate once the running inversion is done (Generate pressed on an image not inverted yet,
    /// or while the image is being read).
    pub(crate) generate_after_invert: bool,
    /// A file being read on the `attend-image-reader` thread, and where its answer comes.
    reading: Option<(PathBuf, Receiver<Result<ReadImage, String>>)>,
}

impl Default for ImageInput {
    fn default() -> Self {
        Self {
            opened: None,
            fit: ImageFit::default(),
            method: crate::worker::DEFAULT_INVERSION_METHOD.to_owned(),
            show_reconstruction: false,
            inversion: InversionState::default(),
            error: None,
            generate_after_invert: false,
            reading: None,
        }
    }
}

/// The file name of `path` for messages, or the whole path.
fn display_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

impl ImageInput {
    /// True when an image is open.
    pub(crate) fn is_open(&self) -> bool {
        self.opened.is_some()
    }

    /// True while the worker inverts the image.
    pub(crate) fn is_inverting(&self) -> bool {
        matches!(self.inversion, InversionState::Running { .. })
    }

    /// The fitted image and its hash, once the size is known.
    pub(crate) fn fitted(&self) -> Option<(&FittedImage, &str)> {
        let opened = self.opened.as_ref()?;
        Some((opened.fitted.as_ref()?, opened.fitted_hash.as_deref()?))
    }

    /// Starts reading `path` on the `attend-image-reader` thread (a large image decodes for a while;
    /// the window keeps painting). `done` is called when the answer is ready; [`Self::poll_reading`]
    /// takes it. A read already under way is forgotten.
    pub(crate) fn start_reading(
        &mut self,
        path: &Path,
        done: impl Fn() + Send + 'static,
    ) -> Result<(), String> {
        let (answer_tx, answer_rx) = crossbeam_channel::bounded(1);
        let file = path.to_path_buf();
        std::thread::Builder::new()
            .name("attend-image-reader".to_owned())
            .spawn(move || {
                let answer = read_checked(&file).map(|image| ReadImage {
                    image,
                    // Parameters that cannot be read are not an error for an image.
                    parameters: read_png_parameters(&file).ok().flatten(),
                });
                let _ = answer_tx.send(answer);
                done();
            })
            .map_err(|error| format!("Cannot open image {}: {error}", path.display()))?;
        self.reading = Some((path.to_path_buf(), answer_rx));
        Ok(())
    }

    /// True while a file is being read.
    pub(crate) fn is_reading(&self) -> bool {
        self.reading.is_some()
    }

    /// The answer of the file being read, once it is ready: the image is opened (replacing the open
    /// one) and its path and PNG `parameters` (if any) returned, or the error is returned and
    /// nothing changes.
    pub(crate) fn poll_reading(
        &mut self,
    ) -> Option<Result<(PathBuf, Option<PngParameters>), String>> {
        let (path, answer) = self.reading.as_ref()?;
        let result = match answer.try_recv() {
            Ok(result) => result,
            Err(crossbeam_channel::TryRecvError::Empty) => return None,
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(format!(
                "Cannot open image {}: the reader stopped",
                path.display()
            )),
        };
        let path = path.clone();
        self.reading = None;
        Some(result.map(|read| {
            // A Generate asked for while the file was read still follows.
            let generate = self.generate_after_invert;
            self.open(display_name(&path), Some(path.clone()), read.image);
            self.generate_after_invert = generate;
            (path, read.parameters)
        }))
    }

    /// Opens `image` (replacing any other).
    pub(crate) fn open(&mut self, name: String, path: Option<PathBuf>, image: RgbImage) {
        self.opened = Some(OpenedImage {
            name,
            path,
            original: Arc::new(image),
            fitted: None,
            fitted_hash: None,
            fitted_for: None,
        });
        self.inversion = InversionState::Idle;
        self.error = None;
        self.show_reconstruction = false;
        self.generate_after_invert = false;
    }

    /// Closes the image: runs start from noise again.
    pub(crate) fn close(&mut self) {
        *self = Self {
            fit: self.fit,
            method: self.method.clone(),
            reading: self.reading.take(),
            ..Self::default()
        };
    }

    /// Fits the image to `size_px` `(width, height)` with the chosen fit, when either changed since
    /// the last fit (a new fit forgets the inversion). Returns the error of a fit that failed.
    pub(crate) fn refit(&mut self, size_px: (usize, usize)) -> Result<(), String> {
        let fit = self.fit;
        let Some(opened) = &mut self.opened else {
            return Ok(());
        };
        if opened.fitted_for == Some((size_px, fit)) {
            return Ok(());
        }
        // Marked first, so a failing fit is reported once, not every frame.
        opened.fitted_for = Some((size_px, fit));
        opened.fitted = None;
        opened.fitted_hash = None;
        self.inversion = InversionState::Idle;
        self.show_reconstruction = false;
        let fitted = fit_image(&opened.original, size_px.0, size_px.1, fit).map_err(|error| {
            format!(
                "Cannot fit image {} to {}x{} px: {error}",
                opened.name, size_px.0, size_px.1
            )
        })?;
        opened.fitted_hash = Some(image_hash(&fitted.image));
        opened.fitted = Some(fitted);
        Ok(())
    }

    /// The inversion settings the panel asks for now: the prompt box's text (the image's
    /// description), steps, guidance and seed, and the chosen method.
    pub(crate) fn wanted_inversion(&self, params: &GenerateParams) -> InversionParams {
        InversionParams {
            prompt: params.prompt.trim().to_owned(),
            method: self.method.clone(),
            steps: params.steps,
            guidance: params.guidance,
            seed: params.seed,
        }
    }

    /// The inversion a run with `params` replays: the finished inversion, when it is of the image
    /// as fitted now and with the settings the panel asks for now.
    pub(crate) fn replay_source(&self, params: &GenerateParams) -> Option<&SourceImage> {
        let (_, hash) = self.fitted()?;
        match &self.inversion {
            InversionState::Done { source, .. }
                if source.image_hash == hash
                    && source.inversion == self.wanted_inversion(params) =>
            {
                Some(source)
            }
            _ => None,
        }
    }

    /// The finished inversion, whatever the panel asks for now.
    pub(crate) fn done(&self) -> Option<(&SourceImage, &Arc<RgbImage>, f64)> {
        match &self.inversion {
            InversionState::Done {
                source,
                reconstruction,
                psnr_db,
                ..
            } => Some((source, reconstruction, *psnr_db)),
            _ => None,
        }
    }

    /// The worker was asked to invert (request `run_id`).
    pub(crate) fn inversion_sent(&mut self, run_id: u64, params: InversionParams) {
        self.error = None;
        self.inversion = InversionState::Running {
            run_id,
            params,
            progress: None,
            elapsed_secs: 0.0,
            phase_started_secs: 0.0,
            cancelling: false,
        };
    }

    /// The request `run_id` is the running inversion.
    fn is_running_request(&self, run_id: u64) -> bool {
        matches!(self.inversion, InversionState::Running { run_id: running, .. } if running == run_id)
    }
}

/// What the reader thread hands back: the image and the settings its PNG carries.
struct ReadImage {
    image: RgbImage,
    parameters: Option<PngParameters>,
}

/// Reads an image file for the editor; errors name the file (the reader's do already).
fn read_checked(path: &Path) -> Result<RgbImage, String> {
    let image = read_image(path).map_err(|error| format!("Cannot open image: {error}"))?;
    if image.width == 0 || image.height == 0 || !image.is_consistent() {
        return Err(format!(
            "Cannot open image {}: it has no pixels ({}x{})",
            path.display(),
            image.width,
            image.height
        ));
    }
    Ok(image)
}

/// The size `(width, height)` runs have now: the panel's, else the loaded model's default (`None`
/// before a model is loaded).
pub(crate) fn run_size_px(state: &AppState) -> Option<(usize, usize)> {
    let params = &state.settings.params;
    let model = state.model.loaded.as_ref();
    let width = params
        .width_px
        .or(model.map(|info| info.default_width_px))?;
    let height = params
        .height_px
        .or(model.map(|info| info.default_height_px))?;
    Some((width, height))
}

/// Refits the open image to the run's size when it changed (each frame; cheap when nothing did).
pub(crate) fn keep_fitted(state: &mut AppState) {
    if !state.image.is_open() || state.image.is_inverting() {
        return;
    }
    let Some(size_px) = run_size_px(state) else {
        return;
    };
    if let Err(message) = state.image.refit(size_px) {
        state.image.error = Some(message.clone());
        state.status.push(StatusLevel::Error, message);
    }
}

/// True when the run on screen replays the open image (then the canvas shows it; before, the
/// preview pane does).
pub(crate) fn run_shows_image(state: &AppState) -> bool {
    let Some((_, hash)) = state.image.fitted() else {
        return false;
    };
    state.run.as_ref().is_some_and(|run| {
        run.params
            .source_image
            .as_ref()
            .is_some_and(|source| source.image_hash == hash)
    })
}

/// Routes an inversion event (progress, result, or the end of the running inversion request) to
/// the image state; `None` for any other event. A model that loaded or a restarted worker holds no
/// inversion any more: the image's is forgotten (the next Generate inverts again), and the event
/// goes on to its own routing.
pub(crate) fn image_event(state: &mut AppState, event: &Event) -> Option<AfterEvent> {
    let image = &mut state.image;
    match event {
        Event::ModelLoaded { .. } | Event::WorkerRestarted { .. } => {
            if matches!(image.inversion, InversionState::Done { .. }) {
                image.inversion = InversionState::Idle;
                image.show_reconstruction = false;
            }
            None
        }
        Event::InversionProgress {
            run_id,
            phase,
            steps_done,
            step_count,
            elapsed_secs,
        } => {
            if let InversionState::Running {
                run_id: running,
                progress,
                elapsed_secs: elapsed,
                phase_started_secs,
                ..
            } = &mut image.inversion
            {
                if running == run_id {
                    let new_phase = progress.as_ref().is_none_or(|(old, _, _)| old != phase);
                    if new_phase {
                        // The phase began when its first step started: the time of one step ago.
                        *phase_started_secs = *elapsed;
                    }
                    *progress = Some((phase.clone(), *steps_done, *step_count));
                    *elapsed = *elapsed_secs;
                }
            }
            Some(AfterEvent::Nothing)
        }
        Event::Inverted {
            run_id,
            source,
            reconstruction,
            psnr_db,
            seconds,
            cached,
        } => {
            let current = image.is_running_request(*run_id)
                && image
                    .fitted()
                    .is_some_and(|(_, hash)| hash == source.image_hash);
            if !current {
                return Some(AfterEvent::Nothing);
            }
            let how = if *cached { " (kept from before)" } else { "" };
            state.status.push(
                StatusLevel::Info,
                format!(
                    "Image inverted ({}, {} steps) in {seconds:.1} s{how}: reconstruction PSNR {}",
                    source.inversion.method,
                    source.inversion.steps,
                    format_psnr(*psnr_db)
                ),
            );
            image.inversion = InversionState::Done {
                source: source.clone(),
                reconstruction: Arc::new(reconstruction.clone()),
                psnr_db: *psnr_db,
                seconds: *seconds,
                cached: *cached,
            };
            image.show_reconstruction = true;
            if std::mem::take(&mut image.generate_after_invert) {
                return Some(AfterEvent::Generate);
            }
            Some(AfterEvent::Nothing)
        }
        Event::Cancelled { run_id, steps_done } if image.is_running_request(*run_id) => {
            image.inversion = InversionState::Idle;
            image.generate_after_invert = false;
            state.status.push(
                StatusLevel::Info,
                format!("Inversion cancelled after {steps_done} step(s)"),
            );
            Some(AfterEvent::Nothing)
        }
        Event::Failed {
            run_id: Some(run_id),
            message,
        } if image.is_running_request(*run_id) => {
            image.inversion = InversionState::Idle;
            image.generate_after_invert = false;
            let name = image
                .opened
                .as_ref()
                .map_or_else(String::new, |opened| format!(" of {}", opened.name));
            let message = format!("Inversion{name} failed: {message}");
            image.error = Some(message.clone());
            state.status.push(StatusLevel::Error, message);
            Some(AfterEvent::Nothing)
        }
        _ => None,
    }
}

/// PSNR in words (`"38.2 dB"`, or `"exact"` for an infinite one).
fn format_psnr(psnr_db: f64) -> String {
    if psnr_db.is_infinite() {
        "exact".to_owned()
    } else {
        format!("{psnr_db:.1} dB")
    }
}

/// The fit choice in words.
fn fit_name(fit: ImageFit) -> &'static str {
    match fit {
        ImageFit::Crop => "crop",
        ImageFit::Pad => "pad",
        ImageFit::Stretch => "stretch",
    }
}

/// How the source landed in the fitted image, in words.
fn placement_note(fitted: &FittedImage) -> String {
    let placement = &fitted.placement;
    let (source_w, source_h) = placement.source_size_px;
    let (vx, vy, vw, vh) = placement.visible_source_rect;
    let (fx, fy, fw, fh) = placement.fitted_rect;
    let size = format!(
        "{source_w}x{source_h} px -> {}x{} px",
        fitted.image.width, fitted.image.height
    );
    if (source_w, source_h) == (fitted.image.width, fitted.image.height) {
        return format!("{size}, as is");
    }
    match placement.fit {
        ImageFit::Crop if (vw, vh) != (source_w, source_h) => {
            format!("{size}, cropped to the part at ({vx}, {vy}) of {vw}x{vh} px")
        }
        ImageFit::Pad if (fw, fh) != (fitted.image.width, fitted.image.height) => {
            format!("{size}, padded: the image fills ({fx}, {fy}) {fw}x{fh} px")
        }
        ImageFit::Stretch => format!("{size}, stretched"),
        _ => format!("{size}, scaled"),
    }
}

/// Seconds left of the running phase, from its pace so far.
fn eta_secs(steps_done: usize, step_count: usize, phase_secs: f64) -> Option<f64> {
    (steps_done > 0 && step_count >= steps_done)
        .then(|| phase_secs / steps_done as f64 * (step_count - steps_done) as f64)
}

/// The image panel (left, under the generation controls): the image, its fit, the inversion
/// method, Invert with its progress and Cancel, input / reconstruction, Close image. Nothing
/// without an image (File > Open image... or dropping a file opens one).
pub(crate) fn image_panel_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let image = &ctx.state.image;
    if image.reading.is_none() && image.opened.is_none() {
        return;
    }
    ui.separator();
    ui.heading("Image");
    if let Some((path, _)) = &image.reading {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(format!("reading {}...", display_name(path)));
        });
    }
    let Some(opened) = &image.opened else {
        return;
    };
    let error_colour = ui.visuals().error_fg_color;
    ui.label(RichText::new(&opened.name).strong());
    let running = image.is_inverting();
    ui.add_enabled_ui(!running, |ui| {
        ui.horizontal(|ui| {
            let label = ui.label("Fit");
            let mut fit = image.fit;
            egui::ComboBox::from_id_salt("attend.image.fit")
                .selected_text(fit_name(fit))
                .show_ui(ui, |ui| {
                    for choice in [ImageFit::Crop, ImageFit::Pad, ImageFit::Stretch] {
                        ui.selectable_value(&mut fit, choice, fit_name(choice));
                    }
                })
                .response
                .labelled_by(label.id);
            if fit != image.fit {
                commands.push(UiCommand::Image(ImageCommand::SetFit(fit)));
            }
        });
    });
    match &opened.fitted {
        Some(fitted) => {
            ui.add(egui::Label::new(RichText::new(placement_note(fitted)).small()).wrap());
        }
        None => {
            ui.label(RichText::new("waiting for the model to know the run's size").small());
        }
    }
    ui.add_enabled_ui(!running, |ui| {
        ui.horizontal(|ui| {
            let label = ui.label("Method");
            let mut method = image.method.clone();
            egui::ComboBox::from_id_salt("attend.image.method")
                .selected_text(method.clone())
                .show_ui(ui, |ui| {
                    for name in INVERSION_METHODS {
                        ui.selectable_value(&mut method, name.to_owned(), name);
                    }
                })
                .response
                .labelled_by(label.id);
            if method != image.method {
                commands.push(UiCommand::Image(ImageCommand::SetMethod(method)));
            }
        });
    });
    ui.horizontal(|ui| {
        let can_invert = !running && opened.fitted.is_some();
        if ui
            .add_enabled(can_invert, egui::Button::new("Invert"))
            .on_hover_text("Invert the image with the prompt box's description, steps and guidance")
            .clicked()
        {
            commands.push(UiCommand::Image(ImageCommand::Invert));
        }
        if ui
            .add_enabled(running, egui::Button::new("Cancel inversion"))
            .clicked()
        {
            commands.push(UiCommand::Image(ImageCommand::Cancel));
        }
        if ui.button("Close image").clicked() {
            commands.push(UiCommand::Image(ImageCommand::Close));
        }
    });
    if let InversionState::Running {
        params,
        progress,
        elapsed_secs,
        phase_started_secs,
        cancelling,
        ..
    } = &image.inversion
    {
        let (text, fraction) = match progress {
            Some((phase, done, count)) => {
                let eta = eta_secs(*done, *count, elapsed_secs - phase_started_secs)
                    .map_or_else(String::new, |secs| format!(", about {secs:.0} s left"));
                (
                    format!("{}: {phase} {done}/{count}{eta}", params.method),
                    *done as f32 / (*count).max(1) as f32,
                )
            }
            None => ("starting...".to_owned(), 0.0),
        };
        let text = if *cancelling {
            "cancelling...".to_owned()
        } else {
            text
        };
        ui.add(egui::ProgressBar::new(fraction).text(text));
    }
    if let InversionState::Done {
        psnr_db,
        seconds,
        cached,
        ..
    } = &image.inversion
    {
        ui.horizontal(|ui| {
            let mut show = image.show_reconstruction;
            ui.selectable_value(&mut show, false, "input");
            ui.selectable_value(&mut show, true, "reconstruction");
            if show != image.show_reconstruction {
                commands.push(UiCommand::Image(ImageCommand::ShowReconstruction(show)));
            }
        });
        let how = if *cached { ", kept from before" } else { "" };
        ui.label(format!(
            "Reconstruction PSNR {} (inverted in {seconds:.1} s{how})",
            format_psnr(*psnr_db)
        ));
        if image.replay_source(&ctx.state.settings.params).is_none() {
            ui.add(
                egui::Label::new(
                    RichText::new(
                        "The description, steps, guidance or method changed since the inversion: \
                         Generate inverts again",
                    )
                    .small(),
                )
                .wrap(),
            );
        }
    }
    if let Some(error) = &image.error {
        ui.add(egui::Label::new(RichText::new(error).color(error_colour)).wrap());
    }
}

/// The preview pane's texture and what it shows.
#[derive(Default)]
pub(crate) struct ImagePane {
    texture: Option<((String, bool), egui::TextureHandle)>,
}

/// Draws the open image (input or reconstruction) in `ui`'s area with the fit's placement outlined,
/// until a run of the image is on screen.
pub(crate) fn image_pane_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, pane: &mut ImagePane) {
    let image = &ctx.state.image;
    let Some(opened) = &image.opened else {
        return;
    };
    let reconstruction = image
        .done()
        .filter(|_| image.show_reconstruction)
        .map(|(_, reconstruction, _)| reconstruction);
    let (shown, hash): (&RgbImage, String) = match (reconstruction, image.fitted()) {
        (Some(reconstruction), Some((_, hash))) => {
            (reconstruction, format!("{hash}.reconstruction"))
        }
        (None, Some((fitted, hash))) => (&fitted.image, hash.to_owned()),
        (_, None) => (&opened.original, format!("original.{}", opened.name)),
    };
    let key = (hash, reconstruction.is_some());
    if pane.texture.as_ref().is_none_or(|(old, _)| *old != key) {
        let colour = egui::ColorImage::from_rgb([shown.width, shown.height], &shown.pixels);
        let texture =
            ui.ctx()
                .load_texture("attend.image.pane", colour, egui::TextureOptions::LINEAR);
        pane.texture = Some((key, texture));
    }
    let Some((_, texture)) = &pane.texture else {
        return;
    };
    let available = ui.available_rect_before_wrap();
    let caption_height = 24.0;
    let area = egui::Rect::from_min_max(
        available.min,
        egui::pos2(
            available.max.x,
            (available.max.y - caption_height).max(available.min.y),
        ),
    );
    let (width, height) = (shown.width.max(1) as f32, shown.height.max(1) as f32);
    let scale = (area.width() / width).min(area.height() / height).max(0.01);
    let rect =
        egui::Rect::from_center_size(area.center(), egui::vec2(width * scale, height * scale));
    ui.painter().image(
        texture.id(),
        rect,
        egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
        Color32::WHITE,
    );
    if let Some((fitted, _)) = image.fitted() {
        // The part of the fitted image the source fills (padding lies outside it).
        let (fx, fy, fw, fh) = fitted.placement.fitted_rect;
        let outline = egui::Rect::from_min_size(
            rect.min + egui::vec2(fx as f32 * scale, fy as f32 * scale),
            egui::vec2(fw as f32 * scale, fh as f32 * scale),
        );
        ui.painter().rect_stroke(
            outline,
            0.0,
            egui::Stroke::new(1.5, Color32::from_rgb(250, 200, 50)),
            egui::StrokeKind::Outside,
        );
    }
    let caption = match (reconstruction.is_some(), image.fitted()) {
        (true, _) => "reconstruction (the inversion replayed with its description)".to_owned(),
        (false, Some((fitted, _))) => format!("input: {}", placement_note(fitted)),
        (false, None) => format!("{}, not fitted yet", opened.name),
    };
    ui.painter().text(
        egui::pos2(available.center().x, available.max.y - caption_height / 2.0),
        egui::Align2::CENTER_CENTER,
        caption,
        egui::FontId::proportional(13.0),
        ui.visuals().text_color(),
    );
    ui.allocate_rect(available, egui::Sense::hover());
}

/// While files are dragged over the window: a highlight that says what dropping does.
pub(crate) fn drop_highlight_ui(ui: &egui::Ui) {
    let hovering = ui.ctx().input(|input| !input.raw.hovered_files.is_empty());
    if !hovering {
        return;
    }
    let screen = ui.ctx().content_rect();
    let painter = ui.ctx().layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::unique("attend.image.drop"),
    ));
    painter.rect_filled(screen, 0.0, Color32::from_black_alpha(140));
    painter.rect_stroke(
        screen.shrink(6.0),
        8.0,
        egui::Stroke::new(3.0, Color32::from_rgb(250, 200, 50)),
        egui::StrokeKind::Inside,
    );
    painter.text(
        screen.center(),
        egui::Align2::CENTER_CENTER,
        "Drop an image to open it",
        egui::FontId::proportional(28.0),
        Color32::WHITE,
    );
}

/// The first file dropped on the window this frame, by its path.
pub(crate) fn dropped_file(ui: &egui::Ui) -> Option<PathBuf> {
    // Model folders and checkpoint files dropped on the window are the Models menu's to load.
    ui.ctx().input(|input| {
        input
            .raw
            .dropped_files
            .iter()
            .map(|file| file.path().to_path_buf())
            .find(|path| !path.as_os_str().is_empty() && !is_droppable_model(path))
    })
}

// -------------------------------------------------------------------------------------------------
// The image in session files
// -------------------------------------------------------------------------------------------------

/// The open image as saved in a session: the fitted image's pixels as an embedded PNG (base64),
/// checked against its hash when the session is reopened, and how it was inverted.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionImage {
    /// The image's name (its file name when it was opened).
    pub name: String,
    /// The file it was opened from, if any (for reference; the pixels are embedded).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// How it was fitted.
    #[serde(default)]
    pub fit: ImageFit,
    /// The inversion method.
    pub method: String,
    /// [`image_hash`] of the fitted image.
    pub hash: String,
    /// The fitted image as an 8-bit RGB PNG, base64 (standard alphabet, padded).
    pub png_base64: String,
}

/// Why a session's image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SessionImageError {
    /// The embedded data is not base64.
    #[error("the session's image {name:?} is not valid base64: {reason}")]
    Base64 {
        /// The image's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The embedded data is not a PNG image.
    #[error("the session's image {name:?} is not a readable PNG: {reason}")]
    Png {
        /// The image's name.
        name: String,
        /// The decoder's error.
        reason: String,
    },
    /// The pixels are not the ones saved.
    #[error(
        "the session's image {name:?} has hash {found}, expected {expected}: its pixels changed"
    )]
    Hash {
        /// The image's name.
        name: String,
        /// Hash of the decoded pixels.
        found: String,
        /// Hash saved with it.
        expected: String,
    },
}

impl SessionImage {
    /// The session part of `image`'s fitted image (`None` before it is fitted).
    pub(crate) fn of(image: &ImageInput) -> Option<Self> {
        let opened = image.opened.as_ref()?;
        let (fitted, hash) = image.fitted()?;
        Some(Self {
            name: opened.name.clone(),
            path: opened.path.clone(),
            fit: image.fit,
            method: image.method.clone(),
            hash: hash.to_owned(),
            png_base64: base64_encode(&encode_png(&fitted.image)),
        })
    }

    /// Decodes the embedded image and checks its hash.
    pub fn decode(&self) -> Result<RgbImage, SessionImageError> {
        let bytes =
            base64_decode(&self.png_base64).map_err(|reason| SessionImageError::Base64 {
                name: self.name.clone(),
                reason,
            })?;
        let image = decode_png(&bytes).map_err(|reason| SessionImageError::Png {
            name: self.name.clone(),
            reason,
        })?;
        let found = image_hash(&image);
        if found != self.hash {
            return Err(SessionImageError::Hash {
                name: self.name.clone(),
                found,
                expected: self.hash.clone(),
            });
        }
        Ok(image)
    }
}

impl ImageInput {
    /// Opens a session's image as already fitted (its pixels are the fitted ones): it is not fitted
    /// again unless the run's size changes.
    pub(crate) fn open_session_image(
        &mut self,
        saved: &SessionImage,
    ) -> Result<(), SessionImageError> {
        let image = saved.decode()?;
        let size_px = (image.width, image.height);
        self.fit = saved.fit;
        self.method = saved.method.clone();
        self.open(saved.name.clone(), saved.path.clone(), image.clone());
        if let Some(opened) = &mut self.opened {
            let whole = (0, 0, image.width, image.height);
            opened.fitted_for = Some((size_px, saved.fit));
            opened.fitted_hash = Some(saved.hash.clone());
            opened.fitted = Some(FittedImage {
                placement: crate::analysis::image::ImagePlacement {
                    fit: saved.fit,
                    source_size_px: (image.width, image.height),
                    visible_source_rect: whole,
                    fitted_rect: whole,
                },
                image,
            });
        }
        Ok(())
    }
}

/// `image` as an 8-bit RGB PNG in memory.
fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    let encoded = ::image::RgbImage::from_raw(
        image.width as u32,
        image.height as u32,
        image.pixels.clone(),
    )
    .map(|buffer| {
        buffer.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            ::image::ImageFormat::Png,
        )
    });
    match encoded {
        Some(Ok(())) => bytes,
        // An inconsistent image cannot be saved; an empty PNG fails its check on reopening.
        _ => Vec::new(),
    }
}

/// Decodes a PNG of any colour type to 8-bit RGB.
fn decode_png(bytes: &[u8]) -> Result<RgbImage, String> {
    let decoded = ::image::load_from_memory_with_format(bytes, ::image::ImageFormat::Png)
        .map_err(|error| error.to_string())?
        .to_rgb8();
    Ok(RgbImage {
        width: decoded.width() as usize,
        height: decoded.height() as usize,
        pixels: decoded.into_raw(),
    })
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let value = chunk
            .iter()
            .enumerate()
            .fold(0u32, |value, (index, &byte)| {
                value | u32::from(byte) << (16 - 8 * index)
            });
        for index in 0..4 {
            if index <= chunk.len() {
                let sextet = (value >> (18 - 6 * index)) & 63;
                text.push(char::from(BASE64_ALPHABET[sextet as usize]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// Decodes standard base64 (padding required; whitespace ignored).
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let symbols: Vec<u8> = text
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    if !symbols.len().is_multiple_of(4) {
        return Err(format!("{} symbols is not a multiple of 4", symbols.len()));
    }
    let mut bytes = Vec::with_capacity(symbols.len() / 4 * 3);
    let chunk_count = symbols.len() / 4;
    for (chunk_index, chunk) in symbols.chunks(4).enumerate() {
        let padding = chunk
            .iter()
            .rev()
            .take_while(|&&symbol| symbol == b'=')
            .count();
        if padding > 2 || (padding > 0 && chunk_index + 1 != chunk_count) {
            return Err(format!("misplaced padding in group {chunk_index}"));
        }
        let mut value = 0u32;
        for (index, &symbol) in chunk.iter().enumerate() {
            let sextet = if index >= 4 - padding {
                0
            } else {
                BASE64_ALPHABET
                    .iter()
                    .position(|&letter| letter == symbol)
                    .ok_or_else(|| format!("{:?} is not a base64 symbol", char::from(symbol)))?
                    as u32
            };
            value = value << 6 | sextet;
        }
        let decoded = [(value >> 16) as u8, (value >> 8) as u8, value as u8];
        bytes.extend_from_slice(&decoded[..3 - padding]);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_refuses_garbage() {
        for length in 0..10 {
            let bytes: Vec<u8> = (0..length).map(|index| (index * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert!(base64_decode("TW").is_err());
        assert!(base64_decode("TW!u").is_err());
        assert!(base64_decode("TW==TWFu").is_err());
    }

    #[test]
    fn a_session_image_keeps_its_pixels_and_notices_a_change() {
        let image = RgbImage {
            width: 3,
            height: 2,
            pixels: (0..18).map(|value| value * 13).collect(),
        };
        let saved = SessionImage {
            name: "x.png".to_owned(),
            path: None,
            fit: ImageFit::Pad,
            method: "direct".to_owned(),
            hash: image_hash(&image),
            png_base64: base64_encode(&encode_png(&image)),
        };
        assert_eq!(saved.decode().unwrap(), image);
        let changed = SessionImage {
            hash: "0000000000000000".to_owned(),
            ..saved.clone()
        };
        assert!(matches!(
            changed.decode(),
            Err(SessionImageError::Hash { .. })
        ));
        let broken = SessionImage {
            png_base64: base64_encode(b"not a png"),
            ..saved
        };
        assert!(matches!(
            broken.decode(),
            Err(SessionImageError::Png { .. })
        ));
    }

    #[test]
    fn the_time_left_follows_the_pace_of_the_phase() {
        assert_eq!(eta_secs(0, 10, 5.0), None);
        assert_eq!(eta_secs(2, 10, 4.0), Some(16.0));
        assert_eq!(eta_secs(10, 10, 4.0), Some(0.0));
    }
}
