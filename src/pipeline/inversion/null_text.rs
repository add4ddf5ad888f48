//! Null-text inversion (Mokady et al.): per step, Adam on the unconditional embedding so that
//! guided DDIM sampling follows the inverted trajectory. Gradients flow through the UNet by
//! candle's autograd (the UNet's layers take a differentiable path when their input tracks
//! gradients; the fused kernels otherwise).
//!
//! Per sampling step `i` at timestep `t` (latent `z` = `z*_T` at the first step, thereafter the
//! latent the previous step produced with its optimised embedding):
//! 1. the conditional noise, once, without gradients;
//! 2. up to [`INNER_ITERATIONS`] Adam iterations (learning rate `1e-2 * (1 - i / 100)`, a fresh
//!    optimiser per step) on the unconditional embedding, starting from the previous step's
//!    result, of `loss = MSE(ddim_step(eps_u + g (eps_c - eps_u), t, z), z*_{t-1})`; the iteration
//!    whose loss (measured before its update) is below `1e-5 + i * 2e-5` is the last;
//! 3. `z` advances with the optimised embedding (one guided CFG batch, no gradients).

use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::InversionProgress;
use crate::hook::CancelToken;
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::scheduler::config::{PredictionType, SchedulerConfig};
use crate::pipeline::scheduler::schedule::training_alphas_cumprod;
use crate::pipeline::{PipelineError, PipelineResult};

/// Adam iterations per step at most.
pub(crate) const INNER_ITERATIONS: usize = 10;

/// Learning rate of the first step; step `i` uses `BASE_LEARNING_RATE * (1 - i / 100)`.
const BASE_LEARNING_RATE: f64 = 1e-2;

/// Early-stop threshold of the first step; step `i` stops below `EARLY_STOP_LOSS + i *
/// EARLY_STOP_LOSS_PER_STEP`.
const EARLY_STOP_LOSS: f64 = 1e-5;

/// How much the early-stop threshold grows per step.
const EARLY_STOP_LOSS_PER_STEP: f64 = 2e-5;

/// What null-text optimisation produced.
pub(crate) struct NullTextResult {
    /// Optimised unconditional embedding per sampling step, `[steps, tokens, dim]` (index i = step i, sampling order).
    pub embeddings: Tensor,
    /// Loss after each inner iteration, per step.
    pub losses: Vec<Vec<f32>>,
}

/// DDIM's deterministic update (`eta = 0`) on the model's scheduler settings, with explicit
/// timesteps, built from candle operations that have a backward (so a loss on its result reaches
/// the model output). Same arithmetic as the sampling scheduler
/// (`crate::pipeline::scheduler::ddim`): previous timestep `t - train_steps / steps`, the final
/// alpha product below index 0, optional clipping of the predicted clean sample.
#[derive(Clone, Debug)]
pub(crate) struct DdimUpdate {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_range: Option<f64>,
}

impl DdimUpdate {
    /// The update of a `steps`-step schedule under `config` (`steps` >= 1).
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> PipelineResult<Self> {
        let train_steps = config.num_train_timesteps;
        if steps == 0 || steps > train_steps {
            return Err(PipelineError::InvalidArgument {
                name: "steps",
                reason: format!("must be 1..={train_steps}, got {steps}"),
            });
        }
        let alphas_cumprod = training_alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod.first().copied().unwrap_or(1.0)
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: i64::try_from(train_steps / steps).unwrap_or(i64::MAX),
            prediction_type: config.prediction_type,
            clip_range: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range),
        })
    }

    /// `alphas_cumprod[t]`, the final alpha product below 0 (or past the table).
    pub(crate) fn alpha_product(&self, timestep: i64) -> f64 {
        usize::try_from(timestep)
            .ok()
            .and_then(|index| self.alphas_cumprod.get(index).copied())
            .unwrap_or(self.final_alpha_cumprod)
    }

    /// The timestep one step below `timestep` (may be negative: the final alpha product).
    pub(crate) fn previous_timestep(&self, timestep: f64) -> i64 {
        whole_timestep(timestep) - self.step_ratio
    }

    /// `(predicted clean sample, predicted noise)` from `model_output` on `sample` at a timestep
    /// whose alpha product is `alpha`, per the prediction type; same shapes as `sample`.
    pub(crate) fn clean_and_noise(
        &self,
        model_output: &Tensor,
        alpha: f64,
        sample: &Tensor,
    ) -> PipelineResult<(Tensor, Tensor)> {
        let beta = 1.0 - alpha;
        let weighted = |a: f64, x: &Tensor, b: f64, y: &Tensor| -> PipelineResult<Tensor> {
            Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
        };
        let (clean, noise) = match self.prediction_type {
            PredictionType::Epsilon => (
                weighted(
                    1.0 / alpha.sqrt(),
                    sample,
                    -beta.sqrt() / alpha.sqrt(),
                    model_output,
                )?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                weighted(
                    1.0 / beta.sqrt(),
                    sample,
                    -alpha.sqrt() / beta.sqrt(),
                    model_output,
                )?,
            ),
            PredictionType::VPrediction => (
                weighted(alpha.sqrt(), sample, -beta.sqrt(), model_output)?,
                weighted(alpha.sqrt(), model_output, beta.sqrt(), sample)?,
            ),
        };
        Ok((clean, noise))
    }

    /// `z_{t-1}` from `sample` `z_t` and the (guided) `model_output` at `timestep`, `[b, c, h, w]`.
    pub(crate) fn previous(
        &self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> PipelineResult<Tensor> {
        let alpha = self.alpha_product(whole_timestep(timestep));
        let alpha_previous = self.alpha_product(self.previous_timestep(timestep));
        let (clean, noise) = self.clean_and_noise(model_output, alpha, sample)?;
        let clean = match self.clip_range {
            Some(range) => clean.clamp(-range, range)?,
            None => clean,
        };
        Ok((clean.affine(alpha_previous.sqrt(), 0.0)?
            + noise.affine((1.0 - alpha_previous).sqrt(), 0.0)?)?)
    }
}

/// DDIM timesteps are whole numbers.
fn whole_timestep(timestep: f64) -> i64 {
    timestep.round() as i64
}

/// `eps_u + guidance * (eps_c - eps_u)`.
fn guided(unconditional: &Tensor, conditional: &Tensor, guidance: f64) -> PipelineResult<Tensor> {
    Ok((unconditional + ((conditional - unconditional)? * guidance)?)?)
}

/// What one step's inner iterations share: the latent `z` `[1, c, h, w]` at `timestep`, the
/// conditional noise computed once, the guidance and the target `z*_{t-1}`.
pub(crate) struct NullTextStep<'a> {
    /// The model.
    pub model: &'a StableDiffusion,
    /// The DDIM update.
    pub update: &'a DdimUpdate,
    /// `z`, `[1, c, h, w]` f32.
    pub latent: &'a Tensor,
    /// The step's timestep.
    pub timestep: f64,
    /// The conditional noise on `latent`, `[1, c, h, w]` f32.
    pub conditional_noise: &'a Tensor,
    /// Guidance scale.
    pub guidance: f64,
    /// `z*_{t-1}`, `[1, c, h, w]` f32.
    pub target: &'a Tensor,
}

impl NullTextStep<'_> {
    /// The null-text loss as a scalar tensor (tracked when `unconditional` is a [`Var`]'s
    /// tensor): the UNet's noise for `unconditional` `[1, tokens, dim]`, guided with the
    /// conditional noise, one DDIM step, mean squared error against the target.
    pub(crate) fn loss(&self, unconditional: &Tensor) -> PipelineResult<Tensor> {
        let unconditional_noise = self
            .model
            .unet
            .forward(self.latent, self.timestep, unconditional, None)?
            .to_dtype(DType::F32)?;
        let noise = guided(&unconditional_noise, self.conditional_noise, self.guidance)?;
        let previous = self.update.previous(&noise, self.timestep, self.latent)?;
        Ok((previous - self.target)?.sqr()?.mean_all()?)
    }
}

/// One guided DDIM step of `latent` `[1, c, h, w]` at `timestep` with a CFG batch of the
/// `unconditional` and `conditional` embeddings (`[1, tokens, dim]` each), no gradients: the
/// sampler's arithmetic, so a replay with the same embeddings takes the same path.
pub(crate) fn guided_ddim_step(
    model: &StableDiffusion,
    update: &DdimUpdate,
    latent: &Tensor,
    timestep: f64,
    unconditional: &Tensor,
    conditional: &Tensor,
    guidance: f64,
) -> PipelineResult<Tensor> {
    let batch = Tensor::cat(&[latent, latent], 0)?;
    let context = Tensor::cat(&[&unconditional.detach(), &conditional.detach()], 0)?;
    let noise = model
        .unet
        .forward(&batch, timestep, &context, None)?
        .to_dtype(DType::F32)?;
    let noise = guided(&noise.narrow(0, 0, 1)?, &noise.narrow(0, 1, 1)?, guidance)?;
    update.previous(&noise, timestep, latent)
}

/// Checks the shapes: `trajectory` `[steps + 1, 1, c, h, w]`, one timestep per step, both
/// embeddings `[1, tokens, dim]` alike, a finite guidance.
fn check_inputs(
    trajectory: &Tensor,
    timesteps: &[f64],
    conditional: &Tensor,
    unconditional_start: &Tensor,
    guidance: f64,
) -> PipelineResult<()> {
    let steps = timesteps.len();
    let trajectory_ok = matches!(trajectory.dims(), [count, 1, _, _, _] if *count == steps + 1);
    if steps == 0 || !trajectory_ok {
        return Err(PipelineError::InvalidArgument {
            name: "trajectory",
            reason: format!(
                "expected [steps + 1, 1, c, h, w] with {steps} steps (at least 1), got {:?}",
                trajectory.dims()
            ),
        });
    }
    if timesteps.iter().any(|timestep| !timestep.is_finite()) {
        return Err(PipelineError::InvalidArgument {
            name: "timesteps",
            reason: format!("must be finite, got {timesteps:?}"),
        });
    }
    let embedding_ok = matches!(conditional.dims(), [1, _, _]);
    if !embedding_ok || unconditional_start.dims() != conditional.dims() {
        return Err(PipelineError::InvalidArgument {
            name: "text embeddings",
            reason: format!(
                "expected conditional and unconditional [1, tokens, dim] alike, got {:?} and {:?}",
                conditional.dims(),
                unconditional_start.dims()
            ),
        });
    }
    if !guidance.is_finite() {
        return Err(PipelineError::InvalidArgument {
            name: "guidance",
            reason: format!("must be finite, got {guidance}"),
        });
    }
    Ok(())
}

/// Null-text optimisation over a DDIM inversion `trajectory` (`[steps + 1, 1, c, h, w]`: `z*_0`
/// .. `z*_T`, inverted at guidance 1) with `timesteps` in sampling order (one per step), the
/// source prompt's `conditional` embedding and the `""` embedding `unconditional_start` (both
/// `[1, tokens, dim]`), for sampling at `guidance`.
///
/// Reports each finished step through `on_step` (an error from it stops the optimisation) and
/// checks `cancel` before every UNet call ([`PipelineError::Cancelled`]).
#[allow(clippy::too_many_arguments)] // the inversion module's agreed interface
pub(crate) fn optimise_null_text(
    model: &StableDiffusion,
    trajectory: &Tensor,
    timesteps: &[f64],
    conditional: &Tensor,
    unconditional_start: &Tensor,
    guidance: f64,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<NullTextResult> {
    check_inputs(
        trajectory,
        timesteps,
        conditional,
        unconditional_start,
        guidance,
    )?;
    let check_cancel = || {
        if cancel.is_cancelled() {
            Err(PipelineError::Cancelled)
        } else {
            Ok(())
        }
    };
    let steps = timesteps.len();
    let update = DdimUpdate::new(&model.scheduler_config, steps)?;
    let device = model.device();
    let trajectory = trajectory.to_device(device)?.to_dtype(DType::F32)?;
    let conditional = conditional.to_device(device)?.detach();
    let mut unconditional = unconditional_start
        .to_device(device)?
        .to_dtype(DType::F32)?
        .detach();
    let mut latent = trajectory.get(steps)?;
    let mut embeddings = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(steps);
    for (step_index, &timestep) in timesteps.iter().enumerate() {
        let target = trajectory.get(steps - step_index - 1)?;
        check_cancel()?;
        let conditional_noise = model
            .unet
            .forward(&latent, timestep, &conditional, None)?
            .to_dtype(DType::F32)?;
        // A fresh variable (own storage) and optimiser per step, as the reference does.
        let variable = Var::from_tensor(&unconditional.copy()?)?;
        let learning_rate = BASE_LEARNING_RATE * (1.0 - step_index as f64 / 100.0);
        let mut optimiser = AdamW::new(
            vec![variable.clone()],
            ParamsAdamW {
                lr: learning_rate,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        let threshold = EARLY_STOP_LOSS + step_index as f64 * EARLY_STOP_LOSS_PER_STEP;
        let step = NullTextStep {
            model,
            update: &update,
            latent: &latent,
            timestep,
            conditional_noise: &conditional_noise,
            guidance,
            target: &target,
        };
        let mut step_losses = Vec::with_capacity(INNER_ITERATIONS);
        for _ in 0..INNER_ITERATIONS {
            check_cancel()?;
            let loss = step.loss(variable.as_tensor())?;
            let gradients = loss.backward()?;
            optimiser.step(&gradients)?;
            let loss = loss.to_scalar::<f32>()?;
            step_losses.push(loss);
            if f64::from(loss) < threshold {
                break;
            }
        }
        unconditional = variable.as_tensor().detach().copy()?;
        check_cancel()?;
        latent = guided_ddim_step(
            model,
            &update,
            &latent,
            timestep,
            &unconditional,
            &conditional,
            guidance,
        )?;
        embeddings.push(unconditional.clone());
        losses.push(step_losses);
        on_step(&InversionProgress {
            phase: "optimising null text",
            steps_done: step_index + 1,
            step_count: steps,
        })?;
    }
    Ok(NullTextResult {
        embeddings: Tensor::cat(&embeddings, 0)?,
        losses,
    })
}
