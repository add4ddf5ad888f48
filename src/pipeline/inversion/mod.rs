//! Real images in: invert an image into the noise (and per-step corrections) that regenerate it, so
//! that heat maps, segments and Prompt-to-Prompt edits work on the user's own image.
//!
//! Every method starts from the image's latent `z*_0` (the VAE posterior mean x scaling factor, or
//! the pixels in `[-1, 1]` for a pixel-space model) and ends at the `z*_T` a replay starts from,
//! keeping every latent of the trajectory. What a later run needs to come back down to the image
//! is the method's [`ReplayCorrection`]. The references are named on each [`InversionMethod`].
//!
//! - **DDIM step up** ([`DdimScheduler::inverse_step`]): the mirror of sampling step `i` (timestep
//!   `t`) goes from `t - train / steps` to `t`, the noise predicted at the destination `t`, with
//!   the model's scheduler config (final alpha product below timestep 0, clipping, prediction
//!   type) as diffusers' `DDIMInverseScheduler` (a velocity is read at `t`, see
//!   [`DdimScheduler::inverse_step`]); guidance 1, the prompt's embedding only.
//! - **Replay** ([`crate::pipeline::sampling::GenerateRequest::inversion`]): a run (plain, or
//!   either Prompt-to-Prompt mode) starts from `z*_T` on DDIM with the inversion's timesteps;
//!   `negative-prompt` makes the inverted prompt the negative prompt of every row (the source's
//!   and the edited's, as the reference does: an edit to the same prompt then reproduces the
//!   image); `null-text` puts the step's optimised embedding in the unconditional half of every
//!   row; `direct` adds the step's offset to the source row only; `ddpm` makes every row step
//!   with `eta = 1` and the step's noise map (the edited row too: that is what makes it
//!   edit-friendly).
//! - **ddpm's last step**: the noise maps are `z = (x_{t-1} - mean) / sigma_t`. Where
//!   `sigma_t` is 0 (a last step down to an alpha product of 1, `set_alpha_to_one`), the map
//!   holds the remaining difference `x_{t-1} - mean` itself (scale 1 instead of `sigma`), so the
//!   replay still ends exactly on the image; with `set_alpha_to_one = false` (SD's and the bundled
//!   model's configs) the last `sigma` is small but not 0 and the map is an ordinary one.

mod file;
mod null_text;
mod replay;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::analysis::image::{image_hash, RgbImage};
use crate::hook::{AttentionProcessor, CancelToken};
use crate::pipeline::limits::{
    available_memory, check_run_fits, estimate_run_memory, ModelFootprint, RunCapture,
};
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::sampling::{
    encode_prompt_batch, guided_model_outputs, validate_request, DenoiseStep, GenerateRequest,
};
use crate::pipeline::scheduler::ddim::DdimScheduler;
use crate::pipeline::scheduler::{Scheduler, SchedulerKind};
use crate::pipeline::{PipelineError, PipelineResult};

pub(crate) use replay::replay_scheduler;

/// How an image is inverted. Each is a documented choice; see the README for measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum InversionMethod {
    /// DDIM inversion at guidance 1 (the noise evaluated at the destination timestep); editing
    /// replays from `z*_T` with no correction.
    Ddim,
    /// Null-text inversion (Mokady et al.): per step, the unconditional embedding optimised with Adam
    /// so that guided sampling follows the DDIM trajectory.
    NullText,
    /// Negative-prompt inversion (Miyake et al. 2023): the source prompt's embedding as the
    /// unconditional one at every step.
    NegativePrompt,
    /// Direct inversion (Ju et al., ICLR 2024): the source branch is put back on the inverted
    /// trajectory after every step (the reference adds the per-step gap as an offset, which lands
    /// on the same latents); gradient-free, and no UNet call beyond the DDIM inversion's.
    Direct,
    /// Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024): noise maps that
    /// reproduce the image exactly under an eta = 1 sampler.
    Ddpm,
}

impl InversionMethod {
    /// Every method, in the order the UI lists them.
    pub const ALL: [Self; 5] = [
        Self::Ddim,
        Self::NullText,
        Self::NegativePrompt,
        Self::Direct,
        Self::Ddpm,
    ];

    /// The CLI name (`ddim`, `null-text`, `negative-prompt`, `direct`, `ddpm`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::NullText => "null-text",
            Self::NegativePrompt => "negative-prompt",
            Self::Direct => "direct",
            Self::Ddpm => "ddpm",
        }
    }

    /// True for the methods whose guided pass down the trajectory is the source branch of a
    /// replay (`direct`, `ddpm`): [`invert_observed`] then returns that branch ([`SourcePass`]).
    pub fn records_source_while_inverting(self) -> bool {
        matches!(self, Self::Direct | Self::Ddpm)
    }

    /// Every CLI name, comma-separated (for error messages).
    pub fn accepted_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl std::fmt::Display for InversionMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InversionMethod {
    type Err = PipelineError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|method| method.name() == text.trim())
            .ok_or_else(|| PipelineError::InvalidArgument {
                name: "inversion method",
                reason: format!(
                    "unknown method `{text}`; accepted: {}",
                    Self::accepted_names()
                ),
            })
    }
}

/// What to invert an image with.
#[derive(Clone, Debug, PartialEq)]
pub struct InversionRequest {
    /// A description of the image (the source prompt of later edits); must not be empty.
    pub prompt: String,
    /// The method.
    pub method: InversionMethod,
    /// DDIM steps of the trajectory (later runs that replay it use the same count).
    pub steps: usize,
    /// The guidance scale later runs replay with (null-text optimises for it; `ddim` inverts at 1
    /// whatever this says, and replays with it).
    pub guidance: f64,
    /// Seed of the independent noise draws of `ddpm`.
    pub seed: u64,
}

/// What regenerating the image needs beyond the start latents, per method.
#[derive(Clone, Debug)]
pub enum ReplayCorrection {
    /// `ddim`: nothing.
    None,
    /// `negative-prompt`: the source prompt is the negative prompt of the source branch.
    SourcePromptAsNegative,
    /// `null-text`: the optimised unconditional embedding of each step, `[steps, tokens, dim]`.
    UnconditionalEmbeddings(Tensor),
    /// `direct`: after step `i` the source branch's latents are the trajectory's `z*_{T-i-1}`
    /// (the edited branch steps freely).
    SourceFollowsTrajectory,
    /// `ddpm`: the noise map of each step for an eta = 1 DDIM step, `[steps, 1, c, h, w]`.
    NoiseMaps(Tensor),
}

/// An inverted image: everything an edit needs to replay it (saved as `inversion.safetensors`).
#[derive(Clone, Debug)]
pub struct Inversion {
    /// The method, prompt, steps and guidance it was made with.
    pub request: InversionRequest,
    /// The model's name ([`StableDiffusion::name`]); replaying on another model is refused.
    pub model_name: String,
    /// Image size in pixels (the fitted image).
    pub size_px: (usize, usize),
    /// [`crate::analysis::image::image_hash`] of the fitted image.
    pub image_hash: String,
    /// The DDIM timesteps of the replay, in sampling order (high to low), one per step.
    pub timesteps: Vec<f64>,
    /// `z*_0` (the image's latent) to `z*_T`: `[steps + 1, 1, c, h, w]` f32.
    pub trajectory: Tensor,
    /// What the replay adds to the plain DDIM step.
    pub correction: ReplayCorrection,
    /// Wall-clock seconds the inversion took.
    pub seconds: f64,
}

impl Inversion {
    /// The latents a replay starts from, `z*_T`: `[1, c, h, w]`.
    pub fn start_latents(&self) -> PipelineResult<Tensor> {
        let steps = self.timesteps.len();
        Ok(self.trajectory.get(steps)?)
    }

    /// Writes the inversion as safetensors (tensors plus a JSON header of the settings),
    /// atomically.
    ///
    /// Tensors (f32): `trajectory` `[steps + 1, 1, c, h, w]`, and by method
    /// `unconditional_embeddings` `[steps, tokens, dim]` or `noise_maps` `[steps, 1, c, h, w]`.
    /// The safetensors `__metadata__` holds `format` ([`INVERSION_FORMAT`]), `method`, `prompt`,
    /// `steps`, `guidance`, `seed`, `model`, `width`, `height`, `image_hash`, `timesteps` (a JSON
    /// list) and `seconds`.
    pub fn save(&self, path: &Path) -> PipelineResult<()> {
        file::save(self, path)
    }

    /// Reads an inversion written by [`Inversion::save`] and checks it against `model`: another
    /// model, size or a broken file is a clear error naming the file.
    pub fn load(path: &Path, model: &StableDiffusion) -> PipelineResult<Self> {
        file::load(path, model)
    }
}

/// Reported after every inversion step.
#[derive(Clone, Debug)]
pub struct InversionProgress {
    /// What is running (`"inverting"`, `"optimising null text"`, ...).
    pub phase: &'static str,
    /// Steps done in this phase.
    pub steps_done: usize,
    /// Steps of this phase.
    pub step_count: usize,
}

/// The `format` value of a saved inversion's metadata.
pub const INVERSION_FORMAT: &str = "attend-inversion/1";

/// The image's latent `z*_0`, `[1, c, h, w]` f32: the VAE posterior mean x the scaling factor, or the
/// pixels mapped to `[-1, 1]` for a pixel-space model. The image must already have the run's size.
pub fn encode_image(model: &StableDiffusion, image: &RgbImage) -> PipelineResult<Tensor> {
    check_image_size(model, image)?;
    let pixels = image_to_model_range(model, image)?;
    match &model.vae {
        Some(vae) => {
            let mean = vae
                .encode_mean(&pixels.to_dtype(model.dtype())?)?
                .to_dtype(DType::F32)?;
            Ok(mean.affine(model.latent_scaling_factor(), 0.0)?)
        }
        None => Ok(pixels),
    }
}

/// `image` as `[1, 3, h, w]` f32 in `[-1, 1]` (`x / 127.5 - 1`) on the model's device.
fn image_to_model_range(model: &StableDiffusion, image: &RgbImage) -> PipelineResult<Tensor> {
    let values: Vec<f32> = image.pixels.iter().map(|&value| f32::from(value)).collect();
    let hwc = Tensor::from_vec(values, (image.height, image.width, 3), model.device())?;
    Ok(hwc
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?
        .affine(1.0 / 127.5, -1.0)?)
}

/// Checks that `image` is consistent and has a size the model accepts (the checks of a
/// generation request of that size).
fn check_image_size(model: &StableDiffusion, image: &RgbImage) -> PipelineResult<[usize; 4]> {
    if !image.is_consistent() {
        return Err(PipelineError::InvalidArgument {
            name: "image",
            reason: format!(
                "a {}x{} image holds {} bytes, expected {}",
                image.width,
                image.height,
                image.pixels.len(),
                image.width * image.height * 3
            ),
        });
    }
    let mut request = GenerateRequest::new(model, "");
    request.width = image.width;
    request.height = image.height;
    request.steps = 1;
    request.guidance = 1.0;
    validate_request(model, &request)
}

/// Inverts `image` (already fitted to a size the model accepts) with `request`, reporting progress
/// through `on_step` (an error from it stops the inversion) and checking `cancel` before every
/// UNet call.
///
/// Every method but `ddpm` first walks the DDIM trajectory up at guidance 1 with the prompt
/// (`steps` UNet calls, phase `"inverting"`), which is all `direct` needs; `ddpm` draws each `x_t`
/// from the image with fresh noise and solves for the noise maps (`"solving noise maps"`).
pub fn invert(
    model: &StableDiffusion,
    image: &RgbImage,
    request: &InversionRequest,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<Arc<Inversion>> {
    Ok(invert_observed(model, image, request, None, on_step, cancel)?.0)
}

/// The source branch of a replay, as an exact inversion knows it.
///
/// `ddpm` walks down once with guidance from `z*_T`, and `direct`'s source row is the trajectory
/// itself; with an observer, each feeds the UNet exactly what a replay's source row then feeds
/// it: that pass *is* the source branch of every later edit. Kept, it spares the edit the
/// separate source run (see [`invert_observed`]).
#[derive(Clone, Debug)]
pub struct SourcePass {
    /// The source row's latents after each step, bit-identical to a replay's:
    /// `[steps, 1, c, h, w]` f32.
    pub latents_per_step: Tensor,
}

/// [`invert`], with `observer` (when given) on the attention of the guided pass of the exact
/// methods (`direct`, `ddpm`), which steps through the very latents a replay's source row steps
/// through (guidance, text embeddings, batch layout and timesteps as the replay's): the observer
/// sees what it would see on the replay's source run, and [`SourcePass`] holds that run's latents.
/// It is told when each step is over. The other methods return no [`SourcePass`] and never call
/// `observer` (their guided replay differs from anything the inversion runs).
pub fn invert_observed(
    model: &StableDiffusion,
    image: &RgbImage,
    request: &InversionRequest,
    observer: Option<&mut (dyn AttentionProcessor + '_)>,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<(Arc<Inversion>, Option<SourcePass>)> {
    let started = Instant::now();
    let run = InversionRun::new(model, image, request)?;
    if cancel.is_cancelled() {
        return Err(PipelineError::Cancelled);
    }
    let image_latents = encode_image(model, image)?;
    let mut source_pass = None;
    let (trajectory, correction) = match request.method {
        InversionMethod::Ddim => (
            run.ddim_trajectory(&image_latents, on_step, cancel)?,
            ReplayCorrection::None,
        ),
        InversionMethod::NegativePrompt => (
            run.ddim_trajectory(&image_latents, on_step, cancel)?,
            ReplayCorrection::SourcePromptAsNegative,
        ),
        InversionMethod::NullText => {
            let trajectory = run.ddim_trajectory(&image_latents, on_step, cancel)?;
            let unconditional_start = run.guided_embeddings.narrow(0, 0, 1)?;
            let optimised = null_text::optimise_null_text(
                model,
                &trajectory,
                run.ddim.timesteps(),
                &run.conditional,
                &unconditional_start,
                request.guidance,
                on_step,
                cancel,
            )?;
            (
                trajectory,
                ReplayCorrection::UnconditionalEmbeddings(optimised.embeddings),
            )
        }
        InversionMethod::Direct => {
            let trajectory = run.ddim_trajectory(&image_latents, on_step, cancel)?;
            source_pass = Some(run.direct_source_pass(&trajectory, observer, on_step, cancel)?);
            (trajectory, ReplayCorrection::SourceFollowsTrajectory)
        }
        InversionMethod::Ddpm => {
            let (trajectory, maps, pass) =
                run.ddpm_noise_maps(&image_latents, observer, on_step, cancel)?;
            source_pass = Some(pass);
            (trajectory, ReplayCorrection::NoiseMaps(maps))
        }
    };
    let inversion = Arc::new(Inversion {
        request: request.clone(),
        model_name: model.name().to_string(),
        size_px: (image.width, image.height),
        image_hash: image_hash(image),
        timesteps: run.ddim.timesteps().to_vec(),
        trajectory,
        correction,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok((inversion, source_pass))
}

/// A DDIM trajectory of `image` (already fitted to a size the model accepts) walked up with
/// classifier-free guidance at `guidance` (`["", prompt]`; 1 or less: the prompt alone), as Style
/// Aligned inverts its reference image (guidance 2). Returns the trajectory `z*_0` (the image's
/// latents) to `z*_T`, `[steps + 1, 1, c, h, w]` f32, and the DDIM timesteps of the steps that
/// come back down, in sampling order. Progress as [`invert`] reports it (phase `"inverting"`).
pub fn ddim_trajectory_with_guidance(
    model: &StableDiffusion,
    image: &RgbImage,
    prompt: &str,
    steps: usize,
    guidance: f64,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<(Tensor, Vec<f64>)> {
    let request = InversionRequest {
        prompt: prompt.to_string(),
        method: InversionMethod::Ddim,
        steps,
        guidance,
        seed: 0,
    };
    let run = InversionRun::new(model, image, &request)?;
    if cancel.is_cancelled() {
        return Err(PipelineError::Cancelled);
    }
    let image_latents = encode_image(model, image)?;
    let trajectory = run.ddim_trajectory_guided(&image_latents, run.guided(), on_step, cancel)?;
    Ok((trajectory, run.ddim.timesteps().to_vec()))
}

/// An inversion's checked settings, scheduler and text embeddings.
struct InversionRun<'model> {
    model: &'model StableDiffusion,
    request: InversionRequest,
    ddim: DdimScheduler,
    /// The prompt alone, `[1, tokens, dim]` (the DDIM trajectory's guidance 1).
    conditional: Tensor,
    /// `["", prompt]`, `[2, tokens, dim]`, encoded as a replay encodes them.
    guided_embeddings: Tensor,
    latent_shape: [usize; 4],
}

impl<'model> InversionRun<'model> {
    /// Checks `request` and `image` as a generation of that size would be checked (steps,
    /// guidance, size, memory) and encodes the prompt.
    fn new(
        model: &'model StableDiffusion,
        image: &RgbImage,
        request: &InversionRequest,
    ) -> PipelineResult<Self> {
        if request.prompt.trim().is_empty() {
            return Err(PipelineError::InvalidArgument {
                name: "prompt",
                reason: "an inversion needs a prompt describing the image (it is the source \
                         prompt of later edits)"
                    .to_string(),
            });
        }
        check_image_size(model, image)?;
        let mut generate = GenerateRequest::new(model, request.prompt.clone());
        generate.width = image.width;
        generate.height = image.height;
        generate.steps = request.steps;
        generate.guidance = request.guidance;
        generate.seed = request.seed;
        generate.scheduler = Some(SchedulerKind::Ddim);
        let latent_shape = validate_request(model, &generate)?;
        let memory = estimate_run_memory(
            &ModelFootprint::of_model(model),
            &generate,
            &RunCapture::none(),
        );
        check_run_fits(&memory, &available_memory())?;
        let ddim = DdimScheduler::new(&model.scheduler_config, request.steps)?;
        // Tokenised exactly as the replay's run tokenises them (prompt syntax, chunks of a long
        // prompt, the empty negative prompt padded to the same chunk count).
        let prompt_tokens = model.tokenizer.encode_prompt(&request.prompt)?;
        let mut empty_tokens = model.tokenizer.encode_prompt("")?;
        model
            .tokenizer
            .pad_to_chunks(&mut empty_tokens, prompt_tokens.chunk_count);
        let conditional = encode_prompt_batch(model, &[&prompt_tokens], &empty_tokens, false)?;
        let guided_embeddings = encode_prompt_batch(model, &[&prompt_tokens], &empty_tokens, true)?;
        Ok(Self {
            model,
            request: request.clone(),
            ddim,
            conditional,
            guided_embeddings,
            latent_shape,
        })
    }

    fn steps(&self) -> usize {
        self.request.steps
    }

    fn guided(&self) -> bool {
        self.request.guidance > 1.0
    }

    /// The model output for `latents` at sampling step `step_index`, with the guidance of the
    /// replay (`guided`) or the prompt alone; `cancel` checked first.
    fn model_output(
        &self,
        latents: &Tensor,
        step_index: usize,
        guided: bool,
        cancel: &CancelToken,
    ) -> PipelineResult<Tensor> {
        self.observed_model_output(latents, step_index, guided, None, cancel)
    }

    /// [`InversionRun::model_output`] with `observer` (when given) on the attention hook, told
    /// when the step is over.
    fn observed_model_output(
        &self,
        latents: &Tensor,
        step_index: usize,
        guided: bool,
        mut observer: Option<&mut (dyn AttentionProcessor + '_)>,
        cancel: &CancelToken,
    ) -> PipelineResult<Tensor> {
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let step = DenoiseStep {
            step_index,
            step_count: self.steps(),
            timestep: self.ddim.timesteps()[step_index],
            guidance: if guided { self.request.guidance } else { 1.0 },
            guided,
            cancel: Some(cancel.clone()),
            unconditional: None,
        };
        let embeddings = if guided {
            &self.guided_embeddings
        } else {
            &self.conditional
        };
        let mut outputs = guided_model_outputs(
            self.model,
            std::slice::from_ref(latents),
            &step,
            embeddings,
            observer.as_deref_mut(),
        )?;
        if let Some(observer) = observer {
            observer.step_finished(step_index)?;
        }
        Ok(outputs.remove(0))
    }

    /// DDIM inversion at guidance 1: `z*_0 = image_latents` up to `z*_T`, `[steps + 1, 1, c, h, w]`.
    /// Inversion step `k` mirrors sampling step `steps - 1 - k`: from `t - train / steps` to `t`
    /// with the noise predicted at `t` ([`DdimScheduler::inverse_step`]).
    fn ddim_trajectory(
        &self,
        image_latents: &Tensor,
        on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
        cancel: &CancelToken,
    ) -> PipelineResult<Tensor> {
        self.ddim_trajectory_guided(image_latents, false, on_step, cancel)
    }

    /// [`InversionRun::ddim_trajectory`] with the noise predicted at the request's guidance
    /// (`guided`, `["", prompt]`) or the prompt alone.
    fn ddim_trajectory_guided(
        &self,
        image_latents: &Tensor,
        guided: bool,
        on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
        cancel: &CancelToken,
    ) -> PipelineResult<Tensor> {
        let steps = self.steps();
        let mut trajectory = Vec::with_capacity(steps + 1);
        let mut latents = image_latents.clone();
        trajectory.push(latents.clone());
        for done in 0..steps {
            let step_index = steps - 1 - done;
            let output = self.model_output(&latents, step_index, guided, cancel)?;
            latents = self.ddim.inverse_step(&output, step_index, &latents)?;
            check_finite(&latents, "the inverted latents", step_index, steps)?;
            trajectory.push(latents.clone());
            on_step(&InversionProgress {
                phase: "inverting",
                steps_done: done + 1,
                step_count: steps,
            })?;
        }
        Ok(Tensor::stack(&trajectory, 0)?)
    }

    /// Direct inversion's source branch: after step `i` its latents are `z*_{T-i-1}`, so they are
    /// known without a UNet call. With `observer`, each step's UNet call is run as a replay's
    /// source row runs it (the prompt alone, see
    /// [`GenerateRequest::source_row_uses_guidance`]) on the step's input latents, so the
    /// observer sees that row's attention (phase `"recording the source"`).
    fn direct_source_pass(
        &self,
        trajectory: &Tensor,
        observer: Option<&mut (dyn AttentionProcessor + '_)>,
        on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
        cancel: &CancelToken,
    ) -> PipelineResult<SourcePass> {
        let steps = self.steps();
        if let Some(observer) = observer {
            for step_index in 0..steps {
                let latents = trajectory.get(steps - step_index)?;
                self.observed_model_output(&latents, step_index, false, Some(observer), cancel)?;
                on_step(&InversionProgress {
                    phase: "recording the source",
                    steps_done: step_index + 1,
                    step_count: steps,
                })?;
            }
        }
        let latents_per_step = (0..steps)
            .map(|step_index| trajectory.get(steps - step_index - 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(SourcePass {
            latents_per_step: Tensor::stack(&latents_per_step, 0)?,
        })
    }

    /// Edit-friendly DDPM inversion: each `x_t` drawn independently from the image with seeded
    /// noise (`x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n`), then from `x_T` down, per sampling step,
    /// the noise map `z = (x_{t-1} - mean(x_t)) / s` of an `eta = 1` DDIM step (`s` its `sigma`,
    /// or 1 where `sigma` is 0, see [`replay::noise_map_scale`]), and `x_{t-1}` replaced by
    /// `mean + s z` exactly as the replay computes it. Returns the trajectory
    /// `[steps + 1, 1, c, h, w]` (`x_0` the image's latents), the maps `[steps, 1, c, h, w]` and
    /// the pass down as the replay's source row ([`SourcePass`]: every UNet call sees the latents
    /// that row sees; `observer` on its attention).
    fn ddpm_noise_maps(
        &self,
        image_latents: &Tensor,
        mut observer: Option<&mut (dyn AttentionProcessor + '_)>,
        on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
        cancel: &CancelToken,
    ) -> PipelineResult<(Tensor, Tensor, SourcePass)> {
        let steps = self.steps();
        let mut rng = NoiseRng::new(self.request.seed);
        // xs[k]: the latents at the k-th smallest timestep (xs[0]: the image).
        let mut xs = Vec::with_capacity(steps + 1);
        xs.push(image_latents.clone());
        for k in 1..=steps {
            let alpha = self.ddim.alpha_product_at_step(steps - k)?;
            let noise = rng.randn(self.latent_shape.to_vec(), image_latents.device())?;
            xs.push(
                (image_latents.affine(alpha.sqrt(), 0.0)?
                    + noise.affine((1.0 - alpha).sqrt(), 0.0)?)?,
            );
        }
        let mut maps = Vec::with_capacity(steps);
        for step_index in 0..steps {
            let k = steps - step_index;
            let output = self.observed_model_output(
                &xs[k],
                step_index,
                self.guided(),
                observer.as_deref_mut(),
                cancel,
            )?;
            let (mean, sigma) = self
                .ddim
                .step_mean_and_sigma(&output, step_index, &xs[k], 1.0)?;
            let scale = replay::noise_map_scale(sigma);
            let map = (&xs[k - 1] - &mean)?.affine(1.0 / scale, 0.0)?;
            xs[k - 1] = (mean + map.affine(scale, 0.0)?)?;
            check_finite(&map, "the noise maps", step_index, steps)?;
            maps.push(map);
            on_step(&InversionProgress {
                phase: "solving noise maps",
                steps_done: step_index + 1,
                step_count: steps,
            })?;
        }
        let latents_per_step: Vec<Tensor> = xs[..steps].iter().rev().cloned().collect();
        Ok((
            Tensor::stack(&xs, 0)?,
            Tensor::stack(&maps, 0)?,
            SourcePass {
                latents_per_step: Tensor::stack(&latents_per_step, 0)?,
            },
        ))
    }
}

/// Refuses NaN or infinite values found after `step_index`.
fn check_finite(
    tensor: &Tensor,
    what: &str,
    step_index: usize,
    steps: usize,
) -> PipelineResult<()> {
    if crate::pipeline::sampling::all_finite(tensor)? {
        return Ok(());
    }
    Err(PipelineError::NonFinite {
        what: format!("{what} at step {} of {steps}", step_index + 1),
        step_index: Some(step_index),
        hint: "likely the model's weights hold NaN or infinite values, or the guidance is too \
               large; the inversion was stopped"
            .to_string(),
    })
}
