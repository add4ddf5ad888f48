//! Finding the models a user already has on disk: diffusers folders in the Hugging Face cache,
//! single-file checkpoints in A1111 / ComfyUI model folders (and any folder the user adds), and the
//! models used recently. Plain file-system scanning; nothing is loaded.
//!
//! Where it looks ([`SearchLocations::from_environment`]):
//!
//! - the Hugging Face cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
//!   (`models--<org>--<name>/snapshots/<revision>/model_index.json`);
//! - `~/stable-diffusion-webui/models/Stable-diffusion` (A1111) and `~/ComfyUI/models/checkpoints`;
//! - the folders in `$ATTEND_MODEL_DIRS` (the platform's path-list separator) and any given by the
//!   caller (`attend models --search-dir`, the editor's added folders). An A1111 or ComfyUI root
//!   folder is followed to its checkpoint folder.
//!
//! In a searched folder, every `*.safetensors` file and every sub-folder with a `model_index.json`
//! is a model, one level of sub-folders deep (A1111 users sort checkpoints into sub-folders).
//! Pickle checkpoints (`.ckpt`, ...) are listed too, marked, so a user learns why they do not load.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::pipeline::checkpoint::is_pickle_path;

/// The environment variable with extra model folders.
pub const MODEL_DIRS_VARIABLE: &str = "ATTEND_MODEL_DIRS";

/// How a model is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ModelFormat {
    /// A diffusers folder (`model_index.json`).
    DiffusersFolder,
    /// A single `.safetensors` checkpoint.
    SingleFile,
    /// A pickle checkpoint attend refuses to open (`.ckpt`, `.pt`, `.pth`, `.bin`).
    Pickle,
}

impl ModelFormat {
    /// A short label for lists.
    pub fn label(self) -> &'static str {
        match self {
            Self::DiffusersFolder => "diffusers folder",
            Self::SingleFile => "single file",
            Self::Pickle => "pickle (convert to .safetensors)",
        }
    }
}

/// Where a model was found.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ModelOrigin {
    /// Used recently.
    Recent,
    /// The Hugging Face cache at this root.
    HuggingFaceCache(PathBuf),
    /// A searched model folder.
    Folder(PathBuf),
}

impl ModelOrigin {
    /// A short label for lists.
    pub fn label(&self) -> String {
        match self {
            Self::Recent => "recent".to_string(),
            Self::HuggingFaceCache(_) => "Hugging Face cache".to_string(),
            Self::Folder(folder) => folder.display().to_string(),
        }
    }
}

/// One model found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredModel {
    /// A display name: `org/name` for the Hugging Face cache, else the file or folder name.
    pub name: String,
    /// What to load (the snapshot folder, the model folder or the checkpoint file).
    pub path: PathBuf,
    /// How it is stored.
    pub format: ModelFormat,
    /// Where it was found.
    pub origin: ModelOrigin,
}

/// The places to scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchLocations {
    /// Hugging Face hub cache roots (`.../hub`).
    pub hf_caches: Vec<PathBuf>,
    /// Folders holding checkpoints or model folders.
    pub folders: Vec<PathBuf>,
}

impl SearchLocations {
    /// The default places from the process environment plus `extra` folders (see the module docs).
    pub fn from_environment(extra: &[PathBuf]) -> Self {
        let home = std::env::var_os("HOME")
            .or_else(|| std::env::var_os("USERPROFILE"))
            .map(PathBuf::from);
        Self::from_variables(|name| std::env::var_os(name), home.as_deref(), extra)
    }

    /// [`SearchLocations::from_environment`] with the variables and home folder given (for tests).
    pub fn from_variables(
        variable: impl Fn(&str) -> Option<OsString>,
        home: Option<&Path>,
        extra: &[PathBuf],
    ) -> Self {
        let non_empty = |name: &str| variable(name).filter(|value| !value.is_empty());
        let hf_cache = non_empty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| non_empty("HF_HOME").map(|home| PathBuf::from(home).join("hub")))
            .or_else(|| home.map(|home| home.join(".cache").join("huggingface").join("hub")));
        let mut folders: Vec<PathBuf> = Vec::new();
        if let Some(home) = home {
            folders.push(home.join("stable-diffusion-webui/models/Stable-diffusion"));
            folders.push(home.join("ComfyUI/models/checkpoints"));
        }
        if let Some(list) = non_empty(MODEL_DIRS_VARIABLE) {
            folders.extend(std::env::split_paths(&list));
        }
        folders.extend(extra.iter().cloned());
        let mut seen = BTreeSet::new();
        folders.retain(|folder| seen.insert(folder.clone()));
        Self {
            hf_caches: hf_cache.into_iter().collect(),
            folders,
        }
    }
}

/// A folder given as an A1111 or ComfyUI root means its checkpoint folder.
fn checkpoint_folder(folder: &Path) -> PathBuf {
    for inner in ["models/Stable-diffusion", "models/checkpoints"] {
        let candidate = folder.join(inner);
        if candidate.is_dir() {
            return candidate;
        }
    }
    folder.to_path_buf()
}

/// Sorted entries of a folder (unreadable folders give none).
fn sorted_entries(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .collect();
    paths.sort();
    paths
}

/// The model stored at `path`, if it is one (a diffusers folder, a `.safetensors` file or a pickle).
pub fn model_format(path: &Path) -> Option<ModelFormat> {
    if path.is_dir() {
        return path
            .join("model_index.json")
            .is_file()
            .then_some(ModelFormat::DiffusersFolder);
    }
    if !path.is_file() {
        return None;
    }
    let extension = path.extension()?.to_str()?;
    if extension.eq_ignore_ascii_case("safetensors") {
        Some(ModelFormat::SingleFile)
    } else if is_pickle_path(path) && !extension.eq_ignore_ascii_case("bin") {
        // `.bin` files are too often other things (tokenizers, text encoders) to list as models.
        Some(ModelFormat::Pickle)
    } else {
        None
    }
}

fn display_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// The models in one folder: its `.safetensors` / pickle files and diffusers sub-folders, and those
/// one sub-folder deeper. The folder itself counts when it is a diffusers folder.
pub fn scan_folder(folder: &Path) -> Vec<DiscoveredModel> {
    let folder = checkpoint_folder(folder);
    let origin = ModelOrigin::Folder(folder.clone());
    let found = |path: &Path, format| DiscoveredModel {
        name: display_name(path),
        path: path.to_path_buf(),
        format,
        origin: origin.clone(),
    };
    if let Some(ModelFormat::DiffusersFolder) = model_format(&folder) {
        return vec![found(&folder, ModelFormat::DiffusersFolder)];
    }
    let mut models = Vec::new();
    for entry in sorted_entries(&folder) {
        match model_format(&entry) {
            Some(format) => models.push(found(&entry, format)),
            None if entry.is_dir() => {
                for inner in sorted_entries(&entry) {
                    if let Some(format) = model_format(&inner) {
                        let mut model = found(&inner, format);
                        model.name = format!("{}/{}", display_name(&entry), model.name);
                        models.push(model);
                    }
                }
            }
            None => {}
        }
    }
    models
}

/// The diffusers pipelines in a Hugging Face hub cache root: for each `models--<org>--<name>`, the
/// snapshot that `refs/main` names when it has a `model_index.json`, else every snapshot with one.
pub fn scan_hf_cache(root: &Path) -> Vec<DiscoveredModel> {
    let mut models = Vec::new();
    for repo in sorted_entries(root) {
        let Some(repo_name) = repo
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix("models--"))
        else {
            continue;
        };
        let name = repo_name.replace("--", "/");
        let snapshots = repo.join("snapshots");
        let main = std::fs::read_to_string(repo.join("refs").join("main"))
            .ok()
            .map(|revision| snapshots.join(revision.trim()))
            .filter(|snapshot| snapshot.join("model_index.json").is_file());
        let chosen: Vec<PathBuf> = match main {
            Some(snapshot) => vec![snapshot],
            None => sorted_entries(&snapshots)
                .into_iter()
                .filter(|snapshot| snapshot.join("model_index.json").is_file())
                .collect(),
        };
        let several = chosen.len() > 1;
        for snapshot in chosen {
            let name = if several {
                format!("{name}@{}", display_name(&snapshot))
            } else {
                name.clone()
            };
            models.push(DiscoveredModel {
                name,
                path: snapshot,
                format: ModelFormat::DiffusersFolder,
                origin: ModelOrigin::HuggingFaceCache(root.to_path_buf()),
            });
        }
    }
    models
}

/// Every model in `locations`, the `recent` ones first (those still on disk), each path once.
pub fn discover(locations: &SearchLocations, recent: &[PathBuf]) -> Vec<DiscoveredModel> {
    let mut models: Vec<DiscoveredModel> = recent
        .iter()
        .filter_map(|path| {
            Some(DiscoveredModel {
                name: display_name(path),
                path: path.clone(),
                format: model_format(path)?,
                origin: ModelOrigin::Recent,
            })
        })
        .collect();
    for root in &locations.hf_caches {
        models.extend(scan_hf_cache(root));
    }
    for folder in &locations.folders {
        models.extend(scan_folder(folder));
    }
    let mut seen = BTreeSet::new();
    models.retain(|model| {
        let key = std::fs::canonicalize(&model.path).unwrap_or_else(|_| model.path.clone());
        seen.insert(key)
    });
    models
}

/// How many recent models are remembered.
pub const RECENT_LIMIT: usize = 10;

/// `path` put first in a recent-models list (moved if present), at most [`RECENT_LIMIT`] kept.
pub fn remember_recent(recent: &mut Vec<PathBuf>, path: &Path) {
    recent.retain(|known| known != path);
    recent.insert(0, path.to_path_buf());
    recent.truncate(RECENT_LIMIT);
}
