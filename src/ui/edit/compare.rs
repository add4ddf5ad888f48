//! The canvas in edit mode: source and edited images compared, side by side (each fitted into half
//! the canvas) or one over the other with a vertical divider to drag (swipe). The run whose heat maps
//! are shown is drawn by the canvas (zoom, pan, heat map) in the pane [`compare_panes_ui`] gives it;
//! [`compare_ui`] draws the other image, the blend mask, the titles and the divider around it.

use egui::{Color32, Rect, Sense, Vec2};

use crate::analysis::geometry::{fit_size, mask_outline};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::edit::EditMode;
use crate::ui::run_view::{RunKey, RunOutcome, RunView};
use crate::ui::session::{CompareMode, EditBranchView};

/// Gap between the two side-by-side panes, in points.
const GAP: f32 = 6.0;
/// Height of the pane titles above the side-by-side panes, in points.
const HEADER: f32 = 20.0;

/// A texture of a plain image, rebuilt when its key changes.
struct CachedTexture<K> {
    key: Option<K>,
    texture: Option<egui::TextureHandle>,
}

impl<K> Default for CachedTexture<K> {
    fn default() -> Self {
        Self {
            key: None,
            texture: None,
        }
    }
}

/// The comparison's own state: the textures of the image not on the canvas and of the blend mask.
#[derive(Default)]
pub(crate) struct CompareView {
    other_image: CachedTexture<(RunKey, usize, bool)>,
    mask_texture: CachedTexture<(u64, usize)>,
}

/// Where the comparison goes this frame.
pub(crate) struct ComparePanes {
    mode: CompareMode,
    /// The whole central area.
    rect: Rect,
    /// Where the canvas draws the run whose heat maps are shown.
    pub(crate) canvas: Rect,
    /// Side by side: the pane of the other image.
    other: Rect,
}

/// True when edit mode compares images on the canvas (edit mode on, both runs exist).
pub(crate) fn compares(ctx: &ViewContext<'_>) -> bool {
    ctx.state.modes.edit.compares() && ctx.state.run.is_some()
}

/// Lays out the comparison in the central area (call before the canvas draws in
/// [`ComparePanes::canvas`]).
pub(crate) fn compare_panes_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui) -> ComparePanes {
    let session = ctx.state.modes.edit.session();
    let rect = ui.available_rect_before_wrap();
    match session.compare {
        CompareMode::SideBySide => {
            ui.allocate_rect(rect, Sense::hover());
            let half = (rect.width() - GAP) / 2.0;
            let left = Rect::from_min_size(
                rect.min + Vec2::new(0.0, HEADER),
                Vec2::new(half, rect.height() - HEADER),
            );
            let right = Rect::from_min_size(
                rect.min + Vec2::new(half + GAP, HEADER),
                Vec2::new(half, rect.height() - HEADER),
            );
            let (canvas, other) = if session.viewing == EditBranchView::Edited {
                (right, left)
            } else {
                (left, right)
            };
            ComparePanes {
                mode: CompareMode::SideBySide,
                rect,
                canvas,
                other,
            }
        }
        CompareMode::Swipe => ComparePanes {
            mode: CompareMode::Swipe,
            rect,
            canvas: rect,
            other: rect,
        },
    }
}

/// Draws the comparison around the canvas: `canvas_image_rect` is where the canvas put its image
/// this frame and `image_size_px` that image's `(width, height)`.
pub(crate) fn compare_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    view: &mut CompareView,
    panes: &ComparePanes,
    canvas_image_rect: Option<Rect>,
    image_size_px: Option<(u32, u32)>,
    commands: &mut UiCommands,
) {
    match panes.mode {
        CompareMode::SideBySide => {
            side_by_side_ui(ctx, ui, view, panes, canvas_image_rect, image_size_px);
        }
        CompareMode::Swipe => swipe_ui(ctx, ui, view, panes.rect, canvas_image_rect, commands),
    }
}

/// The run not on the canvas: the source when the edited run's heat maps are shown, and the other
/// way round.
fn other_run<'a>(ctx: &'a ViewContext<'_>) -> Option<&'a RunView> {
    let edit = &ctx.state.modes.edit;
    if edit.session().viewing == EditBranchView::Edited {
        ctx.state.run.as_ref()
    } else {
        edit.run()
    }
}

/// The image of the run not on the canvas, as a texture.
fn other_image_texture(
    ctx: &ViewContext<'_>,
    view: &mut CompareView,
    egui_ctx: &egui::Context,
) -> Option<egui::TextureId> {
    let other = other_run(ctx)?;
    let image = other.image_at(other.steps.len().checked_sub(1)?)?;
    let key = (other.key(), other.steps.len(), other.final_image.is_some());
    let cache = &mut view.other_image;
    if cache.key != Some(key) || cache.texture.is_none() {
        let colour = egui::ColorImage::from_rgb([image.width, image.height], &image.pixels);
        let options = if ctx.state.settings.view.smooth_image {
            egui::TextureOptions::LINEAR
        } else {
            egui::TextureOptions::NEAREST
        };
        match &mut cache.texture {
            Some(texture) => texture.set(colour, options),
            None => {
                cache.texture = Some(egui_ctx.load_texture("attend.edit.other", colour, options));
            }
        }
        cache.key = Some(key);
    }
    cache.texture.as_ref().map(egui::TextureHandle::id)
}

/// The blend mask as a translucent texture (orange where the edit may change the image).
fn blend_mask_texture(
    edit: &EditMode,
    view: &mut CompareView,
    egui_ctx: &egui::Context,
) -> Option<egui::TextureId> {
    if !edit.session().show_blend_mask {
        return None;
    }
    let mask = edit.blend_mask()?;
    if mask.h == 0 || mask.w == 0 || mask.data.len() != mask.h * mask.w {
        return None;
    }
    let key = (edit.mask_version(), mask.data.len());
    let cache = &mut view.mask_texture;
    if cache.key != Some(key) || cache.texture.is_none() {
        let rgba: Vec<u8> = mask
            .data
            .iter()
            .flat_map(|&value| {
                if value >= 0.5 {
                    [255, 150, 30, 45]
                } else {
                    [0, 0, 0, 0]
                }
            })
            .collect();
        let image = egui::ColorImage::from_rgba_unmultiplied([mask.w, mask.h], &rgba);
        match &mut cache.texture {
            Some(texture) => texture.set(image, egui::TextureOptions::NEAREST),
            None => {
                cache.texture = Some(egui_ctx.load_texture(
                    "attend.edit.blend_mask",
                    image,
                    egui::TextureOptions::NEAREST,
                ));
            }
        }
        cache.key = Some(key);
    }
    cache.texture.as_ref().map(egui::TextureHandle::id)
}

/// The blend mask over the edited image (clipped to `clip`): a light tint inside the mask and an
/// orange outline around it.
fn paint_blend_mask(
    ctx: &ViewContext<'_>,
    ui: &egui::Ui,
    view: &mut CompareView,
    image_rect: Rect,
    clip: Rect,
) {
    let edit = &ctx.state.modes.edit;
    let Some(texture) = blend_mask_texture(edit, view, ui.ctx()) else {
        return;
    };
    let painter = ui.painter_at(clip.intersect(ui.clip_rect()));
    painter.image(
        texture,
        image_rect,
        Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
        Color32::WHITE,
    );
    let Some(mask) = edit.blend_mask() else {
        return;
    };
    let cell = Vec2::new(
        image_rect.width() / mask.w as f32,
        image_rect.height() / mask.h as f32,
    );
    let at = |(x, y): (f32, f32)| image_rect.min + Vec2::new(x * cell.x, y * cell.y);
    let stroke = egui::Stroke::new(2.0, Color32::from_rgb(255, 150, 30));
    for [from, to] in mask_outline(&mask.data, mask.h, mask.w, 0.5) {
        painter.line_segment([at(from), at(to)], stroke);
    }
}

/// "Source" / "Edited" with the run's state.
fn pane_title(ctx: &ViewContext<'_>, edited: bool) -> String {
    let edit = &ctx.state.modes.edit;
    let run = if edited {
        edit.run()
    } else {
        ctx.state.run.as_ref()
    };
    let name = if edited { "Edited" } else { "Source" };
    let viewing_edited = edit.session().viewing == EditBranchView::Edited;
    let heat = if edited == viewing_edited && ctx.state.settings.view.show_heatmap {
        " (heat maps)"
    } else {
        ""
    };
    match run {
        Some(run) if run.outcome == RunOutcome::Running => {
            format!("{name}: step {}/{}{heat}", run.steps.len(), run.step_count)
        }
        _ => format!("{name}{heat}"),
    }
}

/// Source | edited: the other image fitted into its pane, the blend mask over the edited image,
/// and the pane titles.
fn side_by_side_ui(
    ctx: &ViewContext<'_>,
    ui: &egui::Ui,
    view: &mut CompareView,
    panes: &ComparePanes,
    canvas_image_rect: Option<Rect>,
    image_size_px: Option<(u32, u32)>,
) {
    let rect = panes.rect;
    let viewing_edited = ctx.state.modes.edit.session().viewing == EditBranchView::Edited;
    let painter = ui.painter_at(rect);
    painter.rect_filled(panes.other, 0.0, ui.visuals().extreme_bg_color);
    let texture = other_image_texture(ctx, view, ui.ctx());
    let plain_image_rect = match (texture, image_size_px) {
        (Some(texture), Some((width, height))) => {
            let available = panes.other.shrink(8.0).size();
            let (fit_width, fit_height) =
                fit_size((available.x, available.y), width as f32 / height as f32);
            let image_rect =
                Rect::from_center_size(panes.other.center(), Vec2::new(fit_width, fit_height));
            painter.image(
                texture,
                image_rect,
                Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                Color32::WHITE,
            );
            Some(image_rect)
        }
        _ => None,
    };
    let edited_image_rect = if viewing_edited {
        canvas_image_rect
    } else {
        plain_image_rect
    };
    if let Some(image_rect) = edited_image_rect {
        paint_blend_mask(ctx, ui, view, image_rect, image_rect);
    }
    let (left, right) = if viewing_edited {
        (panes.other, panes.canvas)
    } else {
        (panes.canvas, panes.other)
    };
    let text_colour = ui.visuals().strong_text_color();
    for (pane, title) in [
        (left, pane_title(ctx, false)),
        (right, pane_title(ctx, true)),
    ] {
        painter.text(
            egui::pos2(pane.center().x, rect.min.y + HEADER / 2.0),
            egui::Align2::CENTER_CENTER,
            title,
            egui::FontId::proportional(14.0),
            text_colour,
        );
    }
}

/// The other image over the canvas on one side of a draggable vertical divider: source on the
/// left, edited on the right.
fn swipe_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    view: &mut CompareView,
    rect: Rect,
    canvas_image_rect: Option<Rect>,
    commands: &mut UiCommands,
) {
    ui.allocate_rect(rect, Sense::hover());
    let Some(image_rect) = canvas_image_rect else {
        return;
    };
    let session = ctx.state.modes.edit.session();
    let viewing_edited = session.viewing == EditBranchView::Edited;
    let divider_x = image_rect.min.x + session.swipe * image_rect.width();
    let left = Rect::from_min_max(image_rect.min, egui::pos2(divider_x, image_rect.max.y));
    let right = Rect::from_min_max(egui::pos2(divider_x, image_rect.min.y), image_rect.max);
    let (other_side, edited_side) = if viewing_edited {
        (left, right)
    } else {
        (right, left)
    };
    let clip = ui.clip_rect().intersect(rect);
    if let Some(texture) = other_image_texture(ctx, view, ui.ctx()) {
        ui.painter_at(other_side.intersect(clip)).image(
            texture,
            image_rect,
            Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
            Color32::WHITE,
        );
    }
    paint_blend_mask(ctx, ui, view, image_rect, edited_side.intersect(clip));

    // The divider: a line and a handle to drag.
    let handle_rect = Rect::from_center_size(
        egui::pos2(divider_x, image_rect.center().y),
        Vec2::new(16.0, image_rect.height()),
    )
    .intersect(clip);
    let id = egui::Id::unique("attend.edit.swipe");
    let response = ui.interact(handle_rect, id, Sense::drag());
    let position = session.swipe;
    response.widget_info(|| egui::WidgetInfo::slider(true, f64::from(position), "Swipe divider"));
    if response.dragged() {
        if let Some(pointer) = response.interact_pointer_pos() {
            commands.push(UiCommand::SetSwipe(
                (pointer.x - image_rect.min.x) / image_rect.width(),
            ));
        }
    }
    if response.hovered() || response.dragged() {
        ui.ctx().set_cursor_icon(egui::CursorIcon::ResizeHorizontal);
    }
    paint_divider(ui, clip, image_rect, divider_x);
}

/// The divider's line, its knob with two arrows, and the "Source" / "Edited" labels.
fn paint_divider(ui: &egui::Ui, clip: Rect, image_rect: Rect, divider_x: f32) {
    let painter = ui.painter_at(clip);
    let line_top = egui::pos2(divider_x, image_rect.min.y.max(clip.min.y));
    let line_bottom = egui::pos2(divider_x, image_rect.max.y.min(clip.max.y));
    painter.line_segment(
        [line_top, line_bottom],
        egui::Stroke::new(3.0, Color32::BLACK),
    );
    painter.line_segment(
        [line_top, line_bottom],
        egui::Stroke::new(1.5, Color32::WHITE),
    );
    let knob = egui::pos2(
        divider_x,
        image_rect.center().y.clamp(clip.min.y, clip.max.y),
    );
    painter.circle_filled(knob, 9.0, Color32::WHITE);
    painter.circle_stroke(knob, 9.0, egui::Stroke::new(1.5, Color32::BLACK));
    for direction in [-1.0f32, 1.0] {
        let tip = knob + Vec2::new(direction * 6.0, 0.0);
        let base = knob + Vec2::new(direction * 2.0, 0.0);
        painter.add(egui::Shape::convex_polygon(
            vec![tip, base + Vec2::new(0.0, -4.0), base + Vec2::new(0.0, 4.0)],
            Color32::BLACK,
            egui::Stroke::NONE,
        ));
    }
    let label_font = egui::FontId::proportional(14.0);
    for (text, anchor, position) in [
        (
            "Source",
            egui::Align2::LEFT_TOP,
            image_rect.left_top() + Vec2::splat(6.0),
        ),
        (
            "Edited",
            egui::Align2::RIGHT_TOP,
            image_rect.right_top() + Vec2::new(-6.0, 6.0),
        ),
    ] {
        let galley_rect = painter.text(position, anchor, text, label_font.clone(), Color32::WHITE);
        painter.rect_filled(galley_rect.expand(3.0), 3.0, Color32::from_black_alpha(140));
        painter.text(position, anchor, text, label_font.clone(), Color32::WHITE);
    }
}
