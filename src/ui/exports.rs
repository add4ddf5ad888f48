//! Exports: the UI builds plain data (pixels, heat maps, session JSON) and the worker writes the
//! files atomically through [`crate::analysis::export`].

use std::path::{Path, PathBuf};

use crate::analysis::colormap::overlay;
use crate::analysis::export::{a1111_parameters, GenerationParameters};
use crate::analysis::heatmap::{resize_bilinear, word_heatmaps};
use crate::ui::app::{sanitize_file_stem, EditorApp, StatusLevel};
use crate::ui::session::{Session, SESSION_FORMAT};
use crate::worker::{Command, PngExport, RgbImage};

/// A1111's name for a scheduler (its "Sampler" field).
fn a1111_sampler_name(scheduler: &str) -> String {
    match scheduler {
        "ddim" => "DDIM".to_owned(),
        "euler" => "Euler".to_owned(),
        "euler-a" => "Euler a".to_owned(),
        "dpmpp-2m" => "DPM++ 2M".to_owned(),
        other => other.to_owned(),
    }
}

impl EditorApp {
    /// The image on the canvas, as plain RGB.
    fn shown_image(&self) -> Option<RgbImage> {
        let image = self.canvas.image()?;
        Some(RgbImage {
            width: image.width as usize,
            height: image.height as usize,
            pixels: image
                .rgba
                .chunks_exact(4)
                .flat_map(|pixel| [pixel[0], pixel[1], pixel[2]])
                .collect(),
        })
    }

    /// The A1111 `parameters` text of the run on screen.
    fn parameters_text(&self) -> Option<String> {
        let run = self.run.as_ref()?;
        let params = &run.params;
        let model = self
            .model
            .loaded
            .as_ref()
            .map_or_else(String::new, |info| info.name.clone());
        let scheduler = params.scheduler.clone().unwrap_or_default();
        let image = self.shown_image();
        Some(a1111_parameters(&GenerationParameters {
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            steps: params.steps,
            sampler: a1111_sampler_name(&scheduler),
            cfg_scale: params.guidance as f32,
            seed: params.seed,
            width: image.as_ref().map_or(0, |image| image.width),
            height: image.as_ref().map_or(0, |image| image.height),
            model,
            extra: vec![("Generator".to_owned(), "attend".to_owned())],
        }))
    }

    fn send_export(&mut self, command: Command) {
        if let Err(error) = self.worker.send(command) {
            self.push_status(StatusLevel::Error, format!("Cannot export: {error}"));
        }
    }

    /// Writes the image shown (with its generation parameters) as PNG.
    pub(crate) fn export_image(&mut self, path: PathBuf) {
        let Some(image) = self.shown_image() else {
            self.push_status(StatusLevel::Warning, "There is no image to export yet");
            return;
        };
        let parameters = self.parameters_text();
        self.send_export(Command::ExportPngs {
            files: vec![PngExport {
                path,
                image,
                parameters,
            }],
        });
    }

    /// The heat grid shown, upsampled to the image's size and colour-mapped (over the image or alone).
    fn heatmap_rgb(
        &self,
        grid: &[f32],
        grid_h: usize,
        grid_w: usize,
        over_image: bool,
    ) -> Option<RgbImage> {
        let image = self.shown_image()?;
        let view = &self.settings.view;
        let heat = resize_bilinear(grid, grid_h, grid_w, image.height, image.width);
        let pixels = if over_image {
            overlay(
                &image.pixels,
                image.width,
                image.height,
                &heat,
                view.colormap,
                view.opacity,
                view.threshold,
            )
        } else {
            heat.iter()
                .flat_map(|&value| view.colormap.rgb(value))
                .collect()
        };
        Some(RgbImage {
            width: image.width,
            height: image.height,
            pixels,
        })
    }

    /// Writes the heat map on the canvas as PNG, blended over the image or alone.
    pub(crate) fn export_heatmap(&mut self, path: PathBuf, over_image: bool) {
        let heat = self.canvas.heat();
        if heat.version == 0 {
            self.push_status(StatusLevel::Warning, "No heat map is shown");
            return;
        }
        let (grid, grid_h, grid_w) = (
            heat.values.clone(),
            heat.height as usize,
            heat.width as usize,
        );
        let Some(image) = self.heatmap_rgb(&grid, grid_h, grid_w, over_image) else {
            self.push_status(StatusLevel::Warning, "There is no image to export yet");
            return;
        };
        let parameters = self.parameters_text();
        self.send_export(Command::ExportPngs {
            files: vec![PngExport {
                path,
                image,
                parameters,
            }],
        });
    }

    /// Writes one PNG per word into `folder` (`NN-word.png`, colour-mapped at image size).
    pub(crate) fn export_all_heatmaps(&mut self, folder: &Path) {
        let mut files = Vec::new();
        for (index, heatmap) in self.derived.heatmaps.iter().enumerate() {
            let Some(image) = self.heatmap_rgb(&heatmap.data, heatmap.h, heatmap.w, false) else {
                continue;
            };
            files.push(PngExport {
                path: folder.join(format!(
                    "{index:02}-{}.png",
                    sanitize_file_stem(&heatmap.word)
                )),
                image,
                parameters: None,
            });
        }
        if files.is_empty() {
            self.push_status(
                StatusLevel::Warning,
                "There are no word heat maps to export yet",
            );
            return;
        }
        self.send_export(Command::ExportPngs { files });
    }

    /// Writes the raw attention maps of the finished run and the word heat maps (at image size, with
    /// the aggregation settings on screen) as safetensors.
    pub(crate) fn export_attention(&mut self, path: PathBuf) {
        let Some(run) = &self.run else {
            self.push_status(StatusLevel::Warning, "There is no run to export");
            return;
        };
        let (height, width) = run
            .final_image
            .as_ref()
            .map_or(self.derived.grid, |image| (image.height, image.width));
        let last_step = run.cross.len().saturating_sub(1);
        let settings = self.settings.aggregation.to_settings(0..=last_step);
        let word_heatmaps = word_heatmaps(&run.cross, &run.prompt.words, &settings, height, width);
        let command = Command::ExportAttention {
            run_id: run.run_id,
            path,
            word_heatmaps,
        };
        self.send_export(command);
    }

    /// The session of what is on screen: the run's resolved parameters, or the panel's.
    pub fn current_session(&self) -> Session {
        Session {
            format: SESSION_FORMAT.to_owned(),
            model: self
                .model
                .loaded
                .as_ref()
                .map_or_else(|| self.settings.model.clone(), |info| info.source.clone()),
            params: self
                .run
                .as_ref()
                .map_or_else(|| self.settings.params.clone(), |run| run.params.clone()),
            view: self.settings.view.clone(),
            aggregation: self.settings.aggregation.clone(),
            selected_word: self.selected_word,
            edit: self.edit_session(),
        }
    }

    /// Writes the session JSON.
    pub(crate) fn save_session(&mut self, path: PathBuf) {
        let text = self.current_session().to_json();
        self.send_export(Command::ExportText { path, text });
    }
}
