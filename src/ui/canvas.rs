//! The centre canvas: the image at the timeline's step with the selected heat map (or the
//! self-attention probe) blended over it. Zoom with the scroll wheel, pan by dragging (right or middle
//! button, or left when the probe is off), double-click to reset. With the probe on, a click (or
//! hovering with Shift held) picks the query pixel.

use std::sync::Arc;

use egui::{Color32, Pos2, Rect, Sense, Vec2};

use crate::analysis::colormap::overlay;
use crate::analysis::heatmap::{min_max_normalize, resize_bilinear, self_attention_probe};
use crate::ui::app::EditorApp;
use crate::ui::heatmap_renderer::{
    flags, CanvasHeat, CanvasImage, HeatmapCallback, HeatmapUniforms,
};
use crate::ui::settings::ViewSettings;

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
    /// `(run id, step shown, final image shown)`.
    image_key: Option<(u64, usize, bool)>,
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
}

fn empty_heat() -> CanvasHeat {
    CanvasHeat {
        version: 0,
        width: 1,
        height: 1,
        values: vec![0.0],
    }
}

impl EditorApp {
    /// The step the canvas shows and whether it is the final image.
    fn shown_step(&self) -> Option<(u64, usize, bool)> {
        let run = self.shown_run()?;
        let last = run.steps.len().checked_sub(1)?;
        let step = self.timeline.cursor.unwrap_or(last).min(last);
        Some((run.run_id, step, step == last && run.final_image.is_some()))
    }

    /// Rebuilds the canvas image and heat grid when what they show changed.
    fn update_canvas_data(&mut self) {
        let image_key = self.shown_step();
        if image_key != self.canvas.image_key {
            self.canvas.image = image_key.and_then(|(_, step, _)| {
                let image = self.shown_run()?.image_at(step)?;
                CanvasImage::from_rgb(image.width, image.height, &image.pixels).map(Arc::new)
            });
            self.canvas.image_key = image_key;
        }

        let (heat_key, heat) = self.heat_source();
        if Some(&heat_key) != self.canvas.heat_key.as_ref() {
            self.canvas.heat = Arc::new(heat.unwrap_or_else(empty_heat));
            self.canvas.heat_key = Some(heat_key);
        }
    }

    /// What heat grid to show now; the grid is built only when the key is new.
    fn heat_source(&self) -> (HeatSourceKey, Option<CanvasHeat>) {
        if self.segments_active() {
            // The Segments view draws its own overlay.
            return (HeatSourceKey::Nothing, None);
        }
        if self.probe.enabled {
            if let (Some(point), Some((run_id, span, map))) = (self.probe.point, &self.probe.map) {
                let current_run = self.run.as_ref().map(|run| run.run_id);
                if Some(*run_id) == current_run && *span == self.settings.probe_span {
                    let cell_y = ((point.0 * map.h as f32) as usize).min(map.h.saturating_sub(1));
                    let cell_x = ((point.1 * map.w as f32) as usize).min(map.w.saturating_sub(1));
                    let key = HeatSourceKey::Probe {
                        run_id: *run_id,
                        grid: (map.h, map.w),
                        cell: (cell_y, cell_x),
                    };
                    if Some(&key) == self.canvas.heat_key.as_ref() {
                        return (key, None);
                    }
                    let mut values = self_attention_probe(&map.data, map.h, map.w, cell_y, cell_x);
                    min_max_normalize(&mut values);
                    return (key, CanvasHeat::new(map.w, map.h, values));
                }
            }
            return (HeatSourceKey::Nothing, None);
        }
        let Some(index) = self.selected_word else {
            return (HeatSourceKey::Nothing, None);
        };
        let Some(heatmap) = self.derived.heatmaps.get(index) else {
            return (HeatSourceKey::Nothing, None);
        };
        let key = HeatSourceKey::Word {
            version: self.derived.version,
            index,
        };
        if Some(&key) == self.canvas.heat_key.as_ref() {
            return (key, None);
        }
        (
            key,
            CanvasHeat::new(heatmap.w, heatmap.h, heatmap.data.clone()),
        )
    }

    /// The canvas (central panel).
    pub(crate) fn canvas_ui(&mut self, ui: &mut egui::Ui) {
        self.update_canvas_data();
        let (canvas_rect, response) =
            ui.allocate_exact_size(ui.available_size(), Sense::click_and_drag());
        response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, "Canvas"));
        let painter = ui.painter_at(canvas_rect);
        painter.rect_filled(canvas_rect, 0.0, ui.visuals().extreme_bg_color);

        let Some(image) = self.canvas.image.clone() else {
            self.canvas.image_rect = None;
            let message = if self.is_generating() {
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
            return;
        };

        self.canvas_input(ui, &response, canvas_rect);
        let image_rect = image_rect_in(canvas_rect, &image, self.canvas.zoom, self.canvas.pan);
        self.canvas.image_rect = Some(image_rect);
        let visible = image_rect.intersect(canvas_rect);
        if visible.width() <= 0.0 || visible.height() <= 0.0 {
            return;
        }
        let uv_min = (visible.min - image_rect.min) / image_rect.size();
        let uv_max = (visible.max - image_rect.min) / image_rect.size();
        let view = &self.settings.view;
        let mut shader_flags = 0;
        if view.show_image {
            shader_flags |= flags::SHOW_IMAGE;
        }
        let heat_shown = view.show_heatmap && self.canvas.heat.version != 0;
        if heat_shown {
            shader_flags |= flags::SHOW_HEAT;
        }
        if view.smooth_image {
            shader_flags |= flags::SMOOTH_IMAGE;
        }
        if self.canvas.gpu {
            let mut uniforms =
                HeatmapUniforms::new(view.colormap, view.opacity, view.threshold, shader_flags);
            uniforms.uv_min = [uv_min.x, uv_min.y];
            uniforms.uv_max = [uv_max.x, uv_max.y];
            painter.add(egui_wgpu::Callback::new_paint_callback(
                visible,
                HeatmapCallback {
                    image: Arc::clone(&image),
                    heat: Arc::clone(&self.canvas.heat),
                    uniforms,
                },
            ));
        } else {
            let texture = self.cpu_canvas_texture(ui.ctx(), &image, heat_shown);
            painter.image(
                texture,
                visible,
                Rect::from_min_max(uv_min.to_pos2(), uv_max.to_pos2()),
                Color32::WHITE,
            );
        }
        if self.segments_active() {
            self.segments_overlay_ui(ui, &painter, &response, image_rect, visible);
        }
        self.probe_marker(&painter, image_rect);
        if let Some(pointer) = response.hover_pos() {
            if image_rect.contains(pointer) && heat_shown && !self.taking_screenshot() {
                let uv = (pointer - image_rect.min) / image_rect.size();
                let value = sample_bilinear(&self.canvas.heat, uv.y, uv.x);
                response.on_hover_text_at_pointer(format!("heat {value:.2}"));
            }
        }
    }

    /// Zoom, pan, reset and probe input.
    fn canvas_input(&mut self, ui: &egui::Ui, response: &egui::Response, canvas_rect: Rect) {
        let Some(image) = self.canvas.image.clone() else {
            return;
        };
        if response.double_clicked() {
            self.canvas.zoom = 1.0;
            self.canvas.pan = Vec2::ZERO;
        }
        if response.hovered() {
            let scroll = ui.input(|input| input.smooth_scroll_delta.y);
            if scroll != 0.0 {
                let old_zoom = self.canvas.zoom;
                let new_zoom = (old_zoom * (scroll * 0.005).exp()).clamp(0.1, 64.0);
                // Keep the point under the pointer fixed.
                if let Some(pointer) = response.hover_pos() {
                    let from_centre = pointer - canvas_rect.center() - self.canvas.pan;
                    self.canvas.pan -= from_centre * (new_zoom / old_zoom - 1.0);
                }
                self.canvas.zoom = new_zoom;
            }
        }
        let probe_drag = self.probe.enabled && response.dragged_by(egui::PointerButton::Primary);
        if (response.dragged() && !probe_drag) || response.dragged_by(egui::PointerButton::Middle) {
            self.canvas.pan += response.drag_delta();
        }
        if self.segments_active() {
            let image_rect = image_rect_in(canvas_rect, &image, self.canvas.zoom, self.canvas.pan);
            self.segments_canvas_input(ui, response, image_rect);
            return;
        }
        if !self.probe.enabled {
            return;
        }
        let image_rect = image_rect_in(canvas_rect, &image, self.canvas.zoom, self.canvas.pan);
        let shift_hover = ui.input(|input| input.modifiers.shift) && response.hovered();
        let pick = response.clicked() || probe_drag || shift_hover;
        if let Some(pointer) = response
            .interact_pointer_pos()
            .or(response.hover_pos())
            .filter(|_| pick)
        {
            if image_rect.contains(pointer) {
                let uv = (pointer - image_rect.min) / image_rect.size();
                self.probe.point = Some((uv.y.clamp(0.0, 1.0), uv.x.clamp(0.0, 1.0)));
            }
        }
    }

    /// A cross-hair where the probe looks from.
    fn probe_marker(&self, painter: &egui::Painter, image_rect: Rect) {
        if !self.probe.enabled {
            return;
        }
        let Some((y, x)) = self.probe.point else {
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
        &mut self,
        ctx: &egui::Context,
        image: &CanvasImage,
        heat_shown: bool,
    ) -> egui::TextureId {
        let view = self.settings.view.clone();
        let key = (image.version, self.canvas.heat.version, view.clone());
        if self.canvas.cpu_key.as_ref() != Some(&key) || self.canvas.cpu_texture.is_none() {
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
                let heat = &self.canvas.heat;
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
            match &mut self.canvas.cpu_texture {
                Some(texture) => texture.set(color_image, options),
                None => {
                    self.canvas.cpu_texture =
                        Some(ctx.load_texture("attend.canvas", color_image, options))
                }
            }
            self.canvas.cpu_key = Some(key);
        }
        self.canvas
            .cpu_texture
            .as_ref()
            .map_or(egui::TextureId::default(), egui::TextureHandle::id)
    }
}

/// Where the image goes: fitted into `canvas` (keeping its aspect), scaled by `zoom`, moved by `pan`.
fn image_rect_in(canvas: Rect, image: &CanvasImage, zoom: f32, pan: Vec2) -> Rect {
    let margin = 8.0;
    let available = (canvas.size() - Vec2::splat(2.0 * margin)).max(Vec2::splat(1.0));
    let aspect = image.width as f32 / image.height as f32;
    let fitted = if available.x / available.y > aspect {
        Vec2::new(available.y * aspect, available.y)
    } else {
        Vec2::new(available.x, available.x / aspect)
    };
    Rect::from_center_size(canvas.center() + pan, fitted * zoom)
}

/// The heat at `(y, x)` in 0..1 coordinates, interpolated like the shader.
fn sample_bilinear(heat: &CanvasHeat, y: f32, x: f32) -> f32 {
    let (width, height) = (heat.width as usize, heat.height as usize);
    let position = |uv: f32, size: usize| (uv * size as f32 - 0.5).max(0.0);
    let (py, px) = (position(y, height), position(x, width));
    let (y0, x0) = ((py as usize).min(height - 1), (px as usize).min(width - 1));
    let (y1, x1) = ((y0 + 1).min(height - 1), (x0 + 1).min(width - 1));
    let (fy, fx) = (py - y0 as f32, px - x0 as f32);
    let at = |y: usize, x: usize| heat.values.get(y * width + x).copied().unwrap_or(0.0);
    let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
    let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
    top * (1.0 - fy) + bottom * fy
}
