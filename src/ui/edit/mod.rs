//! Edit mode: Prompt-to-Prompt edits of the source run, side by side with it.
//!
//! The user types an edited prompt; the word-to-word alignment (word swap or refine, inferred from
//! the word counts) is shown at once from a whitespace split and replaced by the engine's own (its
//! tokenizer's words) once the edit runs. Word weights (reweight, on the token strip), the cross- and
//! self-attention windows and local-blend words (or a mask from the Segments view) make the
//! [`EditSpec`]. A changed spec re-runs only the edited branch ([`Command::GenerateEdit`]): the worker
//! keeps the source's recording and records it again only when the source parameters change. While
//! a slider moves, the edit re-runs as soon as the running one has shown a step
//! ([`EditMode::may_send_while_dragging`]); the newest edit supersedes the running one.
//!
//! The canvas shows source | edited side by side, or one over the other with a vertical divider to
//! drag (swipe). The heat maps, token strip and timeline follow the run chosen under "Heat maps of".
//!
//! | module | what it is |
//! |---|---|
//! | this one | [`EditMode`]: the edit's settings, its edited run and the worker's answers |
//! | `spec` | the spec as the controls change it (weights, blend words, the alignment preview) |
//! | `panel` | the edit panel (left, under Generate) |
//! | `compare` | the canvas comparison: side by side or swipe, blend mask, pane titles |
//!
//! [`Command::GenerateEdit`]: crate::worker::Command::GenerateEdit

pub(crate) mod compare;
pub(crate) mod panel;
pub(crate) mod spec;

use crate::analysis::segment::Mask;
use crate::ui::run_view::{RunOutcome, RunView};
use crate::ui::session::{EditBranchView, EditSession};
use crate::ui::state::{StatusLevel, StatusLog};
use crate::worker::{
    BlendMask, Branch, EditInfo, EditSpec, GenerateParams, InvertedImageSwap, LocalBlendConfig,
    PromptInfo, Reweight, RgbImage, SelfReplace, StepFrame,
};

/// What the status line and the edit panel say when the edit would change nothing.
pub(crate) const NOTHING_TO_EDIT: &str =
    "Edit prompt = source prompt: nothing to edit (change a word or a word's weight)";

/// True when `spec` would change nothing in `source_prompt`'s image: its edited prompt is the
/// source prompt (or empty) and no word is reweighted.
pub(crate) fn changes_nothing(spec: &EditSpec, source_prompt: &str) -> bool {
    let edit_prompt = spec.edit_prompt.trim();
    spec.reweights.is_empty() && (edit_prompt.is_empty() || edit_prompt == source_prompt.trim())
}

/// Edit mode's state: the user's edit and what the worker reported about its latest run.
#[derive(Default)]
pub(crate) struct EditMode {
    /// What is saved in sessions (the panel's settings).
    session: EditSession,
    /// The run id of the latest edit asked for, until its edited branch ends.
    active_run: Option<u64>,
    /// The spec of the latest edit sent, so a changed spec re-runs the edited branch.
    last_sent_spec: Option<EditSpec>,
    /// The edited run (branch [`Branch::Edited`]).
    run: Option<RunView>,
    /// What the engine reported about it (its alignment), with the source prompt it belongs to.
    info: Option<(String, EditInfo)>,
    /// The local-blend mask of the latest edited step.
    blend_mask: Option<BlendMask>,
    /// Bumped when the blend mask changes (for texture caches).
    mask_version: u64,
    /// The self-attention replacement was set by hand or by a session file; until then it follows
    /// the loaded model's recommendation ([`crate::worker::ModelInfo::edit_self_replace`]).
    self_replace_chosen: bool,
    /// The local-blend words the edit took by itself (the swapped words of an edit of an
    /// inverted image, [`crate::worker::INVERTED_IMAGE_SWAP`]); while the blend words are still
    /// these, they follow the edited prompt.
    auto_blend_words: Vec<String>,
    /// The blend words differ from what the edit took by itself: they stay as they are.
    blend_chosen: bool,
    /// The word weights the edit took by itself (the swapped words' weight on an inverted image).
    auto_reweights: Vec<Reweight>,
    /// The word weights differ from what the edit took by itself: they stay as they are.
    weights_chosen: bool,
}

impl EditMode {
    // ---------------------------------------------------------------------------------------------
    // Read access
    // ---------------------------------------------------------------------------------------------

    /// True while edit mode is on.
    pub(crate) fn enabled(&self) -> bool {
        self.session.enabled
    }

    /// The edit's settings as the panel shows them.
    pub(crate) fn session(&self) -> &EditSession {
        &self.session
    }

    /// The edit.
    pub(crate) fn spec(&self) -> &EditSpec {
        &self.session.spec
    }

    /// The edited run, if one started.
    pub(crate) fn run(&self) -> Option<&RunView> {
        self.run.as_ref()
    }

    /// What the engine reported about the latest edit (alignment, source reuse).
    pub(crate) fn info(&self) -> Option<&EditInfo> {
        self.info.as_ref().map(|(_, info)| info)
    }

    /// The engine's alignment report with the source prompt it was made for.
    pub(crate) fn info_with_source(&self) -> Option<(&str, &EditInfo)> {
        self.info
            .as_ref()
            .map(|(source, info)| (source.as_str(), info))
    }

    /// The local-blend mask of the latest edited step, if one was applied.
    pub(crate) fn blend_mask(&self) -> Option<&BlendMask> {
        self.blend_mask.as_ref()
    }

    /// Changes whenever the blend mask changes.
    pub(crate) fn mask_version(&self) -> u64 {
        self.mask_version
    }

    /// The edited run when edit mode shows its heat maps (else the source's are shown).
    pub(crate) fn shown_run(&self) -> Option<&RunView> {
        (self.session.enabled && self.session.viewing == EditBranchView::Edited)
            .then_some(self.run.as_ref())
            .flatten()
    }

    /// True when the canvas compares source and edited images (edit mode on, an edited run
    /// exists).
    pub(crate) fn compares(&self) -> bool {
        self.session.enabled && self.run.is_some()
    }

    /// True while an edited branch is asked for or running.
    pub(crate) fn is_running(&self) -> bool {
        self.active_run.is_some()
    }

    /// True when an edited run finished and no other edit is asked for.
    pub(crate) fn finished(&self) -> bool {
        self.active_run.is_none()
            && self
                .run
                .as_ref()
                .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
    }

    /// The edit-mode part of a session (none while edit mode was never used).
    pub(crate) fn to_session(&self) -> Option<EditSession> {
        (self.session.enabled || !self.session.spec.edit_prompt.is_empty())
            .then(|| self.session.clone())
    }

    /// True when run `run_id` is the latest edit asked for.
    pub(crate) fn is_active_run(&self, run_id: u64) -> bool {
        self.active_run == Some(run_id)
    }

    /// True when the edited branch of run `run_id` has started (its end is the edit's to handle;
    /// before that, the run's end is its source's).
    pub(crate) fn branch_started(&self, run_id: u64) -> bool {
        self.is_active_run(run_id) && self.run.as_ref().is_some_and(|run| run.run_id == run_id)
    }

    // ---------------------------------------------------------------------------------------------
    // Changes from the user (through commands)
    // ---------------------------------------------------------------------------------------------

    /// Turns edit mode on or off (the edit itself stays, for when it is turned on again).
    pub(crate) fn set_enabled(&mut self, enabled: bool) {
        self.session.enabled = enabled;
    }

    /// Starts the edited prompt from `source_prompt` when there is none yet.
    pub(crate) fn start_from(&mut self, source_prompt: &str) {
        if self.session.spec.edit_prompt.is_empty() {
            source_prompt.clone_into(&mut self.session.spec.edit_prompt);
        }
    }

    /// Takes the panel's settings (edit mode stays on or off as it is). A changed self-attention
    /// replacement counts as chosen by hand (no longer following the model's recommendation).
    pub(crate) fn set_session(&mut self, session: EditSession) {
        if session.spec.self_replace != self.session.spec.self_replace {
            self.self_replace_chosen = true;
        }
        let enabled = self.session.enabled;
        self.session = EditSession { enabled, ..session };
    }

    /// Moves the swipe divider (0..1 of the image width).
    pub(crate) fn set_swipe(&mut self, position: f32) {
        self.session.swipe = position.clamp(0.0, 1.0);
    }

    /// Sets the weight of `word` in the edited prompt (1 removes the reweight).
    pub(crate) fn set_word_weight(&mut self, word: &str, weight: f32) {
        spec::set_word_weight(&mut self.session.spec, word, weight);
    }

    /// Back to the default windows and the recommended self-attention replacement (`recommended`
    /// is asked for the edit as reset).
    pub(crate) fn reset(&mut self, recommended: impl Fn(&EditSpec) -> SelfReplace) {
        let prompt = std::mem::take(&mut self.session.spec.edit_prompt);
        self.session.spec = EditSpec::new(prompt);
        self.self_replace_chosen = false;
        self.auto_blend_words.clear();
        self.blend_chosen = false;
        self.auto_reweights.clear();
        self.weights_chosen = false;
        self.follow_recommendation(recommended);
    }

    /// An edit whose self-attention replacement nobody chose takes the recommendation (after a
    /// model loaded or the edited prompt changed).
    pub(crate) fn follow_recommendation(&mut self, recommended: impl Fn(&EditSpec) -> SelfReplace) {
        if !self.self_replace_chosen {
            self.session.spec.self_replace = recommended(&self.session.spec);
        }
    }

    /// An edit of an inverted image starts as [`crate::worker::INVERTED_IMAGE_SWAP`] says: local
    /// blend on its swapped words and their weight in the edited prompt. What it took by itself
    /// follows the edited prompt; blend words or weights changed by hand stay as they are.
    pub(crate) fn follow_inverted_image_swap(
        &mut self,
        source_prompt: &str,
        swap: InvertedImageSwap,
    ) {
        if swap.local_blend {
            self.follow_swap_blend(source_prompt);
        }
        self.follow_swap_weight(source_prompt, swap.swapped_word_weight);
    }

    fn follow_swap_blend(&mut self, source_prompt: &str) {
        let current: Vec<String> = self
            .session
            .spec
            .local_blend
            .as_ref()
            .map(|blend| blend.words.clone())
            .unwrap_or_default();
        if self.blend_chosen || current != self.auto_blend_words {
            // Chosen by hand (or by a session file).
            self.blend_chosen = true;
            return;
        }
        let wanted = spec::swapped_word_selectors(source_prompt, &self.session.spec.edit_prompt);
        if wanted == current {
            return;
        }
        let old: Vec<&str> = current.iter().map(String::as_str).collect();
        spec::set_blend_words(&mut self.session.spec, &old, false);
        let new: Vec<&str> = wanted.iter().map(String::as_str).collect();
        spec::set_blend_words(&mut self.session.spec, &new, true);
        self.auto_blend_words = wanted;
    }

    fn follow_swap_weight(&mut self, source_prompt: &str, weight: f32) {
        let spec = &mut self.session.spec;
        if self.weights_chosen || spec.reweights != self.auto_reweights {
            self.weights_chosen = true;
            return;
        }
        let wanted: Vec<Reweight> = if (weight - 1.0).abs() > 1e-4 {
            spec::swapped_edit_words(source_prompt, &spec.edit_prompt)
                .into_iter()
                .map(|word| Reweight {
                    word,
                    scale: weight,
                })
                .collect()
        } else {
            Vec::new()
        };
        spec.reweights.clone_from(&wanted);
        self.auto_reweights = wanted;
    }

    /// Takes a session's edit mode (none: edit mode off, a fresh edit).
    pub(crate) fn apply_session(&mut self, session: Option<EditSession>) {
        self.self_replace_chosen = session.is_some();
        self.auto_blend_words.clear();
        self.blend_chosen = session.is_some();
        self.auto_reweights.clear();
        self.weights_chosen = session.is_some();
        self.session = session.unwrap_or_default();
        self.run = None;
        self.info = None;
        self.blend_mask = None;
        self.last_sent_spec = None;
    }

    /// Turns edit mode on with `edit_prompt`, the swapped words blended (the `ATTEND_SCREENSHOT_EDIT`
    /// plan: the picture shows the blend mask).
    pub(crate) fn enter(&mut self, edit_prompt: &str, source_prompt: &str) {
        self.session.enabled = true;
        edit_prompt.clone_into(&mut self.session.spec.edit_prompt);
        let selectors = spec::swapped_word_selectors(source_prompt, edit_prompt);
        let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
        spec::set_blend_words(&mut self.session.spec, &selectors, true);
    }

    /// Uses `mask` (image resolution, 1 = may change) as the local-blend region instead of the
    /// blend words' attention, and turns edit mode on (starting from `source_prompt` when there is
    /// no edited prompt).
    pub(crate) fn use_mask(&mut self, mask: Mask, source_prompt: Option<&str>) {
        let spec = &mut self.session.spec;
        let blend = spec
            .local_blend
            .get_or_insert_with(|| LocalBlendConfig::new(Vec::new()));
        blend.mask = Some(BlendMask {
            h: mask.h,
            w: mask.w,
            data: mask.data,
        });
        self.session.enabled = true;
        self.session.show_blend_mask = true;
        if let Some(source_prompt) = source_prompt {
            self.start_from(source_prompt);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Runs
    // ---------------------------------------------------------------------------------------------

    /// True when the edit would change nothing: the edited prompt is `source_prompt` (or empty)
    /// and no word is reweighted.
    pub(crate) fn is_no_op(&self, source_prompt: &str) -> bool {
        changes_nothing(&self.session.spec, source_prompt)
    }

    /// The spec to send with a generation of `source_prompt`, or `None` when the edit would change
    /// nothing (only the source is made).
    pub(crate) fn spec_to_send(&self, source_prompt: &str) -> Option<EditSpec> {
        let spec = &self.session.spec;
        let has_prompt = !spec.edit_prompt.trim().is_empty();
        (has_prompt && !self.is_no_op(source_prompt)).then(|| spec.clone())
    }

    /// True when a changed edit may go out while a control (a weight or window slider) is being
    /// dragged: when no edit runs, or the running one has shown a step. The newest edit then
    /// supersedes the running one at once, and a continuous drag still shows a preview after every
    /// step instead of restarting before anything is on screen. (Once the pointer is released,
    /// a changed edit always goes out at once.)
    pub(crate) fn may_send_while_dragging(&self) -> bool {
        match self.active_run {
            None => true,
            Some(run_id) => self
                .run
                .as_ref()
                .is_some_and(|run| run.run_id == run_id && !run.steps.is_empty()),
        }
    }

    /// True when `spec` differs from the edit last sent.
    pub(crate) fn is_unsent(&self, spec: &EditSpec) -> bool {
        self.last_sent_spec.as_ref() != Some(spec)
    }

    /// The spec to re-run the edited branch of `source_prompt`'s image with, when edit mode is on,
    /// the edit changes something and it changed since it was last sent.
    pub(crate) fn changed_spec(&self, source_prompt: &str) -> Option<EditSpec> {
        if !self.session.enabled {
            return None;
        }
        self.spec_to_send(source_prompt)
            .filter(|spec| self.is_unsent(spec))
    }

    /// An edit run `run_id` of `spec` was sent (none: the source alone is recorded); a running
    /// edited branch is superseded.
    pub(crate) fn sent(&mut self, run_id: u64, spec: Option<EditSpec>) {
        if let Some(run) = self.run.as_mut().filter(|run| run.is_running()) {
            run.outcome = RunOutcome::Cancelled {
                steps_done: run.steps.len(),
            };
        }
        self.active_run = spec.is_some().then_some(run_id);
        self.last_sent_spec = spec;
    }

    /// The source of the active edit is recorded again: the edited image on screen is stale.
    pub(crate) fn source_restarted(&mut self, run_id: u64) {
        if self.is_active_run(run_id) {
            self.run = None;
            self.blend_mask = None;
        }
    }

    /// The edited branch of run `run_id` started with `params` (the edited prompt's), its tokens
    /// and how it aligns with `source_prompt`.
    pub(crate) fn branch_started_with(
        &mut self,
        run_id: u64,
        params: GenerateParams,
        prompt: PromptInfo,
        info: EditInfo,
        source_prompt: &str,
        status: &mut StatusLog,
    ) {
        for warning in &prompt.warnings {
            status.push(StatusLevel::Warning, warning.clone());
        }
        self.run = Some(RunView::new(run_id, Branch::Edited, params, prompt));
        self.info = Some((source_prompt.to_owned(), info));
        self.blend_mask = None;
        self.mask_version += 1;
    }

    /// A step of the edited branch, with the blend mask applied after it (if one was).
    pub(crate) fn branch_step(&mut self, frame: StepFrame, blend_mask: Option<BlendMask>) {
        if let Some(run) = &mut self.run {
            run.push_step(frame);
        }
        self.take_blend_mask(blend_mask);
    }

    /// The edited branch finished.
    pub(crate) fn branch_finished(
        &mut self,
        image: RgbImage,
        elapsed_secs: f64,
        blend_mask: Option<BlendMask>,
        status: &mut StatusLog,
    ) {
        if let Some(run) = &mut self.run {
            run.final_image = Some(image);
            run.outcome = RunOutcome::Finished { elapsed_secs };
        }
        self.take_blend_mask(blend_mask);
        self.active_run = None;
        let how = if self.info().is_some_and(|info| info.source_reused) {
            "source reused"
        } else {
            "source recorded"
        };
        status.push(
            StatusLevel::Info,
            format!("Edit done in {elapsed_secs:.1} s ({how})"),
        );
    }

    /// The edited branch was cancelled.
    pub(crate) fn branch_cancelled(&mut self, status: &mut StatusLog) {
        self.active_run = None;
        if let Some(run) = self.run.as_mut().filter(|run| run.is_running()) {
            run.outcome = RunOutcome::Cancelled {
                steps_done: run.steps.len(),
            };
        }
        status.push(StatusLevel::Info, "Edit cancelled");
    }

    /// The edited branch failed.
    pub(crate) fn branch_failed(&mut self, message: &str, status: &mut StatusLog) {
        self.active_run = None;
        if let Some(run) = &mut self.run {
            run.outcome = RunOutcome::Failed(message.to_owned());
        }
        status.push(StatusLevel::Error, format!("Edit failed: {message}"));
    }

    /// Run `run_id` ended before its edited branch started (its source was cancelled or failed).
    pub(crate) fn run_ended(&mut self, run_id: u64) {
        if self.is_active_run(run_id) {
            self.active_run = None;
        }
    }

    /// A newer run `run_id` went out: an older edit run is superseded (its edited branch stops
    /// where it was, and its late events are dropped).
    pub(crate) fn run_ended_by(&mut self, run_id: u64) {
        if self.active_run.is_some_and(|active| active < run_id) {
            self.active_run = None;
            if let Some(run) = self.run.as_mut().filter(|run| run.is_running()) {
                run.outcome = RunOutcome::Cancelled {
                    steps_done: run.steps.len(),
                };
            }
        }
    }

    /// The worker restarted: the edit run died with the old engine.
    pub(crate) fn worker_restarted(&mut self) {
        self.active_run = None;
    }

    fn take_blend_mask(&mut self, blend_mask: Option<BlendMask>) {
        if blend_mask.is_some() {
            self.blend_mask = blend_mask;
            self.mask_version += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::heatmap::StepCross;
    use crate::worker::{EditKind, StepTiming};

    fn frame(step_index: usize) -> StepFrame {
        StepFrame {
            step_index,
            step_count: 4,
            timestep: 0.0,
            preview: RgbImage::default(),
            cross: std::sync::Arc::new(StepCross {
                step_index,
                groups: Vec::new(),
            }),
            timing: StepTiming::default(),
        }
    }

    /// While a slider is dragged, the next edit waits for the running one's first step (so a
    /// preview shows), then goes out; with nothing running it goes out at once.
    #[test]
    fn a_drag_sends_the_next_edit_once_the_running_one_showed_a_step() {
        let mut mode = EditMode::default();
        let mut status = StatusLog::default();
        assert!(mode.may_send_while_dragging(), "nothing runs");
        mode.sent(7, Some(EditSpec::new("a blue square")));
        assert!(!mode.may_send_while_dragging(), "asked for, not started");
        let info = EditInfo {
            kind: EditKind::Replace,
            words: Vec::new(),
            source_reused: true,
            source_recordings: 1,
        };
        mode.branch_started_with(
            7,
            GenerateParams::default(),
            PromptInfo::default(),
            info,
            "a blue square",
            &mut status,
        );
        assert!(!mode.may_send_while_dragging(), "started, no step yet");
        mode.branch_step(frame(0), None);
        assert!(mode.may_send_while_dragging(), "a preview is on screen");
        // The next edit supersedes it; the old run's steps do not count for the new one.
        mode.sent(8, Some(EditSpec::new("a blue square")));
        assert!(!mode.may_send_while_dragging());
        mode.branch_finished(RgbImage::default(), 0.1, None, &mut status);
        assert!(mode.may_send_while_dragging(), "the edit finished");
    }

    fn blend_words(mode: &EditMode) -> Vec<String> {
        mode.spec()
            .local_blend
            .as_ref()
            .map(|blend| blend.words.clone())
            .unwrap_or_default()
    }

    /// An edit of an inverted image blends on its swapped words, which follow the edited prompt
    /// until the blend words are changed by hand.
    #[test]
    fn the_swapped_words_blend_until_the_blend_is_chosen_by_hand() {
        let source = "a red circle and a blue square";
        let swap = InvertedImageSwap {
            local_blend: true,
            self_replace_end: Some(0.0),
            swapped_word_weight: 2.0,
        };
        let mut mode = EditMode::default();
        mode.start_from(source);
        mode.follow_inverted_image_swap(source, swap);
        assert!(blend_words(&mode).is_empty(), "nothing swapped yet");
        let mut session = mode.session().clone();
        session.spec.edit_prompt = "a red star and a blue square".to_string();
        mode.set_session(session);
        mode.follow_inverted_image_swap(source, swap);
        assert_eq!(blend_words(&mode), ["circle", "star"]);
        assert_eq!(
            mode.spec().reweights,
            [Reweight {
                word: "star".to_string(),
                scale: 2.0
            }]
        );
        // Another swap: the blend moves with it.
        let mut session = mode.session().clone();
        session.spec.edit_prompt = "a red circle and a blue star".to_string();
        mode.set_session(session);
        mode.follow_inverted_image_swap(source, swap);
        assert_eq!(blend_words(&mode), ["square", "star"]);
        assert_eq!(mode.spec().reweights.len(), 1);
        // A weight set by hand stays.
        mode.set_word_weight("star", 3.0);
        mode.follow_inverted_image_swap(source, swap);
        assert_eq!(mode.spec().reweights[0].scale, 3.0);
        // Unchecked by hand: it stays off, whatever the prompt says next.
        let mut session = mode.session().clone();
        session.spec.local_blend = None;
        session.spec.edit_prompt = "a red star and a blue star".to_string();
        mode.set_session(session);
        mode.follow_inverted_image_swap(source, swap);
        assert!(blend_words(&mode).is_empty());
        // A reset follows the recommendation again.
        mode.reset(|_| SelfReplace::default());
        mode.follow_inverted_image_swap(source, swap);
        assert_eq!(blend_words(&mode).len(), 4);
    }
}
