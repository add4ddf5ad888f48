//! The token strip: one live thumbnail per prompt word. Click one to show its heat map on the canvas;
//! hover for its peak value. In edit mode, showing the edited run (or the source before an edit
//! ran, while the edited prompt is the source prompt), each word has a weight slider. A word weighted
//! by the prompt syntax (`(word:1.3)`) shows its weight after it.

use crate::analysis::colormap::Colormap;
use crate::analysis::prompt_syntax::format_weight;
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::edit::spec::{word_weight, WEIGHT_RANGE};
use crate::ui::state::CanvasView;

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

    /// Redraws the thumbnails when the heat maps or the colormap changed.
    fn update_thumbnails(&mut self, ctx: &ViewContext<'_>, egui_ctx: &egui::Context) {
        let derived = &ctx.state.derived;
        let colormap = ctx.state.settings.view.colormap;
        let key = (derived.version, colormap);
        if self.key == Some(key) {
            return;
        }
        self.textures.truncate(derived.heatmaps.len());
        for (index, heatmap) in derived.heatmaps.iter().enumerate() {
            let rgb: Vec<u8> = heatmap
                .data
                .iter()
                .flat_map(|&value| colormap.rgb(value))
                .collect();
            let image = egui::ColorImage::from_rgb([heatmap.w, heatmap.h], &rgb);
            match self.textures.get_mut(index) {
                Some(texture) => texture.set(image, egui::TextureOptions::LINEAR),
                None => self.textures.push(egui_ctx.load_texture(
                    format!("attend.thumbnail.{index}"),
                    image,
                    egui::TextureOptions::LINEAR,
                )),
            }
        }
        self.key = Some(key);
    }
}

/// The strip of word thumbnails.
pub(crate) fn token_strip_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    strip: &mut TokenStrip,
    commands: &mut UiCommands,
) {
    strip.update_thumbnails(ctx, ui.ctx());
    let state = ctx.state;
    let Some(run) = state.shown_run() else {
        ui.label("Word heat maps appear here while the image is generated.");
        return;
    };
    // Edit mode: the edited run's words, each with its weight slider; before an edit ran, the
    // source's words while the edited prompt is still the source prompt (a weight is then the
    // edit).
    let edit = &state.modes.edit;
    let edit_weights = state.shows_edited_run()
        || (edit.enabled()
            && edit.run().is_none()
            && edit.spec().edit_prompt.trim() == run.params.prompt.trim());
    if run.prompt.words.is_empty() {
        ui.label("The prompt has no words.");
        return;
    }
    let steps_shown = state
        .visible_steps()
        .map_or(0, |(first, last)| last + 1 - first);
    let probing = state.canvas_view == CanvasView::Probe;
    // The prompt syntax's weights (`(word:1.3)`), shown after the word when not 1.
    let syntax_weights = crate::analysis::prompt_syntax::parse_prompt(&run.params.prompt)
        .map(|parsed| parsed.source.word_weights(&run.prompt.words))
        .unwrap_or_default();
    egui::ScrollArea::horizontal()
        .id_salt("attend.token_strip")
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                for (index, word) in run.prompt.words.iter().enumerate() {
                    let selected = state.selected_word == Some(index) && !probing;
                    let peak = state
                        .derived
                        .heatmaps
                        .get(index)
                        .map_or(0.0, |heatmap| heatmap.peak);
                    let syntax_weight = syntax_weights
                        .get(index)
                        .copied()
                        .filter(|&weight| weight != 1.0);
                    let label = match syntax_weight {
                        Some(weight) => format!("{} x{}", word.text, format_weight(weight)),
                        None => word.text.clone(),
                    };
                    let button = match strip.textures.get(index) {
                        Some(texture) => egui::Button::image_and_text(
                            egui::Image::new((texture.id(), egui::Vec2::splat(THUMBNAIL_SIZE))),
                            label,
                        ),
                        None => egui::Button::new(label),
                    };
                    let mut hover = format!(
                        "{}: peak attention {peak:.4} (summed over {steps_shown} step(s))",
                        word.text
                    );
                    if let Some(weight) = syntax_weight {
                        hover.push_str(&format!(
                            "; prompt weight {} (its cross-attention is scaled by it)",
                            format_weight(weight)
                        ));
                    }
                    let response = if edit_weights {
                        ui.vertical(|ui| {
                            let response = ui.add(button.selected(selected)).on_hover_text(hover);
                            // A word's weight applies to all its occurrences: the first has the
                            // slider.
                            let first = !run.prompt.words[..index]
                                .iter()
                                .any(|other| other.text == word.text);
                            let weight = word_weight(state.modes.edit.spec(), &word.text);
                            if let Some(weight) = weight_slider_ui(ui, &word.text, weight, first) {
                                commands.push(UiCommand::SetWordWeight {
                                    word: word.text.clone(),
                                    weight,
                                });
                            }
                            response
                        })
                        .inner
                    } else {
                        ui.add(button.selected(selected)).on_hover_text(hover)
                    };
                    if response.clicked() {
                        commands.push(UiCommand::SelectWord(index));
                    }
                }
            });
        });
}

/// A weight slider for `word` (range [`WEIGHT_RANGE`], 1 = no change), labelled "Weight of <word>";
/// returns the new weight when it was moved. Only the first occurrence (`first`) gets the slider;
/// the others show the value.
fn weight_slider_ui(ui: &mut egui::Ui, word: &str, weight: f32, first: bool) -> Option<f32> {
    if !first {
        ui.weak(format!("weight {weight:.1}"))
            .on_hover_text("Set by the first occurrence of the word");
        return None;
    }
    let mut weight = weight;
    ui.spacing_mut().slider_width = 56.0;
    let response = ui
        .add(
            egui::Slider::new(&mut weight, WEIGHT_RANGE)
                .fixed_decimals(1)
                .step_by(0.1),
        )
        .on_hover_text(format!(
            "Weight of \"{word}\" in the edited prompt's attention: 1 = unchanged, 0 = removed, \
             negative = inverted"
        ));
    let label = format!("Weight of {word}");
    response.widget_info(|| egui::WidgetInfo::slider(true, f64::from(weight), &label));
    response.changed().then_some(weight)
}
