//! What views ask of the editor. A view never changes shared state itself: it pushes a
//! [`UiCommand`] into the frame's [`UiCommands`], and [`crate::ui::EditorApp`] applies them all in
//! one place after the views have drawn.

use crate::analysis::heatmap::SelfAttentionSpan;
use crate::analysis::segment::Mask;
use crate::ui::dialogs::DialogPurpose;
use crate::ui::session::EditSession;
use crate::ui::settings::{AggregationChoice, ViewSettings};
use crate::ui::state::{CanvasView, TimelineState};
use crate::worker::{GenerateParams, ModelSource, Products, SegmentRequest};

/// A change a view asks for.
#[derive(Clone, Debug)]
pub(crate) enum UiCommand {
    /// A style set mode request (settings, selection, export).
    StyleSet(crate::ui::style_set::StyleSetCommand),
    /// Start a generation with the panel's parameters (an edit of them in edit mode),
    /// superseding a running one.
    Generate,
    /// Cancel the running generation.
    Cancel,
    /// Load a model; the current one stays until the new one is ready.
    LoadModel(ModelSource),
    /// Multiply as `Products` says from now on: the loaded model is loaded again with it.
    SetProducts(Products),
    /// Stop the model load in progress (the current model stays).
    CancelModelLoad,
    /// Open a file dialog; its answer is handled on a later frame.
    OpenDialog(DialogPurpose),
    /// The path typed in the path field (shown instead of a file dialog when none can open).
    PathChosen {
        /// What the path is for.
        purpose: DialogPurpose,
        /// The path as typed.
        path: std::path::PathBuf,
    },
    /// Close the path field without a path.
    ClosePathField,
    /// Take the standing error off the status line (it stays in the history).
    DismissError,
    /// Replace the generation parameters (the controls panel's prompt, seed, steps, ...).
    SetParams(GenerateParams),
    /// Replace how heat maps are drawn (colormap, opacity, ...).
    SetView(ViewSettings),
    /// Replace what the heat maps combine (resolutions, places, step window).
    SetAggregation(AggregationChoice),
    /// Switch what the canvas shows over the image.
    SetCanvasView(CanvasView),
    /// Select a word's heat map (leaving the probe for the word heat map).
    SelectWord(usize),
    /// Move the timeline (or follow the latest step again).
    SetTimeline(TimelineState),
    /// Put the canvas back to zoom 1, centred.
    ResetZoom,
    /// Probe self-attention at this grid `(h, w)`.
    SetProbeGrid((usize, usize)),
    /// Probe self-attention over the latest step or the mean over steps.
    SetProbeSpan(SelfAttentionSpan),
    /// Probe self-attention at this point `(y, x)`, in 0..1 image coordinates.
    SetProbePoint((f32, f32)),
    /// Turn edit mode on or off (on: the edited prompt starts as the source prompt).
    SetEditMode(bool),
    /// Replace the edit's settings (edited prompt, windows, blend, comparison) with the panel's.
    SetEditSession(Box<EditSession>),
    /// Move the swipe divider, 0..1 of the image width.
    SetSwipe(f32),
    /// Set a word's weight in the edited prompt (1: no reweight).
    SetWordWeight {
        /// The word.
        word: String,
        /// Its weight, in [`crate::ui::edit::spec::WEIGHT_RANGE`].
        weight: f32,
    },
    /// Run the edited branch now (the source is reused when it is recorded).
    RunEdit,
    /// Back to the default attention windows and the model's recommended self layers.
    ResetEdit,
    /// Use this mask (image resolution) as the edit's local-blend region (turns edit mode on).
    UseMaskAsLocalBlend(Box<Mask>),
    /// Segment run `run_id` on the worker (the Segments view waits for one answer at a time).
    Segment {
        /// The finished run on screen.
        run_id: u64,
        /// Method, settings, resolution and step span.
        request: SegmentRequest,
    },
    /// A real image's fit, inversion or closing.
    Image(crate::ui::image_input::ImageCommand),
    /// A change of the appearance transfer mode (slots, settings, run, probe).
    Appearance(crate::ui::appearance::AppearanceCommand),
    /// Pick the segment at `point` (`(y, x)` in 0..1 image coordinates) as a canvas click does.
    ClickSegment {
        /// Where.
        point: (f32, f32),
        /// Add it to the selection (Shift).
        add: bool,
    },
}

impl UiCommand {
    /// True for the commands by which the user starts or stops something (generate, edit, load,
    /// open, export, cancel, dismiss): after one, the standing error on the status line has been
    /// seen. Changes of settings and the views' own requests are not.
    pub(crate) fn is_user_action(&self) -> bool {
        matches!(
            self,
            Self::Generate
                | Self::Cancel
                | Self::LoadModel(_)
                | Self::OpenDialog(_)
                | Self::PathChosen { .. }
                | Self::DismissError
                | Self::SetEditMode(_)
                | Self::RunEdit
                | Self::ResetEdit
                | Self::UseMaskAsLocalBlend(_)
                | Self::Image(_)
        ) || matches!(self, Self::Appearance(command) if command.is_user_action())
    }
}

/// The commands of one frame, in the order the views pushed them.
#[derive(Debug, Default)]
pub(crate) struct UiCommands {
    commands: Vec<UiCommand>,
}

impl UiCommands {
    /// Asks for `command`.
    pub(crate) fn push(&mut self, command: UiCommand) {
        self.commands.push(command);
    }

    /// Asks for `command` before every command asked for so far this frame.
    pub(crate) fn push_first(&mut self, command: UiCommand) {
        self.commands.insert(0, command);
    }

    /// Takes the commands asked for so far, oldest first.
    pub(crate) fn take(&mut self) -> Vec<UiCommand> {
        std::mem::take(&mut self.commands)
    }
}
