//! File dialogs (rfd) on a helper thread, so the window keeps painting while one is open.
//! Tests replace the dialogs with a closure that answers at once.

use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender};

/// What a dialog is for; decides its kind (open/save/folder), filters and what happens next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialogPurpose {
    /// Pick a diffusers model folder to load.
    OpenModelFolder,
    /// Pick a session file to open.
    OpenSession,
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
}

/// Answers dialogs synchronously instead of showing them (tests).
pub type DialogOverride = Box<dyn FnMut(&DialogPurpose) -> Option<PathBuf>>;

/// Runs one dialog at a time and hands back its answer on a later frame.
pub struct Dialogs {
    answers_tx: Sender<(DialogPurpose, Option<PathBuf>)>,
    answers_rx: Receiver<(DialogPurpose, Option<PathBuf>)>,
    open: bool,
    override_answer: Option<DialogOverride>,
}

impl Default for Dialogs {
    fn default() -> Self {
        let (answers_tx, answers_rx) = crossbeam_channel::bounded(4);
        Self {
            answers_tx,
            answers_rx,
            open: false,
            override_answer: None,
        }
    }
}

impl Dialogs {
    /// Answer dialogs with `answer` instead of showing them.
    pub fn set_override(&mut self, answer: DialogOverride) {
        self.override_answer = Some(answer);
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
        if let Some(answer) = &mut self.override_answer {
            let path = answer(&purpose);
            return self.answers_tx.try_send((purpose, path)).is_ok();
        }
        let answers = self.answers_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("attend-dialog".to_owned())
            .spawn(move || {
                let path = show_dialog(&purpose, start_folder, &file_name);
                let _ = answers.send((purpose, path));
                repaint();
            });
        self.open = spawned.is_ok();
        self.open
    }

    /// The answer of a finished dialog, if any (`None` path: the user cancelled).
    pub fn poll(&mut self) -> Option<(DialogPurpose, Option<PathBuf>)> {
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
        DialogPurpose::ExportAllHeatmaps => dialog
            .set_title("Folder for the word heat maps")
            .pick_folder(),
        DialogPurpose::OpenSession => dialog
            .set_title("Open session")
            .add_filter("attend session", &["json"])
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
        | DialogPurpose::ExportSegmentLabels => dialog
            .set_title("Export PNG")
            .add_filter("PNG image", &["png"])
            .set_file_name(file_name)
            .save_file(),
    }
}
