//! `scheduler_config.json`: the diffusers scheduler settings attend understands, with diffusers'
//! defaults for anything the file leaves out.

use std::path::Path;

use serde::Deserialize;

use super::SchedulerKind;
use crate::pipeline::{PipelineError, PipelineResult};

/// How the training noise levels (betas) are laid out over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of improved DDPM, each beta capped at 0.999.
    SquaredcosCapV2,
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD 1.x, SD 2 base).
    Epsilon,
    /// The velocity `alpha * noise - sigma * sample` (SD 2.x 768, sd-turbo).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are picked among the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `0, r, 2r, ...` reversed, plus `steps_offset` (`r = train // steps`).
    Leading,
    /// Counted down from the last training timestep.
    Trailing,
    /// Evenly spaced over `[0, train - 1]`.
    Linspace,
}

/// The last sigma of Euler / DPM++ schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// End exactly on the clean image.
    Zero,
    /// End on the smallest training sigma.
    SigmaMin,
}

/// The settings of `scheduler/scheduler_config.json`. Missing keys (and `null` values) take diffusers'
/// defaults; those that differ between scheduler classes are `Option`s resolved per [`SchedulerKind`].
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// diffusers class that wrote the file (`DDIMScheduler`, `PNDMScheduler`, ...).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Number of training timesteps (1000).
    pub num_train_timesteps: usize,
    /// First beta (0.0001; SD uses 0.00085).
    pub beta_start: f64,
    /// Last beta (0.02; SD uses 0.012).
    pub beta_end: f64,
    /// Beta layout (`linear`).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// What the UNet predicts (`epsilon`).
    pub prediction_type: PredictionType,
    /// Timestep spacing; default `leading` for DDIM, `linspace` for the others.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to `leading` timesteps (0; SD uses 1).
    pub steps_offset: usize,
    /// DDIM: the final "previous" alpha product is 1 (default true) instead of `alphas_cumprod[0]`.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted clean sample to `±clip_sample_range` (default true).
    pub clip_sample: Option<bool>,
    /// DDIM: clipping bound (1.0).
    pub clip_sample_range: f64,
    /// Dynamic thresholding (not implemented; reported as a warning).
    pub thresholding: bool,
    /// Rescale betas to a zero terminal SNR.
    pub rescale_betas_zero_snr: bool,
    /// Euler / DPM++: Karras et al. sigma spacing.
    pub use_karras_sigmas: bool,
    /// Not implemented (warning).
    pub use_exponential_sigmas: bool,
    /// Not implemented (warning).
    pub use_beta_sigmas: bool,
    /// Not implemented (warning).
    pub use_lu_lambdas: bool,
    /// Not implemented (warning).
    pub use_flow_sigmas: bool,
    /// Euler: sigma interpolation (`linear`; `log_linear` is not implemented).
    pub interpolation_type: String,
    /// Karras spacing: smallest sigma (default: the smallest training sigma).
    pub sigma_min: Option<f64>,
    /// Karras spacing: largest sigma (default: the largest training sigma).
    pub sigma_max: Option<f64>,
    /// Euler: `discrete` (`continuous` is not implemented).
    pub timestep_type: String,
    /// Euler / DPM++: last sigma (`zero`).
    pub final_sigmas_type: FinalSigmasType,
    /// DPM++: solver order (2; 1 is supported too, 3 runs as 2).
    pub solver_order: usize,
    /// DPM++: `dpmsolver++` (others run as `dpmsolver++` with a warning).
    pub algorithm_type: String,
    /// DPM++: second-order formula, `midpoint` or `heun`.
    pub solver_type: String,
    /// DPM++: lower the order on the final steps of short schedules (true).
    pub lower_order_final: bool,
    /// DPM++: first order on the very last step (false).
    pub euler_at_final: bool,
    /// DPM++: clip the schedule where `lambda` falls below this (`-inf`: no clipping).
    pub lambda_min_clipped: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            rescale_betas_zero_snr: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            interpolation_type: "linear".to_string(),
            sigma_min: None,
            sigma_max: None,
            timestep_type: "discrete".to_string(),
            final_sigmas_type: FinalSigmasType::Zero,
            solver_order: 2,
            algorithm_type: "dpmsolver++".to_string(),
            solver_type: "midpoint".to_string(),
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`. Unreadable files and broken JSON are
    /// [`PipelineError::BadFile`]; unknown values (a `beta_schedule` attend does not know) are
    /// [`PipelineError::BadConfig`]. Python's `NaN` / `Infinity` literals are accepted.
    pub fn from_file(path: &Path) -> PipelineResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                PipelineError::Missing {
                    what: "scheduler config",
                    path: path.to_path_buf(),
                }
            } else {
                PipelineError::BadFile {
                    path: path.to_path_buf(),
                    reason: err.to_string(),
                }
            }
        })?;
        Self::from_json_str(&text).map_err(|err| match err {
            ConfigParseError::Syntax(reason) => PipelineError::BadFile {
                path: path.to_path_buf(),
                reason,
            },
            ConfigParseError::Value(reason) => PipelineError::BadConfig {
                path: path.to_path_buf(),
                reason,
            },
        })
    }

    /// Parses the JSON text of a scheduler config (see [`SchedulerConfig::from_file`]).
    pub fn from_json_str(text: &str) -> Result<Self, ConfigParseError> {
        let cleaned = replace_non_finite_literals(text);
        let mut value: serde_json::Value = serde_json::from_str(&cleaned)
            .map_err(|err| ConfigParseError::Syntax(format!("invalid JSON: {err}")))?;
        let serde_json::Value::Object(map) = &mut value else {
            return Err(ConfigParseError::Syntax(
                "expected a JSON object at the top level".to_string(),
            ));
        };
        // `null` means "default" in diffusers configs.
        map.retain(|_, entry| !entry.is_null());
        let config: Self = serde_json::from_value(value)
            .map_err(|err| ConfigParseError::Value(err.to_string()))?;
        config.validate().map_err(ConfigParseError::Value)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.num_train_timesteps < 2 {
            return Err(format!(
                "num_train_timesteps is {}; at least 2 are needed",
                self.num_train_timesteps
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(format!(
                    "trained_betas has {} entries but num_train_timesteps is {}",
                    betas.len(),
                    self.num_train_timesteps
                ));
            }
        }
        if !["midpoint", "heun"].contains(&self.solver_type.as_str()) {
            return Err(format!(
                "solver_type `{}` is not supported; accepted: midpoint, heun",
                self.solver_type
            ));
        }
        Ok(())
    }

    /// The timestep spacing in effect for `kind` (diffusers' per-class default when unset).
    pub fn spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Ddim => TimestepSpacing::Leading,
            SchedulerKind::Euler | SchedulerKind::EulerAncestral | SchedulerKind::DpmPp2m => {
                TimestepSpacing::Linspace
            }
        })
    }

    /// Options set in the config that `kind` ignores in attend, one warning each.
    pub fn unsupported_option_warnings(&self, kind: SchedulerKind) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut ignored = |what: &str| {
            warnings.push(format!(
                "scheduler option {what} is not implemented in attend's {} scheduler; ignored",
                kind.label()
            ));
        };
        let uses_sigmas = matches!(kind, SchedulerKind::Euler | SchedulerKind::DpmPp2m);
        if self.thresholding && matches!(kind, SchedulerKind::Ddim | SchedulerKind::DpmPp2m) {
            ignored("thresholding");
        }
        if uses_sigmas {
            for (flag, name) in [
                (self.use_exponential_sigmas, "use_exponential_sigmas"),
                (self.use_beta_sigmas, "use_beta_sigmas"),
            ] {
                if flag {
                    ignored(name);
                }
            }
        }
        if kind == SchedulerKind::Euler {
            if self.interpolation_type != "linear" {
                ignored(&format!("interpolation_type `{}`", self.interpolation_type));
            }
            if self.timestep_type != "discrete" {
                ignored(&format!("timestep_type `{}`", self.timestep_type));
            }
        }
        if kind == SchedulerKind::DpmPp2m {
            if self.use_lu_lambdas {
                ignored("use_lu_lambdas");
            }
            if self.use_flow_sigmas {
                ignored("use_flow_sigmas");
            }
            if self.algorithm_type != "dpmsolver++" {
                ignored(&format!(
                    "algorithm_type `{}` (runs as dpmsolver++)",
                    self.algorithm_type
                ));
            }
            if self.solver_order > 2 {
                ignored(&format!("solver_order {} (runs as 2)", self.solver_order));
            }
        }
        warnings
    }
}

/// Why a scheduler config's text could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigParseError {
    /// Not JSON, or not an object.
    Syntax(String),
    /// JSON, but a value is of the wrong type or unknown.
    Value(String),
}

/// Python's `json` writes `NaN`, `Infinity` and `-Infinity`, which are not JSON; turn them into `null`
/// (outside strings) so that the default applies.
fn replace_non_finite_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
            rest = &rest[ch.len_utf8()..];
            continue;
        }
        if ch == '"' {
            in_string = true;
            out.push(ch);
            rest = &rest[1..];
            continue;
        }
        let literal = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|literal| rest.starts_with(literal));
        if let Some(literal) = literal {
            out.push_str("null");
            rest = &rest[literal.len()..];
        } else {
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_and_nulls_take_defaults() {
        let config = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "trained_betas": null, "variance_type": null, "beta_schedule": "scaled_linear",
                "note": "a \"quoted\" -Infinity stays"}"#,
        )
        .unwrap();
        assert_eq!(config.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(config.beta_schedule, BetaSchedule::ScaledLinear);
        assert!(config.trained_betas.is_none());
    }

    #[test]
    fn unknown_beta_schedule_is_a_value_error() {
        let err = SchedulerConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#).unwrap_err();
        let ConfigParseError::Value(reason) = err else {
            panic!("expected a value error");
        };
        assert!(reason.contains("sigmoid"), "{reason}");
        assert!(matches!(
            SchedulerConfig::from_json_str("{ nope").unwrap_err(),
            ConfigParseError::Syntax(_)
        ));
    }
}
