//! Appearance transfer in [`FakeEngine`]: a deterministic stand-in for cross-image attention.
//!
//! Each image's pixels are "object" when their colour is far from the colour of the image's top
//! left corner (its background), "background" otherwise. Every output query cell (an 8th of the
//! image a side) attends to the nearest appearance cell of its own kind; the output takes, pixel by
//! pixel, the appearance's colours from the cell its query attends to, so the structure's shapes
//! come out in the appearance's colours. Each output step is one gated step fading noise into that
//! result; the masks are the object and background pixels of each image, labelled with the last
//! label-worthy word of its prompt.

use std::sync::Arc;
use std::time::Instant;

use crate::analysis::appearance::{AppearanceMasks, Correspondence, LabelledMask};
use crate::analysis::segment::{is_label_candidate, Mask};
use crate::analysis::{plain_words, WordSpan};
use crate::hook::CancelToken;
use crate::worker::appearance::{
    check_appearance_params, fit_input, AppearanceInput, AppearanceResult, AppearanceSlot,
    AppearanceTransferParams, AppearanceUpdate,
};
use crate::worker::backend::RunObserver;
use crate::worker::error::EngineError;
use crate::worker::fake::{blob_centre, image::fade_in, synthesise_image, FakeEngine};
use crate::worker::plain::RgbImage;
use crate::worker::protocol::StepTiming;

/// Query cells per side are the image's size divided by this (the finest grid of a latent model).
const FAKE_CELL_PX: usize = 8;
/// A pixel is an object's when its colour differs from the background's by more than this (sum
/// of the channels' absolute differences).
const OBJECT_COLOUR_DISTANCE: u32 = 60;
/// The label of the background masks.
const BACKGROUND_LABEL: &str = "background";

impl FakeEngine {
    /// [`crate::worker::Engine::appearance_transfer`] for the fake engine (see the module docs).
    pub(super) fn transfer_appearance(
        &mut self,
        params: &AppearanceTransferParams,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<AppearanceResult, EngineError> {
        let started_at = Instant::now();
        check_appearance_params(params)?;
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        let size_px = (model.default_width_px, model.default_height_px);
        let mut inputs = Vec::with_capacity(2);
        for (slot, input, prompt, seed) in [
            (
                AppearanceSlot::Structure,
                &params.structure,
                &params.structure_prompt,
                params.seed,
            ),
            (
                AppearanceSlot::Appearance,
                &params.appearance,
                &params.appearance_prompt,
                params.seed.wrapping_add(1),
            ),
        ] {
            let image = match input {
                AppearanceInput::Image(image) => fit_input(slot, image, size_px, params.fit)?,
                AppearanceInput::Generate => {
                    observer.appearance(AppearanceUpdate::Progress {
                        phase: format!("generating the {} image", slot.name()),
                        elapsed_secs: started_at.elapsed().as_secs_f64(),
                    })?;
                    generated_image(prompt, seed, size_px)
                }
            };
            inputs.push(image);
        }
        let appearance = inputs.pop().unwrap_or_default();
        let structure = inputs.pop().unwrap_or_default();
        observer.appearance(AppearanceUpdate::Inputs {
            structure: structure.clone(),
            appearance: appearance.clone(),
        })?;
        for slot in AppearanceSlot::BOTH {
            if cancel.is_cancelled() {
                return Err(EngineError::Cancelled);
            }
            observer.appearance(AppearanceUpdate::Progress {
                phase: format!("inverting the {} image", slot.name()),
                elapsed_secs: started_at.elapsed().as_secs_f64(),
            })?;
        }
        let correspondence = correspondence(&structure, &appearance);
        let output = transferred(&structure, &appearance, &correspondence);
        let step_count = params.settings.steps - params.settings.skip_steps();
        for step_index in 0..step_count {
            let step_started = Instant::now();
            self.begin_step(cancel)?;
            let progress = (step_index + 1) as f32 / step_count as f32;
            observer.appearance(AppearanceUpdate::Step {
                step_index,
                step_count,
                preview: fade_in(&output, progress, params.seed),
                timing: StepTiming {
                    step_secs: step_started.elapsed().as_secs_f64(),
                    elapsed_secs: started_at.elapsed().as_secs_f64(),
                },
            })?;
        }
        let masks = if params.settings.adain {
            AppearanceMasks {
                structure: labelled_masks(&structure, &params.structure_prompt),
                appearance: labelled_masks(&appearance, &params.appearance_prompt),
            }
        } else {
            AppearanceMasks::default()
        };
        Ok(AppearanceResult {
            output,
            structure_reconstruction: structure,
            appearance_reconstruction: appearance,
            masks,
            correspondence: Arc::new(correspondence),
            seconds: started_at.elapsed().as_secs_f64(),
            warnings: Vec::new(),
        })
    }
}

/// The fake's picture of `prompt`: one blob per word, as a finished fake run draws it.
fn generated_image(prompt: &str, seed: u64, size_px: (usize, usize)) -> RgbImage {
    let centres: Vec<(f32, f32)> = plain_words(prompt)
        .enumerate()
        .map(|(index, word)| blob_centre(seed, &word, index))
        .collect();
    synthesise_image(&centres, 0.15, 1.0, seed, size_px.0, size_px.1)
}

/// Per pixel: does it belong to an object (its colour far from the top-left corner's)?
fn object_pixels(image: &RgbImage) -> Vec<bool> {
    let background: [u8; 3] = image
        .pixels
        .get(..3)
        .and_then(|corner| corner.try_into().ok())
        .unwrap_or_default();
    image
        .pixels
        .chunks_exact(3)
        .map(|pixel| {
            let distance: u32 = pixel
                .iter()
                .zip(&background)
                .map(|(&a, &b)| u32::from(a.abs_diff(b)))
                .sum();
            distance > OBJECT_COLOUR_DISTANCE
        })
        .collect()
}

/// Per cell of a `grid_h x grid_w` grid over the image: is most of it object?
fn object_cells(image: &RgbImage, grid_h: usize, grid_w: usize) -> Vec<bool> {
    let objects = object_pixels(image);
    let mut counts = vec![(0usize, 0usize); grid_h * grid_w];
    for (index, &object) in objects.iter().enumerate() {
        let (y, x) = (index / image.width, index % image.width);
        let cell = (y * grid_h / image.height) * grid_w + x * grid_w / image.width;
        counts[cell].0 += usize::from(object);
        counts[cell].1 += 1;
    }
    counts
        .iter()
        .map(|&(object, total)| 2 * object > total)
        .collect()
}

/// Each output query attends to the nearest appearance cell of its own kind (object or background):
/// most of its attention there, a little spread over every cell of that kind.
fn correspondence(structure: &RgbImage, appearance: &RgbImage) -> Correspondence {
    let grid_h = (structure.height / FAKE_CELL_PX).max(1);
    let grid_w = (structure.width / FAKE_CELL_PX).max(1);
    let cells = grid_h * grid_w;
    let structure_kind = object_cells(structure, grid_h, grid_w);
    let appearance_kind = object_cells(appearance, grid_h, grid_w);
    let mut top_key = Vec::with_capacity(cells);
    let mut maps = vec![0.0f32; cells * cells];
    for query in 0..cells {
        let (qy, qx) = ((query / grid_w) as f32, (query % grid_w) as f32);
        let kind = structure_kind[query];
        let same_kind: Vec<usize> = (0..cells)
            .filter(|&key| appearance_kind[key] == kind)
            .collect();
        let candidates = if same_kind.is_empty() {
            (0..cells).collect()
        } else {
            same_kind
        };
        let distance = |key: usize| {
            let (ky, kx) = ((key / grid_w) as f32, (key % grid_w) as f32);
            (ky - qy).powi(2) + (kx - qx).powi(2)
        };
        let nearest = candidates
            .iter()
            .copied()
            .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
            .unwrap_or(query);
        top_key.push(nearest as u32);
        let row = &mut maps[query * cells..(query + 1) * cells];
        let spread = 0.4 / candidates.len() as f32;
        for &key in &candidates {
            row[key] = spread;
        }
        row[nearest] += 0.6;
    }
    Correspondence {
        grid_h,
        grid_w,
        image_h: structure.height,
        image_w: structure.width,
        top_key,
        map_h: grid_h,
        map_w: grid_w,
        maps,
        layer_calls: 1,
    }
}

/// The output: each pixel takes the appearance's pixel at the same place inside the cell its query
/// attends to most.
fn transferred(
    structure: &RgbImage,
    appearance: &RgbImage,
    correspondence: &Correspondence,
) -> RgbImage {
    let (width, height) = (structure.width, structure.height);
    let (grid_h, grid_w) = (correspondence.grid_h, correspondence.grid_w);
    let mut output = RgbImage::black(width, height);
    for y in 0..height {
        for x in 0..width {
            let (cell_y, cell_x) = (y * grid_h / height, x * grid_w / width);
            let key = correspondence.top_key[cell_y * grid_w + cell_x] as usize;
            let (key_y, key_x) = (key / grid_w, key % grid_w);
            let source_y = (key_y * height / grid_h + y - cell_y * height / grid_h).min(height - 1);
            let source_x = (key_x * width / grid_w + x - cell_x * width / grid_w).min(width - 1);
            let from = (source_y * appearance.width + source_x) * 3;
            let to = (y * width + x) * 3;
            output.pixels[to..to + 3].copy_from_slice(&appearance.pixels[from..from + 3]);
        }
    }
    output
}

/// The object and background masks of `image`, the object's labelled with the last label-worthy
/// word of `prompt` (no masks when the prompt has none).
fn labelled_masks(image: &RgbImage, prompt: &str) -> Vec<LabelledMask> {
    let words: Vec<WordSpan> = plain_words(prompt)
        .map(|text| WordSpan {
            text,
            token_indices: Vec::new(),
        })
        .collect();
    let Some(label) = words
        .iter()
        .rev()
        .find(|word| is_label_candidate(&word.text))
    else {
        return Vec::new();
    };
    let objects = object_pixels(image);
    let mask_of = |object: bool| Mask {
        h: image.height,
        w: image.width,
        data: objects
            .iter()
            .map(|&is_object| if is_object == object { 1.0 } else { 0.0 })
            .collect(),
    };
    vec![
        LabelledMask {
            label: label.text.clone(),
            mask: mask_of(true),
        },
        LabelledMask {
            label: BACKGROUND_LABEL.to_owned(),
            mask: mask_of(false),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `size` x `size` image of `background` with a `colour` square over `rect` (y0, x0, y1, x1).
    fn picture(
        size: usize,
        background: [u8; 3],
        colour: [u8; 3],
        rect: (usize, usize, usize, usize),
    ) -> RgbImage {
        let mut image = RgbImage::black(size, size);
        for y in 0..size {
            for x in 0..size {
                let inside = (rect.0..rect.2).contains(&y) && (rect.1..rect.3).contains(&x);
                let rgb = if inside { colour } else { background };
                image.pixels[(y * size + x) * 3..(y * size + x) * 3 + 3].copy_from_slice(&rgb);
            }
        }
        image
    }

    #[test]
    fn the_output_keeps_the_structures_shape_in_the_appearances_colours() {
        let structure = picture(32, [200, 200, 200], [200, 30, 30], (8, 8, 24, 24));
        let appearance = picture(32, [20, 20, 90], [40, 200, 40], (16, 16, 32, 32));
        let correspondence = correspondence(&structure, &appearance);
        let output = transferred(&structure, &appearance, &correspondence);
        let at = |image: &RgbImage, y: usize, x: usize| {
            image.pixels[(y * image.width + x) * 3..(y * image.width + x) * 3 + 3].to_vec()
        };
        // The structure's square (in the middle) is green, its background dark blue.
        assert_eq!(at(&output, 12, 12), vec![40, 200, 40]);
        assert_eq!(at(&output, 28, 28), vec![20, 20, 90]);
        // The square's queries attend inside the appearance's square.
        let query = correspondence.query_at_pixel(12, 12).unwrap();
        let (y, x) = correspondence.top_pixel_for(query).unwrap();
        assert!(y >= 16 && x >= 16, "top match at {y}, {x}");
        let masks = labelled_masks(&structure, "a red square");
        assert_eq!(masks[0].label, "square");
        assert_eq!(masks[0].mask.covered_pixels(), 16 * 16);
        assert_eq!(masks[1].mask.covered_pixels(), 32 * 32 - 16 * 16);
    }
}
