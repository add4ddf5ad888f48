//! The segments over the canvas image: one overlay texture (segment colours, or the selection's
//! mask), outlines and labels, the hovered segment's scores, and clicks that select segments.

use egui::{Color32, Pos2, Rect, Stroke};

use crate::analysis::segment::{segment_colour, LabelledSegmentation, Mask};
use crate::ui::canvas::CanvasResponse;
use crate::ui::context::ViewContext;
use crate::ui::segments::{scores_text, segment_caption, OverlayKey, SegmentsState};

/// Draws the segment overlay, outlines and labels over the canvas image, the hovered segment's
/// label as a tooltip, and takes canvas clicks: select, Shift-click to add, click a selected one to
/// remove it.
pub(crate) fn segments_overlay_ui(
    ctx: &ViewContext<'_>,
    ui: &egui::Ui,
    segments: &mut SegmentsState,
    canvas: &CanvasResponse,
) {
    let current_run = ctx.state.run.as_ref().map(|run| run.run_id);
    let CanvasResponse {
        response,
        image_rect,
        visible,
        painter,
    } = canvas;
    let (image_rect, visible) = (*image_rect, *visible);
    if response.clicked() {
        if let Some(pointer) = response
            .interact_pointer_pos()
            .filter(|pointer| image_rect.contains(*pointer))
        {
            let uv = (pointer - image_rect.min) / image_rect.size();
            let add = ui.input(|input| input.modifiers.shift);
            segments.click_at(current_run, (uv.y, uv.x), add);
        }
    }
    let smooth = ctx.state.settings.view.smooth_image;
    let Some(texture) = overlay_texture(segments, ui.ctx(), smooth) else {
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
    let Some(result) = &segments.result else {
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
        let selected = segments.selected.contains(&segment.id);
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
    if ctx.taking_screenshot {
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
fn overlay_texture(
    segments: &mut SegmentsState,
    egui_ctx: &egui::Context,
    smooth: bool,
) -> Option<egui::TextureId> {
    let result = segments.result.as_ref()?;
    let key = OverlayKey {
        version: result.version,
        selected: segments.selected.clone(),
        mask: segments.mask_settings.clone(),
        smooth,
    };
    if let Some((built, texture)) = &segments.overlay {
        if *built == key {
            return Some(texture.id());
        }
    }
    let mask = segments
        .mask
        .as_ref()
        .filter(|(version, selected, _, _)| {
            *version == result.version && *selected == segments.selected
        })
        .map(|(_, _, _, mask)| mask);
    let image = overlay_image(&result.segmentation, mask);
    let options = if key.smooth {
        egui::TextureOptions::LINEAR
    } else {
        egui::TextureOptions::NEAREST
    };
    match &mut segments.overlay {
        Some((built, texture)) => {
            texture.set(image, options);
            *built = key;
        }
        None => {
            let texture = egui_ctx.load_texture("attend.segments", image, options);
            segments.overlay = Some((key, texture));
        }
    }
    segments.overlay.as_ref().map(|(_, texture)| texture.id())
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
