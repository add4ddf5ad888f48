//! Range checks of the segmentation settings, shared by the command line (before a run) and the
//! editor (before a segmentation): each returns [`AnalysisError::InvalidArgument`] naming the setting,
//! the value and the accepted range. The clustering functions call them too, so nothing out of range
//! is ever clamped without a word.

use super::{DiffSegSettings, KMeansSettings, LabelSettings, MaskSettings, SegmentSettings};
use crate::analysis::{AnalysisError, AnalysisResult};

/// Most segments a segmentation may be asked for (KMeans' k): the label map stores segment ids as
/// 8-bit palette indices, and the anchors of DiffSeg (16x16 by default) make at most as many.
pub const MAX_SEGMENTS: usize = 256;

/// Most seeded KMeans runs (`n_init`); scikit-learn's default is 10.
pub const MAX_KMEANS_RUNS: usize = 1000;

/// Most DiffSeg merge passes; DiffSeg uses 3, and later passes rarely change anything.
pub const MAX_MERGE_PASSES: usize = 100;

/// Most Lloyd iterations per KMeans run (scikit-learn's default is 300).
pub const MAX_KMEANS_ITERATIONS: usize = 100_000;

fn invalid(name: &'static str, reason: String) -> AnalysisError {
    AnalysisError::InvalidArgument { name, reason }
}

/// `value` must be a finite fraction in `0..=1`.
pub fn check_fraction(name: &'static str, value: f32) -> AnalysisResult<()> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            name,
            format!("{value} is not a fraction (accepted: 0 to 1)"),
        ))
    }
}

/// `value` must be a whole number in `low..=high`.
pub fn check_count(
    name: &'static str,
    value: usize,
    low: usize,
    high: usize,
) -> AnalysisResult<()> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            name,
            format!("{value} is outside the accepted range {low} to {high}"),
        ))
    }
}

impl KMeansSettings {
    /// Checks k (1 to [`MAX_SEGMENTS`]), the runs (1 to [`MAX_KMEANS_RUNS`]), the iterations, the
    /// tolerance (finite, at least 0) and the merge and sliver fractions (0 to 1).
    pub fn validate(&self) -> AnalysisResult<()> {
        check_count("k", self.k, 1, MAX_SEGMENTS)?;
        check_count("n_init", self.n_init, 1, MAX_KMEANS_RUNS)?;
        check_count(
            "KMeans iterations",
            self.max_iterations,
            1,
            MAX_KMEANS_ITERATIONS,
        )?;
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(invalid(
                "KMeans tolerance",
                format!("{} must be finite and at least 0", self.tolerance),
            ));
        }
        if let Some(fraction) = self.merge_fraction {
            check_fraction("merge fraction", fraction)?;
        }
        if let Some(fraction) = self.min_segment_fraction {
            check_fraction("min segment fraction", fraction)?;
        }
        Ok(())
    }
}

/// KMeans' k must not exceed the cells of the grid it clusters (`grid_h x grid_w`, the largest
/// self-attention grid kept): each cluster needs a cell.
pub fn check_k_for_grid(k: usize, grid_h: usize, grid_w: usize) -> AnalysisResult<()> {
    let cells = grid_h * grid_w;
    if k <= cells {
        Ok(())
    } else {
        Err(invalid(
            "k",
            format!(
                "{k} is more than the {cells} cells of the {grid_h}x{grid_w} self-attention grid \
                 it clusters (accepted: 1 to {})",
                cells.min(MAX_SEGMENTS)
            ),
        ))
    }
}

impl DiffSegSettings {
    /// Checks the anchors (at least 1 per side), the thresholds (finite, at least 0), the passes
    /// (1 to [`MAX_MERGE_PASSES`]) and the common grid (not empty).
    pub fn validate(&self) -> AnalysisResult<()> {
        check_count("anchor side", self.anchor_side, 1, usize::MAX)?;
        check_count("passes", self.passes, 1, MAX_MERGE_PASSES)?;
        if !(self.kl_threshold.is_finite() && self.kl_threshold >= 0.0) {
            return Err(invalid(
                "kl threshold",
                format!(
                    "{} must be finite and at least 0 (a symmetric KL divergence; DiffSeg uses 0.9)",
                    self.kl_threshold
                ),
            ));
        }
        if let Some(relative) = self.relative_threshold {
            if !(relative.is_finite() && relative >= 0.0) {
                return Err(invalid(
                    "kl relative",
                    format!(
                        "{relative} must be finite and at least 0 (a fraction of the divergences' \
                         95th percentile; default 0.25)"
                    ),
                ));
            }
        }
        if let Some((h, w)) = self.grid {
            if h == 0 || w == 0 {
                return Err(invalid("DiffSeg grid", format!("{h}x{w} is empty")));
            }
        }
        Ok(())
    }
}

impl LabelSettings {
    /// The threshold must be a finite fraction in `0..=1` (scores are means of min-max normalised
    /// maps).
    pub fn validate(&self) -> AnalysisResult<()> {
        check_fraction("label threshold", self.threshold)
    }
}

impl MaskSettings {
    /// Checks the threshold (0 to 1) and that growing, shrinking and feathering stay within the
    /// image (`image_h x image_w` pixels): `|dilate_px|` and `feather_px` at most the longer side,
    /// `feather_px` finite and at least 0.
    pub fn validate(&self, image_h: usize, image_w: usize) -> AnalysisResult<()> {
        check_fraction("mask threshold", self.threshold)?;
        let side = image_h.max(image_w);
        let limit = i64::try_from(side).unwrap_or(i64::MAX);
        if i64::from(self.dilate_px).abs() > limit {
            return Err(invalid(
                "dilate px",
                format!(
                    "{} pixels is more than the {image_w}x{image_h} image's longer side \
                     (accepted: -{side} to {side})",
                    self.dilate_px
                ),
            ));
        }
        if !(self.feather_px.is_finite() && (0.0..=side as f32).contains(&self.feather_px)) {
            return Err(invalid(
                "feather px",
                format!(
                    "{} is not a width in pixels within the {image_w}x{image_h} image \
                     (accepted: 0 to {side})",
                    self.feather_px
                ),
            ));
        }
        Ok(())
    }
}

impl SegmentSettings {
    /// Checks every setting of both methods and of the labelling (see their `validate`).
    pub fn validate(&self) -> AnalysisResult<()> {
        self.kmeans.validate()?;
        self.diffseg.validate()?;
        self.labels.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(error: AnalysisError) -> &'static str {
        let AnalysisError::InvalidArgument { name, .. } = error;
        name
    }

    #[test]
    fn defaults_and_reference_settings_pass() {
        SegmentSettings::default().validate().unwrap();
        KMeansSettings::reference().validate().unwrap();
        DiffSegSettings::reference().validate().unwrap();
        MaskSettings::default().validate(64, 64).unwrap();
    }

    #[test]
    fn out_of_range_settings_name_the_setting() {
        let kmeans = |change: fn(&mut KMeansSettings)| {
            let mut settings = KMeansSettings::default();
            change(&mut settings);
            name_of(settings.validate().unwrap_err())
        };
        assert_eq!(kmeans(|s| s.k = 0), "k");
        assert_eq!(kmeans(|s| s.k = usize::MAX), "k");
        assert_eq!(kmeans(|s| s.n_init = 0), "n_init");
        assert_eq!(
            kmeans(|s| s.merge_fraction = Some(f32::NAN)),
            "merge fraction"
        );
        assert_eq!(
            kmeans(|s| s.min_segment_fraction = Some(2.0)),
            "min segment fraction"
        );
        assert_eq!(kmeans(|s| s.tolerance = -1.0), "KMeans tolerance");

        let diffseg = |change: fn(&mut DiffSegSettings)| {
            let mut settings = DiffSegSettings::default();
            change(&mut settings);
            name_of(settings.validate().unwrap_err())
        };
        assert_eq!(diffseg(|s| s.kl_threshold = -1.0), "kl threshold");
        assert_eq!(
            diffseg(|s| s.relative_threshold = Some(f32::INFINITY)),
            "kl relative"
        );
        assert_eq!(diffseg(|s| s.passes = 0), "passes");
        assert_eq!(diffseg(|s| s.anchor_side = 0), "anchor side");
        assert_eq!(diffseg(|s| s.grid = Some((0, 4))), "DiffSeg grid");

        for threshold in [-1.0, 2.0, f32::NAN] {
            let settings = LabelSettings {
                threshold,
                ..LabelSettings::default()
            };
            let error = settings.validate().unwrap_err();
            assert!(error.to_string().contains("0 to 1"), "{error}");
        }

        let mask = |dilate_px: i32, feather_px: f32| {
            MaskSettings {
                dilate_px,
                feather_px,
                ..MaskSettings::default()
            }
            .validate(64, 32)
        };
        mask(-64, 64.0).unwrap();
        assert_eq!(name_of(mask(100_000, 0.0).unwrap_err()), "dilate px");
        assert_eq!(name_of(mask(i32::MIN, 0.0).unwrap_err()), "dilate px");
        assert_eq!(name_of(mask(0, -1.0).unwrap_err()), "feather px");
        assert_eq!(name_of(mask(0, f32::NAN).unwrap_err()), "feather px");
    }

    #[test]
    fn k_is_bounded_by_the_grid() {
        check_k_for_grid(1024, 32, 32).unwrap();
        let error = check_k_for_grid(1025, 32, 32).unwrap_err();
        assert!(error.to_string().contains("1024 cells"), "{error}");
        assert!(error.to_string().contains("32x32"), "{error}");
    }
}
