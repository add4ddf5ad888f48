//! The editor's modes: what a generation makes and how the canvas shows it. Plain generation has no
//! state of its own; every other mode owns its state in one field of [`Modes`] and its module
//! (state and events, panel, canvas comparison). A new mode (Style Aligned, appearance transfer)
//! adds a [`ModeKind`] variant, a field here and its module; [`crate::ui::EditorApp`]'s fields stay
//! as they are (its layout draws the mode's views, and the event routing hands it its branch).
//!
//! A mode's state stays while another mode is on, so switching back finds it as it was (and a
//! session saves an edit prompt even with edit mode off).

use crate::ui::appearance::AppearanceTransfer;
use crate::ui::edit::EditMode;
use crate::ui::style_set::StyleSetMode;

/// Which mode the editor is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModeKind {
    /// Plain generation: one run and its attention.
    #[default]
    Plain,
    /// Prompt-to-Prompt: the source run and an edited prompt's run compared.
    Edit,
    /// Style Aligned: a reference and target prompts generated as one set sharing its style.
    StyleSet,
    /// Appearance transfer: one image's look on another image's shapes (cross-image attention).
    AppearanceTransfer,
}

/// Every mode's state.
#[derive(Default)]
pub(crate) struct Modes {
    /// Prompt-to-Prompt edit mode.
    pub(crate) edit: EditMode,
    /// Style set mode.
    pub(crate) style_set: StyleSetMode,
    /// Appearance transfer mode.
    pub(crate) appearance: AppearanceTransfer,
}

impl Modes {
    /// The mode that is on.
    pub(crate) fn active(&self) -> ModeKind {
        if self.appearance.enabled() {
            ModeKind::AppearanceTransfer
        } else if self.edit.enabled() {
            ModeKind::Edit
        } else if self.style_set.enabled() {
            ModeKind::StyleSet
        } else {
            ModeKind::Plain
        }
    }

    /// Turns `kind` on (and every other mode off).
    pub(crate) fn set_active(&mut self, kind: ModeKind) {
        self.edit.set_enabled(kind == ModeKind::Edit);
        self.style_set.set_enabled(kind == ModeKind::StyleSet);
        self.appearance
            .set_enabled(kind == ModeKind::AppearanceTransfer);
    }
}
