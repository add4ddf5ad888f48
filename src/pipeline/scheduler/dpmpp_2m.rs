//! DPM-Solver++ (2M): second-order multistep solver in data-prediction form (Lu et al. 2022), as
//! diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`.
//!
//! The per-step coefficients are computed in f32, in diffusers' order of operations, because diffusers
//! computes them on float32 scalar tensors.

use candle_core::Tensor;

use super::config::{
    BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::schedule::{
    interpolate_on_index_grid, karras_sigmas, numpy_arange_down_to_zero, numpy_linspace,
    numpy_round, round_f32, sigma_to_timestep, training_alphas_cumprod, training_sigmas,
};
use super::{step_out_of_range, Scheduler, SchedulerKind};
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::PipelineResult;

/// Which update formula the second-order step uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SecondOrderFormula {
    Midpoint,
    Heun,
}

/// DPM++ 2M multistep sampling; remembers the previous step's clean-sample prediction.
#[derive(Clone, Debug)]
pub struct DpmPp2mScheduler {
    timesteps: Vec<f64>,
    /// One sigma per step plus the final one (f32 values).
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    solver_order: usize,
    formula: SecondOrderFormula,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_is_zero: bool,
    /// The clean-sample prediction of the last step taken, with its step index.
    previous_clean: Option<(usize, Tensor)>,
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at Karras sigma `sigma`, in f32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half-log-SNR `lambda = ln(alpha) - ln(sigma)`.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmPp2mScheduler {
    /// Sets up `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> PipelineResult<Self> {
        let train_steps = config.num_train_timesteps;
        if steps == 0 || steps > train_steps {
            return Err(step_out_of_range(steps, train_steps));
        }
        let alphas_cumprod = training_alphas_cumprod(config);
        // Timesteps whose lambda is below `lambda_min_clipped` are cut off the end of the schedule.
        let clipped_count = alphas_cumprod
            .iter()
            .filter(|&&alpha| {
                let lambda = round_f32(alpha.sqrt()).ln() - round_f32((1.0 - alpha).sqrt()).ln();
                lambda < config.lambda_min_clipped
            })
            .count();
        let last_timestep = train_steps - clipped_count.min(train_steps - 1);
        #[allow(clippy::cast_precision_loss)]
        let mut timesteps: Vec<f64> = match config.spacing_for(SchedulerKind::DpmPp2m) {
            TimestepSpacing::Linspace => {
                let mut values: Vec<f64> =
                    numpy_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                        .into_iter()
                        .map(numpy_round)
                        .collect();
                values.remove(0);
                values.reverse();
                values
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|index| (index * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train_steps as f64 / steps as f64;
                numpy_arange_down_to_zero(last_timestep as f64, ratio)
                    .into_iter()
                    .map(|value| numpy_round(value) - 1.0)
                    .collect()
            }
        };
        let training_sigmas = training_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f64> = if config.use_karras_sigmas {
            let log_sigmas: Vec<f64> = training_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config
                .sigma_min
                .unwrap_or_else(|| training_sigmas.first().copied().unwrap_or(0.0));
            let sigma_max = config
                .sigma_max
                .unwrap_or_else(|| training_sigmas.last().copied().unwrap_or(0.0));
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas
                .iter()
                .map(|&sigma| {
                    let t = sigma_to_timestep(sigma, &log_sigmas);
                    if config.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                        t
                    } else {
                        numpy_round(t)
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| interpolate_on_index_grid(t, &training_sigmas))
                .collect()
        };
        // The UNet sees integer timesteps (diffusers casts them to int64).
        timesteps = timesteps.into_iter().map(f64::trunc).collect();
        sigmas.push(match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt(),
        });
        #[allow(clippy::cast_possible_truncation)]
        let sigmas: Vec<f32> = sigmas.into_iter().map(|sigma| sigma as f32).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            solver_order: config.solver_order.clamp(1, 2),
            formula: if config.solver_type == "heun" {
                SecondOrderFormula::Heun
            } else {
                SecondOrderFormula::Midpoint
            },
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigma_is_zero: config.final_sigmas_type == FinalSigmasType::Zero,
            previous_clean: None,
        })
    }

    /// The sigmas, one per step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the predicted clean sample.
    fn clean_sample(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> PipelineResult<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => (sample - model_output.affine(f64::from(sigma_t), 0.0)?)?
                .affine(1.0 / f64::from(alpha_t), 0.0)?,
            PredictionType::VPrediction => {
                (sample.affine(f64::from(alpha_t), 0.0)?
                    - model_output.affine(f64::from(sigma_t), 0.0)?)?
            }
            PredictionType::Sample => model_output.clone(),
        })
    }
}

impl Scheduler for DpmPp2mScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPp2m
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> PipelineResult<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut NoiseRng,
    ) -> PipelineResult<Tensor> {
        let step_count = self.timesteps.len();
        let (Some(&sigma_s0), Some(&sigma_next)) =
            (self.sigmas.get(step_index), self.sigmas.get(step_index + 1))
        else {
            return Err(step_out_of_range(step_index, step_count));
        };
        let is_last = step_index + 1 == step_count;
        let lower_order_final = is_last
            && (self.euler_at_final
                || (self.lower_order_final && step_count < 15)
                || self.final_sigma_is_zero);
        let clean = self.clean_sample(model_output, sample, sigma_s0)?;
        let previous = self
            .previous_clean
            .take()
            .filter(|(index, _)| step_index > 0 && *index + 1 == step_index);
        let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
        let (alpha_s0, sigma_s0_vp) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0_vp);
        let h = lambda_t - lambda_s0;
        let sample_coefficient = f64::from(sigma_t / sigma_s0_vp);
        let clean_coefficient = f64::from(alpha_t * ((-h).exp() - 1.0));
        let first_term = sample.affine(sample_coefficient, 0.0)?;
        let next = match previous {
            Some((_, previous_clean)) if self.solver_order >= 2 && !lower_order_final => {
                let sigma_s1 = self.sigmas[step_index - 1];
                let (alpha_s1, sigma_s1_vp) = alpha_sigma(sigma_s1);
                let lambda_s1 = lambda(alpha_s1, sigma_s1_vp);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let difference = (&clean - &previous_clean)?.affine(f64::from(1.0 / r0), 0.0)?;
                let first_two = (first_term - clean.affine(clean_coefficient, 0.0)?)?;
                match self.formula {
                    SecondOrderFormula::Midpoint => {
                        let half = f64::from(0.5 * (alpha_t * ((-h).exp() - 1.0)));
                        (first_two - difference.affine(half, 0.0)?)?
                    }
                    SecondOrderFormula::Heun => {
                        let factor = f64::from(alpha_t * (((-h).exp() - 1.0) / h + 1.0));
                        (first_two + difference.affine(factor, 0.0)?)?
                    }
                }
            }
            _ => (first_term - clean.affine(clean_coefficient, 0.0)?)?,
        };
        self.previous_clean = Some((step_index, clean));
        Ok(next)
    }
}
