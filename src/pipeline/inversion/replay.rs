//! Replaying an inversion: DDIM with the per-row correction of the inversion's method, as a
//! [`Scheduler`] so that every sampling loop (plain runs, both Prompt-to-Prompt modes) replays it
//! without knowing the method.

use candle_core::Tensor;

use super::{Inversion, ReplayCorrection};
use crate::pipeline::rng::NoiseRng;
use crate::pipeline::sampling::RowRole;
use crate::pipeline::scheduler::ddim::DdimScheduler;
use crate::pipeline::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::pipeline::{PipelineError, PipelineResult};

/// A `sigma` below this is taken as 0 by [`noise_map_scale`].
const SIGMA_ZERO: f64 = 1e-6;

/// What multiplies a ddpm noise map at a step whose eta = 1 noise level is `sigma`: `sigma`
/// itself, or 1 where `sigma` is 0 (a last step down to `alpha = 1`), where the "noise map" is
/// the whole remaining difference `x_{t-1} - mean` so that the replay still lands exactly on the
/// image.
pub(crate) fn noise_map_scale(sigma: f64) -> f64 {
    if sigma < SIGMA_ZERO {
        1.0
    } else {
        sigma
    }
}

/// What a row adds to DDIM's step.
enum RowCorrection {
    /// Plain DDIM (`eta = 0`).
    None,
    /// `direct`: step `i` lands on `trajectory[steps - i - 1]` (`[steps + 1, 1, c, h, w]`).
    FollowTrajectory(Tensor),
    /// `ddpm`: each step is DDIM with `eta = 1` whose noise is `maps[step]` (`[steps, 1, c, h, w]`).
    NoiseMaps(Tensor),
}

/// DDIM on an inversion's timesteps with one row's correction.
struct ReplayScheduler {
    ddim: DdimScheduler,
    correction: RowCorrection,
}

/// The scheduler of a row in `role` replaying `inversion`: plain DDIM for `ddim`,
/// `negative-prompt` and `null-text` (their corrections act on the text embeddings); for
/// `direct`, the source row steps along the inverted trajectory (other rows are plain DDIM); for
/// `ddpm`, DDIM with `eta = 1` and the inversion's noise maps on every row (the edited row too:
/// that is what makes the inversion edit-friendly).
pub(crate) fn replay_scheduler(
    config: &SchedulerConfig,
    inversion: &Inversion,
    role: RowRole,
) -> PipelineResult<Box<dyn Scheduler>> {
    let steps = inversion.timesteps.len();
    let ddim = DdimScheduler::new(config, steps)?;
    let correction = match (&inversion.correction, role) {
        (ReplayCorrection::SourceFollowsTrajectory, RowRole::Source) => {
            if inversion.trajectory.dims().first() != Some(&(steps + 1)) {
                return Err(PipelineError::InvalidArgument {
                    name: "inversion",
                    reason: format!(
                        "its trajectory has shape {:?}, expected {} entries first",
                        inversion.trajectory.dims(),
                        steps + 1
                    ),
                });
            }
            RowCorrection::FollowTrajectory(inversion.trajectory.clone())
        }
        (ReplayCorrection::NoiseMaps(maps), _) => {
            RowCorrection::NoiseMaps(checked_per_step(maps, steps, "noise maps")?)
        }
        _ => RowCorrection::None,
    };
    Ok(Box::new(ReplayScheduler { ddim, correction }))
}

/// `tensor` when it has one entry per step.
fn checked_per_step(tensor: &Tensor, steps: usize, what: &str) -> PipelineResult<Tensor> {
    if tensor.dims().first() != Some(&steps) {
        return Err(PipelineError::InvalidArgument {
            name: "inversion",
            reason: format!(
                "its {what} have shape {:?}, expected {steps} steps first",
                tensor.dims()
            ),
        });
    }
    Ok(tensor.clone())
}

impl Scheduler for ReplayScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        self.ddim.timesteps()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.ddim.init_noise_sigma()
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> PipelineResult<Tensor> {
        self.ddim.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut NoiseRng,
    ) -> PipelineResult<Tensor> {
        match &self.correction {
            RowCorrection::None => self.ddim.step(model_output, step_index, sample, rng),
            RowCorrection::FollowTrajectory(trajectory) => {
                let steps = self.ddim.timesteps().len();
                let index = steps.checked_sub(step_index + 1).ok_or_else(|| {
                    PipelineError::InvalidArgument {
                        name: "step",
                        reason: format!("step {step_index} is past the replay's {steps} steps"),
                    }
                })?;
                Ok(trajectory
                    .get(index)?
                    .to_device(sample.device())?
                    .to_dtype(sample.dtype())?)
            }
            RowCorrection::NoiseMaps(maps) => {
                let (mean, sigma) =
                    self.ddim
                        .step_mean_and_sigma(model_output, step_index, sample, 1.0)?;
                let noise = maps.get(step_index)?.to_device(mean.device())?;
                Ok((mean + noise.affine(noise_map_scale(sigma), 0.0)?)?)
            }
        }
    }
}
