//! File dialogs (rfd) on a helper thread, so the window keeps painting while one is open.
//! Tests replace the dialogs with a closure that answers at once.
//!
//! On Linux a dialog needs the xdg-desktop-portal file chooser or zenity; without either, rfd
//! answers "nothing chosen" at once. An answer without a path that comes back sooner than anyone
//! could cancel a dialog counts as "no dialog could open", and the editor offers the path field
//! ([`PathField`]) instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::ui::command::{UiCommand, UiCommands};

/// What a dialog is for; decides its kind (open/save/folder), filters and what happens next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialogPurpose {
    /// Pick a diffusers model folder to load.
    OpenModelFolder,
    /// Pick a single-file checkpoint (`.safetensors`) to load.
    OpenModelFile,
    /// Pick a folder to search for models from now on.
    AddModelFolder,
    /// Pick a session file to open.
    OpenSession,
    /// Pick an image (PNG, JPEG, WebP) to open.
    OpenImage,
    /// Choose where to save the session.
    SaveSession,
    /// Choose where to save the image PNG.
    ExportImage,
    /// Choose where to save the current heat map blended over the image.
    ExportHeatmapOverImage,
    /// Choose where to save the current heat map alone.
    ExportHeatmapAlone,
    /// Pick a folder for one PNG per word.
    ExportAllHeatmaps,
    /// Choose where to save the raw attention maps (safetensors).
    ExportAttention,
    // Segments view.
    /// Choose where to save the selected segments' mask (PNG).
    ExportSegmentMask,
    /// Choose where to save the label map of segment ids (PNG).
    ExportSegmentLabels,
    /// Choose where to save the segments (JSON).
    ExportSegmentsJson,
    // Appearance transfer.
    /// Pick an image (PNG, JPEG, WebP) for a slot of the appearance transfer.
    OpenAppearanceImage(crate::worker::AppearanceSlot),
    /// Choose where to save the appearance transfer's output (PNG).
    ExportAppearanceOutput,
    /// Pick a folder for the appearance transfer's output, reconstructions and masks.
    ExportAppearanceAll,
}

impl DialogPurpose {
    /// What the path is, in words ("the model folder to open").
    pub fn describe(&self) -> &'static str {
        match self {
            Self::OpenModelFolder => "the diffusers model folder to open",
            Self::OpenModelFile => "the checkpoint file (.safetensors) to open",
            Self::AddModelFolder => "the folder to search for models",
            Self::OpenSession => "the session file to open",
            Self::OpenImage => "the image file to open",
            Self::SaveSession => "the session file to write",
            Self::ExportImage => "the PNG to write the image to",
            Self::ExportHeatmapOverImage => "the PNG to write the heat map over the image to",
            Self::ExportHeatmapAlone => "the PNG to write the heat map to",
            Self::ExportAllHeatmaps => "the folder to write one PNG per word to",
            Self::ExportAttention => "the safetensors file to write the attention maps to",
            Self::ExportSegmentMask => "the PNG to write the segments' mask to",
            Self::ExportSegmentLabels => "the PNG to write the segment labels to",
            Self::ExportSegmentsJson => "the JSON file to write the segments to",
            Self::OpenAppearanceImage(crate::worker::AppearanceSlot::Structure) => {
                "the structure image to open"
            }
            Self::OpenAppearanceImage(crate::worker::AppearanceSlot::Appearance) => {
                "the appearance image to open"
            }
            Self::ExportAppearanceOutput => "the PNG to write the transfer's output to",
            Self::ExportAppearanceAll => "the folder to write the transfer's images and masks to",
        }
    }
}

/// Answers dialogs synchronously instead of showing them (tests).
pub type DialogOverride = Box<dyn FnMut(&DialogPurpose) -> Option<PathBuf>>;

/// How a dialog ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DialogAnswer {
    /// The user chose this path.
    Chosen(PathBuf),
    /// The user cancelled.
    Cancelled,
    /// No dialog could open (no portal, no zenity): the path field is offered instead.
    Unavailable,
}

/// An answer without a path sooner than this after the dialog was asked for means that no
/// dialog opened (nobody cancels a dialog that fast).
const NO_DIALOG_WITHIN: Duration = Duration::from_millis(700);

impl DialogAnswer {
    /// The answer of a dialog that returned `path` after `elapsed`.
    pub(crate) fn of(path: Option<PathBuf>, elapsed: Duration) -> Self {
        match path {
            Some(path) => Self::Chosen(path),
            None if elapsed < NO_DIALOG_WITHIN => Self::Unavailable,
            None => Self::Cancelled,
        }
    }
}

/// Runs one dialog at a time and hands back its answer on a later frame.
pub struct Dialogs {
    answers_tx: Sender<(DialogPurpose, DialogAnswer)>,
    answers_rx: Receiver<(DialogPurpose, DialogAnswer)>,
    open: bool,
    override_answer: Option<DialogOverride>,
    /// Answer every dialog with [`DialogAnswer::Unavailable`] (a machine without a dialog backend).
    unavailable: bool,
}

impl Default for Dialogs {
    fn default() -> Self {
        let (answers_tx, answers_rx) = crossbeam_channel::bounded(4);
        Self {
            answers_tx,
            answers_rx,
            open: false,
            override_answer: None,
            unavailable: false,
        }
    }
}

impl Dialogs {
    /// Answer dialogs with `answer` instead of showing them.
    pub fn set_override(&mut self, answer: DialogOverride) {
        self.override_answer = Some(answer);
    }

    /// Answer every dialog as a machine without a dialog backend does (tests, scripted use).
    pub fn set_unavailable(&mut self) {
        self.unavailable = true;
    }

    /// True while a dialog is showing.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Shows a dialog for `purpose`; `start_folder` and `file_name` pre-fill it. Returns false (and
    /// does nothing) when one is already open or the helper thread cannot start.
    pub fn open(
        &mut self,
        purpose: DialogPurpose,
        start_folder: Option<PathBuf>,
        file_name: String,
        repaint: impl Fn() + Send + 'static,
    ) -> bool {
        if self.open {
            return false;
        }
        if self.unavailable {
            return self
                .answers_tx
                .try_send((purpose, DialogAnswer::Unavailable))
                .is_ok();
        }
        if let Some(answer) = &mut self.override_answer {
            let answer = answer(&purpose).map_or(DialogAnswer::Cancelled, DialogAnswer::Chosen);
            return self.answers_tx.try_send((purpose, answer)).is_ok();
        }
        let answers = self.answers_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("attend-dialog".to_owned())
            .spawn(move || {
                let asked = Instant::now();
                let path = show_dialog(&purpose, start_folder, &file_name);
                let _ = answers.send((purpose, DialogAnswer::of(path, asked.elapsed())));
                repaint();
            });
        self.open = spawned.is_ok();
        self.open
    }

    /// The answer of a finished dialog, if any.
    pub(crate) fn poll(&mut self) -> Option<(DialogPurpose, DialogAnswer)> {
        let answer = self.answers_rx.try_recv().ok()?;
        self.open = false;
        Some(answer)
    }
}

fn show_dialog(
    purpose: &DialogPurpose,
    start_folder: Option<PathBuf>,
    file_name: &str,
) -> Option<PathBuf> {
    let mut dialog = rfd::FileDialog::new();
    if let Some(folder) = start_folder {
        dialog = dialog.set_directory(folder);
    }
    match purpose {
        DialogPurpose::OpenModelFolder => dialog
            .set_title("Open a diffusers model folder")
            .pick_folder(),
        DialogPurpose::OpenModelFile => dialog
            .set_title("Open a checkpoint file")
            .add_filter("checkpoint", &["safetensors", "ckpt", "pt", "pth"])
            .pick_file(),
        DialogPurpose::AddModelFolder => dialog
            .set_title("Folder to search for models")
            .pick_folder(),
        DialogPurpose::ExportAllHeatmaps => dialog
            .set_title("Folder for the word heat maps")
            .pick_folder(),
        DialogPurpose::ExportAppearanceAll => dialog
            .set_title("Folder for the transfer's images and masks")
            .pick_folder(),
        DialogPurpose::OpenSession => dialog
            .set_title("Open session")
            .add_filter("attend session", &["json"])
            .pick_file(),
        DialogPurpose::OpenImage | DialogPurpose::OpenAppearanceImage(_) => dialog
            .set_title("Open image")
            .add_filter("image", &["png", "jpg", "jpeg", "webp"])
            .pick_file(),
        DialogPurpose::SaveSession => dialog
            .set_title("Save session")
            .add_filter("attend session", &["json"])
            .set_file_name(file_name)
            .save_file(),
        DialogPurpose::ExportAttention => dialog
            .set_title("Export attention maps")
            .add_filter("safetensors", &["safetensors"])
            .set_file_name(file_name)
            .save_file(),
        DialogPurpose::ExportSegmentsJson => dialog
            .set_title("Export segments")
            .add_filter("JSON", &["json"])
            .set_file_name(file_name)
            .save_file(),
        DialogPurpose::ExportImage
        | DialogPurpose::ExportHeatmapOverImage
        | DialogPurpose::ExportHeatmapAlone
        | DialogPurpose::ExportSegmentMask
        | DialogPurpose::ExportSegmentLabels
        | DialogPurpose::ExportAppearanceOutput => dialog
            .set_title("Export PNG")
            .add_filter("PNG image", &["png"])
            .set_file_name(file_name)
            .save_file(),
    }
}

/// The path field: a small window with a text field, shown instead of a file dialog when none can
/// open. It owns the typed text and asks for [`UiCommand::PathChosen`] or
/// [`UiCommand::ClosePathField`].
pub(crate) struct PathField {
    purpose: DialogPurpose,
    text: String,
}

impl PathField {
    /// A path field for `purpose`, starting with `start` (the folder and file name a dialog would
    /// have proposed).
    pub(crate) fn new(purpose: DialogPurpose, start: String) -> Self {
        Self {
            purpose,
            text: start,
        }
    }

    /// What the path is for.
    pub(crate) fn purpose(&self) -> &DialogPurpose {
        &self.purpose
    }
}

/// Draws the path field's window.
pub(crate) fn path_field_ui(ui: &mut egui::Ui, field: &mut PathField, commands: &mut UiCommands) {
    egui::Window::new("Type a path")
        .collapsible(false)
        .resizable(false)
        .default_width(460.0)
        .anchor(egui::Align2::CENTER_CENTER, egui::Vec2::ZERO)
        .show(ui.ctx(), |ui| {
            ui.add(
                egui::Label::new(
                    "No file dialog could open (one needs xdg-desktop-portal or zenity).",
                )
                .wrap(),
            );
            let label = ui.label(format!("Path of {}:", field.purpose.describe()));
            let response = ui
                .add(egui::TextEdit::singleline(&mut field.text).desired_width(f32::INFINITY))
                .labelled_by(label.id);
            let path = field.text.trim();
            let entered =
                response.lost_focus() && ui.input(|input| input.key_pressed(egui::Key::Enter));
            ui.horizontal(|ui| {
                let ok = ui
                    .add_enabled(!path.is_empty(), egui::Button::new("OK"))
                    .clicked();
                if (ok || entered) && !path.is_empty() {
                    commands.push(UiCommand::PathChosen {
                        purpose: field.purpose.clone(),
                        path: PathBuf::from(path),
                    });
                }
                if ui.button("Cancel").clicked() {
                    commands.push(UiCommand::ClosePathField);
                }
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dialog_that_answers_nothing_at_once_did_not_open() {
        let quick = Duration::from_millis(20);
        let slow = Duration::from_secs(3);
        assert_eq!(DialogAnswer::of(None, quick), DialogAnswer::Unavailable);
        assert_eq!(DialogAnswer::of(None, slow), DialogAnswer::Cancelled);
        let path = PathBuf::from("/tmp/a.png");
        assert_eq!(
            DialogAnswer::of(Some(path.clone()), quick),
            DialogAnswer::Chosen(path)
        );
    }
}
