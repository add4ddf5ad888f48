//! Exports: the UI builds plain data (pixels, heat maps, session JSON) and the worker writes the
//! files atomically through [`crate::analysis::export`]. Each export chosen in a dialog becomes one
//! worker [`Command`] (or a warning saying why there is nothing to write).

use std::path::{Path, PathBuf};

use crate::analysis::colormap::overlay;
use crate::analysis::export::{a1111_parameters, GenerationParameters};
use crate::analysis::heatmap::{resize_bilinear, word_heatmaps};
use crate::ui::dialogs::DialogPurpose;
use crate::ui::heatmap_renderer::{CanvasHeat, CanvasImage};
use crate::ui::session::{Session, SESSION_FORMAT};
use crate::ui::state::AppState;
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

/// What the exports read: the shared state and what the canvas shows.
pub(crate) struct ExportSources<'a> {
    /// The shared state (runs, heat maps, settings).
    pub(crate) state: &'a AppState,
    /// The image on the canvas.
    pub(crate) image: Option<&'a CanvasImage>,
    /// The heat grid on the canvas (version 0: none).
    pub(crate) heat: &'a CanvasHeat,
}

/// The worker command writing the export `purpose` chose at `path` (not the segmentation exports),
/// or why there is nothing to write.
pub(crate) fn export_command(
    sources: &ExportSources<'_>,
    purpose: &DialogPurpose,
    path: PathBuf,
) -> Result<Command, &'static str> {
    match purpose {
        DialogPurpose::ExportImage => export_image(sources, path),
        DialogPurpose::ExportHeatmapOverImage => export_heatmap(sources, path, true),
        DialogPurpose::ExportHeatmapAlone => export_heatmap(sources, path, false),
        DialogPurpose::ExportAllHeatmaps => export_all_heatmaps(sources, &path),
        DialogPurpose::ExportAttention => export_attention(sources.state, path),
        DialogPurpose::SaveSession => Ok(Command::ExportText {
            path,
            text: current_session(sources.state).to_json(),
        }),
        _ => Err("Not an export"),
    }
}

/// The default file name of a dialog (`word`: the selected word's heat map).
pub(crate) fn default_file_name(state: &AppState, purpose: &DialogPurpose) -> String {
    let seed = state.source_params().seed;
    let word = state
        .selected_word
        .and_then(|index| state.derived.heatmaps.get(index))
        .map_or_else(
            || "heatmap".to_owned(),
            |heatmap| sanitize_file_stem(&heatmap.word),
        );
    match purpose {
        DialogPurpose::SaveSession => format!("attend-{seed}.session.json"),
        DialogPurpose::ExportAttention => format!("attend-{seed}.attention.safetensors"),
        DialogPurpose::ExportHeatmapOverImage => format!("attend-{seed}-{word}-over.png"),
        DialogPurpose::ExportHeatmapAlone => format!("attend-{seed}-{word}.png"),
        _ => format!("attend-{seed}.png"),
    }
}

/// A word made safe for a file name (letters, digits, `-`, `_`).
pub(crate) fn sanitize_file_stem(text: &str) -> String {
    let stem: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() {
        "word".to_owned()
    } else {
        stem
    }
}

/// The image on the canvas, as plain RGB.
fn shown_image(image: Option<&CanvasImage>) -> Option<RgbImage> {
    let image = image?;
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
fn parameters_text(sources: &ExportSources<'_>) -> Option<String> {
    let state = sources.state;
    let params = &state.run.as_ref()?.params;
    let model = state
        .model
        .loaded
        .as_ref()
        .map_or_else(String::new, |info| info.name.clone());
    let scheduler = params.scheduler.clone().unwrap_or_default();
    let image = sources.image;
    Some(a1111_parameters(&GenerationParameters {
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        steps: params.steps,
        sampler: a1111_sampler_name(&scheduler),
        cfg_scale: params.guidance as f32,
        seed: params.seed,
        width: image.map_or(0, |image| image.width as usize),
        height: image.map_or(0, |image| image.height as usize),
        model,
        extra: vec![("Generator".to_owned(), "attend".to_owned())],
    }))
}

/// The image shown (with its generation parameters) as PNG.
fn export_image(sources: &ExportSources<'_>, path: PathBuf) -> Result<Command, &'static str> {
    let image = shown_image(sources.image).ok_or("There is no image to export yet")?;
    Ok(Command::ExportPngs {
        files: vec![PngExport {
            path,
            image,
            parameters: parameters_text(sources),
        }],
    })
}

/// A heat grid upsampled to the image's size and colour-mapped (over the image or alone).
fn heatmap_rgb(
    sources: &ExportSources<'_>,
    grid: &[f32],
    grid_h: usize,
    grid_w: usize,
    over_image: bool,
) -> Option<RgbImage> {
    let image = shown_image(sources.image)?;
    let view = &sources.state.settings.view;
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

/// The heat map on the canvas as PNG, blended over the image or alone.
fn export_heatmap(
    sources: &ExportSources<'_>,
    path: PathBuf,
    over_image: bool,
) -> Result<Command, &'static str> {
    let heat = sources.heat;
    if heat.version == 0 {
        return Err("No heat map is shown");
    }
    let image = heatmap_rgb(
        sources,
        &heat.values,
        heat.height as usize,
        heat.width as usize,
        over_image,
    )
    .ok_or("There is no image to export yet")?;
    Ok(Command::ExportPngs {
        files: vec![PngExport {
            path,
            image,
            parameters: parameters_text(sources),
        }],
    })
}

/// One PNG per word into `folder` (`NN-word.png`, colour-mapped at image size).
fn export_all_heatmaps(
    sources: &ExportSources<'_>,
    folder: &Path,
) -> Result<Command, &'static str> {
    let files: Vec<PngExport> = sources
        .state
        .derived
        .heatmaps
        .iter()
        .enumerate()
        .filter_map(|(index, heatmap)| {
            let image = heatmap_rgb(sources, &heatmap.data, heatmap.h, heatmap.w, false)?;
            Some(PngExport {
                path: folder.join(format!(
                    "{index:02}-{}.png",
                    sanitize_file_stem(&heatmap.word)
                )),
                image,
                parameters: None,
            })
        })
        .collect();
    if files.is_empty() {
        return Err("There are no word heat maps to export yet");
    }
    Ok(Command::ExportPngs { files })
}

/// The raw attention maps of the finished run and the word heat maps (at image size, with the
/// aggregation settings on screen) as safetensors.
fn export_attention(state: &AppState, path: PathBuf) -> Result<Command, &'static str> {
    let run = state.run.as_ref().ok_or("There is no run to export")?;
    let (height, width) = run
        .final_image
        .as_ref()
        .map_or(state.derived.grid, |image| (image.height, image.width));
    let last_step = run.cross.len().saturating_sub(1);
    let settings = state.settings.aggregation.to_settings(0..=last_step);
    let word_heatmaps = word_heatmaps(
        &run.cross_copies(),
        &run.prompt.words,
        &settings,
        height,
        width,
    );
    Ok(Command::ExportAttention {
        run_id: run.run_id,
        path,
        word_heatmaps,
    })
}

/// The session of what is on screen: the run's resolved parameters, or the panel's.
pub(crate) fn current_session(state: &AppState) -> Session {
    Session {
        format: SESSION_FORMAT.to_owned(),
        model: state
            .model
            .loaded
            .as_ref()
            .map_or_else(|| state.settings.model.clone(), |info| info.source.clone()),
        products: state.settings.products,
        params: state.source_params().clone(),
        view: state.settings.view.clone(),
        aggregation: state.settings.aggregation.clone(),
        selected_word: state.selected_word,
        edit: state.modes.edit.to_session(),
        image: crate::ui::image_input::SessionImage::of(&state.image),
    }
}
