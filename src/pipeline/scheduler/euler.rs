//! Euler sampling of the probability-flow ODE in sigma space (Karras et al. 2022), as diffusers'
//! `EulerDiscreteScheduler` with `s_churn = 0`.

use candle_core::Tensor;

use super::config::{FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    interpolate_on_index_grid, karras_sigmas, leading_timesteps, numpy_linspace, round_f32,
    sigma_to_timestep, trailing_timesteps, training_alphas_cumprod, training_sigmas,
};
use super::{step_out_of_range, weighted_sum, Scheduler, SchedulerKind};
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::PipelineResult;

/// The sigmas and timesteps of an Euler-family schedule (shared with Euler ancestral).
#[derive(Clone, Debug)]
pub(crate) struct SigmaSchedule {
    /// UNet timesteps, one per step (f32 values, possibly fractional).
    pub timesteps: Vec<f64>,
    /// Sigmas, one per step plus the final one (f32 values).
    pub sigmas: Vec<f64>,
    /// `sqrt(max_sigma^2 + 1)` for `leading` spacing, `max_sigma` otherwise.
    pub init_noise_sigma: f64,
}

impl SigmaSchedule {
    /// diffusers' Euler `set_timesteps`. `allow_karras` is false for Euler ancestral, which ignores
    /// `use_karras_sigmas`.
    pub(crate) fn new(
        config: &SchedulerConfig,
        kind: SchedulerKind,
        steps: usize,
        allow_karras: bool,
    ) -> PipelineResult<Self> {
        let train_steps = config.num_train_timesteps;
        if steps == 0 || steps > train_steps {
            return Err(step_out_of_range(steps, train_steps));
        }
        let mut alphas_cumprod = training_alphas_cumprod(config);
        if config.rescale_betas_zero_snr {
            // diffusers keeps the last sigma finite this way.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f64.powi(-24);
            }
        }
        let spacing = config.spacing_for(kind);
        let mut timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Leading => leading_timesteps(train_steps, steps, config.steps_offset),
            TimestepSpacing::Trailing => trailing_timesteps(train_steps, steps),
            #[allow(clippy::cast_precision_loss)]
            TimestepSpacing::Linspace => numpy_linspace(0.0, (train_steps - 1) as f64, steps)
                .into_iter()
                .rev()
                .collect(),
        };
        // numpy holds these timesteps as float32.
        timesteps = timesteps.into_iter().map(round_f32).collect();
        let training_sigmas = training_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interpolate_on_index_grid(t, &training_sigmas))
            .collect();
        if allow_karras && config.use_karras_sigmas {
            let log_sigmas: Vec<f64> = training_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config
                .sigma_min
                .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let sigma_max = config
                .sigma_max
                .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas
                .iter()
                .map(|&sigma| round_f32(sigma_to_timestep(sigma, &log_sigmas)))
                .collect();
        }
        let final_sigma = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt(),
        };
        sigmas.push(final_sigma);
        let sigmas: Vec<f64> = sigmas.into_iter().map(round_f32).collect();
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => round_f32((max_sigma * max_sigma + 1.0).sqrt()),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// `sigmas[step_index]` and `sigmas[step_index + 1]`.
    pub(crate) fn sigma_pair(&self, step_index: usize) -> PipelineResult<(f64, f64)> {
        match (self.sigmas.get(step_index), self.sigmas.get(step_index + 1)) {
            (Some(&sigma), Some(&next)) => Ok((sigma, next)),
            _ => Err(step_out_of_range(step_index, self.timesteps.len())),
        }
    }

    /// The UNet input `sample / sqrt(sigma^2 + 1)`.
    pub(crate) fn scale_input(&self, sample: &Tensor, step_index: usize) -> PipelineResult<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        Ok(sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)?)
    }
}

/// The clean-sample prediction of Euler-family schedulers at noise level `sigma`.
pub(crate) fn predicted_clean_sample(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> PipelineResult<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => weighted_sum(1.0, sample, -sigma, model_output),
        PredictionType::VPrediction => {
            let variance = sigma * sigma + 1.0;
            weighted_sum(
                -sigma / variance.sqrt(),
                model_output,
                1.0 / variance,
                sample,
            )
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// `sample + (sample - clean) / sigma * dt`, in diffusers' order of operations.
pub(crate) fn euler_move(
    sample: &Tensor,
    clean: &Tensor,
    sigma: f64,
    dt: f64,
) -> PipelineResult<Tensor> {
    let derivative = (sample - clean)?.affine(1.0 / sigma, 0.0)?;
    Ok((sample + derivative.affine(dt, 0.0)?)?)
}

/// Euler steps from sigma to sigma: `x + (x - x0) / sigma * (sigma_next - sigma)`.
#[derive(Clone, Debug)]
pub struct EulerScheduler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
}

impl EulerScheduler {
    /// Sets up `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> PipelineResult<Self> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, SchedulerKind::Euler, steps, true)?,
            prediction_type: config.prediction_type,
        })
    }

    /// The sigmas, one per step plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> PipelineResult<Tensor> {
        self.schedule.scale_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut NoiseRng,
    ) -> PipelineResult<Tensor> {
        let (sigma, next_sigma) = self.schedule.sigma_pair(step_index)?;
        let clean = predicted_clean_sample(self.prediction_type, model_output, sample, sigma)?;
        euler_move(sample, &clean, sigma, next_sigma - sigma)
    }
}
