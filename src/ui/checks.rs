//! The editor's checks of the generation parameters before a run: nothing is clamped without
//! saying so. A value out of range is shown under the fields, and Generate says why it does not
//! run. Steps take the command line's range; sizes are multiples of the model's latent scale, at
//! most [`MAX_SIDE_PX`].

use std::ops::RangeInclusive;

use crate::worker::GenerateParams;

/// Denoising steps a run may take: the command line's range (the schedulers' training timesteps).
pub(crate) const STEPS_RANGE: RangeInclusive<usize> = 1..=1000;

/// What is wrong with `steps`, if anything.
pub(crate) fn steps_problem(steps: usize) -> Option<String> {
    (!STEPS_RANGE.contains(&steps)).then(|| {
        format!(
            "steps {steps} is out of range: {}..={}",
            STEPS_RANGE.start(),
            STEPS_RANGE.end()
        )
    })
}

/// What is wrong with the guidance scale `guidance`, if anything (it must be a finite number).
pub(crate) fn guidance_problem(guidance: f64) -> Option<String> {
    (!guidance.is_finite())
        .then(|| format!("guidance {guidance} is not a finite number (try 7.5; <= 1 disables it)"))
}

/// The largest image side the editor asks for, in pixels.
pub(crate) const MAX_SIDE_PX: usize = 4096;

/// What is wrong with an image side (`name` "width" or "height") of `value` pixels for a model
/// whose sizes are multiples of `multiple` pixels, if anything.
pub(crate) fn side_problem(name: &str, value: usize, multiple: usize) -> Option<String> {
    let multiple = multiple.max(1);
    if !(multiple..=MAX_SIDE_PX).contains(&value) {
        Some(format!(
            "{name} {value} px is out of range: {multiple}..={MAX_SIDE_PX}"
        ))
    } else if !value.is_multiple_of(multiple) {
        let lower = value / multiple * multiple;
        Some(format!(
            "{name} {value} px is not a multiple of {multiple} px (the model's latent scale); try {lower} or {}",
            lower + multiple
        ))
    } else {
        None
    }
}

/// Every problem of `params` that keeps them from running, for a model whose sizes are multiples
/// of `size_multiple` pixels (the sizes the model chooses itself are not checked here).
pub(crate) fn params_problems(params: &GenerateParams, size_multiple: usize) -> Vec<String> {
    [
        steps_problem(params.steps),
        guidance_problem(params.guidance),
        params
            .width_px
            .and_then(|width| side_problem("width", width, size_multiple)),
        params
            .height_px
            .and_then(|height| side_problem("height", height, size_multiple)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The first problem of `params` that keeps them from running (see [`params_problems`]).
pub(crate) fn check_params(params: &GenerateParams, size_multiple: usize) -> Result<(), String> {
    match params_problems(params, size_multiple).into_iter().next() {
        Some(problem) => Err(problem),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_take_the_command_lines_range() {
        assert_eq!(steps_problem(1), None);
        assert_eq!(steps_problem(1000), None);
        assert_eq!(
            steps_problem(0).as_deref(),
            Some("steps 0 is out of range: 1..=1000")
        );
        assert!(steps_problem(1001).is_some_and(|problem| problem.contains("1001")));
    }

    #[test]
    fn guidance_must_be_finite() {
        assert_eq!(guidance_problem(7.5), None);
        assert_eq!(guidance_problem(0.0), None);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let problem = guidance_problem(bad).unwrap_or_default();
            assert!(problem.contains("not a finite number"), "{problem}");
        }
        let params = GenerateParams {
            guidance: f64::NAN,
            ..GenerateParams::default()
        };
        assert!(check_params(&params, 8).is_err());
        assert!(check_params(&GenerateParams::default(), 8).is_ok());
    }

    #[test]
    fn sizes_are_in_range_and_multiples_of_the_models_scale() {
        assert_eq!(side_problem("width", 64, 8), None);
        assert_eq!(side_problem("width", 4096, 8), None);
        assert_eq!(
            side_problem("width", 5000, 8).as_deref(),
            Some("width 5000 px is out of range: 8..=4096")
        );
        assert!(side_problem("height", 0, 8).is_some());
        assert_eq!(
            side_problem("height", 100, 8).as_deref(),
            Some(
                "height 100 px is not a multiple of 8 px (the model's latent scale); try 96 or 104"
            )
        );
        let params = GenerateParams {
            width_px: Some(100),
            steps: 0,
            ..GenerateParams::default()
        };
        assert_eq!(params_problems(&params, 8).len(), 2);
    }
}
