//! The appearance transfer's central view: three panes side by side, the structure slot, the
//! appearance slot (with the probe's heat map and a marker at its top match, or the masks) and the
//! output (streaming live; a click probes it). Images are composed on the CPU into textures that
//! are rebuilt only when the mode's state changed.

use egui::{Color32, Rect};

use crate::analysis::appearance::LabelledMask;
use crate::analysis::colormap::{overlay, Colormap};
use crate::ui::appearance::panel::MASK_COLOURS;
use crate::ui::appearance::{AppearanceCommand, AppearanceTransfer, SlotSource};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::worker::{AppearanceSlot, RgbImage};

/// One of the view's panes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppearancePane {
    /// The structure slot.
    Structure,
    /// The appearance slot (probe heat map, masks).
    Appearance,
    /// The output.
    Output,
}

impl AppearancePane {
    const ALL: [Self; 3] = [Self::Structure, Self::Appearance, Self::Output];

    fn index(self) -> usize {
        match self {
            Self::Structure => 0,
            Self::Appearance => 1,
            Self::Output => 2,
        }
    }

    fn slot(self) -> Option<AppearanceSlot> {
        match self {
            Self::Structure => Some(AppearanceSlot::Structure),
            Self::Appearance => Some(AppearanceSlot::Appearance),
            Self::Output => None,
        }
    }
}

/// The view's own state: the panes' textures and where the images were drawn.
#[derive(Default)]
pub(crate) struct AppearanceView {
    /// The mode's revision the textures were made for.
    revision: Option<u64>,
    /// One texture per pane (none for an empty pane).
    textures: [Option<egui::TextureHandle>; 3],
    /// Where each pane's image was drawn last frame (its empty square when it has none), in
    /// points.
    image_rects: [Option<Rect>; 3],
    /// Each pane's whole area last frame (drop targets).
    pane_rects: [Option<Rect>; 3],
}

impl AppearanceView {
    /// Where `pane`'s image was drawn last frame (its empty square when it has none).
    pub(crate) fn image_rect(&self, pane: AppearancePane) -> Option<Rect> {
        self.image_rects[pane.index()]
    }

    /// The slot whose pane lies under `pos` (last frame's layout).
    pub(crate) fn slot_at(&self, pos: egui::Pos2) -> Option<AppearanceSlot> {
        AppearancePane::ALL.into_iter().find_map(|pane| {
            self.pane_rects[pane.index()]
                .filter(|rect| rect.contains(pos))
                .and_then(|_| pane.slot())
        })
    }

    /// Rebuilds the textures when the mode changed since they were made.
    fn refresh(&mut self, egui_ctx: &egui::Context, mode: &AppearanceTransfer) {
        if self.revision == Some(mode.revision()) {
            return;
        }
        self.revision = Some(mode.revision());
        for pane in AppearancePane::ALL {
            let composed = composed_image(mode, pane);
            self.textures[pane.index()] = composed.map(|image| {
                let colour = egui::ColorImage::from_rgb([image.width, image.height], &image.pixels);
                egui_ctx.load_texture(
                    format!("attend.appearance.{pane:?}"),
                    colour,
                    egui::TextureOptions::NEAREST,
                )
            });
        }
    }
}

/// What `pane` shows: the slot's image with the masks or the probe's heat map over it, or the
/// output.
fn composed_image(mode: &AppearanceTransfer, pane: AppearancePane) -> Option<RgbImage> {
    let Some(slot) = pane.slot() else {
        return mode.output_image().cloned();
    };
    let image = mode.shown_image(slot)?;
    let result = mode.result();
    if mode.masks_shown() {
        if let Some(result) = result {
            let masks = match slot {
                AppearanceSlot::Structure => &result.masks.structure,
                AppearanceSlot::Appearance => &result.masks.appearance,
            };
            return Some(with_masks(image, masks));
        }
    }
    if slot == AppearanceSlot::Appearance {
        if let Some((heatmap, _)) = mode.probe_result() {
            if heatmap.h == image.height && heatmap.w == image.width {
                let pixels = overlay(
                    &image.pixels,
                    image.width,
                    image.height,
                    &heatmap.data,
                    Colormap::default(),
                    0.6,
                    0.0,
                );
                return Some(RgbImage {
                    width: image.width,
                    height: image.height,
                    pixels,
                });
            }
        }
    }
    Some(image.clone())
}

/// `image` with each mask tinted in its colour (masks of another size are left out).
fn with_masks(image: &RgbImage, masks: &[LabelledMask]) -> RgbImage {
    let mut pixels = image.pixels.clone();
    for (index, labelled) in masks.iter().enumerate() {
        let mask = &labelled.mask;
        if mask.h != image.height || mask.w != image.width {
            continue;
        }
        let colour = MASK_COLOURS[index % MASK_COLOURS.len()];
        for (pixel, &value) in pixels.chunks_exact_mut(3).zip(&mask.data) {
            let amount = 0.55 * value.clamp(0.0, 1.0);
            for (channel, tint) in pixel.iter_mut().zip(colour) {
                *channel = (f32::from(*channel) * (1.0 - amount) + f32::from(tint) * amount) as u8;
            }
        }
    }
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

/// The three panes, side by side, with their captions; a click on the output probes it.
pub(crate) fn appearance_view_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    view: &mut AppearanceView,
    commands: &mut UiCommands,
) {
    let mode = &ctx.state.modes.appearance;
    view.refresh(ui.ctx(), mode);
    let available = ui.available_rect_before_wrap();
    let gap = 12.0;
    let caption_height = 40.0;
    let pane_width = ((available.width() - 2.0 * gap) / 3.0).max(10.0);
    let side = pane_width
        .min(available.height() - caption_height)
        .max(10.0);
    let top = available.min.y + ((available.height() - side - caption_height) / 2.0).max(0.0);
    let hovering_files = ui.ctx().input(|input| !input.raw.hovered_files.is_empty());
    let pointer = ui.ctx().input(|input| input.pointer.hover_pos());
    for pane in AppearancePane::ALL {
        let left = available.min.x + pane.index() as f32 * (pane_width + gap);
        let pane_rect = Rect::from_min_size(
            egui::pos2(left, top),
            egui::vec2(pane_width, side + caption_height),
        );
        view.pane_rects[pane.index()] = Some(pane_rect);
        let square = Rect::from_min_size(
            egui::pos2(left + (pane_width - side) / 2.0, top),
            egui::vec2(side, side),
        );
        let painter = ui.painter_at(pane_rect);
        painter.rect_filled(square, 4.0, ui.visuals().extreme_bg_color);
        let image_rect = view.textures[pane.index()].as_ref().map(|texture| {
            let [width, height] = texture.size();
            let (width, height) = (width.max(1) as f32, height.max(1) as f32);
            let scale = (side / width).min(side / height);
            let rect =
                Rect::from_center_size(square.center(), egui::vec2(width * scale, height * scale));
            painter.image(
                texture.id(),
                rect,
                Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                Color32::WHITE,
            );
            rect
        });
        view.image_rects[pane.index()] = Some(image_rect.unwrap_or(square));
        if image_rect.is_none() {
            painter.text(
                square.center(),
                egui::Align2::CENTER_CENTER,
                empty_text(mode, pane),
                egui::FontId::proportional(14.0),
                ui.visuals().weak_text_color(),
            );
        }
        if hovering_files && pane.slot().is_some() {
            let over = pointer.is_some_and(|pos| pane_rect.contains(pos));
            let colour = if over {
                Color32::from_rgb(250, 200, 50)
            } else {
                Color32::from_gray(140)
            };
            painter.rect_stroke(
                square,
                4.0,
                egui::Stroke::new(3.0, colour),
                egui::StrokeKind::Inside,
            );
        }
        markers_ui(&painter, mode, pane, image_rect);
        painter.text(
            egui::pos2(square.center().x, square.max.y + caption_height / 2.0),
            egui::Align2::CENTER_CENTER,
            caption(mode, pane),
            egui::FontId::proportional(13.0),
            ui.visuals().text_color(),
        );
        let response = ui.interact(
            pane_rect,
            egui::Id::unique(("attend.appearance.pane", pane.index())),
            if pane == AppearancePane::Output {
                egui::Sense::click()
            } else {
                egui::Sense::hover()
            },
        );
        let label = match pane {
            AppearancePane::Structure => "Structure image pane",
            AppearancePane::Appearance => "Appearance image pane",
            AppearancePane::Output => "Transfer output pane",
        };
        response
            .widget_info(|| egui::WidgetInfo::labeled(egui::Role::Image, true, label.to_owned()));
        if pane == AppearancePane::Output && response.clicked() {
            if let (Some(rect), Some(pos)) = (image_rect, response.interact_pointer_pos()) {
                if rect.contains(pos) {
                    let point = (
                        (pos.y - rect.min.y) / rect.height(),
                        (pos.x - rect.min.x) / rect.width(),
                    );
                    commands.push(UiCommand::Appearance(AppearanceCommand::Probe(Some(point))));
                }
            }
        }
    }
    ui.allocate_rect(available, egui::Sense::hover());
}

/// The probe's markers: a cross on the output at the probed point, a ring on the appearance at its
/// top match.
fn markers_ui(
    painter: &egui::Painter,
    mode: &AppearanceTransfer,
    pane: AppearancePane,
    image_rect: Option<Rect>,
) {
    let Some(rect) = image_rect else {
        return;
    };
    let at = |(y, x): (f32, f32)| rect.min + egui::vec2(x * rect.width(), y * rect.height());
    let stroke = |colour| egui::Stroke::new(2.0, colour);
    match pane {
        AppearancePane::Output => {
            if let Some(point) = mode.probe_point() {
                let centre = at(point);
                for colour in [Color32::BLACK, Color32::WHITE] {
                    let size = if colour == Color32::BLACK { 9.0 } else { 7.0 };
                    painter.line_segment(
                        [
                            centre - egui::vec2(size, 0.0),
                            centre + egui::vec2(size, 0.0),
                        ],
                        stroke(colour),
                    );
                    painter.line_segment(
                        [
                            centre - egui::vec2(0.0, size),
                            centre + egui::vec2(0.0, size),
                        ],
                        stroke(colour),
                    );
                }
            }
        }
        AppearancePane::Appearance if !mode.masks_shown() => {
            if let Some((_, top)) = mode.probe_result() {
                let centre = at(top);
                painter.circle_stroke(centre, 9.0, stroke(Color32::BLACK));
                painter.circle_stroke(centre, 7.0, stroke(Color32::WHITE));
            }
        }
        AppearancePane::Appearance | AppearancePane::Structure => {}
    }
}

/// What an empty pane says.
fn empty_text(mode: &AppearanceTransfer, pane: AppearancePane) -> String {
    match pane.slot() {
        Some(slot) => match &mode.slot(slot).source {
            _ if mode.slot(slot).is_reading() => "reading...".to_owned(),
            SlotSource::Generate => "generated from its prompt\nwhen the transfer runs".to_owned(),
            SlotSource::Empty | SlotSource::Image { .. } => {
                format!("Drop the {} image here\nor open one", slot.name())
            }
        },
        None if mode.is_running() => "preparing...".to_owned(),
        None => "The output appears here".to_owned(),
    }
}

/// The caption under a pane.
fn caption(mode: &AppearanceTransfer, pane: AppearancePane) -> String {
    match pane {
        AppearancePane::Structure => "Structure (shapes and places)".to_owned(),
        AppearancePane::Appearance if mode.probe_result().is_some() && !mode.masks_shown() => {
            "Appearance: where it attends".to_owned()
        }
        AppearancePane::Appearance => "Appearance (colours and textures)".to_owned(),
        AppearancePane::Output => match mode.run() {
            Some(run) if mode.is_running() && run.step_count > 0 => {
                format!("Output: step {}/{}", run.steps_done, run.step_count)
            }
            Some(_) if mode.finished() => "Output: click to probe".to_owned(),
            _ => "Output".to_owned(),
        },
    }
}
