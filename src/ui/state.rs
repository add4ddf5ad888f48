//! The editor's shared state: what every view reads (through [`crate::ui::context::ViewContext`])
//! and only [`crate::ui::EditorApp`] changes, by applying [`crate::ui::command::UiCommand`]s and
//! the worker's events. Plain data and the rules that keep it consistent; no drawing.

use crate::analysis::heatmap::{
    word_heatmaps, AggregationSettings, Heatmap, SelfAttentionMap, SelfAttentionSpan,
};
use crate::ui::mode::Modes;
use crate::ui::run_view::{RunKey, RunOutcome, RunView};
use crate::ui::settings::{AggregationChoice, EditorSettings};
use crate::worker::{
    Branch, Command, EditInfo, GenerateParams, ModelInfo, ModelSource, PromptInfo, SelfReplace,
    StepFrame, INVERTED_IMAGE_SWAP,
};

/// How serious a status message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusLevel {
    /// Progress and results.
    Info,
    /// Something the user should know (prompt truncated, scheduler substituted).
    Warning,
    /// Something failed.
    Error,
}

/// One line of the status bar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMessage {
    /// How serious.
    pub level: StatusLevel,
    /// The text.
    pub text: String,
}

/// Status messages kept for the status bar's history.
const STATUS_HISTORY: usize = 50;

/// The status bar's messages, oldest first (the last [`STATUS_HISTORY`]), and the latest error,
/// which stays on the status line until the user's next action (later progress messages such as
/// "Model loaded" do not hide it).
#[derive(Clone, Debug, Default)]
pub(crate) struct StatusLog {
    messages: Vec<StatusMessage>,
    standing_error: Option<StatusMessage>,
}

impl StatusLog {
    /// Adds a message (dropping the oldest beyond the history); an error stands until
    /// [`Self::acknowledge`].
    pub(crate) fn push(&mut self, level: StatusLevel, text: impl Into<String>) {
        let message = StatusMessage {
            level,
            text: text.into(),
        };
        if level == StatusLevel::Error {
            self.standing_error = Some(message.clone());
        }
        self.messages.push(message);
        if self.messages.len() > STATUS_HISTORY {
            self.messages.remove(0);
        }
    }

    /// The latest error, until the user acts again.
    pub(crate) fn standing_error(&self) -> Option<&StatusMessage> {
        self.standing_error.as_ref()
    }

    /// The user acted (generate, load, open, export, cancel, dismiss): the standing error has been
    /// seen and leaves the status line (it stays in the history).
    pub(crate) fn acknowledge(&mut self) {
        self.standing_error = None;
    }

    /// The messages, oldest first.
    pub(crate) fn messages(&self) -> &[StatusMessage] {
        &self.messages
    }
}

/// What the canvas shows over the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CanvasView {
    /// The selected word's heat map.
    #[default]
    WordHeatmap,
    /// The self-attention probe.
    Probe,
    /// The segments of the finished run.
    Segments,
}

/// The model as the UI knows it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ModelState {
    /// The loaded model.
    pub(crate) loaded: Option<ModelInfo>,
    /// A model being loaded.
    pub(crate) loading: Option<ModelSource>,
    /// The model being loaded is the one remembered from the last launch: if it fails and no
    /// model is loaded, the bundled model is loaded instead.
    pub(crate) bundled_if_remembered_fails: bool,
}

/// The timeline: which step the canvas and heat maps show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TimelineState {
    /// The step shown; `None` follows the latest step.
    pub(crate) cursor: Option<usize>,
    /// Show that step's maps alone instead of everything up to it.
    pub(crate) only_this_step: bool,
}

/// What the word heat maps were computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DerivedKey {
    run: RunKey,
    steps_received: usize,
    aggregation: AggregationChoice,
    visible_first: usize,
    visible_last: usize,
}

/// The word heat maps of the run on screen, recomputed only when their inputs change.
#[derive(Debug, Default)]
pub(crate) struct DerivedMaps {
    key: Option<DerivedKey>,
    /// One per prompt word, at the attention grid size, min-max normalised.
    pub(crate) heatmaps: Vec<Heatmap>,
    /// Grid `(h, w)` of the heat maps.
    pub(crate) grid: (usize, usize),
    /// Increases on every recompute.
    pub(crate) version: u64,
}

/// A self-attention request: the run, query grid, span and the steps received when it was sent.
pub(crate) type ProbeRequest = (u64, (usize, usize), SelfAttentionSpan, usize);

/// The self-attention probe (shown when [`AppState::canvas_view`] is [`CanvasView::Probe`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct ProbeState {
    /// Query grid `(h, w)` to probe at.
    pub(crate) grid: Option<(usize, usize)>,
    /// The probed point, in 0..1 image coordinates `(y, x)`.
    pub(crate) point: Option<(f32, f32)>,
    /// The map received from the worker, with the run and span it belongs to.
    pub(crate) map: Option<(u64, SelfAttentionSpan, SelfAttentionMap)>,
    /// The last request sent: sent once per finished run, and again after each new step while the
    /// run goes on.
    pub(crate) requested: Option<ProbeRequest>,
    /// A request is on its way to the worker (during a run, the next waits for its answer).
    pub(crate) awaiting: bool,
}

/// Everything the views share.
#[derive(Default)]
pub(crate) struct AppState {
    /// What the user chose (persisted).
    pub(crate) settings: EditorSettings,
    /// The loaded model.
    pub(crate) model: ModelState,
    /// The run on screen (a plain run, or an edit's source).
    pub(crate) run: Option<RunView>,
    /// A run asked for whose `Started` has not arrived yet.
    pub(crate) pending_run: Option<u64>,
    /// Generate once the model being loaded is ready.
    pub(crate) generate_after_load: bool,
    /// Cancel was asked for the running generation (the progress bar says "cancelling..." until
    /// the run ends).
    pub(crate) cancel_requested: bool,
    /// The selected word (index into the shown run's words).
    pub(crate) selected_word: Option<usize>,
    /// The timeline.
    pub(crate) timeline: TimelineState,
    /// What the canvas shows over the image.
    pub(crate) canvas_view: CanvasView,
    /// The self-attention probe.
    pub(crate) probe: ProbeState,
    /// The word heat maps of the shown run.
    pub(crate) derived: DerivedMaps,
    /// The status bar.
    pub(crate) status: StatusLog,
    /// The editor modes and their state.
    pub(crate) modes: Modes,
    /// The real image runs replay, if one is open.
    pub(crate) image: crate::ui::image_input::ImageInput,
}

impl AppState {
    /// Fresh state with `settings`.
    pub(crate) fn new(settings: EditorSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// The run whose heat maps, token strip and timeline are shown: the edited run when edit mode
    /// shows it, else the run on screen.
    pub(crate) fn shown_run(&self) -> Option<&RunView> {
        self.modes.edit.shown_run().or(self.run.as_ref())
    }

    /// True when the heat maps, token strip (with weight sliders) and timeline show the edited run.
    pub(crate) fn shows_edited_run(&self) -> bool {
        self.modes.edit.shown_run().is_some()
    }

    /// True while a generation is asked for or running.
    pub(crate) fn is_generating(&self) -> bool {
        self.pending_run.is_some()
            || self.run.as_ref().is_some_and(RunView::is_running)
            || self.modes.edit.is_running()
    }

    /// True when the run on screen finished.
    pub(crate) fn run_finished(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|run| matches!(run.outcome, RunOutcome::Finished { .. }))
    }

    /// The parameters of the run on screen, or the panel's before any run.
    pub(crate) fn source_params(&self) -> &GenerateParams {
        self.run
            .as_ref()
            .map_or(&self.settings.params, |run| &run.params)
    }

    /// The step range the heat maps cover: everything up to the timeline's step, or that step alone.
    pub(crate) fn visible_steps(&self) -> Option<(usize, usize)> {
        let run = self.shown_run()?;
        let last = run.cross.len().checked_sub(1)?;
        let cursor = self.timeline.cursor.unwrap_or(last).min(last);
        Some(if self.timeline.only_this_step {
            (cursor, cursor)
        } else {
            (0, cursor)
        })
    }

    /// The step the canvas shows: the shown run's key, the step, and whether it is the final image.
    pub(crate) fn shown_step(&self) -> Option<(RunKey, usize, bool)> {
        let run = self.shown_run()?;
        let last = run.steps.len().checked_sub(1)?;
        let step = self.timeline.cursor.unwrap_or(last).min(last);
        Some((run.key(), step, step == last && run.final_image.is_some()))
    }

    /// Recomputes the word heat maps if the run, the timeline or the aggregation changed.
    pub(crate) fn update_derived_maps(&mut self) {
        let Some(run) = self.shown_run() else {
            if self.derived.key.is_some() {
                self.derived = DerivedMaps::default();
            }
            return;
        };
        let Some((visible_first, visible_last)) = self.visible_steps() else {
            return;
        };
        let key = DerivedKey {
            run: run.key(),
            steps_received: run.cross.len(),
            aggregation: self.settings.aggregation.clone(),
            visible_first,
            visible_last,
        };
        if self.derived.key.as_ref() == Some(&key) {
            return;
        }
        let grid = run.cross_grids().first().copied().unwrap_or((1, 1));
        let settings = self
            .settings
            .aggregation
            .to_settings(visible_first..=visible_last);
        let (first, last) = (*settings.steps.start(), *settings.steps.end());
        // One summed step instead of the whole window keeps the cost per frame independent of the
        // number of steps.
        let heatmaps = match run.summed_cross(first, last) {
            Some(summed) => {
                let all_steps = AggregationSettings {
                    steps: 0..=usize::MAX,
                    ..settings
                };
                word_heatmaps(
                    std::slice::from_ref(summed.as_ref()),
                    &run.prompt.words,
                    &all_steps,
                    grid.0,
                    grid.1,
                )
            }
            None => word_heatmaps(
                &run.cross_copies(),
                &run.prompt.words,
                &settings,
                grid.0,
                grid.1,
            ),
        };
        self.derived.heatmaps = heatmaps;
        self.derived.grid = grid;
        self.derived.version += 1;
        self.derived.key = Some(key);
        if self.selected_word.is_none() {
            self.selected_word = self
                .derived
                .heatmaps
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.peak.total_cmp(&b.1.peak))
                .map(|(index, _)| index);
        }
    }

    /// The self-attention request the probe needs now, if it lacks a map (with what to remember
    /// once it is sent).
    pub(crate) fn probe_request(&mut self) -> Option<(Command, ProbeRequest)> {
        if self.canvas_view != CanvasView::Probe {
            return None;
        }
        let run = self.run.as_ref()?;
        if run.cross.is_empty() {
            return None;
        }
        let grids = run.probe_grids();
        let grid = self
            .probe
            .grid
            .filter(|grid| grids.contains(grid))
            .or_else(|| grids.first().copied())?;
        self.probe.grid = Some(grid);
        let wanted = (run.run_id, grid, self.settings.probe_span, run.steps.len());
        if self.probe.requested == Some(wanted) {
            return None;
        }
        // While the run goes on, ask again after each step, but only once the last answer is in.
        let same_query = self
            .probe
            .requested
            .is_some_and(|(run_id, old_grid, span, _)| {
                (run_id, old_grid, span) == (wanted.0, wanted.1, wanted.2)
            });
        if same_query && self.probe.awaiting && run.is_running() {
            return None;
        }
        let command = Command::RequestSelfAttention {
            run_id: run.run_id,
            grid_h: grid.0,
            grid_w: grid.1,
            span: self.settings.probe_span,
        };
        Some((command, wanted))
    }

    /// True when an event of run `run_id` belongs to what is on screen: the run asked for last, or
    /// the run on screen finishing after a newer request went out (an edit that superseded it
    /// mid-way reuses its finished source, so its image is kept). Other runs are superseded.
    pub(crate) fn is_current_run(&self, run_id: u64, finishes: bool) -> bool {
        let current_run = self.pending_run.or(self.run.as_ref().map(|run| run.run_id));
        let finishes_run_on_screen =
            finishes && self.run.as_ref().is_some_and(|run| run.run_id == run_id);
        Some(run_id) == current_run || finishes_run_on_screen
    }

    // ---------------------------------------------------------------------------------------------
    // The run on screen's events
    // ---------------------------------------------------------------------------------------------

    /// A model finished loading.
    pub(crate) fn model_loaded(&mut self, info: ModelInfo) {
        self.status
            .push(StatusLevel::Info, format!("Model loaded: {}", info.name));
        for warning in &info.warnings {
            self.status.push(StatusLevel::Warning, warning.clone());
        }
        if self.model.loaded.as_ref().map(|loaded| &loaded.source) != Some(&info.source) {
            self.settings.params.width_px = None;
            self.settings.params.height_px = None;
        }
        // Only a model that loaded is remembered for the next launch.
        self.settings.model = info.source.clone();
        self.model.loaded = Some(info);
        self.model.loading = None;
        self.model.bundled_if_remembered_fails = false;
    }

    /// Loading a model failed; the previous one stays. Returns true when the bundled model is to
    /// be loaded instead (the model remembered from the last launch failed and none is loaded).
    pub(crate) fn model_load_failed(&mut self, source: &ModelSource, message: &str) -> bool {
        self.model.loading = None;
        let fall_back = std::mem::take(&mut self.model.bundled_if_remembered_fails)
            && self.model.loaded.is_none()
            && *source != ModelSource::Bundled;
        if !fall_back {
            self.generate_after_load = false;
        }
        let keeping = match &self.model.loaded {
            Some(info) => format!("keeping {}", info.name),
            None if fall_back => "loading the bundled model instead".to_owned(),
            None => "no model is loaded".to_owned(),
        };
        self.status.push(
            StatusLevel::Error,
            format!("Could not load {source}: {message} ({keeping})"),
        );
        fall_back
    }

    /// A run started: it becomes the run on screen.
    pub(crate) fn run_started(&mut self, run_id: u64, params: GenerateParams, prompt: PromptInfo) {
        for warning in &prompt.warnings {
            self.status.push(StatusLevel::Warning, warning.clone());
        }
        let word_count = prompt.words.len();
        self.pending_run = None;
        self.run = Some(RunView::new(run_id, Branch::Source, params, prompt));
        self.timeline.cursor = None;
        if self.selected_word.is_some_and(|index| index >= word_count) {
            self.selected_word = None;
        }
        self.probe.map = None;
        self.probe.requested = None;
        self.probe.awaiting = false;
    }

    /// A step of the run on screen.
    pub(crate) fn run_step(&mut self, frame: StepFrame) {
        if let Some(run) = &mut self.run {
            run.push_step(frame);
        }
    }

    /// The run on screen finished.
    pub(crate) fn finish_run(
        &mut self,
        image: crate::worker::RgbImage,
        elapsed_secs: f64,
        self_attention_grids: Vec<(usize, usize)>,
    ) {
        if let Some(run) = &mut self.run {
            run.final_image = Some(image);
            run.outcome = RunOutcome::Finished { elapsed_secs };
            run.self_attention_grids = self_attention_grids;
        }
        self.status
            .push(StatusLevel::Info, format!("Done in {elapsed_secs:.1} s"));
    }

    /// A run was cancelled.
    pub(crate) fn run_cancelled(&mut self, run_id: u64, steps_done: usize) {
        if self.pending_run == Some(run_id) {
            self.pending_run = None;
        }
        // A superseded edit run may be cancelled after its source part finished: the finished
        // source stays finished (a later edit reuses it).
        if let Some(run) = self
            .run
            .as_mut()
            .filter(|run| run.run_id == run_id && run.is_running())
        {
            run.outcome = RunOutcome::Cancelled { steps_done };
        }
        self.status.push(
            StatusLevel::Info,
            format!("Cancelled after {steps_done} step(s)"),
        );
    }

    /// A run (or a command without a run) failed.
    pub(crate) fn run_failed(&mut self, run_id: Option<u64>, message: String) {
        if let Some(run_id) = run_id {
            if self.pending_run == Some(run_id) {
                self.pending_run = None;
            }
            if let Some(run) = self
                .run
                .as_mut()
                .filter(|run| run.run_id == run_id && run.is_running())
            {
                run.outcome = RunOutcome::Failed(message.clone());
            }
        }
        self.status.push(StatusLevel::Error, message);
    }

    /// The worker's answer to a self-attention request.
    pub(crate) fn self_attention_arrived(&mut self, run_id: u64, map: Option<SelfAttentionMap>) {
        self.probe.awaiting = false;
        match map {
            Some(map) => {
                let span = self
                    .probe
                    .requested
                    .map_or(self.settings.probe_span, |(_, _, span, _)| span);
                self.probe.map = Some((run_id, span, map));
            }
            None => self.status.push(
                StatusLevel::Warning,
                "No self-attention was kept at that resolution for this run",
            ),
        }
    }

    /// The worker restarted with a fresh engine (which reloads the last model).
    pub(crate) fn worker_restarted(&mut self, message: &str) {
        self.pending_run = None;
        self.modes.edit.worker_restarted();
        if self.model.loaded.take().is_some() {
            self.model.loading = Some(self.settings.model.clone());
        }
        self.status.push(
            StatusLevel::Error,
            format!("The engine crashed ({message}); it was restarted"),
        );
    }

    /// The edited branch of the active edit run `run_id` started.
    pub(crate) fn edit_branch_started(
        &mut self,
        run_id: u64,
        params: GenerateParams,
        prompt: PromptInfo,
        info: EditInfo,
    ) {
        if self.pending_run == Some(run_id) {
            self.pending_run = None;
        }
        let word_count = prompt.words.len();
        let source_prompt = self.source_params().prompt.clone();
        self.modes.edit.branch_started_with(
            run_id,
            params,
            prompt,
            info,
            &source_prompt,
            &mut self.status,
        );
        if self.shows_edited_run() {
            self.timeline.cursor = None;
            if self.selected_word.is_some_and(|index| index >= word_count) {
                self.selected_word = None;
            }
        }
    }

    /// The edited branch of run `run_id` ended (cancelled or failed): nothing is pending any more.
    pub(crate) fn edit_branch_ended(&mut self, run_id: u64) {
        if self.pending_run == Some(run_id) {
            self.pending_run = None;
        }
    }

    /// An edit whose self-attention replacement nobody chose takes the recommendation: the loaded
    /// model's when the edited prompt changes words, the reference's when it only reweights the
    /// source (and before a model has loaded).
    ///
    /// An edit of an inverted image starts from [`INVERTED_IMAGE_SWAP`]: its own self-attention
    /// window for word changes, local blend on the swapped words and their weight.
    pub(crate) fn follow_edit_recommendation(&mut self) {
        let word_edit = self.recommended_word_edit();
        let source_prompt = self.source_params().prompt.clone();
        self.modes.edit.follow_recommendation(|spec| {
            SelfReplace::for_edit(word_edit, &source_prompt, &spec.edit_prompt)
        });
        if self.edits_an_inverted_image() {
            self.modes
                .edit
                .follow_inverted_image_swap(&source_prompt, INVERTED_IMAGE_SWAP);
        }
    }

    /// True when the source of the edits replays an inverted image.
    fn edits_an_inverted_image(&self) -> bool {
        self.source_params().source_image.is_some()
    }

    /// Back to the default windows and the recommended self-attention replacement.
    pub(crate) fn reset_edit(&mut self) {
        let word_edit = self.recommended_word_edit();
        let source_prompt = self.source_params().prompt.clone();
        self.modes
            .edit
            .reset(|spec| SelfReplace::for_edit(word_edit, &source_prompt, &spec.edit_prompt));
    }

    /// The loaded model's self-attention replacement for edits that change words (on an inverted
    /// image, with [`INVERTED_IMAGE_SWAP`]'s window).
    fn recommended_word_edit(&self) -> SelfReplace {
        let recommended = self
            .model
            .loaded
            .as_ref()
            .map_or_else(SelfReplace::default, |info| info.edit_self_replace);
        if self.edits_an_inverted_image() {
            INVERTED_IMAGE_SWAP.self_replace(recommended)
        } else {
            recommended
        }
    }

    /// Marks the running runs superseded by a newer request `run_id` (their late events are
    /// dropped).
    pub(crate) fn supersede_runs(&mut self, run_id: u64) {
        if let Some(run) = self.run.as_mut().filter(|run| run.is_running()) {
            run.outcome = RunOutcome::Cancelled {
                steps_done: run.steps.len(),
            };
        }
        self.modes.edit.run_ended_by(run_id);
        self.pending_run = Some(run_id);
        self.cancel_requested = false;
    }
}
