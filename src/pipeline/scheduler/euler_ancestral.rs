//! Euler ancestral sampling: an Euler step down to `sigma_down`, then fresh noise of size `sigma_up`,
//! as diffusers' `EulerAncestralDiscreteScheduler`. The noise comes from attend's [`NoiseRng`], so runs
//! are reproducible in attend but not bit-equal to diffusers (which uses torch's generator).

use candle_core::Tensor;

use super::config::{FinalSigmasType, PredictionType, SchedulerConfig};
use super::euler::{euler_move, predicted_clean_sample, SigmaSchedule};
use super::{Scheduler, SchedulerKind};
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::PipelineResult;

/// Stochastic Euler sampling (eta = 1).
#[derive(Clone, Debug)]
pub struct EulerAncestralScheduler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
}

impl EulerAncestralScheduler {
    /// Sets up `steps` inference steps. diffusers' ancestral scheduler always ends on sigma 0 and
    /// ignores Karras spacing; so does this one.
    pub fn new(config: &SchedulerConfig, steps: usize) -> PipelineResult<Self> {
        let config = SchedulerConfig {
            final_sigmas_type: FinalSigmasType::Zero,
            ..config.clone()
        };
        Ok(Self {
            schedule: SigmaSchedule::new(&config, SchedulerKind::EulerAncestral, steps, false)?,
            prediction_type: config.prediction_type,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
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
        rng: &mut NoiseRng,
    ) -> PipelineResult<Tensor> {
        let (sigma_from, sigma_to) = self.schedule.sigma_pair(step_index)?;
        let clean = predicted_clean_sample(self.prediction_type, model_output, sample, sigma_from)?;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .max(0.0)
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let deterministic = euler_move(sample, &clean, sigma_from, sigma_down - sigma_from)?;
        let noise = rng
            .randn(model_output.shape().clone(), model_output.device())?
            .to_dtype(deterministic.dtype())?;
        Ok((deterministic + noise.affine(sigma_up, 0.0)?)?)
    }
}
