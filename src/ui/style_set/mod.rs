//! Style set mode: a reference prompt (the prompt box) and a list of target prompts generated as
//! one set whose targets share the reference's style (Style Aligned). The grid of images fills in
//! step by step; clicking an image makes it the run on screen, so its word heat maps, probe and
//! segments show as for a plain run, with the reference's and the selected image's word maps side
//! by side above the canvas. "Export all" writes `reference.png`, `1.png` ... `N.png` and
//! `grid.png`.
//!
//! | module | what it is |
//! |---|---|
//! | `mod` | [`StyleSetMode`]: the settings, the set's images as received, selection, events |
//! | `panel` | the left panel: mode switch, target prompts, sharing options, run, export |
//! | `view` | the grid of images and the side-by-side word maps above the canvas |

pub(crate) mod panel;
pub(crate) mod view;

use std::path::{Path, PathBuf};

use crate::analysis::export::{a1111_parameters, GenerationParameters};
use crate::ui::run_view::{RunOutcome, RunView};
use crate::ui::state::{AppState, StatusLevel};
use crate::worker::{
    Branch, Event, GenerateParams, PngExport, RgbImage, StyleAlignedConfig, StyleSetParams,
};

/// What the style panel edits: the target prompts, the sharing options, the export folder.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StyleSetSettings {
    /// The target prompts, in image order.
    pub(crate) targets: Vec<String>,
    /// The prompt being typed in the "add" field.
    pub(crate) new_target: String,
    /// Share the reference's attention at all (off: every image generated on its own).
    pub(crate) share: bool,
    /// The sharing options.
    pub(crate) config: StyleAlignedConfig,
    /// Where "Export all" writes.
    pub(crate) export_folder: String,
}

impl Default for StyleSetSettings {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            new_target: String::new(),
            share: true,
            config: StyleAlignedConfig::measured_default(),
            export_folder: "style-set".to_owned(),
        }
    }
}

/// What the style panel and grid ask for (applied by [`crate::ui::EditorApp`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum StyleSetCommand {
    /// Turn style set mode on or off.
    SetEnabled(bool),
    /// Replace the panel's settings.
    SetSettings(Box<StyleSetSettings>),
    /// Make image `index` (0: the reference) the run on screen.
    Select(usize),
    /// Write every image and the grid to the export folder.
    ExportAll,
}

/// Style set mode's state.
#[derive(Default)]
pub(crate) struct StyleSetMode {
    enabled: bool,
    settings: StyleSetSettings,
    /// The set asked for last.
    run_id: Option<u64>,
    /// Images of the set asked for (reference first); `None` until its `Started` arrives.
    images: Vec<Option<RunView>>,
    /// The image on screen.
    selected: usize,
    /// Why the last set could not run (shown red in the panel).
    error: Option<String>,
}

impl StyleSetMode {
    /// True while the mode is on.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns the mode on or off.
    pub(crate) fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// The panel's settings.
    pub(crate) fn settings(&self) -> &StyleSetSettings {
        &self.settings
    }

    /// Replaces the panel's settings.
    pub(crate) fn set_settings(&mut self, settings: StyleSetSettings) {
        self.settings = settings;
    }

    /// Why the last set could not run, if it could not.
    pub(crate) fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The images received so far (`None`: not started yet), reference first.
    pub(crate) fn images(&self) -> &[Option<RunView>] {
        &self.images
    }

    /// Image `index` as received, if it started.
    pub(crate) fn image(&self, index: usize) -> Option<&RunView> {
        self.images.get(index).and_then(Option::as_ref)
    }

    /// The image on screen (0: the reference).
    pub(crate) fn selected(&self) -> usize {
        self.selected
    }

    /// True while the set asked for last is still coming.
    pub(crate) fn is_running(&self) -> bool {
        self.run_id.is_some()
            && (self.images.iter().any(Option::is_none)
                || self.images.iter().flatten().any(RunView::is_running))
            && self.error.is_none()
    }

    /// True when every image of the set finished.
    pub(crate) fn finished(&self) -> bool {
        !self.images.is_empty()
            && self.images.iter().all(|image| {
                image
                    .as_ref()
                    .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
            })
    }

    /// What the worker needs for a set with the reference `reference` (and `reference_image`,
    /// the open image fitted to the run's size, when one is open), or why there is none to run
    /// (no target prompts, an empty one).
    pub(crate) fn params_to_send(
        &self,
        reference: GenerateParams,
        reference_image: Option<RgbImage>,
    ) -> Result<StyleSetParams, String> {
        let targets: Vec<String> = self
            .settings
            .targets
            .iter()
            .map(|prompt| prompt.trim().to_owned())
            .collect();
        if targets.is_empty() {
            return Err("Add at least one target prompt to run a style set".to_owned());
        }
        if let Some(position) = targets.iter().position(String::is_empty) {
            return Err(format!("Target prompt {} is empty", position + 1));
        }
        let params = StyleSetParams {
            reference: GenerateParams {
                source_image: None,
                ..reference
            },
            target_prompts: targets,
            sharing: self.settings.share.then_some(self.settings.config),
            reference_image,
        };
        crate::worker::check_style_set_params(&params).map_err(|error| error.to_string())?;
        Ok(params)
    }

    /// A set of `image_count` images went out as run `run_id`.
    pub(crate) fn sent(&mut self, run_id: u64, image_count: usize) {
        self.run_id = Some(run_id);
        self.images = vec![None; image_count];
        self.selected = 0;
        self.error = None;
    }

    /// The set could not be sent or run: why.
    pub(crate) fn refused(&mut self, message: String) {
        self.error = Some(message);
    }

    /// The files "Export all" writes: `reference.png`, `1.png` ... `N.png` and `grid.png` in the
    /// export folder, each with its image's parameters; or why nothing can be exported.
    pub(crate) fn export_files(&self, model_name: &str) -> Result<Vec<PngExport>, String> {
        if !self.finished() {
            return Err("Nothing to export: the style set has not finished".to_owned());
        }
        let folder = self.settings.export_folder.trim();
        if folder.is_empty() {
            return Err("Choose a folder to export the style set to".to_owned());
        }
        let folder = PathBuf::from(folder);
        let runs: Vec<&RunView> = self.images.iter().flatten().collect();
        let mut files = Vec::with_capacity(runs.len() + 1);
        for (index, run) in runs.iter().enumerate() {
            let Some(image) = &run.final_image else {
                return Err(format!("Image {index} of the set has no final image"));
            };
            files.push(PngExport {
                path: folder.join(image_file_name(index)),
                image: image.clone(),
                parameters: Some(png_parameters(&run.params, image, model_name)),
            });
        }
        let images: Vec<&RgbImage> = files.iter().map(|file| &file.image).collect();
        let grid = grid_image(&images)?;
        files.push(PngExport {
            path: folder.join("grid.png"),
            image: grid,
            parameters: None,
        });
        Ok(files)
    }
}

/// The file of image `index` of a set (0: the reference).
pub(crate) fn image_file_name(index: usize) -> String {
    if index == 0 {
        "reference.png".to_owned()
    } else {
        format!("{index}.png")
    }
}

/// The A1111 `parameters` text of one image of a set.
fn png_parameters(params: &GenerateParams, image: &RgbImage, model_name: &str) -> String {
    a1111_parameters(&GenerationParameters {
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        steps: params.steps,
        sampler: params.scheduler.clone().unwrap_or_default(),
        cfg_scale: params.guidance as f32,
        seed: params.seed,
        width: image.width,
        height: image.height,
        model: model_name.to_owned(),
        extra: vec![("Generator".to_owned(), "attend style set".to_owned())],
    })
}

/// The images side by side, left to right (all of one size).
pub(crate) fn grid_image(images: &[&RgbImage]) -> Result<RgbImage, String> {
    let Some(first) = images.first() else {
        return Err("No image to put in a grid".to_owned());
    };
    let (width, height) = (first.width, first.height);
    if images
        .iter()
        .any(|image| (image.width, image.height) != (width, height) || !image.is_consistent())
    {
        return Err("The set's images differ in size".to_owned());
    }
    let total_width = width * images.len();
    let mut pixels = vec![0u8; total_width * height * 3];
    for (column, image) in images.iter().enumerate() {
        for row in 0..height {
            let source = &image.pixels[row * width * 3..][..width * 3];
            let start = (row * total_width + column * width) * 3;
            pixels[start..start + width * 3].copy_from_slice(source);
        }
    }
    Ok(RgbImage {
        width: total_width,
        height,
        pixels,
    })
}

/// Makes image `index` of the set the run on screen (its heat maps, token strip, timeline, probe
/// and segments). Returns the set's run id when the image has started (the worker is then told,
/// so that the probe and segments read that image's attention).
pub(crate) fn select_image(state: &mut AppState, index: usize) -> Option<u64> {
    let style = &mut state.modes.style_set;
    let run = style.image(index)?.clone();
    style.selected = index;
    let run_id = run.run_id;
    show_run(state, run);
    Some(run_id)
}

/// Puts `run` on screen as a new run: timeline following, probe map dropped.
fn show_run(state: &mut AppState, run: RunView) {
    let word_count = run.prompt.words.len();
    state.run = Some(run);
    state.timeline.cursor = None;
    if state.selected_word.is_some_and(|index| index >= word_count) {
        state.selected_word = None;
    }
    state.probe.map = None;
    state.probe.requested = None;
    state.probe.awaiting = false;
}

/// Routes a style set's events: images' `Started`, `Step` and `Finished` go to the set (and the
/// selected image also to the run on screen); the set's `Cancelled` and `Failed` mark it and then
/// go on to the usual handling (returned). Every other event is returned as it came.
pub(crate) fn style_set_event(state: &mut AppState, event: Event) -> Option<Event> {
    let style = &mut state.modes.style_set;
    match event {
        Event::Started {
            run_id,
            branch: Branch::StyleImage(index),
            params,
            prompt,
            ..
        } => {
            if style.run_id != Some(run_id) || index >= style.images.len() {
                return None;
            }
            for warning in &prompt.warnings {
                state.status.push(StatusLevel::Warning, warning.clone());
            }
            let run = RunView::new(run_id, Branch::StyleImage(index), params, prompt);
            style.images[index] = Some(run.clone());
            if index == style.selected {
                state.pending_run = None;
                show_run(state, run);
            }
            None
        }
        Event::Step {
            run_id,
            branch: Branch::StyleImage(index),
            frame,
            ..
        } => {
            if style.run_id != Some(run_id) {
                return None;
            }
            if let Some(Some(run)) = style.images.get_mut(index) {
                run.push_step((*frame).clone());
            }
            if let Some(run) = shown_image(state, run_id, index) {
                run.push_step(*frame);
            }
            None
        }
        Event::Finished {
            run_id,
            branch: Branch::StyleImage(index),
            image,
            elapsed_secs,
            self_attention_grids,
            ..
        } => {
            if style.run_id != Some(run_id) {
                return None;
            }
            let finish = |run: &mut RunView| {
                run.final_image = Some(image.clone());
                run.outcome = RunOutcome::Finished { elapsed_secs };
                run.self_attention_grids = self_attention_grids.clone();
            };
            if let Some(Some(run)) = style.images.get_mut(index) {
                finish(run);
            }
            let last = index + 1 == style.images.len();
            if let Some(run) = shown_image(state, run_id, index) {
                finish(run);
            }
            if last {
                state.status.push(
                    StatusLevel::Info,
                    format!(
                        "Style set of {} images done in {elapsed_secs:.1} s",
                        index + 1
                    ),
                );
            }
            None
        }
        Event::Cancelled { run_id, steps_done } if style.run_id == Some(run_id) => {
            for run in style.images.iter_mut().flatten() {
                if run.is_running() {
                    run.outcome = RunOutcome::Cancelled { steps_done };
                }
            }
            if style.images.iter().any(Option::is_none) {
                style.error = Some(format!("Cancelled after {steps_done} step(s)"));
            }
            Some(Event::Cancelled { run_id, steps_done })
        }
        Event::Failed {
            run_id: Some(run_id),
            message,
        } if style.run_id == Some(run_id) => {
            style.error = Some(message.clone());
            for run in style.images.iter_mut().flatten() {
                if run.is_running() {
                    run.outcome = RunOutcome::Failed(message.clone());
                }
            }
            Some(Event::Failed {
                run_id: Some(run_id),
                message: format!("Style set failed: {message}"),
            })
        }
        event => Some(event),
    }
}

/// The run on screen when it is image `index` of set `run_id`.
fn shown_image(state: &mut AppState, run_id: u64, index: usize) -> Option<&mut RunView> {
    state
        .run
        .as_mut()
        .filter(|run| run.run_id == run_id && run.branch == Branch::StyleImage(index))
}

/// Creates the export folder when it does not exist yet (the files themselves are written
/// atomically by the worker).
pub(crate) fn prepare_export_folder(folder: &Path) -> Result<(), String> {
    std::fs::create_dir_all(folder)
        .map_err(|error| format!("Cannot create the folder {}: {error}", folder.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{PromptInfo, StepCross, StepFrame, StepTiming};

    fn frame(step_index: usize, shade: u8) -> Box<StepFrame> {
        Box::new(StepFrame {
            step_index,
            step_count: 2,
            timestep: 0.0,
            preview: RgbImage {
                width: 1,
                height: 1,
                pixels: vec![shade; 3],
            },
            cross: std::sync::Arc::new(StepCross {
                step_index,
                groups: Vec::new(),
            }),
            timing: StepTiming::default(),
        })
    }

    /// A set's events fill every image; the selected image is the run on screen, and selecting
    /// another puts that one on screen.
    #[test]
    fn a_sets_events_fill_the_grid_and_the_selected_image() {
        let mut state = AppState::default();
        state.supersede_runs(4);
        state.modes.style_set.sent(4, 2);
        for index in 0..2 {
            let event = Event::Started {
                run_id: 4,
                branch: Branch::StyleImage(index),
                params: GenerateParams::default(),
                prompt: PromptInfo::default(),
                edit: None,
            };
            assert!(style_set_event(&mut state, event).is_none());
        }
        assert_eq!(state.pending_run, None);
        for (index, shade) in [(0, 10), (1, 20)] {
            let event = Event::Step {
                run_id: 4,
                branch: Branch::StyleImage(index),
                frame: frame(0, shade),
                blend_mask: None,
            };
            assert!(style_set_event(&mut state, event).is_none());
        }
        assert!(state.modes.style_set.is_running());
        for index in 0..2 {
            let event = Event::Finished {
                run_id: 4,
                branch: Branch::StyleImage(index),
                image: RgbImage::black(1, 1),
                elapsed_secs: 1.0,
                self_attention_grids: Vec::new(),
                blend_mask: None,
            };
            assert!(style_set_event(&mut state, event).is_none());
        }
        let style = &state.modes.style_set;
        assert!(style.finished() && !style.is_running());
        assert_eq!(style.image(1).unwrap().steps[0].preview.pixels, vec![20; 3]);
        let shown = state.run.as_ref().unwrap();
        assert_eq!(shown.branch, Branch::StyleImage(0));
        assert_eq!(shown.steps[0].preview.pixels, vec![10; 3]);
        assert_eq!(select_image(&mut state, 1), Some(4));
        assert_eq!(state.run.as_ref().unwrap().branch, Branch::StyleImage(1));
        assert_eq!(state.modes.style_set.selected(), 1);
        assert_eq!(select_image(&mut state, 5), None);
    }

    #[test]
    fn no_target_prompts_is_an_error_and_exports_name_every_image() {
        let mut style = StyleSetMode::default();
        let error = style
            .params_to_send(GenerateParams::default(), None)
            .unwrap_err();
        assert!(error.contains("at least one target"), "{error}");
        style.settings.targets = vec!["a square".to_owned(), "a star".to_owned()];
        let params = style
            .params_to_send(GenerateParams::default(), None)
            .unwrap();
        assert_eq!(params.image_count(), 3);
        assert!(style.export_files("m").is_err(), "nothing finished yet");
        style.sent(1, 3);
        for index in 0..3 {
            let mut run = RunView::new(
                1,
                Branch::StyleImage(index),
                GenerateParams::default(),
                PromptInfo::default(),
            );
            run.final_image = Some(RgbImage::black(2, 1));
            run.outcome = RunOutcome::Finished { elapsed_secs: 1.0 };
            style.images[index] = Some(run);
        }
        let files = style.export_files("m").unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|file| {
                file.path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["reference.png", "1.png", "2.png", "grid.png"]);
        assert_eq!((files[3].image.width, files[3].image.height), (6, 1));
    }
}
