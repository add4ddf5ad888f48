//! The centre canvas: the image at the timeline's step with the selected heat map (or the
//! self-attention probe) blended over it. Zoom with the scroll wheel, pan by dragging (right or middle
//! button, or left when the probe is off), double-click to reset. With the probe on, a click (or
//! hovering with Shift held) picks the query pixel.

use std::sync::Arc;

use egui::{Color32, Pos2, Rect, Sense, Vec2};

use crate::analysis::colormap::overlay;
use crate::analysis::geometry::{cell_at, fit_size, sample_bilinear};
use crate::analysis::heatmap::{min_max_normalize, resize_bilinear, self_attention_probe};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::heatmap_renderer::{
    flags, CanvasHeat, CanvasImage, HeatmapCallback, HeatmapUniforms,
};
use crate::ui::run_view::RunKey;
use crate::ui::settings::ViewSettings;
use crate::ui::state::CanvasView;

/// Which heat grid the canvas shows, so it is rebuilt only when this changes.
#[derive(Clone, Debug, PartialEq)]
enum HeatSourceKey {
    /// No heat map.
    Nothing,
    /// Word `index` of derived maps `version`.
    Word { version: u64, index: usize },
    /// The probe at a query cell of a map.
    Probe {
        run_id: u64,
        grid: (usize, usize),
        cell: (usize, usize),
    },
}

/// The canvas's view and the data it draws.
pub(crate) struct CanvasState {
    /// Magnification relative to "fit in the canvas".
    pub(crate) zoom: f32,
    /// Offset of the image centre from the canvas centre, in points.
    pub(crate) pan: Vec2,
    /// Draw through the wgpu callback (else composed on the CPU).
    gpu: bool,
    image: Option<Arc<CanvasImage>>,
    /// `(run, step shown, final image shown)`.
    image_key: Option<(RunKey, usize, bool)>,
    heat: Arc<CanvasHeat>,
    heat_key: Option<HeatSourceKey>,
    /// CPU fallback: the composed texture and what it was composed from.
    cpu_texture: Option<egui::TextureHandle>,
    cpu_key: Option<(u64, u64, ViewSettings)>,
    /// The image's rectangle on screen last frame (tests click into it).
    pub(crate) image_rect: Option<Rect>,
}

impl CanvasState {
    /// An empty canvas; `gpu` selects the wgpu renderer.
    pub(crate) fn new(gpu: bool) -> Self {
        Self {
            zoom: 1.0,
            pan: Vec2::ZERO,
            gpu,
            image: None,
            image_key: None,
            heat: Arc::new(empty_heat()),
            heat_key: None,
            cpu_texture: None,
            cpu_key: None,
            image_rect: None,
        }
    }

    /// The heat grid shown (0..1 values).
    pub(crate) fn heat(&self) -> &CanvasHeat {
        &self.heat
    }

    /// The image shown, if any.
    pub(crate) fn image(&self) -> Option<&CanvasImage> {
        self.image.as_deref()
    }

    /// Back to zoom 1, centred.
    pub(crate) fn reset_zoom(&mut self) {
        self.zoom = 1.0;
        self.pan = Vec2::ZERO;
    }
}

/// Where the canvas drew the image this frame, for the overlays drawn over it (segments, edit
/// comparison).
pub(crate) struct CanvasResponse {
    /// The canvas's interaction (clicks and hovers over the image).
    pub(crate) response: egui::Response,
    /// The whole image's rectangle (may extend past the canvas when zoomed).
    pub(crate) image_rect: Rect,
    /// The part of the image inside the canvas.
    pub(crate) visible: Rect,
    /// A painter clipped to the canvas.
    pub(crate) painter: egui::Painter,
}

fn empty_heat() -> CanvasHeat {
    CanvasHeat {
        version: 0,
        width: 1,
        height: 1,
        values: vec![0.0],
    }
}

/// Rebuilds the canvas image and heat grid when what they show changed.
fn update_canvas_data(ctx: &ViewContext<'_>, canvas: &mut CanvasState) {
    let state = ctx.state;
    let image_key = state.shown_step();
    if image_key != canvas.image_key {
        canvas.image = image_key.and_then(|(_, step, _)| {
            let image = state.shown_run()?.image_at(step)?;
            CanvasImage::from_rgb(image.width, image.height, &image.pixels).map(Arc::new)
        });
        canvas.image_key = image_key;
    }

    let (heat_key, heat) = heat_source(ctx, canvas.heat_key.as_ref());
    if Some(&heat_key) != canvas.heat_key.as_ref() {
        canvas.heat = Arc::new(heat.unwrap_or_else(empty_heat));
        canvas.heat_key = Some(heat_key);
    }
}

/// What heat grid to show now; the grid is built only when the key differs from `shown`.
fn heat_source(
    ctx: &ViewContext<'_>,
    shown: Option<&HeatSourceKey>,
) -> (HeatSourceKey, Option<CanvasHeat>) {
    let state = ctx.state;
    match state.canvas_view {
        // The Segments view draws its own overlay.
        CanvasView::Segments => (HeatSourceKey::Nothing, None),
        CanvasView::Probe => {
            let probe = &state.probe;
            let (Some(point), Some((run_id, span, map))) = (probe.point, &probe.map) else {
                return (HeatSourceKey::Nothing, None);
            };
            let current_run = state.run.as_ref().map(|run| run.run_id);
            if Some(*run_id) != current_run || *span != state.settings.probe_span {
                return (HeatSourceKey::Nothing, None);
            }
            let Some((cell_y, cell_x)) = cell_at(point, map.h, map.w) else {
                return (HeatSourceKey::Nothing, None);
            };
            let key = HeatSourceKey::Probe {
                run_id: *run_id,
                grid: (map.h, map.w),
                cell: (cell_y, cell_x),
            };
            if Some(&key) == shown {
                return (key, None);
            }
            let mut values = self_attention_probe(&map.data, map.h, map.w, cell_y, cell_x);
            min_max_normalize(&mut values);
            (key, CanvasHeat::new(map.w, map.h, values))
        }
        CanvasView::WordHeatmap => {
            let Some(index) = state.selected_word else {
                return (HeatSourceKey::Nothing, None);
            };
            let Some(heatmap) = state.derived.heatmaps.get(index) else {
                return (HeatSourceKey::Nothing, None);
            };
            let key = HeatSourceKey::Word {
                version: state.derived.version,
                index,
            };
            if Some(&key) == shown {
                return (key, None);
            }
            (
                key,
                CanvasHeat::new(heatmap.w, heatmap.h, heatmap.data.clone()),
            )
        }
    }
}

/// The canvas: the shown run's image at the timeline's step with the heat map (or the probe) over
/// it. Returns where the image went (`None` before there is an image).
pub(crate) fn canvas_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    canvas: &mut CanvasState,
    commands: &mut UiCommands,
) -> Option<CanvasResponse> {
    update_canvas_data(ctx, canvas);
    let (canvas_rect, response) =
        ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, "Canvas"));
    let painter = ui.painter_at(canvas_rect);
    painter.rect_filled(canvas_rect, 0.0, ui.visuals().extreme_bg_color);

    let Some(image) = canvas.image.clone() else {
        canvas.image_rect = None;
        let message = if ctx.state.is_generating() {
            "Generating..."
        } else {
            "No image yet: type a prompt and press Generate (Ctrl+Enter)"
        };
        painter.text(
            canvas_rect.center(),
            egui::Align2::CENTER_CENTER,
            message,
            egui::FontId::proportional(16.0),
            ui.visuals().weak_text_color(),
        );
        return None;
    };

    canvas_input(ctx, ui, canvas, &response, canvas_rect, commands);
    let image_rect = image_rect_in(canvas_rect, &image, canvas.zoom, canvas.pan);
    canvas.image_rect = Some(image_rect);
    let visible = image_rect.intersect(canvas_rect);
    if visible.width() <= 0.0 || visible.height() <= 0.0 {
        return None;
    }
    let uv_min = (visible.min - image_rect.min) / image_rect.size();
    let uv_max = (visible.max - image_rect.min) / image_rect.size();
    let view = &ctx.state.settings.view;
    let mut shader_flags = 0;
    if view.show_image {
        shader_flags |= flags::SHOW_IMAGE;
    }
    let heat_shown = view.show_heatmap && canvas.heat.version != 0;
    if heat_shown {
        shader_flags |= flags::SHOW_HEAT;
    }
    if view.smooth_image {
        shader_flags |= flags::SMOOTH_IMAGE;
    }
    if canvas.gpu {
        let mut uniforms =
            HeatmapUniforms::new(view.colormap, view.opacity, view.threshold, shader_flags);
        uniforms.uv_min = [uv_min.x, uv_min.y];
        uniforms.uv_max = [uv_max.x, uv_max.y];
        painter.add(egui_wgpu::Callback::new_paint_callback(
            visible,
            HeatmapCallback {
                image: Arc::clone(&image),
                heat: Arc::clone(&canvas.heat),
                uniforms,
            },
        ));
    } else {
        let texture = cpu_canvas_texture(canvas, view, ui.ctx(), &image, heat_shown);
        painter.image(
            texture,
            visible,
            Rect::from_min_max(uv_min.to_pos2(), uv_max.to_pos2()),
            Color32::WHITE,
        );
    }
    probe_marker(ctx, &painter, image_rect);
    if let Some(pointer) = response.hover_pos() {
        if image_rect.contains(pointer) && heat_shown && !ctx.taking_screenshot {
            let uv = (pointer - image_rect.min) / image_rect.size();
            let heat = &canvas.heat;
            let value = sample_bilinear(
                &heat.values,
                heat.height as usize,
                heat.width as usize,
                (uv.y, uv.x),
            );
            response
                .clone()
                .on_hover_text_at_pointer(format!("heat {value:.2}"));
        }
    }
    Some(CanvasResponse {
        response,
        image_rect,
        visible,
        painter,
    })
}

/// Zoom, pan, reset and probe input.
fn canvas_input(
    ctx: &ViewContext<'_>,
    ui: &egui::Ui,
    canvas: &mut CanvasState,
    response: &egui::Response,
    canvas_rect: Rect,
    commands: &mut UiCommands,
) {
    let Some(image) = canvas.image.clone() else {
        return;
    };
    if response.double_clicked() {
        canvas.reset_zoom();
    }
    if response.hovered() {
        let scroll = ui.input(|input| input.smooth_scroll_delta.y);
        if scroll != 0.0 {
            let old_zoom = canvas.zoom;
            let new_zoom = (old_zoom * (scroll * 0.005).exp()).clamp(0.1, 64.0);
            // Keep the point under the pointer fixed.
            if let Some(pointer) = response.hover_pos() {
                let from_centre = pointer - canvas_rect.center() - canvas.pan;
                canvas.pan -= from_centre * (new_zoom / old_zoom - 1.0);
            }
            canvas.zoom = new_zoom;
        }
    }
    let probing = ctx.state.canvas_view == CanvasView::Probe;
    let probe_drag = probing && response.dragged_by(egui::PointerButton::Primary);
    if (response.dragged() && !probe_drag) || response.dragged_by(egui::PointerButton::Middle) {
        canvas.pan += response.drag_delta();
    }
    if !probing {
        return;
    }
    let image_rect = image_rect_in(canvas_rect, &image, canvas.zoom, canvas.pan);
    let shift_hover = ui.input(|input| input.modifiers.shift) && response.hovered();
    let pick = response.clicked() || probe_drag || shift_hover;
    if let Some(pointer) = response
        .interact_pointer_pos()
        .or(response.hover_pos())
        .filter(|_| pick)
    {
        if image_rect.contains(pointer) {
            let uv = (pointer - image_rect.min) / image_rect.size();
            commands.push(UiCommand::SetProbePoint((
                uv.y.clamp(0.0, 1.0),
                uv.x.clamp(0.0, 1.0),
            )));
        }
    }
}

/// A cross-hair where the probe looks from.
fn probe_marker(ctx: &ViewContext<'_>, painter: &egui::Painter, image_rect: Rect) {
    if ctx.state.canvas_view != CanvasView::Probe {
        return;
    }
    let Some((y, x)) = ctx.state.probe.point else {
        return;
    };
    let centre = Pos2::new(
        image_rect.min.x + x * image_rect.width(),
        image_rect.min.y + y * image_rect.height(),
    );
    let stroke = egui::Stroke::new(2.0, Color32::WHITE);
    painter.circle_stroke(centre, 6.0, stroke);
    painter.circle_stroke(centre, 7.5, egui::Stroke::new(1.0, Color32::BLACK));
}

/// CPU fallback: the image with the heat map blended in, as an egui texture (rebuilt on change).
fn cpu_canvas_texture(
    canvas: &mut CanvasState,
    view: &ViewSettings,
    egui_ctx: &egui::Context,
    image: &CanvasImage,
    heat_shown: bool,
) -> egui::TextureId {
    let key = (image.version, canvas.heat.version, view.clone());
    if canvas.cpu_key.as_ref() != Some(&key) || canvas.cpu_texture.is_none() {
        let (width, height) = (image.width as usize, image.height as usize);
        let mut rgb: Vec<u8> = if view.show_image {
            image
                .rgba
                .chunks_exact(4)
                .flat_map(|pixel| [pixel[0], pixel[1], pixel[2]])
                .collect()
        } else {
            vec![0; width * height * 3]
        };
        if heat_shown {
            let heat = &canvas.heat;
            let upsampled = resize_bilinear(
                &heat.values,
                heat.height as usize,
                heat.width as usize,
                height,
                width,
            );
            let opacity = if view.show_image { view.opacity } else { 1.0 };
            rgb = overlay(
                &rgb,
                width,
                height,
                &upsampled,
                view.colormap,
                opacity,
                view.threshold,
            );
        }
        let color_image = egui::ColorImage::from_rgb([width, height], &rgb);
        let options = if view.smooth_image {
            egui::TextureOptions::LINEAR
        } else {
            egui::TextureOptions::NEAREST
        };
        match &mut canvas.cpu_texture {
            Some(texture) => texture.set(color_image, options),
            None => {
                canvas.cpu_texture =
                    Some(egui_ctx.load_texture("attend.canvas", color_image, options))
            }
        }
        canvas.cpu_key = Some(key);
    }
    canvas
        .cpu_texture
        .as_ref()
        .map_or(egui::TextureId::default(), egui::TextureHandle::id)
}

/// Where the image goes: fitted into `canvas` (keeping its aspect), scaled by `zoom`, moved by `pan`.
fn image_rect_in(canvas: Rect, image: &CanvasImage, zoom: f32, pan: Vec2) -> Rect {
    let margin = 8.0;
    let available = canvas.size() - Vec2::splat(2.0 * margin);
    let aspect = image.width as f32 / image.height as f32;
    let (width, height) = fit_size((available.x, available.y), aspect);
    Rect::from_center_size(canvas.center() + pan, Vec2::new(width, height) * zoom)
}
