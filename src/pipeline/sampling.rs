//! The sampling loop: prompt -> text embeddings -> denoising steps with classifier-free guidance ->
//! image, with a report after every step, an optional attention processor and cancellation.
//!
//! It follows diffusers' `StableDiffusionPipeline.__call__`: the unconditional (negative prompt) and
//! conditional halves run as one UNet batch `[uncond, cond]`, and
//! `noise = uncond + guidance * (cond - uncond)` when `guidance > 1`.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::hook::{AttentionHook, AttentionProcessor, CancelToken};
use crate::pipeline::inversion::{replay_scheduler, Inversion, InversionMethod, ReplayCorrection};
use crate::pipeline::limits::{
    available_memory, check_request_limits, check_run_fits, estimate_run_memory, ModelFootprint,
    RunCapture,
};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::scheduler::{prepare_scheduler, Scheduler, SchedulerKind};
use crate::pipeline::tokenizer::PromptTokens;
use crate::pipeline::{PipelineError, PipelineResult};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (the unconditional half of classifier-free guidance); may be empty.
    pub negative_prompt: String,
    /// Seed of the initial noise (and of the ancestral noise of Euler ancestral).
    pub seed: u64,
    /// Denoising steps (at least 1).
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` runs the conditional half only.
    pub guidance: f64,
    /// Image width in pixels (a multiple of [`StableDiffusion::size_multiple_px`]).
    pub width: usize,
    /// Image height in pixels (a multiple of [`StableDiffusion::size_multiple_px`]).
    pub height: usize,
    /// Scheduler; `None` uses the model's own (or DDIM when attend does not implement it).
    pub scheduler: Option<SchedulerKind>,
    /// Unit-variance initial noise `[1, channels, h, w]` (latent size); `None` draws it from `seed`.
    pub init_latents: Option<Tensor>,
    /// Attach a cheap RGB preview to every [`StepReport`].
    pub preview: bool,
    /// A real image's inversion to replay: the run starts from its `z*_T` on its DDIM timesteps and
    /// applies its per-step correction, so the source prompt regenerates the image. `None`: the
    /// run starts from noise.
    pub inversion: Option<Arc<Inversion>>,
}

impl GenerateRequest {
    /// A request for `prompt` at the model's default size: 30 steps, guidance 7.5, seed 0.
    pub fn new(model: &StableDiffusion, prompt: impl Into<String>) -> Self {
        let (width, height) = model.default_size_px();
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 30,
            guidance: 7.5,
            width,
            height,
            scheduler: None,
            init_latents: None,
            preview: false,
            inversion: None,
        }
    }

    /// True when the run uses classifier-free guidance (two-item UNet batch).
    pub fn uses_guidance(&self) -> bool {
        self.guidance > 1.0
    }

    /// True when a plain run of this request (the source row alone) needs the unconditional half:
    /// not when it replays a `direct` inversion, whose source row lands on the inverted trajectory
    /// whatever the UNet predicts, so only the prompt's half (its attention) is computed.
    pub fn source_row_uses_guidance(&self) -> bool {
        self.uses_guidance()
            && !self.inversion.as_ref().is_some_and(|inversion| {
                matches!(
                    inversion.correction,
                    crate::pipeline::inversion::ReplayCorrection::SourceFollowsTrajectory
                )
            })
    }
}

pub use crate::analysis::image::RgbImage;

/// Sent to the caller after every denoising step.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step just finished, 0-based.
    pub step_index: usize,
    /// Number of steps in the run.
    pub step_count: usize,
    /// The timestep the UNet saw in this step.
    pub timestep: f64,
    /// Latents after the step, `[1, channels, h, w]` f32.
    pub latents: Tensor,
    /// A quick look at the latents (latent resolution), when the request asked for previews.
    pub preview: Option<RgbImage>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// The final image.
    pub image: RgbImage,
    /// The final image as floats in `[0, 1]`, `[height, width, 3]` f32 (for parity checks).
    pub image_f32: Tensor,
    /// Latents after each step, `[steps, 1, channels, h, w]` f32.
    pub latents_per_step: Tensor,
    /// The timesteps the UNet saw, one per step.
    pub timesteps: Vec<f64>,
    /// The scheduler that ran.
    pub scheduler: SchedulerKind,
    /// The prompt's tokens (ids, token strings, word spans).
    pub prompt_tokens: PromptTokens,
    /// The negative prompt's tokens.
    pub negative_tokens: PromptTokens,
    /// Things the user should know: prompt truncation, scheduler substitution, ignored options.
    pub warnings: Vec<String>,
}

/// A run with everything resolved before its first step: the request checked, the prompts
/// tokenised and the scheduler prepared, each exactly once. Build it with [`prepare_run`], show
/// its tokens and warnings, then hand it to a [`Sampler`].
pub struct PreparedRun {
    /// The request as given.
    pub request: GenerateRequest,
    /// Latent shape `[1, channels, h, w]`.
    pub latent_shape: [usize; 4],
    /// The scheduler that runs (the model's own, the requested one, or DDIM as a substitute).
    pub scheduler_kind: SchedulerKind,
    /// The timesteps the UNet will see, one per step.
    pub timesteps: Vec<f64>,
    /// The prompt's tokens (ids, token strings, word spans).
    pub prompt_tokens: PromptTokens,
    /// The negative prompt's tokens.
    pub negative_tokens: PromptTokens,
    /// Things the user should know: prompt truncation, scheduler substitution, ignored options.
    pub warnings: Vec<String>,
    /// The prepared scheduler until a sampler takes it.
    scheduler: Option<Box<dyn Scheduler>>,
}

impl Clone for PreparedRun {
    /// Everything but the prepared scheduler, which belongs to one run: sampling the clone
    /// prepares a fresh scheduler of the same kind and steps.
    fn clone(&self) -> Self {
        Self {
            request: self.request.clone(),
            latent_shape: self.latent_shape,
            scheduler_kind: self.scheduler_kind,
            timesteps: self.timesteps.clone(),
            prompt_tokens: self.prompt_tokens.clone(),
            negative_tokens: self.negative_tokens.clone(),
            warnings: self.warnings.clone(),
            scheduler: None,
        }
    }
}

impl PreparedRun {
    /// Number of denoising steps.
    pub fn step_count(&self) -> usize {
        self.timesteps.len()
    }

    /// A fresh scheduler of the same kind and steps (for a second image that must follow the
    /// same schedule, e.g. the edited row of a Prompt-to-Prompt batch).
    pub(crate) fn scheduler_copy(
        &self,
        model: &StableDiffusion,
    ) -> PipelineResult<Box<dyn Scheduler>> {
        Ok(prepare_scheduler(
            &model.scheduler_config,
            self.request.scheduler,
            self.request.steps,
        )?
        .scheduler)
    }

    /// The prepared scheduler, taken out (a run owns it); a fresh copy once it was taken.
    pub(crate) fn take_scheduler(
        &mut self,
        model: &StableDiffusion,
    ) -> PipelineResult<Box<dyn Scheduler>> {
        match self.scheduler.take() {
            Some(scheduler) => Ok(scheduler),
            None => self.scheduler_copy(model),
        }
    }
}

/// Checks `request`, tokenises its prompts and prepares its scheduler (see [`PreparedRun`]).
/// The memory check assumes nothing is captured; see [`prepare_run_with`].
pub fn prepare_run(
    model: &StableDiffusion,
    request: &GenerateRequest,
) -> PipelineResult<PreparedRun> {
    prepare_run_with(model, request, &RunCapture::none())
}

/// [`prepare_run`] for a run that keeps `capture` (an attention store, a replay recording): the
/// limits of [`crate::pipeline::limits`] are checked, the memory estimate with the capture
/// against the memory available now, before anything is allocated.
pub fn prepare_run_with(
    model: &StableDiffusion,
    request: &GenerateRequest,
    capture: &RunCapture,
) -> PipelineResult<PreparedRun> {
    let latent_shape = validate_request(model, request)?;
    let memory = estimate_run_memory(&ModelFootprint::of_model(model), request, capture);
    check_run_fits(&memory, &available_memory())?;
    let mut replay_warnings = Vec::new();
    let replayed;
    let request = match &request.inversion {
        Some(inversion) => {
            replayed = replay_request(
                model,
                request,
                inversion,
                latent_shape,
                &mut replay_warnings,
            )?;
            &replayed
        }
        None => request,
    };
    let prepared = prepare_scheduler(&model.scheduler_config, request.scheduler, request.steps)?;
    if let Some(inversion) = &request.inversion {
        check_replay_timesteps(inversion, prepared.scheduler.timesteps())?;
    }
    let mut warnings = prepared.warnings;
    warnings.extend(replay_warnings);
    let mut prompt_tokens = model.tokenizer.encode_prompt(&request.prompt)?;
    let mut negative_tokens = model.tokenizer.encode_prompt(&request.negative_prompt)?;
    // Both halves of classifier-free guidance attend to the same number of keys.
    let chunk_count = prompt_tokens.chunk_count.max(negative_tokens.chunk_count);
    model
        .tokenizer
        .pad_to_chunks(&mut prompt_tokens, chunk_count);
    model
        .tokenizer
        .pad_to_chunks(&mut negative_tokens, chunk_count);
    if crate::analysis::prompt_syntax::parse_prompt(&request.prompt)
        .is_ok_and(|parsed| parsed.has_swaps())
    {
        warnings.push(
            "the prompt's [from:to:when] swaps need an edit run (`attend generate` runs them): this \
             image uses each swap's `from`"
                .to_string(),
        );
    }
    warnings.extend(prompt_tokens.warning());
    warnings.extend(
        negative_tokens
            .warning()
            .map(|warning| format!("negative {warning}")),
    );
    Ok(PreparedRun {
        request: request.clone(),
        latent_shape,
        scheduler_kind: prepared.kind,
        timesteps: prepared.scheduler.timesteps().to_vec(),
        prompt_tokens,
        negative_tokens,
        warnings,
        scheduler: Some(prepared.scheduler),
    })
}

/// The sampling loop, one step per call, so that the caller owns the loop: it reads its processor
/// between steps, reports in its own terms and stops when it likes (no callbacks, no shared cells).
///
/// ```text
/// let mut sampler = Sampler::new(model, prepare_run(model, &request)?)?;
/// while let Some(report) = sampler.step(Some(&mut store))? { /* show report, read store */ }
/// let output = sampler.finish()?;
/// ```
pub struct Sampler<'model> {
    model: &'model StableDiffusion,
    run: PreparedRun,
    /// `[negative, prompt]` with guidance, `[prompt]` without: `[rows, chunks * 77, dim]`.
    text_embeddings: Tensor,
    row: DenoiseRow,
    latents_per_step: Vec<Tensor>,
    next_step: usize,
    /// Checked by every hooked attention layer ([`Sampler::with_cancel`]).
    cancel: Option<CancelToken>,
}

impl<'model> Sampler<'model> {
    /// Encodes the prompts and draws the initial noise of `run`.
    pub fn new(model: &'model StableDiffusion, mut run: PreparedRun) -> PipelineResult<Self> {
        let guided = run.request.source_row_uses_guidance();
        let text_embeddings =
            encode_prompt_batch(model, &[&run.prompt_tokens], &run.negative_tokens, guided)?;
        let row = match &run.request.inversion {
            Some(_) => start_row(model, &run.request, run.latent_shape, RowRole::Source)?.0,
            None => {
                let mut rng = NoiseRng::new(run.request.seed);
                let unit_noise =
                    initial_noise(&run.request, run.latent_shape, model.device(), &mut rng)?;
                let scheduler = run.take_scheduler(model)?;
                DenoiseRow {
                    latents: unit_noise.affine(scheduler.init_noise_sigma(), 0.0)?,
                    scheduler,
                    rng,
                }
            }
        };
        Ok(Self {
            model,
            latents_per_step: Vec::with_capacity(run.step_count()),
            run,
            text_embeddings,
            row,
            next_step: 0,
            cancel: None,
        })
    }

    /// Lets every hooked attention layer check `cancel`, so a cancelled run stops within one
    /// layer ([`PipelineError::Cancelled`]) instead of at the end of the step.
    #[must_use]
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// The run being sampled (tokens, timesteps, warnings).
    pub fn run(&self) -> &PreparedRun {
        &self.run
    }

    /// Runs the next denoising step, `processor` (when given) called by every attention layer and
    /// told when the step is over. `None` once every step has run.
    pub fn step(
        &mut self,
        mut processor: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<StepReport>> {
        let step_index = self.next_step;
        let Some(&timestep) = self.run.timesteps.get(step_index) else {
            return Ok(None);
        };
        let step = DenoiseStep {
            step_index,
            step_count: self.run.step_count(),
            timestep,
            guidance: self.run.request.guidance,
            guided: self.run.request.source_row_uses_guidance(),
            cancel: self.cancel.clone(),
            unconditional: replay_unconditional(&self.run.request, step_index)?,
        };
        denoise_step(
            self.model,
            std::slice::from_mut(&mut self.row),
            &step,
            &self.text_embeddings,
            processor.as_deref_mut(),
        )?;
        if let Some(processor) = processor {
            processor.step_finished(step_index)?;
        }
        self.next_step += 1;
        let latents = self.row.latents.clone();
        self.latents_per_step.push(latents.clone());
        let preview = if self.run.request.preview {
            Some(latent_preview(&latents, self.model.is_pixel_space())?)
        } else {
            None
        };
        Ok(Some(StepReport {
            step_index,
            step_count: step.step_count,
            timestep,
            latents,
            preview,
        }))
    }

    /// Decodes the final latents (after the last step; earlier, the latents so far).
    pub fn finish(self) -> PipelineResult<GenerateOutput> {
        let image_f32 = decode_to_unit_range(self.model, &self.row.latents)?;
        let image = to_rgb8(&image_f32)?;
        let latents_per_step = if self.latents_per_step.is_empty() {
            self.row.latents.unsqueeze(0)?
        } else {
            Tensor::stack(&self.latents_per_step, 0)?
        };
        let run = self.run;
        Ok(GenerateOutput {
            image,
            image_f32,
            latents_per_step,
            timesteps: run.timesteps,
            scheduler: run.scheduler_kind,
            prompt_tokens: run.prompt_tokens,
            negative_tokens: run.negative_tokens,
            warnings: run.warnings,
        })
    }
}

/// A run sampled one step at a time by its owner ([`Sampler`], and the edit runs above the
/// pipeline), so that one loop ([`run_to_end`]) drives them all.
pub trait StepwiseRun {
    /// What each step reports.
    type Report;

    /// Runs the next step with `processor` on the attention hook; `None` once every step has run.
    fn next_step(
        &mut self,
        processor: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<Self::Report>>;
}

impl StepwiseRun for Sampler<'_> {
    type Report = StepReport;

    fn next_step(
        &mut self,
        processor: Option<&mut (dyn AttentionProcessor + '_)>,
    ) -> PipelineResult<Option<StepReport>> {
        self.step(processor)
    }
}

/// Steps `run` to its end: `cancel` checked before every step (a cancelled run returns
/// [`PipelineError::Cancelled`]), `processor` on the hook, `on_step` after every step (its error
/// stops the run and is returned).
pub fn run_to_end<R: StepwiseRun>(
    run: &mut R,
    mut processor: Option<&mut dyn AttentionProcessor>,
    on_step: &mut dyn FnMut(&R::Report) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<()> {
    loop {
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let Some(report) = run.next_step(processor.as_deref_mut())? else {
            return Ok(());
        };
        on_step(&report)?;
    }
}

/// Runs a whole sampling loop (a [`Sampler`] driven to the end).
///
/// `processor` (when given) is called by every attention layer at every step; `on_step` after every
/// step (an error from it stops the run and is returned). `cancel` is checked before every step;
/// a cancelled run returns [`PipelineError::Cancelled`].
pub fn generate(
    model: &StableDiffusion,
    request: &GenerateRequest,
    processor: Option<&mut dyn AttentionProcessor>,
    on_step: &mut dyn FnMut(&StepReport) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<GenerateOutput> {
    let mut sampler =
        Sampler::new(model, prepare_run(model, request)?)?.with_cancel(cancel.clone());
    run_to_end(&mut sampler, processor, on_step, cancel)?;
    sampler.finish()
}

/// One image being denoised: its own scheduler (schedulers keep state between steps), its own noise
/// generator (for ancestral noise) and its latents `[1, channels, h, w]` f32.
pub(crate) struct DenoiseRow {
    /// The latents after the last step (the scaled initial noise before the first).
    pub(crate) latents: Tensor,
    /// This row's scheduler.
    pub(crate) scheduler: Box<dyn Scheduler>,
    /// This row's noise generator.
    pub(crate) rng: NoiseRng,
}

/// Where a [`denoise_step`] is in the run and how it guides.
pub(crate) struct DenoiseStep {
    /// Step index, 0-based.
    pub(crate) step_index: usize,
    /// Steps in the run.
    pub(crate) step_count: usize,
    /// The timestep the UNet sees.
    pub(crate) timestep: f64,
    /// Classifier-free guidance scale.
    pub(crate) guidance: f64,
    /// True when the UNet batch holds an unconditional half (`guidance > 1`).
    pub(crate) guided: bool,
    /// The run's cancel token, checked by every hooked attention layer.
    pub(crate) cancel: Option<CancelToken>,
    /// With guidance: the unconditional embedding of every row at this step, `[1, tokens, dim]`,
    /// in place of the negative prompt's (a null-text inversion's replay).
    pub(crate) unconditional: Option<Tensor>,
}

/// Text embeddings of a UNet batch: `[negative x n, prompts...]` with guidance (`[2n, tokens, dim]`),
/// `[prompts...]` without (`[n, tokens, dim]`). Rows of several chunks (prompts beyond 77 tokens)
/// run the text encoder once per chunk and are concatenated along the tokens (`tokens = chunks *
/// max_length`); a row with fewer chunks than the longest is padded with empty-prompt chunks, as
/// A1111 pads the shorter half of classifier-free guidance.
pub fn encode_prompt_batch(
    model: &StableDiffusion,
    prompts: &[&PromptTokens],
    negative: &PromptTokens,
    guided: bool,
) -> PipelineResult<Tensor> {
    let mut rows: Vec<&PromptTokens> = Vec::with_capacity(2 * prompts.len());
    if guided {
        rows.extend(std::iter::repeat_n(negative, prompts.len()));
    }
    rows.extend_from_slice(prompts);
    let chunk_count = rows.iter().map(|row| row.chunk_count).max().unwrap_or(1);
    let chunk_length = model.tokenizer.max_length();
    let mut ids: Vec<u32> = Vec::with_capacity(rows.len() * chunk_count * chunk_length);
    for row in &rows {
        if row.chunk_count == chunk_count {
            ids.extend_from_slice(&row.ids);
        } else {
            let mut padded = (*row).clone();
            model.tokenizer.pad_to_chunks(&mut padded, chunk_count);
            ids.extend_from_slice(&padded.ids);
        }
    }
    if ids.len() != rows.len() * chunk_count * chunk_length {
        return Err(PipelineError::InvalidArgument {
            name: "prompt tokens",
            reason: format!(
                "{} ids for {} rows of {chunk_count} chunks of {chunk_length} tokens",
                ids.len(),
                rows.len()
            ),
        });
    }
    let ids = Tensor::from_vec(
        ids,
        (rows.len() * chunk_count, chunk_length),
        model.device(),
    )?;
    let embeddings = model.text_encoder.forward(&ids)?;
    let width = embeddings.dim(2)?;
    Ok(embeddings.reshape((rows.len(), chunk_count * chunk_length, width))?)
}

/// Unit-variance initial noise `[1, channels, h, w]`: the request's, or drawn from `rng`.
pub(crate) fn initial_noise(
    request: &GenerateRequest,
    latent_shape: [usize; 4],
    device: &candle_core::Device,
    rng: &mut NoiseRng,
) -> PipelineResult<Tensor> {
    match &request.init_latents {
        Some(latents) => Ok(latents.to_device(device)?.to_dtype(DType::F32)?),
        None => rng.randn(latent_shape.to_vec(), device),
    }
}

/// One denoising step of every row as one UNet batch (`[uncond rows..., cond rows...]` with
/// guidance, `[rows...]` without; `text_embeddings` in the same order, see
/// [`encode_prompt_batch`]): guidance per row, then each row's scheduler steps its own latents.
pub(crate) fn denoise_step<'borrow, 'processor>(
    model: &StableDiffusion,
    rows: &mut [DenoiseRow],
    step: &DenoiseStep,
    text_embeddings: &Tensor,
    processor: Option<&'borrow mut (dyn AttentionProcessor + 'processor)>,
) -> PipelineResult<()> {
    let mut inputs = Vec::with_capacity(rows.len());
    for row in rows.iter() {
        inputs.push(
            row.scheduler
                .scale_model_input(&row.latents, step.step_index)?,
        );
    }
    let outputs = guided_model_outputs(model, &inputs, step, text_embeddings, processor)?;
    for (row, guided_output) in rows.iter_mut().zip(outputs) {
        row.latents =
            row.scheduler
                .step(&guided_output, step.step_index, &row.latents, &mut row.rng)?;
        if !all_finite(&row.latents)? {
            return Err(non_finite_latents(model, step));
        }
    }
    Ok(())
}

/// The guided model output of each of `inputs` (`[1, channels, h, w]` each, already scaled for
/// the scheduler) from one UNet batch: `uncond + guidance * (cond - uncond)` with guidance, the
/// conditional output without. The one place this arithmetic lives, so that an inversion and its
/// replay compute bit-identical outputs.
pub(crate) fn guided_model_outputs<'borrow, 'processor>(
    model: &StableDiffusion,
    inputs: &[Tensor],
    step: &DenoiseStep,
    text_embeddings: &Tensor,
    processor: Option<&'borrow mut (dyn AttentionProcessor + 'processor)>,
) -> PipelineResult<Vec<Tensor>> {
    let row_count = inputs.len();
    let halves = if step.guided { 2 } else { 1 };
    let batch: Vec<&Tensor> = inputs.iter().cycle().take(halves * row_count).collect();
    let model_input = Tensor::cat(&batch, 0)?;
    let replaced_embeddings;
    let text_embeddings = match (&step.unconditional, step.guided) {
        (Some(unconditional), true) => {
            let (_, tokens, dim) = unconditional.dims3()?;
            let unconditional = unconditional
                .to_device(text_embeddings.device())?
                .to_dtype(text_embeddings.dtype())?
                .broadcast_as((row_count, tokens, dim))?;
            replaced_embeddings = Tensor::cat(
                &[
                    &unconditional,
                    &text_embeddings.narrow(0, row_count, row_count)?,
                ],
                0,
            )?;
            &replaced_embeddings
        }
        _ => text_embeddings,
    };
    let mut hook = processor.map(|processor| AttentionHook {
        processor,
        step_index: step.step_index,
        step_count: step.step_count,
        cfg: step.guided,
        cancel: step.cancel.as_ref(),
    });
    let model_output =
        match model
            .unet
            .forward(&model_input, step.timestep, text_embeddings, hook.as_mut())
        {
            Ok(output) => output,
            // A layer saw the token tripped (or failed after it was): the run was cancelled.
            Err(_) if step.cancel.as_ref().is_some_and(CancelToken::is_cancelled) => {
                return Err(PipelineError::Cancelled);
            }
            Err(error) => return Err(error),
        }
        .to_dtype(DType::F32)?;
    let mut outputs = Vec::with_capacity(row_count);
    for index in 0..row_count {
        outputs.push(if step.guided {
            let unconditional = model_output.narrow(0, index, 1)?;
            let conditional = model_output.narrow(0, row_count + index, 1)?;
            (&unconditional + (conditional - &unconditional)?.affine(step.guidance, 0.0)?)?
        } else {
            model_output.narrow(0, index, 1)?
        });
    }
    Ok(outputs)
}

/// Which image of a run a denoising row is, for an inversion's replay: the source row carries
/// the corrections that reproduce the image; the edited row of a Prompt-to-Prompt run only those
/// meant for every row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowRole {
    /// The row of the source prompt (a plain run's only row).
    Source,
    /// The edited prompt's row of an edit.
    Edited,
}

/// A row ready for its first step: its scheduler ([`row_scheduler`]) and its start latents
/// (the inversion's `z*_T`, or the request's noise scaled by the scheduler), and the noise
/// generator's state after drawing that noise.
pub(crate) fn start_row(
    model: &StableDiffusion,
    request: &GenerateRequest,
    latent_shape: [usize; 4],
    role: RowRole,
) -> PipelineResult<(DenoiseRow, NoiseRng)> {
    let scheduler = row_scheduler(model, request, role)?;
    let mut rng = NoiseRng::new(request.seed);
    let latents = match &request.inversion {
        Some(inversion) => inversion
            .start_latents()?
            .to_device(model.device())?
            .to_dtype(DType::F32)?,
        None => initial_noise(request, latent_shape, model.device(), &mut rng)?
            .affine(scheduler.init_noise_sigma(), 0.0)?,
    };
    Ok((
        DenoiseRow {
            latents,
            scheduler,
            rng: rng.clone(),
        },
        rng,
    ))
}

/// The scheduler of a row in `role`: the request's, or with an inversion to replay its DDIM
/// with the row's per-step correction (see [`crate::pipeline::inversion`]).
pub(crate) fn row_scheduler(
    model: &StableDiffusion,
    request: &GenerateRequest,
    role: RowRole,
) -> PipelineResult<Box<dyn Scheduler>> {
    match &request.inversion {
        Some(inversion) => replay_scheduler(&model.scheduler_config, inversion, role),
        None => Ok(
            prepare_scheduler(&model.scheduler_config, request.scheduler, request.steps)?.scheduler,
        ),
    }
}

/// The unconditional embedding of step `step_index` when `request` replays a null-text
/// inversion, `[1, tokens, dim]`; `None` otherwise.
pub(crate) fn replay_unconditional(
    request: &GenerateRequest,
    step_index: usize,
) -> PipelineResult<Option<Tensor>> {
    match request
        .inversion
        .as_deref()
        .map(|inversion| &inversion.correction)
    {
        Some(ReplayCorrection::UnconditionalEmbeddings(embeddings)) => {
            Ok(Some(embeddings.get(step_index)?.unsqueeze(0)?))
        }
        _ => Ok(None),
    }
}

/// `request` as a replay of `inversion` runs it: checked against the inversion (model, size,
/// steps, guidance where the correction depends on it), on DDIM, with the negative prompt the
/// method needs. What changed is said in `warnings`.
fn replay_request(
    model: &StableDiffusion,
    request: &GenerateRequest,
    inversion: &Inversion,
    latent_shape: [usize; 4],
    warnings: &mut Vec<String>,
) -> PipelineResult<GenerateRequest> {
    let refuse = |reason: String| PipelineError::InvalidArgument {
        name: "inversion",
        reason,
    };
    let method = inversion.request.method;
    if inversion.model_name != model.name() {
        return Err(refuse(format!(
            "the image was inverted with the model `{}`, this run uses `{}`; invert it again \
             with this model",
            inversion.model_name,
            model.name()
        )));
    }
    if inversion.size_px != (request.width, request.height) {
        return Err(refuse(format!(
            "the image was inverted at {}x{} px, this run is {}x{} px; use the inversion's size",
            inversion.size_px.0, inversion.size_px.1, request.width, request.height
        )));
    }
    if inversion.timesteps.len() != request.steps {
        return Err(refuse(format!(
            "the image was inverted with {} steps, this run has {}; use the inversion's steps",
            inversion.timesteps.len(),
            request.steps
        )));
    }
    let trajectory_shape = inversion.trajectory.dims();
    if trajectory_shape.len() != 5
        || trajectory_shape[0] != request.steps + 1
        || trajectory_shape[1..] != latent_shape
    {
        return Err(refuse(format!(
            "its trajectory has shape {trajectory_shape:?}, expected [{}, {}, {}, {}, {}]",
            request.steps + 1,
            latent_shape[0],
            latent_shape[1],
            latent_shape[2],
            latent_shape[3]
        )));
    }
    let guidance_matters = matches!(
        method,
        InversionMethod::NullText | InversionMethod::Direct | InversionMethod::Ddpm
    );
    #[allow(clippy::float_cmp)]
    if guidance_matters && request.guidance != inversion.request.guidance {
        return Err(refuse(format!(
            "a {method} inversion reproduces the image at the guidance it was made with ({}), \
             this run asks for {}; use the inversion's guidance",
            inversion.request.guidance, request.guidance
        )));
    }
    let mut replayed = request.clone();
    if let Some(asked) = request
        .scheduler
        .filter(|kind| *kind != SchedulerKind::Ddim)
    {
        warnings.push(format!(
            "the {} scheduler was asked for; a real image's inversion replays on DDIM",
            asked.label()
        ));
    }
    replayed.scheduler = Some(SchedulerKind::Ddim);
    if request.init_latents.is_some() {
        warnings.push(
            "the initial noise given is ignored: the run starts from the image's inversion"
                .to_string(),
        );
        replayed.init_latents = None;
    }
    if request.prompt.trim() != inversion.request.prompt.trim() {
        warnings.push(format!(
            "the prompt differs from the one the image was inverted with (`{}`): the image may \
             not be reproduced",
            inversion.request.prompt
        ));
    }
    match method {
        InversionMethod::Ddim => {}
        InversionMethod::NegativePrompt => {
            if !request.negative_prompt.trim().is_empty() {
                warnings.push(
                    "the negative prompt is replaced by the inverted image's prompt \
                     (negative-prompt inversion)"
                        .to_string(),
                );
            }
            replayed.negative_prompt = inversion.request.prompt.clone();
        }
        InversionMethod::NullText | InversionMethod::Direct | InversionMethod::Ddpm => {
            if !request.negative_prompt.trim().is_empty() {
                warnings.push(format!(
                    "the negative prompt is ignored: a {method} inversion replays with the \
                     unconditional embedding it was made with"
                ));
            }
            replayed.negative_prompt = String::new();
        }
    }
    Ok(replayed)
}

/// Refuses a replay whose DDIM timesteps (from the model's scheduler config) differ from the
/// inversion's: the model folder's scheduler changed since the image was inverted.
fn check_replay_timesteps(inversion: &Inversion, timesteps: &[f64]) -> PipelineResult<()> {
    if inversion.timesteps == timesteps {
        return Ok(());
    }
    Err(PipelineError::InvalidArgument {
        name: "inversion",
        reason: format!(
            "it was made on the DDIM timesteps {:?}, this model's scheduler gives {timesteps:?}; \
             invert the image again",
            inversion.timesteps
        ),
    })
}

/// True when every value of `tensor` is finite. One reduction: a finite sum means finite values
/// (NaN and infinity propagate through sums); only a non-finite sum, which finite values can also
/// give by overflowing, is confirmed value by value.
pub fn all_finite(tensor: &Tensor) -> PipelineResult<bool> {
    let values = tensor.to_dtype(DType::F32)?;
    let sum = values.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(true);
    }
    Ok(values
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|value| value.is_finite()))
}

/// The error of latents that turned NaN or infinite in `step`, with the likely cause.
fn non_finite_latents(model: &StableDiffusion, step: &DenoiseStep) -> PipelineError {
    let guidance_hint = if step.guided && step.guidance > 20.0 {
        format!(
            "the guidance scale {} is large enough to push the noise prediction past f32 range \
             (SD is used at 1 to about 20), or ",
            step.guidance
        )
    } else {
        String::new()
    };
    PipelineError::NonFinite {
        what: format!(
            "the latents after step {} of {}",
            step.step_index + 1,
            step.step_count
        ),
        step_index: Some(step.step_index),
        hint: format!(
            "likely {guidance_hint}the model's weights in {} hold NaN or infinite values{}; \
             the run was stopped instead of writing a black image",
            model.dir().display(),
            fp16_hint(model)
        ),
    }
}

/// A note for half-precision models, whose activations overflow sooner.
fn fp16_hint(model: &StableDiffusion) -> &'static str {
    if model.dtype() == DType::F16 {
        " (or the f16 activations overflowed: try f32)"
    } else {
        ""
    }
}

/// Checks steps, guidance, size and initial latents against the limits of
/// [`crate::pipeline::limits`] (no memory check); returns the latent shape `[1, channels, h, w]`.
pub(crate) fn validate_request(
    model: &StableDiffusion,
    request: &GenerateRequest,
) -> PipelineResult<[usize; 4]> {
    let why_multiple = if model.is_pixel_space() {
        "the model works on pixels".to_string()
    } else {
        format!(
            "the VAE's downscale factor {}",
            model.latent_downscale_factor()
        )
    };
    check_request_limits(request, model.size_multiple_px(), &why_multiple)?;
    let factor = model.latent_downscale_factor();
    let shape = [
        1,
        model.latent_channels(),
        request.height / factor,
        request.width / factor,
    ];
    if let Some(latents) = &request.init_latents {
        if latents.dims() != shape {
            return Err(PipelineError::InvalidArgument {
                name: "init_latents",
                reason: format!(
                    "expected shape {shape:?} for a {}x{} image, got {:?}",
                    request.width,
                    request.height,
                    latents.dims()
                ),
            });
        }
        if !all_finite(latents)? {
            return Err(PipelineError::InvalidArgument {
                name: "init_latents",
                reason: "the initial noise holds NaN or infinite values".to_string(),
            });
        }
    }
    Ok(shape)
}

/// Final latents `[1, channels, h, w]` -> image `[height, width, 3]` f32 in `[0, 1]`
/// (VAE decode of `latents / scaling_factor`, or the latents themselves in pixel space).
pub fn decode_to_unit_range(model: &StableDiffusion, latents: &Tensor) -> PipelineResult<Tensor> {
    let image = match &model.vae {
        Some(vae) => {
            let scaled = latents.affine(1.0 / model.latent_scaling_factor(), 0.0)?;
            vae.decode(&scaled)?.to_dtype(DType::F32)?
        }
        None => latents.to_dtype(DType::F32)?,
    };
    if !all_finite(&image)? {
        return Err(PipelineError::NonFinite {
            what: if model.vae.is_some() {
                "the VAE's decoded image".to_string()
            } else {
                "the final image".to_string()
            },
            step_index: None,
            hint: format!(
                "likely the {} weights in {} hold NaN or infinite values{}; the image was not \
                 written as black",
                if model.vae.is_some() {
                    "VAE's"
                } else {
                    "model's"
                },
                model.dir().display(),
                fp16_hint(model)
            ),
        });
    }
    // diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1).
    let unit = image.affine(0.5, 0.5)?.clamp(0f32, 1f32)?;
    Ok(unit.squeeze(0)?.permute((1, 2, 0))?.contiguous()?)
}

/// `[height, width, 3]` floats in `[0, 1]` -> 8-bit image (`round(x * 255)`, as diffusers).
pub fn to_rgb8(image: &Tensor) -> PipelineResult<RgbImage> {
    let (height, width, _channels) = image.dims3()?;
    let values = image.flatten_all()?.to_vec1::<f32>()?;
    let pixels = values
        .into_iter()
        .map(|value| (value.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

/// Approximate RGB of SD latent channels: a fixed linear map per pixel (rows: latent channel, columns:
/// R, G, B), the widely shared estimate by Keturn (2022) for SD 1.x latents, giving roughly `[-1, 1]`.
const LATENT_TO_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// A cheap preview of latents `[1, channels, h, w]` at latent resolution: the fixed linear map above
/// for 4-channel latents, the sample itself in pixel space (and channel 0 as grey otherwise).
pub fn latent_preview(latents: &Tensor, pixel_space: bool) -> PipelineResult<RgbImage> {
    let latents = latents.to_dtype(DType::F32)?.squeeze(0)?;
    let (channels, height, width) = latents.dims3()?;
    let rgb_minus_one_to_one = if pixel_space && channels == 3 {
        latents
    } else if channels == LATENT_TO_RGB.len() {
        let flat: Vec<f32> = LATENT_TO_RGB.iter().flatten().copied().collect();
        let map = Tensor::from_vec(flat, (4, 3), latents.device())?;
        // [h * w, 4] x [4, 3] -> [h * w, 3] -> [3, h, w]
        latents
            .reshape((channels, height * width))?
            .t()?
            .matmul(&map)?
            .t()?
            .reshape((3, height, width))?
    } else {
        let grey = latents.narrow(0, 0, 1)?;
        Tensor::cat(&[&grey, &grey, &grey], 0)?
    };
    let unit = rgb_minus_one_to_one
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .contiguous()?;
    to_rgb8(&unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn run_state_can_move_to_a_worker_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<StableDiffusion>();
        assert_send::<GenerateRequest>();
        assert_send::<GenerateOutput>();
        assert_send::<CancelToken>();
    }

    #[test]
    fn cancel_token_clones_share_the_flag() {
        let token = CancelToken::new();
        let clone = token.clone();
        assert!(!clone.is_cancelled());
        token.cancel();
        assert!(clone.is_cancelled());
    }

    #[test]
    fn previews_map_latents_and_pixels_to_bytes() {
        let device = Device::Cpu;
        // Pixel space: -1 -> 0, 0 -> 128 (127.5 rounds up), 1 -> 255.
        let pixels = Tensor::from_vec(vec![-1f32, 0.0, 1.0], (1, 3, 1, 1), &device).unwrap();
        let preview = latent_preview(&pixels, true).unwrap();
        assert_eq!(preview.pixels, [0, 128, 255]);
        // Four latent channels go through the fixed map: zero latents are mid-grey.
        let latents = Tensor::zeros((1, 4, 2, 3), DType::F32, &device).unwrap();
        let preview = latent_preview(&latents, false).unwrap();
        assert_eq!((preview.width, preview.height), (3, 2));
        assert!(preview.pixels.iter().all(|&value| value == 128));
    }
}
