//! Screenshot automation (`ATTEND_SCREENSHOT`): once the first run (and edit) finished, select a
//! word, probe a point or pick a segment, let the layout settle, capture the window as PNG and quit.
//! It drives the editor like a user, with [`UiCommand`]s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::state::{AppState, CanvasView};

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
    /// Enter style set mode with these target prompts (the prompt is the reference), and take
    /// the screenshot once the set finished with its first target selected
    /// (`ATTEND_SCREENSHOT_STYLE=prompt|prompt|...`).
    pub style_targets: Option<Vec<String>>,
    /// Run this appearance transfer instead of a generation, and take it once the transfer
    /// finished (with the probe at [`Self::probe_point`] on its output).
    pub appearance: Option<AppearanceShot>,
    /// Once the edit finished, drag this word's weight slider for [`DRAG_FRAMES`] frames (one
    /// position per frame, as a hand would), then wait for the last edit (`ATTEND_SCREENSHOT_DRAG`,
    /// with `ATTEND_SCREENSHOT_EDIT`). With `ATTEND_FRAME_TIMES` it measures frames during a drag.
    pub drag_word: Option<String>,
}

/// Frames (slider positions) of a scripted weight drag.
pub const DRAG_FRAMES: u32 = 60;

/// The weight at frame `frame` of a scripted drag: from 1 up to 3, down to -1, back up to 3.
fn drag_weight(frame: u32) -> f32 {
    let phase = frame as f32 / DRAG_FRAMES as f32 * 2.5 * std::f32::consts::PI;
    1.0 + 2.0 * phase.sin()
}

/// An appearance transfer for a screenshot: `ATTEND_SCREENSHOT_STRUCTURE=file`,
/// `ATTEND_SCREENSHOT_STRUCTURE_PROMPT`, `ATTEND_SCREENSHOT_APPEARANCE=file`,
/// `ATTEND_SCREENSHOT_APPEARANCE_PROMPT`, and `ATTEND_SCREENSHOT_APPEARANCE_STEPS` (the
/// transfer's default when unset).
#[derive(Clone, Debug, PartialEq)]
pub struct AppearanceShot {
    /// The structure image file.
    pub structure: PathBuf,
    /// What it shows.
    pub structure_prompt: String,
    /// The appearance image file.
    pub appearance: PathBuf,
    /// What it shows.
    pub appearance_prompt: String,
    /// The transfer's steps; `None` keeps the default.
    pub steps: Option<usize>,
}

impl AppearanceShot {
    /// The transfer the environment asks for, if both images are named.
    fn from_environment() -> Option<Self> {
        let text = |name: &str| std::env::var(name).unwrap_or_default();
        Some(Self {
            structure: PathBuf::from(std::env::var_os("ATTEND_SCREENSHOT_STRUCTURE")?),
            structure_prompt: text("ATTEND_SCREENSHOT_STRUCTURE_PROMPT"),
            appearance: PathBuf::from(std::env::var_os("ATTEND_SCREENSHOT_APPEARANCE")?),
            appearance_prompt: text("ATTEND_SCREENSHOT_APPEARANCE_PROMPT"),
            steps: text("ATTEND_SCREENSHOT_APPEARANCE_STEPS")
                .trim()
                .parse()
                .ok(),
        })
    }
}

impl ScreenshotPlan {
    /// The plan `ATTEND_SCREENSHOT=file.png` asks for (with `ATTEND_SCREENSHOT_WORD`,
    /// `ATTEND_SCREENSHOT_PROBE=y,x`, `ATTEND_SCREENSHOT_SEGMENTS=y,x`, `ATTEND_SCREENSHOT_EDIT`,
    /// `ATTEND_SCREENSHOT_AT_STEP` and an [`AppearanceShot`]), if it is set.
    pub fn from_environment() -> Option<Self> {
        let point = |name: &str| {
            std::env::var(name).ok().and_then(|text| {
                let (y, x) = text.split_once(',')?;
                Some((y.trim().parse().ok()?, x.trim().parse().ok()?))
            })
        };
        std::env::var_os("ATTEND_SCREENSHOT").map(|path| Self {
            path: PathBuf::from(path),
            select_word: std::env::var("ATTEND_SCREENSHOT_WORD").ok(),
            probe_point: point("ATTEND_SCREENSHOT_PROBE"),
            settle_frames: 10,
            edit_prompt: std::env::var("ATTEND_SCREENSHOT_EDIT").ok(),
            segments_point: point("ATTEND_SCREENSHOT_SEGMENTS"),
            at_step: std::env::var("ATTEND_SCREENSHOT_AT_STEP")
                .ok()
                .and_then(|text| text.trim().parse().ok()),
            style_targets: std::env::var("ATTEND_SCREENSHOT_STYLE").ok().map(|text| {
                text.split('|')
                    .map(|prompt| prompt.trim().to_owned())
                    .filter(|prompt| !prompt.is_empty())
                    .collect()
            }),
            appearance: AppearanceShot::from_environment(),
            drag_word: std::env::var("ATTEND_SCREENSHOT_DRAG").ok(),
        })
    }
}

/// What the plan waits for, read from the editor each frame.
pub(crate) struct ScreenshotWatch {
    /// A segmentation of the run on screen has arrived.
    pub(crate) segmented: bool,
    /// The segmentation asked for failed (the picture shows the error instead).
    pub(crate) segmentation_failed: bool,
    /// Some segment is selected.
    pub(crate) segment_selected: bool,
}

/// A [`ScreenshotPlan`] and how far it got.
#[derive(Debug)]
pub(crate) struct Screenshot {
    plan: ScreenshotPlan,
    prepared: bool,
    /// Style set plans: the first target was selected.
    style_selected: bool,
    frames_after_finish: u32,
    /// Positions of the scripted drag sent so far.
    drag_frames: u32,
    requested: bool,
    written: Arc<AtomicBool>,
}

impl Screenshot {
    /// A plan not started yet.
    pub(crate) fn new(plan: ScreenshotPlan) -> Self {
        Self {
            plan,
            prepared: false,
            style_selected: false,
            frames_after_finish: 0,
            drag_frames: 0,
            requested: false,
            written: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The target prompts to enter style set mode with, if the plan asks for a style set.
    pub(crate) fn style_targets(&self) -> Option<&[String]> {
        self.plan.style_targets.as_deref()
    }

    /// The edited prompt to enter edit mode with, if the plan asks for one.
    pub(crate) fn edit_prompt(&self) -> Option<&str> {
        self.plan.edit_prompt.as_deref()
    }

    /// The appearance transfer the plan runs, if any.
    pub(crate) fn appearance(&self) -> Option<&AppearanceShot> {
        self.plan.appearance.as_ref()
    }

    /// One frame of the plan: select, probe, wait, capture, quit.
    pub(crate) fn step(
        &mut self,
        egui_ctx: &egui::Context,
        state: &AppState,
        watch: &ScreenshotWatch,
        commands: &mut UiCommands,
    ) {
        if self.written.load(Ordering::SeqCst) {
            egui_ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            return;
        }
        let finished = match self.plan.at_step {
            _ if self.plan.appearance.is_some() => state.modes.appearance.finished(),
            Some(steps) => state
                .run
                .as_ref()
                .is_some_and(|run| run.steps.len() >= steps),
            None if self.plan.style_targets.is_some() => state.modes.style_set.finished(),
            None => {
                state.run_finished()
                    && (self.plan.edit_prompt.is_none() || state.modes.edit.finished())
            }
        };
        let dragging = self.drag_frames > 0 && self.drag_frames < DRAG_FRAMES;
        if (!finished && !dragging) || self.requested {
            return;
        }
        egui_ctx.request_repaint();
        if let Some(word) = self
            .plan
            .drag_word
            .as_ref()
            .filter(|_| self.drag_frames < DRAG_FRAMES)
        {
            self.drag_frames += 1;
            commands.push(UiCommand::SetWordWeight {
                word: word.clone(),
                weight: drag_weight(self.drag_frames),
            });
            return;
        }
        if self.plan.style_targets.is_some() && !self.style_selected {
            // The first target's maps beside the reference's.
            self.style_selected = true;
            commands.push(UiCommand::StyleSet(
                crate::ui::style_set::StyleSetCommand::Select(1),
            ));
            return;
        }
        if !self.prepared {
            self.prepared = true;
            self.prepare(state, commands);
            return;
        }
        // Wait for the self-attention map or the segmentation before counting frames.
        let probe_pending = self.plan.appearance.is_none()
            && state.canvas_view == CanvasView::Probe
            && state.probe.map.is_none();
        let segments_pending = match self.plan.segments_point {
            Some(_) if !watch.segmented => !watch.segmentation_failed,
            Some(point) => {
                if !watch.segment_selected {
                    commands.push(UiCommand::ClickSegment { point, add: false });
                }
                false
            }
            None => false,
        };
        if probe_pending || segments_pending {
            return;
        }
        self.frames_after_finish += 1;
        if self.frames_after_finish < self.plan.settle_frames {
            return;
        }
        self.capture(egui_ctx);
    }

    /// Selects the word, turns the probe on or shows the segments, as the plan says.
    fn prepare(&self, state: &AppState, commands: &mut UiCommands) {
        if let Some(word) = &self.plan.select_word {
            if let Some(index) = state
                .derived
                .heatmaps
                .iter()
                .position(|heatmap| &heatmap.word == word)
            {
                commands.push(UiCommand::SelectWord(index));
            }
        }
        if let Some(point) = self
            .plan
            .probe_point
            .filter(|_| self.plan.appearance.is_some())
        {
            commands.push(UiCommand::Appearance(
                crate::ui::appearance::AppearanceCommand::Probe(Some(point)),
            ));
        } else if let Some(point) = self.plan.probe_point {
            commands.push(UiCommand::SetCanvasView(CanvasView::Probe));
            commands.push(UiCommand::SetProbePoint(point));
        }
        if self.plan.segments_point.is_some() {
            commands.push(UiCommand::SetCanvasView(CanvasView::Segments));
        }
    }

    /// Asks egui for the window's pixels and writes them (the window closes on a later frame).
    fn capture(&mut self, egui_ctx: &egui::Context) {
        self.requested = true;
        let path = self.plan.path.clone();
        let written = Arc::clone(&self.written);
        let repaint_ctx = egui_ctx.clone();
        egui_ctx.request_screenshot(move |image| {
            let rgb: Vec<u8> = image
                .pixels
                .iter()
                .flat_map(|pixel| [pixel.r(), pixel.g(), pixel.b()])
                .collect();
            let [width, height] = image.size;
            if let Err(error) =
                crate::analysis::export::write_png_rgb(&path, width, height, &rgb, None)
            {
                eprintln!("attend: screenshot: {error:#}");
            }
            written.store(true, Ordering::SeqCst);
            repaint_ctx.request_repaint();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scripted_drag_moves_the_weight_every_frame_inside_the_slider_range() {
        let weights: Vec<f32> = (1..=DRAG_FRAMES).map(drag_weight).collect();
        assert!(weights
            .iter()
            .all(|weight| crate::ui::edit::spec::WEIGHT_RANGE.contains(weight)));
        assert!(weights.windows(2).all(|pair| pair[0] != pair[1]));
        let (low, high) = weights
            .iter()
            .fold((f32::MAX, f32::MIN), |(low, high), &w| {
                (low.min(w), high.max(w))
            });
        assert!(low < 0.0 && high > 2.9, "{low}..{high}");
        assert!((weights[weights.len() - 1] - 3.0).abs() < 1e-3);
    }
}
