//! The style set above the canvas: the grid of images (filling in step by step; click one to put
//! it on screen) and, side by side, the reference's and the selected image's word heat maps over
//! all the steps received.

use crate::analysis::colormap::Colormap;
use crate::analysis::heatmap::{word_heatmaps, AggregationSettings, Heatmap};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::run_view::RunView;
use crate::ui::style_set::StyleSetCommand;
use crate::worker::RgbImage;

/// Side of a grid image, in points.
const GRID_IMAGE_SIZE: f32 = 112.0;
/// Side of a word map, in points.
const WORD_MAP_SIZE: f32 = 48.0;

/// What a texture was drawn from: run, image, steps received, finished.
type ImageKey = (u64, usize, usize, bool);

/// The grid's and the word maps' textures.
#[derive(Default)]
pub(crate) struct StyleSetView {
    /// Per image of the set: its texture and what it shows.
    images: Vec<Option<(ImageKey, egui::TextureHandle)>>,
    /// Per side (reference, selected): the word maps.
    maps: [Option<WordMaps>; 2],
}

/// One image's word maps and what they were drawn from.
struct WordMaps {
    /// The image.
    key: ImageKey,
    /// The colormap they were drawn with.
    colormap: Colormap,
    /// Per word: the word and its map.
    textures: Vec<(String, egui::TextureHandle)>,
}

/// The latest image of `run`: the final image once finished, else the latest preview.
fn latest_image(run: &RunView) -> Option<&RgbImage> {
    run.final_image
        .as_ref()
        .or_else(|| run.steps.last().map(|step| &step.preview))
}

/// What `run`'s textures are drawn from.
fn image_key(run: &RunView, index: usize) -> ImageKey {
    (
        run.run_id,
        index,
        run.steps.len(),
        run.final_image.is_some(),
    )
}

/// An egui image of `image`.
fn color_image(image: &RgbImage) -> egui::ColorImage {
    egui::ColorImage::from_rgb([image.width, image.height], &image.pixels)
}

/// `run`'s word heat maps over every step received (the aggregation's places and resolutions).
fn run_word_heatmaps(ctx: &ViewContext<'_>, run: &RunView) -> Vec<Heatmap> {
    let Some(last) = run.cross.len().checked_sub(1) else {
        return Vec::new();
    };
    let grid = run.cross_grids().first().copied().unwrap_or((1, 1));
    let settings = ctx.state.settings.aggregation.to_settings(0..=last);
    match run.summed_cross(0, last) {
        Some(summed) => word_heatmaps(
            std::slice::from_ref(summed.as_ref()),
            &run.prompt.words,
            &AggregationSettings {
                steps: 0..=usize::MAX,
                ..settings
            },
            grid.0,
            grid.1,
        ),
        None => word_heatmaps(
            &run.cross_copies(),
            &run.prompt.words,
            &settings,
            grid.0,
            grid.1,
        ),
    }
}

impl StyleSetView {
    /// Redraws the textures of images that changed.
    fn update_images(&mut self, ctx: &ViewContext<'_>, egui_ctx: &egui::Context) {
        let style = &ctx.state.modes.style_set;
        self.images.resize_with(style.images().len(), || None);
        self.images.truncate(style.images().len());
        for (index, slot) in self.images.iter_mut().enumerate() {
            let Some(run) = style.image(index) else {
                *slot = None;
                continue;
            };
            let key = image_key(run, index);
            if slot.as_ref().is_some_and(|(have, _)| *have == key) {
                continue;
            }
            let Some(image) = latest_image(run).filter(|image| image.width > 0) else {
                continue;
            };
            let texture = egui_ctx.load_texture(
                format!("attend.style_set.image.{index}"),
                color_image(image),
                egui::TextureOptions::LINEAR,
            );
            *slot = Some((key, texture));
        }
    }

    /// Redraws the word maps of `side` (0: reference, 1: selected) when its image changed.
    fn update_maps(
        &mut self,
        ctx: &ViewContext<'_>,
        egui_ctx: &egui::Context,
        side: usize,
        index: usize,
    ) {
        let style = &ctx.state.modes.style_set;
        let Some(run) = style.image(index) else {
            self.maps[side] = None;
            return;
        };
        let key = image_key(run, index);
        let colormap = ctx.state.settings.view.colormap;
        if self.maps[side]
            .as_ref()
            .is_some_and(|maps| maps.key == key && maps.colormap == colormap)
        {
            return;
        }
        let textures = run_word_heatmaps(ctx, run)
            .into_iter()
            .enumerate()
            .map(|(word, heatmap)| {
                let rgb: Vec<u8> = heatmap
                    .data
                    .iter()
                    .flat_map(|&value| colormap.rgb(value))
                    .collect();
                let texture = egui_ctx.load_texture(
                    format!("attend.style_set.map.{side}.{word}"),
                    egui::ColorImage::from_rgb([heatmap.w, heatmap.h], &rgb),
                    egui::TextureOptions::LINEAR,
                );
                (heatmap.word, texture)
            })
            .collect();
        self.maps[side] = Some(WordMaps {
            key,
            colormap,
            textures,
        });
    }
}

/// The grid of the set's images and the side-by-side word maps (style set mode, above the
/// canvas).
pub(crate) fn style_set_grid_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    view: &mut StyleSetView,
    commands: &mut UiCommands,
) {
    let style = &ctx.state.modes.style_set;
    if style.images().is_empty() {
        ui.label("Add target prompts in the panel on the left, then Run set.");
        ui.separator();
        return;
    }
    view.update_images(ctx, ui.ctx());
    let selected = style.selected();
    egui::ScrollArea::horizontal()
        .id_salt("attend.style_set.grid")
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                for index in 0..style.images().len() {
                    let caption = match index {
                        0 => "Reference".to_owned(),
                        _ => format!("Target {index}"),
                    };
                    ui.vertical(|ui| {
                        let size = egui::vec2(GRID_IMAGE_SIZE, GRID_IMAGE_SIZE);
                        let response = match view.images.get(index).and_then(Option::as_ref) {
                            Some((_, texture)) => ui.add(
                                egui::Button::image(egui::Image::new((texture.id(), size)))
                                    .selected(index == selected),
                            ),
                            None => ui.add_sized(size, egui::Button::new("...")),
                        };
                        let prompt = style
                            .image(index)
                            .map_or_else(String::new, |run| run.params.prompt.clone());
                        if response.on_hover_text(&prompt).clicked() {
                            commands.push(UiCommand::StyleSet(StyleSetCommand::Select(index)));
                        }
                        if ui.selectable_label(index == selected, &caption).clicked() {
                            commands.push(UiCommand::StyleSet(StyleSetCommand::Select(index)));
                        }
                    });
                }
            });
        });
    view.update_maps(ctx, ui.ctx(), 0, 0);
    view.update_maps(ctx, ui.ctx(), 1, selected);
    let sides: &[(usize, String)] = &[
        (0, "Reference word maps".to_owned()),
        (
            1,
            match selected {
                0 => "Selected: the reference".to_owned(),
                index => format!("Target {index} word maps"),
            },
        ),
    ];
    ui.columns(2, |columns| {
        for ((side, title), column) in sides.iter().zip(columns.iter_mut()) {
            column.strong(title);
            let Some(maps) = &view.maps[*side] else {
                column.weak("(no steps yet)");
                continue;
            };
            // Rows of as many maps as the column holds (nested vertical layouts do not wrap in a
            // wrapped row, so a long prompt's maps would run into the other column).
            let gap = column.spacing().item_spacing.x;
            let per_row = ((column.available_width() + gap) / (WORD_MAP_SIZE + gap)).floor();
            let per_row = (per_row as usize).max(1);
            for row in maps.textures.chunks(per_row) {
                column.horizontal(|ui| {
                    for (word, texture) in row {
                        ui.allocate_ui(egui::vec2(WORD_MAP_SIZE, WORD_MAP_SIZE + 16.0), |ui| {
                            ui.vertical(|ui| {
                                ui.set_max_width(WORD_MAP_SIZE);
                                ui.image((texture.id(), egui::vec2(WORD_MAP_SIZE, WORD_MAP_SIZE)));
                                ui.add(
                                    egui::Label::new(egui::RichText::new(word).small()).truncate(),
                                );
                            });
                        });
                    }
                });
            }
        }
    });
    ui.separator();
}
