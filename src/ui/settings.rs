//! The editor's settings: what the user chose, persisted between launches (eframe storage) and
//! saved in sessions. Plain serde data.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use crate::analysis::colormap::Colormap;
use crate::analysis::heatmap::{AggregationSettings, SelfAttentionSpan, UnetPlace};
use crate::worker::{GenerateParams, ModelSource, Products};

/// How the heat map is drawn over the image.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ViewSettings {
    /// Colormap of heat maps (canvas and thumbnails).
    pub colormap: Colormap,
    /// Weight of the heat map over the image, 0..1.
    pub opacity: f32,
    /// Heat below this (0..1) is not drawn.
    pub threshold: f32,
    /// Draw the image under the heat map.
    pub show_image: bool,
    /// Draw the heat map.
    pub show_heatmap: bool,
    /// Smooth (bilinear) image magnification; off shows crisp pixels.
    pub smooth_image: bool,
}

impl Default for ViewSettings {
    fn default() -> Self {
        Self {
            colormap: Colormap::Viridis,
            opacity: 0.6,
            threshold: 0.0,
            show_image: true,
            show_heatmap: true,
            smooth_image: false,
        }
    }
}

/// Which attention is combined into the word heat maps (the aggregation panel).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AggregationChoice {
    /// Query grids `(h, w)` to use; `None` is DAAM's default (every grid except the smallest,
    /// 8 times below the latent size).
    pub resolutions: Option<BTreeSet<(usize, usize)>>,
    /// Use the UNet's down blocks.
    pub down: bool,
    /// Use the mid block.
    pub mid: bool,
    /// Use the up blocks.
    pub up: bool,
    /// First step of the window (0-based).
    pub first_step: usize,
    /// Last step of the window; `None` means the last step of the run.
    pub last_step: Option<usize>,
    /// Divide by the per-pixel sum over the prompt tokens (DAAM's `normalize=True`).
    pub normalize_tokens: bool,
}

impl Default for AggregationChoice {
    fn default() -> Self {
        Self {
            resolutions: None,
            down: true,
            mid: false,
            up: true,
            first_step: 0,
            last_step: None,
            normalize_tokens: false,
        }
    }
}

impl AggregationChoice {
    /// The analysis settings, with the step window cut to `visible_steps` (the timeline's range).
    pub fn to_settings(&self, visible_steps: RangeInclusive<usize>) -> AggregationSettings {
        let places = [
            (self.down, UnetPlace::Down),
            (self.mid, UnetPlace::Mid),
            (self.up, UnetPlace::Up),
        ]
        .into_iter()
        .filter_map(|(chosen, place)| chosen.then_some(place))
        .collect();
        let first = self.first_step.max(*visible_steps.start());
        let last = self
            .last_step
            .unwrap_or(usize::MAX)
            .min(*visible_steps.end());
        AggregationSettings {
            resolutions: self.resolutions.clone(),
            places,
            steps: first..=last,
            normalize_tokens: self.normalize_tokens,
        }
    }
}

/// Everything the editor remembers between launches.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EditorSettings {
    /// The generation parameters in the left panel.
    pub params: GenerateParams,
    /// The model to load at start.
    pub model: ModelSource,
    /// How the UNet's matrix products treat their operands, for every model loaded.
    pub products: Products,
    /// How heat maps are drawn.
    pub view: ViewSettings,
    /// What the heat maps combine.
    pub aggregation: AggregationChoice,
    /// Self-attention probe: latest step or mean over steps.
    pub probe_span: SelfAttentionSpan,
    /// Folder of the last export, where the next dialog opens.
    pub export_folder: Option<PathBuf>,
}

impl Default for EditorSettings {
    fn default() -> Self {
        Self {
            params: GenerateParams {
                prompt: "a red circle and a blue square".to_owned(),
                ..GenerateParams::default()
            },
            model: ModelSource::Bundled,
            products: Products::ModelDefault,
            view: ViewSettings::default(),
            aggregation: AggregationChoice::default(),
            probe_span: SelfAttentionSpan::LatestStep,
            export_folder: None,
        }
    }
}

/// The key under which [`EditorSettings`] are stored in eframe's storage.
pub const SETTINGS_STORAGE_KEY: &str = "attend.editor.settings";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_window_is_cut_to_the_visible_steps() {
        let choice = AggregationChoice {
            first_step: 2,
            last_step: Some(8),
            ..AggregationChoice::default()
        };
        assert_eq!(choice.to_settings(0..=5).steps, 2..=5);
        assert_eq!(choice.to_settings(4..=4).steps, 4..=4);
        let open = AggregationChoice::default();
        assert_eq!(open.to_settings(0..=9).steps, 0..=9);
        assert_eq!(
            open.to_settings(0..=9).places,
            [UnetPlace::Down, UnetPlace::Up].into_iter().collect()
        );
    }

    #[test]
    fn settings_round_trip_through_json_and_tolerate_missing_fields() {
        let mut settings = EditorSettings::default();
        settings.view.colormap = Colormap::Turbo;
        settings.aggregation.resolutions = Some([(16, 16)].into_iter().collect());
        let json = serde_json::to_string(&settings).unwrap();
        let back: EditorSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, settings);
        let partial: EditorSettings = serde_json::from_str(r#"{"view":{"opacity":0.3}}"#).unwrap();
        assert_eq!(partial.view.opacity, 0.3);
        assert_eq!(partial.view.colormap, Colormap::Viridis);
    }
}
