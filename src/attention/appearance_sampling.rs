//! Appearance transfer with cross-image attention: the structure image's layout drawn with the
//! appearance image's look ([`CrossImageAttention`]).
//!
//! The run:
//! 1. inverts both images with edit-friendly DDPM inversion (`ddpm`, guidance 1, `steps` steps;
//!    the structure with `seed`, the appearance with `seed + 1`), so each replays exactly;
//! 2. segments both images (when masked AdaIN is on): one UNet pass of each image's inverted
//!    latent at the first AdaIN step, KMeans on its self-attention and labels from its prompt's
//!    nouns ([`segment_and_label`]); the labels found in both images pair their masks;
//! 3. denoises three rows after the skip (`skip_fraction` of the steps), as one UNet batch
//!    `[output, appearance, structure]`: the appearance and the structure replay their inversions;
//!    the output starts from the structure's latent with the structure's noise maps and prompt;
//! 4. in the mixing ranges, the output attends the appearance's keys and values in the decoder's
//!    two finest self-attention resolutions (the structure's on every fifth step before
//!    `structure_keys_until`), contrasted;
//! 5. in the swap-guidance range the batch holds the output twice (`[output, output plain,
//!    appearance, structure]`) and the output's noise is `eps_plain + s (eps_swap - eps_plain)`,
//!    `s` falling linearly from `swap_guidance_start` to `swap_guidance_end` over the range;
//! 6. after each step in the AdaIN range the output's latent is given, inside each structure mask,
//!    the appearance's statistics inside the matching mask ([`masked_adain`]).
//!
//! Every range is a fraction of `steps`, counted in steps after the skip (the reference counts
//! its 100-step schedule this way: mixing from step 10, AdaIN from 20, after a skip of 32).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::analysis::appearance::{AppearanceMasks, Correspondence, LabelledMask};
use crate::analysis::heatmap::{word_heatmaps, AggregationSettings, SelfAttentionSpan, UnetPlace};
use crate::analysis::image::{fit_image, ImageFit, RgbImage};
use crate::analysis::segment::{
    is_label_candidate, segment_and_label, segments_mask, LabelledSegmentation, MaskSettings,
    SegmentSettings, WordMapRef,
};
use crate::analysis::WordSpan;
use crate::attention::cross_image::{
    masked_adain, CrossImageAttention, CrossImageBatch, CrossImageStep, KeySource,
};
use crate::attention::store::{AttentionStore, StoreConfig};
use crate::hook::{AttentionProcessor, CancelToken, ChainedProcessors};
use crate::pipeline::inversion::{
    invert, replay_scheduler, Inversion, InversionMethod, InversionRequest,
};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::sampling::{
    decode_to_unit_range, encode_prompt_batch, guided_model_outputs, to_rgb8, DenoiseRow,
    DenoiseStep, RowRole,
};
use crate::pipeline::tokenizer::PromptTokens;
use crate::pipeline::{PipelineError, PipelineResult};

/// A part of the run, as fractions of the step count, counted in steps after the skip:
/// steps `l` with `start * steps <= l < end * steps` (rounded to the nearest step).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepFractionRange {
    /// First step, as a fraction of the steps.
    pub start: f64,
    /// End (exclusive), as a fraction of the steps.
    pub end: f64,
}

impl StepFractionRange {
    /// `start..end` as fractions.
    pub const fn new(start: f64, end: f64) -> Self {
        Self { start, end }
    }

    /// The range in steps after the skip, for a run of `steps` steps.
    pub fn steps(&self, steps: usize) -> std::ops::Range<usize> {
        let at = |fraction: f64| (fraction * steps as f64).round().max(0.0) as usize;
        at(self.start)..at(self.end)
    }

    fn validate(&self, name: &'static str) -> PipelineResult<()> {
        if !(self.start.is_finite()
            && self.end.is_finite()
            && (0.0..=1.0).contains(&self.start)
            && (0.0..=1.0).contains(&self.end))
        {
            return Err(PipelineError::InvalidArgument {
                name,
                reason: format!(
                    "{}..{} must be fractions of the steps in 0..1",
                    self.start, self.end
                ),
            });
        }
        Ok(())
    }
}

/// The settings of an appearance transfer; [`Default`] gives the reference's values as fractions
/// of the steps.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppearanceSettings {
    /// Steps of the inversions and of the run (the reference: 100). Default 32.
    pub steps: usize,
    /// Steps skipped before the output starts, as a fraction (the reference: 32 of 100).
    pub skip_fraction: f64,
    /// Attention contrast `c` of `clip((A - 1/K) c + 1/K, 0, 1)` (the reference: 1.67; 1: none).
    pub contrast: f64,
    /// Swap guidance scale at the start of its range (the reference: 3.5; 1: no swap guidance).
    pub swap_guidance_start: f64,
    /// Swap guidance scale at the end of its range (the reference: half the start, 1.75).
    pub swap_guidance_end: f64,
    /// Masked AdaIN of the output's latent (the reference: on).
    pub adain: bool,
    /// Cross-image attention at all (off: the output only replays the structure, with swap
    /// guidance having nothing to guide).
    pub mixing: bool,
    /// Where the finest decoder resolution mixes (the reference: 10..90 of 100 at 64x64).
    pub fine_range: StepFractionRange,
    /// Where the second finest decoder resolution mixes (the reference: 10..70 at 32x32).
    pub coarse_range: StepFractionRange,
    /// The output attends the structure's keys and values on every `structure_keys_every`-th
    /// step (counted after the skip) before this fraction (the reference: every 5th before 40).
    pub structure_keys_until: f64,
    /// Period of the structure's keys (the reference: 5; 0: never).
    pub structure_keys_every: usize,
    /// Where swap guidance applies (the reference: 10..90).
    pub swap_guidance_range: StepFractionRange,
    /// Where masked AdaIN applies, after each step (the reference: 20..100); the masks are made
    /// at its first step.
    pub adain_range: StepFractionRange,
}

impl Default for AppearanceSettings {
    fn default() -> Self {
        Self {
            // 32 rather than the reference's 100: measured fully right on drawn pairs at 32 and at
            // 50 steps, and 32 keeps a transfer on the bundled model under 30 s on two cores.
            steps: 32,
            skip_fraction: 0.32,
            contrast: 1.67,
            swap_guidance_start: 3.5,
            swap_guidance_end: 1.75,
            adain: true,
            mixing: true,
            fine_range: StepFractionRange::new(0.10, 0.90),
            coarse_range: StepFractionRange::new(0.10, 0.70),
            structure_keys_until: 0.40,
            structure_keys_every: 5,
            swap_guidance_range: StepFractionRange::new(0.10, 0.90),
            adain_range: StepFractionRange::new(0.20, 1.0),
        }
    }
}

/// Most steps of a transfer.
pub const MAX_APPEARANCE_STEPS: usize = 1000;

impl AppearanceSettings {
    /// Checks every value's range.
    pub fn validate(&self) -> PipelineResult<()> {
        let invalid =
            |name: &'static str, reason: String| PipelineError::InvalidArgument { name, reason };
        if !(2..=MAX_APPEARANCE_STEPS).contains(&self.steps) {
            return Err(invalid(
                "steps",
                format!("{} is outside 2..={MAX_APPEARANCE_STEPS}", self.steps),
            ));
        }
        if !(self.skip_fraction.is_finite() && (0.0..1.0).contains(&self.skip_fraction)) {
            return Err(invalid(
                "skip",
                format!(
                    "{} must be a fraction of the steps in 0..1 (below 1)",
                    self.skip_fraction
                ),
            ));
        }
        if !(self.contrast.is_finite() && (0.0..=100.0).contains(&self.contrast)) {
            return Err(invalid(
                "contrast",
                format!("{} is not a number in 0..100", self.contrast),
            ));
        }
        for (name, value) in [
            ("swap guidance start", self.swap_guidance_start),
            ("swap guidance end", self.swap_guidance_end),
        ] {
            if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
                return Err(invalid(name, format!("{value} is not a number in 0..100")));
            }
        }
        if !(self.structure_keys_until.is_finite()
            && (0.0..=1.0).contains(&self.structure_keys_until))
        {
            return Err(invalid(
                "structure keys until",
                format!("{} is not a fraction in 0..1", self.structure_keys_until),
            ));
        }
        self.fine_range.validate("fine mixing range")?;
        self.coarse_range.validate("coarse mixing range")?;
        self.swap_guidance_range.validate("swap guidance range")?;
        self.adain_range.validate("AdaIN range")?;
        Ok(())
    }

    /// The first step of the output (steps skipped).
    pub fn skip_steps(&self) -> usize {
        ((self.skip_fraction * self.steps as f64).round() as usize).min(self.steps - 1)
    }

    /// The swap guidance scale at step `loop_step` after the skip (1 outside its range).
    pub fn swap_guidance_at(&self, loop_step: usize) -> f64 {
        let range = self.swap_guidance_range.steps(self.steps);
        let loop_steps = self.steps - self.skip_steps();
        let end = range.end.min(loop_steps);
        if !self.mixing || loop_step < range.start || loop_step >= end {
            return 1.0;
        }
        let span = end - range.start;
        if span <= 1 {
            return self.swap_guidance_start;
        }
        let t = (loop_step - range.start) as f64 / (span - 1) as f64;
        self.swap_guidance_start + (self.swap_guidance_end - self.swap_guidance_start) * t
    }
}

/// What to transfer.
#[derive(Clone, Debug)]
pub struct AppearanceTransferRequest {
    /// The image whose layout the output keeps, already fitted to a size the model accepts.
    pub structure: RgbImage,
    /// A description of the structure image (its nouns name the masks).
    pub structure_prompt: String,
    /// The image whose look the output takes; fitted (cropped) to the structure's size when it
    /// differs.
    pub appearance: RgbImage,
    /// A description of the appearance image.
    pub appearance_prompt: String,
    /// The settings.
    pub settings: AppearanceSettings,
    /// Seed of the inversions' noise draws (structure `seed`, appearance `seed + 1`).
    pub seed: u64,
}

/// Sent after every step.
#[derive(Clone, Debug)]
pub struct AppearanceStepReport {
    /// The step just finished, 0-based, counted from the first step of the whole schedule (the
    /// first one run is the skip).
    pub step_index: usize,
    /// Steps of the schedule.
    pub step_count: usize,
    /// The output's latent after the step, `[1, channels, h, w]` f32.
    pub output_latent: Tensor,
}

/// The result of a transfer: plain data only.
#[derive(Clone, Debug)]
pub struct AppearanceTransferOutput {
    /// The structure drawn with the appearance's look.
    pub output: RgbImage,
    /// The structure image as its replay gives it back.
    pub structure_reconstruction: RgbImage,
    /// The appearance image as its replay gives it back.
    pub appearance_reconstruction: RgbImage,
    /// The masks the AdaIN matched, per label.
    pub masks: AppearanceMasks,
    /// Where the output's pixels attended in the appearance image.
    pub correspondence: Correspondence,
    /// Seconds of the two inversions and the segmentation.
    pub preparation_seconds: f64,
    /// Things the user should know (prompt truncation, the appearance refitted, ...).
    pub warnings: Vec<String>,
}

/// The masks of the matched labels at latent resolution, `[h * w]` each.
struct LatentMaskPair {
    structure: Vec<f32>,
    appearance: Vec<f32>,
}

/// Rows of the run.
const OUTPUT: usize = 0;
const APPEARANCE: usize = 1;
const STRUCTURE: usize = 2;

/// A transfer run one step at a time: [`AppearanceTransferRun::new`] inverts and segments,
/// [`AppearanceTransferRun::step`] runs one step, [`AppearanceTransferRun::finish`] decodes.
pub struct AppearanceTransferRun<'model> {
    model: &'model StableDiffusion,
    settings: AppearanceSettings,
    processor: CrossImageAttention,
    /// `[structure prompt, appearance prompt, structure prompt]`: `[3, tokens, dim]`.
    text_embeddings: Tensor,
    /// Output, appearance, structure.
    rows: Vec<DenoiseRow>,
    timesteps: Vec<f64>,
    next_step: usize,
    masks: AppearanceMasks,
    latent_masks: Vec<LatentMaskPair>,
    image_size_px: (usize, usize),
    cancel: CancelToken,
    preparation_seconds: f64,
    warnings: Vec<String>,
}

impl<'model> AppearanceTransferRun<'model> {
    /// Checks `request`, inverts both images, segments them (AdaIN on) and prepares the rows.
    /// `cancel` is checked before every UNet call.
    pub fn new(
        model: &'model StableDiffusion,
        request: &AppearanceTransferRequest,
        cancel: &CancelToken,
    ) -> PipelineResult<Self> {
        let started = Instant::now();
        let settings = request.settings.clone();
        settings.validate()?;
        for (name, prompt) in [
            ("structure prompt", &request.structure_prompt),
            ("appearance prompt", &request.appearance_prompt),
        ] {
            if prompt.trim().is_empty() {
                return Err(PipelineError::InvalidArgument {
                    name,
                    reason: "is empty; describe the image (its nouns name the parts to match)"
                        .to_string(),
                });
            }
        }
        let structure = &request.structure;
        if !structure.is_consistent() || structure.width == 0 || structure.height == 0 {
            return Err(PipelineError::InvalidArgument {
                name: "structure image",
                reason: format!(
                    "a {}x{} image with {} bytes",
                    structure.width,
                    structure.height,
                    structure.pixels.len()
                ),
            });
        }
        let mut warnings = Vec::new();
        let appearance = if (request.appearance.width, request.appearance.height)
            == (structure.width, structure.height)
        {
            request.appearance.clone()
        } else {
            warnings.push(format!(
                "the appearance image ({}x{}) was fitted to the structure's size {}x{} (crop)",
                request.appearance.width,
                request.appearance.height,
                structure.width,
                structure.height
            ));
            fit_image(
                &request.appearance,
                structure.width,
                structure.height,
                ImageFit::Crop,
            )
            .map_err(|error| PipelineError::InvalidArgument {
                name: "appearance image",
                reason: error.to_string(),
            })?
            .image
        };
        let invert_one = |image: &RgbImage, prompt: &str, seed: u64| {
            invert(
                model,
                image,
                &InversionRequest {
                    prompt: prompt.to_string(),
                    method: InversionMethod::Ddpm,
                    steps: settings.steps,
                    guidance: 1.0,
                    seed,
                },
                &mut |_| Ok(()),
                cancel,
            )
        };
        let structure_inversion = invert_one(structure, &request.structure_prompt, request.seed)?;
        let appearance_inversion = invert_one(
            &appearance,
            &request.appearance_prompt,
            request.seed.wrapping_add(1),
        )?;
        let structure_tokens = model.tokenizer.encode_prompt(&request.structure_prompt)?;
        let appearance_tokens = model.tokenizer.encode_prompt(&request.appearance_prompt)?;
        for (which, tokens) in [
            ("structure prompt", &structure_tokens),
            ("appearance prompt", &appearance_tokens),
        ] {
            warnings.extend(tokens.warning().map(|warning| format!("{which} {warning}")));
        }
        let negative = model.tokenizer.encode_prompt("")?;
        let text_embeddings = encode_prompt_batch(
            model,
            &[&structure_tokens, &appearance_tokens, &structure_tokens],
            &negative,
            false,
        )?;
        let steps = settings.steps;
        let skip = settings.skip_steps();
        let timesteps = structure_inversion.timesteps.clone();
        let image_size_px = (structure.width, structure.height);
        let (masks, latent_masks) = if settings.adain {
            let mask_step = (skip + settings.adain_range.steps(steps).start).min(steps - 1);
            segment_pair(
                model,
                [&structure_inversion, &appearance_inversion],
                [&structure_tokens, &appearance_tokens],
                &text_embeddings,
                mask_step,
                image_size_px,
                cancel,
            )?
        } else {
            (AppearanceMasks::default(), Vec::new())
        };
        let start_latents = |inversion: &Inversion| -> PipelineResult<Tensor> {
            Ok(inversion
                .trajectory
                .get(steps - skip)?
                .to_device(model.device())?
                .to_dtype(DType::F32)?)
        };
        let row = |inversion: &Arc<Inversion>| -> PipelineResult<DenoiseRow> {
            Ok(DenoiseRow {
                latents: start_latents(inversion)?,
                scheduler: replay_scheduler(&model.scheduler_config, inversion, RowRole::Source)?,
                rng: NoiseRng::new(request.seed),
            })
        };
        let rows = vec![
            row(&structure_inversion)?,
            row(&appearance_inversion)?,
            row(&structure_inversion)?,
        ];
        let processor = CrossImageAttention::new(model.unet.config(), settings.contrast);
        if settings.mixing && !processor.can_mix() {
            warnings.push(
                "the model's decoder has no self-attention: nothing to mix, the output replays \
                 the structure"
                    .to_string(),
            );
        }
        Ok(Self {
            model,
            settings,
            processor,
            text_embeddings,
            rows,
            timesteps,
            next_step: skip,
            masks,
            latent_masks,
            image_size_px,
            cancel: cancel.clone(),
            preparation_seconds: started.elapsed().as_secs_f64(),
            warnings,
        })
    }

    /// The masks the AdaIN uses (empty with AdaIN off).
    pub fn masks(&self) -> &AppearanceMasks {
        &self.masks
    }

    /// Steps of the schedule (the first [`AppearanceSettings::skip_steps`] are not run).
    pub fn step_count(&self) -> usize {
        self.timesteps.len()
    }

    /// The output's correspondence so far.
    pub fn correspondence(&self) -> PipelineResult<Correspondence> {
        let (width, height) = self.image_size_px;
        Ok(self.processor.correspondence(height, width)?)
    }

    /// What the processor does at step `loop_step` after the skip.
    fn plan(&self, loop_step: usize, plain_output: bool) -> Option<CrossImageStep> {
        let settings = &self.settings;
        if !settings.mixing {
            return None;
        }
        let steps = settings.steps;
        let mix_fine = settings.fine_range.steps(steps).contains(&loop_step);
        let mix_coarse = settings.coarse_range.steps(steps).contains(&loop_step);
        if !mix_fine && !mix_coarse {
            return None;
        }
        let until = (settings.structure_keys_until * steps as f64).round() as usize;
        let keys_from = if settings.structure_keys_every > 0
            && loop_step < until
            && loop_step.is_multiple_of(settings.structure_keys_every)
        {
            KeySource::Structure
        } else {
            KeySource::Appearance
        };
        Some(CrossImageStep {
            batch: CrossImageBatch::new(plain_output),
            mix_fine,
            mix_coarse,
            keys_from,
        })
    }

    /// Runs the next step; `None` once every step has run. `cancel` is checked in every
    /// attention layer.
    pub fn step(&mut self) -> PipelineResult<Option<AppearanceStepReport>> {
        let step_index = self.next_step;
        let Some(&timestep) = self.timesteps.get(step_index) else {
            return Ok(None);
        };
        if self.cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let loop_step = step_index - self.settings.skip_steps();
        let scale = self.settings.swap_guidance_at(loop_step);
        let mut plan = self.plan(loop_step, false);
        #[allow(clippy::float_cmp)]
        let guided = plan.is_some() && scale != 1.0;
        if guided {
            plan = self.plan(loop_step, true);
        }
        self.processor.set_step(plan);
        let mut inputs = Vec::with_capacity(4);
        for row in &self.rows {
            inputs.push(row.scheduler.scale_model_input(&row.latents, step_index)?);
        }
        let embeddings = if guided {
            inputs.insert(1, inputs[OUTPUT].clone());
            let index = Tensor::new(&[0u32, 0, 1, 2], self.text_embeddings.device())?;
            self.text_embeddings.index_select(&index, 0)?
        } else {
            self.text_embeddings.clone()
        };
        let step = DenoiseStep {
            step_index,
            step_count: self.timesteps.len(),
            timestep,
            guidance: 1.0,
            guided: false,
            cancel: Some(self.cancel.clone()),
            unconditional: None,
        };
        let processor: Option<&mut dyn AttentionProcessor> = if plan.is_some() {
            Some(&mut self.processor)
        } else {
            None
        };
        let mut outputs = guided_model_outputs(self.model, &inputs, &step, &embeddings, processor)?;
        self.processor.set_step(None);
        if guided {
            let plain = outputs.remove(1);
            let swapped = outputs[OUTPUT].clone();
            outputs[OUTPUT] = (&plain + (swapped - &plain)?.affine(scale, 0.0)?)?;
        }
        for (row, output) in self.rows.iter_mut().zip(outputs) {
            row.latents = row
                .scheduler
                .step(&output, step_index, &row.latents, &mut row.rng)?;
        }
        if self.settings.adain
            && self
                .settings
                .adain_range
                .steps(self.settings.steps)
                .contains(&loop_step)
        {
            let mut output = self.rows[OUTPUT].latents.clone();
            for pair in &self.latent_masks {
                output = masked_adain(
                    &output,
                    &self.rows[APPEARANCE].latents,
                    &pair.structure,
                    &pair.appearance,
                )?;
            }
            self.rows[OUTPUT].latents = output;
        }
        if !crate::pipeline::sampling::all_finite(&self.rows[OUTPUT].latents)? {
            return Err(PipelineError::NonFinite {
                what: format!("the output's latents at step {}", step_index + 1),
                step_index: Some(step_index),
                hint: "lower the contrast or the swap guidance".to_string(),
            });
        }
        self.next_step += 1;
        Ok(Some(AppearanceStepReport {
            step_index,
            step_count: self.timesteps.len(),
            output_latent: self.rows[OUTPUT].latents.clone(),
        }))
    }

    /// Decodes the three images (after the last step; earlier, the latents so far).
    pub fn finish(self) -> PipelineResult<AppearanceTransferOutput> {
        let decode = |row: usize| -> PipelineResult<RgbImage> {
            to_rgb8(&decode_to_unit_range(self.model, &self.rows[row].latents)?)
        };
        let (width, height) = self.image_size_px;
        Ok(AppearanceTransferOutput {
            output: decode(OUTPUT)?,
            structure_reconstruction: decode(STRUCTURE)?,
            appearance_reconstruction: decode(APPEARANCE)?,
            correspondence: self.processor.correspondence(height, width)?,
            masks: self.masks,
            preparation_seconds: self.preparation_seconds,
            warnings: self.warnings,
        })
    }
}

/// Runs a whole transfer, `on_step` after every step.
pub fn transfer_appearance(
    model: &StableDiffusion,
    request: &AppearanceTransferRequest,
    on_step: &mut dyn FnMut(&AppearanceStepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<AppearanceTransferOutput> {
    let mut run = AppearanceTransferRun::new(model, request, cancel)?;
    while let Some(report) = run.step()? {
        on_step(&report)?;
    }
    run.finish()
}

/// Segments both images from one UNet pass of their inverted latents at `step_index`
/// (`[structure, appearance]`, each with its own prompt) and pairs the masks of the labels found
/// in both: `(image-resolution masks, latent-resolution masks)`.
fn segment_pair(
    model: &StableDiffusion,
    inversions: [&Inversion; 2],
    tokens: [&PromptTokens; 2],
    text_embeddings: &Tensor,
    step_index: usize,
    (width, height): (usize, usize),
    cancel: &CancelToken,
) -> PipelineResult<(AppearanceMasks, Vec<LatentMaskPair>)> {
    let steps = inversions[0].timesteps.len();
    let latents: Vec<Tensor> = inversions
        .iter()
        .map(|inversion| {
            Ok(inversion
                .trajectory
                .get(steps - step_index)?
                .to_device(model.device())?
                .to_dtype(DType::F32)?)
        })
        .collect::<PipelineResult<_>>()?;
    let mut stores: Vec<AttentionStore> = tokens
        .iter()
        .enumerate()
        .map(|(item, tokens)| {
            AttentionStore::new(StoreConfig {
                batch_item: item,
                ..StoreConfig::new(tokens.token_count())
            })
        })
        .collect();
    let step = DenoiseStep {
        step_index,
        step_count: steps,
        timestep: inversions[0].timesteps[step_index],
        guidance: 1.0,
        guided: false,
        cancel: Some(cancel.clone()),
        unconditional: None,
    };
    // `[structure, appearance]` prompts: the first two of the run's embeddings.
    let embeddings = text_embeddings.narrow(0, 0, 2)?;
    {
        let (first, second) = stores.split_at_mut(1);
        let mut chain = ChainedProcessors::new(vec![&mut first[0], &mut second[0]]);
        guided_model_outputs(model, &latents, &step, &embeddings, Some(&mut chain))?;
    }
    let mut segmentations = Vec::with_capacity(2);
    for (store, tokens) in stores.iter_mut().zip(tokens) {
        store.finish_step()?;
        segmentations.push(segment_image(store, &tokens.words, height, width)?);
    }
    let (latent_h, latent_w) = (latents[0].dim(2)?, latents[0].dim(3)?);
    let mut masks = AppearanceMasks::default();
    let mut latent_masks = Vec::new();
    let mut labels: Vec<&str> = segmentations[0]
        .segments
        .iter()
        .map(|segment| segment.label.as_str())
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let settings = MaskSettings::default();
    for label in labels {
        let ids = |segmentation: &LabelledSegmentation| -> Vec<usize> {
            segmentation
                .segments
                .iter()
                .filter(|segment| segment.label == label)
                .map(|segment| segment.id)
                .collect()
        };
        let structure_ids = ids(&segmentations[0]);
        let appearance_ids = ids(&segmentations[1]);
        if appearance_ids.is_empty() {
            continue;
        }
        let structure_latent = segments_mask(
            &segmentations[0].grid,
            &structure_ids,
            latent_h,
            latent_w,
            &settings,
        );
        let appearance_latent = segments_mask(
            &segmentations[1].grid,
            &appearance_ids,
            latent_h,
            latent_w,
            &settings,
        );
        if structure_latent.covered_pixels() == 0 || appearance_latent.covered_pixels() == 0 {
            continue;
        }
        masks.structure.push(LabelledMask {
            label: label.to_string(),
            mask: segmentations[0].mask(&structure_ids, &settings),
        });
        masks.appearance.push(LabelledMask {
            label: label.to_string(),
            mask: segmentations[1].mask(&appearance_ids, &settings),
        });
        latent_masks.push(LatentMaskPair {
            structure: structure_latent.data,
            appearance: appearance_latent.data,
        });
    }
    Ok((masks, latent_masks))
}

/// KMeans segmentation of one image's stored attention (self-attention at the largest kept grid,
/// down and up blocks) labelled with its prompt's nouns (every word when none can name a thing).
fn segment_image(
    store: &AttentionStore,
    words: &[WordSpan],
    height: usize,
    width: usize,
) -> PipelineResult<LabelledSegmentation> {
    let unavailable = |reason: String| PipelineError::InvalidArgument {
        name: "segmentation",
        reason,
    };
    let (grid_h, grid_w) = store
        .self_attention_resolutions()
        .into_iter()
        .max_by_key(|(h, w)| h * w)
        .ok_or_else(|| {
            unavailable(
                "the model kept no self-attention to segment the images with; turn AdaIN off"
                    .to_string(),
            )
        })?;
    let map = store
        .self_attention(
            grid_h,
            grid_w,
            &[UnetPlace::Down, UnetPlace::Up],
            SelfAttentionSpan::LatestStep,
        )
        .ok_or_else(|| unavailable(format!("no self-attention at {grid_h}x{grid_w}")))?;
    let candidates: Vec<WordSpan> = words
        .iter()
        .filter(|word| is_label_candidate(&word.text))
        .cloned()
        .collect();
    let label_words = if candidates.is_empty() {
        words
    } else {
        &candidates
    };
    let heatmaps = word_heatmaps(
        store.steps(),
        label_words,
        &AggregationSettings::default(),
        height,
        width,
    );
    let word_maps: Vec<WordMapRef<'_>> = heatmaps.iter().map(WordMapRef::from).collect();
    segment_and_label(
        &[map],
        &word_maps,
        &SegmentSettings::default(),
        height,
        width,
    )
    .map_err(|error| unavailable(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ranges_follow_the_reference_at_100_steps() {
        let settings = AppearanceSettings {
            steps: 100,
            ..AppearanceSettings::default()
        };
        settings.validate().unwrap();
        assert_eq!(settings.skip_steps(), 32);
        assert_eq!(settings.fine_range.steps(100), 10..90);
        assert_eq!(settings.swap_guidance_at(9), 1.0);
        assert!((settings.swap_guidance_at(10) - 3.5).abs() < 1e-12);
        // 68 steps after the skip: the guided range ends with the run.
        assert!((settings.swap_guidance_at(67) - 1.75).abs() < 1e-12);
        let bad = AppearanceSettings {
            skip_fraction: 1.0,
            ..AppearanceSettings::default()
        };
        assert!(bad.validate().is_err());
    }
}
