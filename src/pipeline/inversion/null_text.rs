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

// The inversion module's `null-text` method is this module's only caller; without it the
// library uses none of it (remove once `invert` calls `optimise_null_text`).

use candle_core::{DType, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::InversionProgress;
use crate::hook::CancelToken;
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::scheduler::ddim::DdimScheduler;
use crate::pipeline::scheduler::Scheduler;
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
    /// Loss after each inner iteration, per step (read by the tests; the engine keeps only the
    /// embeddings).
    #[cfg_attr(not(test), allow(dead_code))]
    pub losses: Vec<Vec<f32>>,
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
    /// The DDIM schedule the trajectory was inverted on.
    pub ddim: &'a DdimScheduler,
    /// The sampling step, 0-based.
    pub step_index: usize,
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
        let previous = self
            .ddim
            .previous_sample(&noise, self.step_index, self.latent)?;
        Ok((previous - self.target)?.sqr()?.mean_all()?)
    }
}

/// One guided DDIM step (sampling step `step_index` of `ddim`) of `latent` `[1, c, h, w]` with a CFG
/// batch of the `unconditional` and `conditional` embeddings (`[1, tokens, dim]` each), no
/// gradients: the sampler's arithmetic, so a replay with the same embeddings takes the same path.
pub(crate) fn guided_ddim_step(
    model: &StableDiffusion,
    ddim: &DdimScheduler,
    latent: &Tensor,
    step_index: usize,
    unconditional: &Tensor,
    conditional: &Tensor,
    guidance: f64,
) -> PipelineResult<Tensor> {
    let timestep = ddim_timestep(ddim, step_index)?;
    let batch = Tensor::cat(&[latent, latent], 0)?;
    let context = Tensor::cat(&[&unconditional.detach(), &conditional.detach()], 0)?;
    let noise = model
        .unet
        .forward(&batch, timestep, &context, None)?
        .to_dtype(DType::F32)?;
    let noise = guided(&noise.narrow(0, 0, 1)?, &noise.narrow(0, 1, 1)?, guidance)?;
    ddim.previous_sample(&noise, step_index, latent)
}

/// The timestep of sampling step `step_index` of `ddim`.
fn ddim_timestep(ddim: &DdimScheduler, step_index: usize) -> PipelineResult<f64> {
    ddim.timesteps()
        .get(step_index)
        .copied()
        .ok_or_else(|| PipelineError::InvalidArgument {
            name: "step_index",
            reason: format!(
                "step {step_index} is past the last step of a {}-step schedule",
                ddim.timesteps().len()
            ),
        })
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
    let ddim = DdimScheduler::new(&model.scheduler_config, steps)?;
    if ddim.timesteps() != timesteps {
        return Err(PipelineError::InvalidArgument {
            name: "timesteps",
            reason: format!(
                "{timesteps:?} are not the model's {steps}-step DDIM timesteps {:?}",
                ddim.timesteps()
            ),
        });
    }
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
            ddim: &ddim,
            step_index,
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
            &ddim,
            &latent,
            step_index,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::pipeline::model::LoadOptions;
    use crate::pipeline::sampling::encode_prompt_batch;

    fn load(relative: &str) -> StableDiffusion {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        StableDiffusion::load(&dir, &LoadOptions::default()).unwrap()
    }

    /// `(unconditional "", conditional prompt)` embeddings, `[1, tokens, dim]` each.
    fn embeddings(model: &StableDiffusion, prompt: &str) -> (Tensor, Tensor) {
        let tokens = model.tokenizer.encode(prompt).unwrap();
        let empty = model.tokenizer.encode("").unwrap();
        let both = encode_prompt_batch(model, &[&tokens], &empty, true)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        (both.narrow(0, 0, 1).unwrap(), both.narrow(0, 1, 1).unwrap())
    }

    /// A smooth test picture `[1, 3, size, size]` in [-1, 1]: a disc on a diagonal gradient.
    fn picture(size: usize) -> Tensor {
        let mut values = Vec::with_capacity(3 * size * size);
        let centre = size as f32 * 0.55;
        for channel in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let (fx, fy) = (x as f32, y as f32);
                    let inside = (fx - centre).hypot(fy - centre * 0.8) < size as f32 * 0.25;
                    let background = (fx + fy) / (2.0 * size as f32) - 0.5;
                    let value = match (inside, channel) {
                        (true, 0) => 0.8,
                        (true, _) => -0.6,
                        (false, _) => background * (channel as f32 + 1.0) * 0.5,
                    };
                    values.push(value);
                }
            }
        }
        Tensor::from_vec(values, (1, 3, size, size), &candle_core::Device::Cpu).unwrap()
    }

    /// `z*_0`: the VAE posterior mean x the scaling factor, or the pixels in pixel space.
    fn image_latent(model: &StableDiffusion, size_px: usize) -> Tensor {
        let image = picture(size_px);
        match &model.vae {
            Some(vae) => vae
                .encode_mean(&image)
                .unwrap()
                .affine(model.latent_scaling_factor(), 0.0)
                .unwrap(),
            None => image,
        }
    }

    fn timesteps(model: &StableDiffusion, steps: usize) -> Vec<f64> {
        DdimScheduler::new(&model.scheduler_config, steps)
            .unwrap()
            .timesteps()
            .to_vec()
    }

    /// DDIM inversion at guidance 1 (conditional embedding only): from `t - ratio` to `t`, the
    /// noise evaluated at the destination timestep `t`. `[steps + 1, 1, c, h, w]`.
    fn ddim_inversion(
        model: &StableDiffusion,
        ddim: &DdimScheduler,
        timesteps: &[f64],
        start: &Tensor,
        conditional: &Tensor,
    ) -> Tensor {
        let mut latent = start.clone();
        let mut latents = vec![latent.clone()];
        for (step_index, &timestep) in timesteps.iter().enumerate().rev() {
            let output = model
                .unet
                .forward(&latent, timestep, conditional, None)
                .unwrap();
            latent = ddim.inverse_step(&output, step_index, &latent).unwrap();
            latents.push(latent.clone());
        }
        Tensor::stack(&latents, 0).unwrap()
    }

    /// Guided DDIM from `z*_T` with `unconditional(i)` at step `i`; returns the final latent.
    fn replay(
        model: &StableDiffusion,
        ddim: &DdimScheduler,
        timesteps: &[f64],
        start: &Tensor,
        unconditional: impl Fn(usize) -> Tensor,
        conditional: &Tensor,
    ) -> Tensor {
        let mut latent = start.clone();
        for index in 0..timesteps.len() {
            latent = guided_ddim_step(
                model,
                ddim,
                &latent,
                index,
                &unconditional(index),
                conditional,
                7.5,
            )
            .unwrap();
        }
        latent
    }

    fn mean_squared_error(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Inverts a picture with `steps` steps, optimises the null text, replays both ways; returns
    /// `(null-text replay error, plain replay error)` against `z*_0` and checks the losses.
    fn invert_and_replay(model: &StableDiffusion, size_px: usize, steps: usize) -> (f32, f32) {
        let (unconditional, conditional) = embeddings(model, "a red circle");
        let timesteps = timesteps(model, steps);
        let ddim = DdimScheduler::new(&model.scheduler_config, steps).unwrap();
        let start = image_latent(model, size_px);
        let trajectory = ddim_inversion(model, &ddim, &timesteps, &start, &conditional);
        let mut reported = Vec::new();
        let result = optimise_null_text(
            model,
            &trajectory,
            &timesteps,
            &conditional,
            &unconditional,
            7.5,
            &mut |progress| {
                reported.push(progress.steps_done);
                Ok(())
            },
            &CancelToken::new(),
        )
        .unwrap();
        assert_eq!(reported, (1..=steps).collect::<Vec<_>>());
        assert_eq!(
            result.embeddings.dims(),
            &[
                steps,
                unconditional.dim(1).unwrap(),
                unconditional.dim(2).unwrap()
            ]
        );
        eprintln!("{}: losses per step {:?}", model.name(), result.losses);
        assert_eq!(result.losses.len(), steps);
        // The loss falls over the inner iterations of every step that iterated more than once,
        // and at least the first step did.
        assert!(result.losses[0].len() > 1, "{:?}", result.losses);
        for losses in &result.losses {
            assert!(!losses.is_empty() && losses.len() <= INNER_ITERATIONS);
            if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
                if losses.len() > 1 {
                    assert!(last < first, "{losses:?}");
                }
            }
        }
        let z_t = trajectory.get(steps).unwrap();
        let optimised = replay(
            model,
            &ddim,
            &timesteps,
            &z_t,
            |index| result.embeddings.narrow(0, index, 1).unwrap(),
            &conditional,
        );
        let plain = replay(
            model,
            &ddim,
            &timesteps,
            &z_t,
            |_| unconditional.clone(),
            &conditional,
        );
        let errors = (
            mean_squared_error(&optimised, &start),
            mean_squared_error(&plain, &start),
        );
        eprintln!(
            "{}: reconstruction MSE null-text {:e}, plain DDIM {:e}",
            model.name(),
            errors.0,
            errors.1
        );
        errors
    }

    #[test]
    fn null_text_reconstructs_closer_than_plain_ddim_on_tiny_sd1() {
        let model = load("tests/fixtures/tiny-sd1");
        let (optimised, plain) = invert_and_replay(&model, 32, 4);
        assert!(optimised < plain, "null-text {optimised}, plain {plain}");
    }

    #[test]
    fn null_text_reconstructs_closer_than_plain_ddim_on_the_bundled_model() {
        let model = load("assets/attend-shapes");
        let (optimised, plain) = invert_and_replay(&model, 32, 3);
        assert!(optimised < plain, "null-text {optimised}, plain {plain}");
    }

    #[test]
    fn a_cancelled_token_stops_before_any_unet_call() {
        let model = load("tests/fixtures/tiny-sd1");
        let (unconditional, conditional) = embeddings(&model, "a red circle");
        let timesteps = timesteps(&model, 2);
        let trajectory = Tensor::zeros((3, 1, 4, 16, 16), DType::F32, model.device()).unwrap();
        let cancel = CancelToken::new();
        cancel.cancel();
        let result = optimise_null_text(
            &model,
            &trajectory,
            &timesteps,
            &conditional,
            &unconditional,
            7.5,
            &mut |_| Ok(()),
            &cancel,
        );
        assert!(matches!(result, Err(PipelineError::Cancelled)));
    }

    #[test]
    fn mismatched_shapes_are_refused_with_the_value_named() {
        let model = load("tests/fixtures/tiny-sd1");
        let (unconditional, conditional) = embeddings(&model, "a red circle");
        let timesteps = timesteps(&model, 2);
        let trajectory = Tensor::zeros((2, 1, 4, 16, 16), DType::F32, model.device()).unwrap();
        let error = optimise_null_text(
            &model,
            &trajectory,
            &timesteps,
            &conditional,
            &unconditional,
            7.5,
            &mut |_| Ok(()),
            &CancelToken::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("trajectory"), "{error}");
        let error = optimise_null_text(
            &model,
            &Tensor::zeros((3, 1, 4, 16, 16), DType::F32, model.device()).unwrap(),
            &timesteps,
            &conditional,
            &unconditional.narrow(1, 0, 10).unwrap(),
            7.5,
            &mut |_| Ok(()),
            &CancelToken::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("text embeddings"), "{error}");
    }

    /// Timing of null-text inversion (not a check): `ATTEND_NULL_TEXT_MODEL` (a model folder,
    /// default the bundled model), `ATTEND_NULL_TEXT_SIZE_PX` (64), `ATTEND_NULL_TEXT_STEPS` (20)
    /// and `ATTEND_NULL_TEXT_TIMED_STEPS` (all: stop after this many optimised steps). Run with
    /// `cargo test --lib null_text::tests::time_null_text -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing run, minutes long"]
    fn time_null_text() {
        let setting = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
        let model = load(&setting("ATTEND_NULL_TEXT_MODEL", "assets/attend-shapes"));
        let size_px: usize = setting("ATTEND_NULL_TEXT_SIZE_PX", "64").parse().unwrap();
        let steps: usize = setting("ATTEND_NULL_TEXT_STEPS", "20").parse().unwrap();
        let timed_steps: usize = setting("ATTEND_NULL_TEXT_TIMED_STEPS", &steps.to_string())
            .parse()
            .unwrap();
        let (unconditional, conditional) = embeddings(&model, "a red circle");
        let timesteps = timesteps(&model, steps);
        let ddim = DdimScheduler::new(&model.scheduler_config, steps).unwrap();
        let start = image_latent(&model, size_px);
        let clock = std::time::Instant::now();
        let trajectory = ddim_inversion(&model, &ddim, &timesteps, &start, &conditional);
        eprintln!("DDIM inversion: {:.2} s", clock.elapsed().as_secs_f64());
        let clock = std::time::Instant::now();
        let mut last = 0.0;
        let result = optimise_null_text(
            &model,
            &trajectory,
            &timesteps,
            &conditional,
            &unconditional,
            7.5,
            &mut |progress| {
                let now = clock.elapsed().as_secs_f64();
                eprintln!("step {}: {:.2} s", progress.steps_done, now - last);
                last = now;
                if progress.steps_done >= timed_steps && timed_steps < steps {
                    Err(PipelineError::Cancelled)
                } else {
                    Ok(())
                }
            },
            &CancelToken::new(),
        );
        eprintln!(
            "{} at {size_px} px: {timed_steps} of {steps} steps in {:.2} s ({})",
            model.name(),
            clock.elapsed().as_secs_f64(),
            if result.is_ok() {
                "finished"
            } else {
                "stopped"
            }
        );
        if let Ok(result) = result {
            let iterations: usize = result.losses.iter().map(Vec::len).sum();
            eprintln!("inner iterations: {iterations}");
        }
    }

    #[test]
    fn loss_gradient_matches_finite_differences() {
        let model = load("tests/fixtures/tiny-sd1");
        let (unconditional, conditional) = embeddings(&model, "a red circle");
        let steps = 4;
        let timesteps = timesteps(&model, steps);
        let ddim = DdimScheduler::new(&model.scheduler_config, steps).unwrap();
        let start = image_latent(&model, 32);
        let trajectory = ddim_inversion(&model, &ddim, &timesteps, &start, &conditional);
        let latent = trajectory.get(steps).unwrap();
        let timestep = timesteps[0];
        let conditional_noise = model
            .unet
            .forward(&latent, timestep, &conditional, None)
            .unwrap();
        let target = trajectory.get(steps - 1).unwrap();
        let step = NullTextStep {
            model: &model,
            ddim: &ddim,
            step_index: 0,
            latent: &latent,
            timestep,
            conditional_noise: &conditional_noise,
            guidance: 7.5,
            target: &target,
        };
        let variable = Var::from_tensor(&unconditional.copy().unwrap()).unwrap();
        let gradients = step.loss(variable.as_tensor()).unwrap().backward().unwrap();
        let gradient: Vec<f32> = gradients
            .get(variable.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let values: Vec<f32> = unconditional.flatten_all().unwrap().to_vec1().unwrap();
        let largest = gradient
            .iter()
            .fold(0f32, |most, value| most.max(value.abs()));
        assert!(largest > 0.0);
        // The four steepest coordinates and a few fixed ones.
        let mut order: Vec<usize> = (0..gradient.len()).collect();
        order.sort_by(|a, b| gradient[*b].abs().total_cmp(&gradient[*a].abs()));
        let mut coordinates = order[..4].to_vec();
        coordinates.extend([0, 33, gradient.len() / 2, gradient.len() - 1]);
        let loss_with = |coordinate: usize, delta: f32| {
            let mut moved = values.clone();
            moved[coordinate] += delta;
            let moved =
                Tensor::from_vec(moved, unconditional.dims(), unconditional.device()).unwrap();
            f64::from(step.loss(&moved).unwrap().to_scalar::<f32>().unwrap())
        };
        // The forward's own rounding (its convolutions' Winograd transforms) moves the loss by a
        // few millionths between nearby inputs, and a central difference divides that by 2 delta:
        // at 1e-2 it was 15% of a 1e-3 slope, at 5e-2 the eight slopes agree within 3%.
        let delta = 5e-2f32;
        for coordinate in coordinates {
            let finite = (loss_with(coordinate, delta) - loss_with(coordinate, -delta))
                / (2.0 * f64::from(delta));
            let analytic = f64::from(gradient[coordinate]);
            eprintln!("coordinate {coordinate}: analytic {analytic:e}, finite {finite:e}");
            assert!(
                (finite - analytic).abs() <= 0.03 * analytic.abs() + 0.01 * f64::from(largest),
                "coordinate {coordinate}: analytic {analytic}, finite difference {finite}"
            );
        }
    }
}
