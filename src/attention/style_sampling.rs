//! Style Aligned sampling: a reference prompt and N target prompts denoised as one UNet batch
//! (`[uncond_ref, uncond_1.., cond_ref, cond_1..]` with guidance), the targets sharing the
//! reference's self-attention and group norm statistics ([`StyleAligned`]).
//!
//! **Noise**: every row has its own seed: the reference `seed` (or the request's initial noise),
//! target `i` (1-based, in prompt order) `seed + i`. So the reference row is exactly what
//! `attend generate --seed S` draws and target `i` what `attend generate --seed S+i` draws, and
//! a set run without sharing ([`StyleSetRequest::sharing`] `None`) is the independent baseline
//! (the reference code draws one latent per image from one generator; seeds per row keep each
//! image reproducible on its own).
//!
//! Each row keeps its own scheduler and noise generator (see [`DenoiseRow`]), as the
//! Prompt-to-Prompt batch does. Observers (attention stores) see the whole batch; an
//! [`crate::attention::store::AttentionStore`] with `batch_item = i` records image `i` (0: the
//! reference). The self-attention layers that share are computed by the processor and show no
//! probabilities to observers (keep stores' self-attention off).
//!
//! **Reference from an image** ([`StyleSetRequest::reference_image`], made by
//! [`invert_reference_image`]): the image is inverted with DDIM at guidance 2 (the reference
//! code's choice) and the reference row follows that trajectory: it starts from `z*_T` and after
//! every step its latents are replaced by the trajectory's at that step's destination, so the
//! reference row's self-attention (which the targets share) is the image's at every step. The
//! reference code starts five steps down the trajectory; attend starts at its top so that every
//! step of the set, the first included, sees the image (a documented simplification). The run
//! uses the trajectory's DDIM timesteps.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::analysis::image::RgbImage;
use crate::attention::style_aligned::{StyleAligned, StyleAlignedConfig};
use crate::hook::{AttentionProcessor, CancelToken, ChainedProcessors};
use crate::pipeline::inversion::{ddim_trajectory_with_guidance, InversionProgress};
use crate::pipeline::limits::{
    available_memory, check_run_fits, estimate_style_set_memory, AvailableMemory, ModelFootprint,
    RunCapture,
};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::sampling::{
    decode_to_unit_range, denoise_step, encode_prompt_batch, initial_noise, prepare_run,
    run_to_end, to_rgb8, validate_request, DenoiseRow, DenoiseStep, GenerateOutput,
    GenerateRequest, PreparedRun, StepwiseRun,
};
use crate::pipeline::scheduler::SchedulerKind;
use crate::pipeline::tokenizer::PromptTokens;
use crate::pipeline::{PipelineError, PipelineResult};

/// Most target prompts of one set (the batch grows with each; memory is checked too).
pub const MAX_TARGETS: usize = 64;

/// The guidance a reference image is inverted with (the reference code's DDIM inversion).
pub const REFERENCE_INVERSION_GUIDANCE: f64 = 2.0;

/// A real image as a set's reference: its DDIM trajectory, which the reference row follows.
#[derive(Clone, Debug)]
pub struct StyleReferenceImage {
    /// The image as inverted (fitted to the run's size).
    pub image: RgbImage,
    /// The prompt it was inverted with (a description of it; the reference row's prompt).
    pub prompt: String,
    /// The classifier-free guidance of the inversion.
    pub inversion_guidance: f64,
    /// The DDIM timesteps of the run, in sampling order, one per step.
    pub timesteps: Vec<f64>,
    /// `z*_0` (the image's latents) to `z*_T`, `[steps + 1, 1, c, h, w]` f32.
    pub trajectory: Tensor,
}

impl StyleReferenceImage {
    /// Steps of the trajectory (a set that follows it runs as many).
    pub fn step_count(&self) -> usize {
        self.timesteps.len()
    }

    /// Where the reference row starts, `z*_T`: `[1, c, h, w]`.
    pub fn start_latents(&self) -> PipelineResult<Tensor> {
        Ok(self.trajectory.get(self.step_count())?)
    }

    /// The reference row's latents after sampling step `step_index`, `z*_{T - step_index - 1}`:
    /// `[1, c, h, w]`.
    pub fn latents_after_step(&self, step_index: usize) -> PipelineResult<Tensor> {
        let steps = self.step_count();
        if step_index >= steps {
            return Err(PipelineError::InvalidArgument {
                name: "reference image step",
                reason: format!("step {step_index} of a {steps}-step trajectory"),
            });
        }
        Ok(self.trajectory.get(steps - step_index - 1)?)
    }
}

/// Inverts `image` (already fitted to a size the model accepts, e.g. with
/// [`crate::analysis::image::fit_image`]) as a set's reference: DDIM at `guidance` (see
/// [`REFERENCE_INVERSION_GUIDANCE`]) with `prompt` describing it, `steps` steps (the set's). Progress
/// through `on_step` (phase `"inverting"`); `cancel` is checked before every UNet call.
pub fn invert_reference_image(
    model: &StableDiffusion,
    image: &RgbImage,
    prompt: &str,
    steps: usize,
    guidance: f64,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<Arc<StyleReferenceImage>> {
    let (trajectory, timesteps) =
        ddim_trajectory_with_guidance(model, image, prompt, steps, guidance, on_step, cancel)?;
    Ok(Arc::new(StyleReferenceImage {
        image: image.clone(),
        prompt: prompt.to_string(),
        inversion_guidance: guidance,
        timesteps,
        trajectory,
    }))
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct StyleSetRequest {
    /// The reference: its prompt, negative prompt, seed, steps, guidance, size, scheduler and
    /// initial noise (shared by every row but the noise, see the module docs).
    pub generate: GenerateRequest,
    /// The target prompts, in output order (at least one).
    pub target_prompts: Vec<String>,
    /// Shared attention settings; `None` generates every image independently (same batch, same
    /// seeds: the baseline).
    pub sharing: Option<StyleAlignedConfig>,
    /// A real image as the reference ([`invert_reference_image`]): the reference row follows its
    /// inverted trajectory (see the module docs); `generate.prompt` should be the prompt it was
    /// inverted with. The run takes the trajectory's steps and DDIM timesteps (another scheduler
    /// whose timesteps differ is refused). `None`: the reference is generated from its prompt.
    pub reference_image: Option<Arc<StyleReferenceImage>>,
}

impl StyleSetRequest {
    /// Images in the set (reference + targets).
    pub fn image_count(&self) -> usize {
        1 + self.target_prompts.len()
    }

    /// The seed of image `index` (0: the reference).
    pub fn seed_of(&self, index: usize) -> u64 {
        self.generate.seed.wrapping_add(index as u64)
    }
}

/// Sent after every step.
#[derive(Clone, Debug)]
pub struct StyleStepReport {
    /// The step just finished, 0-based.
    pub step_index: usize,
    /// Steps of the run.
    pub step_count: usize,
    /// The timestep the UNet saw.
    pub timestep: f64,
    /// Latents of every image after the step (reference first), each `[1, channels, h, w]`.
    pub latents: Vec<Tensor>,
}

/// The result of a set.
#[derive(Clone, Debug)]
pub struct StyleSetOutput {
    /// The reference image's run.
    pub reference: GenerateOutput,
    /// The targets' runs, in prompt order.
    pub targets: Vec<GenerateOutput>,
}

/// Checks that a set of `request.image_count()` images fits in `available` memory (with
/// `capture` kept per image), before anything is allocated.
pub fn check_style_set_fits(
    model: &StableDiffusion,
    request: &StyleSetRequest,
    capture: &RunCapture,
    available: &AvailableMemory,
) -> PipelineResult<()> {
    // A shift runs through the fused kernel too (one extra channel per head): no explicit
    // probabilities.
    let explicit_shift = false;
    let memory = estimate_style_set_memory(
        &ModelFootprint::of_model(model),
        &request.generate,
        request.image_count(),
        capture,
        explicit_shift,
    );
    check_run_fits(&memory, available).map_err(|error| match error {
        PipelineError::TooLarge { what, reason } => PipelineError::TooLarge {
            what: format!("a set of {} images ({what})", request.image_count()),
            reason: format!("{reason}; or fewer target prompts"),
        },
        other => other,
    })
}

/// A set sampled one step at a time (see [`crate::pipeline::sampling::Sampler`]).
pub struct StyleSetRun<'model> {
    model: &'model StableDiffusion,
    reference: PreparedRun,
    target_tokens: Vec<PromptTokens>,
    processor: Option<StyleAligned>,
    reference_image: Option<Arc<StyleReferenceImage>>,
    /// `[negative x n, prompts...]` with guidance.
    text_embeddings: Tensor,
    rows: Vec<DenoiseRow>,
    latents_per_step: Vec<Vec<Tensor>>,
    cancel: Option<CancelToken>,
}

impl<'model> StyleSetRun<'model> {
    /// Checks `request` (limits, memory of the whole batch with `capture` per image), tokenises
    /// every prompt, encodes them and draws each row's noise.
    pub fn new(
        model: &'model StableDiffusion,
        request: &StyleSetRequest,
        capture: &RunCapture,
    ) -> PipelineResult<Self> {
        if request.target_prompts.is_empty() {
            return Err(PipelineError::InvalidArgument {
                name: "target prompts",
                reason: "a style set needs at least one target prompt besides the reference"
                    .to_string(),
            });
        }
        if request.target_prompts.len() > MAX_TARGETS {
            return Err(PipelineError::InvalidArgument {
                name: "target prompts",
                reason: format!(
                    "{} given; at most {MAX_TARGETS} per set",
                    request.target_prompts.len()
                ),
            });
        }
        let generate = match &request.reference_image {
            Some(image) => reference_image_request(&request.generate, image)?,
            None => request.generate.clone(),
        };
        let latent_shape = validate_request(model, &generate)?;
        check_style_set_fits(model, request, capture, &available_memory())?;
        let processor = match request.sharing {
            Some(config) => Some(StyleAligned::new(config, model.unet.config()).map_err(
                |error| PipelineError::InvalidArgument {
                    name: "style aligned settings",
                    reason: error.to_string(),
                },
            )?),
            None => None,
        };
        let mut reference = prepare_run(model, &generate)?;
        if let Some(image) = &request.reference_image {
            check_reference_timesteps(image, &reference.timesteps)?;
        }
        let mut target_tokens = Vec::with_capacity(request.target_prompts.len());
        for (index, prompt) in request.target_prompts.iter().enumerate() {
            let tokens = model.tokenizer.encode(prompt)?;
            reference.warnings.extend(
                tokens
                    .warning()
                    .map(|warning| format!("target {} {warning}", index + 1)),
            );
            target_tokens.push(tokens);
        }
        let guided = request.generate.uses_guidance();
        let mut prompts: Vec<&PromptTokens> = vec![&reference.prompt_tokens];
        prompts.extend(target_tokens.iter());
        let text_embeddings =
            encode_prompt_batch(model, &prompts, &reference.negative_tokens, guided)?;
        let mut rows = Vec::with_capacity(request.image_count());
        for index in 0..request.image_count() {
            let scheduler = reference.take_scheduler(model)?;
            let mut rng = NoiseRng::new(request.seed_of(index));
            let unit_noise = if index == 0 {
                initial_noise(&generate, latent_shape, model.device(), &mut rng)?
            } else {
                rng.randn(latent_shape.to_vec(), model.device())?
            };
            let latents = match (&request.reference_image, index) {
                (Some(image), 0) => image
                    .start_latents()?
                    .to_device(model.device())?
                    .to_dtype(DType::F32)?,
                _ => unit_noise.affine(scheduler.init_noise_sigma(), 0.0)?,
            };
            rows.push(DenoiseRow {
                latents,
                scheduler,
                rng,
            });
        }
        Ok(Self {
            model,
            latents_per_step: Vec::with_capacity(reference.step_count()),
            reference,
            target_tokens,
            processor,
            reference_image: request.reference_image.clone(),
            text_embeddings,
            rows,
            cancel: None,
        })
    }

    /// Lets every hooked attention layer check `cancel` (see
    /// [`crate::pipeline::sampling::Sampler::with_cancel`]).
    #[must_use]
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// The reference's prepared run (its tokens, timesteps, warnings).
    pub fn reference_run(&self) -> &PreparedRun {
        &self.reference
    }

    /// The target prompts' tokens, in order.
    pub fn target_tokens(&self) -> &[PromptTokens] {
        &self.target_tokens
    }

    /// The next step of every row, `observer` on the hook after the shared attention; `None`
    /// once every step has run.
    pub fn step(
        &mut self,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<StyleStepReport>> {
        let step_index = self.latents_per_step.len();
        let Some(&timestep) = self.reference.timesteps.get(step_index) else {
            return Ok(None);
        };
        let step = DenoiseStep {
            step_index,
            step_count: self.reference.step_count(),
            timestep,
            guidance: self.reference.request.guidance,
            guided: self.reference.request.uses_guidance(),
            cancel: self.cancel.clone(),
            // A set starts from noise; an image reference is not replayed here.
            unconditional: None,
        };
        let mut processors: Vec<&mut dyn AttentionProcessor> = Vec::with_capacity(2);
        if let Some(processor) = self.processor.as_mut() {
            processor.begin_step(step_index, step.step_count);
            processors.push(processor);
        }
        if let Some(observer) = observer {
            processors.push(observer);
        }
        if processors.is_empty() {
            denoise_step(
                self.model,
                &mut self.rows,
                &step,
                &self.text_embeddings,
                None,
            )?;
        } else {
            let mut chain = ChainedProcessors::new(processors);
            denoise_step(
                self.model,
                &mut self.rows,
                &step,
                &self.text_embeddings,
                Some(&mut chain),
            )?;
            chain.step_finished(step_index)?;
        }
        if let Some(image) = &self.reference_image {
            self.rows[0].latents = image
                .latents_after_step(step_index)?
                .to_device(self.model.device())?
                .to_dtype(DType::F32)?;
        }
        let latents: Vec<Tensor> = self.rows.iter().map(|row| row.latents.clone()).collect();
        self.latents_per_step.push(latents.clone());
        Ok(Some(StyleStepReport {
            step_index,
            step_count: step.step_count,
            timestep,
            latents,
        }))
    }

    /// Decodes every image (after the last step; earlier, the latents so far).
    pub fn finish(self) -> PipelineResult<StyleSetOutput> {
        let mut outputs = Vec::with_capacity(self.rows.len());
        let prompts = std::iter::once(&self.reference.prompt_tokens).chain(&self.target_tokens);
        for (index, (row, tokens)) in self.rows.iter().zip(prompts).enumerate() {
            let image_f32 = decode_to_unit_range(self.model, &row.latents)?;
            let image = to_rgb8(&image_f32)?;
            let per_step: Vec<Tensor> = self
                .latents_per_step
                .iter()
                .map(|step| step[index].clone())
                .collect();
            let latents_per_step = if per_step.is_empty() {
                row.latents.unsqueeze(0)?
            } else {
                Tensor::stack(&per_step, 0)?
            };
            outputs.push(GenerateOutput {
                image,
                image_f32,
                latents_per_step,
                timesteps: self.reference.timesteps.clone(),
                scheduler: self.reference.scheduler_kind,
                prompt_tokens: tokens.clone(),
                negative_tokens: self.reference.negative_tokens.clone(),
                warnings: self.reference.warnings.clone(),
            });
        }
        let reference = outputs.remove(0);
        Ok(StyleSetOutput {
            reference,
            targets: outputs,
        })
    }
}

impl StepwiseRun for StyleSetRun<'_> {
    type Report = StyleStepReport;

    fn next_step(
        &mut self,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<StyleStepReport>> {
        self.step(observer)
    }
}

/// The reference's request when it follows `image`: the trajectory's steps, DDIM unless another
/// scheduler was asked for, no initial noise; the image must have the request's size.
fn reference_image_request(
    generate: &GenerateRequest,
    image: &StyleReferenceImage,
) -> PipelineResult<GenerateRequest> {
    if (image.image.width, image.image.height) != (generate.width, generate.height) {
        return Err(PipelineError::InvalidArgument {
            name: "reference image",
            reason: format!(
                "the reference image is {}x{} px but the set is {}x{} px",
                image.image.width, image.image.height, generate.width, generate.height
            ),
        });
    }
    if generate.steps != image.step_count() {
        return Err(PipelineError::InvalidArgument {
            name: "reference image",
            reason: format!(
                "the reference image was inverted with {} steps but the set has {}",
                image.step_count(),
                generate.steps
            ),
        });
    }
    let mut generate = generate.clone();
    generate.scheduler = Some(generate.scheduler.unwrap_or(SchedulerKind::Ddim));
    generate.init_latents = None;
    generate.inversion = None;
    Ok(generate)
}

/// Refuses a run whose timesteps are not the reference image's trajectory's.
fn check_reference_timesteps(image: &StyleReferenceImage, timesteps: &[f64]) -> PipelineResult<()> {
    if image.timesteps == timesteps {
        return Ok(());
    }
    Err(PipelineError::InvalidArgument {
        name: "reference image",
        reason: format!(
            "the set's scheduler runs timesteps {timesteps:?} but the reference image's DDIM \
             trajectory has {:?}: use the DDIM scheduler",
            image.timesteps
        ),
    })
}

/// Runs a whole set: `observer` on the hook after the shared attention, `on_step` after every
/// step, `cancel` checked before every step and in every attention layer.
pub fn generate_style_set(
    model: &StableDiffusion,
    request: &StyleSetRequest,
    capture: &RunCapture,
    observer: Option<&mut dyn AttentionProcessor>,
    on_step: &mut dyn FnMut(&StyleStepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<StyleSetOutput> {
    let mut run = StyleSetRun::new(model, request, capture)?.with_cancel(cancel.clone());
    run_to_end(&mut run, observer, on_step, cancel)?;
    run.finish()
}
