//! Noise schedulers, read from a model folder's `scheduler/scheduler_config.json`.
//!
//! attend re-derives diffusers' (0.42) schedulers so that the same config, steps and model outputs
//! give the same timesteps and latents: DDIM, Euler, Euler ancestral and DPM++ 2M
//! (DPMSolverMultistepScheduler with `algorithm_type = "dpmsolver++"`). A config whose class attend
//! does not implement (PNDM, SD 1.5's default, ...) runs with DDIM and a warning.
//!
//! Every scheduler works on f32 latents `[batch, channels, h, w]`.

pub mod config;
pub mod ddim;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

use crate::pipeline::rng::NoiseRng;
use crate::pipeline::{PipelineError, PipelineResult};

/// The schedulers attend implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SchedulerKind {
    /// Denoising diffusion implicit models (deterministic, `eta = 0`). diffusers `DDIMScheduler`.
    Ddim,
    /// Euler method on the probability-flow ODE. diffusers `EulerDiscreteScheduler`.
    Euler,
    /// Euler with fresh noise at each step. diffusers `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// DPM-Solver++ second-order multistep. diffusers `DPMSolverMultistepScheduler`.
    DpmPp2m,
}

impl SchedulerKind {
    /// Every kind, in the order a user interface lists them.
    pub const ALL: [Self; 4] = [Self::Ddim, Self::Euler, Self::EulerAncestral, Self::DpmPp2m];

    /// The short name used on the command line and in files (`ddim`, `euler`, `euler-a`, `dpmpp-2m`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
        }
    }

    /// A human-readable label (`DPM++ 2M`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler ancestral",
            Self::DpmPp2m => "DPM++ 2M",
        }
    }

    /// The diffusers class that this kind reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPp2m => "DPMSolverMultistepScheduler",
        }
    }

    /// The kind for a diffusers `_class_name`, if attend implements it.
    pub fn from_diffusers_class(class_name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.diffusers_class() == class_name)
    }

    /// The accepted short names, comma separated (for error messages and help texts).
    pub fn accepted_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = PipelineError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wanted = text.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == wanted)
            .ok_or_else(|| PipelineError::InvalidArgument {
                name: "scheduler",
                reason: format!(
                    "unknown scheduler `{text}`; accepted: {}",
                    Self::accepted_names()
                ),
            })
    }
}

/// One scheduler instance, set up for a fixed number of inference steps.
///
/// Call [`Scheduler::scale_model_input`] before the UNet and [`Scheduler::step`] after it, with the
/// step indices `0, 1, ...` in order.
pub trait Scheduler: Send {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;

    /// The timesteps handed to the UNet, one per inference step (Euler's may be fractional).
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise: unit-variance noise is multiplied by it.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the UNet input for step `step_index` (`[batch, channels, h, w]`, unchanged for DDIM and DPM++).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> PipelineResult<Tensor>;

    /// One denoising step: from the model output and the current sample (both
    /// `[batch, channels, h, w]`) to the previous, less noisy sample. Ancestral schedulers draw noise
    /// from `rng`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut NoiseRng,
    ) -> PipelineResult<Tensor>;
}

/// A scheduler ready to run, with what the caller should tell the user about it.
pub struct PreparedScheduler {
    /// The scheduler itself.
    pub scheduler: Box<dyn Scheduler>,
    /// Which kind was chosen (requested, or from the config's `_class_name`, or DDIM as the stand-in).
    pub kind: SchedulerKind,
    /// Substitutions and ignored options, one sentence each.
    pub warnings: Vec<String>,
}

/// Builds the scheduler for `steps` inference steps.
///
/// `requested` wins; otherwise the config's `_class_name` decides, and a class attend does not
/// implement runs as DDIM with a warning. Zero steps is an error.
pub fn prepare_scheduler(
    config: &SchedulerConfig,
    requested: Option<SchedulerKind>,
    steps: usize,
) -> PipelineResult<PreparedScheduler> {
    if steps == 0 {
        return Err(PipelineError::InvalidArgument {
            name: "steps",
            reason: "0 steps requested; at least 1 is needed".to_string(),
        });
    }
    if steps > config.num_train_timesteps {
        return Err(PipelineError::InvalidArgument {
            name: "steps",
            reason: format!(
                "{steps} steps requested but the scheduler was trained with {} timesteps; use at most that many",
                config.num_train_timesteps
            ),
        });
    }
    let mut warnings = Vec::new();
    let kind = match requested {
        Some(kind) => kind,
        None => match config.class_name.as_deref() {
            Some(class_name) => SchedulerKind::from_diffusers_class(class_name).unwrap_or_else(|| {
                warnings.push(format!(
                    "the model's scheduler {class_name} is not implemented in attend; using DDIM with the same settings"
                ));
                SchedulerKind::Ddim
            }),
            None => SchedulerKind::Ddim,
        },
    };
    warnings.extend(config.unsupported_option_warnings(kind));
    let scheduler: Box<dyn Scheduler> = match kind {
        SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(config, steps)?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(config, steps)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestralScheduler::new(
            config, steps,
        )?),
        SchedulerKind::DpmPp2m => Box::new(dpmpp_2m::DpmPp2mScheduler::new(config, steps)?),
    };
    Ok(PreparedScheduler {
        scheduler,
        kind,
        warnings,
    })
}

/// `a * x + b * y` for two tensors of the same shape.
pub(crate) fn weighted_sum(a: f64, x: &Tensor, b: f64, y: &Tensor) -> PipelineResult<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// The error for a step index past the end of the schedule.
pub(crate) fn step_out_of_range(step_index: usize, steps: usize) -> PipelineError {
    PipelineError::InvalidArgument {
        name: "step_index",
        reason: format!("step {step_index} is past the last step of a {steps}-step schedule"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::{DType, Device};

    /// Stable Diffusion's training schedule with the given spacing and no `_class_name`.
    fn sd_config(spacing: TimestepSpacing) -> SchedulerConfig {
        SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            timestep_spacing: Some(spacing),
            steps_offset: 1,
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn kinds_parse_and_reject_with_the_accepted_names() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(
                SchedulerKind::from_diffusers_class(kind.diffusers_class()),
                Some(kind)
            );
        }
        let err = "pndm".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(
            err.contains("pndm") && err.contains("dpmpp-2m") && err.contains("euler-a"),
            "{err}"
        );
    }

    #[test]
    fn zero_or_too_many_steps_are_rejected() {
        let config = sd_config(TimestepSpacing::Leading);
        for steps in [0, 1001] {
            let Err(err) = prepare_scheduler(&config, None, steps) else {
                panic!("{steps} steps accepted");
            };
            assert!(
                matches!(err, PipelineError::InvalidArgument { name: "steps", .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn timestep_spacings_follow_diffusers() {
        let euler = |spacing, steps| {
            prepare_scheduler(&sd_config(spacing), Some(SchedulerKind::Euler), steps).unwrap()
        };
        // linspace keeps numpy's float32 fractions.
        let expected: Vec<f64> = (0..8)
            .rev()
            .map(|i| f64::from((f64::from(i) * 999.0 / 7.0) as f32))
            .collect();
        assert_eq!(
            euler(TimestepSpacing::Linspace, 8).scheduler.timesteps(),
            &expected[..]
        );
        // sd-turbo: one trailing step at t = 999, started from the largest sigma itself.
        let turbo = euler(TimestepSpacing::Trailing, 1).scheduler;
        assert_eq!(turbo.timesteps(), &[999.0]);
        assert!((turbo.init_noise_sigma() - 14.6146).abs() < 1e-3);
        // leading spacing starts from sqrt(sigma_max^2 + 1) of its own (first) sigma.
        let leading = euler::EulerScheduler::new(&sd_config(TimestepSpacing::Leading), 8).unwrap();
        let first_sigma = leading.sigmas()[0];
        assert!(
            (leading.init_noise_sigma() - (first_sigma * first_sigma + 1.0).sqrt()).abs() < 1e-5
        );

        let ddim = prepare_scheduler(&sd_config(TimestepSpacing::Trailing), None, 4).unwrap();
        assert_eq!(ddim.kind, SchedulerKind::Ddim);
        assert_eq!(ddim.scheduler.timesteps(), &[999.0, 749.0, 499.0, 249.0]);

        let dpm = prepare_scheduler(
            &sd_config(TimestepSpacing::Leading),
            Some(SchedulerKind::DpmPp2m),
            8,
        )
        .unwrap();
        assert_eq!(
            dpm.scheduler.timesteps(),
            &[889.0, 778.0, 667.0, 556.0, 445.0, 334.0, 223.0, 112.0]
        );
    }

    #[test]
    fn karras_sigmas_span_the_training_range() {
        let config = SchedulerConfig {
            use_karras_sigmas: true,
            ..sd_config(TimestepSpacing::Linspace)
        };
        let euler = euler::EulerScheduler::new(&config, 10).unwrap();
        let sigmas = euler.sigmas();
        assert_eq!(sigmas.len(), 11);
        assert!((sigmas[0] - 14.6146).abs() < 1e-3, "{sigmas:?}");
        assert_eq!(sigmas[10], 0.0);
        assert!(sigmas.windows(2).all(|pair| pair[0] > pair[1]));
        let timesteps = euler.timesteps();
        assert!((timesteps[0] - 999.0).abs() < 1e-3, "{timesteps:?}");
        assert!(timesteps.windows(2).all(|pair| pair[0] > pair[1]));

        let dpm = dpmpp_2m::DpmPp2mScheduler::new(&config, 10).unwrap();
        assert_eq!(dpm.timesteps()[0], 999.0);
        assert!(dpm.timesteps().iter().all(|t| t.fract() == 0.0));
        assert!((f64::from(dpm.sigmas()[0]) - 14.6146).abs() < 1e-3);
    }

    #[test]
    fn final_steps_land_on_the_clean_sample() {
        // With one step every scheduler ends on sigma 0 (or alpha 1) and returns its clean-sample
        // estimate, for any model output; Euler ancestral adds no noise there.
        let device = Device::Cpu;
        let sample = Tensor::arange(0f32, 8.0, &device)
            .unwrap()
            .reshape((1, 2, 2, 2))
            .unwrap();
        let noise = sample.affine(-0.5, 1.0).unwrap();
        let mut rng = NoiseRng::new(1);
        for kind in SchedulerKind::ALL {
            let config = SchedulerConfig {
                set_alpha_to_one: Some(true),
                ..sd_config(TimestepSpacing::Trailing)
            };
            let mut prepared = prepare_scheduler(&config, Some(kind), 1).unwrap();
            let scheduler = &mut prepared.scheduler;
            let t = scheduler.timesteps()[0];
            assert_eq!(t, 999.0, "{kind}");
            let next = scheduler.step(&noise, 0, &sample, &mut rng).unwrap();
            // x0 = (x - sqrt(1 - a) * eps) / sqrt(a) at t = 999.
            let alpha = schedule::training_alphas_cumprod(&config)[999];
            let clean = ((&sample - noise.affine((1.0 - alpha).sqrt(), 0.0).unwrap()).unwrap()
                / alpha.sqrt())
            .unwrap();
            // Euler-family inputs live at a different scale: x_sigma = x_vp * sqrt(1 + sigma^2).
            let clean = match kind {
                SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                    let sigma = ((1.0 - alpha) / alpha).sqrt();
                    (&sample - noise.affine(sigma, 0.0).unwrap()).unwrap()
                }
                SchedulerKind::Ddim | SchedulerKind::DpmPp2m => clean,
            };
            let diff = max_abs_diff(&next, &clean);
            let scale = max_abs_diff(&clean, &clean.zeros_like().unwrap());
            assert!(
                diff <= 2e-5 * scale,
                "{kind}: {diff} (values up to {scale})"
            );
            assert_eq!(next.dtype(), DType::F32);
        }
    }

    #[test]
    fn ancestral_noise_depends_on_the_seed_only() {
        let config = sd_config(TimestepSpacing::Leading);
        let device = Device::Cpu;
        let sample = Tensor::ones((1, 4, 2, 2), DType::F32, &device).unwrap();
        let run = |seed| {
            let mut prepared =
                prepare_scheduler(&config, Some(SchedulerKind::EulerAncestral), 4).unwrap();
            let mut rng = NoiseRng::new(seed);
            prepared
                .scheduler
                .step(&sample, 0, &sample, &mut rng)
                .unwrap()
        };
        assert_eq!(max_abs_diff(&run(5), &run(5)), 0.0);
        assert!(max_abs_diff(&run(5), &run(6)) > 1e-3);
    }
}
