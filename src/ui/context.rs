//! What every view reads while it draws: the shared state, read-only, and a few facts of this frame.
//! A view draws with `fn ..._ui(ctx: &ViewContext, ui, state: &mut ItsOwnState, commands)`.

use crate::ui::state::AppState;

/// The read-only context of one frame's views.
pub(crate) struct ViewContext<'a> {
    /// Everything the views share (settings, model, runs, modes, selection, heat maps).
    pub(crate) state: &'a AppState,
    /// A file dialog is open (export buttons wait for it).
    pub(crate) dialog_open: bool,
    /// An `ATTEND_SCREENSHOT` plan is active (hover tooltips are left out of the picture).
    pub(crate) taking_screenshot: bool,
    /// The canvas shows a heat grid (the heat map exports have something to write).
    pub(crate) heat_shown: bool,
}
