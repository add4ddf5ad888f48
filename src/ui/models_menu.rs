//! The Models menu: the models found on this machine (recent ones first, then the Hugging Face
//! cache, A1111 / ComfyUI folders, `$ATTEND_MODEL_DIRS` and the folders the user added), the dialogs
//! that open a model folder or checkpoint file, and dropping a model folder or checkpoint onto the
//! window. The scanning itself is [`crate::pipeline::discovery`]'s; this view only shows its list.

use std::path::{Path, PathBuf};

use crate::pipeline::discovery::{
    discover, remember_recent, DiscoveredModel, ModelFormat, SearchLocations,
};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::dialogs::DialogPurpose;
use crate::worker::{ModelLoadProgress, ModelSource};

/// eframe storage key of the menu's remembered folders and recent models.
pub const MODELS_MENU_STORAGE_KEY: &str = "attend.models_menu";

/// What the menu remembers between launches, and its last scan.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ModelsMenu {
    /// Folders the user added to the search ("Add model folder...").
    pub added_folders: Vec<PathBuf>,
    /// Models that loaded, most recent first.
    pub recent: Vec<PathBuf>,
    /// The models found by the last scan (`None`: scan when the menu next opens).
    #[serde(skip)]
    found: Option<Vec<DiscoveredModel>>,
    /// The last loaded source noted, so each load is remembered once.
    #[serde(skip)]
    noted: Option<ModelSource>,
    /// The stage of the model load in progress (set by the app each frame).
    #[serde(skip)]
    pub(crate) load_progress: Option<ModelLoadProgress>,
}

impl ModelsMenu {
    /// Remembers a folder to search from now on (and rescans).
    pub fn add_folder(&mut self, folder: PathBuf) {
        if !self.added_folders.contains(&folder) {
            self.added_folders.push(folder);
        }
        self.found = None;
    }

    /// Notes the model that is loaded now: a folder or file goes to the front of the recent list.
    pub fn note_loaded(&mut self, source: Option<&ModelSource>) {
        if source == self.noted.as_ref() {
            return;
        }
        self.noted = source.cloned();
        if let Some(path) = source.and_then(ModelSource::path) {
            remember_recent(&mut self.recent, path);
            self.found = None;
        }
    }

    /// The models to list, scanning when the list is stale.
    fn models(&mut self) -> &[DiscoveredModel] {
        let recent = &self.recent;
        let added = &self.added_folders;
        self.found
            .get_or_insert_with(|| discover(&SearchLocations::from_environment(added), recent))
    }

    /// While a model loads: its component, progress and a button that cancels it.
    pub(crate) fn load_progress_ui(&self, ui: &mut egui::Ui, commands: &mut UiCommands) {
        let Some(progress) = &self.load_progress else {
            return;
        };
        let done = progress.index as f32 / progress.count.max(1) as f32;
        ui.add(
            egui::ProgressBar::new(done)
                .desired_width(160.0)
                .text(format!(
                    "loading {} ({}/{})",
                    progress.stage,
                    progress.index + 1,
                    progress.count
                )),
        );
        if ui.button("Cancel loading").clicked() {
            commands.push(UiCommand::CancelModelLoad);
        }
    }

    /// The Models menu of the menu bar.
    pub(crate) fn menu_ui(
        &mut self,
        ui: &mut egui::Ui,
        loaded: Option<&ModelSource>,
        commands: &mut UiCommands,
    ) {
        ui.menu_button("Models", |ui| {
            if ui.button("Open model folder...").clicked() {
                commands.push(UiCommand::OpenDialog(DialogPurpose::OpenModelFolder));
            }
            if ui.button("Open model file (.safetensors)...").clicked() {
                commands.push(UiCommand::OpenDialog(DialogPurpose::OpenModelFile));
            }
            if ui.button("Use bundled model").clicked() {
                commands.push(UiCommand::LoadModel(ModelSource::Bundled));
            }
            ui.separator();
            let models = self.models().to_vec();
            if models.is_empty() {
                ui.label("No models found (Hugging Face cache, A1111, ComfyUI, added folders)");
            }
            egui::ScrollArea::vertical()
                .max_height(360.0)
                .show(ui, |ui| {
                    for model in &models {
                        model_button_ui(ui, model, loaded, commands);
                    }
                });
            ui.separator();
            if ui.button("Add model folder...").clicked() {
                commands.push(UiCommand::OpenDialog(DialogPurpose::AddModelFolder));
            }
            if ui.button("Rescan").clicked() {
                self.found = None;
            }
        });
    }
}

/// One discovered model: click to load it (a pickle explains itself instead).
fn model_button_ui(
    ui: &mut egui::Ui,
    model: &DiscoveredModel,
    loaded: Option<&ModelSource>,
    commands: &mut UiCommands,
) {
    let is_loaded = loaded.and_then(ModelSource::path) == Some(model.path.as_path());
    let label = format!(
        "{}  ({}, {})",
        model.name,
        model.format.label(),
        model.origin.label()
    );
    let response = ui
        .add_enabled(
            model.format != ModelFormat::Pickle,
            egui::Button::selectable(is_loaded, label),
        )
        .on_hover_text(model.path.display().to_string())
        .on_disabled_hover_text(
            "A PyTorch pickle: attend never opens pickles (they can run code). Convert it to \
             .safetensors (the load error shows the command).",
        );
    if response.clicked() {
        commands.push(UiCommand::LoadModel(source_for(&model.path)));
    }
}

/// The source that loads `path`: a file is a single-file checkpoint, anything else a folder.
pub fn source_for(path: &Path) -> ModelSource {
    ModelSource::from_path(path.to_path_buf())
}

/// True for what the model loader takes when dropped: a folder, a `.safetensors` file, or a pickle
/// checkpoint (refused with the way to convert it). Images and anything else are left to others.
pub fn is_droppable_model(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            ["safetensors", "ckpt", "pt", "pth"]
                .iter()
                .any(|known| extension.eq_ignore_ascii_case(known))
        })
}

/// The model paths dropped onto the window this frame (other dropped files are left alone).
pub fn dropped_model_paths(ctx: &egui::Context) -> Vec<PathBuf> {
    ctx.input(|input| {
        input
            .raw
            .dropped_files
            .iter()
            .map(|file| file.path().to_path_buf())
            .filter(|path| !path.as_os_str().is_empty() && is_droppable_model(path))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_and_checkpoints_count_as_dropped_models() {
        let temp = tempfile::tempdir().unwrap();
        let checkpoint = temp.path().join("model.SafeTensors");
        std::fs::write(&checkpoint, b"x").unwrap();
        assert!(is_droppable_model(temp.path()));
        assert!(is_droppable_model(&checkpoint));
        assert!(is_droppable_model(Path::new("old.ckpt")));
        assert!(!is_droppable_model(Path::new("picture.png")));
        assert!(!is_droppable_model(Path::new("photo.jpg")));
        assert_eq!(
            source_for(&checkpoint),
            ModelSource::File(checkpoint.clone())
        );
        assert_eq!(
            source_for(temp.path()),
            ModelSource::Folder(temp.path().to_path_buf())
        );
    }

    #[test]
    fn loads_are_remembered_once_most_recent_first() {
        let mut menu = ModelsMenu::default();
        let a = ModelSource::Folder(PathBuf::from("/a"));
        let b = ModelSource::File(PathBuf::from("/b.safetensors"));
        menu.note_loaded(Some(&a));
        menu.note_loaded(Some(&a));
        menu.note_loaded(Some(&b));
        menu.note_loaded(Some(&ModelSource::Bundled));
        assert_eq!(
            menu.recent,
            [PathBuf::from("/b.safetensors"), PathBuf::from("/a")]
        );
        menu.add_folder(PathBuf::from("/models"));
        menu.add_folder(PathBuf::from("/models"));
        assert_eq!(menu.added_folders, [PathBuf::from("/models")]);
    }
}
