//! The Segments view: the finished run segmented from its stored self-attention (KMeans or DiffSeg,
//! run on the worker), each segment coloured over the image with its label and score, a list of
//! the segments with every word's score, and the selected segments' mask (bilinear upsample,
//! threshold, dilate / feather) previewed at image resolution, exported or handed to the edit mode
//! as a local-blend mask.
//!
//! Canvas: a click selects the segment under the pointer, Shift-click adds it, a click on a selected
//! segment removes it. The overlay is one texture at image resolution, rebuilt only when the
//! segmentation, the selection or the mask settings change; outlines and labels are painter shapes
//! computed once per segmentation ([`crate::analysis::geometry`]).
//!
//! | module | what it is |
//! |---|---|
//! | this one | [`SegmentsState`]: settings, the worker's answer, the selection and its mask |
//! | `panel` | the controls, the segment list, the mask and its exports (right panel) |
//! | `overlay` | the segments over the canvas image, and canvas clicks |

pub(crate) mod overlay;
pub(crate) mod panel;

use std::path::PathBuf;

use crate::analysis::geometry::{cell_at, label_points, segment_outlines};
use crate::analysis::heatmap::SelfAttentionSpan;
use crate::analysis::segment::{
    DiffSegSettings, KMeansSettings, LabelChoice, LabelSettings, LabelledSegmentation, Mask,
    MaskSettings, SegmentInfo, SegmentMethod, SegmentSettings, SegmentsFile,
};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::dialogs::DialogPurpose;
use crate::ui::state::CanvasView;
use crate::worker::{SegmentFileExport, SegmentRequest};

/// A segmentation received from the worker, with what the canvas needs to draw it.
struct SegmentsResult {
    run_id: u64,
    request: SegmentRequest,
    segmentation: LabelledSegmentation,
    /// Per segment id: where its label goes, `(y, x)` in 0..1 image coordinates (the cell farthest
    /// from the segment's edge); `None` for a segment with no cell.
    label_points: Vec<Option<(f32, f32)>>,
    /// Outlines between segments at image resolution: line segments `[(x0, y0), (x1, y1)]` in
    /// pixel-corner coordinates.
    outlines: Vec<[(f32, f32); 2]>,
    /// Increases with every new segmentation.
    version: u64,
}

/// What the overlay texture was built from.
#[derive(Clone, Debug, PartialEq)]
struct OverlayKey {
    version: u64,
    selected: Vec<usize>,
    mask: MaskSettings,
    smooth: bool,
}

/// The Segments view's state.
pub(crate) struct SegmentsState {
    method: SegmentMethod,
    k: usize,
    diffseg_threshold: f32,
    label_threshold: f32,
    label_choice: LabelChoice,
    /// Self-attention grid to cluster; `None`: the method's own choice.
    grid: Option<(usize, usize)>,
    span: SelfAttentionSpan,
    mask_settings: MaskSettings,
    result: Option<SegmentsResult>,
    /// The request sent and not yet answered `(run, request)`.
    in_flight: Option<(u64, SegmentRequest)>,
    /// The last request that failed, so it is not sent again.
    failed: Option<(u64, SegmentRequest)>,
    /// Selected segment ids, in the order they were picked.
    selected: Vec<usize>,
    /// The selected segments' mask at image resolution and what it was made from.
    mask: Option<(u64, Vec<usize>, MaskSettings, Mask)>,
    overlay: Option<(OverlayKey, egui::TextureHandle)>,
    /// A mask handed to the edit mode for local blending.
    local_blend_mask: Option<Mask>,
    /// Seconds the worker took for the segmentation shown.
    last_secs: f64,
    next_version: u64,
}

impl Default for SegmentsState {
    fn default() -> Self {
        Self {
            method: SegmentMethod::KMeans,
            k: KMeansSettings::default().k,
            diffseg_threshold: DiffSegSettings::default()
                .relative_threshold
                .unwrap_or(0.25),
            label_threshold: LabelSettings::default().threshold,
            label_choice: LabelChoice::default(),
            grid: None,
            span: SelfAttentionSpan::MeanOverSteps,
            mask_settings: MaskSettings::default(),
            result: None,
            in_flight: None,
            failed: None,
            selected: Vec::new(),
            mask: None,
            overlay: None,
            local_blend_mask: None,
            last_secs: 0.0,
            next_version: 1,
        }
    }
}

impl SegmentsState {
    /// The request the controls describe. Only the chosen method's settings are taken from the
    /// controls (the other's stay default), so changing an unused control does not re-segment.
    fn request(&self) -> SegmentRequest {
        let mut settings = SegmentSettings {
            method: self.method,
            labels: LabelSettings {
                threshold: self.label_threshold,
                choice: self.label_choice,
                ..LabelSettings::default()
            },
            ..SegmentSettings::default()
        };
        match self.method {
            SegmentMethod::KMeans => settings.kmeans.k = self.k.max(1),
            SegmentMethod::DiffSeg => {
                settings.diffseg.relative_threshold = Some(self.diffseg_threshold)
            }
        }
        SegmentRequest {
            settings,
            grid: self.grid,
            span: self.span,
        }
    }

    /// Selects per the canvas rules: a selected segment is removed; another one replaces the
    /// selection, or is added to it with `add`.
    pub(crate) fn toggle(&mut self, segment_id: usize, add: bool) {
        if let Some(position) = self.selected.iter().position(|&id| id == segment_id) {
            self.selected.remove(position);
        } else if add {
            self.selected.push(segment_id);
        } else {
            self.selected = vec![segment_id];
        }
    }
}

impl SegmentsState {
    /// The segmentation of run `run_id`, if it has arrived.
    pub(crate) fn segmentation_of(&self, run_id: Option<u64>) -> Option<&LabelledSegmentation> {
        self.result
            .as_ref()
            .filter(|result| Some(result.run_id) == run_id)
            .map(|result| &result.segmentation)
    }

    /// True while a segmentation is asked for and not yet answered.
    pub(crate) fn is_segmenting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// True when the last segmentation asked for failed (and will not be asked for again).
    pub(crate) fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The selected segment ids, in the order they were picked.
    pub(crate) fn selected(&self) -> &[usize] {
        &self.selected
    }

    /// The selected segments' mask at image resolution (`None` without a selection).
    pub(crate) fn mask(&self) -> Option<&Mask> {
        self.mask.as_ref().map(|(_, _, _, mask)| mask)
    }

    /// The last mask handed to the edit mode's local blend.
    pub(crate) fn local_blend_mask(&self) -> Option<&Mask> {
        self.local_blend_mask.as_ref()
    }

    /// Chooses the segmentation method (the view re-segments).
    pub(crate) fn set_method(&mut self, method: SegmentMethod) {
        self.method = method;
    }

    /// Picks the segment at `point` (`(y, x)` in 0..1 image coordinates) of run `run_id`'s
    /// segmentation as a canvas click does: selects it, adds it with `add` (Shift), or removes it
    /// when it is already selected.
    pub(crate) fn click_at(&mut self, run_id: Option<u64>, point: (f32, f32), add: bool) {
        let Some(segmentation) = self.segmentation_of(run_id) else {
            return;
        };
        let image = &segmentation.image;
        let Some((pixel_y, pixel_x)) = cell_at(point, image.h, image.w) else {
            return;
        };
        if let Some(segment_id) = segmentation.segment_at_pixel(pixel_y, pixel_x) {
            self.toggle(segment_id, add);
            self.update_mask();
        }
    }

    /// Clears the selection.
    pub(crate) fn clear_selection(&mut self) {
        self.selected.clear();
        self.update_mask();
    }

    /// Drops a segmentation of another run, asks for the one the controls describe when it is
    /// missing, and keeps the mask up to date. Called every frame; asks for at most one
    /// segmentation at a time (a newer wish is sent when the answer arrives).
    pub(crate) fn update(&mut self, ctx: &ViewContext<'_>, commands: &mut UiCommands) {
        let state = ctx.state;
        let current_run = state.run.as_ref().map(|run| run.run_id);
        if self
            .result
            .as_ref()
            .is_some_and(|result| Some(result.run_id) != current_run)
        {
            self.result = None;
            self.selected.clear();
            self.mask = None;
        }
        if self
            .in_flight
            .as_ref()
            .is_some_and(|(run_id, _)| Some(*run_id) != current_run)
        {
            // Its answer is dropped with the other events of a superseded run.
            self.in_flight = None;
        }
        self.update_mask();
        let Some(run_id) = current_run.filter(|_| state.run_finished()) else {
            return;
        };
        if state.canvas_view != CanvasView::Segments || self.in_flight.is_some() {
            return;
        }
        let wanted = (run_id, self.request());
        let have = self
            .result
            .as_ref()
            .is_some_and(|result| (result.run_id, &result.request) == (wanted.0, &wanted.1));
        if have || self.failed.as_ref() == Some(&wanted) {
            return;
        }
        commands.push(UiCommand::Segment {
            run_id,
            request: wanted.1,
        });
    }

    /// The worker took the request (its answer is awaited).
    pub(crate) fn request_sent(&mut self, run_id: u64, request: SegmentRequest) {
        self.in_flight = Some((run_id, request));
    }

    /// Takes the worker's answer to a segmentation request; gives back the error message of a
    /// failed one.
    pub(crate) fn segmented(
        &mut self,
        run_id: u64,
        request: SegmentRequest,
        result: Result<LabelledSegmentation, String>,
        secs: f64,
    ) -> Result<(), String> {
        if self.in_flight.as_ref() == Some(&(run_id, request.clone())) {
            self.in_flight = None;
        }
        match result {
            Ok(segmentation) => {
                let version = self.next_version;
                self.next_version += 1;
                self.result = Some(SegmentsResult {
                    run_id,
                    label_points: label_points(&segmentation.grid, segmentation.segments.len()),
                    outlines: segment_outlines(&segmentation.image),
                    request,
                    segmentation,
                    version,
                });
                self.failed = None;
                self.selected.clear();
                self.mask = None;
                self.last_secs = secs;
                Ok(())
            }
            Err(message) => {
                self.failed = Some((run_id, request));
                Err(message)
            }
        }
    }

    /// Another image of the same run is on screen (a style set's): its segmentation is dropped.
    pub(crate) fn forget_run(&mut self) {
        self.result = None;
        self.selected.clear();
        self.mask = None;
        self.in_flight = None;
    }

    /// The worker restarted: a request in flight will not be answered.
    pub(crate) fn worker_restarted(&mut self) {
        self.in_flight = None;
    }

    /// Recomputes the selected segments' mask when the segmentation, selection or settings changed.
    fn update_mask(&mut self) {
        let Some(result) = &self.result else {
            self.mask = None;
            return;
        };
        if self.selected.is_empty() {
            self.mask = None;
            return;
        }
        let up_to_date = self
            .mask
            .as_ref()
            .is_some_and(|(version, selected, settings, _)| {
                *version == result.version
                    && *selected == self.selected
                    && *settings == self.mask_settings
            });
        if up_to_date {
            return;
        }
        let mask = result
            .segmentation
            .mask(&self.selected, &self.mask_settings);
        self.mask = Some((
            result.version,
            self.selected.clone(),
            self.mask_settings.clone(),
            mask,
        ));
    }

    /// Asks the edit mode to take the selected mask as its local-blend region (and keeps a copy).
    fn hand_mask_to_edit(&mut self, commands: &mut UiCommands) {
        let Some(mask) = self.mask().cloned() else {
            return;
        };
        self.local_blend_mask = Some(mask.clone());
        commands.push(UiCommand::UseMaskAsLocalBlend(Box::new(mask)));
    }

    // ---------------------------------------------------------------------------------------------
    // Exports
    // ---------------------------------------------------------------------------------------------

    /// Default file names of the segmentation exports (`None` for other dialogs).
    pub(crate) fn file_name(
        &self,
        purpose: &DialogPurpose,
        run_id: Option<u64>,
        seed: u64,
    ) -> Option<String> {
        let names: Vec<String> = self
            .segmentation_of(run_id)
            .map(|segmentation| {
                self.selected
                    .iter()
                    .filter_map(|&id| segmentation.segments.get(id))
                    .map(|segment| crate::ui::exports::sanitize_file_stem(&segment.label))
                    .collect()
            })
            .unwrap_or_default();
        let mask_name = if names.is_empty() {
            "mask".to_owned()
        } else {
            format!("mask-{}", names.join("+"))
        };
        match purpose {
            DialogPurpose::ExportSegmentMask => Some(format!("attend-{seed}-{mask_name}.png")),
            DialogPurpose::ExportSegmentLabels => Some(format!("attend-{seed}-labels.png")),
            DialogPurpose::ExportSegmentsJson => Some(format!("attend-{seed}-segments.json")),
            _ => None,
        }
    }

    /// The file a segmentation export chosen in a dialog writes, or why there is none.
    pub(crate) fn export_file(
        &self,
        purpose: &DialogPurpose,
        path: PathBuf,
        run_id: Option<u64>,
        prompt: Option<String>,
    ) -> Result<SegmentFileExport, &'static str> {
        let Some(segmentation) = self.segmentation_of(run_id) else {
            return Err("There is no segmentation to export");
        };
        match purpose {
            DialogPurpose::ExportSegmentMask => {
                let Some(mask) = self.mask() else {
                    return Err("Select a segment first");
                };
                Ok(SegmentFileExport::Mask {
                    path,
                    mask: mask.clone(),
                })
            }
            DialogPurpose::ExportSegmentLabels => Ok(SegmentFileExport::LabelMap {
                path,
                labels: segmentation.image.clone(),
            }),
            DialogPurpose::ExportSegmentsJson => Ok(SegmentFileExport::Json {
                path,
                file: SegmentsFile {
                    prompt,
                    method: segmentation.method,
                    width: segmentation.image.w,
                    height: segmentation.image.h,
                    segments: segmentation.segments.clone(),
                },
            }),
            _ => Err("Not a segmentation export"),
        }
    }
}

/// `circle 0.65`, or the background label alone.
pub(crate) fn segment_caption(segment: &SegmentInfo) -> String {
    match segment.word_index {
        Some(_) => format!("{} {:.2}", segment.label, segment.label_score()),
        None => segment.label.clone(),
    }
}

/// Every word's score, best first: `circle 0.65, square 0.12`.
pub(crate) fn scores_text(segment: &SegmentInfo) -> String {
    let mut scores: Vec<_> = segment.scores.iter().collect();
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    scores
        .iter()
        .map(|score| format!("{} {:.2}", score.word, score.score))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toggling_selects_adds_and_removes() {
        let mut state = SegmentsState::default();
        state.toggle(2, false);
        assert_eq!(state.selected, [2]);
        state.toggle(3, true);
        assert_eq!(state.selected, [2, 3]);
        state.toggle(2, false);
        assert_eq!(state.selected, [3]);
        state.toggle(1, false);
        assert_eq!(state.selected, [1]);
    }
}
