//! What the UI holds about a run it shows: every step's preview and maps, and its outcome.
//! A run's steps are kept once (moved out of the worker's events); step windows are summed through
//! [`CrossPrefixSums`] without copying them.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use crate::analysis::aggregate::CrossPrefixSums;
use crate::analysis::heatmap::StepCross;
use crate::worker::{Branch, GenerateParams, PromptInfo, RgbImage, StepFrame, StepTiming};

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

/// What caches of a run's data are keyed by: its id and branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RunKey {
    /// The run id the worker gave it.
    pub run_id: u64,
    /// Which branch of that run.
    pub branch: Branch,
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

/// A run on screen.
#[derive(Clone, Debug)]
pub struct RunView {
    /// Its id.
    pub run_id: u64,
    /// Which branch of the run: a plain run and an edit's source are [`Branch::Source`], an edit's
    /// edited prompt [`Branch::Edited`] (same run id).
    pub branch: Branch,
    /// Parameters, defaults resolved.
    pub params: GenerateParams,
    /// Words and tokens.
    pub prompt: PromptInfo,
    /// Steps the run will take.
    pub step_count: usize,
    /// Per received step: preview and timing (index = step index).
    pub steps: Vec<StepRecord>,
    /// Per received step: cross-attention, shared with the worker's event (never copied).
    pub cross: Vec<Arc<StepCross>>,
    /// Running sums of `cross`, for step windows at the cost of one step.
    sums: CrossPrefixSums,
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
    /// A run (branch) that has just started.
    pub fn new(run_id: u64, branch: Branch, params: GenerateParams, prompt: PromptInfo) -> Self {
        let step_count = params.steps;
        Self {
            run_id,
            branch,
            params,
            prompt,
            step_count,
            steps: Vec::with_capacity(step_count),
            cross: Vec::with_capacity(step_count),
            sums: CrossPrefixSums::with_capacity(step_count),
            final_image: None,
            outcome: RunOutcome::Running,
            self_attention_grids: Vec::new(),
            started_at: Instant::now(),
        }
    }

    /// What caches of this run's data are keyed by.
    pub fn key(&self) -> RunKey {
        RunKey {
            run_id: self.run_id,
            branch: self.branch,
        }
    }

    /// Adds a step (they arrive in order). The step's maps are shared, not copied.
    pub fn push_step(&mut self, frame: StepFrame) {
        self.step_count = frame.step_count;
        self.cross.push(frame.cross);
        self.sums.push_last(&self.cross);
        self.steps.push(StepRecord {
            timestep: frame.timestep,
            preview: frame.preview,
            timing: frame.timing,
        });
    }

    /// The cross-attention of steps `first..=last` summed into one step, so that aggregating it
    /// equals aggregating the steps themselves at the cost of one (borrowed unless the window
    /// starts after step 0 and spans several steps). `None` when the steps are out of range or not
    /// summable.
    pub fn summed_cross(&self, first: usize, last: usize) -> Option<Cow<'_, StepCross>> {
        self.sums.window(&self.cross, first, last)
    }

    /// Copies of every step's cross-attention, for analysis that takes a slice of steps (an
    /// export of the whole run; heat maps of steps that cannot be summed). Per frame the heat
    /// maps use [`Self::summed_cross`] instead, which copies nothing.
    pub fn cross_copies(&self) -> Vec<StepCross> {
        self.cross
            .iter()
            .map(|step| StepCross::clone(step))
            .collect()
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
