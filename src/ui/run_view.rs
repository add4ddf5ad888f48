//! What the UI holds about the run it shows: every step's preview and maps, and its outcome.

use std::time::Instant;

use crate::analysis::heatmap::{CrossGroup, StepCross};
use crate::worker::{GenerateParams, PromptInfo, RgbImage, StepFrame, StepTiming};

/// How a run ended (or that it has not).
#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    /// Steps are still coming.
    Running,
    /// Finished after `elapsed_secs`.
    Finished {
        /// Wall time of the whole run.
        elapsed_secs: f64,
    },
    /// Cancelled (or superseded) after `steps_done` steps.
    Cancelled {
        /// Steps completed.
        steps_done: usize,
    },
    /// Failed with this message.
    Failed(String),
}

/// One received step.
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// Scheduler timestep.
    pub timestep: f64,
    /// Preview image after this step.
    pub preview: RgbImage,
    /// Timings.
    pub timing: StepTiming,
}

/// The run on screen.
#[derive(Clone, Debug)]
pub struct RunView {
    /// Its id.
    pub run_id: u64,
    /// Parameters, defaults resolved.
    pub params: GenerateParams,
    /// Words and tokens.
    pub prompt: PromptInfo,
    /// Steps the run will take.
    pub step_count: usize,
    /// Per received step: preview and timing (index = step index).
    pub steps: Vec<StepRecord>,
    /// Per received step: cross-attention (kept apart so it can be handed to analysis as a slice).
    pub cross: Vec<StepCross>,
    /// Running sums of `cross`: entry `k` holds, per group, the sum of the maps of steps `0..=k`
    /// (`None` once a step's groups differ from the first step's, which no engine does).
    cumulative: Option<Vec<StepCross>>,
    /// The final image once finished.
    pub final_image: Option<RgbImage>,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Resolutions with self-attention (known when finished).
    pub self_attention_grids: Vec<(usize, usize)>,
    /// When the UI learned that it started.
    pub started_at: Instant,
}

impl RunView {
    /// A run that has just started.
    pub fn new(run_id: u64, params: GenerateParams, prompt: PromptInfo) -> Self {
        let step_count = params.steps;
        Self {
            run_id,
            params,
            prompt,
            step_count,
            steps: Vec::with_capacity(step_count),
            cross: Vec::with_capacity(step_count),
            cumulative: Some(Vec::with_capacity(step_count)),
            final_image: None,
            outcome: RunOutcome::Running,
            self_attention_grids: Vec::new(),
            started_at: Instant::now(),
        }
    }

    /// Adds a step (they arrive in order).
    pub fn push_step(&mut self, frame: StepFrame) {
        self.step_count = frame.step_count;
        self.extend_cumulative(&frame.cross);
        self.cross
            .push(std::sync::Arc::unwrap_or_clone(frame.cross));
        self.steps.push(StepRecord {
            timestep: frame.timestep,
            preview: frame.preview,
            timing: frame.timing,
        });
    }

    fn extend_cumulative(&mut self, step: &StepCross) {
        let Some(cumulative) = &mut self.cumulative else {
            return;
        };
        let next = match cumulative.last() {
            None => step.clone(),
            Some(previous) if same_groups(previous, step) => StepCross {
                step_index: step.step_index,
                groups: previous
                    .groups
                    .iter()
                    .zip(&step.groups)
                    .map(|(sum, group)| CrossGroup {
                        data: sum
                            .data
                            .iter()
                            .zip(&group.data)
                            .map(|(a, b)| a + b)
                            .collect(),
                        ..group.clone()
                    })
                    .collect(),
            },
            Some(_) => {
                self.cumulative = None;
                return;
            }
        };
        cumulative.push(next);
    }

    /// The cross-attention of steps `first..=last` summed into one step, so that aggregating it
    /// equals aggregating the steps themselves (the layer counts are the same at every step) at the
    /// cost of one. `None` when the steps are out of range or not summable.
    pub fn summed_cross(&self, first: usize, last: usize) -> Option<StepCross> {
        if first == last {
            return self.cross.get(first).cloned();
        }
        let cumulative = self.cumulative.as_ref()?;
        let upper = cumulative.get(last)?;
        let Some(lower) = first.checked_sub(1).and_then(|index| cumulative.get(index)) else {
            return Some(upper.clone());
        };
        Some(StepCross {
            step_index: last,
            groups: upper
                .groups
                .iter()
                .zip(&lower.groups)
                .map(|(upper, lower)| CrossGroup {
                    data: upper
                        .data
                        .iter()
                        .zip(&lower.data)
                        .map(|(a, b)| a - b)
                        .collect(),
                    ..upper.clone()
                })
                .collect(),
        })
    }

    /// True while steps are still coming.
    pub fn is_running(&self) -> bool {
        self.outcome == RunOutcome::Running
    }

    /// Mean seconds per step so far.
    pub fn secs_per_step(&self) -> Option<f64> {
        if self.steps.is_empty() {
            return None;
        }
        let total: f64 = self.steps.iter().map(|step| step.timing.step_secs).sum();
        Some(total / self.steps.len() as f64)
    }

    /// Estimated seconds until the last step.
    pub fn eta_secs(&self) -> Option<f64> {
        let remaining = self.step_count.saturating_sub(self.steps.len());
        self.secs_per_step().map(|secs| secs * remaining as f64)
    }

    /// The image to show at `step` (the final decoded image for the last step of a finished run).
    pub fn image_at(&self, step: usize) -> Option<&RgbImage> {
        let last = self.steps.len().checked_sub(1)?;
        if step >= last {
            if let Some(image) = &self.final_image {
                return Some(image);
            }
        }
        self.steps.get(step.min(last)).map(|record| &record.preview)
    }

    /// Query grids `(h, w)` the self-attention probe can use: what the finished run kept, or while
    /// it runs, the attention grids received so far whose sides are at most 32 (what the engine's
    /// store keeps by default), largest first.
    pub fn probe_grids(&self) -> Vec<(usize, usize)> {
        if !self.self_attention_grids.is_empty() || !self.is_running() {
            return self.self_attention_grids.clone();
        }
        self.cross_grids()
            .into_iter()
            .filter(|&(h, w)| h.max(w) <= 32)
            .collect()
    }

    /// The attention grids `(h, w)` present in the received steps, largest first.
    pub fn cross_grids(&self) -> Vec<(usize, usize)> {
        let mut grids: Vec<(usize, usize)> = self
            .cross
            .first()
            .map(|step| step.groups.iter().map(|group| (group.h, group.w)).collect())
            .unwrap_or_default();
        grids.sort_by_key(|&(h, w)| std::cmp::Reverse(h * w));
        grids.dedup();
        grids
    }
}

/// True when two steps have the same groups in the same order (so their maps can be added).
fn same_groups(a: &StepCross, b: &StepCross) -> bool {
    a.groups.len() == b.groups.len()
        && a.groups.iter().zip(&b.groups).all(|(a, b)| {
            (
                a.place,
                a.h,
                a.w,
                a.layer_count,
                a.token_count,
                a.data.len(),
            ) == (
                b.place,
                b.h,
                b.w,
                b.layer_count,
                b.token_count,
                b.data.len(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::heatmap::{word_heatmaps, AggregationSettings, UnetPlace};
    use crate::analysis::WordSpan;

    fn step(step_index: usize) -> StepCross {
        let groups = [(UnetPlace::Down, 8, 2), (UnetPlace::Up, 4, 3)]
            .iter()
            .map(|&(place, side, layer_count)| CrossGroup {
                place,
                h: side,
                w: side,
                layer_count,
                token_count: 4,
                data: (0..4 * side * side)
                    .map(|index| ((index * 7 + step_index * 13) % 17) as f32 / 17.0)
                    .collect(),
            })
            .collect();
        StepCross { step_index, groups }
    }

    #[test]
    fn summed_steps_aggregate_like_the_steps_themselves() {
        let mut run = RunView::new(1, GenerateParams::default(), PromptInfo::default());
        for index in 0..6 {
            run.push_step(StepFrame {
                step_index: index,
                step_count: 6,
                timestep: 0.0,
                preview: RgbImage::default(),
                cross: std::sync::Arc::new(step(index)),
                timing: StepTiming::default(),
            });
        }
        let words = [WordSpan {
            text: "w".to_owned(),
            token_indices: vec![1, 2],
        }];
        for (first, last) in [(0, 5), (2, 4), (3, 3), (0, 0)] {
            let settings = AggregationSettings {
                steps: first..=last,
                ..AggregationSettings::default()
            };
            let direct = word_heatmaps(&run.cross, &words, &settings, 8, 8);
            let summed = run.summed_cross(first, last).unwrap();
            let fast = word_heatmaps(&[summed], &words, &AggregationSettings::default(), 8, 8);
            let max_diff = direct[0]
                .data
                .iter()
                .zip(&fast[0].data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max_diff < 1e-5, "{first}..={last}: {max_diff}");
            assert!((direct[0].peak - fast[0].peak).abs() < 1e-4);
        }
    }
}
