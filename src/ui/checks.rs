//! The editor's checks of the generation parameters before a run: nothing is clamped without
//! saying so. A value out of range is shown next to its field, and Generate says why it does not
//! run. The ranges are the command line's.

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

/// The first problem of `params` that keeps them from running.
pub(crate) fn check_params(params: &GenerateParams) -> Result<(), String> {
    match steps_problem(params.steps).or_else(|| guidance_problem(params.guidance)) {
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
        assert!(check_params(&params).is_err());
        assert!(check_params(&GenerateParams::default()).is_ok());
    }
}
