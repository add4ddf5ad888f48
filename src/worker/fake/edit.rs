//! Edit mode of [`FakeEngine`]: synthetic but plausible Prompt-to-Prompt edits.
//!
//! The source is a normal fake run, recorded once per set of parameters. In the edited image a word
//! aligned to a source word keeps that word's place (as Prompt-to-Prompt keeps the layout), pulled
//! towards the edited word's own place as the cross window shrinks; swapped and added words get their
//! own colour; a reweight scales the word's blob (0 removes it). Local blend keeps the source image
//! outside the mask (the blend words' blobs, or the user's mask). Identical prompts give the source
//! image exactly.

use std::sync::Arc;
use std::time::Instant;

use crate::analysis::alignment::{
    align_prompts, selected_words, split_prompt_scope, word_token_indices, PromptLayout, WordChange,
};
use crate::hook::CancelToken;
use crate::worker::backend::{EditRunOutput, Engine as _, RunObserver};
use crate::worker::error::EngineError;
use crate::worker::fake::{
    blob_centre, blob_colour, cross_maps, fake_grids, gaussian, image::fade_in, mix, text_hash,
    tokenize, unit, FakeEngine, FakeRun,
};
use crate::worker::plain::{CrossGroup, RgbImage, StepCross};
use crate::worker::protocol::{
    BlendMask, Branch, EditInfo, EditSpec, GenerateParams, LocalBlendConfig, PromptInfo, StepFrame,
    StepTiming,
};

/// The recorded source of the fake's edits.
#[derive(Clone, Debug)]
pub(super) struct FakeEditSource {
    /// Resolved parameters of the source run.
    params: GenerateParams,
    /// The source run.
    run: FakeRun,
    /// Its final image.
    image: RgbImage,
}

/// One blob of the edited image.
pub(super) struct Blob {
    pub(super) centre: (f32, f32),
    pub(super) colour: [f32; 3],
    pub(super) strength: f32,
}

impl FakeEngine {
    /// [`crate::worker::Engine::generate_edit`] for the fake engine (see the module docs).
    pub(super) fn run_edit(
        &mut self,
        params: &GenerateParams,
        spec: Option<&EditSpec>,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<EditRunOutput, EngineError> {
        let Some(model) = &self.model else {
            return Err(EngineError::NoModel);
        };
        let resolved = self.resolve_run(params, model)?;
        let reusable = spec.is_some()
            && self
                .edit_source
                .as_ref()
                .is_some_and(|source| source.params == resolved);
        let mut source_output = None;
        if !reusable {
            self.edit_source = None;
            let output = self.generate(params, observer, cancel)?;
            let Some(run) = self.latest_run.clone() else {
                return Err(EngineError::Unavailable(
                    "the fake source run kept nothing".to_owned(),
                ));
            };
            self.source_recordings += 1;
            self.edit_source = Some(FakeEditSource {
                params: resolved.clone(),
                run,
                image: output.image.clone(),
            });
            observer.source_finished(&output)?;
            source_output = Some(output);
        }
        let Some(spec) = spec else {
            return Ok(EditRunOutput {
                source: source_output,
                edited: None,
                blend_mask: None,
            });
        };
        let Some(source) = self.edit_source.clone() else {
            return Err(EngineError::Unavailable(
                "the source recording is missing".to_owned(),
            ));
        };
        self.edited_branch(&source, &resolved, spec, reusable, observer, cancel)
            .map(|(image, blend_mask)| EditRunOutput {
                source: source_output,
                edited: Some(image),
                blend_mask,
            })
    }

    fn edited_branch(
        &self,
        source: &FakeEditSource,
        resolved: &GenerateParams,
        spec: &EditSpec,
        source_reused: bool,
        observer: &mut dyn RunObserver,
        cancel: &CancelToken,
    ) -> Result<(RgbImage, Option<BlendMask>), EngineError> {
        let started_at = Instant::now();
        let (height, width) = source.run.image_size;
        let edit_prompt = tokenize(&spec.edit_prompt);
        let length = 77;
        let alignment = align_prompts(
            &PromptLayout {
                tokens: &source.run.tokens,
                words: &source.run.words,
            },
            &PromptLayout {
                tokens: &edit_prompt.tokens,
                words: &edit_prompt.words,
            },
            length,
            spec.kind,
        )?;
        for reweight in &spec.reweights {
            if word_token_indices(&edit_prompt.words, &reweight.word).is_empty() {
                return Err(EngineError::InvalidArgument {
                    name: "reweight word",
                    reason: format!("{:?} is not a word of the edited prompt", reweight.word),
                });
            }
        }
        let edited_params = GenerateParams {
            prompt: spec.edit_prompt.clone(),
            ..resolved.clone()
        };
        let info = EditInfo {
            kind: alignment.kind,
            words: alignment.words.clone(),
            source_reused,
            source_recordings: self.source_recordings,
        };
        observer.started(
            Branch::Edited,
            &edited_params,
            edit_prompt.clone(),
            Some(info),
        )?;

        // Where each edited word's blob goes and how it looks.
        let cross = &spec.cross_window.default;
        let keep_layout = (cross.end - cross.start).clamp(0.0, 1.0) as f32;
        // Which blobs differ from the source (a swapped or added word, a reweight): the only ones
        // painted over a real image.
        let mut changed = Vec::with_capacity(edit_prompt.words.len());
        let blobs: Vec<Blob> = edit_prompt
            .words
            .iter()
            .enumerate()
            .map(|(index, word)| {
                let pair = alignment
                    .words
                    .iter()
                    .find(|pair| pair.edit_word == Some(index));
                let source_index = pair.and_then(|pair| pair.source_word);
                let own = blob_centre(resolved.seed, &word.text, index);
                let centre = match source_index.and_then(|i| source.run.centres.get(i)) {
                    Some(&from) => (
                        own.0 + (from.0 - own.0) * keep_layout,
                        own.1 + (from.1 - own.1) * keep_layout,
                    ),
                    None => own,
                };
                let same = pair.is_some_and(|pair| pair.change == WordChange::Same);
                let colour = match source_index {
                    Some(source_index) if same => blob_colour(source_index),
                    _ => blob_colour((text_hash(&word.text) % 6) as usize),
                };
                let strength = spec
                    .reweights
                    .iter()
                    .find(|reweight| reweight.word.eq_ignore_ascii_case(&word.text))
                    .map_or(1.0, |reweight| reweight.scale.max(0.0));
                changed.push(!same || strength != 1.0);
                Blob {
                    centre,
                    colour,
                    strength,
                }
            })
            .collect();
        let centres: Vec<(f32, f32)> = blobs.iter().map(|blob| blob.centre).collect();
        let word_count = edit_prompt.words.len();
        let grids = fake_grids(height, width);
        let steps = resolved.steps;
        let mut image = RgbImage::black(width, height);
        let mut last_mask = None;
        for step_index in 0..steps {
            let step_started = Instant::now();
            self.begin_step(cancel)?;
            let progress = (step_index + 1) as f32 / steps as f32;
            let sigma = 0.45 - 0.3 * progress;
            let groups = grids
                .iter()
                .map(|&(place, grid_h, grid_w, layer_count)| CrossGroup {
                    place,
                    h: grid_h,
                    w: grid_w,
                    layer_count,
                    token_count: word_count + 2,
                    data: cross_maps(&centres, sigma, word_count + 2, grid_h, grid_w),
                })
                .collect();
            image = match &source.run.background {
                Some(background) => {
                    let faded = fade_in(background, progress, resolved.seed);
                    paint_blobs(&faded, &blobs, &changed, sigma)
                }
                None => synthesise_blobs(&blobs, sigma, progress, resolved.seed, width, height),
            };
            let mask = spec.local_blend.as_ref().and_then(|blend| {
                blend
                    .is_active(step_index, steps)
                    .then(|| fake_blend_mask(blend, source, &edit_prompt, &centres, sigma))
            });
            if let Some(mask) = &mask {
                let source_now = source_preview(source, progress, resolved.seed);
                image = blend_images(&source_now, &image, mask);
                last_mask = Some(mask.clone());
            }
            let frame = StepFrame {
                step_index,
                step_count: steps,
                timestep: 1000.0 * (1.0 - step_index as f64 / steps as f64),
                preview: image.clone(),
                cross: Arc::new(StepCross { step_index, groups }),
                timing: StepTiming {
                    step_secs: step_started.elapsed().as_secs_f64(),
                    elapsed_secs: started_at.elapsed().as_secs_f64(),
                },
            };
            observer.step(Branch::Edited, frame, mask)?;
        }
        Ok((image, last_mask))
    }
}

/// The source image at `progress` (its final image at 1).
fn source_preview(source: &FakeEditSource, progress: f32, seed: u64) -> RgbImage {
    if progress >= 1.0 {
        return source.image.clone();
    }
    if let Some(background) = &source.run.background {
        return fade_in(background, progress, seed);
    }
    let (height, width) = source.run.image_size;
    let blobs: Vec<Blob> = source
        .run
        .centres
        .iter()
        .enumerate()
        .map(|(index, &centre)| Blob {
            centre,
            colour: blob_colour(index),
            strength: 1.0,
        })
        .collect();
    synthesise_blobs(&blobs, 0.45 - 0.3 * progress, progress, seed, width, height)
}

/// The blend mask at latent resolution (an eighth of the image): the blend words' blobs in either
/// prompt, or the user's mask.
fn fake_blend_mask(
    blend: &LocalBlendConfig,
    source: &FakeEditSource,
    edit_prompt: &PromptInfo,
    edit_centres: &[(f32, f32)],
    sigma: f32,
) -> BlendMask {
    let (height, width) = source.run.image_size;
    let (h, w) = ((height / 8).max(1), (width / 8).max(1));
    // The blend words' blob centres in both prompts (the same for every cell).
    let mut centres = Vec::new();
    for word in &blend.words {
        let (in_source, in_edit, selector) = split_prompt_scope(word);
        if in_source {
            for index in selected_words(&source.run.words, selector) {
                centres.extend(source.run.centres.get(index).copied());
            }
        }
        if in_edit {
            for index in selected_words(&edit_prompt.words, selector) {
                centres.extend(edit_centres.get(index).copied());
            }
        }
    }
    let mut data = vec![0.0f32; h * w];
    for (y, row) in data.chunks_mut(w).enumerate() {
        for (x, value) in row.iter_mut().enumerate() {
            let (fy, fx) = ((y as f32 + 0.5) / h as f32, (x as f32 + 0.5) / w as f32);
            let inside = match &blend.mask {
                Some(mask) if mask.h > 0 && mask.w > 0 => {
                    let my = ((fy * mask.h as f32) as usize).min(mask.h - 1);
                    let mx = ((fx * mask.w as f32) as usize).min(mask.w - 1);
                    mask.data.get(my * mask.w + mx).copied().unwrap_or(0.0) >= 0.5
                }
                _ => centres
                    .iter()
                    .any(|&centre| gaussian(fy, fx, centre, sigma.max(0.12)) > blend.threshold),
            };
            *value = if inside { 1.0 } else { 0.0 };
        }
    }
    BlendMask { h, w, data }
}

/// `x_src + mask * (x_edit - x_src)` on images, the mask resized by nearest neighbour.
fn blend_images(source: &RgbImage, edited: &RgbImage, mask: &BlendMask) -> RgbImage {
    let mut out = edited.clone();
    if source.width != edited.width || source.height != edited.height || mask.h == 0 || mask.w == 0
    {
        return out;
    }
    for y in 0..edited.height {
        let my = (y * mask.h / edited.height).min(mask.h - 1);
        for x in 0..edited.width {
            let mx = (x * mask.w / edited.width).min(mask.w - 1);
            if mask.data.get(my * mask.w + mx).copied().unwrap_or(0.0) < 0.5 {
                let pixel = (y * edited.width + x) * 3;
                out.pixels[pixel..pixel + 3].copy_from_slice(&source.pixels[pixel..pixel + 3]);
            }
        }
    }
    out
}

/// `base` with the blobs marked in `painted` drawn over it (their colour, weighted like the
/// fake's image formula).
fn paint_blobs(base: &RgbImage, blobs: &[Blob], painted: &[bool], sigma: f32) -> RgbImage {
    let mut image = base.clone();
    let (width, height) = (base.width, base.height);
    for y in 0..height {
        for x in 0..width {
            let (fy, fx) = (
                (y as f32 + 0.5) / height as f32,
                (x as f32 + 0.5) / width as f32,
            );
            let pixel = (y * width + x) * 3;
            let Some(values) = image.pixels.get_mut(pixel..pixel + 3) else {
                return image;
            };
            for (blob, _) in blobs.iter().zip(painted).filter(|(_, painted)| **painted) {
                let weight = (gaussian(fy, fx, blob.centre, sigma * 0.6) * blob.strength).min(1.0);
                for (value, paint) in values.iter_mut().zip(blob.colour) {
                    *value = (f32::from(*value) * (1.0 - weight) + paint * weight).clamp(0.0, 255.0)
                        as u8;
                }
            }
        }
    }
    image
}

/// The fake's image formula (`synthesise_image`) with a colour and a strength per blob; with the
/// source's colours and strength 1 it gives the same bytes.
pub(super) fn synthesise_blobs(
    blobs: &[Blob],
    sigma: f32,
    progress: f32,
    seed: u64,
    width: usize,
    height: usize,
) -> RgbImage {
    let mut image = RgbImage::black(width, height);
    let noise_amount = 1.0 - progress;
    for y in 0..height {
        for x in 0..width {
            let (fy, fx) = (
                (y as f32 + 0.5) / height as f32,
                (x as f32 + 0.5) / width as f32,
            );
            let mut colour = [40.0f32, 44.0, 52.0];
            for blob in blobs {
                let weight = (gaussian(fy, fx, blob.centre, sigma * 0.6) * blob.strength).min(1.0);
                for (value, paint) in colour.iter_mut().zip(blob.colour) {
                    *value = *value * (1.0 - weight) + paint * weight;
                }
            }
            let pixel = (y * width + x) * 3;
            for (channel, (out, value)) in image.pixels[pixel..pixel + 3]
                .iter_mut()
                .zip(colour)
                .enumerate()
            {
                let noise = unit(mix(seed ^ mix((pixel + channel) as u64))) * 255.0;
                *out =
                    (value * (1.0 - noise_amount) + noise * noise_amount).clamp(0.0, 255.0) as u8;
            }
        }
    }
    image
}
