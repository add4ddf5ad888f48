//! The Segments view's panel: method and settings, the segment list with every word's score, the
//! selection's mask, its hand-off to the edit mode and the exports.

use egui::{Color32, RichText};

use crate::analysis::heatmap::SelfAttentionSpan;
use crate::analysis::segment::{segment_colour, LabelChoice, SegmentMethod};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::dialogs::DialogPurpose;
use crate::ui::segments::{scores_text, segment_caption, SegmentsState};

/// Controls, the segment list, the mask and its actions.
pub(crate) fn segments_panel_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    segments: &mut SegmentsState,
    commands: &mut UiCommands,
) {
    ui.heading("Segmentation");
    let finished = ctx.state.run_finished();
    let grids = ctx
        .state
        .run
        .as_ref()
        .map(|run| run.self_attention_grids.clone())
        .unwrap_or_default();
    let state = &mut *segments;
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
                        .on_hover_text("The most segments: near-identical clusters merge into one");
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
            let grid_text = |grid: Option<(usize, usize)>| grid.map(|(h, w)| format!("{h}x{w}"));
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
    let current_run = ctx.state.run.as_ref().map(|run| run.run_id);
    let shown = segments
        .result
        .as_ref()
        .filter(|result| Some(result.run_id) == current_run);
    ui.horizontal(|ui| {
        if segments.in_flight.is_some() {
            ui.spinner();
            ui.weak("segmenting...");
        } else if let Some(result) = shown {
            ui.weak(format!(
                "{} segments ({}, {}x{} grid) in {:.0} ms",
                result.segmentation.segments.len(),
                result.segmentation.method,
                result.segmentation.grid.h,
                result.segmentation.grid.w,
                segments.last_secs * 1e3
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
        let selected = segments.selected.contains(&segment.id);
        ui.horizontal(|ui| {
            let [red, green, blue] = segment_colour(segment.id);
            let (swatch, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
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
            ui.add(egui::Label::new(RichText::new(scores_text(segment)).size(11.5).weak()).wrap());
        });
    }
    if let Some((segment_id, add)) = clicked {
        segments.toggle(segment_id, add);
        segments.update_mask();
    }

    ui.separator();
    ui.label(RichText::new("Mask").strong());
    let settings = &mut segments.mask_settings;
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
    segments.update_mask();
    let mask = segments.mask();
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
            segments.hand_mask_to_edit(commands);
        }
        if ui
            .add_enabled(has_mask, egui::Button::new("Clear selection"))
            .clicked()
        {
            segments.clear_selection();
        }
    });
    let idle = !ctx.dialog_open;
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
                commands.push(UiCommand::OpenDialog(purpose));
            }
        }
    });
}
