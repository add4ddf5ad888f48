//! Noise-schedule arithmetic shared by the schedulers: training betas and alpha products, timestep
//! spacings, sigma interpolation and the Karras spacing.
//!
//! diffusers computes the training schedule in f32 tensors (the running product in f64), and picks
//! timesteps with numpy; the functions here follow the same number formats so that timesteps and
//! sigmas come out bit-for-bit or within an f32 rounding of the reference.

use super::config::{BetaSchedule, SchedulerConfig};

/// Rounds to the nearest f32 and back: the value a float32 tensor would hold.
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn round_f32(value: f64) -> f64 {
    f64::from(value as f32)
}

/// `torch.linspace(start, end, count, dtype=float32)` on the CPU: symmetric from both ends.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
fn torch_linspace_f32(start: f64, end: f64, count: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if count == 1 {
        return vec![start];
    }
    let step = (end - start) / (count - 1) as f32;
    let halfway = count / 2;
    (0..count)
        .map(|index| {
            if index < halfway {
                start + step * index as f32
            } else {
                end - step * (count - index - 1) as f32
            }
        })
        .collect()
}

/// The improved-DDPM cosine schedule (`squaredcos_cap_v2`), betas capped at 0.999.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
fn cosine_betas(count: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..count)
        .map(|index| {
            let t1 = index as f64 / count as f64;
            let t2 = (index + 1) as f64 / count as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The training betas `[num_train_timesteps]`, in f32 as diffusers holds them.
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn training_betas(config: &SchedulerConfig) -> Vec<f32> {
    let count = config.num_train_timesteps;
    if let Some(betas) = &config.trained_betas {
        return betas.iter().map(|&beta| beta as f32).collect();
    }
    match config.beta_schedule {
        BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, count),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), count)
                .into_iter()
                .map(|root| root * root)
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => cosine_betas(count),
    }
}

/// Cumulative products of `1 - beta` over the training timesteps (`alphas_cumprod`), each rounded to
/// f32 like diffusers' tensor. With `rescale_betas_zero_snr` the schedule is shifted so that the last
/// timestep has zero signal.
pub(crate) fn training_alphas_cumprod(config: &SchedulerConfig) -> Vec<f64> {
    let betas = training_betas(config);
    let mut running = 1.0f64;
    let mut cumprod: Vec<f64> = betas
        .iter()
        .map(|&beta| {
            running *= f64::from(1.0f32 - beta);
            round_f32(running)
        })
        .collect();
    if config.rescale_betas_zero_snr {
        cumprod = rescale_to_zero_terminal_snr(&cumprod);
    }
    cumprod
}

/// Lin et al. 2023, algorithm 1: shift and scale `sqrt(alphas_cumprod)` so that it ends at 0 and keeps
/// its first value.
fn rescale_to_zero_terminal_snr(alphas_cumprod: &[f64]) -> Vec<f64> {
    let roots: Vec<f64> = alphas_cumprod.iter().map(|value| value.sqrt()).collect();
    let (Some(&first), Some(&last)) = (roots.first(), roots.last()) else {
        return alphas_cumprod.to_vec();
    };
    let scale = first / (first - last);
    roots
        .iter()
        .map(|root| round_f32(((root - last) * scale).powi(2)))
        .collect()
}

/// Noise-to-signal ratios `sqrt((1 - alpha_bar) / alpha_bar)` per training timestep, ascending in t,
/// rounded to f32.
pub(crate) fn training_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&alpha| round_f32(((1.0 - alpha) / alpha).sqrt()))
        .collect()
}

/// `np.round`: halves go to the even neighbour.
pub(crate) fn numpy_round(value: f64) -> f64 {
    value.round_ties_even()
}

/// `np.linspace(start, stop, count)` in f64.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn numpy_linspace(start: f64, stop: f64, count: usize) -> Vec<f64> {
    match count {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (count - 1) as f64;
            let mut values: Vec<f64> = (0..count).map(|i| start + i as f64 * step).collect();
            values[count - 1] = stop;
            values
        }
    }
}

/// `np.arange(start, 0, -step)` for a positive float `step`: `start, start - step, ...` while `> 0`,
/// with numpy's element count `ceil(start / step)`.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub(crate) fn numpy_arange_down_to_zero(start: f64, step: f64) -> Vec<f64> {
    let count = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    (0..count).map(|i| start + i as f64 * -step).collect()
}

/// `np.interp(x, arange(len(values)), values)`: linear interpolation on an integer grid, clamped at
/// the ends.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub(crate) fn interpolate_on_index_grid(x: f64, values: &[f64]) -> f64 {
    let Some(&last) = values.last() else {
        return f64::NAN;
    };
    if x <= 0.0 {
        return values[0];
    }
    let last_index = (values.len() - 1) as f64;
    if x >= last_index {
        return last;
    }
    let low = x.floor() as usize;
    let fraction = x - low as f64;
    let (low_value, high_value) = (values[low], values[low + 1]);
    // numpy's formula: slope * (x - x_low) + y_low.
    (high_value - low_value) * fraction + low_value
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep whose log-sigma matches `sigma`,
/// interpolating linearly in log space. `log_sigmas` ascend with the timestep.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn sigma_to_timestep(sigma: f64, log_sigmas: &[f64]) -> f64 {
    if log_sigmas.len() < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // Last index whose log-sigma is <= log_sigma (0 when there is none), at most len - 2.
    let low_index = log_sigmas
        .iter()
        .rposition(|&value| log_sigma - value >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_index = low_index + 1;
    let (low, high) = (log_sigmas[low_index], log_sigmas[high_index]);
    let weight = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - weight) * low_index as f64 + weight * high_index as f64
}

/// Karras et al. (2022) spacing: `count` sigmas from `sigma_max` down to `sigma_min`, evenly spaced in
/// `sigma^(1/7)`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, count: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    numpy_linspace(0.0, 1.0, count)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// Integer `leading` timesteps: `(0..steps) * (train / steps)` reversed plus `offset`.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn leading_timesteps(train_steps: usize, steps: usize, offset: usize) -> Vec<f64> {
    let ratio = train_steps / steps;
    (0..steps)
        .rev()
        .map(|index| (index * ratio + offset) as f64)
        .collect()
}

/// Integer `trailing` timesteps: `round(arange(train, 0, -train / steps)) - 1`.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn trailing_timesteps(train_steps: usize, steps: usize) -> Vec<f64> {
    let ratio = train_steps as f64 / steps as f64;
    numpy_arange_down_to_zero(train_steps as f64, ratio)
        .into_iter()
        .map(|value| numpy_round(value) - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_spacing_follow_numpy() {
        assert_eq!(numpy_round(812.5), 812.0);
        assert_eq!(numpy_round(937.5), 938.0);
        assert_eq!(
            leading_timesteps(1000, 8, 1),
            vec![876.0, 751.0, 626.0, 501.0, 376.0, 251.0, 126.0, 1.0]
        );
        assert_eq!(
            trailing_timesteps(1000, 4),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(interpolate_on_index_grid(1.25, &[0.0, 1.0, 3.0]), 1.5);
    }

    #[test]
    fn sigma_to_timestep_inverts_the_grid() {
        let config = SchedulerConfig {
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            ..SchedulerConfig::default()
        };
        let sigmas = training_sigmas(&training_alphas_cumprod(&config));
        let log_sigmas: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
        for t in [0usize, 17, 500, 998] {
            let back = sigma_to_timestep(sigmas[t], &log_sigmas);
            assert!((back - t as f64).abs() < 1e-6, "{t} -> {back}");
        }
        // SD's largest sigma is about 14.6.
        assert!((sigmas[999] - 14.6146).abs() < 1e-3, "{}", sigmas[999]);
    }
}
