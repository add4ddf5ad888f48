//! The token strip: one live thumbnail per prompt word. Click one to show its heat map on the canvas;
//! hover for its peak value.

use crate::analysis::colormap::Colormap;
use crate::ui::app::EditorApp;

/// Side of a thumbnail, in points.
const THUMBNAIL_SIZE: f32 = 56.0;

/// The thumbnails' textures and what they were drawn from.
#[derive(Default)]
pub(crate) struct TokenStrip {
    textures: Vec<egui::TextureHandle>,
    key: Option<(u64, Colormap)>,
}

impl TokenStrip {
    /// Number of thumbnails.
    pub(crate) fn len(&self) -> usize {
        self.textures.len()
    }
}

impl EditorApp {
    /// Redraws the thumbnails when the heat maps or the colormap changed.
    fn update_thumbnails(&mut self, ctx: &egui::Context) {
        let key = (self.derived.version, self.settings.view.colormap);
        if self.token_strip.key == Some(key) {
            return;
        }
        let colormap = self.settings.view.colormap;
        let heatmaps = &self.derived.heatmaps;
        self.token_strip.textures.truncate(heatmaps.len());
        for (index, heatmap) in heatmaps.iter().enumerate() {
            let rgb: Vec<u8> = heatmap
                .data
                .iter()
                .flat_map(|&value| colormap.rgb(value))
                .collect();
            let image = egui::ColorImage::from_rgb([heatmap.w, heatmap.h], &rgb);
            match self.token_strip.textures.get_mut(index) {
                Some(texture) => texture.set(image, egui::TextureOptions::LINEAR),
                None => self.token_strip.textures.push(ctx.load_texture(
                    format!("attend.thumbnail.{index}"),
                    image,
                    egui::TextureOptions::LINEAR,
                )),
            }
        }
        self.token_strip.key = Some(key);
    }

    /// The strip of word thumbnails.
    pub(crate) fn token_strip_ui(&mut self, ui: &mut egui::Ui) {
        self.update_thumbnails(ui.ctx());
        // Edit mode: the edited run's words, each with its weight slider.
        let edit_weights = self.shows_edited_run();
        let shown = if edit_weights {
            &self.edit.run
        } else {
            &self.run
        };
        let Some(run) = shown else {
            ui.label("Word heat maps appear here while the image is generated.");
            return;
        };
        if run.prompt.words.is_empty() {
            ui.label("The prompt has no words.");
            return;
        }
        let steps_shown = self
            .visible_steps()
            .map_or(0, |(first, last)| last + 1 - first);
        let mut clicked = None;
        egui::ScrollArea::horizontal()
            .id_salt("attend.token_strip")
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    for (index, word) in run.prompt.words.iter().enumerate() {
                        let selected = self.selected_word == Some(index) && !self.probe.enabled;
                        let texture = self.token_strip.textures.get(index);
                        let peak = self
                            .derived
                            .heatmaps
                            .get(index)
                            .map_or(0.0, |heatmap| heatmap.peak);
                        let button = match texture {
                            Some(texture) => egui::Button::image_and_text(
                                egui::Image::new((texture.id(), egui::Vec2::splat(THUMBNAIL_SIZE))),
                                word.text.as_str(),
                            ),
                            None => egui::Button::new(word.text.as_str()),
                        };
                        let hover = format!(
                            "{}: peak attention {peak:.4} (summed over {steps_shown} step(s))",
                            word.text
                        );
                        let response = if edit_weights {
                            ui.vertical(|ui| {
                                let response =
                                    ui.add(button.selected(selected)).on_hover_text(hover);
                                let first = !run.prompt.words[..index]
                                    .iter()
                                    .any(|other| other.text == word.text);
                                crate::ui::edit_mode::weight_slider(
                                    ui,
                                    &mut self.edit.settings.spec,
                                    &word.text,
                                    first,
                                );
                                response
                            })
                            .inner
                        } else {
                            ui.add(button.selected(selected)).on_hover_text(hover)
                        };
                        if response.clicked() {
                            clicked = Some(index);
                        }
                    }
                });
            });
        if let Some(index) = clicked {
            self.selected_word = Some(index);
            self.probe.enabled = false;
        }
    }
}
