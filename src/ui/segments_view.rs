//! The Segments view: the finished run segmented from its stored self-attention (KMeans or DiffSeg,
//! run on the worker), each segment coloured over the image with its label and score, a list of
//! the segments with every word's score, and the selected segments' mask (bilinear upsample,
//! threshold, dilate / feather) previewed at image resolution, exported or handed to the edit mode
//! as a local-blend mask.
//!
//! Canvas: a click selects the segment under the pointer, Shift-click adds it, a click on a selected
//! segment removes it. The overlay is one texture at image resolution, rebuilt only when the
//! segmentation, the selection or the mask settings change; outlines and labels are painter shapes
//! computed once per segmentation.

use std::path::PathBuf;

use egui::{Color32, Pos2, Rect, RichText, Stroke};

use crate::analysis::heatmap::SelfAttentionSpan;
use crate::analysis::segment::{
    segment_colour, DiffSegSettings, KMeansSettings, LabelChoice, LabelSettings,
    LabelledSegmentation, Mask, MaskSettings, SegmentInfo, SegmentMethod, SegmentSettings,
    SegmentsFile,
};
use crate::ui::app::{EditorApp, StatusLevel};
use crate::ui::dialogs::DialogPurpose;
use crate::ui::run_view::RunOutcome;
use crate::worker::{Command, SegmentFileExport, SegmentRequest};

/// What the canvas shows over the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CanvasView {
    /// The selected word's heat map.
    #[default]
    WordHeatmap,
    /// The self-attention probe.
    Probe,
    /// The segments of the finished run.
    Segments,
}

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
    /// The canvas shows segments (unless the probe is on).
    pub(crate) enabled: bool,
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
            enabled: false,
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
    fn toggle(&mut self, segment_id: usize, add: bool) {
        if let Some(position) = self.selected.iter().position(|&id| id == segment_id) {
            self.selected.remove(position);
        } else if add {
            self.selected.push(segment_id);
        } else {
            self.selected = vec![segment_id];
        }
    }
}

impl EditorApp {
    // ---------------------------------------------------------------------------------------------
    // Public accessors (tests, scripts)
    // ---------------------------------------------------------------------------------------------

    /// What the canvas shows over the image.
    pub fn canvas_view(&self) -> CanvasView {
        if self.probe.enabled {
            CanvasView::Probe
        } else if self.segments.enabled {
            CanvasView::Segments
        } else {
            CanvasView::WordHeatmap
        }
    }

    /// Switches what the canvas shows.
    pub fn set_canvas_view(&mut self, view: CanvasView) {
        self.probe.enabled = view == CanvasView::Probe;
        self.segments.enabled = view == CanvasView::Segments;
    }

    /// The segmentation shown in the Segments view, if one has arrived for the run on screen.
    pub fn segmentation(&self) -> Option<&LabelledSegmentation> {
        let run_id = self.run.as_ref()?.run_id;
        self.segments
            .result
            .as_ref()
            .filter(|result| result.run_id == run_id)
            .map(|result| &result.segmentation)
    }

    /// True while a segmentation is asked for and not yet answered.
    pub fn is_segmenting(&self) -> bool {
        self.segments.in_flight.is_some()
    }

    /// The selected segment ids, in the order they were picked.
    pub fn selected_segments(&self) -> &[usize] {
        &self.segments.selected
    }

    /// The selected segments' mask at image resolution (`None` without a selection).
    pub fn selected_segments_mask(&self) -> Option<&Mask> {
        self.segments.mask.as_ref().map(|(_, _, _, mask)| mask)
    }

    /// Picks the segment at `(y, x)` (0..1 image coordinates) as a canvas click does: selects it,
    /// adds it with `add` (Shift), or removes it when it is already selected.
    pub fn click_segment_at(&mut self, point: (f32, f32), add: bool) {
        let Some(segmentation) = self.segmentation() else {
            return;
        };
        let (h, w) = (segmentation.image.h, segmentation.image.w);
        if h == 0 || w == 0 {
            return;
        }
        let pixel_y = ((point.0.clamp(0.0, 1.0) * h as f32) as usize).min(h - 1);
        let pixel_x = ((point.1.clamp(0.0, 1.0) * w as f32) as usize).min(w - 1);
        if let Some(segment_id) = segmentation.segment_at_pixel(pixel_y, pixel_x) {
            self.segments.toggle(segment_id, add);
            self.update_segment_mask();
        }
    }

    /// The last mask handed to the edit mode's local blend by "Use as local-blend mask".
    pub fn local_blend_mask(&self) -> Option<&Mask> {
        self.segments.local_blend_mask.as_ref()
    }

    /// Chooses the segmentation method (the view re-segments).
    pub fn set_segment_method(&mut self, method: SegmentMethod) {
        self.segments.method = method;
    }

    // ---------------------------------------------------------------------------------------------
    // Per frame and events
    // ---------------------------------------------------------------------------------------------

    /// True when the canvas shows segments.
    pub(crate) fn segments_active(&self) -> bool {
        self.canvas_view() == CanvasView::Segments
    }

    /// Drops a segmentation of another run, asks the worker for the one the controls describe when
    /// it is missing, and keeps the mask up to date. Called every frame; sends at most one request
    /// at a time (a newer wish is sent when the answer arrives).
    pub(crate) fn update_segments(&mut self) {
        let run = self.run.as_ref().map(|run| {
            (
                run.run_id,
                matches!(run.outcome, RunOutcome::Finished { .. }),
            )
        });
        let current_run = run.map(|(run_id, _)| run_id);
        if self
            .segments
            .result
            .as_ref()
            .is_some_and(|result| Some(result.run_id) != current_run)
        {
            self.segments.result = None;
            self.segments.selected.clear();
            self.segments.mask = None;
        }
        if self
            .segments
            .in_flight
            .as_ref()
            .is_some_and(|(run_id, _)| Some(*run_id) != current_run)
        {
            // Its answer is dropped with the other events of a superseded run.
            self.segments.in_flight = None;
        }
        self.update_segment_mask();
        let Some((run_id, true)) = run else {
            return;
        };
        if !self.segments_active() || self.segments.in_flight.is_some() {
            return;
        }
        let wanted = (run_id, self.segments.request());
        let have = self
            .segments
            .result
            .as_ref()
            .is_some_and(|result| (result.run_id, &result.request) == (wanted.0, &wanted.1));
        if have || self.segments.failed.as_ref() == Some(&wanted) {
            return;
        }
        let command = Command::Segment {
            run_id,
            request: wanted.1.clone(),
        };
        match self.worker.send(command) {
            Ok(()) => self.segments.in_flight = Some(wanted),
            Err(error) => self.push_status(StatusLevel::Error, format!("Cannot segment: {error}")),
        }
    }

    /// Takes the worker's answer to [`Command::Segment`].
    pub(crate) fn handle_segmented(
        &mut self,
        run_id: u64,
        request: SegmentRequest,
        result: Result<LabelledSegmentation, String>,
        secs: f64,
    ) {
        if self.segments.in_flight.as_ref() == Some(&(run_id, request.clone())) {
            self.segments.in_flight = None;
        }
        match result {
            Ok(segmentation) => {
                let version = self.segments.next_version;
                self.segments.next_version += 1;
                self.segments.result = Some(SegmentsResult {
                    run_id,
                    label_points: label_points(&segmentation),
                    outlines: outlines(&segmentation),
                    request,
                    segmentation,
                    version,
                });
                self.segments.failed = None;
                self.segments.selected.clear();
                self.segments.mask = None;
                self.segments.last_secs = secs;
            }
            Err(message) => {
                self.segments.failed = Some((run_id, request));
                self.push_status(
                    StatusLevel::Error,
                    format!("Segmentation failed: {message}"),
                );
            }
        }
    }

    /// The worker restarted: a request in flight will not be answered.
    pub(crate) fn segments_worker_restarted(&mut self) {
        self.segments.in_flight = None;
    }

    /// Recomputes the selected segments' mask when the segmentation, selection or settings changed.
    fn update_segment_mask(&mut self) {
        let Some(result) = &self.segments.result else {
            self.segments.mask = None;
            return;
        };
        if self.segments.selected.is_empty() {
            self.segments.mask = None;
            return;
        }
        let up_to_date =
            self.segments
                .mask
                .as_ref()
                .is_some_and(|(version, selected, settings, _)| {
                    *version == result.version
                        && *selected == self.segments.selected
                        && *settings == self.segments.mask_settings
                });
        if up_to_date {
            return;
        }
        let mask = result
            .segmentation
            .mask(&self.segments.selected, &self.segments.mask_settings);
        self.segments.mask = Some((
            result.version,
            self.segments.selected.clone(),
            self.segments.mask_settings.clone(),
            mask,
        ));
    }

    // ---------------------------------------------------------------------------------------------
    // Canvas
    // ---------------------------------------------------------------------------------------------

    /// Canvas clicks in the Segments view: select, Shift-click to add, click a selected one to
    /// remove it.
    pub(crate) fn segments_canvas_input(
        &mut self,
        ui: &egui::Ui,
        response: &egui::Response,
        image_rect: Rect,
    ) {
        if !response.clicked() {
            return;
        }
        let Some(pointer) = response.interact_pointer_pos() else {
            return;
        };
        if !image_rect.contains(pointer) {
            return;
        }
        let uv = (pointer - image_rect.min) / image_rect.size();
        let add = ui.input(|input| input.modifiers.shift);
        self.click_segment_at((uv.y, uv.x), add);
    }

    /// Draws the segment overlay, outlines and labels over the image, and the hovered segment's
    /// label as a tooltip.
    pub(crate) fn segments_overlay_ui(
        &mut self,
        ui: &egui::Ui,
        painter: &egui::Painter,
        response: &egui::Response,
        image_rect: Rect,
        visible: Rect,
    ) {
        let Some(texture) = self.segments_overlay_texture(ui.ctx()) else {
            return;
        };
        let uv_min = (visible.min - image_rect.min) / image_rect.size();
        let uv_max = (visible.max - image_rect.min) / image_rect.size();
        painter.image(
            texture,
            visible,
            Rect::from_min_max(uv_min.to_pos2(), uv_max.to_pos2()),
            Color32::WHITE,
        );
        let Some(result) = &self.segments.result else {
            return;
        };
        let (h, w) = (result.segmentation.image.h, result.segmentation.image.w);
        let to_screen = |(x, y): (f32, f32)| {
            Pos2::new(
                image_rect.min.x + x / w as f32 * image_rect.width(),
                image_rect.min.y + y / h as f32 * image_rect.height(),
            )
        };
        let outline = Stroke::new(1.0, Color32::from_rgba_unmultiplied(255, 255, 255, 150));
        for [from, to] in &result.outlines {
            painter.line_segment([to_screen(*from), to_screen(*to)], outline);
        }
        let font = egui::FontId::proportional(13.0);
        for (segment, point) in result
            .segmentation
            .segments
            .iter()
            .zip(&result.label_points)
        {
            let Some((y, x)) = point else {
                continue;
            };
            let centre = Pos2::new(
                image_rect.min.x + x * image_rect.width(),
                image_rect.min.y + y * image_rect.height(),
            );
            if !visible.contains(centre) {
                continue;
            }
            let selected = self.segments.selected.contains(&segment.id);
            let text = segment_caption(segment);
            let galley = painter.layout_no_wrap(text, font.clone(), Color32::WHITE);
            let rect = Rect::from_center_size(centre, galley.size() + egui::vec2(10.0, 4.0));
            let [red, green, blue] = segment_colour(segment.id);
            painter.rect_filled(rect, 4.0, Color32::from_black_alpha(190));
            let border = if selected {
                Stroke::new(2.0, Color32::from_rgb(red, green, blue))
            } else {
                Stroke::new(1.0, Color32::from_rgba_unmultiplied(red, green, blue, 160))
            };
            painter.rect_stroke(rect, 4.0, border, egui::StrokeKind::Outside);
            painter.galley(rect.min + egui::vec2(5.0, 2.0), galley, Color32::WHITE);
        }
        if self.taking_screenshot() {
            return;
        }
        if let Some(pointer) = response.hover_pos().filter(|pos| image_rect.contains(*pos)) {
            let uv = (pointer - image_rect.min) / image_rect.size();
            let pixel_y = ((uv.y * h as f32) as usize).min(h.saturating_sub(1));
            let pixel_x = ((uv.x * w as f32) as usize).min(w.saturating_sub(1));
            let hovered = result
                .segmentation
                .segment_at_pixel(pixel_y, pixel_x)
                .and_then(|id| result.segmentation.segments.get(id));
            if let Some(segment) = hovered {
                let text = format!(
                    "segment {}: {}\n{}\nclick: select, Shift-click: add",
                    segment.id,
                    segment_caption(segment),
                    scores_text(segment)
                );
                response.clone().on_hover_text_at_pointer(text);
            }
        }
    }

    /// The overlay texture (segment colours, the selection's mask), rebuilt only on change.
    fn segments_overlay_texture(&mut self, ctx: &egui::Context) -> Option<egui::TextureId> {
        let result = self.segments.result.as_ref()?;
        let key = OverlayKey {
            version: result.version,
            selected: self.segments.selected.clone(),
            mask: self.segments.mask_settings.clone(),
            smooth: self.settings.view.smooth_image,
        };
        if let Some((built, texture)) = &self.segments.overlay {
            if *built == key {
                return Some(texture.id());
            }
        }
        let mask = self
            .segments
            .mask
            .as_ref()
            .filter(|(version, selected, _, _)| {
                *version == result.version && *selected == self.segments.selected
            })
            .map(|(_, _, _, mask)| mask);
        let image = overlay_image(&result.segmentation, mask);
        let options = if key.smooth {
            egui::TextureOptions::LINEAR
        } else {
            egui::TextureOptions::NEAREST
        };
        match &mut self.segments.overlay {
            Some((built, texture)) => {
                texture.set(image, options);
                *built = key;
            }
            None => {
                let texture = ctx.load_texture("attend.segments", image, options);
                self.segments.overlay = Some((key, texture));
            }
        }
        self.segments
            .overlay
            .as_ref()
            .map(|(_, texture)| texture.id())
    }

    // ---------------------------------------------------------------------------------------------
    // Panel
    // ---------------------------------------------------------------------------------------------

    /// The switch between the word heat map, the probe and the segments.
    pub(crate) fn canvas_view_ui(&mut self, ui: &mut egui::Ui) {
        let current = self.canvas_view();
        ui.horizontal(|ui| {
            for (view, label) in [
                (CanvasView::WordHeatmap, "Heat map"),
                (CanvasView::Probe, "Probe"),
                (CanvasView::Segments, "Segments"),
            ] {
                if ui.selectable_label(current == view, label).clicked() {
                    self.set_canvas_view(view);
                }
            }
        });
    }

    /// Controls, the segment list, the mask and its actions.
    pub(crate) fn segments_panel_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Segmentation");
        let finished = self
            .run
            .as_ref()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }));
        let grids = self
            .run
            .as_ref()
            .map(|run| run.self_attention_grids.clone())
            .unwrap_or_default();
        let state = &mut self.segments;
        ui.horizontal(|ui| {
            ui.label("Method");
            ui.radio_value(&mut state.method, SegmentMethod::KMeans, "KMeans");
            ui.radio_value(&mut state.method, SegmentMethod::DiffSeg, "DiffSeg");
        });
        egui::Grid::new("attend.segments.controls")
            .num_columns(2)
            .show(ui, |ui| {
                match state.method {
                    SegmentMethod::KMeans => {
                        let label = ui.label("Clusters (k)");
                        ui.add(egui::Slider::new(&mut state.k, 2..=10))
                            .labelled_by(label.id)
                            .on_hover_text(
                                "The most segments: near-identical clusters merge into one",
                            );
                    }
                    SegmentMethod::DiffSeg => {
                        let label = ui.label("DiffSeg threshold");
                        ui.add(
                            egui::Slider::new(&mut state.diffseg_threshold, 0.02..=1.0)
                                .fixed_decimals(2),
                        )
                        .labelled_by(label.id)
                        .on_hover_text(
                            "Maps merge below this fraction of the anchors' 95th-percentile \
                             divergence: higher, fewer segments",
                        );
                    }
                }
                ui.end_row();
                let label = ui.label("Label threshold");
                ui.add(egui::Slider::new(&mut state.label_threshold, 0.0..=1.0).fixed_decimals(2))
                    .labelled_by(label.id)
                    .on_hover_text("A segment takes its best word only above this score");
                ui.end_row();
                ui.label("Label by");
                ui.horizontal(|ui| {
                    ui.radio_value(
                        &mut state.label_choice,
                        LabelChoice::MostAttention,
                        "Most attention",
                    )
                    .on_hover_text(
                        "Of the words above the threshold, the one with the most raw \
                         cross-attention over the segment",
                    );
                    ui.radio_value(
                        &mut state.label_choice,
                        LabelChoice::HighestScore,
                        "Highest score",
                    )
                    .on_hover_text(
                        "The word with the highest score (mean of its min-max normalised map; \
                         local-prompt-mixing's rule)",
                    );
                });
                ui.end_row();
                let label = ui.label("Resolution");
                let auto_text = match state.method {
                    SegmentMethod::KMeans => "auto (largest)",
                    SegmentMethod::DiffSeg => "auto (all)",
                };
                let grid_text =
                    |grid: Option<(usize, usize)>| grid.map(|(h, w)| format!("{h}x{w}"));
                egui::ComboBox::from_id_salt("attend.segments.resolution")
                    .selected_text(grid_text(state.grid).unwrap_or_else(|| auto_text.to_owned()))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut state.grid, None, auto_text);
                        for &grid in &grids {
                            let text = grid_text(Some(grid)).unwrap_or_default();
                            ui.selectable_value(&mut state.grid, Some(grid), text);
                        }
                    })
                    .response
                    .labelled_by(label.id);
                ui.end_row();
                ui.label("Steps");
                ui.horizontal(|ui| {
                    ui.radio_value(&mut state.span, SelfAttentionSpan::MeanOverSteps, "Mean");
                    ui.radio_value(&mut state.span, SelfAttentionSpan::LatestStep, "Last");
                });
                ui.end_row();
            });
        if state.grid.is_some_and(|grid| !grids.contains(&grid)) && !grids.is_empty() {
            state.grid = None;
        }

        if !finished {
            ui.weak("Available when a run has finished.");
            return;
        }
        let current_run = self.run.as_ref().map(|run| run.run_id);
        let shown = self
            .segments
            .result
            .as_ref()
            .filter(|result| Some(result.run_id) == current_run);
        ui.horizontal(|ui| {
            if self.segments.in_flight.is_some() {
                ui.spinner();
                ui.weak("segmenting...");
            } else if let Some(result) = shown {
                ui.weak(format!(
                    "{} segments ({}, {}x{} grid) in {:.0} ms",
                    result.segmentation.segments.len(),
                    result.segmentation.method,
                    result.segmentation.grid.h,
                    result.segmentation.grid.w,
                    self.segments.last_secs * 1e3
                ));
            }
        });
        let Some(result) = shown else {
            return;
        };
        ui.separator();
        ui.label(RichText::new("Segments").strong());
        ui.weak("Click to select, Shift-click to add.")
            .on_hover_text("Here or on the canvas; clicking a selected segment removes it");
        let mut clicked: Option<(usize, bool)> = None;
        for segment in &result.segmentation.segments {
            let selected = self.segments.selected.contains(&segment.id);
            ui.horizontal(|ui| {
                let [red, green, blue] = segment_colour(segment.id);
                let (swatch, _) =
                    ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                ui.painter()
                    .rect_filled(swatch, 2.0, Color32::from_rgb(red, green, blue));
                let text = format!("{}: {}", segment.id, segment_caption(segment));
                let response = ui.selectable_label(selected, text);
                if response.clicked() {
                    clicked = Some((segment.id, ui.input(|input| input.modifiers.shift)));
                }
                ui.weak(format!("{} px", segment.pixel_count));
            });
            ui.indent(("attend.segment.scores", segment.id), |ui| {
                ui.add(
                    egui::Label::new(RichText::new(scores_text(segment)).size(11.5).weak()).wrap(),
                );
            });
        }
        if let Some((segment_id, add)) = clicked {
            self.segments.toggle(segment_id, add);
            self.update_segment_mask();
        }

        ui.separator();
        ui.label(RichText::new("Mask").strong());
        let settings = &mut self.segments.mask_settings;
        egui::Grid::new("attend.segments.mask")
            .num_columns(2)
            .show(ui, |ui| {
                let label = ui.label("Mask threshold");
                ui.add(egui::Slider::new(&mut settings.threshold, 0.05..=0.95).fixed_decimals(2))
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Dilate (px)");
                ui.add(egui::DragValue::new(&mut settings.dilate_px).range(-64..=64))
                    .labelled_by(label.id)
                    .on_hover_text("Grow the mask by this many pixels (negative: shrink)");
                ui.end_row();
                let label = ui.label("Feather (px)");
                ui.add(
                    egui::DragValue::new(&mut settings.feather_px)
                        .range(0.0..=64.0)
                        .speed(0.25),
                )
                .labelled_by(label.id)
                .on_hover_text("Soft edge this many pixels wide");
                ui.end_row();
            });
        self.update_segment_mask();
        let mask = self.selected_segments_mask();
        let has_mask = mask.is_some();
        match mask {
            Some(mask) => ui.weak(format!(
                "{} of {} px selected",
                mask.covered_pixels(),
                mask.h * mask.w
            )),
            None => ui.weak("No segment selected."),
        };
        ui.horizontal_wrapped(|ui| {
            if ui
                .add_enabled(has_mask, egui::Button::new("Use as local-blend mask"))
                .on_hover_text("Hand the mask to the edit mode (local blend)")
                .clicked()
            {
                self.use_selected_mask_for_local_blend();
            }
            if ui
                .add_enabled(has_mask, egui::Button::new("Clear selection"))
                .clicked()
            {
                self.segments.selected.clear();
                self.update_segment_mask();
            }
        });
        let idle = !self.dialogs.is_open();
        ui.horizontal_wrapped(|ui| {
            for (label, purpose, enabled) in [
                ("Export mask...", DialogPurpose::ExportSegmentMask, has_mask),
                (
                    "Export label map...",
                    DialogPurpose::ExportSegmentLabels,
                    true,
                ),
                (
                    "Export segments JSON...",
                    DialogPurpose::ExportSegmentsJson,
                    true,
                ),
            ] {
                if ui
                    .add_enabled(enabled && idle, egui::Button::new(label))
                    .clicked()
                {
                    self.open_dialog(purpose);
                }
            }
        });
    }

    /// Hands the selected mask to the edit mode as its local-blend region (and keeps a copy).
    fn use_selected_mask_for_local_blend(&mut self) {
        let Some(mask) = self.selected_segments_mask().cloned() else {
            self.push_status(StatusLevel::Warning, "Select a segment first");
            return;
        };
        self.segments.local_blend_mask = Some(mask.clone());
        self.use_mask_as_local_blend(mask);
    }

    // ---------------------------------------------------------------------------------------------
    // Exports
    // ---------------------------------------------------------------------------------------------

    /// Default file names of the segmentation exports.
    pub(crate) fn segments_file_name(&self, purpose: &DialogPurpose) -> Option<String> {
        let seed = self
            .run
            .as_ref()
            .map_or(self.settings.params.seed, |run| run.params.seed);
        let names: Vec<String> = self
            .segmentation()
            .map(|segmentation| {
                self.segments
                    .selected
                    .iter()
                    .filter_map(|&id| segmentation.segments.get(id))
                    .map(|segment| crate::ui::app::sanitize_file_stem(&segment.label))
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

    /// Writes a segmentation export chosen in a dialog (the worker writes it atomically).
    pub(crate) fn export_segments_file(&mut self, purpose: &DialogPurpose, path: PathBuf) {
        let Some(segmentation) = self.segmentation() else {
            self.push_status(StatusLevel::Warning, "There is no segmentation to export");
            return;
        };
        let file = match purpose {
            DialogPurpose::ExportSegmentMask => {
                let Some(mask) = self.selected_segments_mask() else {
                    self.push_status(StatusLevel::Warning, "Select a segment first");
                    return;
                };
                SegmentFileExport::Mask {
                    path,
                    mask: mask.clone(),
                }
            }
            DialogPurpose::ExportSegmentLabels => SegmentFileExport::LabelMap {
                path,
                labels: segmentation.image.clone(),
            },
            DialogPurpose::ExportSegmentsJson => SegmentFileExport::Json {
                path,
                file: SegmentsFile {
                    prompt: self.run.as_ref().map(|run| run.params.prompt.clone()),
                    method: segmentation.method,
                    width: segmentation.image.w,
                    height: segmentation.image.h,
                    segments: segmentation.segments.clone(),
                },
            },
            _ => return,
        };
        if let Err(error) = self
            .worker
            .send(Command::ExportSegmentFiles { files: vec![file] })
        {
            self.push_status(StatusLevel::Error, format!("Cannot export: {error}"));
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Screenshot (`ATTEND_SCREENSHOT_SEGMENTS`)
    // ---------------------------------------------------------------------------------------------

    /// Switches to the Segments view for a screenshot.
    pub(crate) fn screenshot_show_segments(&mut self) {
        self.set_canvas_view(CanvasView::Segments);
    }

    /// While the screenshot waits for the segmentation: true. Once it is there, selects the segment
    /// at `point` (once) and returns false.
    pub(crate) fn screenshot_segments_pending(&mut self, point: (f32, f32)) -> bool {
        if self.segmentation().is_none() {
            // A failed segmentation is not waited for (the picture shows the error instead).
            return self.segments.failed.is_none();
        }
        if self.segments.selected.is_empty() {
            self.click_segment_at(point, false);
        }
        false
    }
}

/// `circle 0.65`, or the background label alone.
fn segment_caption(segment: &SegmentInfo) -> String {
    match segment.word_index {
        Some(_) => format!("{} {:.2}", segment.label, segment.label_score()),
        None => segment.label.clone(),
    }
}

/// Every word's score, best first: `circle 0.65, square 0.12`.
fn scores_text(segment: &SegmentInfo) -> String {
    let mut scores: Vec<_> = segment.scores.iter().collect();
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    scores
        .iter()
        .map(|score| format!("{} {:.2}", score.word, score.score))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opacity of the segment colours without a selection.
const FILL_ALPHA: f32 = 0.42;
/// With a selection: opacity of the darkening outside the mask, and of the colour inside it.
const DIM_ALPHA: f32 = 0.6;
const SELECTED_ALPHA: f32 = 0.3;

/// The overlay at image resolution: every pixel in its segment's colour; with a `mask`, the pixels
/// outside it darkened and those inside tinted by their segment's colour (soft at feathered edges).
fn overlay_image(segmentation: &LabelledSegmentation, mask: Option<&Mask>) -> egui::ColorImage {
    let labels = &segmentation.image;
    let colours: Vec<[u8; 3]> = (0..labels.segment_count).map(segment_colour).collect();
    let mut rgba = Vec::with_capacity(labels.labels.len() * 4);
    for (index, &label) in labels.labels.iter().enumerate() {
        let [red, green, blue] = colours.get(label).copied().unwrap_or([0, 0, 0]);
        let pixel = match mask {
            None => [red, green, blue, (FILL_ALPHA * 255.0) as u8],
            Some(mask) => {
                let inside = mask.data.get(index).copied().unwrap_or(0.0).clamp(0.0, 1.0);
                let mix = |channel: u8| (f32::from(channel) * inside).round() as u8;
                let alpha = DIM_ALPHA + (SELECTED_ALPHA - DIM_ALPHA) * inside;
                [
                    mix(red),
                    mix(green),
                    mix(blue),
                    (alpha * 255.0).round() as u8,
                ]
            }
        };
        rgba.extend_from_slice(&pixel);
    }
    egui::ColorImage::from_rgba_unmultiplied([labels.w, labels.h], &rgba)
}

/// Where each segment's label goes: the cell of the segmentation grid farthest from the segment's
/// edge (other segments and the image border), `(y, x)` in 0..1.
fn label_points(segmentation: &LabelledSegmentation) -> Vec<Option<(f32, f32)>> {
    let grid = &segmentation.grid;
    let (h, w) = (grid.h, grid.w);
    let at = |y: usize, x: usize| grid.labels.get(y * w + x).copied();
    // Cells with a neighbour in another segment.
    let mut edge_cells = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let label = at(y, x);
            let differs = (y > 0 && at(y - 1, x) != label)
                || (y + 1 < h && at(y + 1, x) != label)
                || (x > 0 && at(y, x - 1) != label)
                || (x + 1 < w && at(y, x + 1) != label);
            if differs {
                edge_cells.push((y as f32, x as f32));
            }
        }
    }
    let mut best: Vec<Option<(f32, usize)>> = vec![None; segmentation.segments.len()];
    for y in 0..h {
        for x in 0..w {
            let Some(label) = at(y, x) else {
                continue;
            };
            let (fy, fx) = (y as f32, x as f32);
            // Distance to the border counts like distance to another segment.
            let border = (fy + 1.0)
                .min(fx + 1.0)
                .min(h as f32 - fy)
                .min(w as f32 - fx)
                .powi(2);
            let to_edge = edge_cells
                .iter()
                .filter(|&&(ey, ex)| at(ey as usize, ex as usize) != Some(label))
                .map(|&(ey, ex)| (ey - fy).powi(2) + (ex - fx).powi(2))
                .fold(border, f32::min);
            if let Some(slot) = best.get_mut(label) {
                if slot.is_none_or(|(distance, _)| to_edge > distance) {
                    *slot = Some((to_edge, y * w + x));
                }
            }
        }
    }
    best.into_iter()
        .map(|found| {
            found.map(|(_, cell)| {
                (
                    ((cell / w) as f32 + 0.5) / h as f32,
                    ((cell % w) as f32 + 0.5) / w as f32,
                )
            })
        })
        .collect()
}

/// The edges between pixels of different segments at image resolution, merged into runs.
fn outlines(segmentation: &LabelledSegmentation) -> Vec<[(f32, f32); 2]> {
    let labels = &segmentation.image;
    let (h, w) = (labels.h, labels.w);
    let at = |y: usize, x: usize| labels.labels.get(y * w + x).copied();
    let mut lines = Vec::new();
    // Vertical edges (between x - 1 and x), merged down each column.
    for x in 1..w {
        let mut start: Option<usize> = None;
        for y in 0..=h {
            let edge = y < h && at(y, x - 1) != at(y, x);
            match (edge, start) {
                (true, None) => start = Some(y),
                (false, Some(first)) => {
                    lines.push([(x as f32, first as f32), (x as f32, y as f32)]);
                    start = None;
                }
                _ => {}
            }
        }
    }
    // Horizontal edges (between y - 1 and y), merged along each row.
    for y in 1..h {
        let mut start: Option<usize> = None;
        for x in 0..=w {
            let edge = x < w && at(y - 1, x) != at(y, x);
            match (edge, start) {
                (true, None) => start = Some(x),
                (false, Some(first)) => {
                    lines.push([(first as f32, y as f32), (x as f32, y as f32)]);
                    start = None;
                }
                _ => {}
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::segment::{Segmentation, WordScore};

    fn labelled(h: usize, w: usize, labels: Vec<usize>, count: usize) -> LabelledSegmentation {
        let grid = Segmentation {
            h,
            w,
            labels,
            segment_count: count,
        };
        LabelledSegmentation {
            method: SegmentMethod::KMeans,
            image: grid.clone(),
            grid,
            segments: (0..count)
                .map(|id| SegmentInfo {
                    id,
                    label: format!("s{id}"),
                    word_index: None,
                    scores: vec![WordScore {
                        word: "w".to_owned(),
                        score: 0.1,
                        attention: 0.1,
                    }],
                    pixel_count: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn label_points_lie_inside_their_segments() {
        // A 6x6 grid: a 2x2 block (segment 1) inside a background (segment 0).
        let mut labels = vec![0usize; 36];
        for (y, x) in [(2, 3), (2, 4), (3, 3), (3, 4)] {
            labels[y * 6 + x] = 1;
        }
        let segmentation = labelled(6, 6, labels, 2);
        let points = label_points(&segmentation);
        for (id, point) in points.iter().enumerate() {
            let (y, x) = point.unwrap();
            let cell = segmentation
                .grid
                .segment_at((y * 6.0) as usize, (x * 6.0) as usize);
            assert_eq!(cell, Some(id));
        }
    }

    #[test]
    fn outlines_follow_the_edges_between_segments() {
        // Left half 0, right half 1 on a 4x4 grid: one vertical line at x = 2, full height.
        let labels = (0..16).map(|cell| usize::from(cell % 4 >= 2)).collect();
        let lines = outlines(&labelled(4, 4, labels, 2));
        assert_eq!(lines, vec![[(2.0, 0.0), (2.0, 4.0)]]);
    }

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
