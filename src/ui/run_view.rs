//! What the UI holds about the run it shows: every step's preview and maps, and its outcome.

use std::time::Instant;

use crate::analysis::heatmap::StepCross;
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
            final_image: None,
            outcome: RunOutcome::Running,
            self_attention_grids: Vec::new(),
            started_at: Instant::now(),
        }
    }

    /// Adds a step (they arrive in order).
    pub fn push_step(&mut self, frame: StepFrame) {
        self.step_count = frame.step_count;
        self.cross.push(frame.cross);
        self.steps.push(StepRecord {
            timestep: frame.timestep,
            preview: frame.preview,
            timing: frame.timing,
        });
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
