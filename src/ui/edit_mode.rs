//! Edit mode: Prompt-to-Prompt edits of the source run, side by side with it.
//!
//! The user types an edited prompt; the word-to-word alignment (word swap or refine, inferred from
//! the word counts) is shown at once from a whitespace split and replaced by the engine's own (its
//! tokenizer's words) once the edit runs. Word weights (reweight, on the token strip), the cross- and
//! self-attention windows and local-blend words (or a mask from the Segments view) make the
//! [`EditSpec`]. A changed spec re-runs only the edited branch ([`Command::GenerateEdit`]): the worker
//! keeps the source's recording and records it again only when the source parameters change.
//!
//! The canvas shows source | edited side by side, or one over the other with a vertical divider to
//! drag (swipe). The heat maps, token strip and timeline follow the run chosen under "Heat maps of".
//!
//! [`Command::GenerateEdit`]: crate::worker::Command::GenerateEdit

use egui::{Color32, Rect, Sense, Vec2};

use crate::analysis::alignment::{
    align_prompts, split_prompt_scope, word_selector, word_token_indices, EditKind, PromptLayout,
    WordChange, WordPair,
};
use crate::analysis::segment::Mask;
use crate::analysis::WordSpan;
use crate::ui::app::{EditorApp, StatusLevel};
use crate::ui::run_view::{RunOutcome, RunView};
use crate::worker::{
    BlendMask, Branch, EditInfo, EditSpec, Event, GenerateParams, LocalBlendConfig, Reweight,
    RgbImage, SelfReplace, StepWindow,
};

/// The edited run's view gets the run id with this bit set, so that caches keyed by run id (heat
/// maps, canvas image) never mistake it for the source run of the same id.
const EDIT_VIEW_BIT: u64 = 1 << 62;

/// Range of the word weights (reweight); 1 changes nothing.
pub(super) const WEIGHT_RANGE: std::ops::RangeInclusive<f32> = -2.0..=3.0;

/// How source and edited image are compared on the canvas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CompareMode {
    /// Source on the left, edited on the right.
    #[default]
    SideBySide,
    /// One image over the other, split by a vertical divider the user drags.
    Swipe,
}

/// Which run the heat maps, token strip and timeline show in edit mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EditBranchView {
    /// The source prompt's run.
    Source,
    /// The edited prompt's run.
    #[default]
    Edited,
}

/// Edit mode as saved in a session file: with the session's parameters it reproduces the edited
/// image exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EditSession {
    /// Edit mode is on.
    pub enabled: bool,
    /// The edit (edited prompt, windows, weights, local blend).
    pub spec: EditSpec,
    /// Side by side or swipe.
    pub compare: CompareMode,
    /// Swipe divider position, 0..1 of the image width.
    pub swipe: f32,
    /// Which run's heat maps are shown.
    pub viewing: EditBranchView,
    /// Draw the local-blend mask over the edited image.
    pub show_blend_mask: bool,
}

impl Default for EditSession {
    fn default() -> Self {
        Self {
            enabled: false,
            spec: EditSpec::new(""),
            compare: CompareMode::default(),
            swipe: 0.5,
            viewing: EditBranchView::default(),
            show_blend_mask: true,
        }
    }
}

/// A texture of a plain image, rebuilt when its key changes.
#[derive(Default)]
struct CachedTexture {
    key: Option<(u64, usize, bool)>,
    texture: Option<egui::TextureHandle>,
}

/// The editor's edit-mode state.
#[derive(Default)]
pub(super) struct EditState {
    /// What is saved in sessions.
    pub(super) settings: EditSession,
    /// The latest edit run asked for.
    active_run: Option<u64>,
    /// The spec of the latest edit sent, so a changed spec re-runs the edited branch.
    last_sent_spec: Option<EditSpec>,
    /// The edited run on screen.
    pub(super) run: Option<RunView>,
    /// What the engine reported about it (its alignment), with the source prompt it belongs to.
    info: Option<(String, EditInfo)>,
    /// The local-blend mask of the latest edited step.
    blend_mask: Option<BlendMask>,
    /// Id of the edit prompt field (no automatic run while it has the focus).
    prompt_field: Option<egui::Id>,
    other_image: CachedTexture,
    mask_texture: CachedTexture,
    /// Bumped when the blend mask changes, for `mask_texture`'s key.
    mask_version: u64,
    /// The self-attention replacement was set by hand or by a session file; until then it follows
    /// the loaded model's recommendation ([`ModelInfo::edit_self_replace`]).
    self_replace_chosen: bool,
}

impl EditState {
    fn spec(&self) -> &EditSpec {
        &self.settings.spec
    }
}

/// The words of a prompt split at whitespace, punctuation dropped, lower-cased; tokens are the words
/// between `<start>` and `<end>` (the alignment preview before the engine's tokenizer answers).
fn whitespace_layout(prompt: &str) -> (Vec<String>, Vec<WordSpan>) {
    let mut tokens = vec!["<start>".to_owned()];
    let mut words = Vec::new();
    for text in crate::analysis::plain_words(prompt) {
        tokens.push(text.clone());
        words.push(WordSpan {
            text,
            token_indices: vec![tokens.len() - 1],
        });
    }
    tokens.push("<end>".to_owned());
    (tokens, words)
}

/// The alignment of two prompts by [`whitespace_layout`].
fn preview_alignment(
    source: &str,
    edit: &str,
    kind: Option<EditKind>,
) -> Result<(EditKind, Vec<WordPair>), String> {
    let (source_tokens, source_words) = whitespace_layout(source);
    let (edit_tokens, edit_words) = whitespace_layout(edit);
    let length = source_tokens.len().max(edit_tokens.len()) + 1;
    align_prompts(
        &PromptLayout {
            tokens: &source_tokens,
            words: &source_words,
        },
        &PromptLayout {
            tokens: &edit_tokens,
            words: &edit_words,
        },
        length,
        kind,
    )
    .map(|alignment| (alignment.kind, alignment.words))
    .map_err(|error| error.to_string())
}

/// The weight of `word` in `spec` (1 without a reweight).
fn word_weight(spec: &EditSpec, word: &str) -> f32 {
    spec.reweights
        .iter()
        .find(|reweight| reweight.word.eq_ignore_ascii_case(word))
        .map_or(1.0, |reweight| reweight.scale)
}

/// Sets the weight of `word` (a weight of 1 removes the reweight).
fn set_word_weight(spec: &mut EditSpec, word: &str, scale: f32) {
    spec.reweights
        .retain(|reweight| !reweight.word.eq_ignore_ascii_case(word));
    if (scale - 1.0).abs() > 1e-4 {
        spec.reweights.push(Reweight {
            word: word.to_owned(),
            scale,
        });
    }
}

/// True when `word` (a word selector such as `square#2`) is a local-blend word of `spec`.
fn is_blend_word(spec: &EditSpec, word: &str) -> bool {
    spec.local_blend.as_ref().is_some_and(|blend| {
        blend
            .words
            .iter()
            .any(|blend_word| blend_word.eq_ignore_ascii_case(word))
    })
}

/// Adds or removes local-blend words; the blend is dropped when it has neither words nor a mask.
fn set_blend_words(spec: &mut EditSpec, words: &[&str], on: bool) {
    let blend = spec
        .local_blend
        .get_or_insert_with(|| LocalBlendConfig::new(Vec::new()));
    for word in words.iter().filter(|word| !word.is_empty()) {
        blend
            .words
            .retain(|blend_word| !blend_word.eq_ignore_ascii_case(word));
        if on {
            blend.words.push((*word).to_owned());
        }
    }
    if blend.words.is_empty() && blend.mask.is_none() {
        spec.local_blend = None;
    }
}

/// The local-blend words of one aligned pair: its source word and its edited word, each named by
/// position when the text repeats ("square#2"), so that in "a red square and a blue square" the
/// blue square's checkbox blends only the blue square.
fn pair_blend_selectors(
    pair: &WordPair,
    source_words: &[WordSpan],
    edit_words: &[WordSpan],
) -> Vec<String> {
    let source_selector = pair
        .source_word
        .map(|index| word_selector(source_words, index, edit_words))
        .filter(|selector| !selector.is_empty());
    let edit_selector = pair
        .edit_word
        .map(|index| word_selector(edit_words, index, source_words))
        .filter(|selector| !selector.is_empty());
    // A selector that would also pick a word of the other prompt is kept to its own prompt
    // ("edit:square#1" when the source's first square is another object), unless both prompts'
    // selectors are the same (an unchanged word, looked up in both).
    let scoped = |selector: String, scope: &str, other: &[WordSpan]| {
        if word_token_indices(other, &selector).is_empty() {
            selector
        } else {
            format!("{scope}:{selector}")
        }
    };
    let mut selectors = Vec::with_capacity(2);
    match (source_selector, edit_selector) {
        (Some(source), Some(edit)) if source == edit => selectors.push(source),
        (source, edit) => {
            selectors.extend(source.map(|selector| scoped(selector, "source", edit_words)));
            selectors.extend(edit.map(|selector| scoped(selector, "edit", source_words)));
        }
    }
    selectors
}

/// Drops reweights and blend words that are no longer words of the prompts (after the edited
/// prompt changed), so the engine does not refuse the spec.
fn prune_spec(spec: &mut EditSpec, source_prompt: &str) {
    let (_, edit_words) = whitespace_layout(&spec.edit_prompt);
    let (_, source_words) = whitespace_layout(source_prompt);
    let in_edit = |word: &str| !word_token_indices(&edit_words, word).is_empty();
    let in_source = |word: &str| !word_token_indices(&source_words, word).is_empty();
    spec.reweights.retain(|reweight| in_edit(&reweight.word));
    if let Some(blend) = &mut spec.local_blend {
        blend.words.retain(|word| {
            let (source_scope, edit_scope, selector) = split_prompt_scope(word);
            (edit_scope && in_edit(selector)) || (source_scope && in_source(selector))
        });
        if blend.words.is_empty() && blend.mask.is_none() {
            spec.local_blend = None;
        }
    }
}

/// A weight slider for `word` (range [`WEIGHT_RANGE`], 1 = no change), labelled "Weight of <word>".
/// A word's weight applies to all its occurrences, so only the first (`first`) gets the slider; the
/// others show the value.
pub(super) fn weight_slider(ui: &mut egui::Ui, spec: &mut EditSpec, word: &str, first: bool) {
    let mut weight = word_weight(spec, word);
    if !first {
        ui.weak(format!("weight {weight:.1}"))
            .on_hover_text("Set by the first occurrence of the word");
        return;
    }
    ui.spacing_mut().slider_width = 56.0;
    let response = ui
        .add(
            egui::Slider::new(&mut weight, WEIGHT_RANGE)
                .fixed_decimals(1)
                .step_by(0.1),
        )
        .on_hover_text(format!(
            "Weight of \"{word}\" in the edited prompt's attention: 1 = unchanged, 0 = removed, \
             negative = inverted"
        ));
    let label = format!("Weight of {word}");
    response.widget_info(|| egui::WidgetInfo::slider(true, f64::from(weight), &label));
    if response.changed() {
        set_word_weight(spec, word, weight);
    }
}

impl EditorApp {
    // ---------------------------------------------------------------------------------------------
    // Read access (tests, other panels)
    // ---------------------------------------------------------------------------------------------

    /// True in edit mode.
    pub fn edit_mode(&self) -> bool {
        self.edit.settings.enabled
    }

    /// The edit as the panel describes it.
    pub fn edit_spec(&self) -> &EditSpec {
        self.edit.spec()
    }

    /// The edited run on screen, if any.
    pub fn edit_run_view(&self) -> Option<&RunView> {
        self.edit.run.as_ref()
    }

    /// What the engine reported about the latest edit (alignment, source reuse).
    pub fn edit_info(&self) -> Option<&EditInfo> {
        self.edit.info.as_ref().map(|(_, info)| info)
    }

    /// The local-blend mask of the latest edited step, if one was applied.
    pub fn edit_blend_mask(&self) -> Option<&BlendMask> {
        self.edit.blend_mask.as_ref()
    }

    /// How source and edited images are compared.
    pub fn edit_compare_mode(&self) -> CompareMode {
        self.edit.settings.compare
    }

    /// The swipe divider's position, 0..1 of the image width.
    pub fn edit_swipe_position(&self) -> f32 {
        self.edit.settings.swipe
    }

    /// The edit-mode part of a session.
    pub(super) fn edit_session(&self) -> Option<EditSession> {
        let settings = &self.edit.settings;
        (settings.enabled || !settings.spec.edit_prompt.is_empty()).then(|| settings.clone())
    }

    /// Takes a session's edit mode (none: edit mode off).
    pub(super) fn apply_edit_session(&mut self, session: Option<EditSession>) {
        self.edit.self_replace_chosen = session.is_some();
        self.edit.settings = session.unwrap_or_default();
        if !self.edit.self_replace_chosen {
            self.edit.settings.spec.self_replace = self.recommended_self_replace();
        }
        self.edit.run = None;
        self.edit.info = None;
        self.edit.blend_mask = None;
        self.edit.last_sent_spec = None;
    }

    /// Turns edit mode on with `edit_prompt` (the `ATTEND_SCREENSHOT_EDIT` plan).
    /// Local blend is put on the swapped words, so the picture shows the blend mask, and the heat
    /// map is left off the canvas, so both images are seen as they are.
    pub(super) fn enter_edit_mode(&mut self, edit_prompt: &str) {
        self.edit.settings.enabled = true;
        self.settings.view.show_heatmap = false;
        self.edit.settings.spec.edit_prompt = edit_prompt.to_owned();
        let source_prompt = self.settings.params.prompt.clone();
        if let Ok((_, pairs)) = preview_alignment(&source_prompt, edit_prompt, None) {
            // The same selectors as the blend checkboxes: a repeated word by its occurrence.
            let (_, source_words) = whitespace_layout(&source_prompt);
            let (_, edit_words) = whitespace_layout(edit_prompt);
            for pair in pairs
                .iter()
                .filter(|pair| pair.change == WordChange::Swapped)
            {
                let selectors = pair_blend_selectors(pair, &source_words, &edit_words);
                let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
                set_blend_words(&mut self.edit.settings.spec, &selectors, true);
            }
        }
    }

    /// Uses `mask` (image resolution, 1 = may change) as the edit's local-blend region instead of the
    /// blend words' attention (the Segments view's "Use as local-blend mask"). Turns edit mode on;
    /// the edited branch re-runs on the next frame when a source run is on screen.
    pub(super) fn use_mask_as_local_blend(&mut self, mask: Mask) {
        let spec = &mut self.edit.settings.spec;
        let blend = spec
            .local_blend
            .get_or_insert_with(|| LocalBlendConfig::new(Vec::new()));
        blend.mask = Some(BlendMask {
            h: mask.h,
            w: mask.w,
            data: mask.data,
        });
        self.edit.settings.enabled = true;
        self.edit.settings.show_blend_mask = true;
        if self.edit.settings.spec.edit_prompt.is_empty() {
            if let Some(run) = &self.run {
                self.edit.settings.spec.edit_prompt = run.params.prompt.clone();
            }
        }
        self.push_status(
            StatusLevel::Info,
            "The edit's local blend now uses the chosen mask",
        );
    }

    /// True when an edited run finished and no other edit is asked for.
    pub(super) fn edit_finished(&self) -> bool {
        self.edit.active_run.is_none()
            && self
                .edit
                .run
                .as_ref()
                .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
    }

    /// True while an edited branch is asked for or running.
    pub(super) fn edit_is_running(&self) -> bool {
        self.edit.active_run.is_some()
    }

    /// The run whose heat maps, token strip and timeline are shown: the edited run when edit mode
    /// shows it, else the source run.
    pub(super) fn shown_run(&self) -> Option<&RunView> {
        let edit = &self.edit;
        if edit.settings.enabled && edit.settings.viewing == EditBranchView::Edited {
            if let Some(run) = &edit.run {
                return Some(run);
            }
        }
        self.run.as_ref()
    }

    /// True when the heat maps, token strip (with weight sliders) and timeline show the edited run.
    pub(super) fn shows_edited_run(&self) -> bool {
        self.edit.settings.enabled
            && self.edit.settings.viewing == EditBranchView::Edited
            && self.edit.run.is_some()
    }

    // ---------------------------------------------------------------------------------------------
    // Running edits
    // ---------------------------------------------------------------------------------------------

    /// The spec to send, or `None` when there is no edited prompt.
    fn spec_to_send(&self) -> Option<EditSpec> {
        let spec = self.edit.spec();
        (!spec.edit_prompt.trim().is_empty()).then(|| spec.clone())
    }

    /// Starts an edit of `params`' image (records the source when needed). Called by
    /// [`EditorApp::generate`] in edit mode and when the edit changes.
    pub(super) fn generate_edit_run(&mut self, params: GenerateParams) {
        let spec = self.spec_to_send();
        match self.worker.generate_edit(params, spec.clone()) {
            Ok(run_id) => {
                if let Some(run) = self.run.as_mut().filter(|run| run.is_running()) {
                    run.outcome = RunOutcome::Cancelled {
                        steps_done: run.steps.len(),
                    };
                }
                if let Some(run) = self.edit.run.as_mut().filter(|run| run.is_running()) {
                    run.outcome = RunOutcome::Cancelled {
                        steps_done: run.steps.len(),
                    };
                }
                self.pending_run = Some(run_id);
                self.edit.active_run = spec.is_some().then_some(run_id);
                self.edit.last_sent_spec = spec;
            }
            Err(error) => self.push_status(StatusLevel::Error, format!("Cannot edit: {error}")),
        }
    }

    /// Re-runs the edited branch when the edit changed (not while the source is being made, a
    /// pointer button is held or the edit prompt is being typed).
    pub(super) fn edit_auto_run(&mut self, ui: &egui::Ui) {
        if !self.edit.settings.enabled || self.pending_run.is_some() {
            return;
        }
        let Some(source) = self.run.as_ref() else {
            return;
        };
        if !matches!(source.outcome, RunOutcome::Finished { .. }) {
            return;
        }
        let Some(spec) = self.spec_to_send() else {
            return;
        };
        if self.edit.last_sent_spec.as_ref() == Some(&spec) {
            return;
        }
        let typing = self
            .edit
            .prompt_field
            .is_some_and(|id| ui.memory(|memory| memory.has_focus(id)));
        if typing || ui.input(|input| input.pointer.any_down()) {
            return;
        }
        let params = source.params.clone();
        self.generate_edit_run(params);
    }

    /// Handles the edit's events; gives back the events that are not (only) the edit's.
    pub(super) fn take_edit_event(&mut self, event: Event) -> Option<Event> {
        let active = self.edit.active_run;
        match event {
            Event::Started {
                run_id,
                branch: Branch::Source,
                ..
            } if Some(run_id) == active => {
                // The source is recorded again: the edited image on screen is stale.
                self.edit.run = None;
                self.edit.blend_mask = None;
                Some(event)
            }
            Event::Started {
                run_id,
                branch: Branch::Edited,
                prompt,
                edit,
                ..
            } => {
                let info = edit.filter(|_| Some(run_id) == active)?;
                if self.pending_run == Some(run_id) {
                    self.pending_run = None;
                }
                for warning in &prompt.warnings {
                    self.push_status(StatusLevel::Warning, warning.clone());
                }
                let mut params = self
                    .run
                    .as_ref()
                    .map(|run| run.params.clone())
                    .unwrap_or_default();
                params.prompt = self.edit.settings.spec.edit_prompt.clone();
                let word_count = prompt.words.len();
                self.edit.run = Some(RunView::new(run_id | EDIT_VIEW_BIT, params, prompt));
                let source_prompt = self
                    .run
                    .as_ref()
                    .map(|run| run.params.prompt.clone())
                    .unwrap_or_default();
                self.edit.info = Some((source_prompt, info));
                self.edit.blend_mask = None;
                self.edit.mask_version += 1;
                if self.shows_edited_run() {
                    self.timeline.cursor = None;
                    if self.selected_word.is_some_and(|index| index >= word_count) {
                        self.selected_word = None;
                    }
                }
                None
            }
            Event::Step {
                run_id,
                branch: Branch::Edited,
                frame,
                blend_mask,
            } => {
                if Some(run_id) != active {
                    return None;
                }
                if let Some(run) = &mut self.edit.run {
                    run.push_step(*frame);
                }
                if blend_mask.is_some() {
                    self.edit.blend_mask = blend_mask;
                    self.edit.mask_version += 1;
                }
                None
            }
            Event::Finished {
                run_id,
                branch: Branch::Edited,
                image,
                elapsed_secs,
                blend_mask,
                ..
            } => {
                if Some(run_id) != active {
                    return None;
                }
                if let Some(run) = &mut self.edit.run {
                    run.final_image = Some(image);
                    run.outcome = RunOutcome::Finished { elapsed_secs };
                }
                if blend_mask.is_some() {
                    self.edit.blend_mask = blend_mask;
                    self.edit.mask_version += 1;
                }
                self.edit.active_run = None;
                let reused = self.edit_info().is_some_and(|info| info.source_reused);
                let how = if reused {
                    "source reused"
                } else {
                    "source recorded"
                };
                self.push_status(
                    StatusLevel::Info,
                    format!("Edit done in {elapsed_secs:.1} s ({how})"),
                );
                None
            }
            Event::Cancelled { run_id, steps_done } if Some(run_id) == active => {
                self.edit.active_run = None;
                let edit_started = self
                    .edit
                    .run
                    .as_ref()
                    .is_some_and(|run| run.run_id == run_id | EDIT_VIEW_BIT);
                if !edit_started {
                    return Some(Event::Cancelled { run_id, steps_done });
                }
                if self.pending_run == Some(run_id) {
                    self.pending_run = None;
                }
                if let Some(run) = self.edit.run.as_mut().filter(|run| run.is_running()) {
                    run.outcome = RunOutcome::Cancelled {
                        steps_done: run.steps.len(),
                    };
                }
                self.push_status(StatusLevel::Info, "Edit cancelled");
                None
            }
            Event::Failed {
                run_id: Some(run_id),
                message,
            } if Some(run_id) == active => {
                self.edit.active_run = None;
                let edit_started = self
                    .edit
                    .run
                    .as_ref()
                    .is_some_and(|run| run.run_id == run_id | EDIT_VIEW_BIT);
                if !edit_started {
                    return Some(Event::Failed {
                        run_id: Some(run_id),
                        message,
                    });
                }
                if self.pending_run == Some(run_id) {
                    self.pending_run = None;
                }
                if let Some(run) = &mut self.edit.run {
                    run.outcome = RunOutcome::Failed(message.clone());
                }
                self.push_status(StatusLevel::Error, format!("Edit failed: {message}"));
                None
            }
            Event::WorkerRestarted { .. } => {
                // The run died with the old engine.
                self.edit.active_run = None;
                Some(event)
            }
            other => Some(other),
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The edit panel (left, under Generate)
    // ---------------------------------------------------------------------------------------------

    /// Edit mode's controls.
    pub(super) fn edit_panel_ui(&mut self, ui: &mut egui::Ui) {
        ui.separator();
        let mut enabled = self.edit.settings.enabled;
        if ui
            .checkbox(&mut enabled, "Edit mode")
            .on_hover_text("Prompt-to-Prompt: edit the image by editing its prompt")
            .changed()
        {
            self.edit.settings.enabled = enabled;
            if enabled && self.edit.settings.spec.edit_prompt.is_empty() {
                self.edit.settings.spec.edit_prompt = self.run.as_ref().map_or_else(
                    || self.settings.params.prompt.clone(),
                    |run| run.params.prompt.clone(),
                );
            }
            self.selected_word = None;
        }
        if !self.edit.settings.enabled {
            return;
        }
        let source_prompt = self.edit_source_prompt();

        let label = ui.label("Edit prompt");
        let response = ui
            .add(
                egui::TextEdit::singleline(&mut self.edit.settings.spec.edit_prompt)
                    .desired_width(f32::INFINITY)
                    .hint_text("a red square and a blue square"),
            )
            .labelled_by(label.id);
        self.edit.prompt_field = Some(response.id);
        if response.changed() {
            prune_spec(&mut self.edit.settings.spec, &source_prompt);
        }
        self.follow_model_edit_defaults();

        self.alignment_ui(ui, &source_prompt);
        self.windows_ui(ui);
        self.blend_ui(ui, &source_prompt);

        ui.horizontal(|ui| {
            let can_run = !self.edit.settings.spec.edit_prompt.trim().is_empty();
            if ui
                .add_enabled(can_run, egui::Button::new("Run edit"))
                .on_hover_text("Re-runs only the edited branch (the source is reused)")
                .clicked()
            {
                let params = self
                    .run
                    .as_ref()
                    .map_or_else(|| self.settings.params.clone(), |run| run.params.clone());
                self.generate_edit_run(params);
            }
            if ui
                .button("Reset edit")
                .on_hover_text(
                    "Back to the default windows and the model's recommended self layers",
                )
                .clicked()
            {
                let prompt = self.edit.settings.spec.edit_prompt.clone();
                self.edit.settings.spec = EditSpec::new(prompt);
                self.edit.self_replace_chosen = false;
                self.follow_model_edit_defaults();
            }
        });

        ui.label("Heat maps of");
        ui.horizontal(|ui| {
            let before = self.edit.settings.viewing;
            ui.radio_value(
                &mut self.edit.settings.viewing,
                EditBranchView::Source,
                "Source",
            );
            ui.radio_value(
                &mut self.edit.settings.viewing,
                EditBranchView::Edited,
                "Edited",
            );
            if before != self.edit.settings.viewing {
                self.selected_word = None;
                self.timeline.cursor = None;
            }
        });
        ui.horizontal(|ui| {
            ui.radio_value(
                &mut self.edit.settings.compare,
                CompareMode::SideBySide,
                "Side by side",
            );
            ui.radio_value(&mut self.edit.settings.compare, CompareMode::Swipe, "Swipe");
        });
        ui.checkbox(&mut self.edit.settings.show_blend_mask, "Show blend mask");
        if let Some(info) = self.edit_info() {
            let text = if info.source_reused {
                format!(
                    "Source reused (recorded {} time(s))",
                    info.source_recordings
                )
            } else {
                format!("Source recorded ({} time(s))", info.source_recordings)
            };
            ui.weak(text);
        }
    }

    /// The word-to-word alignment: the engine's when it belongs to these prompts, else a preview.
    fn alignment_ui(&mut self, ui: &mut egui::Ui, source_prompt: &str) {
        let spec = self.edit.spec();
        let from_engine = self.edit.info.as_ref().filter(|(source, info)| {
            source == source_prompt
                && self
                    .edit
                    .run
                    .as_ref()
                    .is_some_and(|run| run.params.prompt == spec.edit_prompt)
                && spec.kind.is_none_or(|kind| kind == info.kind)
        });
        let alignment = match from_engine {
            Some((_, info)) => Ok((info.kind, info.words.clone())),
            None => preview_alignment(source_prompt, &spec.edit_prompt, spec.kind),
        };
        match alignment {
            Ok((kind, words)) => {
                let kind_text = match kind {
                    EditKind::Replace => "Word swap",
                    EditKind::Refine => "Refine (words added or removed)",
                };
                ui.label(format!("Alignment: {kind_text}"));
                ui.horizontal_wrapped(|ui| {
                    ui.spacing_mut().item_spacing.x = 6.0;
                    for pair in &words {
                        alignment_chip(ui, pair);
                    }
                });
            }
            Err(error) => {
                ui.colored_label(ui.visuals().error_fg_color, error);
            }
        }
    }

    /// The prompt of the source run (the prompt field's before any run).
    fn edit_source_prompt(&self) -> String {
        self.run.as_ref().map_or_else(
            || self.settings.params.prompt.clone(),
            |run| run.params.prompt.clone(),
        )
    }

    /// The self-attention replacement the edit starts with: the loaded model's recommendation when
    /// the edited prompt changes words, the reference's when it only reweights the source (and
    /// before a model has loaded).
    fn recommended_self_replace(&self) -> SelfReplace {
        let word_edit = self
            .model
            .loaded
            .as_ref()
            .map_or_else(SelfReplace::default, |info| info.edit_self_replace);
        SelfReplace::for_edit(
            word_edit,
            &self.edit_source_prompt(),
            &self.edit.settings.spec.edit_prompt,
        )
    }

    /// A model finished loading or the edited prompt changed: an edit whose self-attention
    /// replacement nobody chose takes the recommendation.
    pub(super) fn follow_model_edit_defaults(&mut self) {
        if !self.edit.self_replace_chosen {
            self.edit.settings.spec.self_replace = self.recommended_self_replace();
        }
    }

    /// Cross- and self-attention windows.
    fn windows_ui(&mut self, ui: &mut egui::Ui) {
        let self_replace_before = self.edit.settings.spec.self_replace;
        self.window_controls_ui(ui);
        if self.edit.settings.spec.self_replace != self_replace_before {
            self.edit.self_replace_chosen = true;
        }
    }

    fn window_controls_ui(&mut self, ui: &mut egui::Ui) {
        let spec = &mut self.edit.settings.spec;
        ui.label("Attention windows (fraction of the steps)")
            .on_hover_text(
                "Cross: where the edited prompt takes the source's word attention; \
                 self: where it takes the source's self-attention (the layout)",
            );
        window_sliders(ui, &mut spec.cross_window.default, "Cross");
        window_sliders(ui, &mut spec.self_replace.window, "Self");
        // Which self-attention layers take the source's attention: the reference replaces those of
        // at most 16x16 queries (SD's two coarsest at 512 px); a model folder may recommend its own
        // (the bundled model: 32x32 and coarser, its two grids, for the first 20% of the steps).
        // Finer layers and longer windows hold the source closer, its shapes too.
        let mut sides: Vec<usize> = self
            .run
            .as_ref()
            .map(RunView::probe_grids)
            .unwrap_or_default()
            .into_iter()
            .map(|(h, w)| h.max(w))
            // The source's self-attention is recorded for every replaced layer and step: 64x64
            // layers (SD at 512 px) would take gigabytes.
            .filter(|&side| side <= 32)
            .collect();
        sides.push(16);
        sides.sort_unstable();
        sides.dedup();
        let spec = &mut self.edit.settings.spec;
        let current = self_replace_side(spec.self_replace.max_queries);
        if !sides.contains(&current) {
            sides.push(current);
            sides.sort_unstable();
        }
        let mut chosen = current;
        egui::ComboBox::from_label("Self layers up to")
            .selected_text(format!("{current}x{current} and coarser"))
            .show_ui(ui, |ui| {
                for &side in &sides {
                    ui.selectable_value(&mut chosen, side, format!("{side}x{side} and coarser"));
                }
            })
            .response
            .on_hover_text(
                "Self-attention layers with at most this many query cells take the source's \
                 self-attention inside the self window (the reference: 16x16; the default is \
                 the model's recommendation). Finer layers keep more of the source, its shapes too",
            );
        if chosen != current {
            spec.self_replace.max_queries = chosen * chosen;
        }
    }

    /// Local-blend words (and the Segments view's mask).
    fn blend_ui(&mut self, ui: &mut egui::Ui, source_prompt: &str) {
        ui.label("Local blend: only these words' regions change");
        let spec = &mut self.edit.settings.spec;
        let pairs = preview_alignment(source_prompt, &spec.edit_prompt, spec.kind)
            .map(|(_, words)| words)
            .unwrap_or_default();
        let (_, source_words) = whitespace_layout(source_prompt);
        let (_, edit_words) = whitespace_layout(&spec.edit_prompt);
        ui.horizontal_wrapped(|ui| {
            for pair in &pairs {
                let selectors = pair_blend_selectors(pair, &source_words, &edit_words);
                let words: Vec<&str> = selectors.iter().map(String::as_str).collect();
                if words.is_empty() {
                    continue;
                }
                let mut on = words.iter().any(|word| is_blend_word(spec, word));
                let text = match pair.change {
                    WordChange::Swapped => format!("{} / {}", pair.source_text, pair.edit_text),
                    _ if pair.edit_text.is_empty() => pair.source_text.clone(),
                    _ => pair.edit_text.clone(),
                };
                let label = format!("Blend {text}");
                let response = ui.checkbox(&mut on, text.as_str());
                response.widget_info(|| {
                    egui::WidgetInfo::selected(egui::Role::CheckBox, true, on, &label)
                });
                if response.changed() {
                    set_blend_words(spec, &words, on);
                }
            }
        });
        let has_mask = spec
            .local_blend
            .as_ref()
            .is_some_and(|blend| blend.mask.is_some());
        if has_mask {
            ui.horizontal(|ui| {
                ui.weak("Using a mask from Segments");
                if ui.button("Clear mask").clicked() {
                    if let Some(blend) = &mut spec.local_blend {
                        blend.mask = None;
                    }
                    set_blend_words(spec, &[], false);
                }
            });
        }
        if let Some(blend) = &mut spec.local_blend {
            let mut threshold = blend.threshold;
            if ui
                .add(egui::Slider::new(&mut threshold, 0.05..=0.95).text("Blend threshold"))
                .changed()
            {
                blend.threshold = threshold;
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The canvas in edit mode
    // ---------------------------------------------------------------------------------------------

    /// Draws source and edited images compared (side by side or swipe) once an edited run exists;
    /// returns false (drawing nothing) otherwise, and the plain canvas is drawn.
    pub(super) fn edit_canvas_ui(&mut self, ui: &mut egui::Ui) -> bool {
        if !self.edit.settings.enabled || self.edit.run.is_none() || self.run.is_none() {
            return false;
        }
        match self.edit.settings.compare {
            CompareMode::SideBySide => self.side_by_side_ui(ui),
            CompareMode::Swipe => self.swipe_ui(ui),
        }
        true
    }

    /// The image of the run not on the main canvas, as a texture.
    fn other_image_texture(&mut self, ctx: &egui::Context) -> Option<egui::TextureId> {
        let viewing_edited = self.edit.settings.viewing == EditBranchView::Edited;
        let other = if viewing_edited {
            self.run.as_ref()?
        } else {
            self.edit.run.as_ref()?
        };
        let image = latest_image(other)?;
        let key = (other.run_id, other.steps.len(), other.final_image.is_some());
        let cache = &mut self.edit.other_image;
        if cache.key != Some(key) || cache.texture.is_none() {
            let colour = egui::ColorImage::from_rgb([image.width, image.height], &image.pixels);
            let options = if self.settings.view.smooth_image {
                egui::TextureOptions::LINEAR
            } else {
                egui::TextureOptions::NEAREST
            };
            match &mut cache.texture {
                Some(texture) => texture.set(colour, options),
                None => {
                    cache.texture = Some(ctx.load_texture("attend.edit.other", colour, options));
                }
            }
            cache.key = Some(key);
        }
        cache.texture.as_ref().map(egui::TextureHandle::id)
    }

    /// The blend mask as a translucent texture (orange where the edit may change the image).
    fn blend_mask_texture(&mut self, ctx: &egui::Context) -> Option<egui::TextureId> {
        if !self.edit.settings.show_blend_mask {
            return None;
        }
        let mask = self.edit.blend_mask.as_ref()?;
        if mask.h == 0 || mask.w == 0 || mask.data.len() != mask.h * mask.w {
            return None;
        }
        let key = (self.edit.mask_version, mask.data.len(), true);
        let cache = &mut self.edit.mask_texture;
        if cache.key != Some(key) || cache.texture.is_none() {
            let rgba: Vec<u8> = mask
                .data
                .iter()
                .flat_map(|&value| {
                    if value >= 0.5 {
                        [255, 150, 30, 45]
                    } else {
                        [0, 0, 0, 0]
                    }
                })
                .collect();
            let image = egui::ColorImage::from_rgba_unmultiplied([mask.w, mask.h], &rgba);
            match &mut cache.texture {
                Some(texture) => texture.set(image, egui::TextureOptions::NEAREST),
                None => {
                    cache.texture = Some(ctx.load_texture(
                        "attend.edit.blend_mask",
                        image,
                        egui::TextureOptions::NEAREST,
                    ));
                }
            }
            cache.key = Some(key);
        }
        cache.texture.as_ref().map(egui::TextureHandle::id)
    }

    /// Source | edited, each fitted into half the canvas; the run whose heat maps are shown is
    /// drawn by the normal canvas (zoom, pan, heat map), the other as a plain image.
    fn side_by_side_ui(&mut self, ui: &mut egui::Ui) {
        let rect = ui.available_rect_before_wrap();
        ui.allocate_rect(rect, Sense::hover());
        let gap = 6.0;
        let header = 20.0;
        let half = (rect.width() - gap) / 2.0;
        let left = Rect::from_min_size(
            rect.min + Vec2::new(0.0, header),
            Vec2::new(half, rect.height() - header),
        );
        let right = Rect::from_min_size(
            rect.min + Vec2::new(half + gap, header),
            Vec2::new(half, rect.height() - header),
        );
        let viewing_edited = self.edit.settings.viewing == EditBranchView::Edited;
        let (canvas_pane, plain_pane) = if viewing_edited {
            (right, left)
        } else {
            (left, right)
        };
        let mut child = ui.new_child(egui::UiBuilder::new().max_rect(canvas_pane));
        self.canvas_ui(&mut child);
        let canvas_image_rect = self.canvas.image_rect;

        let painter = ui.painter_at(rect);
        painter.rect_filled(plain_pane, 0.0, ui.visuals().extreme_bg_color);
        let texture = self.other_image_texture(ui.ctx());
        let plain_image_rect = match (texture, self.canvas.image()) {
            (Some(texture), Some(image)) => {
                let size = fit(
                    plain_pane.shrink(8.0).size(),
                    image.width as f32 / image.height as f32,
                );
                let image_rect = Rect::from_center_size(plain_pane.center(), size);
                painter.image(
                    texture,
                    image_rect,
                    Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                    Color32::WHITE,
                );
                Some(image_rect)
            }
            _ => None,
        };
        let edited_image_rect = if viewing_edited {
            canvas_image_rect
        } else {
            plain_image_rect
        };
        if let Some(image_rect) = edited_image_rect {
            self.paint_blend_mask(ui, image_rect, image_rect);
        }
        let text_colour = ui.visuals().strong_text_color();
        for (pane, title) in [
            (left, self.pane_title(false)),
            (right, self.pane_title(true)),
        ] {
            painter.text(
                egui::pos2(pane.center().x, rect.min.y + header / 2.0),
                egui::Align2::CENTER_CENTER,
                title,
                egui::FontId::proportional(14.0),
                text_colour,
            );
        }
    }

    /// "Source" / "Edited" with the run's state.
    fn pane_title(&self, edited: bool) -> String {
        let run = if edited {
            self.edit.run.as_ref()
        } else {
            self.run.as_ref()
        };
        let name = if edited { "Edited" } else { "Source" };
        let viewing_edited = self.edit.settings.viewing == EditBranchView::Edited;
        let heat = if edited == viewing_edited && self.settings.view.show_heatmap {
            " (heat maps)"
        } else {
            ""
        };
        match run.map(|run| &run.outcome) {
            Some(RunOutcome::Running) => {
                let done = run.map_or(0, |run| run.steps.len());
                let total = run.map_or(0, |run| run.step_count);
                format!("{name}: step {done}/{total}{heat}")
            }
            _ => format!("{name}{heat}"),
        }
    }

    /// The blend mask over the edited image (clipped to `clip`).
    /// A light tint inside the mask and an orange outline around it.
    fn paint_blend_mask(&mut self, ui: &egui::Ui, image_rect: Rect, clip: Rect) {
        let Some(texture) = self.blend_mask_texture(ui.ctx()) else {
            return;
        };
        let painter = ui.painter_at(clip.intersect(ui.clip_rect()));
        painter.image(
            texture,
            image_rect,
            Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
            Color32::WHITE,
        );
        let Some(mask) = &self.edit.blend_mask else {
            return;
        };
        let (h, w) = (mask.h, mask.w);
        let inside = |y: isize, x: isize| {
            y >= 0
                && x >= 0
                && (y as usize) < h
                && (x as usize) < w
                && mask.data[y as usize * w + x as usize] >= 0.5
        };
        let cell = Vec2::new(
            image_rect.width() / w as f32,
            image_rect.height() / h as f32,
        );
        let at =
            |y: usize, x: usize| image_rect.min + Vec2::new(x as f32 * cell.x, y as f32 * cell.y);
        let stroke = egui::Stroke::new(2.0, Color32::from_rgb(255, 150, 30));
        for y in 0..h {
            for x in 0..w {
                let (yi, xi) = (y as isize, x as isize);
                if !inside(yi, xi) {
                    continue;
                }
                if !inside(yi - 1, xi) {
                    painter.line_segment([at(y, x), at(y, x + 1)], stroke);
                }
                if !inside(yi + 1, xi) {
                    painter.line_segment([at(y + 1, x), at(y + 1, x + 1)], stroke);
                }
                if !inside(yi, xi - 1) {
                    painter.line_segment([at(y, x), at(y + 1, x)], stroke);
                }
                if !inside(yi, xi + 1) {
                    painter.line_segment([at(y, x + 1), at(y + 1, x + 1)], stroke);
                }
            }
        }
    }

    /// The shown run on the canvas with the other image over it on one side of a draggable
    /// vertical divider: source on the left, edited on the right.
    fn swipe_ui(&mut self, ui: &mut egui::Ui) {
        let rect = ui.available_rect_before_wrap();
        let mut child = ui.new_child(egui::UiBuilder::new().max_rect(rect));
        self.canvas_ui(&mut child);
        ui.allocate_rect(rect, Sense::hover());
        let Some(image_rect) = self.canvas.image_rect else {
            return;
        };
        let viewing_edited = self.edit.settings.viewing == EditBranchView::Edited;
        let divider_x = image_rect.min.x + self.edit.settings.swipe * image_rect.width();
        let left = Rect::from_min_max(image_rect.min, egui::pos2(divider_x, image_rect.max.y));
        let right = Rect::from_min_max(egui::pos2(divider_x, image_rect.min.y), image_rect.max);
        let (other_side, edited_side) = if viewing_edited {
            (left, right)
        } else {
            (right, left)
        };
        let clip = ui.clip_rect().intersect(rect);
        if let Some(texture) = self.other_image_texture(ui.ctx()) {
            ui.painter_at(other_side.intersect(clip)).image(
                texture,
                image_rect,
                Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
                Color32::WHITE,
            );
        }
        self.paint_blend_mask(ui, image_rect, edited_side.intersect(clip));

        // The divider: a line and a handle to drag.
        let handle_rect = Rect::from_center_size(
            egui::pos2(divider_x, image_rect.center().y),
            Vec2::new(16.0, image_rect.height()),
        )
        .intersect(clip);
        let id = egui::Id::unique("attend.edit.swipe");
        let response = ui.interact(handle_rect, id, Sense::drag());
        let position = self.edit.settings.swipe;
        response
            .widget_info(|| egui::WidgetInfo::slider(true, f64::from(position), "Swipe divider"));
        if response.dragged() {
            if let Some(pointer) = response.interact_pointer_pos() {
                self.edit.settings.swipe =
                    ((pointer.x - image_rect.min.x) / image_rect.width()).clamp(0.0, 1.0);
            }
        }
        if response.hovered() || response.dragged() {
            ui.ctx().set_cursor_icon(egui::CursorIcon::ResizeHorizontal);
        }
        let painter = ui.painter_at(clip);
        let line_top = egui::pos2(divider_x, image_rect.min.y.max(clip.min.y));
        let line_bottom = egui::pos2(divider_x, image_rect.max.y.min(clip.max.y));
        painter.line_segment(
            [line_top, line_bottom],
            egui::Stroke::new(3.0, Color32::BLACK),
        );
        painter.line_segment(
            [line_top, line_bottom],
            egui::Stroke::new(1.5, Color32::WHITE),
        );
        let knob = egui::pos2(
            divider_x,
            image_rect.center().y.clamp(clip.min.y, clip.max.y),
        );
        painter.circle_filled(knob, 9.0, Color32::WHITE);
        painter.circle_stroke(knob, 9.0, egui::Stroke::new(1.5, Color32::BLACK));
        for direction in [-1.0f32, 1.0] {
            let tip = knob + Vec2::new(direction * 6.0, 0.0);
            let base = knob + Vec2::new(direction * 2.0, 0.0);
            painter.add(egui::Shape::convex_polygon(
                vec![tip, base + Vec2::new(0.0, -4.0), base + Vec2::new(0.0, 4.0)],
                Color32::BLACK,
                egui::Stroke::NONE,
            ));
        }
        let label_font = egui::FontId::proportional(14.0);
        for (text, anchor, position) in [
            (
                "Source",
                egui::Align2::LEFT_TOP,
                image_rect.left_top() + Vec2::splat(6.0),
            ),
            (
                "Edited",
                egui::Align2::RIGHT_TOP,
                image_rect.right_top() + Vec2::new(-6.0, 6.0),
            ),
        ] {
            let galley_rect =
                painter.text(position, anchor, text, label_font.clone(), Color32::WHITE);
            painter.rect_filled(galley_rect.expand(3.0), 3.0, Color32::from_black_alpha(140));
            painter.text(position, anchor, text, label_font.clone(), Color32::WHITE);
        }
    }
}

/// The latest image of a run (final image when finished).
fn latest_image(run: &RunView) -> Option<&RgbImage> {
    let last = run.steps.len().checked_sub(1)?;
    run.image_at(last)
}

/// The largest size with `aspect` (width / height) inside `available`.
fn fit(available: Vec2, aspect: f32) -> Vec2 {
    let available = available.max(Vec2::splat(1.0));
    if available.x / available.y > aspect {
        Vec2::new(available.y * aspect, available.y)
    } else {
        Vec2::new(available.x, available.x / aspect)
    }
}

/// Two sliders for a step window, labelled "<name> start" and "<name> end".
fn window_sliders(ui: &mut egui::Ui, window: &mut StepWindow, name: &str) {
    let mut start = window.start;
    let mut end = window.end;
    let start_changed = ui
        .add(
            egui::Slider::new(&mut start, 0.0..=1.0)
                .fixed_decimals(2)
                .text(format!("{name} start")),
        )
        .changed();
    let end_changed = ui
        .add(
            egui::Slider::new(&mut end, 0.0..=1.0)
                .fixed_decimals(2)
                .text(format!("{name} end")),
        )
        .changed();
    if start_changed {
        window.start = start.min(end);
    }
    if end_changed {
        window.end = end.max(window.start);
    }
}

/// The side of the largest square grid with at most `max_queries` cells.
fn self_replace_side(max_queries: usize) -> usize {
    max_queries.isqrt()
}

/// One alignment entry: "circle -> square" (swapped), "+ big" (added), "- red" (removed), "a".
fn alignment_chip(ui: &mut egui::Ui, pair: &WordPair) {
    let visuals = ui.visuals();
    let (text, colour) = match pair.change {
        WordChange::Same => (pair.edit_text.clone(), visuals.weak_text_color()),
        WordChange::Swapped => (
            format!("{} -> {}", pair.source_text, pair.edit_text),
            visuals.strong_text_color(),
        ),
        WordChange::Added => (
            format!("+ {}", pair.edit_text),
            Color32::from_rgb(90, 200, 110),
        ),
        WordChange::Removed => (
            format!("- {}", pair.source_text),
            Color32::from_rgb(230, 100, 90),
        ),
    };
    let rich = egui::RichText::new(text);
    let rich = match pair.change {
        WordChange::Same => rich,
        WordChange::Removed => rich.color(colour).strikethrough(),
        _ => rich.color(colour).strong(),
    };
    ui.label(rich);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preview_alignment_marks_swaps_and_insertions() {
        let (kind, words) = preview_alignment("a red circle", "a red square", None).unwrap();
        assert_eq!(kind, EditKind::Replace);
        assert_eq!(words[2].change, WordChange::Swapped);
        assert_eq!(
            (words[2].source_text.as_str(), words[2].edit_text.as_str()),
            ("circle", "square")
        );
        let (kind, words) = preview_alignment("a circle", "a big circle", None).unwrap();
        assert_eq!(kind, EditKind::Refine);
        assert!(words
            .iter()
            .any(|pair| pair.change == WordChange::Added && pair.edit_text == "big"));
    }

    #[test]
    fn weights_and_blend_words_edit_the_spec() {
        let mut spec = EditSpec::new("a red square");
        set_word_weight(&mut spec, "red", 2.0);
        assert_eq!(word_weight(&spec, "red"), 2.0);
        set_word_weight(&mut spec, "red", 1.0);
        assert!(spec.reweights.is_empty(), "a weight of 1 is no reweight");
        set_blend_words(&mut spec, &["circle", "square"], true);
        assert!(is_blend_word(&spec, "square"));
        set_blend_words(&mut spec, &["circle", "square"], false);
        assert!(spec.local_blend.is_none());
        set_word_weight(&mut spec, "square", 0.5);
        spec.edit_prompt = "a red circle".to_owned();
        prune_spec(&mut spec, "a red circle");
        assert!(spec.reweights.is_empty(), "square left the edited prompt");
    }

    #[test]
    fn blend_checkboxes_name_repeated_words_by_position() {
        let source = "a red square and a blue square";
        let edit = "a red square and a blue circle";
        let (_, pairs) = preview_alignment(source, edit, None).unwrap();
        let (_, source_words) = whitespace_layout(source);
        let (_, edit_words) = whitespace_layout(edit);
        let selectors: Vec<Vec<String>> = pairs
            .iter()
            .map(|pair| pair_blend_selectors(pair, &source_words, &edit_words))
            .collect();
        assert_eq!(selectors[2], vec!["square#1"]);
        assert_eq!(selectors[6], vec!["square#2", "circle"]);
        assert_eq!(selectors[5], vec!["blue"]);
        // Only the blue square's tokens are selected in the source, and the blend survives pruning.
        assert_eq!(word_token_indices(&source_words, "square#2"), vec![7]);
        let mut spec = EditSpec::new(edit);
        let words: Vec<&str> = selectors[6].iter().map(String::as_str).collect();
        set_blend_words(&mut spec, &words, true);
        prune_spec(&mut spec, source);
        assert!(is_blend_word(&spec, "square#2") && is_blend_word(&spec, "circle"));
        assert!(!is_blend_word(&spec, "square#1"));

        // The other way round the source has no second square, so the plain selector is safe.
        let (source, edit) = (edit, source);
        let (_, pairs) = preview_alignment(source, edit, None).unwrap();
        let (_, source_words) = whitespace_layout(source);
        let (_, edit_words) = whitespace_layout(edit);
        let swapped = pair_blend_selectors(&pairs[6], &source_words, &edit_words);
        assert_eq!(swapped, vec!["circle", "square#2"]);
        // But when the swapped word comes first, the edited prompt's first square is the red one
        // and the source's first square the blue one: the selector is kept to the edited prompt.
        let (_, pairs) = preview_alignment(
            "a red circle and a blue square",
            "a red square and a blue square",
            None,
        )
        .unwrap();
        let (_, source_words) = whitespace_layout("a red circle and a blue square");
        let (_, edit_words) = whitespace_layout("a red square and a blue square");
        let swapped = pair_blend_selectors(&pairs[2], &source_words, &edit_words);
        assert_eq!(swapped, vec!["circle", "edit:square#1"]);
        let mut spec = EditSpec::new("a red square and a blue square");
        let words: Vec<&str> = swapped.iter().map(String::as_str).collect();
        set_blend_words(&mut spec, &words, true);
        prune_spec(&mut spec, "a red circle and a blue square");
        assert!(is_blend_word(&spec, "edit:square#1") && is_blend_word(&spec, "circle"));
    }
}
